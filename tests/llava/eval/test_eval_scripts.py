"""scripts/v1_5/eval/*.sh end to end on the CPU: a tiny checkpoint, tiny benchmarks in upstream's
layout, two chunk processes merged, a score printed; then the Table I summary of the runs."""

import json
import os
import subprocess
import sys

import pytest

from llava.eval import summarize
from llava.eval.io import read_jsonl
from llava.tools.make_tiny_benchmarks import make_tiny_benchmarks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PER_BENCHMARK = 4

# script, extra environment, what the scorer prints, answers folder, questions expected
SCRIPTS = {
    "gqa": ({}, "Accuracy:", "gqa/answers/llava_gqa_testdev_balanced", PER_BENCHMARK),
    "mme": ({}, "Perception:", "MME/answers", 14 * 2),
    "pope": ({}, "mean F1:", "pope/answers", 3 * PER_BENCHMARK),
    "sqa": ({}, "IMG-Accuracy:", "scienceqa/answers", PER_BENCHMARK),
    "textvqa": ({}, "Accuracy:", "textvqa/answers", PER_BENCHMARK),
    "vqav2": ({}, "left empty", "vqav2/answers/llava_vqav2_mscoco_test-dev2015", PER_BENCHMARK),
    "vqav2-val": ({"SPLIT": "llava_vqav2_mscoco_val2014"}, "Accuracy:", "vqav2/answers/llava_vqav2_mscoco_val2014",
                  PER_BENCHMARK),
}


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    return make_tiny_benchmarks(str(tmp_path_factory.mktemp("eval_scripts")), per_benchmark=PER_BENCHMARK)


def _run(script, model, eval_dir, **env):
    full_env = dict(
        os.environ, MODEL_PATH=model, EVAL_DIR=eval_dir, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
        EXTRA_ARGS="--max_new_tokens 4 --num-workers 0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env,
    )
    name = script.split("-")[0]
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "v1_5", "eval", f"{name}.sh")], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def pruned_runs(tiny_deep_dir, eval_dir):
    """Every script, pruned to an average of 12 of 36 vision tokens, in two CPU chunks."""
    return {
        script: _run(script, tiny_deep_dir, eval_dir, CKPT="tiny-budget12", CHUNKS="2", PRUNE_LAYERS="1,3",
                     VISION_TOKEN_BUDGET="12", **extra)
        for script, (extra, *_rest) in SCRIPTS.items()
    }


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_runs_chunks_merges_and_prints_a_score(pruned_runs, eval_dir, script):
    _, printed, answers_dir, n_questions = SCRIPTS[script]
    out = pruned_runs[script]
    assert printed in out
    folder = os.path.join(eval_dir, answers_dir, "tiny-budget12")
    assert {"2_0.jsonl", "2_1.jsonl", "merge.jsonl"} <= set(os.listdir(folder))
    merged = read_jsonl(os.path.join(folder, "merge.jsonl"))
    assert len(merged) == n_questions
    chunks = [read_jsonl(os.path.join(folder, f"2_{i}.jsonl")) for i in range(2)]
    assert merged == chunks[0] + chunks[1] and len(chunks[0]) == (n_questions + 1) // 2
    settings = json.load(open(os.path.join(folder, "merge.jsonl.settings.json")))
    assert settings["pruning"]["average_vision_tokens"] == 12.0
    assert settings["pruning"]["prune_layers"] == [1, 3] and settings["generation"]["temperature"] == 0
    if script != "vqav2":
        assert os.path.isfile(os.path.join(folder, "scores.json"))


def test_vqav2_test_dev_writes_the_upload_file(pruned_runs, eval_dir):
    upload = json.load(open(os.path.join(
        eval_dir, "vqav2/answers_upload/llava_vqav2_mscoco_test-dev2015/tiny-budget12.json")))
    test_questions = read_jsonl(os.path.join(eval_dir, "vqav2/llava_vqav2_mscoco_test2015.jsonl"))
    assert [u["question_id"] for u in upload] == [q["question_id"] for q in test_questions]
    assert sum(u["answer"] == "" for u in upload) == len(test_questions) - PER_BENCHMARK


def test_summary_table_relative_to_the_full_model(pruned_runs, tiny_deep_dir, eval_dir, tmp_path, capsys):
    for script in ("gqa", "pope"):
        _run(script, tiny_deep_dir, eval_dir, NO_PRUNING="1", CKPT="tiny-full")
    table = summarize.main([
        "--eval-dir", eval_dir, "--baseline", "tiny-full", "--run", "tiny-budget12",
        "--label", "tiny-budget12=ADSC 12", "--score", "tiny-full:vqav2=50", "--score", "tiny-budget12:vqav2=40",
        "--output-json", str(tmp_path / "table.json"), "--output-md", str(tmp_path / "table.md"),
    ])
    full, pruned = table["rows"]
    assert full["vision_tokens"] == 36.0 and pruned["vision_tokens"] == 12.0
    assert set(full["scores"]) == {"gqa", "pope", "vqav2"}
    assert set(pruned["scores"]) == {"gqa", "mme", "pope", "sqa", "textvqa", "vqav2"}
    gqa = json.load(open(os.path.join(eval_dir, "gqa/answers/llava_gqa_testdev_balanced/tiny-budget12/scores.json")))
    assert pruned["scores"]["gqa"] == pytest.approx(100 * gqa["accuracy"])
    assert pruned["relative"]["vqav2"] == pytest.approx(80.0)
    expected = [100 * pruned["scores"][b] / full["scores"][b] for b in ("gqa", "pope", "vqav2") if full["scores"][b]]
    assert pruned["n_benchmarks"] == len(expected) and full["avg_relative"] == pytest.approx(100.0)
    assert pruned["avg_relative"] == pytest.approx(sum(expected) / len(expected))
    assert pruned["drop_points"] == pytest.approx(100 - pruned["avg_relative"])
    markdown = (tmp_path / "table.md").read_text()
    assert "| ADSC 12 | 12 |" in markdown and f"({pruned['n_benchmarks']}/6)" in markdown
    assert json.load(open(tmp_path / "table.json"))["rows"][1]["label"] == "ADSC 12"


def test_summary_refuses_a_run_without_scores(eval_dir):
    with pytest.raises(SystemExit, match="no scores.json for run 'nope'"):
        summarize.main(["--eval-dir", eval_dir, "--baseline", "nope"])
    with pytest.raises(SystemExit, match="RUN:BENCH=VALUE"):
        summarize.main(["--eval-dir", eval_dir, "--baseline", "x", "--score", "x:mmmu=3"])


def test_prune_method_reaches_the_benchmark_scripts(tiny_deep_dir, eval_dir):
    out = _run("textvqa", tiny_deep_dir, eval_dir, PRUNE_METHOD="pool", VISION_TOKEN_BUDGET="9")
    assert "Accuracy:" in out
    run = os.path.basename(tiny_deep_dir.rstrip("/")) + "-pool-budget9"  # the method names the run
    folder = os.path.join(eval_dir, "textvqa/answers", run)
    pruning = json.load(open(os.path.join(folder, "merge.jsonl.settings.json")))["pruning"]
    assert pruning["method"] == "pool" and pruning["prune_layers"] == []
    assert pruning["average_vision_tokens"] == 9 and pruning["vision_tokens_after_last_stage"] == 9


def test_a_script_finds_the_projects_venv_and_its_refusal_hint_names_overwrite(tiny_deep_dir, eval_dir):
    """Run without an active environment (no venv on PATH): the script uses the project's .venv.
    A rerun with other settings into the same answers is refused with a hint that fits (not
    "rerun to resume"), and OVERWRITE=1 starts afresh."""
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(venv_python):
        pytest.skip("no .venv in the project (bash scripts/test.sh makes it)")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(MODEL_PATH=tiny_deep_dir, EVAL_DIR=eval_dir, CUDA_VISIBLE_DEVICES="", PATH="/usr/bin:/bin",
               EXTRA_ARGS="--max_new_tokens 2 --num-workers 0", CKPT="tiny-venv", PRUNE_LAYERS="1,3")
    script = os.path.join(ROOT, "scripts", "v1_5", "eval", "pope.sh")

    def run(**extra):
        return subprocess.run(["bash", script], cwd=ROOT, env={**env, **extra}, capture_output=True, text=True,
                              timeout=600)

    first = run(VISION_TOKEN_BUDGET="12")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "mean F1:" in first.stdout
    other = run(VISION_TOKEN_BUDGET="18")
    assert other.returncode == 2, other.stderr[-2000:]
    last = other.stderr.strip().splitlines()[-1]
    assert "OVERWRITE=1" in last and "rerun to resume" not in other.stderr
    again = run(VISION_TOKEN_BUDGET="18", OVERWRITE="1")
    assert again.returncode == 0, again.stderr[-2000:]
    settings = json.load(open(os.path.join(eval_dir, "pope/answers/tiny-venv/merge.jsonl.settings.json")))
    assert settings["pruning"]["average_vision_tokens"] == pytest.approx(18, abs=1)
