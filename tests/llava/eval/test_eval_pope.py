"""POPE scorer: the official numbers on the oracle files, order independence, refusals."""

from __future__ import annotations

import json
import os
import random

import pytest

from llava.eval.eval_pope import main, parse_yes_no, score_pope
from llava.eval.io import EvalInputError
from tests.helpers import read_lines, write_lines

# From the oracle README (upstream LLaVA's eval_pope.py on the released 13B answers).
OFFICIAL = {
    "adversarial": dict(tp=1182, fp=117, tn=1383, fn=318, accuracy=0.855, precision=0.9099307159353349,
                        recall=0.788, f1=0.8445873526259379, yes_ratio=0.433),
    "random": dict(tp=1182, fp=31, tn=1379, fn=318, accuracy=0.8800687285223368, precision=0.9744435284418796,
                   recall=0.788, f1=0.8713601179506082, yes_ratio=0.4168384879725086),
    "popular": dict(tp=1182, fp=59, tn=1441, fn=318, accuracy=0.8743333333333333, precision=0.9524576954069299,
                    recall=0.788, f1=0.8624589565851879, yes_ratio=0.4136666666666667),
}


@pytest.fixture(scope="module")
def pope(oracles_dir):
    root = os.path.join(oracles_dir, "pope")
    return {
        "annotation_dir": os.path.join(root, "coco"),
        "question_file": os.path.join(root, "llava_pope_test.jsonl"),
        "result_file": os.path.join(root, "answers_llava-v1.5-13b.jsonl"),
    }


@pytest.fixture(scope="module")
def official_result(pope):
    return score_pope(**pope)


@pytest.mark.parametrize("split", sorted(OFFICIAL))
def test_reproduces_the_official_numbers(official_result, split):
    got = official_result[split]
    for key, value in OFFICIAL[split].items():
        assert got[key] == value, key
    assert got["n"] == got["tp"] + got["fp"] + got["tn"] + got["fn"]


def test_mean_f1_is_the_headline_number(official_result):
    f1s = [OFFICIAL[s]["f1"] for s in ("adversarial", "popular", "random")]
    assert official_result["mean_f1"] == pytest.approx(sum(f1s) / 3, abs=1e-15)
    assert round(100 * official_result["mean_f1"], 2) == 85.95


def test_shuffled_answers_and_questions_score_the_same(pope, official_result, tmp_path):
    rng = random.Random(0)
    answers = read_lines(pope["result_file"])
    questions = read_lines(pope["question_file"])
    rng.shuffle(answers)
    rng.shuffle(questions)
    shuffled = score_pope(
        pope["annotation_dir"],
        write_lines(tmp_path / "questions.jsonl", questions),
        write_lines(tmp_path / "answers.jsonl", answers),
    )
    assert shuffled == official_result


def test_answers_from_another_question_file_are_refused(pope, tmp_path):
    shifted = []
    for line in read_lines(pope["result_file"]):
        record = json.loads(line)
        record["question_id"] += 1
        shifted.append(json.dumps(record) + "\n")
    with pytest.raises(EvalInputError) as caught:
        score_pope(pope["annotation_dir"], pope["question_file"], write_lines(tmp_path / "a.jsonl", shifted))
    message = str(caught.value)
    assert "20003001" in message  # an id no question has
    assert "questions without an answer: 1," in message  # and the first question lost its answer


def test_missing_answers_are_refused(pope, tmp_path):
    lines = read_lines(pope["result_file"])
    dropped = json.loads(lines[5])["question_id"]
    with pytest.raises(EvalInputError, match=f"without an answer: {dropped}"):
        score_pope(pope["annotation_dir"], pope["question_file"],
                   write_lines(tmp_path / "a.jsonl", lines[:5] + lines[6:]))


def test_question_that_pope_does_not_have_is_refused(pope, tmp_path):
    lines = read_lines(pope["question_file"])
    record = json.loads(lines[3])
    record["text"] = record["text"].replace("Is there", "Was there")
    lines[3] = json.dumps(record) + "\n"
    expected = rf"split 'adversarial'.*not in .*coco_pope_adversarial.json: {record['question_id']}"
    with pytest.raises(EvalInputError, match=expected):
        score_pope(pope["annotation_dir"], write_lines(tmp_path / "q.jsonl", lines), pope["result_file"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog", "no"),
        ("Yes, there is a dog. No cat is visible.", "yes"),  # only the first sentence counts
        ("no,", "no"),  # commas are dropped before splitting
        ("Not really", "yes"),  # "Not" is not one of the words
        ("nope", "yes"),
        ("No\nthere is none", "yes"),  # split on single spaces: "No\nthere" is one word
        ("", "yes"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_cli_writes_the_scores(pope, tmp_path, capsys):
    out = tmp_path / "scores.json"
    main([
        "--annotation-dir", pope["annotation_dir"], "--question-file", pope["question_file"],
        "--result-file", pope["result_file"], "--output-json", str(out),
    ])
    assert "mean F1: 85.95" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written) == {"adversarial", "popular", "random", "mean_f1"}
    for split in ("adversarial", "popular", "random"):
        assert set(written[split]) == {
            "accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn", "n"
        }
    assert written["random"]["f1"] == OFFICIAL["random"]["f1"]


def test_cli_reports_bad_input_without_a_traceback(pope, tmp_path):
    with pytest.raises(SystemExit, match="error: .*file not found"):
        main(["--annotation-dir", pope["annotation_dir"], "--question-file", pope["question_file"],
              "--result-file", str(tmp_path / "absent.jsonl")])
