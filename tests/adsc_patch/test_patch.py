"""apply_adsc on transformers' own LlavaForConditionalGeneration (llava-hf users keep their class)."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adsc_patch import ScheduleError, apply_adsc, compat, remove_adsc
from adsc_patch.cache import cache_layer_lengths
from adsc_patch.patch import last_trace
from llava.constants import IGNORE_INDEX
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids, reference_uniform_2d
from tests.llava.test_builder import _hf_inputs

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range


@pytest.fixture(scope="module")
def pair(tiny_hf_dir):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()
    tokenizer, ours, processor, _ = load_pretrained_model(tiny_hf_dir, device="cpu")
    return hf, ours, tokenizer, processor


def test_patched_hf_model_equals_our_model_with_the_same_schedule(pair, random_images):
    hf, ours, tokenizer, processor = pair
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        stock = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    schedule = apply_adsc(hf, prune_layers=[1, 2], drop_ratio=0.5)
    apply_adsc(ours, prune_layers=[1, 2], drop_ratio=0.5)
    try:
        assert schedule.stage_tokens == (36, 18, 9)
        with torch.no_grad():
            patched = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions)
            seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
            our_ids, our_mask = pad_batch(seqs, tokenizer.pad_token_id, "left")
            expected = ours(input_ids=our_ids, attention_mask=our_mask, images=pixels)
        assert patched.logits.shape[1] == ids.shape[1] - 27  # 36 -> 9 vision tokens per row
        torch.testing.assert_close(patched.logits, expected.logits, atol=1e-5, rtol=1e-5)
        assert "token_positions" not in patched  # transformers' own output class, its own fields
        trace = last_trace(hf)
        assert torch.equal(trace.token_positions, expected.token_positions)
        assert [len(p[0]) for p in trace.kept_vision_positions] == [36, 18, 9]
    finally:
        remove_adsc(hf)
        remove_adsc(ours)
    with torch.no_grad():
        restored = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
    assert torch.equal(restored, stock)
    assert "forward" not in vars(hf) and "forward" not in vars(hf.model)


def _slow_hf_logits(hf, row_ids, row_pixels, prune_layers, stage_tokens):
    """One llava-hf prompt by hand: transformers' own embedding and image splice (the stock
    model's first hidden state), then its decoder layers one by one on the physically
    shortened sequence, ADSC's survivors (tests.helpers' reference selection) keeping their
    original positions."""
    lm = hf.model.language_model
    with torch.no_grad():
        hidden = hf(input_ids=row_ids[None], pixel_values=row_pixels, output_hidden_states=True).hidden_states[0]
        image = torch.nonzero(row_ids == hf.config.image_token_id).flatten()
        side = int(len(image) ** 0.5)
        kept_local = reference_uniform_2d(side, side, stage_tokens[1:])
        index = torch.arange(len(row_ids))
        for layer_idx, layer in enumerate(lm.layers):
            if layer_idx in prune_layers:
                stage = prune_layers.index(layer_idx)
                dropped = set(image.tolist()) - {int(image[i]) for i in kept_local[stage]}
                keep = torch.tensor([int(i) not in dropped for i in index])
                hidden, index = hidden[:, keep], index[keep]
            n = hidden.shape[1]
            mask = torch.full((n, n), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=mask, position_embeddings=lm.rotary_emb(hidden, index[None]))
        return hf.lm_head(lm.norm(hidden))[0], index


@pytest.mark.parametrize("side", ["left", "right"])
def test_patched_hf_logits_equal_a_slow_loop_over_transformers_own_layers(pair, random_images, side):
    hf, _, tokenizer, processor = pair
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    schedule = apply_adsc(hf, prune_layers=[1, 2], drop_ratio=0.5)
    try:
        with torch.no_grad():
            patched = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions).logits
        token_positions = last_trace(hf).token_positions
    finally:
        remove_adsc(hf)
    assert schedule.stage_tokens == (36, 18, 9)  # floor(0.5 * 36), floor(0.5 * 18)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        reference, kept = _slow_hf_logits(hf, ids[row][real], pixels[row:row + 1], [1, 2], (36, 18, 9))
        assert reference.shape[0] == int(real.sum()) - 27
        slots = token_positions[row] >= 0  # the row's real slots, padding wherever the layout puts it
        pad = int((~real).sum()) if side == "left" else 0
        assert token_positions[row][slots].tolist() == (kept + pad).tolist()
        torch.testing.assert_close(patched[row][slots], reference, atol=1e-5, rtol=1e-5)


def test_patched_hf_loss_matches_ours(pair, random_images):
    hf, ours, tokenizer, processor = pair
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "right")
    labels = ids.clone()
    labels[(mask == 0) | (ids == hf.config.image_token_id)] = IGNORE_INDEX
    seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    our_ids, our_mask = pad_batch(seqs, tokenizer.pad_token_id, "right")
    our_labels = our_ids.clone()
    our_labels[(our_mask == 0) | (our_ids < 0)] = IGNORE_INDEX
    apply_adsc(hf, prune_layers=[2], vision_token_budget=20)
    apply_adsc(ours, prune_layers=[2], vision_token_budget=20)
    try:
        with torch.no_grad():
            hf_loss = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
            our_loss = ours(input_ids=our_ids, attention_mask=our_mask, images=pixels, labels=our_labels).loss
        torch.testing.assert_close(hf_loss, our_loss, atol=1e-5, rtol=1e-5)
    finally:
        remove_adsc(hf)
        remove_adsc(ours)


def _uncached_hf_step_logits(hf, prompt, pixels, tokens):
    """Per step, the patched model's own forward over ``prompt`` + the tokens before it, no cache."""
    out = []
    with torch.no_grad():
        for step in range(len(tokens)):
            sequence = torch.cat([prompt, torch.tensor(tokens[:step], dtype=torch.long)])[None]
            out.append(hf(input_ids=sequence, pixel_values=pixels, use_cache=False).logits[0, -1])
    return out


def test_patched_hf_generation_batch_equals_single(pair, random_images):
    """Every row of a left-padded batch, step by step, against its own prompt's uncached forward."""
    hf, _, tokenizer, processor = pair
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "left")
    apply_adsc(hf, prune_layers=[1, 3], drop_ratio=0.6)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    try:
        with torch.no_grad():
            batched = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
        for row in range(3):
            real = mask[row].bool()
            tokens = batched.sequences[row, ids.shape[1]:].tolist()
            expected = _uncached_hf_step_logits(hf, ids[row][real], pixels[row:row + 1], tokens)
            for step, logits in enumerate(expected):
                torch.testing.assert_close(batched.logits[step][row], logits, atol=1e-4, rtol=1e-4)
    finally:
        remove_adsc(hf)


def test_bad_requests_are_refused_before_touching_the_model(pair):
    hf = pair[0]
    with pytest.raises(ScheduleError, match="out of range"):
        apply_adsc(hf, prune_layers=[7], drop_ratio=0.5)
    with pytest.raises(ScheduleError, match="exactly one"):
        apply_adsc(hf, prune_layers=[1], drop_ratio=0.5, vision_token_budget=10)
    with pytest.raises(ScheduleError, match="above the 36"):
        apply_adsc(hf, prune_layers=[1], vision_token_budget=40)
    assert "forward" not in vars(hf.model.language_model)
    with pytest.raises(TypeError, match="supports"):
        apply_adsc(torch.nn.Linear(2, 2), prune_layers=[1], drop_ratio=0.5)


def test_patched_hf_generation_equals_the_uncached_loop_and_caches_the_schedule(pair, random_images):
    """Against an independent reference: the patched model's own forward, without a cache."""
    hf, _, tokenizer, processor = pair
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "left")
    prompt = ids[0][mask[0].bool()]
    schedule = apply_adsc(hf, prune_layers=[1, 3], drop_ratio=0.6)
    steps = 6
    try:
        with torch.no_grad():
            out = hf.generate(input_ids=prompt[None], pixel_values=pixels[0:1], max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True)
            tokens = []
            for _ in range(steps):
                sequence = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
                logits = hf(input_ids=sequence, pixel_values=pixels[0:1], use_cache=False).logits
                torch.testing.assert_close(out.logits[len(tokens)][0], logits[0, -1], atol=1e-4, rtol=1e-4)
                tokens.append(int(logits[0, -1].argmax()))
        assert out.sequences[0, len(prompt):].tolist() == tokens
        text = len(prompt) - schedule.stage_tokens[0]
        assert cache_layer_lengths(compat.output_cache(out)) == [text + n + steps - 1 for n in schedule.tokens_per_layer]
        assert [len(p[0]) for p in last_trace(hf).kept_vision_positions] == list(schedule.stage_tokens)
    finally:
        remove_adsc(hf)


@pytest.mark.parametrize("method, layers", [("fastv", [2]), ("pdrop", [1, 3]), ("pdrop_original_ids", [1, 3])])
def test_patched_hf_score_based_methods_equal_ours(pair, random_images, method, layers):
    hf, ours, tokenizer, processor = pair
    seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    apply_adsc(hf, prune_layers=layers, drop_ratio=0.5, method=method)
    apply_adsc(ours, prune_layers=layers, drop_ratio=0.5, method=method)
    try:
        with torch.no_grad():
            ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "left")
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            patched = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=positions)
            our_ids, our_mask = pad_batch(seqs, tokenizer.pad_token_id, "left")
            expected = ours(input_ids=our_ids, attention_mask=our_mask, images=pixels)
            torch.testing.assert_close(patched.logits, expected.logits, atol=1e-5, rtol=1e-5)
            assert [len(k[0]) for k in last_trace(hf).kept_vision_positions] == [36, 18, 9][:len(layers) + 1]
            # training: the token before each answer ranks, on both
            ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "right")
            labels = ids.clone()
            labels[(mask == 0) | (ids == hf.config.image_token_id)] = IGNORE_INDEX
            labels[:, :-3] = IGNORE_INDEX  # answers: the last three tokens of the longest row
            our_ids, our_mask = pad_batch(seqs, tokenizer.pad_token_id, "right")
            our_labels = our_ids.clone()
            our_labels[(our_mask == 0) | (our_ids < 0)] = IGNORE_INDEX
            our_labels[:, :-3] = IGNORE_INDEX
            hf_loss = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
            hf_kept = last_trace(hf).kept_vision_positions[1]
            our_loss = ours(input_ids=our_ids, attention_mask=our_mask, images=pixels, labels=our_labels).loss
            our_kept = ours.pruning_trace.kept_vision_positions[1]
        torch.testing.assert_close(hf_loss, our_loss, atol=1e-5, rtol=1e-5)
        offset = ids.shape[1] - our_ids.shape[1]  # hf ids hold 36 image tokens where ours hold one marker
        assert offset == 35 and [k.tolist() for k in hf_kept] == [k.tolist() for k in our_kept]
    finally:
        remove_adsc(hf)
        remove_adsc(ours)


def test_the_hf_patch_refuses_pre_llm_methods(pair):
    with pytest.raises(ScheduleError, match="prune method 'pool': the llava-hf patch runs the in-decoder methods"):
        apply_adsc(pair[0], prune_layers=[], vision_token_budget=9, method="pool")
    assert "forward" not in vars(pair[0].model.language_model)
