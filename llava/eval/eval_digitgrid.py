"""Scorer of the playground's DigitGrid benchmark.

    python -m llava.eval.eval_digitgrid --gt-file G --result-file R [--output-json F]

``transcribe``: per-cell accuracy over the 16 cells of each grid (a missing or malformed
cell counts as wrong) and exact-match rate; every other category: exact-match accuracy
after trimming and dropping a final period, case-insensitive. Output:
``{"transcribe": {"cell_accuracy", "exact_match", "n"}, "read": {"accuracy", "n"}, ...}``.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from .io import EvalInputError, join_by_question_id, read_jsonl, run_scorer

__all__ = ["parse_transcription", "score_digitgrid"]

GRID = 4
_CELL = re.compile(r"^(\d|_)$")


def parse_transcription(text: str) -> list[str | None]:
    """The 16 cells of a transcription, ``None`` where a cell is missing or malformed."""
    rows = [row.split() for row in text.strip().rstrip(".").split(";")]
    cells: list[str | None] = []
    for r in range(GRID):
        row = rows[r] if r < len(rows) else []
        for c in range(GRID):
            cell = row[c] if c < len(row) else None
            cells.append(cell if cell is not None and _CELL.match(cell) else None)
    return cells


def _short(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def score_digitgrid(gt_file: str, result_file: str) -> dict:
    truth = read_jsonl(gt_file)
    for number, record in enumerate(truth, 1):
        if not {"question_id", "answer", "category"} <= set(record):
            raise EvalInputError(f"{gt_file}:{number} needs question_id, answer and category")
    answers = join_by_question_id([t["question_id"] for t in truth], read_jsonl(result_file), result_file)
    totals: dict = defaultdict(lambda: {"n": 0, "correct": 0, "cells": 0, "cells_correct": 0})
    for record in truth:
        text = answers[record["question_id"]]["text"]
        bucket = totals[record["category"]]
        bucket["n"] += 1
        if record["category"] == "transcribe":
            expected = parse_transcription(record["answer"])
            got = parse_transcription(text)
            hits = sum(g is not None and g == e for g, e in zip(got, expected))
            bucket["cells"] += GRID * GRID
            bucket["cells_correct"] += hits
            bucket["correct"] += int(hits == GRID * GRID)
        else:
            bucket["correct"] += int(_short(text) == _short(record["answer"]))
    result = {}
    for category, bucket in sorted(totals.items()):
        if category == "transcribe":
            result[category] = {
                "cell_accuracy": bucket["cells_correct"] / bucket["cells"],
                "exact_match": bucket["correct"] / bucket["n"],
                "n": bucket["n"],
            }
        else:
            result[category] = {"accuracy": bucket["correct"] / bucket["n"], "n": bucket["n"]}
    return result


def format_summary(result: dict) -> str:
    return "\n".join(
        f"{category}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())
        for category, scores in result.items())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt-file", required=True)
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    return run_scorer(lambda: score_digitgrid(args.gt_file, args.result_file), format_summary, args.output_json)


if __name__ == "__main__":
    main()
