"""GQA scorer on a small hand-checked questions file."""

from __future__ import annotations

import json

import pytest

from llava.eval.eval_gqa import gqa_prediction, main, score_gqa
from llava.eval.io import EvalInputError


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def questions_file(tmp_path):
    def question(answer, structural, semantic, balanced=True):
        return {"question": "?", "answer": answer, "isBalanced": balanced,
                "types": {"structural": structural, "semantic": semantic, "detailed": "x"}}

    questions = {
        "201": question("yes", "verify", "attr"),
        "202": question("left", "query", "rel"),
        "203": question("table", "query", "obj"),
        "204": question("no", "verify", "attr", balanced=False),
    }
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    return str(path)


def _answers(tmp_path, texts):
    records = [{"question_id": qid, "prompt": "?", "text": t} for qid, t in texts.items()]
    return _jsonl(tmp_path / "answers.jsonl", records)


def test_hand_computed(questions_file, tmp_path):
    # Ids as numbers, as some answer files hold them; "The table." is not "table" (exact match).
    result_file = _answers(tmp_path, {201: "Yes.", 202: "Left", 203: "The table.", 204: "No"})
    predictions = tmp_path / "testdev_balanced_predictions.json"
    result = score_gqa(questions_file, result_file, str(predictions))
    assert result["n"] == 3  # the unbalanced question is not scored
    assert result["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
    assert result["per_structural_type"] == {"query": {"accuracy": 0.5, "n": 2}, "verify": {"accuracy": 1.0, "n": 1}}
    assert result["per_semantic_type"]["obj"] == {"accuracy": 0.0, "n": 1}
    assert result["binary"] == {"accuracy": 1.0, "n": 1} and result["open"] == {"accuracy": 0.5, "n": 2}
    assert json.loads(predictions.read_text()) == [
        {"questionId": "201", "prediction": "yes"},
        {"questionId": "202", "prediction": "left"},
        {"questionId": "203", "prediction": "the table"},
        {"questionId": "204", "prediction": "no"},
    ]


def test_unbalanced_questions_may_go_unanswered(questions_file, tmp_path):
    result = score_gqa(questions_file, _answers(tmp_path, {"201": "yes", "202": "left", "203": "table"}))
    assert result["accuracy"] == 1.0


def test_mismatching_answers_are_refused(questions_file, tmp_path):
    with pytest.raises(EvalInputError, match="questions without an answer: '203'"):
        score_gqa(questions_file, _answers(tmp_path, {"201": "yes", "202": "left"}))
    with pytest.raises(EvalInputError, match="not in the questions: '999'"):
        score_gqa(questions_file, _answers(tmp_path, {"201": "yes", "202": "left", "203": "table", "999": "x"}))


@pytest.mark.parametrize("text, prediction", [("Yes.", "yes"), ("yes...", "yes"), ("Yes. ", "yes. "), ("3.5", "3.5")])
def test_prediction_strips_trailing_periods_only(text, prediction):
    assert gqa_prediction(text) == prediction


def test_cli(questions_file, tmp_path, capsys):
    out = tmp_path / "scores.json"
    result_file = _answers(tmp_path, {"201": "yes", "202": "no", "203": "table"})
    main(["--questions", questions_file, "--result-file", result_file, "--output-json", str(out)])
    assert "Accuracy: 66.67%" in capsys.readouterr().out
    assert {"accuracy", "n", "per_structural_type"} <= set(json.loads(out.read_text()))
