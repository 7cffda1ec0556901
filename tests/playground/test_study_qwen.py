"""The playground study on the second architecture (``--arch qwen2_5_vl``): transformers' own
Qwen2.5-VL on DigitGrid images of varying size, through the same stages, scripts, loader and
scorer as the LLaVA-1.5 study (``--smoke``: every stage runs, nothing is expected to learn)."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from playground import study
from playground.digitgrid import CELL, GRID, SIZES, write_eval_data
from playground.qwen import image_processor, image_tokens
from playground.tower import token_cells


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("playground-qwen")
    summary = study.main(["--arch", "qwen2_5_vl", "--smoke", "--workdir", str(workdir)])
    return workdir, workdir / "runs" / "qwen2_5_vl-smoke", summary


def test_varying_size_images_follow_the_rule(tmp_path):
    """Every image is the 96 x 96 grid resized to a width and height from SIZES: sizes vary, and
    a cell the answer calls empty is white at its place in the resized image."""
    write_eval_data(str(tmp_path), 24, seed=5, secondary_images=0, sizes=SIZES)
    truth = [json.loads(line) for line in open(tmp_path / "digitgrid_answers.jsonl")]
    sizes = set()
    for record in truth:
        image = Image.open(tmp_path / "images" / f"eval_{record['question_id'][:5]}.png").convert("L")
        assert image.size[0] in SIZES and image.size[1] in SIZES
        sizes.add(image.size)
        back = np.asarray(image.resize((GRID * CELL, GRID * CELL), Image.BILINEAR)).astype(float)
        cells = record["answer"].replace(";", " ").split()
        assert len(cells) == GRID * GRID
        for index, cell in enumerate(cells):
            row, col = divmod(index, GRID)
            inner = back[row * CELL + 3:(row + 1) * CELL - 3, col * CELL + 3:(col + 1) * CELL - 3]
            if cell == "_":
                assert inner.min() > 250, (record["question_id"], index)
            else:
                assert inner.min() < 160, (record["question_id"], index)
    assert len(sizes) >= 4 and len({image_tokens(*s) for s in sizes}) >= 3


def test_tokens_per_image_and_token_cells_by_hand():
    # one token per 12 x 12 px: 120 -> 10, 168 -> 14
    assert image_tokens(120, 168) == 10 * 14 and image_tokens(144, 144) == 144
    rows, cols = token_cells(10, 14)
    # token centres at (i + 0.5) * 4 / n cells: 10 rows -> 0.2, 0.6, 1.0, ... 3.8
    assert rows.reshape(10, 14)[:, 0].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # 14 columns -> 0.14, 0.43, 0.71, 1.0, ... 2.71, 3.0, ... 3.86 (a centre on a border: the cell after it)
    assert cols.reshape(10, 14)[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_the_processor_groups_patches_by_merged_token_row_major():
    """The tower's labels assume merged token k covers block (k // cols, k % cols) of 12 x 12 px:
    an image whose every 12 px block has its own grey level shows that order in the patches."""
    processor = image_processor()
    levels = np.arange(10 * 14, dtype=float).reshape(10, 14) + 40
    pixels = np.kron(levels, np.ones((12, 12))).astype(np.uint8)
    encoded = processor(images=[Image.fromarray(pixels).convert("RGB")], return_tensors="pt")
    assert encoded["image_grid_thw"].tolist() == [[1, 20, 28]]
    # 4 patches per merged token, in order; each patch is channels x 2 frames x 6 x 6
    patches = encoded["pixel_values"].reshape(140, 4, 3, -1).mean(dim=(1, 3))
    grey = (patches * torch.tensor(processor.image_std) + torch.tensor(processor.image_mean)).mean(1) * 255
    assert torch.allclose(grey, torch.as_tensor(levels.ravel(), dtype=grey.dtype), atol=0.5)


def test_the_qwen_run_has_the_tables_on_fractions_of_each_images_tokens(qwen_run):
    _, run_dir, summary = qwen_run
    assert {"results.json", "results.md", "accuracy_vs_tokens.png"} <= set(os.listdir(run_dir))
    markdown = summary["markdown"]
    assert markdown.startswith("# DigitGrid: ADSC in miniature on Qwen2.5-VL")
    assert "share of image's tokens (%)" in markdown
    rows = {row["setting"]: row for row in summary["rows"]}
    assert rows["full"]["average_vision_token_fraction"] == pytest.approx(1.0)
    for label, fraction in (("1of3", 1 / 3), ("2of9", 2 / 9), ("1of9", 1 / 9)):
        for name in (f"adsc-{label}", f"training-free-{label}", f"random-{label}", f"fastv-{label}",
                     f"pdrop-{label}"):
            assert rows[name]["average_vision_token_fraction"] == pytest.approx(fraction, abs=0.01), name
            assert f"| {name} |" in markdown
    assert not any(name.startswith(("tome", "visionzip", "pool")) for name in rows)


def test_the_report_costs_are_what_each_call_ran_and_the_profilers(qwen_run):
    """Per row, the mean vision tokens the model's own trace reports over the evaluation answers
    equal the profiler's per-image schedules averaged over the same images; FLOPs and KV are
    ``model_cost`` at each image's size, averaged."""
    from adsc_patch.profile import Workload, load_shape, model_cost
    from playground.report import ANSWER_TOKENS

    workdir, run_dir, summary = qwen_run
    cost = summary["efficiency"]
    eval_dir = workdir / "data" / "eval" / ("digitgrid-sizes" + "-".join(map(str, SIZES)))
    questions = [json.loads(line) for line in open(eval_dir / "digitgrid_questions.jsonl")]
    sizes = [Image.open(eval_dir / "images" / q["image"]).size for q in questions if q["category"] == "transcribe"]
    for name in ("full", "adsc-1of9", "training-free-2of9", "fastv-1of3", "pdrop-1of9"):
        scores = json.loads((run_dir / "answers" / f"{name}.scores.json").read_text())
        assert scores["average_vision_tokens"] == pytest.approx(cost[name]["average_vision_tokens"], abs=1e-3), name
        assert scores["average_vision_token_fraction"] == pytest.approx(
            cost[name]["average_vision_token_fraction"], abs=1e-5), name
    shape = load_shape(str(run_dir / "checkpoints" / "full"))
    a = cost["_assumptions"]
    expected = []
    for width, height in sizes:
        workload = Workload(text_tokens=a["text_tokens"], new_tokens=ANSWER_TOKENS, bytes_per_value=4,
                            image_width=width, image_height=height)
        expected.append(model_cost(shape, "fastv", None, workload, [1], budget_fraction=1 / 3))
    assert cost["fastv-1of3"]["gflops"] == pytest.approx(np.mean([c.language_model_flops for c in expected]) / 1e9)
    assert cost["fastv-1of3"]["peak_kv_kb"] == pytest.approx(np.mean([c.kv_peak_bytes for c in expected]) / 2**10)
    assert cost["adsc-1of9"]["gflops"] < cost["adsc-1of3"]["gflops"] < cost["full"]["gflops"]


def test_evaluation_batches_mix_token_counts_and_checkpoints_record_their_fraction(qwen_run):
    from llava.model.vlm import load_transformers_vlm

    workdir, run_dir, _ = qwen_run
    eval_dir = workdir / "data" / "eval" / ("digitgrid-sizes" + "-".join(map(str, SIZES)))
    questions = [json.loads(line) for line in open(eval_dir / "digitgrid_questions.jsonl")]
    first_batch = questions[:8]  # the smoke preset's evaluation batch
    assert len({image_tokens(*Image.open(eval_dir / "images" / q["image"]).size) for q in first_batch}) >= 2
    for label, fraction in (("1of3", 1 / 3), ("1of9", 1 / 9)):
        loaded = load_transformers_vlm(str(run_dir / "checkpoints" / f"adsc-{label}"), device="cpu")
        assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert loaded.recorded.budget_fraction == pytest.approx(fraction, abs=1e-5)
        assert loaded.recorded.layers == (1, 4) and loaded.recorded.method == "adsc"
    log = (run_dir / "train-adsc-1of9.log").read_text()  # the user-facing script ran, by fractions
    assert "[finetune_adsc_lora]" in log and "launcher=python" in log
    assert "budget fractions 0.0889, 0.1000, 0.1111" in log


def test_the_qwen_study_refuses_baselines_that_prune_before_the_decoder(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"baselines": ["fastv", "tome"]}))
    with pytest.raises(SystemExit):
        study.main(["--arch", "qwen2_5_vl", "--smoke", "--workdir", str(tmp_path), "--config", str(config)])
    assert "tome prune" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_run_is_bit_for_bit_the_same(qwen_run, tmp_path):
    """The same seeds in another folder (one budget, no baselines, to save time): the same
    weights at every stage and the same answers."""
    _, first, summary = qwen_run
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"budgets": ["1of9"], "baselines": []}))
    again = study.main(["--arch", "qwen2_5_vl", "--smoke", "--workdir", str(tmp_path / "w"), "--config", str(config)])
    second = tmp_path / "w" / "runs" / "qwen2_5_vl-smoke"
    for path in ("checkpoints/tower/model.safetensors", "checkpoints/full/model.safetensors",
                 "checkpoints/adsc-1of9/model.safetensors", "answers/full.jsonl", "answers/adsc-1of9.jsonl"):
        assert _digest(first / path) == _digest(second / path), path
    rows = {r["setting"]: r["cell_accuracy"] for r in summary["rows"]}
    assert {r["setting"]: r["cell_accuracy"] for r in again["rows"]} == {
        name: rows[name] for name in ("full", "training-free-1of9", "adsc-1of9")}
