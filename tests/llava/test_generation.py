"""Every generation path with pruning on, against an uncached reference written here.

The reference is the model's own forward on the whole sequence (prompt + tokens so far)
with ``use_cache=False``: it never touches the decode path, the per-layer cache or
``generate``'s cache handling, which is where a transformers release that renames the
cache argument breaks things (5.24: every decode step silently became a text-only prefill).
The pruned forward itself is checked against a slow layer-by-layer loop in
``test_llava_adsc.py``.
"""

import pytest
import torch

from adsc_patch import compat
from adsc_patch.cache import cache_layer_lengths
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range


@pytest.fixture(scope="module")
def pruned(tiny_deep_dir):
    """The 8-layer tiny model with three pruning stages (36 -> 18 -> 9 -> 4 vision tokens)."""
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    schedule = model.configure_pruning(prune_layers=[2, 4, 6], drop_ratio=0.5)
    assert schedule.stage_tokens == (36, 18, 9, 4)
    return tokenizer, model, processor, schedule


def _two_image_prompt(tokenizer):
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nand\n<image>\nWhat differs between them?")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


PROMPTS = {
    "image first": lambda tok: (prompt_ids(tok, QUESTIONS[0]), 1),
    "image last": lambda tok: (prompt_ids(tok, QUESTIONS[1], image_first=False), 1),
    "two images": lambda tok: (_two_image_prompt(tok), 2),
}


def _inputs(tokenizer, model, processor, images, kind):
    ids, n_images = PROMPTS[kind](tokenizer)
    return ids, process_images(images[:n_images], processor, model.config)


def _uncached_logits(model, prompt, tokens, pixels):
    """Next-token logits after ``prompt + tokens``, from one forward without a cache."""
    sequence = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)])[None]
    with torch.no_grad():
        return model(input_ids=sequence, images=pixels, use_cache=False).logits[0, -1]


def _uncached_greedy(model, prompt, pixels, steps):
    tokens = []
    for _ in range(steps):
        tokens.append(int(_uncached_logits(model, prompt, tokens, pixels).argmax()))
    return tokens


FIXED = dict(max_new_tokens=6, min_new_tokens=6)  # no early end: every step is compared


def _assert_step_logits(model, prompt, pixels, tokens, step_logits):
    """Each step's logits against one uncached forward over the prompt and the tokens before it."""
    for step, logits in enumerate(step_logits):
        torch.testing.assert_close(logits, _uncached_logits(model, prompt, tokens[:step], pixels), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_greedy_equals_the_uncached_greedy_loop(pruned, random_images, kind):
    tokenizer, model, processor, _ = pruned
    prompt, pixels = _inputs(tokenizer, model, processor, random_images, kind)
    with torch.no_grad():
        out = model.generate(prompt[None], images=pixels, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **FIXED)
    tokens = out.sequences[0].tolist()
    assert tokens == _uncached_greedy(model, prompt, pixels, FIXED["max_new_tokens"])
    _assert_step_logits(model, prompt, pixels, tokens, [step[0] for step in out.logits])


def test_a_left_padded_batch_equals_the_uncached_loop_of_each_prompt(pruned, random_images):
    tokenizer, model, processor, _ = pruned
    prompts = [PROMPTS[kind](tokenizer)[0] for kind in ("image first", "image last", "two images")]
    pixels = process_images([random_images[0], random_images[1], random_images[0], random_images[2]], processor,
                            model.config)
    ids, mask = pad_batch(prompts, tokenizer.pad_token_id, "left")
    with torch.no_grad():
        out = model.generate(ids, images=pixels, attention_mask=mask, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **FIXED)
    per_row = [pixels[0:1], pixels[1:2], pixels[2:4]]
    for row, prompt in enumerate(prompts):
        tokens = out.sequences[row].tolist()
        assert tokens == _uncached_greedy(model, prompt, per_row[row], FIXED["max_new_tokens"])
        _assert_step_logits(model, prompt, per_row[row], tokens, [step[row] for step in out.logits])


@pytest.mark.parametrize("kind", ["image first", "two images"])
def test_beam_search_scores_are_the_summed_uncached_log_probs(pruned, random_images, kind):
    tokenizer, model, processor, _ = pruned
    prompt, pixels = _inputs(tokenizer, model, processor, random_images, kind)
    with torch.no_grad():
        out = model.generate(prompt[None], images=pixels, do_sample=False, num_beams=3, num_return_sequences=2,
                             length_penalty=0.0, output_scores=True, return_dict_in_generate=True, **FIXED)
    assert out.sequences.shape == (2, FIXED["max_new_tokens"])
    for sequence, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        total = 0.0
        for step, token in enumerate(sequence):
            log_probs = torch.log_softmax(_uncached_logits(model, prompt, sequence[:step], pixels).float(), -1)
            total += float(log_probs[token])
        assert score == pytest.approx(total, abs=1e-4)
    assert out.sequences_scores[0] >= out.sequences_scores[1]


def test_sampling_step_logits_equal_uncached_logits_for_every_returned_sequence(pruned, random_images):
    tokenizer, model, processor, _ = pruned
    prompts = [PROMPTS["image first"](tokenizer)[0], PROMPTS["image last"](tokenizer)[0]]
    pixels = process_images(random_images[:2], processor, model.config)
    ids, mask = pad_batch(prompts, tokenizer.pad_token_id, "left")
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.generate(ids, images=pixels, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             num_return_sequences=2, output_logits=True, return_dict_in_generate=True, **FIXED)
    assert out.sequences.shape == (4, FIXED["max_new_tokens"])
    assert len({tuple(s) for s in out.sequences.tolist()}) > 1  # really sampled
    for row, sequence in enumerate(out.sequences.tolist()):
        prompt = prompts[row // 2]
        for step in range(len(sequence)):
            expected = _uncached_logits(model, prompt, sequence[:step], pixels[row // 2 : row // 2 + 1])
            torch.testing.assert_close(out.logits[step][row], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_after_generate_each_layer_caches_text_scheduled_vision_and_generated_minus_one(pruned, random_images, kind):
    tokenizer, model, processor, schedule = pruned
    prompt, pixels = _inputs(tokenizer, model, processor, random_images, kind)
    n_images = pixels.shape[0]
    with torch.no_grad():
        out = model.generate(prompt[None], images=pixels, do_sample=False, return_dict_in_generate=True, **FIXED)
    text = len(prompt) - n_images  # each marker is replaced by its image
    expected = [text + n_images * n + FIXED["max_new_tokens"] - 1 for n in schedule.tokens_per_layer]
    assert cache_layer_lengths(compat.output_cache(out)) == expected
    kept = [len(stage[0]) for stage in model.pruning_trace.kept_vision_positions]
    assert kept == [n_images * n for n in schedule.stage_tokens]


def test_use_cache_false_in_generate_warns_that_it_is_ignored(pruned, random_images, caplog):
    tokenizer, model, processor, _ = pruned
    prompt, pixels = _inputs(tokenizer, model, processor, random_images, "image first")
    with torch.no_grad():
        generated = model.generate(prompt[None], images=pixels, do_sample=False, use_cache=False, **FIXED)
    assert "use_cache=False" in caplog.text and "ignored" in caplog.text
    assert generated[0].tolist() == _uncached_greedy(model, prompt, pixels, FIXED["max_new_tokens"])


def test_training_forwards_build_no_cache_whatever_the_config_says(pruned, random_images):
    tokenizer, model, processor, _ = pruned
    prompt, pixels = _inputs(tokenizer, model, processor, random_images, "image first")
    assert model.config.use_cache
    model.train()
    try:
        out = model(input_ids=prompt[None], images=pixels)
        assert torch.is_grad_enabled() and compat.output_cache(out) is None
        with torch.no_grad():
            assert compat.output_cache(model(input_ids=prompt[None], images=pixels)) is not None
    finally:
        model.eval()
