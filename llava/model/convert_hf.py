"""Convert transformers' ``LlavaForConditionalGeneration`` (llava-hf) into ``LlavaLlamaForCausalLM``.

Weights are moved, not copied: the converted model shares the loaded tensors. Mapping
(transformers 5 in-memory names):

    model.language_model.*               -> model.*
    lm_head.*                            -> lm_head.*
    model.vision_tower.*                 -> model.vision_tower.vision_tower.*
    model.multi_modal_projector.linear_1 -> model.mm_projector.0
    model.multi_modal_projector.linear_2 -> model.mm_projector.2

The vocabulary keeps llava-hf's extra rows (``<image>``, ``<pad>``); our prompts mark images
with ``IMAGE_TOKEN_INDEX`` instead, so the ``<image>`` row is simply unused.
"""

from __future__ import annotations

import logging

import torch
from accelerate import init_empty_weights

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

logger = logging.getLogger(__name__)

__all__ = ["llava_config_from_hf", "convert_hf_llava", "load_hf_llava"]


def llava_config_from_hf(hf_config, source_path: str) -> LlavaConfig:
    """Our config for a llava-hf config; refuses what LLaVA-1.5's architecture cannot hold."""
    if hf_config.vision_config.model_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"only CLIP vision towers convert, got {hf_config.vision_config.model_type!r}")
    if hf_config.text_config.model_type != "llama":
        raise ValueError(f"only Llama language models convert, got {hf_config.text_config.model_type!r}")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise ValueError("multi-layer vision features (a list vision_feature_layer) have no LLaVA-1.5 equivalent")
    if hf_config.projector_hidden_act != "gelu" or not getattr(hf_config, "multimodal_projector_bias", True):
        raise ValueError(
            f"projector with act {hf_config.projector_hidden_act!r} has no LLaVA-1.5 equivalent (mlp2x_gelu)"
        )
    text = hf_config.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        text.pop(key, None)
    return LlavaConfig(
        **text,
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=source_path,
        mm_vision_config={
            k: v for k, v in hf_config.vision_config.to_dict().items() if k not in ("transformers_version", "dtype")
        },
        mm_hidden_size=hf_config.vision_config.hidden_size,
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf_config.vision_feature_layer,
        mm_vision_select_feature="patch" if hf_config.vision_feature_select_strategy == "default" else "cls_patch",
        image_aspect_ratio="pad",
        tokenizer_padding_side="right",
    )


def _rename(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower." + key[len("model.vision_tower."):]
    if key.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + key[len("model.multi_modal_projector.linear_1."):]
    if key.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + key[len("model.multi_modal_projector.linear_2."):]
    if key.startswith("lm_head."):
        return key
    raise ValueError(f"unexpected llava-hf weight {key!r}")


def convert_hf_llava(hf_model, source_path: str) -> LlavaLlamaForCausalLM:
    """Build our model around ``hf_model``'s tensors (same devices and dtypes)."""
    config = llava_config_from_hf(hf_model.config, source_path)
    config._attn_implementation = hf_model.config.text_config._attn_implementation
    with init_empty_weights(include_buffers=False):
        model = LlavaLlamaForCausalLM(config)
    state = {_rename(k): v for k, v in hf_model.state_dict().items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"llava-hf conversion left weights unmatched: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    # Parameters stay where the loaded model put them (device maps included); buffers built
    # on the CPU follow the first parameter.
    device = next(hf_model.parameters()).device
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return model


def load_hf_llava(path: str, **load_kwargs) -> LlavaLlamaForCausalLM:
    """``LlavaForConditionalGeneration.from_pretrained(path)`` converted into our class."""
    from transformers import LlavaForConditionalGeneration

    logger.info("converting llava-hf checkpoint %s", path)
    hf_model = LlavaForConditionalGeneration.from_pretrained(path, **load_kwargs)
    model = convert_hf_llava(hf_model, path)
    model.generation_config = hf_model.generation_config
    return model
