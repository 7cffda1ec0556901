"""MME scorer: per-subtask accuracy and accuracy+, perception and cognition totals.

Reproduces upstream LLaVA's ``convert_answer_to_mme.py`` followed by MME's ``calculation.py``:
an answer is "yes"/"no" when its stripped, lower-cased text starts with that word,
otherwise the first four characters decide ("yes" inside them, else "no" inside them, so
"know" reads as "no"), otherwise it is "other" and always wrong. A subtask scores
100 x accuracy + 100 x accuracy+, where accuracy+ is the share of images whose questions
are all right.

Answers are matched to the ground truth by (category, image, question) rather than by line
position, so the order of the answer file does not matter; every ground-truth question must
have exactly one answer.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

from llava.eval.io import EvalInputError, mismatch_error, read_jsonl, run_scorer

__all__ = ["PERCEPTION", "COGNITION", "parse_mme_answer", "read_mme_ground_truth", "score_mme", "main"]

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")

# Instructions around the question: MME's in the ground truth, LLaVA's in its prompts.
_INSTRUCTIONS = ("Please answer yes or no.", "Answer the question using a single word or phrase.")


def parse_mme_answer(text: str) -> str:
    """"yes", "no" or "other", as LLaVA's conversion and MME's calculation read an answer."""
    text = text.strip().lower()
    if text.startswith("yes"):
        return "yes"
    if text.startswith("no"):
        return "no"
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _question_core(text: str) -> str:
    """The question without either benchmark's answer instruction, whitespace collapsed."""
    for instruction in _INSTRUCTIONS:
        text = text.replace(instruction, " ")
    return " ".join(text.split())


def _image_stem(image: str) -> str:
    # MME names the ground truth after the image up to its first dot, as LLaVA's conversion does.
    return os.path.basename(image).split(".")[0]


def read_mme_ground_truth(gt_dir: str) -> dict[tuple[str, str, str], str]:
    """(category, image stem, question core) -> "yes"/"no" for the 14 subtasks.

    Accepts both release layouts: ``<category>/<stem>.txt`` next to the images, and
    ``<category>/questions_answers_YN/<stem>.txt`` with the images in ``<category>/images``.
    """
    if not os.path.isdir(gt_dir):
        raise EvalInputError(f"MME ground-truth folder not found: {gt_dir}")
    missing = [c for c in PERCEPTION + COGNITION if not os.path.isdir(os.path.join(gt_dir, c))]
    if missing:
        raise EvalInputError(f"{gt_dir}: subtask folders missing: {', '.join(missing)}")
    truth: dict[tuple[str, str, str], str] = {}
    for category in PERCEPTION + COGNITION:
        folder = os.path.join(gt_dir, category)
        if os.path.isdir(os.path.join(folder, "questions_answers_YN")):
            folder = os.path.join(folder, "questions_answers_YN")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".txt"))
        if not names:
            raise EvalInputError(f"{folder}: no ground-truth .txt files")
        for name in names:
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
                    raise EvalInputError(f"{path}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
                key = (category, name[: -len(".txt")], _question_core(fields[0]))
                if key in truth:
                    raise EvalInputError(f"{path}:{number}: question appears twice: {fields[0]!r}")
                truth[key] = fields[1].strip().lower()
    return truth


def _answer_key(answer: dict, source: str) -> tuple[str, str, str]:
    try:
        question_id, prompt = answer["question_id"], answer["prompt"]
        category = question_id.split("/")[0]
        return category, _image_stem(question_id), _question_core(prompt)
    except (KeyError, AttributeError, TypeError) as error:
        raise EvalInputError(
            f"{source}: an answer lacks a '<category>/<image>' question_id or a prompt: {answer}"
        ) from error


def score_mme(gt_dir: str, result_file: str) -> dict:
    """Scores per subtask, ``perception`` and ``cognition`` sums, and their ``total``."""
    truth = read_mme_ground_truth(gt_dir)
    predictions: dict[tuple[str, str, str], str] = {}
    unknown, duplicates = [], []
    for answer in read_jsonl(result_file):
        key = _answer_key(answer, result_file)
        if key not in truth:
            unknown.append((answer["question_id"], key[2]))
        elif key in predictions:
            duplicates.append((answer["question_id"], key[2]))
        else:
            if not isinstance(answer.get("text"), str):
                raise EvalInputError(f"{result_file}: the answer to {answer['question_id']} has no text")
            predictions[key] = parse_mme_answer(answer["text"])
    missing = [(f"{category}/{stem}", question) for category, stem, question in truth
               if (category, stem, question) not in predictions]
    if unknown or duplicates or missing:
        raise mismatch_error(result_file, f"the MME ground truth in {gt_dir}", [
            ("answers to questions that are not in the ground truth", unknown),
            ("questions answered twice", duplicates),
            ("questions without an answer", missing)])

    outcomes: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for (category, stem, question), label in truth.items():
        outcomes[category][stem].append(predictions[(category, stem, question)] == label)

    subtasks = {}
    for category in PERCEPTION + COGNITION:
        images = outcomes[category].values()
        right = [r for image in images for r in image]
        acc = sum(right) / len(right)
        acc_plus = sum(all(image) for image in images) / len(images)
        # Added in calculation.py's order: 0 + 100*acc, then + 100*acc+.
        subtasks[category] = {"score": acc * 100 + acc_plus * 100, "acc": acc, "acc_plus": acc_plus, "n": len(right)}

    perception = 0
    for category in PERCEPTION:
        perception += subtasks[category]["score"]
    cognition = 0
    for category in COGNITION:
        cognition += subtasks[category]["score"]
    return {"perception": perception, "cognition": cognition, "total": perception + cognition, "subtasks": subtasks}


def format_summary(result: dict) -> str:
    lines = [f"Perception: {result['perception']:.2f}   Cognition: {result['cognition']:.2f}"]
    for name, subtask in result["subtasks"].items():
        lines.append(
            f"  {name:<22} score {subtask['score']:7.2f}  acc {subtask['acc']:.4f}  acc+ {subtask['acc_plus']:.4f}"
            f"  ({subtask['n']} questions)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--gt-dir", required=True, help="MME_Benchmark_release_version (either release layout)")
    parser.add_argument("--result-file", required=True, help="answer file (JSON lines)")
    parser.add_argument("--output-json", help="write the scores here")
    args = parser.parse_args(argv)
    return run_scorer(lambda: score_mme(args.gt_dir, args.result_file), format_summary, args.output_json)


if __name__ == "__main__":
    main()
