"""VQAv2: the EvalAI upload file for test-dev/test, and a local scorer for val.

``submission`` mirrors upstream LLaVA's ``convert_vqav2_for_submission.py``: one entry per
question of the full test question file, the answer normalised by ``EvalAIAnswerProcessor``,
and an empty answer where the model gave none (test-dev answers cover only part of test2015).

``score`` applies the official VQA evaluation (``vqaEval.py``) to the same normalised answers:
the prediction goes through punctuation and digit/article processing; the human answers get
only the punctuation step, and only when they are not all identical; each of the 10 human
answers is left out in turn and the prediction earns min(1, matches among the other 9 / 3).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict

from llava.eval.io import EvalInputError, _preview, join_by_question_id, read_json, read_jsonl, run_scorer, write_json_atomic
from llava.eval.m4c_evaluator import EvalAIAnswerProcessor, process_digit_article, process_punctuation

__all__ = ["make_submission", "vqa_accuracy", "score_vqav2", "main"]

logger = logging.getLogger(__name__)

# vqaEval.py's test for a comma between digits (the m4c processor's differs slightly).
VQA_DIGIT_COMMA = re.compile(r"\d,\d")


def make_submission(question_file: str, result_file: str, output: str) -> dict:
    """Write ``[{"question_id", "answer"}]`` for every question of ``question_file``."""
    question_ids = [q["question_id"] for q in read_jsonl(question_file)]
    answers = join_by_question_id(question_ids, read_jsonl(result_file), result_file, allow_missing=True)
    processor = EvalAIAnswerProcessor()
    upload = []
    for qid in question_ids:
        if qid not in answers:
            upload.append({"question_id": qid, "answer": ""})
            continue
        text = answers[qid].get("text")
        if not isinstance(text, str):
            raise EvalInputError(f"{result_file}: the answer to question {qid!r} has no text")
        upload.append({"question_id": qid, "answer": processor(text)})
    missing = len(question_ids) - len(answers)
    if missing:
        logger.warning("%d of %d questions have no answer in %s; uploaded with an empty answer",
                       missing, len(question_ids), result_file)
    write_json_atomic(output, upload)
    return {"questions": len(question_ids), "answered": len(answers), "missing": missing, "output": output}


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official VQA accuracy of one prediction, in [0, 1]."""
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    prediction = process_digit_article(process_punctuation(prediction, VQA_DIGIT_COMMA))
    if len(set(human_answers)) > 1:
        human_answers = [process_punctuation(a, VQA_DIGIT_COMMA) for a in human_answers]
    per_left_out = []
    for left_out in range(len(human_answers)):
        matches = sum(1 for j, a in enumerate(human_answers) if j != left_out and a == prediction)
        per_left_out.append(min(1, float(matches) / 3))
    return float(sum(per_left_out)) / len(per_left_out)


def _mean(values: list[float]) -> float:
    return float(sum(values)) / len(values)


def score_vqav2(annotation_file: str, result_file: str, question_file: str | None = None) -> dict:
    """Official VQA accuracy (in [0, 1]) overall, per answer type and per question type.

    Every annotated question must be answered, as the official code requires; with
    ``question_file``, only that file's questions (a subset of the annotations) are scored.
    """
    data = read_json(annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise EvalInputError(f"{annotation_file}: expected {{'annotations': [...]}} (VQA annotation format)")
    annotations = {a["question_id"]: a for a in data["annotations"]}
    if question_file is not None:
        wanted = [q["question_id"] for q in read_jsonl(question_file)]
        stray = [qid for qid in wanted if qid not in annotations]
        if stray:
            raise EvalInputError(f"{question_file}: question ids not in {annotation_file}: {_preview(stray)}")
    else:
        wanted = list(annotations)
    answers = join_by_question_id(wanted, read_jsonl(result_file), result_file)

    processor = EvalAIAnswerProcessor()
    overall, per_answer_type, per_question_type = [], defaultdict(list), defaultdict(list)
    for qid in wanted:
        text = answers[qid].get("text")
        if not isinstance(text, str):
            raise EvalInputError(f"{result_file}: the answer to question {qid!r} has no text")
        annotation = annotations[qid]
        accuracy = vqa_accuracy(processor(text), [a["answer"] for a in annotation["answers"]])
        overall.append(accuracy)
        per_answer_type[annotation.get("answer_type", "unknown")].append(accuracy)
        per_question_type[annotation.get("question_type", "unknown")].append(accuracy)
    if not overall:
        raise EvalInputError(f"{result_file}: no questions to score")
    return {
        "accuracy": _mean(overall),
        "n": len(overall),
        "per_answer_type": {t: {"accuracy": _mean(v), "n": len(v)} for t, v in sorted(per_answer_type.items())},
        "per_question_type": {t: {"accuracy": _mean(v), "n": len(v)} for t, v in sorted(per_question_type.items())},
    }


def format_summary(result: dict) -> str:
    # vqaEval.py reports percentages rounded to two decimals.
    lines = [f"Samples: {result['n']}  Accuracy: {100 * result['accuracy']:.2f}"]
    for answer_type, entry in result["per_answer_type"].items():
        lines.append(f"  {answer_type:<8} {100 * entry['accuracy']:.2f}  ({entry['n']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    submission = commands.add_parser("submission", help="write the EvalAI upload file")
    submission.add_argument("--question-file", required=True,
                            help="llava_vqav2_mscoco_test2015.jsonl (all test questions)")
    submission.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    submission.add_argument("--output", required=True, help="upload file to write (JSON)")
    score = commands.add_parser("score", help="score val answers with the official formula")
    score.add_argument("--annotation-file", required=True, help="v2_mscoco_val2014_annotations.json")
    score.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    score.add_argument("--question-file", help="score only this question file's questions (default: all annotated)")
    score.add_argument("--output-json", help="write the scores here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "submission":
        return run_scorer(lambda: make_submission(args.question_file, args.result_file, args.output),
                          lambda result: f"{result['answered']} answers for {result['questions']} questions "
                                         f"({result['missing']} left empty) -> {result['output']}", None)
    return run_scorer(lambda: score_vqav2(args.annotation_file, args.result_file, args.question_file),
                      format_summary, args.output_json)


if __name__ == "__main__":
    main()
