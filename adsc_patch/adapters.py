"""One adapter per architecture: the only code that knows where an architecture keeps things.

An adapter answers, for a model of its ``config.model_type``: where the language model (the
decoder the pruned loop runs) and its layers are, how many vision tokens each image gives
and on which 2-D grid (``image_layout``; per image, so sizes may differ), where the images sit
in a prompt (``vision_mask``), and the vocabulary the loss is over. The method registry
(``methods``) says *what* to keep; the loop (``decoder``) how to run a stage; the adapter
*where* in a given model. ``adapter_for(model)`` picks by ``model.config.model_type``;
``register_adapter`` adds one (the next architectures: Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT and
LLaVA-OneVision).

Two kinds of host are served by one mechanism of three entry points (``session.pruning``,
``patch.apply_adsc`` / ``remove_adsc``, ``patch.last_trace``):

* ``llava_llama`` (``llava.LlavaLlamaForCausalLM``) prunes by its own config, so its adapter
  has ``config_hook = True`` and those entry points hand the request to the model's hook;
* every transformers architecture gets the patch's forwards on the instance (``patch``),
  which read the adapter for the parts and the image layout: ``llava`` (llava-hf) here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .schedule import ScheduleError

__all__ = ["ImageLayout", "LlavaHfAdapter", "LlavaLlamaAdapter", "ModelAdapter", "ModelParts", "adapter_for",
           "register_adapter", "registered_model_types"]


@dataclass(frozen=True)
class ImageLayout:
    """One image's vision tokens: ``tokens`` consecutive tokens in the prompt, row-major over
    ``grid`` (``(height, width)``; ``None``: not a grid, e.g. with a CLS token)."""

    tokens: int
    grid: tuple[int, int] | None


@dataclass(frozen=True)
class ModelParts:
    """The modules the patch's forwards go on: the outer model (``None`` when given the inner
    one), the multimodal model (images in, embeddings spliced) and its language model."""

    top: object | None
    multimodal: object
    language_model: object


class ModelAdapter:
    """Where an architecture keeps things. Subclasses set ``model_types`` and override."""

    model_types: tuple[str, ...] = ()
    config_hook: bool = False  # the model prunes by its own config (``configure_pruning``)

    def parts(self, model) -> ModelParts:
        raise NotImplementedError

    def language_model(self, model):
        """The decoder with ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``, ``config``."""
        return self.parts(model).language_model

    def num_layers(self, model) -> int:
        return self.language_model(model).config.num_hidden_layers

    def image_layout(self, model) -> ImageLayout:
        """The layout of one image at the model's fixed resolution."""
        raise NotImplementedError

    def vision_mask(self, multimodal, input_ids=None, inputs_embeds=None) -> torch.Tensor | None:
        """``(B, T)`` bool, True at the image tokens of a prompt (``None``: no image in it)."""
        raise NotImplementedError

    def vocab_size(self, model) -> int:
        return self.language_model(model).config.vocab_size


class LlavaLlamaAdapter(ModelAdapter):
    """``llava.LlavaLlamaForCausalLM`` (upstream LLaVA-1.5's layout): prunes by its config."""

    model_types = ("llava_llama",)
    config_hook = True

    def parts(self, model) -> ModelParts:
        inner = model.get_model()
        return ModelParts(model, inner, inner)

    def image_layout(self, model) -> ImageLayout:
        tower = model.get_vision_tower()
        if tower is None:
            raise ScheduleError("this model has no vision tower")
        side = tower.num_patches_per_side
        return ImageLayout(tower.num_patches, (side, side) if tower.select_feature == "patch" else None)


class LlavaHfAdapter(ModelAdapter):
    """transformers' ``LlavaForConditionalGeneration`` / ``LlavaModel`` (llava-hf checkpoints)."""

    model_types = ("llava",)

    def parts(self, model) -> ModelParts:
        from transformers import LlavaForConditionalGeneration, LlavaModel

        if isinstance(model, LlavaForConditionalGeneration):
            return ModelParts(model, model.model, model.model.language_model)
        if isinstance(model, LlavaModel):
            return ModelParts(None, model, model.language_model)
        raise TypeError(f"model_type llava: expected transformers' LlavaForConditionalGeneration or LlavaModel, "
                        f"got {type(model).__name__}")

    def image_layout(self, model) -> ImageLayout:
        config = self.parts(model).multimodal.config
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        if config.vision_feature_select_strategy == "default":  # CLS dropped: the patch grid
            return ImageLayout(side * side, (side, side))
        return ImageLayout(side * side + 1, None)

    def vision_mask(self, multimodal, input_ids=None, inputs_embeds=None) -> torch.Tensor | None:
        image_token = multimodal.config.image_token_id
        if input_ids is not None:
            mask = input_ids == image_token
        elif inputs_embeds is not None:
            embedding = multimodal.get_input_embeddings()(torch.tensor(image_token, device=inputs_embeds.device))
            mask = (inputs_embeds == embedding).all(-1)
        else:
            return None
        return mask if bool(mask.any()) else None

    def vocab_size(self, model) -> int:
        return self.parts(model).multimodal.config.text_config.vocab_size


_ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter, replace: bool = False) -> ModelAdapter:
    """Make ``adapter`` the one for each of its ``model_types``."""
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS and not replace:
            raise ValueError(f"model_type {model_type!r} already has an adapter (replace=True to override)")
        _ADAPTERS[model_type] = adapter
    return adapter


def registered_model_types() -> tuple[str, ...]:
    return tuple(_ADAPTERS)


def adapter_for(model) -> ModelAdapter:
    """The adapter of ``model.config.model_type``; ``TypeError`` naming the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ADAPTERS:
        raise TypeError(f"vision-token pruning supports models whose config.model_type has an adapter "
                        f"({', '.join(registered_model_types())}); {type(model).__name__} has model_type "
                        f"{model_type!r}")
    return _ADAPTERS[model_type]


register_adapter(LlavaLlamaAdapter())
register_adapter(LlavaHfAdapter())
