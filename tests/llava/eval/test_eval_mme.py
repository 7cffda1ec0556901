"""MME scorer: the official numbers on the oracle files, both release layouts, refusals."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest

from llava.eval.eval_mme import COGNITION, PERCEPTION, main, parse_mme_answer, score_mme
from llava.eval.io import EvalInputError
from tests.helpers import read_lines, write_lines

# From the oracle README (LLaVA's conversion, then MME's calculation.py, on the released 13B answers).
OFFICIAL_SUBTASKS = {
    "existence": 185.0, "count": 155.0, "position": 133.33333333333334, "color": 170.0,
    "posters": 160.54421768707482, "celebrity": 152.94117647058823, "scene": 161.25, "landmark": 170.5,
    "artwork": 117.75, "OCR": 125.0, "commonsense_reasoning": 127.85714285714286,
    "numerical_calculation": 42.5, "text_translation": 77.5, "code_reasoning": 47.5,
}
OFFICIAL_PERCEPTION = 1531.3187274909965
OFFICIAL_COGNITION = 295.3571428571429


@pytest.fixture(scope="module")
def mme(oracles_dir):
    root = os.path.join(oracles_dir, "mme")
    return {
        "gt_dir": os.path.join(root, "MME_Benchmark_release_version"),
        "result_file": os.path.join(root, "answers_llava-v1.5-13b.jsonl"),
    }


@pytest.fixture(scope="module")
def official_result(mme):
    return score_mme(**mme)


def test_reproduces_the_official_totals(official_result):
    assert official_result["perception"] == OFFICIAL_PERCEPTION
    assert official_result["cognition"] == OFFICIAL_COGNITION
    assert official_result["total"] == OFFICIAL_PERCEPTION + OFFICIAL_COGNITION


@pytest.mark.parametrize("subtask", sorted(OFFICIAL_SUBTASKS))
def test_reproduces_every_subtask_score(official_result, subtask):
    got = official_result["subtasks"][subtask]
    assert got["score"] == OFFICIAL_SUBTASKS[subtask]
    assert got["score"] == pytest.approx(100 * got["acc"] + 100 * got["acc_plus"], abs=1e-12)


def test_subtask_groups_and_sizes(official_result):
    assert set(official_result["subtasks"]) == set(PERCEPTION) | set(COGNITION)
    assert len(PERCEPTION) == 10 and len(COGNITION) == 4
    assert sum(s["n"] for s in official_result["subtasks"].values()) == 2374
    assert official_result["subtasks"]["artwork"]["n"] == 400


def test_shuffled_answers_score_the_same(mme, official_result, tmp_path):
    lines = read_lines(mme["result_file"])
    random.Random(1).shuffle(lines)
    assert score_mme(mme["gt_dir"], write_lines(tmp_path / "a.jsonl", lines)) == official_result


def test_images_and_questions_answers_yn_layout(mme, official_result, tmp_path):
    """The release variant with ``<category>/images`` and ``<category>/questions_answers_YN``."""
    gt_dir = tmp_path / "MME_Benchmark_release_version"
    nested = {"artwork", "celebrity", "landmark", "posters", "scene"}
    for category in os.listdir(mme["gt_dir"]):
        source = os.path.join(mme["gt_dir"], category)
        target = gt_dir / category / "questions_answers_YN" if category in nested else gt_dir / category
        shutil.copytree(source, target)
        if category in nested:
            (gt_dir / category / "images").mkdir()
            # A stray .txt next to the images must not be read as ground truth.
            (gt_dir / category / "notes.txt").write_text("not\tground truth\tat all\n")
    assert score_mme(str(gt_dir), mme["result_file"]) == official_result


def test_small_fixture_in_the_nested_layout(tmp_path):
    """Hand-checked scores on one image per subtask, the ground truth under questions_answers_YN."""
    gt_dir = tmp_path / "gt"
    answers = []
    for category in PERCEPTION + COGNITION:
        folder = gt_dir / category / "questions_answers_YN"
        folder.mkdir(parents=True)
        (gt_dir / category / "images").mkdir()
        (folder / "0001.txt").write_text(
            "Is it red? Please answer yes or no.\tYes\nIs it blue?  Please answer yes or no.\tNo\n"
        )
        # existence: both right; count: one right; every other subtask: both wrong.
        first, second = {"existence": ("Yes", "No"), "count": ("Yes", "Yes")}.get(category, ("No", "Maybe"))
        for question, text in (("Is it red?", first), ("Is it blue?", second)):
            answers.append({
                "question_id": f"{category}/images/0001.jpg",
                "prompt": f"{question}\nAnswer the question using a single word or phrase.",
                "text": text,
            })
    result_file = write_lines(tmp_path / "a.jsonl", [json.dumps(a) + "\n" for a in answers])
    result = score_mme(str(gt_dir), result_file)
    assert result["subtasks"]["existence"] == {"score": 200.0, "acc": 1.0, "acc_plus": 1.0, "n": 2}
    assert result["subtasks"]["count"] == {"score": 50.0, "acc": 0.5, "acc_plus": 0.0, "n": 2}
    assert result["subtasks"]["OCR"]["score"] == 0.0
    assert result["perception"] == 250.0
    assert result["cognition"] == 0.0


def test_answer_to_an_unknown_question_is_refused(mme, tmp_path):
    lines = read_lines(mme["result_file"])
    extra = json.loads(lines[0])
    extra["prompt"] = "Is this a question MME never asked?\nAnswer the question using a single word or phrase."
    with pytest.raises(EvalInputError, match="not in the ground truth: .*Is this a question MME never asked"):
        score_mme(mme["gt_dir"], write_lines(tmp_path / "a.jsonl", lines + [json.dumps(extra) + "\n"]))


def test_missing_and_duplicated_answers_are_refused(mme, tmp_path):
    lines = read_lines(mme["result_file"])
    assert json.loads(lines[0])["question_id"] == "code_reasoning/0020.png"
    with pytest.raises(EvalInputError, match=r"without an answer: \('code_reasoning/0020', 'Is a python code shown"):
        score_mme(mme["gt_dir"], write_lines(tmp_path / "missing.jsonl", lines[1:]))
    with pytest.raises(EvalInputError, match="answered twice"):
        score_mme(mme["gt_dir"], write_lines(tmp_path / "twice.jsonl", lines + lines[:1]))


def test_missing_subtask_folder_is_named(mme, tmp_path):
    gt_dir = tmp_path / "gt"
    shutil.copytree(mme["gt_dir"], gt_dir)
    shutil.rmtree(gt_dir / "OCR")
    with pytest.raises(EvalInputError, match="subtask folders missing: OCR"):
        score_mme(str(gt_dir), mme["result_file"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("  YES.", "yes"),
        ("No, it is not.", "no"),
        ("nothing", "no"),  # starts with "no"
        ("yesterday", "yes"),
        ("know", "no"),  # "no" within the first four characters
        ("'yes'", "yes"),
        ("a no", "no"),
        ("I don't know", "other"),
        ("The answer is yes", "other"),  # "yes" is past the first four characters
        ("Church", "other"),
        ("", "other"),
    ],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def test_cli_writes_the_scores(mme, tmp_path, capsys):
    out = tmp_path / "scores.json"
    main(["--gt-dir", mme["gt_dir"], "--result-file", mme["result_file"], "--output-json", str(out)])
    assert "Perception: 1531.32" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written) == {"perception", "cognition", "total", "subtasks"}
    assert set(written["subtasks"]["OCR"]) == {"score", "acc", "acc_plus", "n"}
    assert written["perception"] == OFFICIAL_PERCEPTION
