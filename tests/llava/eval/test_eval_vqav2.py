"""VQAv2: the EvalAI upload file and the official VQA accuracy on small hand-checked files."""

from __future__ import annotations

import json

import pytest

from llava.eval.eval_vqav2 import main, make_submission, score_vqav2, vqa_accuracy
from llava.eval.io import EvalInputError
from llava.eval.m4c_evaluator import TextVQAAccuracyEvaluator


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _questions(path, ids):
    return _jsonl(path, [{"question_id": q, "image": "x", "text": "?"} for q in ids])


def _answer(qid, text):
    return {"question_id": qid, "prompt": "q", "text": text, "answer_id": "x", "model_id": "m", "metadata": {}}


@pytest.mark.parametrize(
    "humans, prediction, official, m4c",
    [
        # Both leave one human answer out at a time: 3 copies of 10 give (3 * 2/3 + 7 * 1) / 10.
        (["dog"] * 3 + ["cat"] * 7, "dog", 0.9, 0.9),
        (["dog"] * 2 + ["cat"] * 8, "dog", 0.6, 0.6),
        (["yes"] * 10, "Yes", 1.0, 1.0),
        # Humans that all agree are compared as written, while the prediction is normalised.
        (["two"] * 10, "two", 0.0, 1.0),
        # Disagreeing humans only get the punctuation step: "the dog" keeps its article.
        (["the dog"] * 4 + ["cat"] * 6, "the dog", 0.0, 1.0),
        (["red, white"] * 2 + ["red white"] * 8, "red white", 1.0, 1.0),
    ],
)
def test_official_formula_against_m4c(humans, prediction, official, m4c):
    assert vqa_accuracy(prediction, humans) == pytest.approx(official, abs=1e-12)
    assert TextVQAAccuracyEvaluator().score(prediction, humans) == pytest.approx(m4c, abs=1e-12)


@pytest.fixture()
def val_files(tmp_path):
    def entry(qid, answer_type, question_type, humans):
        return {
            "question_id": qid, "image_id": 1, "answer_type": answer_type, "question_type": question_type,
            "multiple_choice_answer": humans[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)],
        }

    annotations = {"annotations": [
        entry(101, "yes/no", "is the", ["yes"] * 10),
        entry(102, "number", "how many", ["2"] * 3 + ["3"] * 7),
        entry(103, "other", "what is", ["the dog"] * 4 + ["cat"] * 6),
    ]}
    annotation_file = tmp_path / "v2_mscoco_val2014_annotations.json"
    annotation_file.write_text(json.dumps(annotations))
    answers = [_answer(103, "The dog"), _answer(101, "Yes"), _answer(102, "two")]
    return str(annotation_file), _jsonl(tmp_path / "answers.jsonl", answers)


def test_score_hand_computed(val_files):
    result = score_vqav2(*val_files)
    # 101: 1.0; 102: "two" -> "2", 3 of 10 -> 0.9; 103: "the dog" -> "dog", no human said "dog" -> 0.
    assert result["n"] == 3
    assert result["accuracy"] == pytest.approx(1.9 / 3, abs=1e-12)
    assert result["per_answer_type"] == {
        "number": {"accuracy": pytest.approx(0.9, abs=1e-12), "n": 1},
        "other": {"accuracy": 0.0, "n": 1},
        "yes/no": {"accuracy": 1.0, "n": 1},
    }
    assert result["per_question_type"]["how many"]["n"] == 1


def test_score_needs_every_question_unless_a_question_file_narrows_them(val_files, tmp_path):
    annotation_file, _ = val_files
    partial = _jsonl(tmp_path / "partial.jsonl", [_answer(101, "yes"), _answer(102, "2")])
    with pytest.raises(EvalInputError, match="questions without an answer: 103"):
        score_vqav2(annotation_file, partial)
    questions = _questions(tmp_path / "q.jsonl", (101, 102))
    result = score_vqav2(annotation_file, partial, question_file=questions)
    assert result["n"] == 2 and result["accuracy"] == pytest.approx(0.95, abs=1e-12)


def test_score_refuses_answers_to_unknown_questions(val_files, tmp_path):
    annotation_file, _ = val_files
    stray = _jsonl(tmp_path / "a.jsonl", [_answer(q, "yes") for q in (101, 102, 103, 999)])
    with pytest.raises(EvalInputError, match="not in the questions: 999"):
        score_vqav2(annotation_file, stray)


def test_submission_covers_every_test_question(tmp_path, caplog):
    questions = _questions(tmp_path / "test2015.jsonl", range(1, 5))
    answers = _jsonl(tmp_path / "answers.jsonl", [_answer(4, "Yes"), _answer(1, "Two"), _answer(2, "a cat.")])
    output = tmp_path / "upload" / "answers_upload.json"
    summary = make_submission(questions, answers, str(output))
    assert json.loads(output.read_text()) == [
        {"question_id": 1, "answer": "2"},
        {"question_id": 2, "answer": "cat"},
        {"question_id": 3, "answer": ""},
        {"question_id": 4, "answer": "yes"},
    ]
    assert summary["missing"] == 1 and summary["answered"] == 3
    assert "1 of 4 questions have no answer" in caplog.text


def test_submission_refuses_answers_from_another_question_file(tmp_path):
    questions = _questions(tmp_path / "test2015.jsonl", (1, 2))
    answers = _jsonl(tmp_path / "answers.jsonl", [_answer(1, "yes"), _answer(7, "no")])
    with pytest.raises(EvalInputError, match="not in the questions: 7"):
        make_submission(questions, answers, str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()


def test_cli(val_files, tmp_path, capsys):
    annotation_file, result_file = val_files
    out = tmp_path / "scores.json"
    main(["score", "--annotation-file", annotation_file, "--result-file", result_file, "--output-json", str(out)])
    assert "Accuracy: 63.33" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert {"accuracy", "n", "per_answer_type"} <= set(written)
    questions = _questions(tmp_path / "test2015.jsonl", (101, 5))
    answers = _jsonl(tmp_path / "test_answers.jsonl", [_answer(101, "no")])
    upload = tmp_path / "upload.json"
    main(["submission", "--question-file", questions, "--result-file", answers, "--output", str(upload)])
    assert json.loads(upload.read_text()) == [{"question_id": 101, "answer": "no"}, {"question_id": 5, "answer": ""}]
