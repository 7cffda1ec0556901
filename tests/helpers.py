"""Helpers for tests: prompt batches for the tiny models, answer files to tamper with."""

from __future__ import annotations

import math

import torch

from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token

QUESTIONS = ("What is this?", "Describe the image in detail please.", "Is there a cat?")


def tiny_eager_decoder(num_layers: int, rope_theta: float = 10000.0):
    """A random Llama decoder (64 wide, 4 query / 2 key-value heads) on eager attention, so its
    ``output_attentions`` maps are the reference of the score-based methods. A small
    ``rope_theta`` makes its attention sensitive to positions a few tokens apart."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    config._attn_implementation = "eager"
    return LlamaModel(config).eval()


def prompt_ids(tokenizer, question: str, template: str = "vicuna_v1", image_first: bool = True) -> torch.Tensor:
    conv = conv_templates[template].copy()
    text = f"<image>\n{question}" if image_first else f"{question}\n<image>"
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


def pad_batch(sequences, pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask


def read_lines(path) -> list[str]:
    """The non-blank lines of a JSON-lines file, newlines kept."""
    with open(path) as f:
        return [line for line in f if line.strip()]


def write_lines(path, lines) -> str:
    with open(path, "w") as f:
        f.writelines(lines)
    return str(path)


# ADSC's uniform_2d selection, independent of adsc_patch.select


def reference_spread(n, k):
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def reference_lattice(h, w, k):
    rows = min(k, max(1, round(math.sqrt(k * h / w))))
    per_row = [k // rows] * rows
    for r in reference_spread(rows, k % rows):
        per_row[r] += 1
    return [((r + 0.5) * h / rows, (c + 0.5) * w / n) for r, n in enumerate(per_row) for c in range(n)]


def reference_greedy(rows, cols):
    pairs = sorted(
        ((ry - cy) ** 2 + (rx - cx) ** 2, i * len(cols) + j, i, j)
        for i, (ry, rx) in enumerate(rows)
        for j, (cy, cx) in enumerate(cols)
    )
    used_r, used_c, out = set(), set(), []
    for _, _, i, j in pairs:
        if i not in used_r and j not in used_c:
            used_r.add(i)
            used_c.add(j)
            out.append((i, j))
    return out


def reference_uniform_2d(h, w, counts):
    """ADSC's 2-D selection written again from its documented rule (``adsc_patch/select.py``),
    pure Python: survivors per stage of an ``h x w`` grid keeping ``counts``. Checked against
    hand-derived sets in tests/adsc_patch/test_select_oracle.py."""
    centre = [(i + 0.5, j + 0.5) for i in range(h) for j in range(w)]
    chosen, sets = set(), [None] * len(counts)
    for stage in range(len(counts) - 1, -1, -1):
        points = reference_lattice(h, w, counts[stage])
        have = sorted(chosen)
        claimed = {p for _, p in reference_greedy([centre[c] for c in have], points)}
        targets = [pt for p, pt in enumerate(points) if p not in claimed]
        free = [c for c in range(h * w) if c not in chosen]
        for _, f in reference_greedy(targets, [centre[c] for c in free]):
            chosen.add(free[f])
        sets[stage] = tuple(sorted(chosen))
    return tuple(sets)


def eager_model(cls, config, seed: int = 0):
    """A tiny random ``cls(config)`` in eval mode with eager attention in the model and its text
    model (the references ask the attention modules for their weights)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    return cls(config).eval()


def cache_lengths_per_layer(cache) -> list[int]:
    """The positions each decoder layer's KV cache holds, read off its key tensor (transformers
    5.x: ``cache.layers[i].keys``, ``(batch, heads, length, head_dim)``)."""
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def scheduled_cache_lengths(num_layers, prune_layers, rows, new_tokens) -> list[int]:
    """What each layer's cache must hold after a cached greedy ``generate`` of ``new_tokens``
    (the last generated token is never fed back, so ``new_tokens - 1`` decode positions),
    written from the rule: layer ``l`` is in stage ``s`` = the prune layers at or before it;
    ``rows``: per prompt row, ``(text tokens, [vision tokens entering stage 0, 1, ...])``. Stage
    0 runs on the left-padded batch (the longest prompt's length); after a prune layer only
    real kept tokens remain, shorter rows padded to the row keeping the most."""
    out = []
    for layer in range(num_layers):
        stage = sum(1 for p in prune_layers if p <= layer)
        out.append(max(text + vision[stage] for text, vision in rows) + new_tokens - 1)
    return out
