"""transformers' names and internals that differ between releases, resolved once at import.

Everything of ours that hands a KV cache to transformers, or reads one back, goes through
this module; nothing else in ``adsc_patch`` or ``llava`` spells a cache keyword.

What is read off the installed transformers (signatures and dataclass fields, not version
strings):

* ``CACHE_KWARG``: the keyword under which ``LlamaDecoderLayer.forward``,
  ``LlamaModel.forward``, ``create_causal_mask``, ``LlavaModel.forward`` and
  ``GenerationMixin.prepare_inputs_for_generation`` take the cache (``past_key_values`` up
  to 5.23, ``cache`` from 5.24). Where a signature shows both names (5.25's
  ``create_causal_mask``: a deprecation decorator exposes the old one), the canonical name is
  the one the undecorated function takes; both there too is an unknown layout;
* ``OUTPUT_CACHE_FIELD``: the field of ``BaseModelOutputWithPast``,
  ``CausalLMOutputWithPast`` and ``generate``'s outputs that holds it (the same rename);
* that ``create_causal_mask`` sizes a mask by ``layer_idx`` and that a ``DynamicCache``
  reports per-layer lengths (the pruned loop relies on both).

A layout this module does not recognise raises ``TransformersLayoutError`` at import,
naming the installed version and the tested range; a recognised layout outside the tested
range only logs a warning. ``docs/compatibility.md`` says how to test and widen the range.

Our entry points accept the cache under either name (``take_cache``) and pass it on under
the installed one (``cache_kwargs``); a ``Cache`` left in ``**kwargs`` after that is an error
(``reject_stray_cache``), so the next rename fails loudly instead of being dropped.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import transformers
from packaging.specifiers import SpecifierSet
from transformers.cache_utils import Cache, DynamicCache

__all__ = [
    "CACHE_KWARG",
    "CACHE_NAMES",
    "LAYOUT",
    "OUTPUT_CACHE_FIELD",
    "TESTED_RANGE",
    "TESTED_RANGE_TEXT",
    "TransformersLayout",
    "TransformersLayoutError",
    "ClipVisionParts",
    "cache_kwargs",
    "clip_vision_parts",
    "output_cache",
    "output_cache_kwargs",
    "adopt_renamed_training_args",
    "peft_without_alias_warnings",
    "read_installed_layout",
    "reject_stray_cache",
    "resolve_layout",
    "take_cache",
    "processor_without_video",
]

logger = logging.getLogger(__name__)

# The releases CI tests, both ends (requirements/lowest.txt pins the lower); setup.py states
# the same range, and tests/test_stack.py checks that the two agree.
TESTED_RANGE_TEXT = ">=5.23,<5.26"
TESTED_RANGE = SpecifierSet(TESTED_RANGE_TEXT)

# Every name a release of transformers 5 has used for the KV-cache argument, newest first.
CACHE_NAMES = ("cache", "past_key_values")


class TransformersLayoutError(ImportError):
    """The installed transformers is laid out in a way this release does not know."""


@dataclass(frozen=True)
class TransformersLayout:
    """What the installed transformers calls things (see the module docstring)."""

    version: str
    cache_kwarg: str
    output_cache_field: str


def _parameters(function: Callable) -> list[str]:
    """The parameters callers see (a decorator may add a deprecated alias to the signature)."""
    return list(inspect.signature(function).parameters)


def _undecorated_parameters(function: Callable) -> list[str]:
    """The parameters of the function under every ``functools.wraps`` decorator (the body's own names)."""
    return list(inspect.signature(inspect.unwrap(function), follow_wrapped=False).parameters)


def read_installed_layout() -> dict[str, Any]:
    """The raw facts ``resolve_layout`` decides on, read off the installed transformers."""
    from transformers import LlavaModel
    from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, GenerationMixin
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    functions = {
        "LlamaDecoderLayer.forward": LlamaDecoderLayer.forward,
        "LlamaModel.forward": LlamaModel.forward,
        "create_causal_mask": create_causal_mask,
        "LlavaModel.forward": LlavaModel.forward,
        "GenerationMixin.prepare_inputs_for_generation": GenerationMixin.prepare_inputs_for_generation,
    }
    return {
        "version": transformers.__version__,
        "signatures": {where: _parameters(function) for where, function in functions.items()},
        "undecorated_signatures": {where: _undecorated_parameters(function) for where, function in functions.items()},
        "output_fields": {
            "BaseModelOutputWithPast": [f.name for f in dataclasses.fields(BaseModelOutputWithPast)],
            "CausalLMOutputWithPast": [f.name for f in dataclasses.fields(CausalLMOutputWithPast)],
            "GenerateDecoderOnlyOutput": [f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)],
            "GenerateBeamDecoderOnlyOutput": [f.name for f in dataclasses.fields(GenerateBeamDecoderOnlyOutput)],
        },
        "cache_has_layers": isinstance(getattr(DynamicCache(), "layers", None), list),
        "cache_length_per_layer": "layer_idx" in _parameters(DynamicCache.get_seq_length),
    }


def resolve_layout(facts: dict[str, Any]) -> TransformersLayout:
    """Decide the names from ``facts`` (``read_installed_layout``'s form); raise on anything unknown."""
    version = facts["version"]

    def unknown(what: str) -> TransformersLayoutError:
        return TransformersLayoutError(
            f"transformers {version} is laid out in a way adsc_patch does not know: {what}. "
            f"adsc_patch is tested with transformers {TESTED_RANGE_TEXT}; install a release in that "
            f"range (pip install 'transformers{TESTED_RANGE_TEXT}') or see docs/compatibility.md"
        )

    def one_cache_name(where: str, names: list[str], undecorated: list[str] | None = None) -> str:
        found = [name for name in CACHE_NAMES if name in names]
        if len(found) > 1 and undecorated is not None:
            # A deprecation decorator may show the old name beside the new one (transformers 5.25's
            # expose_in_signature); the function it wraps takes only the canonical name.
            own = [name for name in found if name in undecorated]
            if len(own) == 1:
                return own[0]
        if len(found) != 1:
            raise unknown(f"{where} has {'no' if not found else 'more than one'} cache argument among "
                          f"{CACHE_NAMES} (it has {names}"
                          f"{'' if undecorated is None else f'; undecorated: {undecorated}'})")
        return found[0]

    undecorated = facts.get("undecorated_signatures", {})
    kwargs = {where: one_cache_name(where, names, undecorated.get(where))
              for where, names in facts["signatures"].items()}
    fields = {where: one_cache_name(where, names) for where, names in facts["output_fields"].items()}
    if len(set(kwargs.values())) != 1:
        raise unknown(f"the cache argument is named differently across functions ({kwargs})")
    if len(set(fields.values())) != 1:
        raise unknown(f"the cache output field is named differently across output classes ({fields})")
    if "layer_idx" not in facts["signatures"]["create_causal_mask"]:
        raise unknown("create_causal_mask takes no layer_idx (a pruned stage's mask is sized by its first layer)")
    if not (facts["cache_has_layers"] and facts["cache_length_per_layer"]):
        raise unknown("DynamicCache has no per-layer lengths (pruned layers cache different lengths)")
    layout = TransformersLayout(version, next(iter(kwargs.values())), next(iter(fields.values())))
    if not TESTED_RANGE.contains(version, prereleases=True):
        logger.warning(
            "transformers %s is outside the tested range %s; its layout is recognised (cache argument %r), "
            "but run the compatibility tests before trusting pruned results (docs/compatibility.md)",
            version, TESTED_RANGE_TEXT, layout.cache_kwarg,
        )
    return layout


LAYOUT = resolve_layout(read_installed_layout())
CACHE_KWARG = LAYOUT.cache_kwarg
OUTPUT_CACHE_FIELD = LAYOUT.output_cache_field


def take_cache(kwargs: dict, given: Cache | None = None, where: str = "forward") -> Cache | None:
    """Pop the cache from ``kwargs`` under any of its names; ``given`` is an explicit argument.

    Two different non-None caches (under two names) are an error, never a silent choice.
    """
    found = [(name, kwargs.pop(name)) for name in CACHE_NAMES if name in kwargs]
    candidates = [(name, value) for name, value in found if value is not None]
    if given is not None:
        candidates.insert(0, ("the cache argument", given))
    distinct = {id(value): name for name, value in candidates}
    if len(distinct) > 1:
        raise TypeError(f"{where} got two different caches ({', '.join(distinct.values())}); pass one")
    return candidates[0][1] if candidates else None


def reject_stray_cache(kwargs: dict, where: str) -> None:
    """Raise if a ``Cache`` still rides in ``kwargs``: a name this module does not know."""
    stray = [name for name, value in kwargs.items() if isinstance(value, Cache)]
    if stray:
        raise TypeError(
            f"{where} got a KV cache under the keyword(s) {stray}, which adsc_patch does not know "
            f"(known: {CACHE_NAMES}; installed transformers {LAYOUT.version} uses {CACHE_KWARG!r}); "
            "a renamed cache argument would otherwise be dropped silently: see docs/compatibility.md"
        )


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` for calling transformers' models, layers and mask builders."""
    return {CACHE_KWARG: cache}


def output_cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """``{field: cache}`` for building transformers' output dataclasses."""
    return {OUTPUT_CACHE_FIELD: cache}


def output_cache(output) -> Cache | None:
    """The cache an output of transformers (or ours) carries."""
    return getattr(output, OUTPUT_CACHE_FIELD, None)


# ---------------------------------------------------------------------------- vision tower
# The pre-LLM methods (tome, visionzip) run transformers' CLIP vision encoder layer by
# layer. These are the parts they touch; a release that moves them fails here, by name.
CLIP_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
CLIP_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "head_dim", "scale")


@dataclass(frozen=True)
class ClipVisionParts:
    """The pieces of a ``CLIPVisionModel`` (or ``CLIPVisionTransformer``) a merging method runs.

    ``embeddings(pixel_values)`` -> ``(n, 1 + N, D)`` (CLS first); ``pre_layernorm`` is applied
    next; ``layers[i]`` has ``layer_norm1``, ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``,
    ``out_proj``, ``head_dim``, ``scale``; called as ``self_attn(hidden_states=...,
    attention_mask=...)`` with an additive float mask ``(n, 1, T, T)``, returning
    ``(output, weights)``), ``layer_norm2`` and ``mlp``. Hidden state ``i`` of the model's
    ``output_hidden_states`` is the input of ``layers[i]``.
    """

    embeddings: Any
    pre_layernorm: Any
    layers: Any


def clip_vision_parts(model) -> ClipVisionParts:
    """The runnable parts of a transformers CLIP vision model; raises ``TransformersLayoutError``
    naming the missing attribute when the installed release lays them out differently."""
    vision = getattr(model, "vision_model", model)
    missing = [name for name in ("embeddings", "pre_layrnorm", "encoder") if not hasattr(vision, name)]
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if layers is None:
        missing.append("encoder.layers")
    else:
        for layer in layers[:1]:
            missing += [f"layers[0].{p}" for p in CLIP_LAYER_PARTS if not hasattr(layer, p)]
            attention = getattr(layer, "self_attn", None)
            missing += [f"layers[0].self_attn.{p}" for p in CLIP_ATTENTION_PARTS if not hasattr(attention, p)]
    if missing:
        raise TransformersLayoutError(
            f"transformers {transformers.__version__}: {type(model).__name__} lacks {', '.join(missing)}; "
            f"the vision-tower merging methods (tome, visionzip) are tested with transformers {TESTED_RANGE_TEXT}"
        )
    return ClipVisionParts(vision.embeddings, vision.pre_layrnorm, vision.encoder.layers)


# transformers 5.23 renamed ``PreTrainedModel``'s ``*gradient_checkpointing*`` members to
# ``*activation_checkpointing*`` and made the old ones warn; peft (0.18) still uses the old
# ones whenever it wraps a model (``is_gradient_checkpointing``) or prepares one for k-bit
# training (``gradient_checkpointing_enable``), so every LoRA load and setup printed a
# FutureWarning that no flag of ours can fix.
PEFT_READS_DEPRECATED = (r"`is_gradient_checkpointing` is deprecated", r"`gradient_checkpointing_enable` is deprecated")


@contextmanager
def peft_without_alias_warnings():
    """Around our calls into peft: silence only the deprecation warnings peft's own reads of
    renamed transformers properties raise (``PEFT_READS_DEPRECATED``); any other stays."""
    with warnings.catch_warnings():
        for message in PEFT_READS_DEPRECATED:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


# ``TrainingArguments`` fields renamed (5.23 has both; the old ones warn when given and go in
# v6). Upstream LLaVA's scripts pass ``--gradient_checkpointing``: we keep the flag.
TRAINING_ARGS_RENAMED = (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def adopt_renamed_training_args(args) -> None:
    """Before ``TrainingArguments.__post_init__``: a value given under an old name
    (``TRAINING_ARGS_RENAMED``) moves to the new one when that is unset, so transformers takes
    it without a deprecation warning (it then mirrors the new value back to the old name)."""
    for old, new in TRAINING_ARGS_RENAMED:
        if not hasattr(args, new):
            raise TransformersLayoutError(f"transformers {transformers.__version__}: TrainingArguments has no "
                                          f"{new!r} (tested range {TESTED_RANGE_TEXT})")
        if getattr(args, new) is None and getattr(args, old, None) is not None:
            setattr(args, new, getattr(args, old))
            setattr(args, old, None)


# What the Qwen-VL adapters read off transformers' classes (adapters.Qwen2_5_VLAdapter,
# Qwen3VLAdapter): the multimodal forward's keywords (the image grids, the M-RoPE positions
# generate computes, the images it encodes before the forward), the language model's
# DeepStack keywords, and the M-RoPE helpers the tests' references call.
QWEN_VL_FORWARD_KEYWORDS = {
    "Qwen2_5_VLModel": ("input_ids", "position_ids", "image_grid_thw", "pixel_values", "mm_encoder_outputs"),
    "Qwen3VLModel": ("input_ids", "position_ids", "image_grid_thw", "pixel_values", "mm_encoder_outputs"),
    "Qwen3VLTextModel": ("position_ids", "visual_pos_masks", "deepstack_visual_embeds"),
}


def check_forward_keywords(cls, names) -> None:
    """``TransformersLayoutError`` naming what is missing when ``cls.forward`` (undecorated)
    does not take every one of ``names``: an architecture's internals changed under an adapter."""
    taken = set(_undecorated_parameters(cls.forward)) | set(_parameters(cls.forward))
    missing = [name for name in names if name not in taken]
    if missing:
        raise TransformersLayoutError(
            f"transformers {transformers.__version__}: {cls.__name__}.forward no longer takes {missing}, which "
            f"vision-token pruning reads (tested range {TESTED_RANGE_TEXT}; docs/compatibility.md)")


def check_qwen_vl_layout(*classes) -> None:
    """Check, once per class, the keywords ``QWEN_VL_FORWARD_KEYWORDS`` names for it."""
    for cls in classes:
        if cls.__name__ not in _CHECKED:
            check_forward_keywords(cls, QWEN_VL_FORWARD_KEYWORDS[cls.__name__])
            _CHECKED.add(cls.__name__)


_CHECKED: set[str] = set()


# transformers builds a multimodal processor only with every part it declares; the video
# processors of Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision need torchvision, and without it
# ``AutoProcessor`` cannot build even the image path (``ProcessorMixin.__init__`` checks each
# part's class against a registry that is empty then). Images alone need no video processor.
def processor_without_video(processor_cls, image_processor, tokenizer, chat_template: str | None,
                            settings: dict | None = None):
    """``processor_cls`` built from its image processor and tokenizer alone, its video
    processor ``None`` (for images only: a video raises inside transformers). What
    ``AutoProcessor`` gives where torchvision is installed; here the per-part class check of
    ``ProcessorMixin.__init__`` is skipped for this one instance. ``settings``: the checkpoint's
    ``processor_config.json``, those of its keys the processor's ``__init__`` takes."""
    taken = set(inspect.signature(processor_cls.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                          "video_processor", "chat_template"}
    extra = {key: value for key, value in (settings or {}).items() if key in taken}
    if "video_processor" not in processor_cls.get_attributes():
        return processor_cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **extra)
    processor = processor_cls.__new__(processor_cls)
    processor.check_argument_for_proper_class = lambda name, argument: None
    try:
        processor_cls.__init__(processor, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                               chat_template=chat_template, **extra)
    except TypeError as error:
        raise TransformersLayoutError(f"transformers {transformers.__version__}: {processor_cls.__name__} cannot be "
                                      f"built without its video processor ({error}); install torchvision") from error
    finally:
        processor.__dict__.pop("check_argument_for_proper_class", None)
    return processor
