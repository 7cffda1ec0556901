"""Analytic cost of a decoder under a vision-token schedule: FLOPs and KV-cache bytes.

Counting conventions (state them with every number you publish):

* a multiply-add is 2 FLOPs; matrix products are counted dense, as a profiler of the
  kernels sees them (attention ``QK^T`` and ``AV`` over the full ``q x kv`` rectangle);
* per layer: q/k/v/o projections, attention, the gated MLP (3 matrices); norms, RoPE and
  softmax are left out (under 0.5% for Llama shapes);
* prefill computes logits for the last position only (as ``generate`` does); each decode
  step feeds one token and computes its logits;
* the KV cache of layer ``l`` holds ``2 * kv_heads * head_dim`` values per cached token.

* the vision tower counts its patch convolution and every layer it runs (transformers runs
  all 24 of CLIP ViT-L even though LLaVA reads layer -2; ToMe stops at the feature layer);
  the projector its matrices; FastV and PyramidDrop their extra query row and keys.

Images whose size sets their tokens (``ModelShape.resolution``; ``image_tokens`` says what one
image becomes, ``Workload.image_width`` / ``image_height`` give the size):

* Qwen2.5-VL / Qwen3-VL (``SmartResize``): the processor resizes to multiples of
  ``patch x merge`` pixels within ``[min_pixels, max_pixels]`` (transformers' own
  ``smart_resize``); the tower runs on the ``h/patch x w/patch`` patches of the image (its
  Conv3d over ``temporal_patch_size`` copies of it), every layer of it; Qwen2.5-VL's windowed
  layers attend within each window (the merged grid tiled from the top left by windows of
  ``window_size / merge / patch`` merged tokens a side, edge windows partial) and its
  ``fullatt_block_indexes`` layers over the whole image; its MLP is gated (3 matrices),
  Qwen3-VL's is not (2). The merger (and each of Qwen3-VL's DeepStack mergers) maps
  ``merge**2 x hidden`` features of each merged token (2 matrices) and is counted under
  ``projector``. The decoder gets the ``h/(patch*merge) x w/(patch*merge)`` merged tokens.
* LLaVA-NeXT / LLaVA-OneVision (``AnyResolution``): the base view (one tile) plus the crops of
  the best-fit pinpoint (transformers' ``select_best_resolution``); the tower runs on every
  tile (every layer: transformers' classes run them all), the projector on every tile's
  features; the decoder gets the base view's grid and the crop grid unpadded to the image's
  aspect ratio (OneVision: downscaled when over ``anyres_max_N`` tiles of area), one newline
  token closing each crop line. OneVision with several images in a prompt: each is its base
  view and one newline token (its processor does not crop them).
* Each grid (the image; OneVision's base view and crop grid) is pruned on its own schedule;
  newline tokens are never pruned and count like text. ``budget_fraction``: each grid's
  schedule is solved from its own tokens, as the model solves it (``AdscPlan.budget_fraction``);
  an absolute ``budget`` on these models is read as the fraction ``budget / vision tokens of
  the image`` (the model itself takes only fractions for them), so it is a per-image budget.

Reads the schedule, never recomputes it. ``python -m adsc_patch.profile`` prints the
cost of any method and budget for a preset or a config (``--help``), with a capacity
model of a paged KV cache for serving.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from .methods import get_method
from .schedule import ScheduleError, VisionSchedule

__all__ = [
    "CLIP_VIT_L_336", "LLAVA_15_7B", "LLAVA_15_13B", "PRESETS", "TABLE_IV_WORKLOAD", "AnyResolution", "DecoderShape",
    "GenerationCost", "ImageTokens", "ModelCost", "ModelShape", "ProjectorShape", "SmartResize", "VisionTowerShape",
    "Workload", "attention_windows", "generation_cost", "grid_schedule_cost", "image_tokens", "kv_cache_bytes",
    "layer_flops", "load_shape", "model_cost", "parse_image_size", "patch_grid_tower_flops", "schedule_cost",
    "parameter_count", "projector_flops", "scoring_flops", "serving_capacity", "ServingCapacity", "tokens_per_layer",
    "tower_flops",
]


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a Llama-style decoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
        )


LLAVA_15_7B = DecoderShape(32, 4096, 11008, 32, 32, 128, 32000)
LLAVA_15_13B = DecoderShape(40, 5120, 13824, 40, 40, 128, 32000)


def tokens_per_layer(
    num_layers: int, text_tokens: int, schedule: VisionSchedule | None = None, num_images: int = 1,
    vision_tokens: int = 0,
) -> list[int]:
    """Tokens entering each layer: all text plus each image's scheduled vision tokens.

    Without a schedule, ``vision_tokens`` per image enter every layer.
    """
    if schedule is None:
        return [text_tokens + num_images * vision_tokens] * num_layers
    if schedule.num_layers != num_layers:
        raise ValueError(f"schedule is for {schedule.num_layers} layers, the decoder has {num_layers}")
    return [text_tokens + num_images * n for n in schedule.tokens_per_layer]


def kv_cache_bytes(shape: DecoderShape, cached_tokens: list[int], batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values when layer ``l`` caches ``cached_tokens[l]`` positions."""
    per_token = 2 * shape.num_kv_heads * shape.head_dim * bytes_per_value
    return batch * per_token * sum(cached_tokens)


def layer_flops(shape: DecoderShape, q_tokens: int, kv_tokens: int) -> int:
    """FLOPs of one decoder layer for ``q_tokens`` queries over ``kv_tokens`` keys."""
    d, heads, kv_heads, hd = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    projections = 2 * q_tokens * d * (heads * hd + 2 * kv_heads * hd) + 2 * q_tokens * heads * hd * d
    attention = 2 * 2 * q_tokens * kv_tokens * heads * hd
    mlp = 2 * q_tokens * 3 * d * shape.intermediate_size
    return projections + attention + mlp


@dataclass(frozen=True)
class GenerationCost:
    prefill_flops: int
    decode_flops: int
    kv_bytes_after_prefill: int
    peak_kv_bytes: int
    tokens_per_layer: tuple[int, ...]

    @property
    def total_flops(self) -> int:
        return self.prefill_flops + self.decode_flops


def generation_cost(
    shape: DecoderShape,
    text_tokens: int,
    new_tokens: int = 1,
    schedule: VisionSchedule | None = None,
    vision_tokens: int = 0,
    num_images: int = 1,
    batch: int = 1,
    bytes_per_value: int = 2,
) -> GenerationCost:
    """Cost of generating ``new_tokens`` after a prompt of ``text_tokens`` + images.

    The first new token comes from the prefill; each of the other ``new_tokens - 1`` is fed
    back through every layer, attending to that layer's cache.
    """
    per_layer = tokens_per_layer(shape.num_layers, text_tokens, schedule, num_images, vision_tokens)
    return generation_cost_of_layers(shape, per_layer, new_tokens, batch, bytes_per_value)


def generation_cost_of_layers(shape: DecoderShape, prompt_tokens_per_layer: Sequence[int], new_tokens: int = 1,
                              batch: int = 1, bytes_per_value: int = 2) -> GenerationCost:
    """``generation_cost`` when layer ``l`` of the prefill runs ``prompt_tokens_per_layer[l]`` tokens."""
    per_layer = list(prompt_tokens_per_layer)
    logits = 2 * shape.hidden_size * shape.vocab_size
    prefill = sum(layer_flops(shape, n, n) for n in per_layer) + logits
    decode = 0
    for step in range(1, new_tokens):
        decode += sum(layer_flops(shape, 1, n + step) for n in per_layer) + logits
    kv_prefill = kv_cache_bytes(shape, per_layer, batch, bytes_per_value)
    kv_peak = kv_cache_bytes(shape, [n + max(new_tokens - 1, 0) for n in per_layer], batch, bytes_per_value)
    return GenerationCost(batch * prefill, batch * decode, kv_prefill, kv_peak, tuple(per_layer))


# ---------------------------------------------------------------------------- whole model
@dataclass(frozen=True)
class VisionTowerShape:
    """A ViT: ``num_layers`` layers after a ``patch_size`` x ``patch_size`` convolution of
    ``channels`` input channels (over ``temporal_patch_size`` frames: Qwen's Conv3d).

    CLIP as LLaVA runs it: ``1 + grid**2`` tokens (``class_tokens`` first); LLaVA reads the
    features at ``select_layer``, and the layers after it do not run (``adsc_patch.tower``).
    ``grid`` 0: the patch grid is each image's own (Qwen); then ``spatial_merge_size`` x
    ``spatial_merge_size`` patches become one token, layers outside ``full_attention_layers``
    attend within windows of ``window_size`` pixels (0: every layer attends over the whole
    image), and ``deepstack_layers`` each feed a merger of their own (Qwen3-VL)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    grid: int
    patch_size: int
    select_layer: int = -2
    channels: int = 3
    class_tokens: int = 1
    gated_mlp: bool = False
    temporal_patch_size: int = 1
    spatial_merge_size: int = 1
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()
    deepstack_layers: tuple[int, ...] = ()

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_to_feature(self) -> int:
        return self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer


@dataclass(frozen=True)
class ProjectorShape:
    """``linear`` (one matrix) or ``mlp2x_gelu`` (two) from the tower's width to the decoder's;
    ``hidden_features``: the width between the matrices (default: the decoder's; Qwen's merger
    keeps its input's)."""

    in_features: int
    out_features: int
    depth: int = 2
    hidden_features: int | None = None


@dataclass(frozen=True)
class SmartResize:
    """Qwen2-VL's image processor (Qwen2.5-VL's and Qwen3-VL's too): each side to a multiple of
    ``patch x merge`` pixels, the area within ``[min_pixels, max_pixels]`` (``smart_resize``)."""

    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class AnyResolution:
    """LLaVA-NeXT's anyres: the base view plus the crops of the best-fit ``pinpoints``
    (``(height, width)`` pixels, multiples of the tower's input size). ``max_tiles``: OneVision's
    ``anyres_max_N`` (a crop grid over ``N`` tiles of area is downscaled; ``None``: never);
    ``crops_only_alone``: OneVision's processor crops only an image alone in its prompt."""

    pinpoints: tuple[tuple[int, int], ...]
    max_tiles: int | None = None
    crops_only_alone: bool = False


@dataclass(frozen=True)
class ModelShape:
    decoder: DecoderShape
    tower: VisionTowerShape
    projector: ProjectorShape
    resolution: SmartResize | AnyResolution | None = None  # None: every image is the tower's fixed input

    @classmethod
    def from_config(cls, config, vision_config=None, preprocessor: dict | None = None) -> "ModelShape":
        """From a ``LlavaConfig`` (ours: the tower from ``vision_config``, else ``mm_vision_config``),
        transformers' ``LlavaConfig``, or transformers' Qwen2.5-VL / Qwen3-VL / LLaVA-NeXT /
        LLaVA-OneVision config (``preprocessor``: the checkpoint's ``preprocessor_config.json``,
        for Qwen's pixel bounds)."""
        builder = _TRANSFORMERS_BUILDERS.get(getattr(config, "model_type", None))
        if builder is not None:
            return builder(config, preprocessor or {})
        vision = vision_config or getattr(config, "vision_config", None) or getattr(config, "mm_vision_config", None)
        if vision is None:
            raise ValueError("the config does not hold the vision tower's sizes; pass vision_config")
        get = vision.get if isinstance(vision, dict) else (lambda key, default=None: getattr(vision, key, default))
        select = getattr(config, "mm_vision_select_layer", None)
        select = getattr(config, "vision_feature_layer", -2) if select is None else select
        projector = getattr(config, "mm_projector_type", "mlp2x_gelu")
        depth = 1 if projector == "linear" else int(projector.split("x")[0].removeprefix("mlp"))
        tower = VisionTowerShape(get("num_hidden_layers"), get("hidden_size"), get("intermediate_size"),
                                 get("image_size") // get("patch_size"), get("patch_size"), select,
                                 get("num_channels", 3))
        decoder = DecoderShape.from_config(config)
        return cls(decoder, tower, ProjectorShape(tower.hidden_size, decoder.hidden_size, depth))


def _int_size(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what} {list(value)}: only square sizes are modelled")
        value = value[0]
    return int(value)


def _qwen_shape(config, preprocessor: dict) -> ModelShape:
    """Qwen2.5-VL (gated MLP, windowed attention) or Qwen3-VL (GELU MLP, DeepStack mergers)."""
    vision = config.vision_config
    qwen3 = config.model_type == "qwen3_vl"
    merge = vision.spatial_merge_size
    tower = VisionTowerShape(
        num_layers=vision.depth, hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, grid=0,
        patch_size=_int_size(vision.patch_size, "patch_size"), select_layer=-1, channels=vision.in_channels,
        class_tokens=0, gated_mlp=not qwen3,
        temporal_patch_size=_int_size(vision.temporal_patch_size, "temporal_patch_size"), spatial_merge_size=merge,
        window_size=0 if qwen3 else vision.window_size,
        full_attention_layers=() if qwen3 else tuple(vision.fullatt_block_indexes),
        deepstack_layers=tuple(vision.deepstack_visual_indexes) if qwen3 else (),
    )
    merged = vision.hidden_size * merge * merge
    projector = ProjectorShape(merged, vision.out_hidden_size, 2, hidden_features=merged)
    default = QWEN3_VL_PIXELS if qwen3 else QWEN2_5_VL_PIXELS
    size = preprocessor.get("size") or {}
    resolution = SmartResize(
        min_pixels=preprocessor.get("min_pixels") or size.get("shortest_edge") or default.min_pixels,
        max_pixels=preprocessor.get("max_pixels") or size.get("longest_edge") or default.max_pixels,
    )
    return ModelShape(DecoderShape.from_config(config), tower, projector, resolution)


def _anyres_shape(config, preprocessor: dict) -> ModelShape:
    """LLaVA-NeXT (CLIP, ``default`` features: no CLS) or LLaVA-OneVision (SigLIP, ``full``)."""
    vision = config.vision_config
    onevision = config.model_type == "llava_onevision"
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"vision_feature_layer {config.vision_feature_layer}: only one feature layer is modelled")
    tower = VisionTowerShape(
        vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size, vision.image_size // vision.patch_size,
        vision.patch_size, config.vision_feature_layer, vision.num_channels,
        class_tokens=0 if "siglip" in vision.model_type else 1,
    )
    decoder = DecoderShape.from_config(config)
    aspect = getattr(config, "vision_aspect_ratio", "") or ""
    max_tiles = int(aspect.removeprefix("anyres_max_")) if onevision and aspect.startswith("anyres_max_") else None
    resolution = AnyResolution(tuple(tuple(p) for p in config.image_grid_pinpoints), max_tiles,
                               crops_only_alone=onevision)
    return ModelShape(decoder, tower, ProjectorShape(tower.hidden_size, decoder.hidden_size, 2), resolution)


_TRANSFORMERS_BUILDERS = {"qwen2_5_vl": _qwen_shape, "qwen3_vl": _qwen_shape, "llava_next": _anyres_shape,
                          "llava_onevision": _anyres_shape}


CLIP_VIT_L_336 = VisionTowerShape(24, 1024, 4096, 24, 14)
# The processors' pixel bounds as the checkpoints ship them (preprocessor_config.json).
QWEN2_5_VL_PIXELS = SmartResize(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
QWEN3_VL_PIXELS = SmartResize(min_pixels=256 * 256, max_pixels=4096 * 4096)
# transformers' LlavaOnevisionConfig default: 1 x 1 to 6 x 6 tiles of 384 pixels
ONEVISION_PINPOINTS = tuple((384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7))
PRESETS = {
    "llava-1.5-7b": ModelShape(LLAVA_15_7B, CLIP_VIT_L_336, ProjectorShape(1024, 4096)),
    "llava-1.5-13b": ModelShape(LLAVA_15_13B, CLIP_VIT_L_336, ProjectorShape(1024, 5120)),
    # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": ModelShape(
        DecoderShape(28, 3584, 18944, 28, 4, 128, 152064),
        VisionTowerShape(32, 1280, 3420, grid=0, patch_size=14, select_layer=-1, class_tokens=0, gated_mlp=True,
                         temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                         full_attention_layers=(7, 15, 23, 31)),
        ProjectorShape(4 * 1280, 3584, 2, hidden_features=4 * 1280), QWEN2_5_VL_PIXELS),
    # Qwen/Qwen3-VL-8B-Instruct
    "qwen3-vl-8b": ModelShape(
        DecoderShape(36, 4096, 12288, 32, 8, 128, 151936),
        VisionTowerShape(27, 1152, 4304, grid=0, patch_size=16, select_layer=-1, class_tokens=0,
                         temporal_patch_size=2, spatial_merge_size=2, deepstack_layers=(8, 16, 24)),
        ProjectorShape(4 * 1152, 4096, 2, hidden_features=4 * 1152), QWEN3_VL_PIXELS),
    # llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP so400m without its last layer (26 of 27,
    # transformers' LlavaOnevisionConfig default; read at -1), Qwen2-7B
    "llava-onevision-7b": ModelShape(
        DecoderShape(28, 3584, 18944, 28, 4, 128, 152064),
        VisionTowerShape(26, 1152, 4304, grid=384 // 14, patch_size=14, select_layer=-1, class_tokens=0),
        ProjectorShape(1152, 3584, 2), AnyResolution(ONEVISION_PINPOINTS, max_tiles=9, crops_only_alone=True)),
}


@dataclass(frozen=True)
class Workload:
    """What one request does: ``text_tokens`` of prompt (every token that is not a vision
    token: Qwen's vision start / end markers count here, LLaVA-NeXT's newlines do not),
    ``images``, ``new_tokens`` generated (the first from the prefill), ``batch`` identical
    requests, ``bytes_per_value`` of the KV cache (2: bf16/fp16), and the images' size in
    pixels (``image_width`` x ``image_height``; needed by models whose tokens follow it).

    The default is the workload that reproduces the ADSC paper's Table IV (LLaVA-1.5-7B,
    relative FLOPs and KV at 192 / 128 / 64 within 0.85 points): a 60-token prompt and 53
    generated tokens (``docs/efficiency.md``)."""

    text_tokens: int = 60
    images: int = 1
    new_tokens: int = 53
    batch: int = 1
    bytes_per_value: int = 2
    image_width: int | None = None
    image_height: int | None = None


TABLE_IV_WORKLOAD = Workload()


def parse_image_size(text: str) -> tuple[int, int]:
    """``(width, height)`` of ``"WIDTHxHEIGHT"`` (pixels, e.g. ``1024x768``)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise ValueError(f"image size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x768")
    return int(width), int(height)


@dataclass(frozen=True)
class ImageTokens:
    """What one image becomes: the tower's inputs (each a ``(rows, cols)`` patch grid: the
    resized image for Qwen, each tile for anyres), the projector's input features, the vision
    grids the decoder receives (each pruned on its own schedule) and the newline tokens among
    them (never pruned, counted like text)."""

    tower_inputs: tuple[tuple[int, int], ...]
    projector_tokens: int
    grids: tuple[tuple[int, int], ...]
    newline_tokens: int = 0
    resized: tuple[int, int] | None = None  # (height, width) in pixels after the processor's resize

    @property
    def vision_tokens(self) -> int:
        """Vision tokens per image (newlines excluded)."""
        return sum(rows * cols for rows, cols in self.grids)

    @property
    def grid_tokens(self) -> tuple[int, ...]:
        return tuple(rows * cols for rows, cols in self.grids)


def image_tokens(shape: ModelShape, width: int | None = None, height: int | None = None,
                 images_in_prompt: int = 1) -> ImageTokens:
    """The tokens of one ``width x height`` image on ``shape`` (the size is ignored by a fixed-size
    tower; ``images_in_prompt``: OneVision crops only an image alone in its prompt)."""
    tower, rule = shape.tower, shape.resolution
    if rule is None:
        side = tower.grid
        return ImageTokens(((side, side),), side * side, ((side, side),))
    if width is None or height is None:
        raise ValueError("this model's vision tokens follow each image's size: give one (--image-size WxH, "
                         "Workload.image_width / image_height)")
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height}: width and height must be positive pixels")
    if isinstance(rule, SmartResize):
        return _qwen_image_tokens(tower, rule, width, height)
    return _anyres_image_tokens(tower, rule, width, height, images_in_prompt)


def _qwen_image_tokens(tower: VisionTowerShape, rule: SmartResize, width: int, height: int) -> ImageTokens:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge = tower.patch_size, tower.spatial_merge_size
    resized_height, resized_width = smart_resize(height, width, factor=patch * merge, min_pixels=rule.min_pixels,
                                                 max_pixels=rule.max_pixels)
    rows, cols = resized_height // patch, resized_width // patch
    merged = (rows // merge, cols // merge)
    return ImageTokens(((rows, cols),), merged[0] * merged[1], (merged,), 0, (resized_height, resized_width))


def _anyres_image_tokens(tower: VisionTowerShape, rule: AnyResolution, width: int, height: int,
                         images_in_prompt: int) -> ImageTokens:
    """The processor's count (``_get_number_of_features`` of transformers' LLaVA-NeXT and
    OneVision processors, written here): crop grid unpadded to the image's aspect ratio, then
    (OneVision) downscaled when its area is over ``max_tiles`` tiles by more than 1.1."""
    from transformers.image_processing_utils import select_best_resolution

    side = tower.grid
    tile_pixels = side * tower.patch_size
    base = (side, side)
    if rule.crops_only_alone and images_in_prompt > 1:
        return ImageTokens((base,), side * side, (base,), newline_tokens=1, resized=(tile_pixels, tile_pixels))
    best_height, best_width = select_best_resolution((height, width), [list(p) for p in rule.pinpoints])
    tiles = (best_height // tile_pixels) * (best_width // tile_pixels)
    rows, cols = side * (best_height // tile_pixels), side * (best_width // tile_pixels)
    if width / height > cols / rows:  # wider than the pinpoint: bands above and below are padding
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        rows -= 2 * padding
    else:
        padding = (cols - int(round(width * (rows / height), 7))) // 2
        cols -= 2 * padding
    if rule.max_tiles is not None:
        ratio = math.sqrt(rows * cols / (rule.max_tiles * side * side))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
    return ImageTokens(((side, side),) * (1 + tiles), (1 + tiles) * side * side, (base, (rows, cols)),
                       newline_tokens=rows, resized=(best_height, best_width))


def tower_flops(tower: VisionTowerShape, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of one image through the tower: the patch convolution, then each layer's q/k/v/o,
    full (bidirectional) attention and 2-matrix MLP on ``tokens_per_layer[l]`` tokens."""
    d, m = tower.hidden_size, tower.intermediate_size
    flops = 2 * tower.num_patches * tower.channels * tower.patch_size ** 2 * d
    for n in tokens_per_layer:
        flops += 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * m
    return flops


def attention_windows(tower: VisionTowerShape, rows: int, cols: int) -> tuple[int, ...]:
    """Patches in each attention window of a ``rows x cols`` patch grid (Qwen2.5-VL: the merged
    grid tiled from the top left by windows of ``window_size / merge / patch`` merged tokens a
    side, the last row and column of windows partial); ``()`` for a tower without windows."""
    if not tower.window_size:
        return ()
    merge = tower.spatial_merge_size
    side = tower.window_size // merge // tower.patch_size
    if side < 1:
        raise ValueError(f"window_size {tower.window_size} is under one merged token ({merge} x {tower.patch_size} px)")
    merged_rows, merged_cols = rows // merge, cols // merge
    heights = [min(side, merged_rows - top) for top in range(0, merged_rows, side)]
    widths = [min(side, merged_cols - left) for left in range(0, merged_cols, side)]
    return tuple(h * w * merge * merge for h in heights for w in widths)


def patch_grid_tower_flops(tower: VisionTowerShape, rows: int, cols: int, layers: int | None = None) -> int:
    """FLOPs of one tower input of ``rows x cols`` patches (plus ``class_tokens``) through
    ``layers`` layers (default: all): the patch convolution, then per layer q/k/v/o, the
    attention (within each window in windowed layers, else over the whole input) and the MLP
    (3 matrices if gated, else 2)."""
    d, m = tower.hidden_size, tower.intermediate_size
    patches = rows * cols
    n = patches + tower.class_tokens
    flops = 2 * patches * tower.channels * tower.temporal_patch_size * tower.patch_size ** 2 * d
    windows = attention_windows(tower, rows, cols)
    mlp_matrices = 3 if tower.gated_mlp else 2
    for layer in range(tower.num_layers if layers is None else layers):
        flops += 2 * n * 4 * d * d + 2 * n * mlp_matrices * d * m
        if windows and layer not in tower.full_attention_layers:
            flops += sum(2 * 2 * w * w * d for w in windows)
        else:
            flops += 2 * 2 * n * n * d
    return flops


def projector_flops(projector: ProjectorShape, tokens: int) -> int:
    """FLOPs of the projector on ``tokens`` features (its first matrix widens to the decoder's
    width, or to ``hidden_features``)."""
    out = projector.out_features
    if projector.depth == 1:
        return 2 * tokens * projector.in_features * out
    hidden = projector.hidden_features or out
    return 2 * tokens * (projector.in_features * hidden + (projector.depth - 2) * hidden * hidden + hidden * out)


def scoring_flops(shape: DecoderShape, method: str, tokens_at_scoring: Sequence[int]) -> int:
    """Extra FLOPs of the score-based methods: per ranking, the query row's q projection and
    the keys of every token it sees, then one row of ``QK^T`` (FastV, PyramidDrop); zero for
    the others (and for no method, ``""``)."""
    if not method or not get_method(method).in_decoder or not get_method(method).score_based:
        return 0
    d, heads, kv_heads, hd = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    return sum(2 * d * heads * hd + 2 * n * d * kv_heads * hd + 2 * n * heads * hd for n in tokens_at_scoring)


@dataclass(frozen=True)
class ModelCost:
    """Analytic cost of one workload under one method and budget (FLOPs for the whole batch).
    ``mean_vision_tokens`` and ``kept_after_last_stage`` are per image; ``budget_fraction``: the
    fraction each image's grids were solved for (given, or an absolute budget's on models whose
    images differ in size); ``image``: what one image became."""

    method: str
    budget: float | None
    mean_vision_tokens: float
    kept_after_last_stage: int
    tokens_per_layer: tuple[int, ...]
    tower_flops: int
    projector_flops: int
    scoring_flops: int
    prefill_flops: int
    decode_flops: int
    kv_bytes_after_prefill: int
    kv_peak_bytes: int
    budget_fraction: float | None = None
    image: ImageTokens | None = None

    @property
    def flops_total(self) -> int:
        return self.tower_flops + self.projector_flops + self.scoring_flops + self.prefill_flops + self.decode_flops

    @property
    def language_model_flops(self) -> int:
        """The language model's share: prefill, decode and a score-based method's ranking rows."""
        return self.prefill_flops + self.decode_flops + self.scoring_flops


def model_cost(shape: ModelShape, method: str | None, budget: float | None, workload: Workload = TABLE_IV_WORKLOAD,
               prune_layers: Sequence[int] | None = None, *, budget_fraction: float | None = None) -> ModelCost:
    """Cost of ``workload`` on ``shape`` under ``method`` at ``budget`` (mean vision tokens per
    decoder layer) or ``budget_fraction`` (of each image's own tokens) (``method=None``: full).

    Schedules come from ``adsc_patch.solve.solve_method`` (the solver the model uses); the
    cost of a solved schedule is ``schedule_cost``'s. For a model whose tokens follow the image
    size (``shape.resolution``) each grid of the image gets its own schedule, solved as the
    model solves ``budget_fraction`` (``grid_schedule_cost``)."""
    from .solve import solve_method

    if method is not None and (budget is None) == (budget_fraction is None):
        raise ValueError(f"prune method {method}: give exactly one of budget and budget_fraction "
                         f"(got {budget}, {budget_fraction})")
    if budget_fraction is not None and not 0 < budget_fraction <= 1:
        raise ScheduleError(f"budget_fraction {budget_fraction:g} must be in (0, 1]")
    if shape.resolution is not None:
        return _per_grid_model_cost(shape, method, budget, budget_fraction, workload, prune_layers)
    if method is None:
        return schedule_cost(shape, None, None, workload, budget=budget)
    tower = shape.tower
    if budget_fraction is not None:
        budget = budget_fraction * tower.num_patches
    solved = solve_method(method, budget, shape.decoder.num_layers, (tower.grid, tower.grid),
                          tower.layers_to_feature, prune_layers)
    cost = schedule_cost(shape, method, solved.schedule, workload, pre_llm=solved.pre_llm, budget=budget)
    return dataclasses.replace(cost, budget_fraction=budget_fraction)


def _per_grid_model_cost(shape: ModelShape, method: str | None, budget: float | None, budget_fraction: float | None,
                         workload: Workload, prune_layers: Sequence[int] | None) -> ModelCost:
    """``model_cost`` on a model whose tokens follow the image size: each grid's schedule by
    ``AdscPlan.schedule`` (the model's own per-image solve of ``budget_fraction``)."""
    from .decoder import AdscPlan

    image = image_tokens(shape, workload.image_width, workload.image_height, workload.images)
    if method is None:
        return grid_schedule_cost(shape, None, image, (None,) * len(image.grids), workload, budget=budget)
    rule = get_method(method)
    if not rule.in_decoder:
        raise ScheduleError(f"prune method {method} acts before the language model; on models whose tokens follow "
                            f"the image size the patch runs the in-decoder methods only")
    if budget_fraction is None:
        budget_fraction = budget / image.vision_tokens
        if budget_fraction > 1:
            raise ScheduleError(f"prune method {method}: budget {budget:g} is above the {image.vision_tokens} vision "
                                f"tokens of a {workload.image_width}x{workload.image_height} image")
    num_layers = shape.decoder.num_layers
    layers = rule.default_layers(num_layers) if prune_layers is None else tuple(prune_layers)
    plan = AdscPlan(tuple(layers), method=method, budget_fraction=budget_fraction)
    schedules = tuple(plan.schedule(num_layers, n) for n in image.grid_tokens)
    return grid_schedule_cost(shape, method, image, schedules, workload, budget=budget,
                              budget_fraction=budget_fraction)


def _tokens_seen_by_ranking(rule, schedule: VisionSchedule, num_tokens: int, prune_layer: int) -> int:
    """One image's (grid's) vision tokens the ranking query of ``prune_layer`` sees."""
    per_layer = schedule.tokens_per_layer
    ranked_at = rule.score_layer(prune_layer)
    if ranked_at < prune_layer:
        return per_layer[ranked_at]
    return per_layer[prune_layer - 1] if prune_layer else num_tokens


def schedule_cost(shape: ModelShape, method: str | None, schedule: VisionSchedule | None,
                  workload: Workload = TABLE_IV_WORKLOAD, pre_llm=None, budget: float | None = None) -> ModelCost:
    """Cost of ``workload`` on ``shape`` under an already resolved per-image ``schedule`` of
    ``method`` (``None``: full; a pre-LLM method also gives its ``PreLlmPlan``): the one cost
    model the profiler, the bench, the demo and the playground's report read.

    The tower runs the method's ``tower_tokens_per_layer`` (ToMe's merges layer by layer up
    to the feature layer), the projector the tokens it hands on, the decoder the schedule;
    score-based methods add their attention rows (``scoring_flops``). Models whose tokens
    follow the image size: ``grid_schedule_cost`` (one schedule per grid)."""
    if shape.resolution is not None:
        raise ValueError("schedule_cost takes one schedule for every image of a fixed-size tower; this model's "
                         "images each get theirs: use model_cost or grid_schedule_cost")
    tower, n = shape.tower, shape.tower.num_patches
    images, batch = workload.images, workload.batch
    tower_tokens = [n + 1] * tower.layers_to_feature
    kept, entering = n, n
    score_at: list[int] = []
    if schedule is not None and not schedule.enabled and pre_llm is None:
        schedule = None
    if method is not None and schedule is not None:
        kept = schedule.stage_tokens[-1]
        rule = get_method(method)
        if pre_llm is not None:
            entering = pre_llm.num_tokens
            tower_tokens = rule.tower_tokens_per_layer(pre_llm.setting, n, tower.layers_to_feature)
        elif rule.score_based:
            score_at = [workload.text_tokens + images * _tokens_seen_by_ranking(rule, schedule, n, p)
                        for p in schedule.prune_layers]
    cost = generation_cost(shape.decoder, workload.text_tokens, workload.new_tokens, schedule=schedule,
                           vision_tokens=n, num_images=images, batch=batch, bytes_per_value=workload.bytes_per_value)
    return ModelCost(
        method=method or "full", budget=budget,
        mean_vision_tokens=schedule.average_tokens if schedule is not None else float(n),
        kept_after_last_stage=kept, tokens_per_layer=cost.tokens_per_layer,
        tower_flops=batch * images * tower_flops(tower, tower_tokens),
        projector_flops=batch * images * projector_flops(shape.projector, entering),
        scoring_flops=batch * scoring_flops(shape.decoder, method or "", score_at),
        prefill_flops=cost.prefill_flops, decode_flops=cost.decode_flops,
        kv_bytes_after_prefill=cost.kv_bytes_after_prefill, kv_peak_bytes=cost.peak_kv_bytes,
    )


def grid_schedule_cost(shape: ModelShape, method: str | None, image: ImageTokens,
                       schedules: Sequence[VisionSchedule | None], workload: Workload = TABLE_IV_WORKLOAD,
                       budget: float | None = None, budget_fraction: float | None = None) -> ModelCost:
    """Cost of ``workload`` when every image is ``image`` and its grid ``g`` runs
    ``schedules[g]`` (``None``: unpruned): the tower on every input of the image, the
    projector (and DeepStack mergers) on its features, the decoder on text + newlines + each
    grid's scheduled tokens, a score-based method's ranking rows over all of them."""
    if len(schedules) != len(image.grids):
        raise ValueError(f"{len(schedules)} schedules for an image of {len(image.grids)} grids")
    num_layers, images, batch = shape.decoder.num_layers, workload.images, workload.batch
    sizes = image.grid_tokens
    per_grid = [[n] * num_layers if s is None else list(s.tokens_per_layer) for n, s in zip(sizes, schedules)]
    for n, s in zip(sizes, schedules):
        if s is not None and (s.num_layers != num_layers or s.num_vision_tokens != n):
            raise ValueError(f"a schedule of {s.num_vision_tokens} tokens over {s.num_layers} layers for a grid of {n} "
                             f"tokens over {num_layers}")
    vision_per_layer = [sum(grid[layer] for grid in per_grid) for layer in range(num_layers)]
    prompt_per_layer = [workload.text_tokens + images * (image.newline_tokens + v) for v in vision_per_layer]
    score_at: list[int] = []
    pruned = [(n, s) for n, s in zip(sizes, schedules) if s is not None and s.enabled]
    if method is not None and pruned and get_method(method).score_based:
        rule = get_method(method)
        score_at = [workload.text_tokens + images * (image.newline_tokens + sum(
            _tokens_seen_by_ranking(rule, s, n, p) if s is not None and s.enabled else n
            for n, s in zip(sizes, schedules))) for p in pruned[0][1].prune_layers]
    cost = generation_cost_of_layers(shape.decoder, prompt_per_layer, workload.new_tokens, batch,
                                     workload.bytes_per_value)
    tower = sum(patch_grid_tower_flops(shape.tower, rows, cols) for rows, cols in image.tower_inputs)
    mergers = 1 + len(shape.tower.deepstack_layers)
    return ModelCost(
        method=method or "full", budget=budget, mean_vision_tokens=sum(vision_per_layer) / num_layers,
        kept_after_last_stage=sum(grid[-1] for grid in per_grid), tokens_per_layer=cost.tokens_per_layer,
        tower_flops=batch * images * tower,
        projector_flops=batch * images * mergers * projector_flops(shape.projector, image.projector_tokens),
        scoring_flops=batch * scoring_flops(shape.decoder, method or "", score_at),
        prefill_flops=cost.prefill_flops, decode_flops=cost.decode_flops,
        kv_bytes_after_prefill=cost.kv_bytes_after_prefill, kv_peak_bytes=cost.peak_kv_bytes,
        budget_fraction=budget_fraction, image=image,
    )


def parameter_count(shape: ModelShape) -> int:
    """Weights of the whole model (decoder with embeddings and head, tower, projector and any
    DeepStack mergers); biases and norms approximately."""
    d, heads, kv_heads, hd = shape.decoder.hidden_size, shape.decoder.num_heads, shape.decoder.num_kv_heads, shape.decoder.head_dim
    layer = d * (heads * hd + 2 * kv_heads * hd) + heads * hd * d + 3 * d * shape.decoder.intermediate_size + 2 * d
    decoder = shape.decoder.num_layers * layer + 2 * shape.decoder.vocab_size * d + d
    t = shape.tower
    mlp = (3 if t.gated_mlp else 2) * t.hidden_size * t.intermediate_size
    tower_layer = 4 * t.hidden_size * (t.hidden_size + 1) + mlp + 4 * t.hidden_size
    positions = (t.num_patches + t.class_tokens + 1) * t.hidden_size if t.grid else 0
    tower = (t.num_layers * tower_layer + t.channels * t.temporal_patch_size * t.patch_size ** 2 * t.hidden_size
             + positions)
    p = shape.projector
    if p.depth == 1:
        projector = p.in_features * p.out_features + p.out_features
    else:
        hidden = p.hidden_features or p.out_features
        projector = (p.in_features * hidden + (p.depth - 2) * hidden * hidden + hidden * p.out_features
                     + (p.depth - 1) * hidden + p.out_features)
    return decoder + tower + (1 + len(t.deepstack_layers)) * projector


@dataclass(frozen=True)
class ServingCapacity:
    """How many requests of one workload a paged KV cache holds on one GPU.

    Every layer keeps its own block table (ADSC's stages cache different lengths, like a
    sliding-window group in vLLM), so a sequence takes ``ceil(tokens_l / block_size)`` blocks
    in layer ``l``."""

    blocks_per_sequence: int
    kv_bytes_per_sequence: int
    max_sequences: int
    decode_tokens_per_s: float | None  # at max_sequences, memory-bound (weights + every KV read per step)


def serving_capacity(shape: ModelShape, cost: ModelCost, workload: Workload, gpu_memory_bytes: float,
                     block_size: int = 16, weight_bytes_per_value: int = 2, reserve_fraction: float = 0.1,
                     bandwidth_bytes_per_s: float | None = None) -> ServingCapacity:
    """Capacity at the peak (prompt + every generated token cached) of ``cost``'s schedule.

    Free memory = ``gpu_memory_bytes * (1 - reserve_fraction)`` minus the weights; the decode
    bound assumes each step reads the weights once and every sequence's whole cache."""
    d = shape.decoder
    peak = [n + max(workload.new_tokens - 1, 0) for n in cost.tokens_per_layer]
    blocks = sum(-(-n // block_size) for n in peak)
    per_block = block_size * 2 * d.num_kv_heads * d.head_dim * workload.bytes_per_value
    per_sequence = blocks * per_block
    weights = parameter_count(shape) * weight_bytes_per_value
    free = gpu_memory_bytes * (1 - reserve_fraction) - weights
    count = max(int(free // per_sequence), 0)
    rate = None
    if bandwidth_bytes_per_s and count:
        rate = count * bandwidth_bytes_per_s / (weights + count * per_sequence)
    return ServingCapacity(blocks, per_sequence, count, rate)


_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def load_shape(name_or_path: str) -> ModelShape:
    """A preset name (``PRESETS``) or a checkpoint folder / ``config.json``: ours (with
    ``mm_vision_config``), llava-hf's LLaVA, or a Qwen2.5-VL / Qwen3-VL / LLaVA-NeXT /
    LLaVA-OneVision config (read by transformers' own config class; a ``preprocessor_config.json``,
    else a ``processor_config.json``'s ``image_processor``, beside it gives Qwen's pixel bounds)."""
    import json
    import os
    from types import SimpleNamespace

    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path):
        raise ValueError(f"--model {name_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a config file or folder")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") in _TRANSFORMERS_BUILDERS:
        from transformers import AutoConfig

        preprocessor = {}
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            preprocessor_path = os.path.join(os.path.dirname(path), name)
            if os.path.isfile(preprocessor_path):
                with open(preprocessor_path, encoding="utf-8") as f:
                    loaded = json.load(f)
                preprocessor = (loaded.get(key) or {}) if key else loaded
                break
        return ModelShape.from_config(AutoConfig.for_model(**config), preprocessor=preprocessor)
    if "text_config" in config:  # llava-hf
        text = SimpleNamespace(**config["text_config"])
        vision = config["vision_config"]
        select = config.get("vision_feature_layer", -2)
        projector = config.get("projector_hidden_act") and "mlp2x_gelu"
    else:
        text = SimpleNamespace(**config)
        vision = config.get("mm_vision_config")
        tower_config = os.path.join(os.path.dirname(path), str(config.get("mm_vision_tower")), "config.json")
        if vision is None and os.path.isfile(tower_config):  # a tower saved beside the checkpoint
            with open(tower_config, encoding="utf-8") as f:
                vision = json.load(f)
            vision = vision.get("vision_config", vision)
        if vision is None:
            raise ValueError(f"{path}: no mm_vision_config and no tower folder beside it; the tower's sizes are "
                             "needed (or use a preset)")
        select = config.get("mm_vision_select_layer", -2)
        projector = config.get("mm_projector_type", "linear")
    wrapped = SimpleNamespace(vision_config=vision, mm_vision_select_layer=select, mm_projector_type=projector,
                              get_text_config=lambda: text)
    return ModelShape.from_config(wrapped)


def load_recorded_schedule(name_or_path: str) -> tuple[str | None, tuple[int, ...]]:
    """``(prune_method, prune_layers)`` a checkpoint's ``config.json`` records (a fine-tuned
    schedule), ``(None, ())`` for a preset or a config without them."""
    import json
    import os

    if name_or_path in PRESETS:
        return None, ()
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config.get("prune_method"), tuple(config.get("prune_layers") or ())


def _rows(shape, methods, budgets, workload, prune_layers, gpu_memory_gb, bandwidth_gbs,
          recorded_layers=(), budget_fractions=()) -> tuple[list[dict], list[str]]:
    """The rows of every reachable (method, budget) and (method, budget fraction), and one
    error line per unreachable one. ``prune_layers`` (given) applies to every method; else a
    recorded schedule's layers where they fit each method (``solve.recorded_prune_layers_for``),
    else each method's defaults."""
    from .solve import recorded_prune_layers_for

    full = model_cost(shape, None, None, workload)
    settings = ([(None, None, None)] + [(m, b, None) for m in methods for b in budgets]
                + [(m, None, f) for m in methods for f in budget_fractions])
    rows, errors = [], []
    for method, budget, fraction in settings:
        layers = prune_layers
        if method is not None and layers is None and recorded_layers:
            layers = recorded_prune_layers_for(method, recorded_layers, shape.decoder.num_layers)
        try:
            cost = full if method is None else model_cost(shape, method, budget, workload, layers,
                                                          budget_fraction=fraction)
        except ScheduleError as error:
            errors.append(f"error: {method} at {budget:g}: {error}" if fraction is None else
                          f"error: {method} at budget fraction {fraction:g}: {error}")
            continue
        row = {
            "method": cost.method, "budget": budget, "budget_fraction": cost.budget_fraction,
            "mean_vision_tokens": cost.mean_vision_tokens, "kept_after_last_stage": cost.kept_after_last_stage,
            "flops": {"vision_tower": cost.tower_flops, "projector": cost.projector_flops,
                      "scoring": cost.scoring_flops, "prefill": cost.prefill_flops, "decode": cost.decode_flops},
            "flops_total": cost.flops_total, "flops_relative": 100 * cost.flops_total / full.flops_total,
            "kv_after_prefill_bytes": cost.kv_bytes_after_prefill, "kv_peak_bytes": cost.kv_peak_bytes,
            "kv_relative": 100 * cost.kv_peak_bytes / full.kv_peak_bytes,
            "workload": dataclasses.asdict(workload),
        }
        if cost.image is not None:
            row["image"] = {"vision_tokens": cost.image.vision_tokens, "grids": [list(g) for g in cost.image.grids],
                            "newline_tokens": cost.image.newline_tokens, "tower_inputs": len(cost.image.tower_inputs),
                            "resized": list(cost.image.resized) if cost.image.resized else None}
        if gpu_memory_gb:
            capacity = serving_capacity(shape, cost, workload, gpu_memory_gb * 1e9,
                                        bandwidth_bytes_per_s=bandwidth_gbs * 1e9 if bandwidth_gbs else None)
            row["serving"] = dataclasses.asdict(capacity)
        rows.append(row)
    return rows, errors


CONVENTION = ("FLOPs: 2 per multiply-add, dense matrix products (attention over the full q x kv rectangle; a "
              "windowed vision layer within each window), tower + projector + scoring + prefill (last-position "
              "logits) + decode; KV: keys and values of every layer at the peak (prompt + all generated tokens but "
              "the last); budget = mean vision tokens per decoder layer, budget fraction = that mean over each "
              "image's (grid's) own vision tokens (adsc_patch.profile)")


def markdown(rows: list[dict]) -> str:
    serving = "serving" in rows[0]
    head = ["method", "budget", "budget fraction", "mean vision tokens", "kept after last stage", "TFLOPs", "rel. (%)",
            "of which tower", "KV peak (MB)", "rel. (%)"] + (["max sequences", "decode tok/s bound"] if serving else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        fraction = r.get("budget_fraction")
        cells = [r["method"], "—" if r["budget"] is None else f"{r['budget']:g}",
                 "—" if fraction is None else f"{fraction:.4g}", f"{r['mean_vision_tokens']:.2f}",
                 str(r["kept_after_last_stage"]), f"{r['flops_total'] / 1e12:.3f}", f"{r['flops_relative']:.1f}",
                 f"{r['flops']['vision_tower'] / 1e12:.3f}", f"{r['kv_peak_bytes'] / 1e6:.1f}",
                 f"{r['kv_relative']:.1f}"]
        if serving:
            rate = r["serving"]["decode_tokens_per_s"]
            cells += [str(r["serving"]["max_sequences"]), "—" if rate is None else f"{rate:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    w = rows[0]["workload"]
    images = f"{w['images']} image(s)"
    image = rows[0].get("image")
    if image is not None:
        grids = " + ".join(f"{a}x{b}" for a, b in image["grids"])
        size = f" of {w['image_width']}x{w['image_height']} px" if w.get("image_width") else ""
        newlines = f" + {image['newline_tokens']} newline" if image["newline_tokens"] else ""
        images += f"{size}, {image['vision_tokens']} vision tokens each (grids {grids}{newlines})"
    lines += ["", f"Workload: {w['text_tokens']} text tokens, {images}, {w['new_tokens']} generated "
              f"tokens, batch {w['batch']}, {w['bytes_per_value']}-byte KV values. {CONVENTION}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m adsc_patch.profile", description="Analytic FLOPs and KV cache "
                                     "of a multimodal LLM under every pruning method (no weights needed).")
    parser.add_argument("--model", default="llava-1.5-7b", help=f"a preset ({', '.join(PRESETS)}) or a config path")
    parser.add_argument("--method", default=None, help="comma-separated methods (adsc,fastv,pdrop,tome,visionzip,"
                        "pool; default: the checkpoint's recorded method, else adsc)")
    parser.add_argument("--budgets", default=None, help="comma-separated mean vision tokens per layer (default "
                        "192,128,64 unless --budget-fractions is given; per image where images differ in size)")
    parser.add_argument("--budget-fractions", default=None, help="comma-separated fractions of each image's own "
                        "vision tokens, e.g. 0.5,0.333")
    parser.add_argument("--image-size", default=None, help="WIDTHxHEIGHT of every image in pixels (needed by "
                        "Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT and LLaVA-OneVision), e.g. 1024x768")
    parser.add_argument("--min-pixels", type=int, default=None, help="Qwen: the processor's min_pixels (default: "
                        "the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=None, help="Qwen: the processor's max_pixels")
    parser.add_argument("--prune-layers", default=None, help="comma-separated (default: the checkpoint's recorded "
                        "layers where they fit each method, else each method's own)")
    parser.add_argument("--text-tokens", type=int, default=TABLE_IV_WORKLOAD.text_tokens)
    parser.add_argument("--images", type=int, default=TABLE_IV_WORKLOAD.images)
    parser.add_argument("--new-tokens", type=int, default=TABLE_IV_WORKLOAD.new_tokens)
    parser.add_argument("--batch", type=int, default=TABLE_IV_WORKLOAD.batch)
    parser.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="bf16", help="of the KV cache and weights")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="add the paged-KV capacity of one GPU")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth, for the decode bound")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    from .methods import PRUNE_METHODS

    try:
        shape = load_shape(args.model)
        if args.min_pixels is not None or args.max_pixels is not None:
            if not isinstance(shape.resolution, SmartResize):
                raise ValueError(f"--min-pixels / --max-pixels: {args.model} has no Qwen image processor")
            shape = dataclasses.replace(shape, resolution=SmartResize(
                args.min_pixels or shape.resolution.min_pixels, args.max_pixels or shape.resolution.max_pixels))
        recorded_method, recorded_layers = load_recorded_schedule(args.model)
        methods = [m for m in (args.method or recorded_method or "adsc").split(",") if m]
        unknown = [m for m in methods if m not in PRUNE_METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; known: {', '.join(PRUNE_METHODS)}")
        budgets_text = args.budgets if args.budgets is not None or args.budget_fractions else "192,128,64"
        budgets = [float(b) for b in (budgets_text or "").split(",") if b]
        fractions = [float(f) for f in (args.budget_fractions or "").split(",") if f]
        layers = None if args.prune_layers is None else [int(x) for x in args.prune_layers.split(",") if x]
        width, height = parse_image_size(args.image_size) if args.image_size else (None, None)
        workload = Workload(args.text_tokens, args.images, args.new_tokens, args.batch, _DTYPE_BYTES[args.dtype],
                            width, height)
        rows, errors = _rows(shape, methods, budgets, workload, layers, args.gpu_memory_gb, args.bandwidth_gbs,
                             recorded_layers, fractions)
    except ValueError as error:  # ScheduleError included
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(rows, indent=1) if args.json else markdown(rows), end="" if not args.json else "\n")
    if errors:  # every reachable row is printed above; each unreachable one in a line of its own
        parser.exit(2, "".join(line + "\n" for line in errors))
    return rows


if __name__ == "__main__":
    main()
