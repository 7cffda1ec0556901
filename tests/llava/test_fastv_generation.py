"""FastV in the LLaVA model: cached generation against a slow loop written here (kept set from
an eager unpruned forward's attention, then layer-by-layer forwards without a cache), batches
against single prompts, the cache after prefill, and the configuration errors."""

import copy

import pytest
import torch
from transformers import LlamaModel

from adsc_patch import ScheduleError, compat
from adsc_patch.cache import cache_layer_lengths
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range

K, BUDGET = 2, 12.0
STEPS = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def fastv(tiny_deep_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    schedule = model.configure_pruning(method="fastv", vision_token_budget=BUDGET)
    assert schedule.prune_layers == (K,) and abs(schedule.average_tokens - BUDGET) <= 1
    return tokenizer, model, processor, schedule


def _reference_kept(model, embeds, vision, keep):
    """Vision positions FastV keeps, from an eager unpruned forward's attention maps."""
    eager = copy.deepcopy(model.model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = LlamaModel.forward(eager, inputs_embeds=embeds, output_attentions=True).attentions
    row = attentions[K - 1][0].mean(0)[-1]
    positions = torch.nonzero(vision).flatten()
    return set(positions[row[positions].topk(keep).indices].tolist())


def _slow_greedy(model, prompt, pixels, steps, keep):
    """Greedy tokens by whole-sequence forwards, layer by layer, dropping at layer K what the
    prompt's last token attended to least."""
    inner = model.model
    spliced = model.prepare_inputs_labels_for_multimodal(prompt[None], None, None, pixels)
    kept = _reference_kept(model, spliced.inputs_embeds, spliced.vision_mask[0], keep)
    dropped = set(torch.nonzero(spliced.vision_mask[0]).flatten().tolist()) - kept
    tokens = []
    for _ in range(steps):
        sequence = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
        hidden = model.prepare_inputs_labels_for_multimodal(sequence, None, None, pixels).inputs_embeds
        index = torch.arange(hidden.shape[1])
        with torch.no_grad():
            for layer_idx, layer in enumerate(inner.layers):
                if layer_idx == K:
                    survive = torch.tensor([int(i) not in dropped for i in index])
                    hidden, index = hidden[:, survive], index[survive]
                n = hidden.shape[1]
                mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
                hidden = layer(hidden, attention_mask=mask, position_embeddings=inner.rotary_emb(hidden, index[None]))
            tokens.append(int(model.lm_head(inner.norm(hidden))[0, -1].argmax()))
    return tokens, kept


@pytest.mark.parametrize("question", [0, 2])
def test_cached_generation_equals_the_slow_loop(fastv, random_images, question):
    tokenizer, model, processor, schedule = fastv
    prompt = prompt_ids(tokenizer, QUESTIONS[question])
    pixels = process_images(random_images[:1], processor, model.config)
    with torch.no_grad():
        generated = model.generate(prompt[None], images=pixels, **STEPS)
    trace_kept = set(model.pruning_trace.kept_vision_positions[1][0].tolist())
    expected, kept = _slow_greedy(model, prompt, pixels, STEPS["max_new_tokens"], schedule.stage_tokens[1])
    assert trace_kept == kept
    assert generated[0].tolist() == expected


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_equals_each_prompt_alone(fastv, random_images, side):
    tokenizer, model, processor, _ = fastv
    seqs = [prompt_ids(tokenizer, QUESTIONS[0]), prompt_ids(tokenizer, QUESTIONS[1], image_first=False)]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, side)
    pixels = process_images(random_images[:2], processor, model.config)
    with torch.no_grad():
        if side == "left":
            batched = model.generate(ids, images=pixels, attention_mask=mask, **STEPS)
            alone = [model.generate(s[None], images=pixels[i:i + 1], **STEPS)[0] for i, s in enumerate(seqs)]
            assert [row.tolist() for row in batched] == [a.tolist() for a in alone]
        else:  # right padding (training's layout): after the prune layer rows are compacted and
            # right-aligned, so each row's last slot is its last prompt token
            out = model(input_ids=ids, attention_mask=mask, images=pixels)
            for row, seq in enumerate(seqs):
                single = model(input_ids=seq[None], images=pixels[row:row + 1]).logits[0, -1]
                torch.testing.assert_close(out.logits[row, -1], single, atol=1e-5, rtol=1e-5)


def test_cache_after_prefill_holds_text_and_the_kept_tokens(fastv, random_images):
    tokenizer, model, processor, schedule = fastv
    prompt = prompt_ids(tokenizer, QUESTIONS[0])
    pixels = process_images(random_images[:1], processor, model.config)
    with torch.no_grad():
        out = model(input_ids=prompt[None], images=pixels, use_cache=True)
        generated = model.generate(prompt[None], images=pixels, return_dict_in_generate=True, **STEPS)
    text = len(prompt) - 1
    expected = [text + n for n in schedule.tokens_per_layer]
    assert cache_layer_lengths(compat.output_cache(out)) == expected
    after = cache_layer_lengths(compat.output_cache(generated))
    assert after == [n + STEPS["max_new_tokens"] - 1 for n in expected]


def test_configuration_errors_name_the_method_and_what_is_reachable(tiny_deep_dir):
    _, model, _, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    with pytest.raises(ScheduleError, match=r"fastv drops once, at one layer K >= 1 .*\[2, 5\]"):
        model.configure_pruning(method="fastv", prune_layers=[2, 5], vision_token_budget=12)
    with pytest.raises(ScheduleError, match="unknown prune method 'tome'; known: adsc, fastv"):
        model.configure_pruning(method="tome", vision_token_budget=12)
    with pytest.raises(ScheduleError, match=r"prune method fastv: .*below what prune layers \[6\] allow.*lowest "
                                            r"reachable average"):
        model.configure_pruning(method="fastv", prune_layers=[6], vision_token_budget=4)
    assert model.config.prune_method == "adsc"  # a refused request changes nothing
