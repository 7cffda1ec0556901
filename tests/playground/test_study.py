"""The playground study end to end in its --smoke preset: every stage runs through the user-facing
code (training script, merge, model_vqa_loader, scorer) and leaves the run folder the README shows."""

import json
import os

import pytest
import torch

from llava.model.builder import load_pretrained_model
from playground import study

# Tests marked compat meet transformers' internals (the whole study, trained and evaluated
# through it): CI runs them on both ends of the range. The seeds and fine-tuned-baselines
# stages add only orchestration over the same recipe (the baselines' fine-tunes through the
# recipe are compat-tested in tests/llava/test_train.py), so they run on the locked stack only.


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("playground")
    summary = study.main(["--smoke", "--workdir", str(workdir)])
    return workdir / "runs" / "smoke", summary


@pytest.mark.compat
def test_run_folder_has_the_tables_and_the_figure(smoke_run):
    run_dir, summary = smoke_run
    assert {"results.json", "results.md", "accuracy_vs_tokens.png"} <= set(os.listdir(run_dir))
    assert (run_dir / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "results.json").read_text())
    settings = [row["setting"] for row in results["rows"]]
    assert settings[0] == "full"
    for label in ("1of3", "2of9", "1of9"):
        assert f"adsc-{label}" in settings and f"training-free-{label}" in settings
    markdown = (run_dir / "results.md").read_text()
    assert markdown == summary["markdown"]
    assert "Compute and memory" in markdown and "| adsc-1of9 |" in markdown


@pytest.mark.compat
def test_the_default_run_has_every_baseline_training_free_at_every_budget(smoke_run):
    run_dir, summary = smoke_run
    rows = {row["setting"]: row for row in summary["rows"]}
    n = rows["full"]["average_vision_tokens"]
    for label, fraction in (("1of3", 1 / 3), ("2of9", 2 / 9), ("1of9", 1 / 9)):
        for baseline in ("random", "fastv", "pdrop", "tome", "visionzip", "pool"):
            row = rows[f"{baseline}-{label}"]
            assert row["method"].endswith("no fine-tuning") and abs(row["average_vision_tokens"] - fraction * n) <= 1
            assert f"| {baseline}-{label} |" in summary["markdown"]
    settings = json.loads((run_dir / "answers" / "fastv-1of9.jsonl.settings.json").read_text())["pruning"]
    assert settings["method"] == "fastv" and settings["prune_layers"] == [1]  # FastV's K at ADSC's first layer
    settings = json.loads((run_dir / "answers" / "pool-1of9.jsonl.settings.json").read_text())["pruning"]
    assert settings["prune_layers"] == [] and settings["vision_tokens_after_last_stage"] == 14  # a 2 x 7 grid
    cost = summary["efficiency"]
    assert cost["pdrop-1of9"]["vision_tokens_per_stage"] == cost["adsc-1of9"]["vision_tokens_per_stage"]
    assert cost["tome-1of9"]["vision_tokens_per_stage"] == [121, 13]


@pytest.mark.compat
def test_the_reports_cost_is_the_profilers_for_every_baseline(smoke_run):
    """One cost model: each row of the report's Table IV analog equals ``model_cost`` (what the
    profiler and the bench print) for its method, budget and layers; the score-based methods
    pay their ranking rows, ToMe a cheaper tower."""
    from adsc_patch.profile import Workload, load_shape, model_cost
    from playground.report import ANSWER_TOKENS

    run_dir, summary = smoke_run
    cost = summary["efficiency"]
    shape = load_shape(str(run_dir / "checkpoints" / "full"))
    a = cost["_assumptions"]
    workload = Workload(text_tokens=a["text_tokens"], new_tokens=ANSWER_TOKENS, bytes_per_value=a["bytes_per_value"])
    n = shape.tower.num_patches
    layers = {"fastv": [1], "pdrop": [1, 4], "adsc": [1, 4], "random": [1, 4], "tome": None, "visionzip": None,
              "pool": None}
    method_of = {"random": "adsc"}
    for label, fraction in (("1of3", 1 / 3), ("1of9", 1 / 9)):
        for baseline, prune_layers in layers.items():
            name = f"adsc-{label}" if baseline == "adsc" else f"{baseline}-{label}"
            expected = model_cost(shape, method_of.get(baseline, baseline), n * fraction, workload, prune_layers)
            assert cost[name]["gflops"] == pytest.approx(expected.language_model_flops / 1e9, rel=1e-12), name
            assert cost[name]["vision_gflops"] == pytest.approx(
                (expected.tower_flops + expected.projector_flops) / 1e9, rel=1e-12), name
            assert cost[name]["peak_kv_kb"] == pytest.approx(expected.kv_peak_bytes / 2**10, rel=1e-12), name
    assert model_cost(shape, "fastv", n / 9, workload, [1]).scoring_flops > 0
    assert cost["tome-1of9"]["vision_gflops"] < cost["full"]["vision_gflops"] == cost["adsc-1of9"]["vision_gflops"]


@pytest.mark.compat
def test_budgets_are_the_analogs_of_192_128_64(smoke_run):
    run_dir, _ = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    tokens = {row["setting"]: row["average_vision_tokens"] for row in results["rows"]}
    n = tokens["full"]
    assert n == 121
    for label, fraction in (("1of3", 1 / 3), ("2of9", 2 / 9), ("1of9", 1 / 9)):
        assert tokens[f"adsc-{label}"] == tokens[f"training-free-{label}"]
        assert abs(tokens[f"adsc-{label}"] - fraction * n) <= 1
    cost = results["efficiency"]
    assert cost["adsc-1of9"]["gflops"] < cost["adsc-1of3"]["gflops"] < cost["full"]["gflops"]
    assert cost["adsc-1of9"]["peak_kv_kb"] < cost["adsc-1of3"]["peak_kv_kb"] < cost["full"]["peak_kv_kb"]
    assert cost["adsc-1of9"]["vision_tokens_per_stage"] == [121, 19, 3]  # prune layers 1 and 4
    assert all(cost[name]["prefill_ms"] > 0 for name in tokens)


@pytest.mark.compat
def test_checkpoints_load_with_their_schedule_and_template(smoke_run):
    run_dir, _ = smoke_run
    ckpt = run_dir / "checkpoints"
    _, full, _, _ = load_pretrained_model(str(ckpt / "full"), device="cpu")
    assert full.config.prune_layers == [] and full.config.conv_mode == "vicuna_v1"
    for label, fraction in (("1of3", 1 / 3), ("1of9", 1 / 9)):
        _, model, _, _ = load_pretrained_model(str(ckpt / f"adsc-{label}"), device="cpu")
        schedule = model.vision_schedule()
        assert model.config.conv_mode == "vicuna_v1" and schedule.enabled
        assert abs(schedule.average_tokens - fraction * 121) <= 1
    log = (run_dir / "train-adsc-1of9.log").read_text()
    assert "launcher=python" in log and log.count("curriculum phase") >= 3  # the user-facing script ran


@pytest.mark.compat
def test_a_finished_study_resumes_without_redoing_stages(smoke_run, caplog):
    run_dir, summary = smoke_run
    before = (run_dir / "results.json").stat().st_mtime
    with caplog.at_level("INFO", logger="playground"):
        again = study.main(["--smoke", "--workdir", str(run_dir.parent.parent)])
    skipped = [r.getMessage() for r in caplog.records if "already done" in r.getMessage()]
    assert len(skipped) >= 6  # data, tower, init, full and the three ADSC fine-tunes
    assert [r["cell_accuracy"] for r in again["rows"]] == [r["cell_accuracy"] for r in summary["rows"]]
    assert (run_dir / "results.json").stat().st_mtime >= before


@pytest.mark.compat
def test_a_run_folder_refuses_a_study_with_other_settings(smoke_run, tmp_path, capsys):
    run_dir, _ = smoke_run
    workdir = str(run_dir.parent.parent)
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({"adsc_steps": 5}))
    with pytest.raises(SystemExit):
        study.main(["--smoke", "--workdir", workdir, "--config", str(changed)])
    assert "adsc_steps: 3 there, 5 now" in capsys.readouterr().err
    saved = json.loads((run_dir / "study_config.json").read_text())
    assert saved["adsc_steps"] == 3 and "ablations" not in saved  # adding the ablations later is allowed


@pytest.mark.compat
def test_bad_command_lines_are_refused_before_any_work(tmp_path, capsys):
    unknown = tmp_path / "typo.json"
    unknown.write_text(json.dumps({"adsc_step": 5}))
    with pytest.raises(SystemExit):
        study.main(["--smoke", "--workdir", str(tmp_path), "--config", str(unknown)])
    assert "unknown StudyConfig fields ['adsc_step']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            study.main(["--device", "cuda", "--workdir", str(tmp_path)])
        assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.compat
def test_the_cuda_preset_scales_the_same_study_up():
    cpu, cuda = study.StudyConfig(), study.StudyConfig.cuda()
    assert cuda.device == "cuda" and cuda.train_images > cpu.train_images and cuda.eval_images > cpu.eval_images
    assert (cuda.layers, cuda.hidden_size, cuda.prune_layers, cuda.budgets) == \
        (cpu.layers, cpu.hidden_size, cpu.prune_layers, cpu.budgets)


def test_more_fine_tune_seeds_add_rows_reported_as_mean_and_range(smoke_run):
    run_dir, first = smoke_run
    summary = study.main(["--smoke", "--workdir", str(run_dir.parent.parent), "--seeds", "0,1"])
    names = [row["setting"] for row in summary["rows"]]
    for label in ("1of3", "2of9", "1of9"):
        assert f"adsc-{label}" in names and f"adsc-{label}-seed1" in names
        assert (run_dir / "checkpoints" / f"adsc-{label}-seed1" / "config.json").exists()
    trained = json.loads((run_dir / "checkpoints" / "adsc-1of9-seed1-lora" / "adsc_training.json").read_text())
    assert trained["seed"] == 1
    rows = {row["setting"]: row for row in summary["rows"]}
    merged = {row["setting"]: row for row in summary["merged_rows"]}
    assert "adsc-1of9-seed1" not in merged and merged["full"] == rows["full"]
    pair = [rows["adsc-1of9"]["cell_accuracy"], rows["adsc-1of9-seed1"]["cell_accuracy"]]
    assert merged["adsc-1of9"]["seeds"] == [0, 1]
    assert merged["adsc-1of9"]["cell_accuracy"] == pytest.approx(sum(pair) / 2)
    assert merged["adsc-1of9"]["cell_accuracy_range"] == [min(pair), max(pair)]
    assert "## The fine-tunes' seeds" in summary["markdown"] and "2 seeds)" in summary["markdown"]
    assert "| adsc-1of9-seed1 |" not in summary["markdown"]  # one row per setting in every table
    # the first seed's results are the same stages, not retrained
    assert rows["adsc-1of9"]["cell_accuracy"] == {r["setting"]: r for r in first["rows"]}["adsc-1of9"]["cell_accuracy"]


def test_the_fine_tuned_baselines_stage_trains_each_with_adscs_recipe(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"baselines": ["pdrop", "pool"]}))
    summary = study.main(["--smoke", "--workdir", str(run_dir.parent.parent), "--baselines-finetuned",
                          "--config", str(two)])
    rows = {row["setting"]: row for row in summary["rows"]}
    for baseline, method in (("pdrop", "pdrop"), ("pool", "pool")):
        row = rows[f"{baseline}-ft-1of9"]
        assert row["ablation"] == "baselines" and "(LoRA, reverse curriculum)" in row["method"]
        log = (run_dir / f"train-{baseline}-ft-1of9.log").read_text()
        assert log.count("curriculum phase") >= 3 and f"curriculum, prune method {method}," in log
        _, model, _, _ = load_pretrained_model(str(run_dir / "checkpoints" / f"{baseline}-ft-1of9"), device="cpu")
        assert model.config.prune_method == method
        assert abs(model.vision_schedule().average_tokens - 121 / 9) <= 1
    assert "## Selection rule vs. fine-tuning at budget 1of9" in summary["markdown"]
    assert "| pool-ft-1of9 |" in summary["markdown"] and "| tome-ft-1of9 |" not in summary["markdown"]


@pytest.mark.compat
def test_merge_seeds_averages_only_rows_that_differ_in_their_seed():
    from playground.report import merge_seeds

    def row(setting, method, budget, seed, accuracy):
        return {"setting": setting, "method": method, "budget": budget, "ablation": None, "seed": seed,
                "cell_accuracy": accuracy, "exact_match": accuracy / 2, "average_vision_tokens": 10.0}

    rows = [row("full", "full", None, None, 0.8), row("free", "free", "a", None, 0.5),
            row("adsc-a", "adsc", "a", 0, 0.7), row("adsc-a-seed1", "adsc", "a", 1, 0.9),
            row("adsc-b", "adsc", "b", 0, 0.6)]
    merged = {r["setting"]: r for r in merge_seeds(rows)}
    assert list(merged) == ["full", "free", "adsc-a", "adsc-b"]
    assert merged["adsc-a"]["cell_accuracy"] == pytest.approx(0.8)
    assert merged["adsc-a"]["exact_match"] == pytest.approx(0.4)
    assert merged["adsc-a"]["relative_to_full"] == pytest.approx(100.0)
    assert merged["adsc-a"]["cell_accuracy_range"] == [0.7, 0.9] and merged["adsc-a"]["seeds"] == [0, 1]
    assert "seeds" not in merged["adsc-b"] and "seeds" not in merged["free"]


@pytest.mark.compat
def test_the_seeds_flag_is_checked_before_any_work(tmp_path, capsys):
    for bad in ("0,x", "1,1", "-1"):
        with pytest.raises(SystemExit):
            study.main(["--smoke", "--workdir", str(tmp_path), "--seeds", bad])
        assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_prefill_timing_is_interleaved_so_a_slowing_machine_slows_every_schedule_alike(monkeypatch):
    """Two identical workloads on a machine that gets twice as slow halfway through the run:
    timed one schedule after the other, the second would look twice as slow; interleaved, both
    get the same median. ``prepare`` runs before each call, with its key, outside the timing."""
    from playground import report

    clock, calls, prepared = [0.0], [], []

    def work(key):
        def run():
            calls.append(key)
            clock[0] += 1.0 if len(calls) <= 6 else 2.0  # seconds; the machine slows after 6 calls
        return run

    monkeypatch.setattr(report.time, "perf_counter", lambda: clock[0])
    measured = report._prefill_ms({"a": work("a"), "b": work("b")}, on_cuda=False, repeats=5,
                                  prepare=lambda key: (prepared.append(key), clock.__setitem__(0, clock[0] + 100))[0])
    assert calls == ["a", "b"] * 6 and prepared == calls
    # a: calls 1,3,5 at 1 s (1 is the warm-up) and 7,9,11 at 2 s -> median of 1,1,2,2,2; b likewise
    assert measured == {"a": 2000.0, "b": 2000.0}
