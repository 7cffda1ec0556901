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

from . import compat
from .schedule import ScheduleError

__all__ = ["ImageLayout", "LlavaHfAdapter", "LlavaLlamaAdapter", "ModelAdapter", "ModelParts", "Qwen2_5_VLAdapter",
           "Qwen3VLAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter",
           "adapter_for",
           "register_adapter", "registered_model_types"]


@dataclass(frozen=True)
class ImageLayout:
    """One image's vision tokens: ``tokens`` consecutive tokens in the prompt, row-major over
    ``grid`` (``(height, width)``; ``None``: not a grid, e.g. with a CLS token). ``tokens``
    ``None``: the size differs per image (dynamic resolution); each call's ``image_spans`` say."""

    tokens: int | None
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
    label: str = ""  # how messages name the architecture (default: its first model_type)
    config_hook: bool = False  # the model prunes by its own config (``configure_pruning``)

    @property
    def name(self) -> str:
        return self.label or self.model_types[0]

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

    def image_spans(self, multimodal, vision_mask: torch.Tensor, call: dict) -> list | None:
        """Per row, ``(start, length, grid)`` of every image of this call (``call``: the
        multimodal forward's arguments by name); ``None``: every image is ``image_layout``'s."""
        return None

    def layout_from_embeddings(self, multimodal, vision_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        """``(vision mask, image spans)`` read off the spliced embeddings at the language model,
        for architectures whose image layout only the features show (LLaVA-NeXT's newline
        tokens); ``None``: the multimodal forward's ``vision_mask`` / ``image_spans`` stand."""
        return None

    def layer_additions(self, language_model_kwargs: dict) -> dict[int, torch.Tensor] | None:
        """Pop, from the keywords the language model's forward got, what the architecture adds
        to the hidden states after some layers, as ``{layer: (B, T, D)}`` over the input
        (``decoder.pruned_decoder_forward(additions=...)``); ``None``: nothing."""
        return None

    def vocab_size(self, model) -> int:
        return self.language_model(model).config.vocab_size

    def vision_tower(self, model):
        """The vision encoder (frozen by a fine-tune, never quantised)."""
        raise NotImplementedError(f"{self.name}: no vision tower known")

    def projectors(self, model) -> list:
        """The modules between the vision tower and the language model, which a fine-tune trains
        in full beside the language model's LoRA."""
        raise NotImplementedError(f"{self.name}: no projector known")


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
    label = "llava-hf"

    def parts(self, model) -> ModelParts:
        from transformers import LlavaForConditionalGeneration, LlavaModel

        return _outer_or_inner(model, LlavaForConditionalGeneration, LlavaModel, "llava")

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

    def vision_tower(self, model):
        return self.parts(model).multimodal.vision_tower

    def projectors(self, model) -> list:
        return [self.parts(model).multimodal.multi_modal_projector]


class Qwen2_5_VLAdapter(ModelAdapter):
    """transformers' ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel``: dynamic
    resolution (each image ``t x h x w`` patches, merged ``m x m``: ``h/m x w/m`` tokens per
    frame, from ``image_grid_thw``) and M-RoPE positions ``(3 or 4, B, T)``, which the loop
    gathers with the survivors. A video's frames (temporal patch groups) are pruned each on its
    own grid, like images."""

    model_types = ("qwen2_5_vl",)

    def parts(self, model) -> ModelParts:
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

        compat.check_qwen_vl_layout(Qwen2_5_VLModel)
        return _outer_or_inner(model, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, "qwen2_5_vl")

    def image_layout(self, model) -> ImageLayout:
        return ImageLayout(None, None)

    def vision_tower(self, model):
        return self.parts(model).multimodal.visual

    def projectors(self, model) -> list:
        """The merger (inside ``visual``; Qwen3-VL: and each DeepStack merger)."""
        visual = self.vision_tower(model)
        return [visual.merger, *getattr(visual, "deepstack_merger_list", ())]

    def vision_mask(self, multimodal, input_ids=None, inputs_embeds=None) -> torch.Tensor | None:
        if input_ids is None:
            return None
        mask = (input_ids == multimodal.config.image_token_id) | (input_ids == multimodal.config.video_token_id)
        return mask if bool(mask.any()) else None

    def image_spans(self, multimodal, vision_mask: torch.Tensor, call: dict) -> list:
        """Every image, and every frame (temporal patch group) of every video, as its own grid of
        ``h/m x w/m`` merged tokens. Read from the M-RoPE positions when the call has them (inside
        ``generate``, which encodes the images first and hands on only their features): a
        frame is a stretch of constant ``t``, its ``h`` and ``w`` axes span its grid; else from
        ``image_grid_thw`` / ``video_grid_thw``."""
        from .decoder import image_spans as runs_of

        positions = call.get("position_ids")
        runs = runs_of(vision_mask, None)
        if positions is not None and positions.dim() == 3:
            axes = positions[-3:].cpu()  # t, h, w
            spans = []
            for row, row_runs in enumerate(runs):
                row_spans = []
                for start, length in row_runs:
                    t = axes[0, row, start:start + length]
                    cuts = [0, *(torch.nonzero(t[1:] != t[:-1]).flatten() + 1).tolist(), length]
                    for a, b in zip(cuts[:-1], cuts[1:]):
                        h, w = axes[1, row, start + a:start + b], axes[2, row, start + a:start + b]
                        grid = (int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1)
                        if grid[0] * grid[1] != b - a:
                            raise ValueError(f"{self.name}: row {row}: {b - a} vision tokens at {start + a} are not "
                                             f"one {grid[0]}x{grid[1]} grid (adjacent images need a separator)")
                        row_spans.append((start + a, b - a, grid))
                spans.append(row_spans)
            return spans
        merge = multimodal.config.vision_config.spatial_merge_size
        ids = call.get("input_ids")
        queues = {multimodal.config.image_token_id: list(_grids(call.get("image_grid_thw"), merge)),
                  multimodal.config.video_token_id: list(_grids(call.get("video_grid_thw"), merge))}
        spans = []
        for row, row_runs in enumerate(runs):
            row_spans = []
            for start, length in row_runs:
                queue = queues[int(ids[row, start])]
                at = start
                while at < start + length:
                    if not queue:
                        raise ValueError(f"{self.name}: row {row} holds more vision tokens than the grids given "
                                         "(image_grid_thw / video_grid_thw)")
                    frames, grid = queue.pop(0)
                    for _ in range(frames):
                        row_spans.append((at, grid[0] * grid[1], grid))
                        at += grid[0] * grid[1]
                if at != start + length:
                    raise ValueError(f"{self.name}: row {row}: the vision tokens at {start} do not match their grids")
            spans.append(row_spans)
        return spans

    def vocab_size(self, model) -> int:
        return self.parts(model).multimodal.config.text_config.vocab_size


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """transformers' ``Qwen3VLForConditionalGeneration`` / ``Qwen3VLModel``: Qwen2.5-VL's layout
    (interleaved M-RoPE is the rotary embedding's business) plus DeepStack: vision-layer features
    added at the image tokens after the first decoder layers, which travel with the survivors
    (a dropped token's features go with it)."""

    model_types = ("qwen3_vl",)

    def parts(self, model) -> ModelParts:
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel, Qwen3VLTextModel

        compat.check_qwen_vl_layout(Qwen3VLModel, Qwen3VLTextModel)
        return _outer_or_inner(model, Qwen3VLForConditionalGeneration, Qwen3VLModel, "qwen3_vl")

    def layer_additions(self, language_model_kwargs: dict) -> dict[int, torch.Tensor] | None:
        mask = language_model_kwargs.pop("visual_pos_masks", None)
        embeds = language_model_kwargs.pop("deepstack_visual_embeds", None)
        if mask is None or embeds is None:
            return None
        additions = {}
        for layer, features in enumerate(embeds):
            dense = features.new_zeros(*mask.shape, features.shape[-1])
            dense[mask.to(dense.device)] = features
            additions[layer] = dense
        return additions


class LlavaNextAdapter(LlavaHfAdapter):
    """transformers' ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel`` (anyres). Each
    image is its base view (the tower's ``s x s`` patch grid) followed by its crops, unpadded to
    the image's aspect ratio, as ``rows`` lines of ``cols`` tokens each closed by an
    ``image_newline`` token, all under the image token id. Rule: the base view and the crops
    are two images, each pruned on its own 2-D grid; newline tokens are never pruned (they
    stay, like text). Newlines are found where the spliced embedding equals the model's
    ``image_newline`` vector, so the layout needs neither ``image_sizes`` nor the pinpoints."""

    model_types = ("llava_next",)
    label = "llava-next"

    def parts(self, model) -> ModelParts:
        from transformers import LlavaNextForConditionalGeneration, LlavaNextModel

        return _outer_or_inner(model, LlavaNextForConditionalGeneration, LlavaNextModel, "llava_next")

    def image_layout(self, model) -> ImageLayout:
        return ImageLayout(None, None)

    def layout_from_embeddings(self, multimodal, vision_mask: torch.Tensor, inputs_embeds: torch.Tensor):
        from .decoder import image_spans as runs_of

        vision = multimodal.config.vision_config
        side = vision.image_size // vision.patch_size
        # the tower's tokens per tile (CLIP: patches + CLS; SigLIP: patches), less CLS by "default"
        tower_tokens = next(m.num_positions for m in multimodal.vision_tower.modules() if hasattr(m, "num_positions"))
        base = tower_tokens - (multimodal.config.vision_feature_select_strategy == "default")
        newline = multimodal.image_newline.to(inputs_embeds.dtype)
        is_newline = (inputs_embeds == newline).all(-1).cpu() & vision_mask.cpu()
        mask = vision_mask.clone().cpu()
        spans = []
        for row, row_runs in enumerate(runs_of(vision_mask, None)):
            row_spans = []
            for start, length in row_runs:
                breaks = torch.nonzero(is_newline[row, start:start + length]).flatten().tolist()
                if not breaks or breaks[0] < base:
                    raise ValueError(f"llava_next: row {row}: {length} image tokens at {start} are not a base view of "
                                     f"{base} tokens followed by newline-closed lines")
                row_spans.append((tuple(range(start, start + base)), (side, side) if base == side * side else None))
                lines = [(a + 1, b) for a, b in zip([base - 1, *breaks[:-1]], breaks)]
                crops = [start + p for a, b in lines for p in range(a, b)]
                widths = {b - a for a, b in lines}
                if crops:
                    if len(widths) != 1:
                        raise ValueError(f"llava_next: row {row}: crop lines of different widths {sorted(widths)}")
                    row_spans.append((tuple(crops), (len(lines), widths.pop())))
                mask[row, [start + b for b in breaks]] = False
            spans.append(row_spans)
        return mask.to(vision_mask.device), spans


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """transformers' ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``: LLaVA-NeXT's
    anyres layout (large crop grids downscaled by the model before the newlines are added, which
    the embeddings show as they are) under the same rule; videos (their own token id) are kept."""

    model_types = ("llava_onevision",)
    label = "llava-onevision"

    def parts(self, model) -> ModelParts:
        from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

        return _outer_or_inner(model, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel, "llava_onevision")


def _grids(grid_thw, merge: int):
    """``(frames, (rows, cols))`` of each ``(t, h, w)`` row of a Qwen grid tensor (``None``: none)."""
    for t, h, w in ([] if grid_thw is None else grid_thw.tolist()):
        yield t, (h // merge, w // merge)


def _outer_or_inner(model, outer_cls, inner_cls, model_type: str) -> ModelParts:
    """The parts of a transformers VLM given as its outer ``...ForConditionalGeneration`` (``model.model``
    the multimodal model) or as that inner model; ``TypeError`` naming both otherwise."""
    if isinstance(model, outer_cls):
        return ModelParts(model, model.model, model.model.language_model)
    if isinstance(model, inner_cls):
        return ModelParts(None, model, model.language_model)
    raise TypeError(f"model_type {model_type}: expected transformers' {outer_cls.__name__} or {inner_cls.__name__}, "
                    f"got {type(model).__name__}")


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
register_adapter(Qwen2_5_VLAdapter())
register_adapter(Qwen3VLAdapter())
register_adapter(LlavaNextAdapter())
register_adapter(LlavaOnevisionAdapter())
