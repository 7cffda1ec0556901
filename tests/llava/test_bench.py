"""``python -m llava.bench`` end to end in its smoke mode: every method, two batch sizes, both
attention backends; the KV bytes read off the real caches equal the profile's prediction."""

import json

import pytest
import torch

from adsc_patch import PRUNE_METHODS
from adsc_patch.profile import ModelShape, Workload, model_cost
from llava import bench

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = bench.main(["--smoke", "--out", str(out), "--json", str(out / "rows.json"), "--budgets", "18,10",
                          "--attention", "sdpa,eager", "--train-step"])
    return out, summary


def test_writes_json_table_and_plot_with_the_machine_and_settings(smoke):
    out, summary = smoke
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.md").read_text() == summary["markdown"]
    saved = json.loads((out / "bench.json").read_text())
    assert saved["header"]["versions"]["torch"] and saved["header"]["device"] == "cpu"
    rows = json.loads((out / "rows.json").read_text())
    assert rows == saved["rows"]
    settings = {(r["attention"], r["batch"], r["method"], r["budget"]) for r in rows}
    expected = {(a, b, m, x) for a in ("sdpa", "eager") for b in (1, 2) for m in PRUNE_METHODS for x in (18.0, 10.0)}
    assert expected | {(a, b, "full", None) for a in ("sdpa", "eager") for b in (1, 2)} == settings
    for row in rows:
        assert {"method", "budget", "batch", "prefill_ms", "measured_kv_bytes", "predicted_kv_bytes"} <= set(row)
        assert row["prefill_ms"] > 0 and row["ttft_ms"] > 0 and row["train_step_ms"] > 0


def test_measured_kv_bytes_equal_the_prediction_for_every_method_budget_and_batch(smoke):
    _, summary = smoke
    for row in summary["rows"]:
        assert row["measured_kv_bytes"] == row["predicted_kv_bytes"], row
    by = {(r["attention"], r["batch"], r["method"], r["budget"]): r for r in summary["rows"]}
    assert by[("sdpa", 2, "adsc", 10.0)]["measured_kv_bytes"] < by[("sdpa", 2, "adsc", 18.0)]["measured_kv_bytes"] \
        < by[("sdpa", 2, "full", None)]["measured_kv_bytes"]
    assert by[("sdpa", 2, "full", None)]["measured_kv_bytes"] == 2 * by[("sdpa", 1, "full", None)]["measured_kv_bytes"]
    assert abs(by[("eager", 1, "pool", 10.0)]["mean_vision_tokens"] - 10) <= 1
    assert by[("sdpa", 1, "full", None)]["prefill_relative"] == 100


def test_layer_replay_uses_each_layers_length_from_the_trace_as_the_profile_predicts(smoke):
    """The replay times one layer at the lengths the pruned prefill really ran (read off its
    trace), which must equal the profile's independent per-layer count (text + the schedule's
    vision tokens); the speed-up itself is the benchmark's to show, not a unit test's."""
    _, summary = smoke
    sizes = summary["header"]["sizes"]
    shape = ModelShape.from_config(bench.build_model(sizes, "sdpa", torch.float32, "cpu").config)
    by = {(r["attention"], r["batch"], r["method"], r["budget"]): r for r in summary["rows"]}
    for row in summary["rows"]:
        cost = model_cost(shape, None if row["method"] == "full" else row["method"], row["budget"],
                          Workload(summary["header"]["text_tokens"], 1, summary["header"]["new_tokens"], row["batch"], 4))
        assert row["layer_lengths"] == list(cost.tokens_per_layer), row["method"]
        assert row["layer_replay_ms"] > 0
        assert row["outside_layers_ms"] == pytest.approx(row["prefill_ms"] - row["layer_replay_ms"])
    full = by[("sdpa", 1, "full", None)]
    assert full["layer_lengths"] == [96] * sizes["layers"]  # 60 text + 36 vision tokens
    adsc = by[("sdpa", 1, "adsc", 10.0)]
    assert adsc["layer_lengths"][0] == 96 and adsc["layer_lengths"][-1] < 70
    # no timing comparison here (a unit test on a shared machine): the ratios are only well formed
    assert full["layer_replay_relative"] == 100 and adsc["layer_replay_relative"] > 0


def test_a_shape_that_cannot_fit_is_refused_before_anything_is_built(monkeypatch):
    """``python -m llava.bench`` with no arguments is the 7B shape in float32: about 41 GB."""
    from llava import bench
    from llava.cli import InputError

    built = []
    monkeypatch.setattr(bench, "available_memory_bytes", lambda device: 16 * 10**9)
    monkeypatch.setattr(bench, "build_model", lambda *a, **k: built.append(a))
    with pytest.raises(InputError) as info:
        bench.main(["--device", "cpu"])
    message = str(info.value)
    assert message.startswith("the llava-1.5-7b shape (32 layers, hidden 4096) in float32 at batch 8 needs about ")
    assert "cpu has 16.0 GB available: try --smoke" in message and "--width-scale 0.25" in message
    assert built == []
    # the float32 weights alone: about 7e9 parameters of 4 bytes
    sizes = bench._shape_sizes(bench.build_parser().parse_args([]))
    assert bench.memory_needed_bytes(sizes, torch.float32, 1, 1) > 7e9 * 4


@pytest.fixture(scope="module")
def qwen_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_qwen")
    summary = bench.main(["--smoke", "--shape", "qwen2.5-vl-7b", "--out", str(out), "--budget-fractions", "0.5",
                          "--image-size", "64x48"])
    return out, summary


def test_the_qwen2_5_vl_smoke_row_measures_kv_bytes_equal_to_the_profile_for_each_method_and_batch(qwen_smoke):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` with one 64 x 48 image (resized by the
    processor's rule to 72 x 56 px: 9 x 7 merged tokens): the cache after the prefill and after
    ``generate`` has the bytes the profile predicts, full and under each in-decoder method at
    budget fraction 0.5, at batch 1 and 2."""
    from adsc_patch.profile import image_tokens

    out, summary = qwen_smoke
    rows = summary["rows"]
    assert {(r["batch"], r["method"], r["budget_fraction"]) for r in rows} == {
        (b, m, f) for b in (1, 2) for m, f in (("full", None), ("adsc", 0.5), ("fastv", 0.5), ("pdrop", 0.5))}
    shape = ModelShape.from_config(bench.qwen_config(summary["header"]["sizes"], "sdpa"))
    assert image_tokens(shape, 64, 48).grids == ((7, 9),)
    for row in rows:
        assert row["vision_tokens_per_image"] == 63
        assert row["measured_kv_bytes"] == row["predicted_kv_bytes"] > 0, row
        assert row["measured_peak_kv_bytes"] == row["predicted_peak_kv_bytes"], row
        assert row["ttft_ms"] > 0 and row["vision_ms"] > 0
        workload = Workload(summary["header"]["text_tokens"] + 2, 1, summary["header"]["new_tokens"], row["batch"], 4,
                            64, 48)
        cost = model_cost(shape, None if row["method"] == "full" else row["method"], None, workload,
                          budget_fraction=row["budget_fraction"])
        assert row["predicted_kv_bytes"] == cost.kv_bytes_after_prefill
    by = {(r["batch"], r["method"]): r for r in rows}
    assert by[(2, "adsc")]["measured_kv_bytes"] < by[(2, "full")]["measured_kv_bytes"] \
        == 2 * by[(1, "full")]["measured_kv_bytes"]
    assert abs(by[(1, "adsc")]["mean_vision_tokens"] - 31.5) <= 1
    assert (out / "bench.md").read_text() == summary["markdown"] and "64x48 image" in summary["markdown"]


def test_the_qwen_bench_refuses_methods_its_patch_does_not_run():
    from llava.cli import InputError

    with pytest.raises(InputError, match=r"--methods \['tome'\]: the Qwen2.5-VL patch runs adsc, fastv, pdrop"):
        bench.main(["--smoke", "--shape", "qwen2.5-vl-7b", "--methods", "adsc,tome"])
    with pytest.raises(InputError, match="--shape qwen3-vl-8b: the bench builds"):
        bench.main(["--smoke", "--shape", "qwen3-vl-8b"])


def test_the_qwen_bench_builds_the_presets_shape():
    """The config the bench builds for ``--shape qwen2.5-vl-7b`` has the profile preset's shape."""
    from adsc_patch.profile import PRESETS

    sizes = bench.qwen_sizes(bench.build_parser().parse_args(["--shape", "qwen2.5-vl-7b"]))
    assert ModelShape.from_config(bench.qwen_config(sizes, "sdpa")) == PRESETS["qwen2.5-vl-7b"]
