"""The adapters: one per ``config.model_type``, the only place that knows an architecture's parts,
image layout and vocabulary; the entry points dispatch through them."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adsc_patch import PruningSpec, apply_adsc, pruning, remove_adsc
from adsc_patch.adapters import (ImageLayout, LlavaHfAdapter, ModelAdapter, ModelParts, adapter_for,
                                 register_adapter, registered_model_types)
from adsc_patch.adapters import _ADAPTERS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    return LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir).eval()


def test_each_architecture_gets_its_adapter_by_model_type(hf, loaded_tiny):
    _, ours, _, _ = loaded_tiny
    assert {"llava", "llava_llama"} <= set(registered_model_types())
    hf_adapter, our_adapter = adapter_for(hf), adapter_for(ours)
    assert not hf_adapter.config_hook and our_adapter.config_hook
    assert hf_adapter.language_model(hf) is hf.model.language_model
    assert hf_adapter.parts(hf.model) == ModelParts(None, hf.model, hf.model.language_model)
    assert our_adapter.language_model(ours) is ours.model
    # the tiny pair: a 6 x 6 patch grid, CLS dropped (llava-hf "default" = LLaVA's "patch")
    assert hf_adapter.image_layout(hf) == our_adapter.image_layout(ours) == ImageLayout(36, (6, 6))
    assert hf_adapter.num_layers(hf) == our_adapter.num_layers(ours) == ours.config.num_hidden_layers
    assert hf_adapter.vocab_size(hf) == hf.config.text_config.vocab_size
    ids = torch.tensor([[1, hf.config.image_token_id, hf.config.image_token_id, 5]])
    assert hf_adapter.vision_mask(hf.model, input_ids=ids).tolist() == [[False, True, True, False]]
    assert hf_adapter.vision_mask(hf.model, input_ids=torch.tensor([[1, 2]])) is None


def test_an_unknown_architecture_is_named_with_the_supported_ones():
    with pytest.raises(TypeError, match=r"supports .*llava_llama.*Linear has model_type None"):
        adapter_for(torch.nn.Linear(2, 2))


def test_a_registered_adapter_is_what_every_entry_point_reads(hf):
    """A subclass registered for ``llava`` (replacing the built-in) is the one asked for the
    layout: its smaller image size reaches the solved schedule of apply_adsc and pruning()."""

    class Recording(LlavaHfAdapter):
        asked = 0

        def image_layout(self, model):
            Recording.asked += 1
            return super().image_layout(model)

    built_in = _ADAPTERS["llava"]
    register_adapter(Recording(), replace=True)
    try:
        schedule = apply_adsc(hf, PruningSpec("adsc", budget=20, layers=(1, 2)))
        assert Recording.asked == 1 and schedule.num_vision_tokens == 36
        remove_adsc(hf)
        with pruning(hf, PruningSpec("adsc", budget=20, layers=(1, 2))):
            pass
        assert Recording.asked == 2
        with pytest.raises(ValueError, match="already has an adapter"):
            register_adapter(LlavaHfAdapter())
    finally:
        register_adapter(built_in, replace=True)
    assert adapter_for(hf) is built_in


def test_the_base_adapter_names_what_a_new_architecture_must_give():
    class Bare(ModelAdapter):
        model_types = ("bare_for_test",)

    with pytest.raises(NotImplementedError):
        Bare().parts(object())
    with pytest.raises(NotImplementedError):
        Bare().image_layout(object())
