"""DigitGrid, the playground's task: fixed format, real digits, disjoint splits."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from llava.train.data import load_records, validate_records
from playground.digitgrid import (
    CELL, GRID, SHORT_ANSWER, TRANSCRIBE_PROMPT, Grid, digit_pool, questions_for, random_grid, write_eval_data,
    write_training_data,
)


def test_splits_are_disjoint_by_index_modulo_five():
    train, evaluation = digit_pool("train"), digit_pool("eval")
    assert set(train).isdisjoint(evaluation) and len(train) + len(evaluation) == len(load_digits().images)
    assert all(i % 5 == 0 for i in evaluation) and all(i % 5 for i in train)
    rng = np.random.default_rng(0)
    drawn = {s for _ in range(50) for s in random_grid(rng, "eval").sources if s is not None}
    assert drawn <= set(evaluation.tolist())


def test_rendering_follows_the_fixed_recipe():
    digits = load_digits()
    grid = Grid(cells=(int(digits.target[7]),) + (None,) * 15, sources=(7,) + (None,) * 15)
    image = grid.render()
    assert image.size == (96, 96) and image.mode == "RGB"
    pixels = np.asarray(image)[..., 0].astype(int)
    expected = np.round(255 - np.kron(digits.images[7], np.ones((3, 3))) * 255 / 16)
    assert np.array_equal(pixels[:CELL, :CELL], expected)
    assert (pixels[CELL:, :] == 255).all() and (pixels[:, CELL:] == 255).all()


def test_transcription_and_questions():
    cells = (5, None, 3, 8, 1, None, None, 2, 0, 9, None, 4, 7, 7, None, 6)
    grid = Grid(cells, tuple(None if c is None else 0 for c in cells))
    assert grid.transcription() == "5 _ 3 8 ; 1 _ _ 2 ; 0 9 _ 4 ; 7 7 _ 6"
    questions = {category: (q, a) for category, q, a in questions_for(grid, np.random.default_rng(1))}
    assert questions["transcribe"] == (TRANSCRIBE_PROMPT, grid.transcription())
    assert set(questions) == {"transcribe", "read", "count", "exist", "locate"}
    row, col = (int(x) for x in questions["read"][0].removeprefix("What digit is in row ").rstrip("?").split(", column "))
    assert questions["read"][1] == str(cells[(row - 1) * GRID + col - 1])
    digit = int(questions["locate"][0].split()[-1].rstrip("?"))
    assert cells.count(digit) == 1 and questions["locate"][1] == str(cells.index(digit) // GRID + 1)


def test_empty_cells_appear_with_the_fixed_probability():
    rng = np.random.default_rng(0)
    empty = np.mean([c is None for _ in range(400) for c in random_grid(rng, "train").cells])
    assert empty == pytest.approx(0.25, abs=0.02)


def test_files_are_in_llava_and_eval_formats(tmp_path):
    train = write_training_data(str(tmp_path / "train"), images=6, seed=0, secondary_share=1.0)
    records = load_records(train)
    kept, skipped = validate_records(records, str(tmp_path / "train"))
    assert len(kept) == 12 and not skipped
    assert records[0]["conversations"][0]["value"] == "<image>\n" + TRANSCRIBE_PROMPT
    assert records[1]["conversations"][0]["value"].endswith(SHORT_ANSWER)
    questions, truth = write_eval_data(str(tmp_path / "eval"), images=3, seed=1, secondary_images=1)
    questions = [json.loads(line) for line in open(questions)]
    truth = [json.loads(line) for line in open(truth)]
    assert [q["question_id"] for q in questions] == [t["question_id"] for t in truth]
    assert set(questions[0]) == {"question_id", "image", "text", "category"}
    assert set(truth[0]) == {"question_id", "answer", "category"}
    assert sum(q["category"] == "transcribe" for q in questions) == 3
    assert all(q["text"].endswith(SHORT_ANSWER) == (q["category"] != "transcribe") for q in questions)
    assert all(q["image"].startswith("eval_00000") for q in questions if q["category"] != "transcribe")
    image = Image.open(os.path.join(tmp_path, "eval", "images", questions[0]["image"]))
    assert image.size == (96, 96)
