"""The DigitGrid scorer: per-cell transcription accuracy, exact match, short answers, bad input."""

import json

import pytest

from llava.eval.eval_digitgrid import main, parse_transcription, score_digitgrid
from llava.eval.io import EvalInputError

TRUTH = [
    {"question_id": "0-transcribe", "answer": "5 _ 3 8 ; 1 _ _ 2 ; 0 9 _ 4 ; 7 7 _ 6", "category": "transcribe"},
    {"question_id": "1-transcribe", "answer": "_ _ _ _ ; 1 2 3 4 ; 5 6 7 8 ; 9 0 _ _", "category": "transcribe"},
    {"question_id": "0-read", "answer": "3", "category": "read"},
    {"question_id": "0-exist", "answer": "Yes", "category": "exist"},
    {"question_id": "1-exist", "answer": "No", "category": "exist"},
]


def _files(tmp_path, answers):
    gt, result = tmp_path / "gt.jsonl", tmp_path / "answers.jsonl"
    gt.write_text("".join(json.dumps(t) + "\n" for t in TRUTH))
    result.write_text("".join(json.dumps({"question_id": q, "prompt": "p", "text": t}) + "\n"
                              for q, t in answers.items()))
    return str(gt), str(result)


def test_parse_transcription_marks_missing_and_malformed_cells():
    assert parse_transcription("5 _ 3 8 ; 1 _ _ 2 ; 0 9 _ 4 ; 7 7 _ 6") == list("5_381__209_477_6")
    cells = parse_transcription("5 _ 3 ; 1 x _ 2 ; 0 9 _ 4 12")
    assert cells[:4] == ["5", "_", "3", None]  # a short row: the missing cell is wrong
    assert cells[4:8] == ["1", None, "_", "2"]  # "x" is not a cell
    assert cells[8:12] == ["0", "9", "_", "4"]  # extra text after a row's 4 cells is ignored
    assert cells[12:] == [None] * 4  # a missing row
    assert parse_transcription("") == [None] * 16


def test_scores_cells_exact_match_and_short_answers(tmp_path):
    gt, result = _files(tmp_path, {
        "0-transcribe": "5 _ 3 8 ; 1 _ _ 2 ; 0 9 _ 4 ; 7 7 _ 6",  # all 16 right
        "1-transcribe": "_ _ _ _ ; 1 2 3 4 ; 5 6 7 8 ; 9 0 _",  # 15 right, last cell missing
        "0-read": "3.", "0-exist": "yes", "1-exist": "Yes",
    })
    scores = score_digitgrid(gt, result)
    assert scores["transcribe"] == {"cell_accuracy": 31 / 32, "exact_match": 0.5, "n": 2}
    assert scores["read"] == {"accuracy": 1.0, "n": 1}
    assert scores["exist"] == {"accuracy": 0.5, "n": 2}


def test_cli_writes_the_json_keys(tmp_path, capsys):
    gt, result = _files(tmp_path, {q["question_id"]: q["answer"] for q in TRUTH})
    main(["--gt-file", gt, "--result-file", result, "--output-json", str(tmp_path / "s.json")])
    written = json.loads((tmp_path / "s.json").read_text())
    assert set(written) == {"transcribe", "read", "exist"}
    assert written["transcribe"]["cell_accuracy"] == 1.0 and "transcribe: cell_accuracy 1.0000" in capsys.readouterr().out


def test_answers_of_other_questions_are_refused(tmp_path):
    answers = {q["question_id"]: q["answer"] for q in TRUTH}
    answers["9-read"] = answers.pop("0-read")
    gt, result = _files(tmp_path, answers)
    with pytest.raises(EvalInputError, match="'9-read'.*'0-read'"):
        score_digitgrid(gt, result)


def test_cli_names_a_bad_input_file_and_writes_nothing(tmp_path):
    gt, result = _files(tmp_path, {q["question_id"]: q["answer"] for q in TRUTH})
    with open(result, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "s.json"
    with pytest.raises(SystemExit, match=r"error: .*answers.jsonl:6 is not valid JSON"):
        main(["--gt-file", gt, "--result-file", result, "--output-json", str(out)])
    assert not out.exists()


def _score_pair(tmp_path, category, truth, answer):
    """The score of one answer against one ground truth, through the files the scorer reads."""
    folder = tmp_path / f"pair{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    gt, result = folder / "gt.jsonl", folder / "answers.jsonl"
    gt.write_text(json.dumps({"question_id": "q", "answer": truth, "category": category}) + "\n")
    result.write_text(json.dumps({"question_id": "q", "prompt": "p", "text": answer}) + "\n")
    return score_digitgrid(str(gt), str(result))[category]


@pytest.mark.parametrize("category", ["read", "count", "exist", "locate"])
@pytest.mark.parametrize("truth, answer, right", [
    ("7", "7.", True),  # the documented final period is dropped from the answer...
    ("7.", "7", True),  # ... and from the ground truth
    ("7", " 7. ", True),  # trimmed first, then the period
    ("Yes", "yes.", True),  # case-insensitive as well
    ("7", "7", True),
    ("7", "1.", False),  # dropping the period never makes a wrong answer right
    ("7", "7.0", False),  # only a final period goes, not one inside the answer
    ("7", ".7", False),
    ("7", "7,", False),  # nor other punctuation
    ("Yes", "No.", False),
])
def test_a_final_period_is_dropped_from_short_answers_and_nothing_else(tmp_path, category, truth, answer, right):
    assert _score_pair(tmp_path, category, truth, answer) == {"accuracy": float(right), "n": 1}


def test_a_final_period_is_dropped_from_a_transcription(tmp_path):
    truth = "5 _ 3 8 ; 1 _ _ 2 ; 0 9 _ 4 ; 7 7 _ 6"
    assert _score_pair(tmp_path, "transcribe", truth, truth + ".") == {"cell_accuracy": 1.0, "exact_match": 1.0, "n": 1}
    assert _score_pair(tmp_path, "transcribe", truth, truth[:-1] + "6.") == {
        "cell_accuracy": 1.0, "exact_match": 1.0, "n": 1}
    # the last cell "6.5" is no cell at all: wrong, the 15 others right
    assert _score_pair(tmp_path, "transcribe", truth, truth[:-1] + "6.5") == {
        "cell_accuracy": 15 / 16, "exact_match": 0.0, "n": 1}
    assert _score_pair(tmp_path, "transcribe", truth, truth[:-1] + "5.") == {
        "cell_accuracy": 15 / 16, "exact_match": 0.0, "n": 1}
