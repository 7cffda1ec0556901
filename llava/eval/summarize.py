"""The paper's Table I from several evaluation runs: scores per benchmark, relative average, drop.

    python -m llava.eval.summarize --eval-dir ./playground/data/eval --baseline llava-v1.5-7b-full \\
        --run llava-v1.5-7b-adsc-lora-192 --run llava-v1.5-7b-adsc-lora-64 \\
        [--label llava-v1.5-7b-adsc-lora-192="ADSC 192"] [--score llava-v1.5-7b-full:vqav2=78.5] \\
        [--sqa-metric all|img] [--output-md table.md] [--output-json table.json]

A run is the ``CKPT`` name the ``scripts/v1_5/eval/*.sh`` scripts write their answers under;
each script leaves ``scores.json`` (and ``merge.jsonl.settings.json``, with the pruning
schedule) in its answers folder, and that is what is read here (``BENCHMARKS`` holds the
folders). Headline numbers, as in the paper's tables:

========  =====================================================  ==============
column    number                                                 from
========  =====================================================  ==============
GQA       accuracy (%)                                           eval_gqa
MME       perception + cognition (the paper's 1864 for 7B)       eval_mme
POPE      mean F1 of the three splits (%)                        eval_pope
SQA       accuracy over all test questions (%), or IMG with      eval_science_qa
          ``--sqa-metric img``
TextVQA   accuracy (%)                                           eval_textvqa
VQAv2     val accuracy (%); test-dev is scored by the EvalAI     eval_vqav2
          server, so pass it with ``--score RUN:vqav2=VALUE``
========  =====================================================  ==============

``Avg. rel. (%)`` is the mean over benchmarks of ``100 x score / baseline score``, over the
benchmarks both the run and the baseline have (a run missing some says how many it used);
``Drop (pts)`` is ``100 - Avg. rel.``.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Callable

from ..cli import fail
from .io import EvalInputError, read_json, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["Benchmark", "BENCHMARKS", "relative_scores", "summarize", "format_markdown", "main"]


@dataclass(frozen=True)
class Benchmark:
    """Where ``scripts/v1_5/eval/<script>.sh`` leaves a run's answers, and its headline number."""

    column: str
    answers_dir: str  # relative to the eval dir, ``{ckpt}`` is the run
    headline: Callable[[dict, str], float]


def _percent(key: str) -> Callable[[dict, str], float]:
    return lambda scores, _: 100 * scores[key]


def _science_qa(scores: dict, sqa_metric: str) -> float:
    return scores["img_accuracy" if sqa_metric == "img" else "accuracy"]  # eval_science_qa reports percent


BENCHMARKS: dict[str, Benchmark] = {
    "gqa": Benchmark("GQA", "gqa/answers/llava_gqa_testdev_balanced/{ckpt}", _percent("accuracy")),
    "mme": Benchmark("MME", "MME/answers/{ckpt}", lambda s, _: s["perception"] + s["cognition"]),
    "pope": Benchmark("POPE", "pope/answers/{ckpt}", _percent("mean_f1")),
    "sqa": Benchmark("SQA", "scienceqa/answers/{ckpt}", _science_qa),
    "textvqa": Benchmark("TextVQA", "textvqa/answers/{ckpt}", _percent("accuracy")),
    "vqav2": Benchmark("VQAv2", "vqav2/answers/llava_vqav2_mscoco_val2014/{ckpt}", _percent("accuracy")),
}


def _read_run(eval_dir: str, ckpt: str, sqa_metric: str) -> tuple[dict[str, float], float | None]:
    """Headline score per benchmark found for ``ckpt``, and its average vision tokens."""
    scores, tokens = {}, None
    for name, bench in BENCHMARKS.items():
        folder = os.path.join(eval_dir, bench.answers_dir.format(ckpt=ckpt))
        path = os.path.join(folder, "scores.json")
        if not os.path.isfile(path):
            continue
        try:
            scores[name] = float(bench.headline(read_json(path), sqa_metric))
        except KeyError as error:
            raise EvalInputError(f"{path}: no {error} in the scores (written by another scorer?)") from error
        settings = os.path.join(folder, "merge.jsonl.settings.json")
        if tokens is None and os.path.isfile(settings):
            pruning = read_json(settings).get("pruning", {})
            tokens = pruning.get("average_vision_tokens")
    return scores, tokens


def relative_scores(scores: dict[str, float], baseline: dict[str, float]) -> dict:
    """``{"relative": {bench: 100 x s / b}, "avg_relative", "drop_points", "n_benchmarks"}`` over
    the benchmarks present in both (``avg_relative`` is ``None`` when there are none)."""
    shared = [b for b in scores if b in baseline and baseline[b]]
    relative = {b: 100 * scores[b] / baseline[b] for b in shared}
    average = sum(relative.values()) / len(relative) if relative else None
    return {
        "relative": relative,
        "avg_relative": average,
        "drop_points": None if average is None else 100 - average,
        "n_benchmarks": len(relative),
    }


def summarize(eval_dir: str, baseline: str, runs: list[str], labels: dict[str, str] | None = None,
              manual_scores: dict[str, dict[str, float]] | None = None, sqa_metric: str = "all") -> dict:
    """Rows of the table, the baseline first: ``{"benchmarks", "rows": [{"run", "label",
    "vision_tokens", "scores", "relative", "avg_relative", "drop_points", "n_benchmarks"}]}``."""
    if sqa_metric not in ("all", "img"):
        raise EvalInputError(f"--sqa-metric must be 'all' or 'img', got {sqa_metric!r}")
    if not os.path.isdir(eval_dir):
        raise EvalInputError(f"eval folder not found: {eval_dir}")
    labels, manual_scores = labels or {}, manual_scores or {}
    unknown = [run for run in list(labels) + list(manual_scores) if run != baseline and run not in runs]
    if unknown:
        raise EvalInputError(f"--label/--score name runs that are not listed: {', '.join(sorted(set(unknown)))}")
    rows, base_scores = [], None
    for run in [baseline, *[r for r in runs if r != baseline]]:
        scores, tokens = _read_run(eval_dir, run, sqa_metric)
        scores.update(manual_scores.get(run, {}))
        if not scores:
            raise EvalInputError(
                f"no scores.json for run {run!r} under {eval_dir} (looked in "
                + ", ".join(b.answers_dir.format(ckpt=run) for b in BENCHMARKS.values())
                + "); run scripts/v1_5/eval/<bench>.sh with CKPT=" + run
            )
        if base_scores is None:
            base_scores = scores
        rows.append({"run": run, "label": labels.get(run, run), "vision_tokens": tokens, "scores": scores,
                     **relative_scores(scores, base_scores)})
    return {"benchmarks": {name: b.column for name, b in BENCHMARKS.items()}, "sqa_metric": sqa_metric, "rows": rows}


def _cell(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_markdown(table: dict) -> str:
    names = list(table["benchmarks"])
    header = ["Method", "# Vision Tokens", *table["benchmarks"].values(), "Avg. rel. (%)", "Drop (pts)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    total = len(names)
    for index, row in enumerate(table["rows"]):
        scores = [_cell(row["scores"].get(n), 0 if n == "mme" else 1) for n in names]
        average = _cell(row["avg_relative"])
        if row["n_benchmarks"] < total and row["avg_relative"] is not None:
            average += f" ({row['n_benchmarks']}/{total})"
        drop = "" if index == 0 else _cell(row["drop_points"])
        lines.append("| " + " | ".join([row["label"], _cell(row["vision_tokens"], 0), *scores, average, drop]) + " |")
    note = "SQA: IMG accuracy" if table["sqa_metric"] == "img" else "SQA: accuracy over all test questions"
    return "\n".join(lines) + f"\n\nMME: perception + cognition; POPE: mean F1; {note}.\n"


def _parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EvalInputError(f"{flag} takes NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def _parse_scores(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in _parse_assignments(items, "--score").items():
        run, sep, bench = key.rpartition(":")
        if not sep or bench not in BENCHMARKS:
            raise EvalInputError(f"--score takes RUN:BENCH=VALUE with BENCH in {', '.join(BENCHMARKS)}, got {key!r}")
        try:
            out.setdefault(run, {})[bench] = float(value)
        except ValueError:
            raise EvalInputError(f"--score {key}: {value!r} is not a number") from None
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", default="./playground/data/eval", help="the eval root of the scripts")
    parser.add_argument("--baseline", required=True, help="the full model's run (CKPT name)")
    parser.add_argument("--run", action="append", default=[], help="a compressed run (CKPT name); repeat")
    parser.add_argument("--label", action="append", default=[], help="RUN=NAME shown in the table; repeat")
    parser.add_argument("--score", action="append", default=[],
                        help="RUN:BENCH=VALUE for numbers scored elsewhere (VQAv2 test-dev); repeat")
    parser.add_argument("--sqa-metric", default="all", choices=["all", "img"])
    parser.add_argument("--output-md", help="write the markdown table here")
    parser.add_argument("--output-json", help="write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        table = summarize(args.eval_dir, args.baseline, args.run, _parse_assignments(args.label, "--label"),
                          _parse_scores(args.score), args.sqa_metric)
    except EvalInputError as error:
        fail(error)
    markdown = format_markdown(table)
    print(markdown)
    if args.output_md:
        write_text_atomic(args.output_md, markdown)
    if args.output_json:
        write_json_atomic(args.output_json, {**table, "markdown": markdown})
    return table


if __name__ == "__main__":
    main()
