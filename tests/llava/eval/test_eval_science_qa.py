"""ScienceQA scorer on a small hand-checked problem set."""

from __future__ import annotations

import json

import pytest

from llava.eval.eval_science_qa import FAILED, main, parse_choice, score_science_qa
from llava.eval.io import EvalInputError


def _problem(n_choices, answer, image=None):
    return {"question": "?", "choices": [f"c{i}" for i in range(n_choices)], "answer": answer, "image": image}


PROBLEMS = {
    "1": _problem(3, 0, "image.png"),  # "A": right (IMG)
    "2": _problem(3, 1),  # "B. because": right
    "3": _problem(2, 1, "image.png"),  # "The answer is C.": C is not a choice -> wrong (IMG)
    "4": _problem(4, 3),  # two "The answer is" matches -> FAILED
    "5": _problem(4, 2, "image.png"),  # no answer -> wrong (IMG)
    "6": _problem(2, 0),  # "The answer is A" at the very end: the pattern needs one more character -> FAILED
    "7": _problem(2, 1),  # train split
    "8": _problem(3, 2),  # "C": right
}
TEXTS = {"1": "A", "2": "B. because", "3": "The answer is C.", "4": "The answer is D. The answer is D.",
         "6": "The answer is A", "8": "C"}


@pytest.fixture()
def base_dir(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5", "6", "8"], "train": ["7"]}))
    return str(tmp_path)


def _answers(path, texts):
    records = [{"question_id": pid, "prompt": ("<image>\n" if PROBLEMS[pid]["image"] else "") + "Q", "text": t}
               for pid, t in texts.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_hand_computed(base_dir, tmp_path):
    result = score_science_qa(base_dir, _answers(tmp_path / "a.jsonl", TEXTS))
    assert result == {
        "accuracy": 3 / 7 * 100,  # 1, 2, 8 right of the 7 test questions
        "img_accuracy": 1 / 3 * 100,  # 1 right of 1, 3, 5
        "n": 7,
        "n_img": 3,
        "correct": 3,
        "img_correct": 1,
        "n_missing": 1,
        "n_failed": 2,
    }


def test_answers_outside_the_split_are_refused(base_dir, tmp_path):
    with pytest.raises(EvalInputError, match="not in the questions: '7'"):
        score_science_qa(base_dir, _answers(tmp_path / "a.jsonl", dict(TEXTS, **{"7": "B"})))


def test_unknown_split_is_named(base_dir, tmp_path):
    with pytest.raises(EvalInputError, match="no split 'val'"):
        score_science_qa(base_dir, _answers(tmp_path / "a.jsonl", TEXTS), split="val")


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        ("E", "E"),
        ("B. The second one", "B"),
        ("The answer is C.", "C"),
        ("Because... The answer is B, I think", "B"),  # any character may follow the letter
        ("The answer is A", FAILED),  # ... but one must follow
        ("A.", FAILED),  # too short for "X. " and not a bare letter
        (" A", FAILED),  # not stripped
        ("a", FAILED),
        ("The answer is A. Or the answer is B.", "A"),  # "the" in lower case does not match
        ("The answer is A. The answer is B.", FAILED),  # two matches
    ],
)
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_cli_writes_upstream_style_dumps(base_dir, tmp_path, capsys):
    paths = {name: tmp_path / f"{name}.json" for name in ("output", "result", "scores")}
    main(["--base-dir", base_dir, "--result-file", _answers(tmp_path / "a.jsonl", TEXTS),
          "--output-file", str(paths["output"]), "--output-result", str(paths["result"]),
          "--output-json", str(paths["scores"])])
    printed = capsys.readouterr().out
    assert "Accuracy: 42.86%" in printed and "IMG-Accuracy: 33.33%" in printed
    scores = json.loads(paths["scores"].read_text())
    assert {"accuracy", "img_accuracy", "n", "n_img"} <= set(scores)
    dump = json.loads(paths["output"].read_text())
    assert [e["question_id"] for e in dump["correct"]] == ["1", "2", "8"]
    assert dump["incorrect"][0] == {"question_id": "3", "parsed_ans": "C", "ground_truth": "B",
                                    "question": "<image>\nQ", "pred": "The answer is C.", "is_multimodal": True}
    summary = json.loads(paths["result"].read_text())
    assert summary["results"] == {"1": 0, "2": 1, "3": -1, "4": -1, "5": -1, "6": -1, "8": 2}
    assert summary["outputs"]["5"] == FAILED and summary["count"] == 7 and summary["correct"] == 3
