"""ScienceQA inference over LLaVA's conversation-format question file (llava_test_CQM-A.json).

    python -m llava.eval.model_vqa_science --model-path P --question-file llava_test_CQM-A.json \\
        --image-folder images/test --answers-file A --single-pred-prompt [--batch-size 8]

As upstream: the first human turn is the question (its ``<image>`` removed and put back in
front), ``--single-pred-prompt`` appends the instruction to answer with the option's letter,
and ``prompt`` in the answer file starts with ``<image>\\n`` for questions with an image.
"""

from __future__ import annotations

from ..cli import run_command
from .inference import EvalQuestion, main_with_questions
from .io import EvalInputError, read_json

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def load_questions(args) -> list[EvalQuestion]:
    data = read_json(args.question_file)
    if not isinstance(data, list):
        raise EvalInputError(f"{args.question_file} must hold a list of questions")
    questions = []
    for index, line in enumerate(data):
        try:
            text = line["conversations"][0]["value"]
            qid = line["id"]
        except (KeyError, IndexError, TypeError):
            raise EvalInputError(f"{args.question_file}: question #{index} needs 'id' and 'conversations'") from None
        query = text.replace("<image>", "").strip()
        prompt = query
        image = line.get("image")
        if image is not None:
            prompt = "<image>\n" + prompt
        if args.single_pred_prompt:
            query = f"{query}\n{SINGLE_PRED_PROMPT}"
            prompt = f"{prompt}\n{SINGLE_PRED_PROMPT}"
        questions.append(EvalQuestion(qid, prompt, query, image))
    return questions


def _extra(parser) -> None:
    parser.add_argument("--single-pred-prompt", action="store_true")


def main(argv=None) -> str:
    return main_with_questions(__doc__.split("\n\n")[0], load_questions, extra_args=_extra, argv=argv,
                               prog=f"python -m {__spec__.name}")


if __name__ == "__main__":
    run_command(main)
