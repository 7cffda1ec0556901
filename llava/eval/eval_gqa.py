"""GQA scorer: exact-match accuracy over the balanced questions, overall and per type.

The prediction is upstream LLaVA's (``convert_gqa_for_eval.py``): the answer text without
trailing periods, lower-cased. ``--predictions-out`` writes the file GQA's official
``eval.py`` reads (``[{"questionId", "prediction"}]``); the accuracy here is the same
number that script reports as "accuracy" (questions with ``isBalanced`` false are skipped).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from llava.eval.io import EvalInputError, _preview, join_by_question_id, read_json, read_jsonl, run_scorer, write_json_atomic

__all__ = ["gqa_prediction", "score_gqa", "main"]


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _breakdown(groups: dict[str, list[float]]) -> dict:
    return {name: {"accuracy": _mean(v), "n": len(v)} for name, v in sorted(groups.items())}


def score_gqa(questions_file: str, result_file: str, predictions_out: str | None = None) -> dict:
    """``{"accuracy", "n", "per_structural_type", "per_semantic_type", "binary", "open"}`` (in [0, 1])."""
    questions = read_json(questions_file)
    if not isinstance(questions, dict):
        raise EvalInputError(f"{questions_file}: expected a dict question id -> question (GQA questions format)")
    # GQA's question ids are strings; LLaVA answer files may hold them as numbers.
    answers = [{**a, "question_id": str(a["question_id"])} if "question_id" in a else a
               for a in read_jsonl(result_file)]
    by_id = join_by_question_id(questions, answers, result_file, allow_missing=True)
    scored = [qid for qid, q in questions.items() if q.get("isBalanced", True)]
    missing = [qid for qid in scored if qid not in by_id]
    if missing:
        raise EvalInputError(
            f"{result_file} does not match {questions_file}: questions without an answer: {_preview(missing)}"
        )

    predictions = {}
    for answer in answers:
        if not isinstance(answer.get("text"), str):
            raise EvalInputError(f"{result_file}: the answer to question {answer['question_id']!r} has no text")
        predictions[answer["question_id"]] = gqa_prediction(answer["text"])
    if predictions_out:
        write_json_atomic(predictions_out, [{"questionId": qid, "prediction": p} for qid, p in predictions.items()])

    overall, structural, semantic, answer_kind = [], defaultdict(list), defaultdict(list), defaultdict(list)
    for qid in scored:
        question = questions[qid]
        if "answer" not in question:
            raise EvalInputError(f"{questions_file}: question {qid!r} has no answer")
        correct = float(predictions[qid] == question["answer"])
        types = question.get("types", {})
        overall.append(correct)
        structural[types.get("structural", "unknown")].append(correct)
        semantic[types.get("semantic", "unknown")].append(correct)
        answer_kind["open" if types.get("structural") == "query" else "binary"].append(correct)
    if not overall:
        raise EvalInputError(f"{questions_file}: no balanced questions to score")
    return {
        "accuracy": _mean(overall),
        "n": len(overall),
        "per_structural_type": _breakdown(structural),
        "per_semantic_type": _breakdown(semantic),
        **{kind: {"accuracy": _mean(v), "n": len(v)} for kind, v in sorted(answer_kind.items())},
    }


def format_summary(result: dict) -> str:
    lines = [f"Samples: {result['n']}  Accuracy: {100 * result['accuracy']:.2f}%"]
    for name, entry in result["per_structural_type"].items():
        lines.append(f"  {name:<10} {100 * entry['accuracy']:.2f}%  ({entry['n']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--questions", required=True, help="GQA questions json, e.g. testdev_balanced_questions.json")
    parser.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    parser.add_argument("--predictions-out", help="write the official eval.py's predictions file here")
    parser.add_argument("--output-json", help="write the scores here")
    args = parser.parse_args(argv)
    return run_scorer(lambda: score_gqa(args.questions, args.result_file, args.predictions_out),
                      format_summary, args.output_json)


if __name__ == "__main__":
    main()
