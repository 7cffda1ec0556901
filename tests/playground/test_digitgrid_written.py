"""DigitGrid as written to disk: the held-out split and every answer, read back from the pixels.

Each cell of a written image is identified without the writer's bookkeeping: its 24 x 24 crop
is sampled back to 8 x 8 values, looked up among ``load_digits()``'s images (no two are equal),
and the crop is then checked pixel for pixel against the recipe of the module docstring. The
pools come from the docstring's rule (index divisible by 5: evaluation only), not from
``digit_pool``; the answers from the cells so recovered, by the rules written here.
"""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from playground.digitgrid import Grid, questions_for, write_eval_data, write_training_data

SHORT = "\nAnswer the question using a single word or phrase."
PATTERNS = {
    "transcribe": re.compile(r"^Describe the grid\.$"),
    "read": re.compile(r"^What digit is in row ([1-4]), column ([1-4])\?$"),
    "count": re.compile(r"^How many times does the digit (\d) appear\?$"),
    "exist": re.compile(r"^Is there a (\d) in the image\?$"),
    "locate": re.compile(r"^In which row is the digit (\d)\?$"),
}


@pytest.fixture(scope="module")
def glyphs():
    digits = load_digits()
    table = {image.astype(np.uint8).tobytes(): index for index, image in enumerate(digits.images)}
    assert len(table) == len(digits.images)  # every glyph is identifiable by its pixels
    return digits, table


def _read_cells(path, glyphs):
    """``load_digits`` index per cell (row-major, ``None`` for a white cell) of a written image."""
    digits, table = glyphs
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape == (96, 96, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    gray = pixels[..., 0]
    sources = []
    for row in range(4):
        for col in range(4):
            crop = gray[row * 24:(row + 1) * 24, col * 24:(col + 1) * 24]
            if (crop == 255).all():
                sources.append(None)
                continue
            values = np.round((255 - crop[::3, ::3]) * 16 / 255).astype(np.uint8)
            index = table.get(values.tobytes())
            assert index is not None, f"{path}: row {row + 1}, column {col + 1} holds no load_digits glyph"
            drawn = np.round(255 - np.kron(digits.images[index], np.ones((3, 3))) * 255 / 16)
            assert np.array_equal(crop, drawn), f"{path}: row {row + 1}, column {col + 1} is not glyph {index}"
            sources.append(index)
    return sources


def _digits_of(sources, glyphs):
    return [None if s is None else int(glyphs[0].target[s]) for s in sources]


def _expected_answer(category, question, cells):
    """The answer by the task's rules, from the cells read back from the pixels."""
    match = PATTERNS[category].match(question)
    assert match, f"{category} question not in the fixed format: {question!r}"
    if category == "transcribe":
        return " ; ".join(" ".join("_" if c is None else str(c) for c in cells[r * 4:(r + 1) * 4]) for r in range(4))
    if category == "read":
        row, col = int(match.group(1)), int(match.group(2))
        digit = cells[(row - 1) * 4 + (col - 1)]
        assert digit is not None, f"read asks about an empty cell: {question!r}"
        return str(digit)
    digit = int(match.group(1))
    occurrences = len([c for c in cells if c is not None and c == digit])
    if category == "count":
        return str(occurrences)
    if category == "exist":
        return "Yes" if occurrences else "No"
    assert occurrences == 1, f"locate asks about a digit present {occurrences} times"
    return str([i for i, c in enumerate(cells) if c == digit][0] // 4 + 1)


# ------------------------------------------------------------------ held-out split
@pytest.fixture(scope="module")
def smallest(tmp_path_factory):
    """The smallest configuration of test_digitgrid.py's file test."""
    root = tmp_path_factory.mktemp("digitgrid_small")
    train = write_training_data(str(root / "train"), images=6, seed=0, secondary_share=1.0)
    questions, truth = write_eval_data(str(root / "eval"), images=3, seed=1, secondary_images=1)
    return root, train, questions, truth


def test_written_evaluation_images_hold_only_evaluation_glyphs(smallest, glyphs):
    root, _, questions, _ = smallest
    folder = root / "eval" / "images"
    names = sorted(os.listdir(folder))
    assert names == [f"eval_{i:05d}.png" for i in range(3)]
    referenced = {json.loads(line)["image"] for line in open(questions)}
    assert referenced == set(names)
    drawn = [s for name in names for s in _read_cells(folder / name, glyphs) if s is not None]
    assert len(drawn) >= 8  # enough filled cells to mean something
    wrong = [s for s in drawn if s % 5 != 0]
    assert not wrong, f"evaluation images hold training glyphs {wrong}"


def test_written_training_images_hold_only_training_glyphs(smallest, glyphs):
    root, train, _, _ = smallest
    folder = root / "train"
    names = sorted(os.listdir(folder / "images"))
    assert names == [f"train_{i:06d}.png" for i in range(6)]
    referenced = {record["image"] for record in json.load(open(train))}
    assert referenced == {f"images/{name}" for name in names}
    drawn = [s for name in names for s in _read_cells(folder / "images" / name, glyphs) if s is not None]
    assert len(drawn) >= 16
    held_out = [s for s in drawn if s % 5 == 0]
    assert not held_out, f"training images hold evaluation glyphs {held_out}"


# ------------------------------------------------------------------ answers
@pytest.fixture(scope="module")
def written_eval(tmp_path_factory, glyphs):
    root = tmp_path_factory.mktemp("digitgrid_eval")
    questions, truth = write_eval_data(str(root), images=60, seed=7)
    cells = {}
    for name in sorted(os.listdir(root / "images")):
        cells[name] = _digits_of(_read_cells(root / "images" / name, glyphs), glyphs)
    questions = [json.loads(line) for line in open(questions)]
    truth = {t["question_id"]: t for t in map(json.loads, open(truth))}
    return cells, questions, truth


def test_written_evaluation_answers_follow_the_cells(written_eval):
    cells, questions, truth = written_eval
    asked = {c: 0 for c in PATTERNS}
    first_cell_counted = 0
    for question in questions:
        category = question["category"]
        record = truth[question["question_id"]]
        assert record["category"] == category
        text = question["text"]
        if category != "transcribe":
            assert text.endswith(SHORT)
            text = text[:-len(SHORT)]
        grid = cells[question["image"]]
        assert record["answer"] == _expected_answer(category, text, grid), (question, grid)
        asked[category] += 1
        if category == "count" and grid[0] is not None and f"digit {grid[0]} " in text:
            first_cell_counted += 1
    assert asked["transcribe"] == asked["count"] == asked["exist"] == 60 and asked["read"] > 0 and asked["locate"] > 0
    assert first_cell_counted >= 2  # the data exercise a count that includes the first cell
    answers = [truth[q["question_id"]]["answer"] for q in questions]
    assert {"Yes", "No"} <= set(answers)


def test_written_training_answers_follow_the_cells(tmp_path, glyphs):
    path = write_training_data(str(tmp_path), images=40, seed=5, secondary_share=1.0)
    records = json.load(open(path))
    seen = set()
    for record in records:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        category = record["id"].rsplit("-", 1)[1]
        question = human["value"].removeprefix("<image>\n")
        if category != "transcribe":
            assert question.endswith(SHORT)
            question = question[:-len(SHORT)]
        grid = _digits_of(_read_cells(os.path.join(tmp_path, record["image"]), glyphs), glyphs)
        assert gpt["value"] == _expected_answer(category, question, grid), (record, grid)
        seen.add(category)
    assert seen == set(PATTERNS) and len(records) == 80


def test_count_and_exist_answers_over_many_grids():
    """``questions_for`` on grids built here (every digit often in the first and last cell)."""
    rng = np.random.default_rng(11)
    first_cell_counted = last_cell_counted = 0
    for seed in range(400):
        cells = tuple(None if rng.random() < 0.25 else int(rng.integers(10)) for _ in range(16))
        grid = Grid(cells, tuple(None if c is None else 0 for c in cells))
        answers = {}
        for category, question, answer in questions_for(grid, np.random.default_rng(seed)):
            assert answer == _expected_answer(category, question, list(cells)), (category, question, cells)
            answers[category] = question
        count_digit = int(PATTERNS["count"].match(answers["count"]).group(1))
        first_cell_counted += cells[0] == count_digit
        last_cell_counted += cells[15] == count_digit
    assert first_cell_counted >= 10 and last_cell_counted >= 10
