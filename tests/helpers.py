"""Helpers for tests: prompt batches for the tiny models, answer files to tamper with."""

from __future__ import annotations

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
