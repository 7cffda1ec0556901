"""TextVQA scorer on small hand-checked files, joined by question id or by (image id, question)."""

from __future__ import annotations

import json

import pytest

from llava.eval.eval_textvqa import main, question_from_prompt, score_textvqa
from llava.eval.io import EvalInputError

SUFFIX = "\nAnswer the question using a single word or phrase."


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _annotation_file(path, entries):
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": entries}))
    return str(path)


ENTRIES = [
    {"question_id": 10, "image_id": "img_a", "question": "What brand is this?",
     "answers": ["nikon"] * 4 + ["canon"] * 6},
    {"question_id": 11, "image_id": "img_a", "question": "What color is the car?",
     "answers": ["red"] * 3 + ["blue"] * 7},
    {"question_id": 12, "image_id": "img_b", "question": "What does it say?", "answers": ["stop"] * 10},
]
# "Nikon." scores 1.0, "Red" 0.9 (3 of 10 humans), "go" 0.
TEXTS = {10: "Nikon.", 11: "Red", 12: "go"}


def _prompt(entry, ocr="NIKON, STOP"):
    return f"{entry['question']}\nReference OCR token: {ocr}{SUFFIX}"


@pytest.fixture()
def annotation_file(tmp_path):
    return _annotation_file(tmp_path / "TextVQA_0.5.1_val.json", ENTRIES)


def test_joined_by_question_id(annotation_file, tmp_path):
    answers = [{"question_id": e["question_id"], "prompt": _prompt(e), "text": TEXTS[e["question_id"]]}
               for e in reversed(ENTRIES)]
    result = score_textvqa(annotation_file, _jsonl(tmp_path / "a.jsonl", answers))
    assert result == {"accuracy": pytest.approx(1.9 / 3, abs=1e-12), "n": 3, "joined_by": "question_id"}


def test_joined_by_image_id_and_question_as_llava_releases_them(annotation_file, tmp_path):
    answers = [{"question_id": e["image_id"], "prompt": _prompt(e), "text": TEXTS[e["question_id"]]} for e in ENTRIES]
    result = score_textvqa(annotation_file, _jsonl(tmp_path / "a.jsonl", answers))
    assert result == {"accuracy": pytest.approx(1.9 / 3, abs=1e-12), "n": 3, "joined_by": "image_id+question"}


def test_duplicate_image_question_pairs_use_the_last_annotation(tmp_path):
    entries = ENTRIES + [dict(ENTRIES[2], question_id=13, answers=["go"] * 10)]
    annotation_file = _annotation_file(tmp_path / "ann.json", entries)
    answers = [{"question_id": e["image_id"], "prompt": _prompt(e), "text": t}
               for e, t in zip(entries, ["Nikon.", "Red", "stop", "go"], strict=True)]
    result = score_textvqa(annotation_file, _jsonl(tmp_path / "a.jsonl", answers))
    # Both img_b answers are scored against question 13 (["go"] * 10), as upstream's dict does.
    assert result["accuracy"] == pytest.approx((1.0 + 0.9 + 0.0 + 1.0) / 4, abs=1e-12)
    with pytest.raises(EvalInputError, match=r"without an answer: \('img_b', 'what does it say\?'\)"):
        score_textvqa(annotation_file, _jsonl(tmp_path / "short.jsonl", answers[:3]))


def test_answers_from_another_file_are_refused(annotation_file, tmp_path):
    answers = [{"question_id": q, "prompt": "x\ny", "text": "a"} for q in (10, 11, 99)]
    with pytest.raises(EvalInputError, match="neither TextVQA question ids nor image ids: 99"):
        score_textvqa(annotation_file, _jsonl(tmp_path / "a.jsonl", answers))
    missing = [{"question_id": q, "prompt": "x\ny", "text": "a"} for q in (10, 11)]
    with pytest.raises(EvalInputError, match="questions without an answer: 12"):
        score_textvqa(annotation_file, _jsonl(tmp_path / "b.jsonl", missing))
    other_question = [{"question_id": "img_b", "prompt": f"What is this?{SUFFIX}", "text": "a"}]
    with pytest.raises(EvalInputError, match=r"not annotated: \('img_b', 'what is this\?'\)"):
        score_textvqa(annotation_file, _jsonl(tmp_path / "c.jsonl", other_question))


@pytest.mark.parametrize(
    "prompt, question",
    [
        (f"What Brand?\nReference OCR token: A, B{SUFFIX}", "what brand?"),
        ("Reference OCR token: A, B\nWhat Brand?\nAnswer briefly.", "what brand?"),
        (f"What Brand?{SUFFIX}", "what brand?"),
        ("OCR tokens: a b. Question: What Brand? Short answer:", "what brand?"),
    ],
)
def test_question_from_prompt(prompt, question):
    assert question_from_prompt(prompt) == question


def test_question_from_unrecognised_prompt_is_an_error():
    with pytest.raises(EvalInputError, match="cannot find the question"):
        question_from_prompt("one line only")


def test_cli(annotation_file, tmp_path, capsys):
    answers = [{"question_id": e["question_id"], "prompt": _prompt(e), "text": TEXTS[e["question_id"]]}
               for e in ENTRIES]
    out = tmp_path / "scores.json"
    main(["--annotation-file", annotation_file, "--result-file", _jsonl(tmp_path / "a.jsonl", answers),
          "--output-json", str(out)])
    assert "Accuracy: 63.33%" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert {"accuracy", "n"} <= set(written) and written["n"] == 3
