"""adsc_patch.compat: transformers' names read off the installed release, unknown layouts refused."""

import inspect
import logging
import os
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from adsc_patch import AdscPlan, compat, pruned_decoder_forward

pytestmark = pytest.mark.compat  # meets transformers' internals: CI runs it on both ends of the range

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OTHER_NAME = next(name for name in compat.CACHE_NAMES if name != compat.CACHE_KWARG)


def test_the_resolved_names_are_what_the_installed_transformers_takes_and_returns():
    for function in (LlamaDecoderLayer.forward, LlamaModel.forward, create_causal_mask):
        assert compat.CACHE_KWARG in inspect.signature(function).parameters
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    out = LlamaModel(config).eval()(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert isinstance(out[compat.OUTPUT_CACHE_FIELD], DynamicCache)
    assert compat.output_cache(out) is out[compat.OUTPUT_CACHE_FIELD]
    assert compat.LAYOUT.version == __import__("transformers").__version__


def _facts(name="cache", field=None, **changes):
    field = field or name
    facts = {
        "version": "5.99.0",
        "signatures": {
            "LlamaDecoderLayer.forward": ["self", "hidden_states", name, "kwargs"],
            "LlamaModel.forward": ["self", "input_ids", name, "kwargs"],
            "create_causal_mask": ["config", "inputs_embeds", name, "layer_idx"],
        },
        "output_fields": {"BaseModelOutputWithPast": ["last_hidden_state", field]},
        "cache_has_layers": True,
        "cache_length_per_layer": True,
    }
    facts.update(changes)
    return facts


@pytest.mark.parametrize("name", compat.CACHE_NAMES)
def test_both_known_layouts_resolve(name):
    layout = compat.resolve_layout(dict(_facts(name), version="5.23.0"))
    assert (layout.cache_kwarg, layout.output_cache_field) == (name, name)


@pytest.mark.parametrize(
    "facts, problem",
    [
        (_facts("kv_cache"), "no cache argument"),
        (_facts("cache", field="kv"), "BaseModelOutputWithPast has no cache argument"),
        (_facts("cache", signatures={"LlamaModel.forward": ["cache", "past_key_values"]}), "more than one"),
        (_facts("cache", signatures={"LlamaDecoderLayer.forward": ["cache"], "LlamaModel.forward": ["past_key_values"]}),
         "named differently"),
        (_facts("cache", signatures={"create_causal_mask": ["cache"]}), "layer_idx"),
        (_facts("cache", cache_has_layers=False), "per-layer"),
    ],
)
def test_an_unknown_layout_names_the_version_and_the_tested_range(facts, problem):
    with pytest.raises(compat.TransformersLayoutError) as error:
        compat.resolve_layout(facts)
    message = str(error.value)
    assert "transformers 5.99.0" in message and compat.TESTED_RANGE_TEXT in message and problem in message


def test_a_signature_showing_both_names_takes_the_one_the_undecorated_function_takes():
    """transformers 5.25: ``create_causal_mask``'s deprecation decorator exposes ``past_key_values``
    beside ``cache`` in the signature; the function underneath takes only ``cache``."""
    both = ["config", "inputs_embeds", "cache", "layer_idx", "past_key_values"]
    facts = _facts("cache", signatures=dict(_facts("cache")["signatures"], create_causal_mask=both),
                   undecorated_signatures={"create_causal_mask": ["config", "inputs_embeds", "cache", "layer_idx"]})
    layout = compat.resolve_layout(dict(facts, version="5.25.0"))
    assert layout.cache_kwarg == "cache"
    # the same facts where nothing tells the canonical name apart: refused, naming both lists
    facts["undecorated_signatures"]["create_causal_mask"] = both
    with pytest.raises(compat.TransformersLayoutError) as error:
        compat.resolve_layout(facts)
    message = str(error.value)
    assert "create_causal_mask has more than one cache argument" in message and "undecorated" in message
    assert compat.TESTED_RANGE_TEXT in message
    # and an undecorated function with the *other* name decides for that one, so the rule is read, not assumed
    facts["undecorated_signatures"]["create_causal_mask"] = ["config", "past_key_values", "layer_idx"]
    with pytest.raises(compat.TransformersLayoutError, match="named differently"):
        compat.resolve_layout(facts)


def test_the_undecorated_parameters_are_read_under_a_decorator_that_rewrites_the_signature():
    """A stand-in for 5.25's ``deprecate_kwarg(..., expose_in_signature=True)``, written here."""
    import functools

    def expose_old_name(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if "past_key_values" in kwargs:
                kwargs["cache"] = kwargs.pop("past_key_values")
            return function(*args, **kwargs)

        shown = inspect.signature(function)
        extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
        wrapper.__signature__ = shown.replace(parameters=[*shown.parameters.values(), extra])
        return wrapper

    @expose_old_name
    def make_mask(config, inputs_embeds, cache=None, layer_idx=None):
        return cache

    assert compat._parameters(make_mask) == ["config", "inputs_embeds", "cache", "layer_idx", "past_key_values"]
    assert compat._undecorated_parameters(make_mask) == ["config", "inputs_embeds", "cache", "layer_idx"]
    installed = compat.read_installed_layout()
    for where, names in installed["undecorated_signatures"].items():
        assert [n for n in compat.CACHE_NAMES if n in names] == [compat.CACHE_KWARG], where


def test_a_known_layout_outside_the_tested_range_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="adsc_patch.compat"):
        layout = compat.resolve_layout(_facts("cache"))
    assert layout.cache_kwarg == "cache"
    assert "outside the tested range" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adsc_patch.compat"):
        compat.resolve_layout(dict(_facts("cache"), version="5.24.0"))
    assert caplog.text == ""


def test_importing_adsc_patch_on_an_unknown_layout_fails_with_the_clear_error():
    """A real import in a fresh interpreter whose LlamaDecoderLayer takes the cache under a new name."""
    code = (
        "from transformers.models.llama import modeling_llama as m\n"
        "def forward(self, hidden_states, attention_mask=None, kv_state=None, **kwargs): pass\n"
        "m.LlamaDecoderLayer.forward = forward\n"
        "import adsc_patch\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("adsc_patch.compat.TransformersLayoutError: transformers ")
    assert "LlamaDecoderLayer.forward has no cache argument" in last and compat.TESTED_RANGE_TEXT in last


def test_take_cache_accepts_either_name_and_refuses_two_different_caches():
    a, b = DynamicCache(), DynamicCache()
    for name in compat.CACHE_NAMES:
        kwargs = {name: a, "other": 1}
        assert compat.take_cache(kwargs) is a and kwargs == {"other": 1}
    assert compat.take_cache({"cache": a, "past_key_values": a}) is a
    assert compat.take_cache({"past_key_values": None}, a) is a
    assert compat.take_cache({}) is None
    with pytest.raises(TypeError, match="two different caches"):
        compat.take_cache({"cache": a, "past_key_values": b})
    with pytest.raises(TypeError, match="two different caches"):
        compat.take_cache({"past_key_values": b}, a)


def _tiny():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaModel(config).eval()


def test_a_cache_under_an_unknown_keyword_is_an_error_not_dropped():
    model = _tiny()
    plan = AdscPlan(prune_layers=(2,), drop_ratio=0.5, tokens_per_image=16)
    with torch.no_grad(), pytest.raises(TypeError, match=r"under the keyword\(s\) \['kv_cache'\]"):
        pruned_decoder_forward(model, plan, inputs_embeds=torch.randn(1, 20, 32), kv_cache=DynamicCache())


@pytest.mark.parametrize("name", compat.CACHE_NAMES)
def test_a_decode_step_with_the_cache_under_either_name_equals_the_uncached_forward(name):
    model = _tiny()
    plan = AdscPlan(prune_layers=(1, 3), drop_ratio=0.5, tokens_per_image=16)
    prompt = torch.randn(1, 24, 32)
    vision = torch.zeros(1, 24, dtype=torch.bool)
    vision[0, 3:19] = True
    step = torch.randn(1, 1, 32)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        prefill = pruned_decoder_forward(model, plan, inputs_embeds=prompt, vision_mask=vision, use_cache=True,
                                         **{name: cache})
        assert compat.output_cache(prefill) is cache
        decoded = pruned_decoder_forward(model, plan, inputs_embeds=step, use_cache=True, **{name: cache})
        uncached = pruned_decoder_forward(model, plan, inputs_embeds=torch.cat([prompt, step], 1), use_cache=False,
                                          vision_mask=torch.cat([vision, torch.zeros(1, 1, dtype=torch.bool)], 1))
    torch.testing.assert_close(decoded.last_hidden_state[0, -1], uncached.last_hidden_state[0, -1],
                               atol=1e-5, rtol=1e-5)
    assert [cache.get_seq_length(i) for i in range(4)] == [25, 17, 17, 13]


def test_the_deprecated_name_is_never_what_we_hand_to_transformers(recwarn):
    """On a release that renamed the cache, passing the old name would be dropped when both arrive."""
    model = _tiny()
    plan = AdscPlan(prune_layers=(1,), drop_ratio=0.5, tokens_per_image=16)
    with torch.no_grad():
        pruned_decoder_forward(model, plan, inputs_embeds=torch.randn(1, 20, 32), use_cache=True,
                               **{OTHER_NAME: DynamicCache(config=model.config)})
    assert not [w for w in recwarn if OTHER_NAME in str(w.message)]


def test_the_qwen_vl_keywords_the_adapters_read_are_checked_and_a_missing_one_named():
    from transformers import Qwen2_5_VLModel, Qwen3VLModel, Qwen3VLTextModel

    compat.check_qwen_vl_layout(Qwen2_5_VLModel, Qwen3VLModel, Qwen3VLTextModel)  # the installed release

    class Renamed(Qwen3VLTextModel):
        def forward(self, position_ids=None, visual_mask=None, deepstack_visual_embeds=None):
            pass

    with pytest.raises(compat.TransformersLayoutError, match=r"Renamed.forward no longer takes \['visual_pos_masks'\]"):
        compat.check_forward_keywords(Renamed, compat.QWEN_VL_FORWARD_KEYWORDS["Qwen3VLTextModel"])
