"""DigitGrid: the playground's task, on real handwritten digits (scikit-learn's ``load_digits``).

The task is fixed so that others can generate compatible data:

* An image is a 4 x 4 grid of 24 x 24 px cells (96 x 96 px RGB PNG, white). Each cell is
  empty with probability 0.25, else holds one 8 x 8 digit of ``load_digits()`` (values
  0-16) scaled up 3x (nearest) and drawn dark on white: ``255 - value * 255 / 16``.
* Digits whose index in ``load_digits()`` is divisible by 5 appear only in evaluation
  images, all others only in training images.
* ``transcribe`` (the main task): "Describe the grid." -> the 16 cells row by row, cells
  separated by a space, rows by " ; ", an empty cell as "_", e.g.
  ``5 _ 3 8 ; 1 _ _ 2 ; 0 9 _ 4 ; 7 7 _ 6``.
* Secondary questions: ``read`` "What digit is in row {r}, column {c}?" -> "{d}";
  ``count`` "How many times does the digit {d} appear?" -> "{n}"; ``exist`` "Is there a
  {d} in the image?" -> "Yes"/"No"; ``locate`` "In which row is the digit {d}?" -> "{r}"
  (a digit present once). Rows and columns count from 1. Evaluation questions other than
  ``transcribe`` end with "\\nAnswer the question using a single word or phrase.".
* Images of varying size (the study on a dynamic-resolution model, ``sizes=SIZES``): after
  an image's grid is drawn, its width and then its height are drawn independently from
  ``SIZES`` (96, 120, 144 px) and the 96 x 96 image is resized to them (bilinear); cells and
  answers are unchanged. A grid drawn at 96 x 96 is the fixed-size image exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image

from llava.eval.io import write_json_atomic, write_jsonl_atomic

GRID = 4
CELL = 24
IMAGE_SIZE = GRID * CELL
EMPTY_PROBABILITY = 0.25
EMPTY = "_"
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
TRANSCRIBE_PROMPT = "Describe the grid."
CATEGORIES = ("transcribe", "read", "count", "exist", "locate")
SIZES = (120, 144, 168)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits`` glyphs already drawn as 24 x 24 dark-on-white cells, and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    scaled = np.kron(data.images, np.ones((3, 3)))  # 8x8 -> 24x24, nearest
    glyphs = np.round(255 - scaled * 255 / 16).astype(np.uint8)
    return glyphs, data.target


def digit_pool(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` usable for ``split`` ("train" or "eval")."""
    glyphs, _ = _digits()
    index = np.arange(len(glyphs))
    if split == "eval":
        return index[index % 5 == 0]
    if split == "train":
        return index[index % 5 != 0]
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


@dataclass(frozen=True)
class Grid:
    """Digits per cell, row-major; ``None`` for an empty cell. ``sources`` are the
    ``load_digits`` indices drawn."""

    cells: tuple
    sources: tuple

    def render(self, size: tuple[int, int] | None = None) -> Image.Image:
        """The RGB image; ``size`` ``(width, height)``: resized to it (bilinear)."""
        glyphs, _ = _digits()
        canvas = np.full((IMAGE_SIZE, IMAGE_SIZE), 255, dtype=np.uint8)
        for position, source in enumerate(self.sources):
            if source is not None:
                row, col = divmod(position, GRID)
                canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = glyphs[source]
        image = Image.fromarray(canvas).convert("RGB")
        return image if size is None or tuple(size) == image.size else image.resize(tuple(size), Image.BILINEAR)

    def transcription(self) -> str:
        rows = []
        for row in range(GRID):
            rows.append(" ".join(EMPTY if c is None else str(c) for c in self.cells[row * GRID:(row + 1) * GRID]))
        return " ; ".join(rows)


def random_grid(rng: np.random.Generator, split: str) -> Grid:
    _, targets = _digits()
    pool = digit_pool(split)
    empty = rng.random(GRID * GRID) < EMPTY_PROBABILITY
    drawn = pool[rng.integers(len(pool), size=GRID * GRID)]
    sources = tuple(None if e else int(s) for e, s in zip(empty, drawn))
    cells = tuple(None if s is None else int(targets[s]) for s in sources)
    return Grid(cells, sources)


def random_size(rng: np.random.Generator, sizes: Sequence[int]) -> tuple[int, int]:
    """``(width, height)``, each drawn from ``sizes`` (width first)."""
    width = int(sizes[int(rng.integers(len(sizes)))])
    height = int(sizes[int(rng.integers(len(sizes)))])
    return width, height


def questions_for(grid: Grid, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """``(category, question, answer)`` for one image: a transcription and one of each
    secondary kind (when the grid allows it)."""
    out = [("transcribe", TRANSCRIBE_PROMPT, grid.transcription())]
    filled = [i for i, c in enumerate(grid.cells) if c is not None]
    if filled:
        position = int(rng.choice(filled))
        row, col = divmod(position, GRID)
        out.append(("read", f"What digit is in row {row + 1}, column {col + 1}?", str(grid.cells[position])))
    digit = int(rng.integers(10))
    count = sum(c == digit for c in grid.cells)
    out.append(("count", f"How many times does the digit {digit} appear?", str(count)))
    digit = int(rng.integers(10))
    out.append(("exist", f"Is there a {digit} in the image?", "Yes" if digit in grid.cells else "No"))
    once = [d for d in range(10) if sum(c == d for c in grid.cells) == 1]
    if once:
        digit = int(rng.choice(once))
        out.append(("locate", f"In which row is the digit {digit}?", str(grid.cells.index(digit) // GRID + 1)))
    return out


def write_training_data(out_dir: str, images: int, seed: int, secondary_share: float = 0.0,
                        sizes: Sequence[int] | None = None) -> str:
    """LLaVA JSON of ``images`` training grids: every image transcribed; with
    ``secondary_share`` > 0 that fraction of the images also gets one secondary question
    as a second sample; with ``sizes``, images of varying size (module docstring). Returns
    the JSON path (images in ``out_dir/images``)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for index in range(images):
        grid = random_grid(rng, "train")
        name = f"images/train_{index:06d}.png"
        grid.render(random_size(rng, sizes) if sizes else None).save(os.path.join(out_dir, name))
        questions = questions_for(grid, rng)
        records.append(_record(f"train-{index}-transcribe", name, *questions[0][1:]))
        if secondary_share > 0 and rng.random() < secondary_share:
            category, question, answer = questions[1 + int(rng.integers(len(questions) - 1))]
            records.append(_record(f"train-{index}-{category}", name, question + SHORT_ANSWER, answer))
    path = os.path.join(out_dir, "train.json")
    write_json_atomic(path, records)
    return path


def _record(ident: str, image: str, question: str, answer: str) -> dict:
    return {"id": ident, "image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def write_eval_data(out_dir: str, images: int, seed: int, secondary_images: int | None = None,
                    sizes: Sequence[int] | None = None) -> tuple[str, str]:
    """The evaluation question file and ground-truth file (JSON lines) in ``out_dir``: a
    transcription per image, and secondary questions for the first ``secondary_images``
    images (default: all); with ``sizes``, images of varying size (module docstring)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    questions, truth = [], []
    for index in range(images):
        grid = random_grid(rng, "eval")
        name = f"eval_{index:05d}.png"
        grid.render(random_size(rng, sizes) if sizes else None).save(os.path.join(out_dir, "images", name))
        for category, question, answer in questions_for(grid, rng):
            if category != "transcribe" and secondary_images is not None and index >= secondary_images:
                continue
            qid = f"{index:05d}-{category}"
            text = question if category == "transcribe" else question + SHORT_ANSWER
            questions.append({"question_id": qid, "image": name, "text": text, "category": category})
            truth.append({"question_id": qid, "answer": answer, "category": category})
    question_file = os.path.join(out_dir, "digitgrid_questions.jsonl")
    truth_file = os.path.join(out_dir, "digitgrid_answers.jsonl")
    write_jsonl_atomic(question_file, questions)
    write_jsonl_atomic(truth_file, truth)
    return question_file, truth_file
