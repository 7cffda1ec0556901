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

Reads the schedule, never recomputes it. ``python -m adsc_patch.profile`` prints the
cost of any method and budget for a preset or a config (``--help``), with a capacity
model of a paged KV cache for serving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from .methods import get_method
from .schedule import VisionSchedule

__all__ = [
    "CLIP_VIT_L_336", "LLAVA_15_7B", "LLAVA_15_13B", "PRESETS", "TABLE_IV_WORKLOAD", "DecoderShape", "GenerationCost",
    "ModelCost", "ModelShape", "ProjectorShape", "VisionTowerShape", "Workload", "generation_cost", "kv_cache_bytes",
    "layer_flops", "load_shape", "model_cost", "schedule_cost", "parameter_count", "projector_flops", "scoring_flops",
    "serving_capacity", "ServingCapacity", "tokens_per_layer", "tower_flops",
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
    """A CLIP ViT as LLaVA runs it: ``num_layers`` layers on ``1 + grid**2`` tokens (CLS first),
    after a ``patch_size`` x ``patch_size`` convolution of ``channels`` input channels. LLaVA reads
    the features at ``select_layer``, and the layers after it do not run (``adsc_patch.tower``)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    grid: int
    patch_size: int
    select_layer: int = -2
    channels: int = 3

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def layers_to_feature(self) -> int:
        return self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer


@dataclass(frozen=True)
class ProjectorShape:
    """``linear`` (one matrix) or ``mlp2x_gelu`` (two) from the tower's width to the decoder's."""

    in_features: int
    out_features: int
    depth: int = 2


@dataclass(frozen=True)
class ModelShape:
    decoder: DecoderShape
    tower: VisionTowerShape
    projector: ProjectorShape

    @classmethod
    def from_config(cls, config, vision_config=None) -> "ModelShape":
        """From a ``LlavaConfig`` (ours: the tower from ``vision_config``, else ``mm_vision_config``)
        or transformers' ``LlavaConfig``."""
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


CLIP_VIT_L_336 = VisionTowerShape(24, 1024, 4096, 24, 14)
PRESETS = {
    "llava-1.5-7b": ModelShape(LLAVA_15_7B, CLIP_VIT_L_336, ProjectorShape(1024, 4096)),
    "llava-1.5-13b": ModelShape(LLAVA_15_13B, CLIP_VIT_L_336, ProjectorShape(1024, 5120)),
}


@dataclass(frozen=True)
class Workload:
    """What one request does: ``text_tokens`` of prompt (image markers excluded), ``images``,
    ``new_tokens`` generated (the first from the prefill), ``batch`` identical requests, and
    ``bytes_per_value`` of the KV cache (2: bf16/fp16).

    The default is the workload that reproduces the ADSC paper's Table IV (LLaVA-1.5-7B,
    relative FLOPs and KV at 192 / 128 / 64 within 0.85 points): a 60-token prompt and 53
    generated tokens (``docs/efficiency.md``)."""

    text_tokens: int = 60
    images: int = 1
    new_tokens: int = 53
    batch: int = 1
    bytes_per_value: int = 2


TABLE_IV_WORKLOAD = Workload()


def tower_flops(tower: VisionTowerShape, tokens_per_layer: Sequence[int]) -> int:
    """FLOPs of one image through the tower: the patch convolution, then each layer's q/k/v/o,
    full (bidirectional) attention and 2-matrix MLP on ``tokens_per_layer[l]`` tokens."""
    d, m = tower.hidden_size, tower.intermediate_size
    flops = 2 * tower.num_patches * tower.channels * tower.patch_size ** 2 * d
    for n in tokens_per_layer:
        flops += 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * m
    return flops


def projector_flops(projector: ProjectorShape, tokens: int) -> int:
    """FLOPs of the projector on ``tokens`` features (its first matrix widens to the decoder's width)."""
    out = projector.out_features
    return 2 * tokens * (projector.in_features * out + (projector.depth - 1) * out * out)


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
    """Analytic cost of one workload under one method and budget (FLOPs for the whole batch)."""

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

    @property
    def flops_total(self) -> int:
        return self.tower_flops + self.projector_flops + self.scoring_flops + self.prefill_flops + self.decode_flops

    @property
    def language_model_flops(self) -> int:
        """The language model's share: prefill, decode and a score-based method's ranking rows."""
        return self.prefill_flops + self.decode_flops + self.scoring_flops


def model_cost(shape: ModelShape, method: str | None, budget: float | None, workload: Workload = TABLE_IV_WORKLOAD,
               prune_layers: Sequence[int] | None = None) -> ModelCost:
    """Cost of ``workload`` on ``shape`` under ``method`` at ``budget`` (``method=None``: full).

    Schedules come from ``adsc_patch.solve.solve_method`` (the solver the model uses); the
    cost of a solved schedule is ``schedule_cost``'s."""
    from .solve import solve_method

    if method is None:
        return schedule_cost(shape, None, None, workload, budget=budget)
    tower = shape.tower
    solved = solve_method(method, budget, shape.decoder.num_layers, (tower.grid, tower.grid),
                          tower.layers_to_feature, prune_layers)
    return schedule_cost(shape, method, solved.schedule, workload, pre_llm=solved.pre_llm, budget=budget)


def schedule_cost(shape: ModelShape, method: str | None, schedule: VisionSchedule | None,
                  workload: Workload = TABLE_IV_WORKLOAD, pre_llm=None, budget: float | None = None) -> ModelCost:
    """Cost of ``workload`` on ``shape`` under an already resolved per-image ``schedule`` of
    ``method`` (``None``: full; a pre-LLM method also gives its ``PreLlmPlan``): the one cost
    model the profiler, the bench, the demo and the playground's report read.

    The tower runs the method's ``tower_tokens_per_layer`` (ToMe's merges layer by layer up
    to the feature layer), the projector the tokens it hands on, the decoder the schedule;
    score-based methods add their attention rows (``scoring_flops``)."""
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
            per_layer = schedule.tokens_per_layer

            def before_drop(prune_layer: int) -> int:  # the tokens the ranking query sees
                ranked_at = rule.score_layer(prune_layer)
                return per_layer[ranked_at] if ranked_at < prune_layer else (
                    per_layer[prune_layer - 1] if prune_layer else n)

            score_at = [workload.text_tokens + images * before_drop(p) for p in schedule.prune_layers]
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


def parameter_count(shape: ModelShape) -> int:
    """Weights of the whole model (decoder with embeddings and head, tower, projector)."""
    d, heads, kv_heads, hd = shape.decoder.hidden_size, shape.decoder.num_heads, shape.decoder.num_kv_heads, shape.decoder.head_dim
    layer = d * (heads * hd + 2 * kv_heads * hd) + heads * hd * d + 3 * d * shape.decoder.intermediate_size + 2 * d
    decoder = shape.decoder.num_layers * layer + 2 * shape.decoder.vocab_size * d + d
    t = shape.tower
    tower_layer = 4 * t.hidden_size * (t.hidden_size + 1) + 2 * t.hidden_size * t.intermediate_size + 4 * t.hidden_size
    tower = t.num_layers * tower_layer + t.channels * t.patch_size ** 2 * t.hidden_size + (t.num_patches + 2) * t.hidden_size
    p = shape.projector
    projector = p.in_features * p.out_features + (p.depth - 1) * p.out_features ** 2 + p.depth * p.out_features
    return decoder + tower + projector


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
    """A preset name (``llava-1.5-7b``, ``llava-1.5-13b``) or a checkpoint folder / ``config.json``
    (ours with ``mm_vision_config``, or llava-hf's)."""
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
          recorded_layers=()) -> tuple[list[dict], list[str]]:
    """The rows of every reachable (method, budget), and one error line per unreachable one.
    ``prune_layers`` (given) applies to every method; else a recorded schedule's layers where
    they fit each method (``solve.recorded_prune_layers_for``), else each method's defaults."""
    from .schedule import ScheduleError
    from .solve import recorded_prune_layers_for

    full = model_cost(shape, None, None, workload)
    settings = [(None, None)] + [(m, b) for m in methods for b in budgets]
    rows, errors = [], []
    for method, budget in settings:
        layers = prune_layers
        if method is not None and layers is None and recorded_layers:
            layers = recorded_prune_layers_for(method, recorded_layers, shape.decoder.num_layers)
        try:
            cost = full if method is None else model_cost(shape, method, budget, workload, layers)
        except ScheduleError as error:
            errors.append(f"error: {method} at {budget:g}: {error}")
            continue
        row = {
            "method": cost.method, "budget": budget, "mean_vision_tokens": cost.mean_vision_tokens,
            "kept_after_last_stage": cost.kept_after_last_stage,
            "flops": {"vision_tower": cost.tower_flops, "projector": cost.projector_flops,
                      "scoring": cost.scoring_flops, "prefill": cost.prefill_flops, "decode": cost.decode_flops},
            "flops_total": cost.flops_total, "flops_relative": 100 * cost.flops_total / full.flops_total,
            "kv_after_prefill_bytes": cost.kv_bytes_after_prefill, "kv_peak_bytes": cost.kv_peak_bytes,
            "kv_relative": 100 * cost.kv_peak_bytes / full.kv_peak_bytes,
            "workload": dataclasses.asdict(workload),
        }
        if gpu_memory_gb:
            capacity = serving_capacity(shape, cost, workload, gpu_memory_gb * 1e9,
                                        bandwidth_bytes_per_s=bandwidth_gbs * 1e9 if bandwidth_gbs else None)
            row["serving"] = dataclasses.asdict(capacity)
        rows.append(row)
    return rows, errors


CONVENTION = ("FLOPs: 2 per multiply-add, dense matrix products (attention over the full q x kv rectangle), "
              "tower + projector + scoring + prefill (last-position logits) + decode; KV: keys and values of "
              "every layer at the peak (prompt + all generated tokens but the last); budget = mean vision "
              "tokens per decoder layer (adsc_patch.profile)")


def markdown(rows: list[dict]) -> str:
    serving = "serving" in rows[0]
    head = ["method", "budget", "mean vision tokens", "kept after last stage", "TFLOPs", "rel. (%)",
            "of which tower", "KV peak (MB)", "rel. (%)"] + (["max sequences", "decode tok/s bound"] if serving else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], "—" if r["budget"] is None else f"{r['budget']:g}", f"{r['mean_vision_tokens']:.2f}",
                 str(r["kept_after_last_stage"]), f"{r['flops_total'] / 1e12:.3f}", f"{r['flops_relative']:.1f}",
                 f"{r['flops']['vision_tower'] / 1e12:.3f}", f"{r['kv_peak_bytes'] / 1e6:.1f}", f"{r['kv_relative']:.1f}"]
        if serving:
            rate = r["serving"]["decode_tokens_per_s"]
            cells += [str(r["serving"]["max_sequences"]), "—" if rate is None else f"{rate:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    w = rows[0]["workload"]
    lines += ["", f"Workload: {w['text_tokens']} text tokens, {w['images']} image(s), {w['new_tokens']} generated "
              f"tokens, batch {w['batch']}, {w['bytes_per_value']}-byte KV values. {CONVENTION}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m adsc_patch.profile", description="Analytic FLOPs and KV cache "
                                     "of LLaVA under every pruning method (no weights needed).")
    parser.add_argument("--model", default="llava-1.5-7b", help=f"a preset ({', '.join(PRESETS)}) or a config path")
    parser.add_argument("--method", default=None, help="comma-separated methods (adsc,fastv,pdrop,tome,visionzip,"
                        "pool; default: the checkpoint's recorded method, else adsc)")
    parser.add_argument("--budgets", default="192,128,64", help="comma-separated mean vision tokens per layer")
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
    from .schedule import ScheduleError

    try:
        shape = load_shape(args.model)
        recorded_method, recorded_layers = load_recorded_schedule(args.model)
        methods = [m for m in (args.method or recorded_method or "adsc").split(",") if m]
        unknown = [m for m in methods if m not in PRUNE_METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; known: {', '.join(PRUNE_METHODS)}")
        budgets = [float(b) for b in args.budgets.split(",") if b]
        layers = None if args.prune_layers is None else [int(x) for x in args.prune_layers.split(",") if x]
        workload = Workload(args.text_tokens, args.images, args.new_tokens, args.batch, _DTYPE_BYTES[args.dtype])
        rows, errors = _rows(shape, methods, budgets, workload, layers, args.gpu_memory_gb, args.bandwidth_gbs,
                             recorded_layers)
    except (ValueError, ScheduleError) as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(rows, indent=1) if args.json else markdown(rows), end="" if not args.json else "\n")
    if errors:  # every reachable row is printed above; each unreachable one in a line of its own
        parser.exit(2, "".join(line + "\n" for line in errors))
    return rows


if __name__ == "__main__":
    main()
