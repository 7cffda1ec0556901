"""TextVQA scorer: EvalAI-normalised soft accuracy against the 10 human answers.

Two answer-file conventions are recognised from the ids themselves:

- TextVQA question ids (``question_id`` of ``TextVQA_0.5.1_val.json``): joined by id.
- TextVQA image ids, as in LLaVA's released ``llava_textvqa_val_v051_ocr.jsonl``: joined as
  upstream's ``eval_textvqa.py`` does, by (image id, lower-cased question read back from the
  prompt). Where two annotations share that key, both answers are scored against the last
  one, as upstream's dictionary does.

Either way every annotated question needs exactly one answer, and answers that match no
annotation are refused.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

from llava.eval.io import EvalInputError, _preview, join_by_question_id, mismatch_error, read_json, read_jsonl, run_scorer
from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator

__all__ = ["question_from_prompt", "score_textvqa", "main"]

_OCR_MARKER = "Reference OCR token: "


def question_from_prompt(prompt: str) -> str:
    """The question of a TextVQA prompt, as upstream's eval_textvqa reads it (lower-cased)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match:
            return match.group(1).lower()
    elif _OCR_MARKER in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith(_OCR_MARKER.rstrip()) else lines[0]).lower()
    elif len(lines) == 2:
        return lines[0].lower()
    raise EvalInputError(f"cannot find the question in the TextVQA prompt {prompt!r}")


def _read_annotations(annotation_file: str) -> list[dict]:
    data = read_json(annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise EvalInputError(f"{annotation_file}: expected {{'data': [...]}} (TextVQA annotation format)")
    for number, entry in enumerate(data["data"]):
        if not all(k in entry for k in ("question_id", "image_id", "question", "answers")):
            raise EvalInputError(f"{annotation_file}: entry {number} lacks question_id/image_id/question/answers")
    return data["data"]


def _pairs_by_question_id(annotations: list[dict], answers: list[dict], result_file: str) -> list[tuple[str, list]]:
    by_id = {a["question_id"]: a for a in annotations}
    join_by_question_id(by_id, answers, result_file)
    # In answer-file order, the order upstream sums the scores in.
    return [(answer.get("text"), by_id[answer["question_id"]]["answers"]) for answer in answers]


def _pairs_by_image_and_question(annotations: list[dict], answers: list[dict], result_file: str):
    latest = {(a["image_id"], a["question"].lower()): a for a in annotations}
    wanted = Counter((a["image_id"], a["question"].lower()) for a in annotations)
    keys = []
    for answer in answers:
        if "prompt" not in answer:
            raise EvalInputError(f"{result_file}: the answer to {answer.get('question_id')!r} has no prompt")
        keys.append((answer["question_id"], question_from_prompt(answer["prompt"])))
    got = Counter(keys)
    unknown = [key for key in got if key not in wanted]
    extra = [key for key, count in got.items() if key in wanted and count > wanted[key]]
    missing = [key for key, count in wanted.items() if got[key] < count]
    if unknown or extra or missing:
        raise mismatch_error(result_file, "the annotations", [
            ("answers to (image, question) pairs that are not annotated", unknown),
            ("questions answered too often", extra),
            ("questions without an answer", missing)])
    return [(answer.get("text"), latest[key]["answers"]) for answer, key in zip(answers, keys, strict=True)]


def score_textvqa(annotation_file: str, result_file: str) -> dict:
    """``{"accuracy" (in [0, 1]), "n", "joined_by"}``."""
    annotations = _read_annotations(annotation_file)
    answers = read_jsonl(result_file)
    ids = {a.get("question_id") for a in answers}
    if ids <= {a["question_id"] for a in annotations}:
        joined_by, pairs = "question_id", _pairs_by_question_id(annotations, answers, result_file)
    elif ids <= {a["image_id"] for a in annotations}:
        joined_by, pairs = "image_id+question", _pairs_by_image_and_question(annotations, answers, result_file)
    else:
        question_ids = {a["question_id"] for a in annotations}
        image_ids = {a["image_id"] for a in annotations}
        stray = sorted((i for i in ids if i not in question_ids and i not in image_ids), key=repr)
        raise EvalInputError(
            f"{result_file} does not match {annotation_file}: ids that are neither TextVQA question ids "
            f"nor image ids: {_preview(stray)}"
        )
    for text, _ in pairs:
        if not isinstance(text, str):
            raise EvalInputError(f"{result_file}: an answer has no text")
    evaluator = TextVQAAccuracyEvaluator()
    accuracy = evaluator.eval_pred_list([{"pred_answer": text, "gt_answers": gt} for text, gt in pairs])
    return {"accuracy": accuracy, "n": len(pairs), "joined_by": joined_by}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    parser.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    parser.add_argument("--output-json", help="write the scores here")
    args = parser.parse_args(argv)
    return run_scorer(lambda: score_textvqa(args.annotation_file, args.result_file),
                      lambda result: f"Samples: {result['n']}  Accuracy: {100 * result['accuracy']:.2f}%",
                      args.output_json)


if __name__ == "__main__":
    main()
