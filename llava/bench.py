"""Measured efficiency of every pruning method beside its analytic cost: ``python -m llava.bench``.

In ONE process and one run, for the full model and every method at every budget:

* ``prefill_ms``: the language model's prefill (spliced prompt in, last-position logits
  out), median of ``--repeats`` after a warm-up, device-synchronised; the repeats go round
  all settings in turn, so load bursts on a shared machine hit every setting alike;
* ``ttft_ms``: time to first token (vision tower + projector + splice + prefill + logits);
* ``decode_tokens_per_s``: ``new_tokens - 1`` greedy steps after a prefill, fed one token
  at a time against the cache (batch x steps over their time);
* ``measured_kv_bytes``: bytes of the real cache tensors after those steps, beside
  ``predicted_kv_bytes`` from ``adsc_patch.profile`` (equal-length prompts, so no padding);
* ``peak_memory_bytes``: peak device memory of the generation (CUDA only);
* ``train_step_ms`` (``--train-step``): one LoRA step (forward + backward) at the budget;
* ``layer_replay_ms``: one decoder layer timed alone at each layer's sequence length (read
  off the ``PruningTrace``), summed over the layers, in the same rounds: what the prefill
  would cost if the loop added nothing, on this machine's own cost per layer and length.
  ``outside_layers_ms`` (prefill minus replay) is the loop, masks, gathers, norm and head;
  the replay's ratio to the full model's is the speed-up this machine can give the
  schedule, which differs from the FLOPs ratio where short sequences run at a lower rate
  (fixed costs per layer call: dispatch on a CPU, kernel launches on a GPU);
* the analytic ratios (prefill FLOPs, time-to-first-token FLOPs) beside the measured ones.

Weights are random at a real model's shape (``--shape llava-1.5-7b``); ``--layers`` and
``--width-scale`` shrink it to fit a small machine while keeping 576 vision tokens and the
prune layers at their relative depths. Writes ``bench.json`` (rows + machine, versions and
settings), ``bench.md`` and ``bench.png`` (time and KV against mean vision tokens, one line
per method). ``--smoke`` runs a tiny shape end to end in seconds.

``--shape qwen2.5-vl-7b`` builds transformers' own ``Qwen2_5_VLForConditionalGeneration`` at
that shape (random weights, directly on the device in ``--dtype``) with one ``--image-size``
image (its grid by the processor's resize rule, ``adsc_patch.profile.image_tokens``) and runs
the full model and adsc / fastv / pdrop at each ``--budget-fractions``: ``ttft_ms`` (the whole
prefill), ``vision_ms`` (tower + merger alone), ``prefill_ms`` (their difference: the language
model's share), ``decode_tokens_per_s`` (from ``generate`` less the prefill), and the cache's
bytes after the prefill and after ``generate`` beside the profile's prediction. With
``--smoke``: a tiny Qwen2.5-VL on the CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

from adsc_patch import IN_LLM_METHODS, PRUNE_METHODS, ScheduleError, compat, get_method
from adsc_patch.cache import cache_nbytes
from adsc_patch.profile import PRESETS, ModelShape, Workload, model_cost, parameter_count

from .cli import InputError, run_command
from .eval.io import write_json_atomic, write_text_atomic

logger = logging.getLogger("llava.bench")

IMAGE_TOKEN = -200
SMOKE = dict(layers=8, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=512, tower_layers=4, tower_hidden=32,
             tower_intermediate=64, tower_heads=2, image_size=24, patch_size=4)  # 36 vision tokens


def _shape_sizes(args) -> dict:
    """Decoder and tower sizes of the run (a preset scaled by ``--layers`` / ``--width-scale``)."""
    if args.smoke:
        return dict(SMOKE)
    shape = PRESETS[args.shape]
    d, t, scale = shape.decoder, shape.tower, args.width_scale
    heads = max(1, round(d.num_heads * scale))
    return dict(layers=args.layers or d.num_layers, hidden=heads * d.head_dim, intermediate=round(d.intermediate_size * scale),
                heads=heads, kv_heads=max(1, round(d.num_kv_heads * scale)), vocab=d.vocab_size,
                tower_layers=t.num_layers, tower_hidden=max(64, round(t.hidden_size * scale / 64) * 64),
                tower_intermediate=round(t.intermediate_size * scale), tower_heads=max(1, round(16 * scale)),
                image_size=t.grid * t.patch_size, patch_size=t.patch_size)


def bench_config(sizes: dict, attention: str):
    """The ``LlavaConfig`` of a random-weight model of these sizes."""
    from transformers import CLIPVisionConfig

    from .model import LlavaConfig

    vision = CLIPVisionConfig(hidden_size=sizes["tower_hidden"], intermediate_size=sizes["tower_intermediate"],
                              num_hidden_layers=sizes["tower_layers"], num_attention_heads=sizes["tower_heads"],
                              image_size=sizes["image_size"], patch_size=sizes["patch_size"])
    config = LlavaConfig(hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                         num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                         num_key_value_heads=sizes["kv_heads"], vocab_size=sizes["vocab"],
                         max_position_embeddings=4096, mm_vision_tower="random-clip",
                         mm_vision_config=vision.to_dict(), mm_hidden_size=vision.hidden_size,
                         mm_projector_type="mlp2x_gelu")
    config._attn_implementation = attention
    return config


def available_memory_bytes(device: str) -> int:
    """Free memory of ``device``: the GPU's free bytes, or the machine's available RAM."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def memory_needed_bytes(sizes: dict, dtype: torch.dtype, batch: int, sequence: int) -> int:
    """About what the bench holds at its peak: the weights as built (float32, then ``dtype``), the
    KV cache and the logits of the largest batch, plus a fifth for activations and allocator slack."""
    shape = ModelShape.from_config(bench_config(sizes, "sdpa"))
    parameters = parameter_count(shape)
    size = torch.finfo(dtype).bits // 8
    weights = parameters * 4 + (parameters * size if dtype != torch.float32 else 0)
    d = shape.decoder
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * batch * sequence * size
    logits = batch * sequence * d.vocab_size * 4
    return int(1.2 * (weights + kv + logits))


def check_memory(sizes: dict, dtype: torch.dtype, device: str, batch: int, sequence: int, shape_name: str) -> None:
    """``InputError`` before anything is built when the run cannot fit, saying what would."""
    needed, free = memory_needed_bytes(sizes, dtype, batch, sequence), available_memory_bytes(device)
    if needed > free:
        raise InputError(
            f"the {shape_name} shape ({sizes['layers']} layers, hidden {sizes['hidden']}) in "
            f"{str(dtype).removeprefix('torch.')} at batch {batch} needs about {needed / 1e9:.1f} GB and {device} has "
            f"{free / 1e9:.1f} GB available: try --smoke (seconds), --width-scale 0.25 or a smaller --batches")


def build_model(sizes: dict, attention: str, dtype: torch.dtype, device: str):
    """A random-weight ``LlavaLlamaForCausalLM`` of these sizes (no checkpoint needed)."""
    from .model import LlavaLlamaForCausalLM

    config = bench_config(sizes, attention)
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.get_vision_tower().vision_tower.config._attn_implementation = "sdpa" if attention != "eager" else "eager"
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, device: str) -> float:
    times = []
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i:  # the first call warms up
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _inputs(model, batch: int, text_tokens: int, device: str):
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, model.config.vocab_size, (batch, text_tokens), generator=generator)
    ids = torch.cat([text[:, :1], torch.full((batch, 1), IMAGE_TOKEN), text[:, 1:]], dim=1).to(device)
    size = model.get_vision_tower().config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device, model.dtype)
    return ids, torch.ones_like(ids), pixels


def _configure(model, method: str | None, budget: float | None) -> None:
    if method is None:
        model.configure_pruning(method="adsc", prune_layers=[], drop_ratio=0.0)
    else:
        model.configure_pruning(method=method, vision_token_budget=budget, prune_layers=None)


class Setting:
    """One (method, budget, batch) on one model: its inputs, built once, and its timed calls."""

    def __init__(self, model, shape: ModelShape, method: str | None, budget: float | None, batch: int, args):
        self.model, self.shape, self.method, self.budget, self.batch, self.args = model, shape, method, budget, batch, args
        self.ids, self.mask, self.pixels = _inputs(model, batch, args.text_tokens, args.device)
        self.apply()
        with torch.inference_mode():
            self.spliced = model.prepare_inputs_labels_for_multimodal(self.ids, self.mask, None, self.pixels)
        self.prefill_times: list[float] = []
        self.ttft_times: list[float] = []
        self.layer_lengths: list[int] = []

    def read_layer_lengths(self) -> None:
        """Each decoder layer's sequence length in the last prefill (its trace, if it pruned)."""
        decoder = self.model.model
        trace = self.model.pruning_trace if decoder.adsc_plan().enabled else None
        length = self.spliced.inputs_embeds.shape[1]
        self.layer_lengths = list(trace.padded_length_per_layer) if trace is not None else \
            [length] * decoder.config.num_hidden_layers

    def apply(self) -> None:
        _configure(self.model, self.method, self.budget)

    def prefill(self):
        s = self.spliced
        out = self.model.model(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                               vision_mask=s.vision_mask, use_cache=True)
        return self.model.lm_head(out.last_hidden_state[:, -1:]), compat.output_cache(out)

    def first_token(self):
        return self.model(input_ids=self.ids, attention_mask=self.mask, images=self.pixels, use_cache=True,
                          logits_to_keep=1)

    def decode_ms(self) -> tuple[float, int]:
        """Wall time of the ``new_tokens - 1`` steps after a prefill, and the cache's bytes after them."""
        logits, cache = self.prefill()
        token = logits[:, -1].argmax(-1, keepdim=True)
        mask = self.spliced.attention_mask
        _sync(self.args.device)
        start = time.perf_counter()
        for _ in range(self.args.new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=token, attention_mask=mask, use_cache=True, **compat.cache_kwargs(cache))
            cache = compat.output_cache(out)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(self.args.device)
        return 1000 * (time.perf_counter() - start), cache_nbytes(cache)


class LayerReplay:
    """One decoder layer timed alone at given (batch, length), for ``layer_replay_ms``.

    The input is what a stage's layer sees in a prefill of equal-length prompts: random
    hidden states, the rotary embeddings of positions ``0..T-1`` and the causal mask of the
    model's attention backend, no cache (a prefill's cache write is a copy of K and V).
    """

    CALLS = 4  # back-to-back calls per timing, so a short layer is above the timer's noise

    def __init__(self, model, device: str):
        from transformers.masking_utils import create_causal_mask

        self.decoder, self.device = model.model, device
        self.layer = self.decoder.layers[0]
        self._create_mask = create_causal_mask
        self.inputs: dict[tuple[int, int], tuple] = {}
        self.times: dict[tuple[int, int], list[float]] = {}

    def add(self, batch: int, lengths) -> None:
        for length in set(lengths):
            key = (batch, length)
            if key in self.inputs:
                continue
            generator = torch.Generator().manual_seed(length)
            hidden = torch.randn(batch, length, self.decoder.config.hidden_size, generator=generator)
            hidden = hidden.to(self.device, self.decoder.embed_tokens.weight.dtype)
            positions = torch.arange(length, device=self.device).expand(batch, -1)
            mask = self._create_mask(config=self.decoder.config, inputs_embeds=hidden,
                                     attention_mask=torch.ones(batch, length, dtype=torch.bool, device=self.device),
                                     position_ids=positions, **compat.cache_kwargs(None))
            self.inputs[key] = (hidden, mask, self.decoder.rotary_emb(hidden, position_ids=positions))
            self.times[key] = []
            self._call(key)  # warm-up

    def _call(self, key) -> None:
        hidden, mask, rotary = self.inputs[key]
        for _ in range(self.CALLS):
            self.layer(hidden, attention_mask=mask, position_embeddings=rotary)

    def time_round(self) -> None:
        for key in self.inputs:
            self.times[key].append(_timed(lambda: self._call(key), self.device) / self.CALLS)

    def total_ms(self, batch: int, lengths) -> float:
        """Sum over the layers of the median time of one layer at that layer's length."""
        median = {length: statistics.median(self.times[(batch, length)]) for length in set(lengths)}
        return sum(median[length] for length in lengths)


def _timed(fn, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return 1000 * (time.perf_counter() - start)


def measure_all(settings: list[Setting], args, bar) -> list[dict]:
    """Time every setting; the repeats go round all settings in turn, each round from another
    start, so a burst of load on a shared machine, or what the previous setting left in the
    caches and the allocator, lands on every setting alike (ratios are read within one run)."""
    device = args.device
    rows = []
    replay = LayerReplay(settings[0].model, device)
    with torch.inference_mode():
        for setting in settings:  # warm-up, the cache and the decode
            setting.apply()
            setting.prefill()
            setting.read_layer_lengths()
            replay.add(setting.batch, setting.layer_lengths)
            setting.first_token()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            setting.decode_time, setting.measured_kv = setting.decode_ms()
            setting.peak_memory = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
        for round_ in range(args.repeats):
            start = round_ % len(settings)  # each round starts elsewhere: no setting always follows the same one
            for setting in settings[start:] + settings[:start]:
                setting.apply()
                setting.prefill_times.append(_timed(setting.prefill, device))
                setting.ttft_times.append(_timed(setting.first_token, device))
            replay.time_round()
    for setting in settings:
        setting.apply()
        method, budget, batch, model = setting.method, setting.budget, setting.batch, setting.model
        workload = Workload(args.text_tokens, 1, args.new_tokens, batch, torch.finfo(model.dtype).bits // 8)
        cost = model_cost(setting.shape, method, budget, workload)
        steps = args.new_tokens - 1
        row = {
            "method": method or "full", "budget": budget, "batch": batch,
            "attention": model.config._attn_implementation,
            "mean_vision_tokens": cost.mean_vision_tokens, "kept_after_last_stage": cost.kept_after_last_stage,
            "prefill_ms": statistics.median(setting.prefill_times), "ttft_ms": statistics.median(setting.ttft_times),
            "layer_lengths": setting.layer_lengths, "layer_replay_ms": replay.total_ms(batch, setting.layer_lengths),
            "decode_tokens_per_s": batch * steps / (setting.decode_time / 1000) if steps else None,
            "measured_kv_bytes": setting.measured_kv, "predicted_kv_bytes": cost.kv_peak_bytes,
            "peak_memory_bytes": setting.peak_memory,
            "prefill_flops": cost.prefill_flops + cost.scoring_flops,
            "ttft_flops": cost.tower_flops + cost.projector_flops + cost.scoring_flops + cost.prefill_flops,
        }
        if args.train_step:
            row["train_step_ms"] = _train_step_ms(model, method, setting.ids, setting.mask, setting.pixels, args)
        rows.append(row)
        bar.update()
    return rows


def _train_step_ms(model, method, ids, mask, pixels, args) -> float:
    """One LoRA step (forward + backward) with the answer as the last quarter of the text."""
    from peft import LoraConfig, get_peft_model

    labels = ids.clone()
    labels[:, : ids.shape[1] - max(1, args.text_tokens // 4)] = -100
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with compat.peft_without_alias_warnings():
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                exclude_modules=r".*vision_tower.*"))
    lora.train()

    def step():
        loss = lora(input_ids=ids, attention_mask=mask, images=pixels, labels=labels, use_cache=False).loss
        loss.backward()
        lora.zero_grad(set_to_none=True)

    try:
        return _median_ms(step, max(1, args.repeats // 2), args.device)
    finally:
        lora.unload()
        model.eval()


def add_ratios(rows: list[dict]) -> None:
    """Each row's measured and analytic ratios to the full model of its batch and attention."""
    full = {(r["batch"], r["attention"]): r for r in rows if r["method"] == "full"}
    for r in rows:
        base = full[(r["batch"], r["attention"])]
        r["prefill_relative"] = 100 * r["prefill_ms"] / base["prefill_ms"]
        r["prefill_analytic_relative"] = 100 * r["prefill_flops"] / base["prefill_flops"]
        # how much of the analytic speed-up the measurement reaches (100: all of it)
        gain, limit = base["prefill_ms"] / r["prefill_ms"], base["prefill_flops"] / r["prefill_flops"]
        r["prefill_speedup"], r["prefill_speedup_of_analytic"] = gain, 100 * (gain - 1) / (limit - 1) if limit > 1 else None
        r["layer_replay_relative"] = 100 * r["layer_replay_ms"] / base["layer_replay_ms"]
        r["outside_layers_ms"] = r["prefill_ms"] - r["layer_replay_ms"]
        r["ttft_relative"] = 100 * r["ttft_ms"] / base["ttft_ms"]
        r["ttft_analytic_relative"] = 100 * r["ttft_flops"] / base["ttft_flops"]
        r["kv_relative"] = 100 * r["measured_kv_bytes"] / base["measured_kv_bytes"]
        if "train_step_ms" in r:
            r["train_step_relative"] = 100 * r["train_step_ms"] / base["train_step_ms"]


def markdown(rows: list[dict], header: dict) -> str:
    cols = ["attention", "batch", "method", "budget", "mean vision tokens", "prefill ms", "rel. (%)",
            "analytic (%)", "of analytic speed-up (%)", "layer replay (%)", "outside layers ms", "TTFT ms", "rel. (%)",
            "analytic (%)", "decode tok/s", "KV MB (measured = predicted)", "rel. (%)"]
    train = any("train_step_ms" in r for r in rows)
    if train:
        cols += ["train step ms", "rel. (%)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]

    def num(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    for r in rows:
        same = "=" if r["measured_kv_bytes"] == r["predicted_kv_bytes"] else "!="
        cells = [r["attention"], str(r["batch"]), r["method"], num(r["budget"], "{:g}"), num(r["mean_vision_tokens"]),
                 num(r["prefill_ms"]), num(r["prefill_relative"]), num(r["prefill_analytic_relative"]),
                 num(r["prefill_speedup_of_analytic"], "{:.0f}"), num(r["layer_replay_relative"]),
                 num(r["outside_layers_ms"], "{:+.0f}"), num(r["ttft_ms"]), num(r["ttft_relative"]),
                 num(r["ttft_analytic_relative"]), num(r["decode_tokens_per_s"]),
                 f"{r['measured_kv_bytes'] / 1e6:.2f} {same}", num(r["kv_relative"])]
        if train:
            cells += [num(r.get("train_step_ms")), num(r.get("train_step_relative"))]
        lines.append("| " + " | ".join(cells) + " |")
    h = header
    lines += ["", f"{h['shape']}, {h['dtype']} on {h['device_name']}; {h['text_tokens']} text tokens + one image, "
              f"{h['new_tokens']} generated tokens; medians of {h['repeats']} after a warm-up; torch "
              f"{h['versions']['torch']}, transformers {h['versions']['transformers']}. `python -m llava.bench "
              f"{h['argv']}`"]
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = rows[0]
    chosen = [r for r in rows if r["batch"] == first["batch"] and r["attention"] == first["attention"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_method: dict[str, list] = {}
    for r in chosen:
        by_method.setdefault(r["method"], []).append(r)
    for method, points in by_method.items():
        points.sort(key=lambda r: r["mean_vision_tokens"])
        x = [p["mean_vision_tokens"] for p in points]
        marker = "*" if method == "full" else "o"
        left.plot(x, [p["prefill_ms"] for p in points], marker=marker, label=method)
        right.plot(x, [p["measured_kv_bytes"] / 1e6 for p in points], marker=marker, label=method)
    left.set(xlabel="mean vision tokens per layer", ylabel="prefill (ms)",
             title=f"prefill, batch {first['batch']}, {first['attention']}")
    right.set(xlabel="mean vision tokens per layer", ylabel="KV cache after generation (MB)", title="KV cache")
    left.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- Qwen2.5-VL (transformers' class)
QWEN_SHAPES = ("qwen2.5-vl-7b",)
QWEN_SMOKE = dict(layers=8, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512, mrope_section=[2, 3, 3],
                  tower_layers=4, tower_hidden=32, tower_intermediate=48, tower_heads=2, patch_size=4,
                  window_size=16, full_attention_layers=[1, 3], out_hidden=64)


def qwen_sizes(args) -> dict:
    """The Qwen2.5-VL run's sizes: the preset's (decoder layers by ``--layers``), or the smoke's."""
    if args.smoke:
        return dict(QWEN_SMOKE)
    if args.width_scale != 1.0:
        raise InputError(f"--width-scale: the {args.shape} bench runs the real widths (use --layers to shrink it)")
    shape = PRESETS[args.shape]
    d, t = shape.decoder, shape.tower
    return dict(layers=args.layers or d.num_layers, hidden=d.hidden_size, intermediate=d.intermediate_size,
                heads=d.num_heads, kv_heads=d.num_kv_heads, vocab=d.vocab_size, mrope_section=[16, 24, 24],
                tower_layers=t.num_layers, tower_hidden=t.hidden_size, tower_intermediate=t.intermediate_size,
                tower_heads=16, patch_size=t.patch_size, window_size=t.window_size,
                full_attention_layers=list(t.full_attention_layers), out_hidden=shape.projector.out_features)


def qwen_config(sizes: dict, attention: str):
    """The ``Qwen2_5_VLConfig`` of a random-weight model of these sizes (image token ids at the
    top of the vocabulary)."""
    from transformers import Qwen2_5_VLConfig

    vocab = sizes["vocab"]
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                         num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
                         num_key_value_heads=sizes["kv_heads"], max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": sizes["mrope_section"]},
                         bos_token_id=None, eos_token_id=None, pad_token_id=0),
        vision_config=dict(depth=sizes["tower_layers"], hidden_size=sizes["tower_hidden"],
                           intermediate_size=sizes["tower_intermediate"], num_heads=sizes["tower_heads"],
                           out_hidden_size=sizes["out_hidden"], patch_size=sizes["patch_size"], spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, window_size=sizes["window_size"],
                           fullatt_block_indexes=sizes["full_attention_layers"]),
        image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1,
    )
    config._attn_implementation = attention
    return config


def build_qwen_model(sizes: dict, attention: str, dtype: torch.dtype, device: str):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration``, built on ``device`` in ``dtype``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(sizes, attention), dtype=dtype)
    return model.eval()


def qwen_memory_needed_bytes(shape: ModelShape, dtype: torch.dtype, batch: int, sequence: int) -> int:
    """Weights (built in ``dtype``), the KV cache of the largest batch, plus a fifth for the
    activations (the tower's included) and allocator slack."""
    size = torch.finfo(dtype).bits // 8
    d = shape.decoder
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_dim * batch * sequence * size
    return int(1.2 * (parameter_count(shape) * size + kv))


class QwenSetting:
    """One (method, budget fraction, batch) on a Qwen2.5-VL model: ``batch`` identical prompts of
    ``text_tokens`` text tokens around one image (its patches random, its grid the profile's)."""

    def __init__(self, model, shape: ModelShape, method: str | None, fraction: float | None, batch: int, args,
                 image_size: tuple[int, int]):
        from adsc_patch import PruningSpec
        from adsc_patch.profile import image_tokens

        self.model, self.shape, self.method, self.fraction, self.batch, self.args = (
            model, shape, method, fraction, batch, args)
        self.spec = None if method is None else PruningSpec(method, budget_fraction=fraction)
        config = model.config
        image = image_tokens(shape, *image_size)
        (rows, cols), = image.tower_inputs
        generator = torch.Generator().manual_seed(1)
        text = torch.randint(3, config.image_token_id, (batch, args.text_tokens), generator=generator)
        start, end = (torch.full((batch, 1), token) for token in (config.vision_start_token_id,
                                                                   config.vision_end_token_id))
        ids = torch.cat([text[:, :1], start, torch.full((batch, image.vision_tokens), config.image_token_id), end,
                         text[:, 1:]], dim=1).to(args.device)
        patch = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
        self.inputs = dict(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            pixel_values=torch.randn(batch * rows * cols, patch, generator=generator).to(args.device, model.dtype),
            image_grid_thw=torch.tensor([[1, rows, cols]] * batch, device=args.device),
            mm_token_type_ids=(ids == config.image_token_id).int())
        self.workload = Workload(ids.shape[1] - image.vision_tokens, 1, args.new_tokens, batch,
                                 torch.finfo(model.dtype).bits // 8, *image_size)
        self.image = image
        self.ttft_times: list[float] = []
        self.vision_times: list[float] = []

    def session(self):
        """The pruning of this setting (a no-op context for the full model)."""
        import contextlib

        from adsc_patch import pruning

        return contextlib.nullcontext() if self.spec is None else pruning(self.model, self.spec)

    def first_token(self):
        """The whole prefill: tower, merger, splice, decoder, the last position's logits."""
        with self.session():
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def vision(self):
        inputs = self.inputs
        return self.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])

    def generate_ms(self) -> tuple[float, int]:
        """Wall time of ``generate`` of ``new_tokens`` and the bytes of its cache after them."""
        with self.session():
            _sync(self.args.device)
            start = time.perf_counter()
            out = self.model.generate(**self.inputs, max_new_tokens=self.args.new_tokens,
                                      min_new_tokens=self.args.new_tokens, do_sample=False,
                                      return_dict_in_generate=True)
            _sync(self.args.device)
        return 1000 * (time.perf_counter() - start), cache_nbytes(compat.output_cache(out))


def measure_qwen(settings: list[QwenSetting], args, bar) -> list[dict]:
    """Time every setting in rounds (as ``measure_all``); KV bytes after the prefill and after
    ``generate`` beside the profile's prediction for the same prompt."""
    device = args.device
    with torch.inference_mode():
        for setting in settings:  # warm-up; the caches
            setting.measured_kv = cache_nbytes(compat.output_cache(setting.first_token()))
            setting.vision()
            setting.generate_time, setting.measured_peak_kv = setting.generate_ms()
        for round_ in range(args.repeats):
            start = round_ % len(settings)
            for setting in settings[start:] + settings[:start]:
                setting.ttft_times.append(_timed(setting.first_token, device))
                setting.vision_times.append(_timed(setting.vision, device))
    rows = []
    for setting in settings:
        cost = model_cost(setting.shape, setting.method, None, setting.workload, budget_fraction=setting.fraction)
        ttft, vision = statistics.median(setting.ttft_times), statistics.median(setting.vision_times)
        steps, batch = args.new_tokens - 1, setting.batch
        rows.append({
            "method": setting.method or "full", "budget": None, "budget_fraction": setting.fraction, "batch": batch,
            "attention": setting.model.config._attn_implementation,
            "vision_tokens_per_image": setting.image.vision_tokens, "mean_vision_tokens": cost.mean_vision_tokens,
            "kept_after_last_stage": cost.kept_after_last_stage,
            "ttft_ms": ttft, "vision_ms": vision, "prefill_ms": ttft - vision,
            "decode_tokens_per_s": batch * steps / ((setting.generate_time - ttft) / 1000)
            if steps and setting.generate_time > ttft else None,
            "measured_kv_bytes": setting.measured_kv, "predicted_kv_bytes": cost.kv_bytes_after_prefill,
            "measured_peak_kv_bytes": setting.measured_peak_kv, "predicted_peak_kv_bytes": cost.kv_peak_bytes,
            "prefill_flops": cost.prefill_flops + cost.scoring_flops,
            "ttft_flops": cost.tower_flops + cost.projector_flops + cost.scoring_flops + cost.prefill_flops,
        })
        bar.update()
    full = {(r["batch"], r["attention"]): r for r in rows if r["method"] == "full"}
    for r in rows:
        base = full[(r["batch"], r["attention"])]
        for key in ("ttft", "prefill"):
            r[f"{key}_relative"] = 100 * r[f"{key}_ms"] / base[f"{key}_ms"]
            r[f"{key}_analytic_relative"] = 100 * r[f"{key}_flops"] / base[f"{key}_flops"]
        r["kv_relative"] = 100 * r["measured_kv_bytes"] / base["measured_kv_bytes"]
    return rows


def qwen_markdown(rows: list[dict], header: dict) -> str:
    cols = ["attention", "batch", "method", "budget fraction", "mean vision tokens", "TTFT ms", "rel. (%)",
            "analytic (%)", "vision ms", "prefill ms (TTFT - vision)", "rel. (%)", "analytic (%)", "decode tok/s",
            "KV MB after prefill (measured = predicted)", "rel. (%)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]

    def num(x, fmt="{:.1f}"):
        return "—" if x is None else fmt.format(x)

    for r in rows:
        same = "=" if r["measured_kv_bytes"] == r["predicted_kv_bytes"] else "!="
        lines.append("| " + " | ".join([
            r["attention"], str(r["batch"]), r["method"], num(r["budget_fraction"], "{:g}"),
            num(r["mean_vision_tokens"]), num(r["ttft_ms"]), num(r["ttft_relative"]), num(r["ttft_analytic_relative"]),
            num(r["vision_ms"]), num(r["prefill_ms"]), num(r["prefill_relative"]), num(r["prefill_analytic_relative"]),
            num(r["decode_tokens_per_s"]), f"{r['measured_kv_bytes'] / 1e6:.2f} {same}", num(r["kv_relative"])]) + " |")
    h = header
    lines += ["", f"{h['shape']}, {h['dtype']} on {h['device_name']}; {h['text_tokens']} text tokens + one "
              f"{h['image_size']} image, {h['new_tokens']} generated tokens; medians of {h['repeats']} after a "
              f"warm-up; torch {h['versions']['torch']}, transformers {h['versions']['transformers']}. "
              f"`python -m llava.bench {h['argv']}`"]
    return "\n".join(lines) + "\n"


def run_qwen(args, dtype: torch.dtype, argv: list[str]) -> dict:
    """The Qwen2.5-VL bench: full and each in-decoder method at each budget fraction."""
    from adsc_patch.profile import image_tokens, parse_image_size

    methods = _list(args.methods)
    if args.methods == ",".join(PRUNE_METHODS):  # the default: the released in-decoder methods
        methods = [m for m in IN_LLM_METHODS if get_method(m).variant_of is None]
    outside = [m for m in methods if m not in IN_LLM_METHODS]
    if outside:
        raise InputError(f"--methods {outside}: the Qwen2.5-VL patch runs {', '.join(IN_LLM_METHODS)} only")
    fractions = _list(args.budget_fractions, float)
    try:
        image_size = parse_image_size(args.image_size or ("64x64" if args.smoke else "1024x768"))
    except ValueError as error:
        raise InputError(f"--image-size: {error}") from None
    if args.smoke:
        args.repeats, args.new_tokens = 1, min(args.new_tokens, 3)
        args.batches = "1,2" if args.batches == "1,8" else args.batches
    sizes = qwen_sizes(args)
    attentions, batches = _list(args.attention), _list(args.batches, int)
    combos = [(None, None)] + [(m, f) for m in methods for f in fractions]
    rows = []
    with tqdm(total=len(attentions) * len(batches) * len(combos), desc="bench") as bar:
        for attention in attentions:
            shape = ModelShape.from_config(qwen_config(sizes, attention))
            sequence = args.text_tokens + 2 + image_tokens(shape, *image_size).vision_tokens + args.new_tokens
            needed, free = qwen_memory_needed_bytes(shape, dtype, max(batches), sequence), \
                available_memory_bytes(args.device)
            if needed > free:
                raise InputError(f"the {args.shape} shape in {str(dtype).removeprefix('torch.')} at batch "
                                 f"{max(batches)} needs about {needed / 1e9:.1f} GB and {args.device} has "
                                 f"{free / 1e9:.1f} GB available: try --smoke or --layers")
            model = build_qwen_model(sizes, attention, dtype, args.device)
            for batch in batches:
                settings = [QwenSetting(model, shape, m, f, batch, args, image_size) for m, f in combos]
                try:
                    rows += measure_qwen(settings, args, bar)
                except ScheduleError as error:
                    raise InputError(str(error)) from None
            del model
    header = {
        "shape": f"{'smoke qwen2.5-vl' if args.smoke else args.shape} ({sizes['layers']} layers, hidden "
                 f"{sizes['hidden']}; tower {sizes['tower_layers']} x {sizes['tower_hidden']}, "
                 f"{rows[0]['vision_tokens_per_image']} vision tokens)",
        "sizes": sizes, "dtype": str(dtype).removeprefix("torch."), "device": args.device,
        "device_name": _device_name(args.device), "image_size": f"{image_size[0]}x{image_size[1]}",
        "text_tokens": args.text_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "versions": _versions(), "argv": " ".join(argv),
    }
    return _write(args, {"header": header, "rows": rows, "markdown": qwen_markdown(rows, header)})


def _list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-1.5-7b", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--width-scale", type=float, default=1.0, help="scale widths and heads (head size kept)")
    parser.add_argument("--methods", default=",".join(PRUNE_METHODS), help="comma-separated; full is always run")
    parser.add_argument("--budgets", default="192,128,64", help="mean vision tokens per decoder layer")
    parser.add_argument("--budget-fractions", default="0.5,0.333", help=f"{', '.join(QWEN_SHAPES)}: fractions of "
                        "the image's vision tokens (the model's budget_fraction)")
    parser.add_argument("--image-size", default=None, help=f"{', '.join(QWEN_SHAPES)}: WIDTHxHEIGHT of the image "
                        "(default 1024x768; --smoke 64x64)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--attention", default="sdpa", help="comma-separated: eager, sdpa, flash_attention_2")
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--train-step", action="store_true", help="also time one LoRA training step per setting")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape (36 vision tokens), seconds on a CPU")
    parser.add_argument("--out", default="bench", help="folder for bench.json, bench.md, bench.png")
    parser.add_argument("--json", default=None, help="also write the rows to this path")
    return parser


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    methods = _list(args.methods)
    unknown = [m for m in methods if m not in PRUNE_METHODS]
    if unknown:
        raise InputError(f"--methods: unknown {unknown}; known: {', '.join(PRUNE_METHODS)}")
    if args.shape in QWEN_SHAPES:
        return run_qwen(args, dtype, argv)
    if PRESETS[args.shape].resolution is not None:
        raise InputError(f"--shape {args.shape}: the bench builds the LLaVA-1.5 shapes and {', '.join(QWEN_SHAPES)}")
    budgets = _list(args.budgets, float)
    if args.smoke:  # 36 vision tokens: the analogs of 192 / 128 / 64 that 8 layers can reach
        budgets = [18.0, 12.0, 10.0] if budgets == [192, 128, 64] else budgets
        args.repeats, args.new_tokens = 1, min(args.new_tokens, 3)
        args.batches = "1,2" if args.batches == "1,8" else args.batches
    sizes = _shape_sizes(args)
    vision_tokens = (sizes["image_size"] // sizes["patch_size"]) ** 2
    check_memory(sizes, dtype, args.device, max(_list(args.batches, int)),
                 args.text_tokens + vision_tokens + args.new_tokens, "smoke" if args.smoke else args.shape)
    combos = [(None, None)] + [(m, b) for m in methods for b in budgets]
    rows = []
    attentions, batches = _list(args.attention), _list(args.batches, int)
    with tqdm(total=len(attentions) * len(batches) * len(combos), desc="bench") as bar:
        for attention in attentions:
            model = build_model(sizes, attention, dtype, args.device)
            shape = ModelShape.from_config(model.config)
            for batch in batches:
                try:
                    settings = [Setting(model, shape, method, budget, batch, args) for method, budget in combos]
                except ScheduleError as error:
                    raise InputError(str(error)) from None
                bar.set_postfix_str(f"{attention}, batch {batch}")
                rows += measure_all(settings, args, bar)
            del model
    add_ratios(rows)
    header = {
        "shape": f"{'smoke' if args.smoke else args.shape} ({sizes['layers']} layers, hidden {sizes['hidden']}, "
                 f"{sizes['heads']} heads, MLP {sizes['intermediate']}; tower {sizes['tower_layers']} x "
                 f"{sizes['tower_hidden']}, {(sizes['image_size'] // sizes['patch_size']) ** 2} vision tokens)",
        "sizes": sizes, "dtype": str(dtype).removeprefix("torch."), "device": args.device,
        "device_name": _device_name(args.device),
        "text_tokens": args.text_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "versions": _versions(), "argv": " ".join(argv),
    }
    return _write(args, {"header": header, "rows": rows, "markdown": markdown(rows, header)})


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__}


def _write(args, summary: dict) -> dict:
    """``bench.json``, ``bench.md``, ``bench.png`` (and ``--json``) under ``--out``; prints the table."""
    rows = summary["rows"]
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "bench.json"), summary)
    write_text_atomic(os.path.join(args.out, "bench.md"), summary["markdown"])
    plot(os.path.join(args.out, "bench.png"), rows)
    if args.json:
        write_json_atomic(args.json, rows)
    print(summary["markdown"])
    return summary


if __name__ == "__main__":
    run_command(main)
