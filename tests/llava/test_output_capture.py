"""A forward with ``output_attentions`` / ``output_hidden_states`` leaves the model as it was.

transformers installs output-capture hooks per model on its first capturing call and, for a
composite model, on every sub-model it holds, without checking whether the sub-model already
hooked itself: a CLIP tower that captured on its own and is then reached by a capturing call
of the language model records every layer twice, and ``hidden_states[-2]`` becomes another
layer's output. Each test here compares with an untouched copy of the model (never touched
by a capturing call), setting by setting.
"""

import copy

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adsc_patch import apply_adsc, remove_adsc
from llava.model.builder import load_pretrained_model
from tests.helpers import QUESTIONS, pad_batch, prompt_ids
from tests.llava.test_builder import _hf_inputs

pytestmark = pytest.mark.compat  # transformers' output capture: CI runs it on every tested release

# (method, configure_pruning arguments) on the 8-layer, 36-token tiny checkpoint
SETTINGS = {
    "none": None,
    "adsc": dict(method="adsc", prune_layers=[2, 4], drop_ratio=0.5),
    "fastv": dict(method="fastv", prune_layers=[2], drop_ratio=0.5),
    "pdrop": dict(method="pdrop", prune_layers=[2, 4, 6], drop_ratio=0.5),
    "tome": dict(method="tome", vision_token_budget=20),
    "visionzip": dict(method="visionzip", vision_token_budget=20),
    "pool": dict(method="pool", vision_token_budget=9),
    "pdrop_original_ids": dict(method="pdrop_original_ids", prune_layers=[2, 4, 6], drop_ratio=0.5),
    "visionzip_spread": dict(method="visionzip_spread", vision_token_budget=20),
}
IN_DECODER = {"adsc", "fastv", "pdrop", "pdrop_original_ids"}


@pytest.fixture(scope="module")
def deep(tiny_deep_dir, one_thread):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_deep_dir, device="cpu", attn_implementation="eager")
    seqs = [prompt_ids(tokenizer, q) for q in QUESTIONS[:2]]
    ids, mask = pad_batch(seqs, tokenizer.pad_token_id, "left")
    pixels = torch.rand(2, 3, 48, 48) * 2 - 1
    return model.eval(), ids, mask, pixels


def _configure(model, setting):
    if setting is not None:
        model.configure_pruning(**setting)


def _answers(model, ids, mask, pixels):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=pixels).logits
        out = model.generate(ids, images=pixels, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    return logits, out.sequences, torch.stack(out.scores)


def _capture(model, ids, mask, pixels, flag, refused):
    """One capturing forward; returns its output (``None`` where the setting refuses the flag)."""
    with torch.no_grad():
        if refused:
            with pytest.raises(NotImplementedError, match=flag):
                model(input_ids=ids, attention_mask=mask, images=pixels, **{flag: True})
            return None
        return model(input_ids=ids, attention_mask=mask, images=pixels, **{flag: True})


@pytest.mark.parametrize("name", list(SETTINGS))
def test_after_capturing_forwards_our_model_answers_as_an_untouched_copy(deep, name):
    base, ids, mask, pixels = deep
    untouched, probed = copy.deepcopy(base), copy.deepcopy(base)
    num_layers = base.config.num_hidden_layers
    # a researcher looks at the unpruned model's maps first: the language model's, one per layer
    attentions = _capture(probed, ids, mask, pixels, "output_attentions", refused=False).attentions
    hidden = _capture(probed, ids, mask, pixels, "output_hidden_states", refused=False)
    length = hidden.logits.shape[1]
    assert len(attentions) == num_layers and attentions[0].shape[-2:] == (length, length)
    assert len(hidden.hidden_states) == num_layers + 1
    assert all(h.shape[1] == length for h in hidden.hidden_states)
    torch.testing.assert_close(probed.lm_head(probed.model.norm(hidden.hidden_states[-1])), hidden.logits,
                               atol=1e-5, rtol=1e-5)
    for model in (untouched, probed):
        _configure(model, SETTINGS[name])
    for flag in ("output_attentions", "output_hidden_states"):  # then under the setting itself
        _capture(probed, ids, mask, pixels, flag, refused=name in IN_DECODER)
    expected, got = _answers(untouched, ids, mask, pixels), _answers(probed, ids, mask, pixels)
    torch.testing.assert_close(got[0], expected[0], atol=0, rtol=0)
    assert torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], atol=0, rtol=0)
    # the tower itself still records each of its layers once
    tower = probed.get_vision_tower()
    with torch.no_grad():
        states = tower.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(states) == tower.config.num_hidden_layers + 1


def test_the_towers_features_are_its_selected_hidden_state_and_skip_the_layers_after_it(deep):
    """Independent reference: the tower's own ``output_hidden_states`` on a fresh copy."""
    base, _, _, pixels = deep
    tower = copy.deepcopy(base.get_vision_tower())
    calls = []
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.append(i))
             for i, layer in enumerate(tower.vision_tower.encoder.layers)]
    with torch.no_grad():
        features = tower(pixels)
    for hook in hooks:
        hook.remove()
    assert calls == [0]  # select_layer -2 of a 2-layer tower: the last layer does not run
    fresh = copy.deepcopy(base.get_vision_tower())
    with torch.no_grad():
        reference = fresh.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(features, reference, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["none", "adsc", "fastv", "pdrop"])
def test_after_capturing_forwards_a_patched_llava_hf_model_answers_as_an_untouched_copy(
        tiny_hf_dir, random_images, name):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir, attn_implementation="eager").eval()
    tokenizer, _, processor, _ = load_pretrained_model(tiny_hf_dir, device="cpu")
    ids, mask, pixels = _hf_inputs(hf, tokenizer, processor, random_images, "left")
    untouched, probed = copy.deepcopy(hf), copy.deepcopy(hf)
    setting = {k: v for k, v in (SETTINGS[name] or {}).items()}
    if setting:
        setting["prune_layers"] = [1, 2] if name != "fastv" else [1]
    with torch.no_grad():
        for flag in ("output_attentions", "output_hidden_states"):
            probed(input_ids=ids, attention_mask=mask, pixel_values=pixels, **{flag: True})
    try:
        for model in (untouched, probed):
            if setting:
                apply_adsc(model, **setting)
        with torch.no_grad():
            expected = untouched(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            got = probed(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            kwargs = dict(attention_mask=mask, pixel_values=pixels, max_new_tokens=4, do_sample=False)
            expected_tokens = untouched.generate(ids, **kwargs)
            got_tokens = probed.generate(ids, **kwargs)
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert torch.equal(got_tokens, expected_tokens)
    finally:
        for model in (untouched, probed):
            remove_adsc(model)
