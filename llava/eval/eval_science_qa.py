"""ScienceQA scorer: accuracy over all questions of a split and over those with an image (IMG).

An answer is read as upstream LLaVA's ``eval_science_qa.py`` reads it: the bare option
letter, or a text starting "X. ", or exactly one match of ``The answer is X.`` (the last
character is any character, as in upstream's pattern); a letter beyond the question's
choices, or anything else, is FAILED and counts as wrong. Questions of the split without an
answer count as wrong too; answers to questions outside the split are refused.

The LLaVA-1.5 paper's ScienceQA number is the IMG accuracy. Both are in percent. IMG
questions are those whose ``problems.json`` entry has an image (upstream looks for
``<image>`` in the answer's prompt, which is the same set when every question is answered).

``--output-file`` writes ``{"correct": [...], "incorrect": [...]}`` with one entry per question
(``question_id``, ``parsed_ans``, ``ground_truth``, ``question`` (the prompt), ``pred``,
``is_multimodal``); ``--output-result`` writes ``{"acc", "correct", "count", "img_acc",
"img_correct", "img_count", "results": {pid: choice index or -1}, "outputs": {pid: text}}``.
Both follow upstream's files of the same names.
"""

from __future__ import annotations

import argparse
import os
import re

from llava.cli import fail
from llava.eval.io import EvalInputError, _preview, join_by_question_id, read_json, read_jsonl, write_json_atomic

__all__ = ["OPTIONS", "parse_choice", "score_science_qa", "main"]

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_choice(text: str) -> str:
    """The option letter an answer names, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def _choice_index(letter: str, n_choices: int) -> int:
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def _percent(correct: int, total: int) -> float:
    return correct / total * 100 if total else 0.0


def score_science_qa(base_dir: str, result_file: str, split: str = "test") -> dict:
    """``{"accuracy", "img_accuracy" (percent), "n", "n_img", "correct", "img_correct", "n_missing", "n_failed"}``."""
    return _evaluate(base_dir, result_file, split)[0]


def _evaluate(base_dir: str, result_file: str, split: str) -> tuple[dict, dict, dict]:
    """The scores and the contents of the ``--output-file`` and ``--output-result`` files."""
    problems = read_json(os.path.join(base_dir, "problems.json"))
    splits = read_json(os.path.join(base_dir, "pid_splits.json"))
    if split not in splits:
        raise EvalInputError(f"{base_dir}/pid_splits.json has no split {split!r} (it has {', '.join(splits)})")
    pids = [str(pid) for pid in splits[split]]
    absent = [pid for pid in pids if pid not in problems]
    if absent:
        raise EvalInputError(
            f"{base_dir}: split {split!r} lists problems missing from problems.json: {_preview(absent)}"
        )
    # Problem ids are strings; accept answer files that wrote them as numbers.
    answers = [{**a, "question_id": str(a["question_id"])} if "question_id" in a else a
               for a in read_jsonl(result_file)]
    by_id = join_by_question_id(pids, answers, result_file, allow_missing=True)

    dump = {"correct": [], "incorrect": []}
    chosen, outputs = {}, {}
    n_failed = img_total = img_correct = 0
    for pid in pids:
        problem = problems[pid]
        answer = by_id.get(pid, {"text": FAILED, "prompt": "Unknown"})
        if not isinstance(answer.get("text"), str):
            raise EvalInputError(f"{result_file}: the answer to question {pid!r} has no text")
        letter = parse_choice(answer["text"])
        n_failed += pid in by_id and letter == FAILED
        chosen[pid] = _choice_index(letter, len(problem["choices"]))
        outputs[pid] = answer["text"]
        is_right = chosen[pid] == problem["answer"]
        has_image = bool(problem.get("image"))
        img_total += has_image
        img_correct += has_image and is_right
        dump["correct" if is_right else "incorrect"].append({
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": OPTIONS[problem["answer"]],
            "question": answer.get("prompt"),
            "pred": answer["text"],
            "is_multimodal": has_image,
        })

    correct = len(dump["correct"])
    result = {
        "accuracy": _percent(correct, len(pids)),
        "img_accuracy": _percent(img_correct, img_total),
        "n": len(pids),
        "n_img": img_total,
        "correct": correct,
        "img_correct": img_correct,
        "n_missing": len(pids) - len(by_id),
        "n_failed": n_failed,
    }
    summary = {
        "acc": result["accuracy"], "correct": correct, "count": len(pids),
        "img_acc": result["img_accuracy"], "img_correct": img_correct, "img_count": img_total,
        "results": chosen, "outputs": outputs,
    }
    return result, dump, summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    parser.add_argument("--output-file", help="write the per-question analysis here (JSON)")
    parser.add_argument("--output-result", help="write accuracy, parsed choices and raw outputs here (JSON)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output-json", help="write the scores here")
    args = parser.parse_args(argv)
    try:
        result, dump, summary = _evaluate(args.base_dir, args.result_file, args.split)
    except EvalInputError as error:
        fail(error)
    print(
        f"Total: {result['n']}, Correct: {result['correct']}, Accuracy: {result['accuracy']:.2f}%, "
        f"IMG-Accuracy: {result['img_accuracy']:.2f}% ({result['n_img']} questions with an image; "
        f"{result['n_missing']} unanswered, {result['n_failed']} answers not understood)"
    )
    if args.output_file:
        write_json_atomic(args.output_file, dump)
    if args.output_result:
        write_json_atomic(args.output_result, summary)
    if args.output_json:
        write_json_atomic(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
