"""Tables and figure of the playground study: the analogs of the paper's Tables I-IV and Figure 2.

Relative scores are the transcription cell accuracy over the full model's (the main task;
the secondary questions are reported but have no target) and the drop is 100 minus the
relative score, as in the paper (``llava.eval.summarize.relative_scores``).
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch

from adsc_patch.profile import ModelShape, Workload, schedule_cost
from llava.eval.io import write_json_atomic, write_text_atomic
from llava.eval.summarize import relative_scores

logger = logging.getLogger("playground")

SECONDARY = ("read", "count", "exist", "locate")
ANSWER_TOKENS = 20  # a transcription: 16 cells, 3 row separators and </s>, one token each


def _model_and_batch(path: str, eval_dir: str, batch: int, device: str):
    """The full model and one batch of transcription prompts, built as the evaluation builds them;
    also the text tokens of one prompt (the image marker excluded)."""
    from argparse import Namespace

    from llava.eval.inference import prompt_batch
    from llava.eval.model_vqa_loader import load_questions
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(path, device=device)
    questions = load_questions(Namespace(question_file=os.path.join(eval_dir, "digitgrid_questions.jsonl")))
    transcriptions = [q for q in questions if q.metadata.get("category") == "transcribe"][:batch]
    input_ids, mask, pixels = prompt_batch(transcriptions, tokenizer, processor, model.config,
                                           os.path.join(eval_dir, "images"), model.config.conv_mode or "vicuna_v1")
    pixels = pixels.to(model.device, model.dtype)
    return model, input_ids.to(model.device), mask.to(model.device), pixels, int(mask[0].sum()) - 1


def _prefill_ms(prefills: dict, on_cuda: bool, repeats: int = 5, prepare=None) -> dict:
    """Median wall time in milliseconds of each of ``prefills`` (key -> callable), after one
    warm-up call of each. The calls are interleaved (every key once per round), so that a
    machine whose speed drifts during the run slows every key alike and the ratios stay fair.
    ``prepare(key)``, if given, runs before each call of that key, outside the timing."""
    times = {key: [] for key in prefills}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for key, prefill in prefills.items():
                if prepare is not None:
                    prepare(key)
                start = time.perf_counter()
                prefill()
                if on_cuda:
                    torch.cuda.synchronize()
                if round_:
                    times[key].append((time.perf_counter() - start) * 1000)
    return {key: statistics.median(values) for key, values in times.items()}


def efficiency(settings: dict, eval_dir: str, batch: int, device: str) -> dict:
    """Per setting: analytic FLOPs (prefill + decode of one transcription) and peak KV cache
    (``adsc_patch.profile``), and the measured median prefill time of one batch of
    transcription prompts; every schedule is timed on the same model, interleaved, in this one run
    (settings that share a schedule, such as a fine-tune and its training-free twin, share
    the measurement)."""
    model, input_ids, mask, pixels, text_tokens = _model_and_batch(settings["full"].path, eval_dir, batch, device)
    shape = ModelShape.from_config(model.config, model.get_vision_tower().config)
    bytes_per_value = torch.finfo(model.dtype).bits // 8

    def configure(setting):
        if setting.schedule is not None:
            model.configure_pruning(**setting.schedule)
            return
        from llava.model import LlavaConfig  # the checkpoint's own schedule (the same architecture as the full model)

        saved = LlavaConfig.from_pretrained(setting.path)
        if saved.prune_layers or saved.vision_token_budget is None:
            model.configure_pruning(prune_layers=saved.prune_layers, drop_ratio=saved.drop_ratio,
                                    method=saved.prune_method, selection=saved.prune_selection)
        else:  # a pre-LLM method: its budget
            model.configure_pruning(prune_layers=[], vision_token_budget=saved.vision_token_budget,
                                    method=saved.prune_method)

    out, key_of, setting_of_key = {}, {}, {}
    for name, setting in settings.items():
        configure(setting)
        schedule = model.vision_schedule()
        key_of[name] = ((model.config.prune_method, model.config.prune_selection, schedule.prune_layers,
                         schedule.stage_tokens) if schedule.enabled else ())
        setting_of_key.setdefault(key_of[name], setting)
        workload = Workload(text_tokens=text_tokens, new_tokens=ANSWER_TOKENS, bytes_per_value=bytes_per_value)
        cost = schedule_cost(shape, model.config.prune_method if schedule.enabled else None, schedule, workload,
                             pre_llm=model.pre_llm_plan())
        out[name] = {
            "average_vision_tokens": schedule.average_tokens,
            "vision_tokens_per_stage": list(schedule.stage_tokens),
            "gflops": cost.language_model_flops / 1e9,
            "prefill_gflops": cost.prefill_flops / 1e9,
            "vision_gflops": (cost.tower_flops + cost.projector_flops) / 1e9,
            "peak_kv_kb": cost.kv_peak_bytes / 2**10,
        }

    def prefill():
        model(input_ids=input_ids, attention_mask=mask, images=pixels, use_cache=True, logits_to_keep=1)

    prefill_ms = _prefill_ms({key: prefill for key in setting_of_key}, input_ids.is_cuda,
                             prepare=lambda key: configure(setting_of_key[key]))
    for name in settings:
        out[name]["prefill_ms"] = prefill_ms[key_of[name]]
    out["_assumptions"] = {
        "text_tokens": text_tokens, "answer_tokens": ANSWER_TOKENS, "batch_for_timing": int(input_ids.shape[0]),
        "bytes_per_value": bytes_per_value, "device": str(model.device),
        "flops": "dense matrix products of the language model, prefill (last-position logits) + decode of the answer "
                 "+ a score-based method's ranking rows; vision: tower + projector (adsc_patch.profile.schedule_cost)",
    }
    return out


def _vlm_spec(setting):
    """The ``PruningSpec`` a transformers-VLM row runs under: its schedule, or what its
    checkpoint recorded (the full model: nothing)."""
    from adsc_patch import PruningSpec
    from llava.model.vlm import read_recorded_spec

    if setting.schedule is None:
        return read_recorded_spec(setting.path) or PruningSpec.off()
    schedule = setting.schedule
    return PruningSpec(method=schedule["method"], budget_fraction=schedule["budget_fraction"],
                       layers=tuple(schedule["prune_layers"]), selection=schedule.get("selection", "uniform_2d"))


def vlm_efficiency(settings: dict, eval_dir: str, batch: int, device: str) -> dict:
    """``efficiency`` on a transformers VLM whose images differ in size: FLOPs, KV and vision
    tokens are the mean over the evaluation transcriptions, each image at its own size under
    its own schedule (``adsc_patch.profile.model_cost`` at the row's fraction); the prefill is
    timed on one batch of transcription prompts (images of mixed size), every spec in one run,
    interleaved."""
    from contextlib import nullcontext

    from PIL import Image

    from adsc_patch.profile import Workload, load_shape, model_cost
    from adsc_patch.session import pruning
    from llava.eval.io import read_jsonl
    from llava.model.vlm import chat_messages, encode_prompts, load_transformers_vlm

    loaded = load_transformers_vlm(settings["full"].path, device=device)
    model = loaded.model
    shape = load_shape(settings["full"].path)
    questions = [q for q in read_jsonl(os.path.join(eval_dir, "digitgrid_questions.jsonl"))
                 if q["category"] == "transcribe"]
    sizes = []
    for question in questions:
        with Image.open(os.path.join(eval_dir, "images", question["image"])) as image:
            sizes.append(image.size)
    timed = questions[:batch]
    images = [[Image.open(os.path.join(eval_dir, "images", q["image"])).convert("RGB")] for q in timed]
    inputs = encode_prompts(loaded, [chat_messages([(q["text"], None)], [1]) for q in timed], images)
    vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    text_tokens = int(inputs["attention_mask"][0].sum()) - vision
    bytes_per_value = torch.finfo(model.dtype).bits // 8

    def prefill_under(spec):
        def prefill():
            with pruning(model, spec) if spec.enabled else nullcontext():
                model(**inputs, use_cache=True, logits_to_keep=1)
        return prefill

    out, key_of, prefills, costs = {}, {}, {}, {}
    for name, setting in settings.items():
        spec = _vlm_spec(setting)
        key = key_of[name] = repr(spec.to_dict()) if spec.enabled else ""
        prefills.setdefault(key, prefill_under(spec))
        per_image = []
        for width, height in sizes:
            if (key, width, height) not in costs:
                workload = Workload(text_tokens=text_tokens, new_tokens=ANSWER_TOKENS, bytes_per_value=bytes_per_value,
                                    image_width=width, image_height=height)
                costs[key, width, height] = model_cost(
                    shape, spec.method if spec.enabled else None, None, workload,
                    prune_layers=spec.layers if spec.enabled else None,
                    budget_fraction=spec.budget_fraction if spec.enabled else None)
            per_image.append(costs[key, width, height])
        out[name] = {
            "average_vision_tokens": statistics.mean(c.mean_vision_tokens for c in per_image),
            "average_vision_token_fraction": statistics.mean(c.mean_vision_tokens / c.image.vision_tokens
                                                             for c in per_image),
            "vision_tokens_per_stage": None,
            "gflops": statistics.mean(c.language_model_flops for c in per_image) / 1e9,
            "prefill_gflops": statistics.mean(c.prefill_flops for c in per_image) / 1e9,
            "vision_gflops": statistics.mean(c.tower_flops + c.projector_flops for c in per_image) / 1e9,
            "peak_kv_kb": statistics.mean(c.kv_peak_bytes for c in per_image) / 2**10,
        }
    prefill_ms = _prefill_ms(prefills, model.device.type == "cuda")
    for name in settings:
        out[name]["prefill_ms"] = prefill_ms[key_of[name]]
    out["_assumptions"] = {
        "text_tokens": text_tokens, "answer_tokens": ANSWER_TOKENS, "batch_for_timing": len(timed),
        "bytes_per_value": bytes_per_value, "device": str(model.device), "images": len(sizes),
        "flops": "mean over the evaluation transcriptions, each image at its own size and schedule: dense matrix "
                 "products of the language model, prefill (last-position logits) + decode of the answer + a "
                 "score-based method's ranking rows; vision: tower + merger (adsc_patch.profile.model_cost)",
    }
    return out


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _num(x) -> str:
    return "—" if x is None else f"{x:.1f}".replace("-0.0", "0.0")


SCORES = ("cell_accuracy", "exact_match", *SECONDARY)


def _relative(row: dict, full: float) -> dict:
    relative = relative_scores({"transcribe": row["cell_accuracy"]}, {"transcribe": full})
    row["relative_to_full"], row["drop_points"] = relative["avg_relative"], relative["drop_points"]
    return row


def _rows(settings: dict, results: dict, cost: dict) -> list[dict]:
    full = results["full"]["transcribe"]["cell_accuracy"]
    rows = []
    for name, setting in settings.items():
        result = results[name]
        row = {"setting": name, "method": setting.method, "budget": setting.budget, "ablation": setting.ablation,
               "seed": setting.seed, "average_vision_tokens": cost[name]["average_vision_tokens"],
               **({"average_vision_token_fraction": cost[name]["average_vision_token_fraction"]}
                  if "average_vision_token_fraction" in cost[name] else {}),
               "cell_accuracy": result["transcribe"]["cell_accuracy"],
               "exact_match": result["transcribe"]["exact_match"]}
        row.update({category: result[category]["accuracy"] for category in SECONDARY if category in result})
        rows.append(_relative(row, full))
    return rows


def merge_seeds(rows: list[dict]) -> list[dict]:
    """One row per setting: rows that differ only in their fine-tune seed become their mean.

    The merged row keeps the first seed's name and adds ``seeds``, ``per_seed_cell_accuracy``
    and ``cell_accuracy_range`` (min, max); relative and drop are of the mean.
    """
    full = next(r for r in rows if r["setting"] == "full")["cell_accuracy"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["method"], row["budget"], row["ablation"]) if row["seed"] is not None else (row["setting"],)
        groups.setdefault(key, []).append(row)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        row = dict(group[0])
        for score in SCORES:
            if all(score in r for r in group):
                row[score] = statistics.mean(r[score] for r in group)
        accuracies = [r["cell_accuracy"] for r in group]
        row.update(seeds=[r["seed"] for r in group], per_seed_cell_accuracy=accuracies,
                   cell_accuracy_range=[min(accuracies), max(accuracies)])
        merged.append(_relative(row, full))
    return merged


def _header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _accuracy_cell(row: dict) -> str:
    if "cell_accuracy_range" not in row:
        return _pct(row["cell_accuracy"])
    low, high = row["cell_accuracy_range"]
    return f"{_pct(row['cell_accuracy'])} ({_pct(low)}–{_pct(high)}, {len(row['seeds'])} seeds)"


def _accuracy_table(rows: list[dict]) -> list[str]:
    """One line per row; where images differ in size, also the mean vision tokens per layer as
    a share of each image's own."""
    shares = all("average_vision_token_fraction" in r for r in rows)
    lines = _header("setting", "method", "avg vision tokens", *(["share of image's tokens (%)"] if shares else []),
                    "cell acc (%)", "exact match (%)", *SECONDARY, "rel. to full (%)", "drop (pts)")
    for r in rows:
        share = [_pct(r["average_vision_token_fraction"])] if shares else []
        cells = [r["setting"], r["method"], f"{r['average_vision_tokens']:.1f}", *share, _accuracy_cell(r),
                 _pct(r["exact_match"]), *(_pct(r.get(n)) for n in SECONDARY), _num(r["relative_to_full"]),
                 "" if r["setting"] == "full" else _num(r["drop_points"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seed_table(rows: list[dict]) -> list[str]:
    """Cell accuracy of every fine-tune seed, one line per merged setting."""
    merged = [r for r in rows if "seeds" in r]
    seeds = sorted({s for r in merged for s in r["seeds"]})
    lines = _header("setting", *(f"seed {s}" for s in seeds), "mean", "spread (max - min, pts)")
    for r in merged:
        by_seed = dict(zip(r["seeds"], r["per_seed_cell_accuracy"]))
        low, high = r["cell_accuracy_range"]
        lines.append(f"| {r['setting']} | " + " | ".join(_pct(by_seed.get(s)) for s in seeds)
                     + f" | {_pct(r['cell_accuracy'])} | {100 * (high - low):.1f} |")
    return lines


def _efficiency_table(cost: dict, shown: list[str]) -> list[str]:
    base = cost["full"]
    lines = _header("setting", "avg vision tokens", "LLM GFLOPs (prefill + decode)", "rel. (%)",
                    "vision GFLOPs (tower + projector)", "peak KV (KiB)", "rel. (%)", "prefill of one batch (ms)",
                    "rel. (%)")
    for name in shown:
        c = cost[name]
        lines.append(
            f"| {name} | {c['average_vision_tokens']:.1f} | {c['gflops']:.3f} | {100 * c['gflops'] / base['gflops']:.1f} "
            f"| {c['vision_gflops']:.3f} | {c['peak_kv_kb']:.1f} | {100 * c['peak_kv_kb'] / base['peak_kv_kb']:.1f} | {c['prefill_ms']:.1f} "
            f"| {100 * c['prefill_ms'] / base['prefill_ms']:.1f} |"
        )
    a = cost["_assumptions"]
    image = (f"one image, each of the {a['images']} evaluation images at its own size and schedule (means)"
             if "images" in a else "one image")
    lines += ["", f"FLOPs and KV cache: one prompt of {a['text_tokens']} text tokens and {image}, {a['answer_tokens']} "
              f"answer tokens, {a['bytes_per_value']}-byte values (analytic, `adsc_patch.profile`). Prefill: median of 5 "
              f"after a warm-up, a batch of {a['batch_for_timing']} prompts on {a['device']}, every schedule in one run, "
              "interleaved (each timed once per round, so that drift in the machine's speed slows all alike; settings "
              "with the same schedule share a measurement)."]
    return lines


def write_report(run_dir: str, settings: dict, results: dict, cost: dict, config: dict, timings: dict) -> dict:
    """``results.json``, ``results.md`` and ``accuracy_vs_tokens.png`` in ``run_dir``; returns the summary."""
    rows = _rows(settings, results, cost)
    merged = merge_seeds(rows)
    main_rows = [r for r in merged if r["ablation"] is None]
    title = {"qwen2_5_vl": " on Qwen2.5-VL (images of varying size)"}.get(config.get("arch"), "")
    lines = [f"# DigitGrid: ADSC in miniature{title}", "",
             "Evaluation grids use handwritten digits never seen in training. Main task: transcription, scored per "
             "cell; `read`/`count`/`exist`/`locate` are secondary questions with no target. Relative = cell accuracy "
             "over the full model's; drop = 100 - relative, as in the paper.", "",
             "## Accuracy vs. vision-token budget (Table I analog)", "", *_accuracy_table(main_rows)]
    if any("seeds" in r for r in merged):
        lines += ["", "## The fine-tunes' seeds", "",
                  "Cell accuracy (%) of each ADSC fine-tune seed (data, tower and full model are shared); the table "
                  "above shows their mean and range.", "", *_seed_table(merged)]
    ablations = [r for r in merged if r["ablation"] is not None]
    if ablations:
        budget = ablations[0]["budget"]
        reference = [r for r in merged if r["setting"] in ("full", f"adsc-{budget}")]
        for table, title in (("regime", "Training regime"), ("curriculum", "Curriculum")):
            number = "II" if table == "regime" else "III"
            chosen = [r for r in ablations if r["ablation"] == table]
            lines += ["", f"## {title} at budget {budget} (Table {number} analog)", "",
                      *_accuracy_table(reference[:1] + chosen + reference[1:])]
    finetuned = [r for r in merged if r["ablation"] == "baselines"]
    if finetuned:
        budget = finetuned[0]["budget"]
        by_name = {r["setting"]: r for r in merged}
        pairs = []
        for r in finetuned:
            baseline = r["setting"].split("-ft-")[0]
            pairs += [by_name[n] for n in (f"{baseline}-{budget}",) if n in by_name] + [r]
        adsc = [by_name[n] for n in (f"training-free-{budget}", f"adsc-{budget}") if n in by_name]
        lines += ["", f"## Selection rule vs. fine-tuning at budget {budget}", "",
                  "Every baseline fine-tuned with ADSC's exact recipe (LoRA + projector, reverse curriculum, same "
                  "steps and seed), beside its training-free row and ADSC's.", "",
                  *_accuracy_table([by_name["full"]] + adsc + pairs)]
    lines += ["", "## Compute and memory (Table IV analog)", "",
              *_efficiency_table(cost, [r["setting"] for r in merged])]
    markdown = "\n".join(lines) + "\n"
    summary = {"rows": rows, "merged_rows": merged, "efficiency": cost, "config": config, "timings_s": timings, "markdown": markdown}
    write_json_atomic(os.path.join(run_dir, "results.json"), summary)
    write_text_atomic(os.path.join(run_dir, "results.md"), markdown)
    _plot(os.path.join(run_dir, "accuracy_vs_tokens.png"), main_rows, finetuned)
    return summary


def _plot(path: str, rows: list[dict], finetuned: list[dict] = ()) -> None:
    """Figure 2 analog: cell accuracy against average vision tokens, one line per method (bars:
    the range over fine-tune seeds, where several ran); the fine-tuned baselines as labelled
    crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    methods: dict[str, list] = {}
    full = None
    shares = all("average_vision_token_fraction" in r for r in [*rows, *finetuned])

    def tokens(row: dict) -> float:  # the x axis: tokens, or where images differ in size % of each one's
        return 100 * row["average_vision_token_fraction"] if shares else row["average_vision_tokens"]

    for r in rows:
        if r["setting"] == "full":
            full = r
            continue
        low, high = r.get("cell_accuracy_range", (r["cell_accuracy"], r["cell_accuracy"]))
        methods.setdefault(r["method"], []).append((tokens(r), 100 * r["cell_accuracy"], 100 * low, 100 * high))
    for method, points in methods.items():
        points.sort()
        x, y = [p[0] for p in points], [p[1] for p in points]
        spread = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
        ax.errorbar(x, y, yerr=spread if any(map(any, spread)) else None, marker="o", capsize=3, label=method)
    if finetuned:
        x = [tokens(r) for r in finetuned]
        y = [100 * r["cell_accuracy"] for r in finetuned]
        ax.scatter(x, y, marker="x", color="black", label="baselines fine-tuned like ADSC", zorder=3)
        label_y = None
        for yi, xi, r in sorted(zip(y, x, finetuned), key=lambda p: -p[0]):
            # one column of labels right of the crosses, moved down where points are close
            label_y = yi if label_y is None or label_y - yi >= 3.5 else label_y - 3.5
            ax.annotate(r["setting"].split("-ft-")[0], (xi, yi), xytext=(max(x) + 1.5, label_y), fontsize=7,
                        va="center", arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
    if full is not None:
        ax.axhline(100 * full["cell_accuracy"], linestyle="--", color="grey",
                   label=f"full model ({full['average_vision_tokens']:.0f} tokens)")
    ax.set_xlabel("mean vision tokens per layer, % of each image's own" if shares
                  else "average vision tokens per layer")
    ax.set_ylabel("transcription cell accuracy (%)")
    ax.set_title("DigitGrid: accuracy vs. vision tokens")
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
