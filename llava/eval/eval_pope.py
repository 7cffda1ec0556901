"""POPE scorer: accuracy, precision, recall, F1 and yes ratio per split, and their mean F1.

Gives the numbers of upstream LLaVA's ``eval_pope.py`` without its position-based pairing:
answers are joined to questions by ``question_id`` and questions to POPE labels by
(image, question text) within their split, so shuffled or reordered files score the same,
and an answer file from another question file is refused.
"""

from __future__ import annotations

import argparse
import os

from llava.eval.io import EvalInputError, _preview, join_by_question_id, read_jsonl, run_scorer

__all__ = ["SPLITS", "parse_yes_no", "confusion_metrics", "score_pope", "main"]

SPLITS = ("adversarial", "popular", "random")
_NO_WORDS = ("No", "not", "no")


def parse_yes_no(text: str) -> str:
    """Upstream's reading of an answer: "no" if its first sentence has the word No/not/no."""
    first_sentence = text.split(".")[0]
    # Split on single spaces as upstream does: "No\n" is not the word "No".
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in _NO_WORDS for word in words) else "yes"


def confusion_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Metrics with "yes" as the positive class; precision/F1 are 0.0 where undefined."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p == "yes" and y == "yes")
    fp = sum(1 for p, y in pairs if p == "yes" and y != "yes")
    tn = sum(1 for p, y in pairs if p == "no" and y != "yes")
    fn = sum(1 for p, y in pairs if p == "no" and y == "yes")
    n = len(pairs)
    precision = float(tp) / float(tp + fp) if tp + fp else 0.0
    recall = float(tp) / float(tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": predictions.count("yes") / n if n else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def _question_text(text: str) -> str:
    # LLaVA appends "\nAnswer the question using a single word or phrase." to POPE's question.
    return text.split("\n")[0].strip()


def _read_labels(path: str) -> dict[tuple[str, str], str]:
    """(image, question) -> "yes"/"no" for one POPE annotation file."""
    labels: dict[tuple[str, str], str] = {}
    for number, record in enumerate(read_jsonl(path), 1):
        try:
            key = (record["image"], _question_text(record["text"]))
            label = record["label"]
        except (KeyError, TypeError, AttributeError) as error:
            raise EvalInputError(f"{path}: entry {number} lacks image/text/label: {record}") from error
        if label not in ("yes", "no"):
            raise EvalInputError(f"{path}: entry {number} has label {label!r}, expected 'yes' or 'no'")
        if labels.get(key, label) != label:
            raise EvalInputError(f"{path}: question {key} appears twice with different labels")
        labels[key] = label
    return labels


def _labels_for_questions(
    split: str, questions: list[dict], labels: dict, label_file: str, question_file: str
) -> list[str]:
    """Label of every question of one split; refuses questions POPE does not have and vice versa."""
    unknown, found, seen = [], [], set()
    for question in questions:
        key = (question["image"], _question_text(question["text"]))
        if key in labels:
            found.append(labels[key])
            seen.add(key)
        else:
            unknown.append(question["question_id"])
    uncovered = len(labels) - len(seen)
    if unknown or uncovered:
        problems = []
        if unknown:
            problems.append(f"question ids whose (image, question) is not in {label_file}: {_preview(unknown)}")
        if uncovered:
            problems.append(f"{uncovered} of the {len(labels)} annotated questions have no question in the file")
        raise EvalInputError(f"{question_file}, split {split!r} does not match the annotations: " + "; ".join(problems))
    return found


def _answer_text(answer: dict, source: str) -> str:
    if not isinstance(answer.get("text"), str):
        raise EvalInputError(f"{source}: the answer to question {answer['question_id']!r} has no text")
    return answer["text"]


def score_pope(annotation_dir: str, question_file: str, result_file: str) -> dict:
    """Scores per split (``adversarial``, ``popular``, ``random``) and ``mean_f1``."""
    questions = read_jsonl(question_file)
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for number, question in enumerate(questions, 1):
        missing = [k for k in ("question_id", "image", "text", "category") if k not in question]
        if missing:
            raise EvalInputError(f"{question_file}: question {number} has no {', '.join(missing)}")
        if question["category"] not in by_split:
            raise EvalInputError(
                f"{question_file}: question {question['question_id']!r} has category {question['category']!r}, "
                f"expected one of {', '.join(SPLITS)}"
            )
        by_split[question["category"]].append(question)

    answers = join_by_question_id((q["question_id"] for q in questions), read_jsonl(result_file), result_file)

    result: dict = {}
    for split in SPLITS:
        label_file = os.path.join(annotation_dir, f"coco_pope_{split}.json")
        labels = _labels_for_questions(split, by_split[split], _read_labels(label_file), label_file, question_file)
        predictions = [parse_yes_no(_answer_text(answers[q["question_id"]], result_file)) for q in by_split[split]]
        result[split] = confusion_metrics(predictions, labels)
    result["mean_f1"] = sum(result[split]["f1"] for split in SPLITS) / len(SPLITS)
    return result


def format_summary(result: dict) -> str:
    lines = [f"{'split':<12} {'acc':>6} {'prec':>6} {'rec':>6} {'f1':>6} {'yes':>6}    TP    FP    TN    FN"]
    for split in SPLITS:
        m = result[split]
        lines.append(
            f"{split:<12} {m['accuracy']:6.3f} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} "
            f"{m['yes_ratio']:6.3f} {m['tp']:5d} {m['fp']:5d} {m['tn']:5d} {m['fn']:5d}"
        )
    lines.append(f"mean F1: {100 * result['mean_f1']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-dir", required=True,
                        help="folder with coco_pope_{adversarial,popular,random}.json")
    parser.add_argument("--question-file", required=True, help="LLaVA question file (with category)")
    parser.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    parser.add_argument("--output-json", help="write the scores here")
    args = parser.parse_args(argv)
    return run_scorer(lambda: score_pope(args.annotation_dir, args.question_file, args.result_file),
                      format_summary, args.output_json)


if __name__ == "__main__":
    main()
