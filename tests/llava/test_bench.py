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
