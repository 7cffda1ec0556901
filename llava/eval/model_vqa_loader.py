"""Benchmark inference over a question file (JSON lines: question_id, image, text).

    python -m llava.eval.model_vqa_loader --model-path P --question-file Q --image-folder I \\
        --answers-file A [--batch-size 8] [--num-chunks K --chunk-idx i] [--prune-layers 2,6,12,20 \\
        --vision-token-budget 192]

Upstream's flags and answer format; see ``llava.eval.inference`` for resume and settings.
"""

from __future__ import annotations

from ..cli import run_command
from .inference import EvalQuestion, main_with_questions
from .io import EvalInputError, read_jsonl


def load_questions(args) -> list[EvalQuestion]:
    questions = []
    for number, line in enumerate(read_jsonl(args.question_file), 1):
        if "question_id" not in line or "text" not in line:
            raise EvalInputError(f"{args.question_file}:{number} needs question_id and text")
        metadata = {"category": line["category"]} if "category" in line else {}
        questions.append(EvalQuestion(line["question_id"], line["text"], line["text"], line.get("image"), metadata))
    return questions


def main(argv=None) -> str:
    return main_with_questions(__doc__.split("\n\n")[0], load_questions, argv=argv,
                               prog=f"python -m {__spec__.name}")


if __name__ == "__main__":
    run_command(main)
