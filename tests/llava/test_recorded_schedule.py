"""A fine-tuned checkpoint's recorded schedule (method, layers, budget) is the default of every
entry point, another method at a budget takes the checkpoint's layers where they fit it, and
the budgets offered are the ones the solver reaches.

The "fine-tuned" checkpoint is the tiny 8-layer one whose config.json records what training
writes: ADSC at layers [1, 4], budget 12 (the playground's adsc-1of9 is the same shape of
record). Expected layers and ranges are written here by rule, not read from the code.
"""

import logging

import numpy as np
import pytest
from PIL import Image

from adsc_patch import PRUNE_METHODS, ScheduleError
from adsc_patch.methods import is_pre_llm
from adsc_patch.schedule import default_prune_layers
from adsc_patch.solve import reachable_budget_range, solve_method
from llava.eval import run_llava
from llava.eval.pruning_args import apply_pruning_args
from llava.model.builder import load_pretrained_model

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDED_LAYERS, RECORDED_BUDGET = [1, 4], 12
GRID, NUM_LAYERS, TOWER_LAYERS_RUN = (6, 6), 8, 1  # tiny_deep: 6 x 6 patches, 8 decoder layers, CLIP layer -2 of 2


@pytest.fixture(scope="module")
def finetuned_dir(tiny_finetuned_dir):
    return tiny_finetuned_dir


@pytest.fixture(scope="module")
def finetuned(finetuned_dir):
    return load_pretrained_model(finetuned_dir, device="cpu")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("recorded_img") / "grid.png"
    Image.fromarray((np.random.RandomState(7).rand(48, 48, 3) * 255).astype("uint8")).save(path)
    return str(path)


def _scan_range(method, layers):
    """The whole budgets 1..36 that solve_method accepts, found by trying each."""
    accepted = []
    for budget in range(1, GRID[0] * GRID[1] + 1):
        try:
            solve_method(method, budget, NUM_LAYERS, GRID, TOWER_LAYERS_RUN, layers)
        except ScheduleError:
            continue
        accepted.append(budget)
    return accepted


# What each method takes on a checkpoint recording [1, 4]: FastV drops once, at the first.
EXPECTED_LAYERS = {"adsc": (1, 4), "pdrop": (1, 4), "pdrop_original_ids": (1, 4), "fastv": (1,), "tome": (),
                   "visionzip": (), "pool": (), "visionzip_spread": ()}


def test_the_loaded_checkpoint_records_its_schedule_and_configuring_never_changes_the_record(finetuned):
    _, model, _, _ = finetuned
    recorded = model.recorded_pruning
    assert (recorded.prune_method, list(recorded.prune_layers), recorded.vision_token_budget) == \
        ("adsc", RECORDED_LAYERS, RECORDED_BUDGET)
    model.configure_pruning(method="fastv", vision_token_budget=12)
    model.configure_pruning(method="pool", vision_token_budget=9)
    assert model.recorded_pruning == recorded
    recorded.store(model.config)


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_another_method_at_a_budget_takes_the_checkpoints_layers_where_they_fit(finetuned, method):
    _, model, _, _ = finetuned
    assert set(EXPECTED_LAYERS) == set(PRUNE_METHODS)
    budget = 20  # reachable by every method at its expected layers
    setting, _ = model.resolve_pruning(method=method, vision_token_budget=budget)
    assert setting.prune_layers == EXPECTED_LAYERS[method] and setting.prune_method == method
    assert model.prune_layers_for(method) == EXPECTED_LAYERS[method]


def test_chained_requests_each_start_from_the_record_not_from_the_previous_request(finetuned):
    _, model, _, _ = finetuned
    recorded = model.recorded_pruning
    try:
        assert model.configure_pruning(method="fastv", vision_token_budget=20).prune_layers == (1,)
        assert model.configure_pruning(method="pdrop", vision_token_budget=20).prune_layers == (1, 4)
        assert model.configure_pruning(method="pool", vision_token_budget=9).prune_layers == (0,)  # pre-LLM
        assert model.configure_pruning(method="fastv", vision_token_budget=20).prune_layers == (1,)
        # layers given win over the record
        assert model.configure_pruning(method="pdrop", prune_layers=[2, 6], vision_token_budget=20).prune_layers == (2, 6)
    finally:
        recorded.store(model.config)


def test_a_checkpoint_without_a_record_keeps_each_methods_own_defaults(tiny_deep_dir):
    _, model, _, _ = load_pretrained_model(tiny_deep_dir, device="cpu")
    assert model.recorded_pruning is None
    assert model.prune_layers_for("pdrop") == default_prune_layers(NUM_LAYERS)
    assert model.prune_layers_for("fastv") == (2,)  # FastV's K
    assert model.resolve_pruning(method="pdrop", vision_token_budget=20)[0].prune_layers == default_prune_layers(NUM_LAYERS)


def test_the_eval_flags_run_llava_and_the_terminal_chat_default_to_the_record(finetuned, finetuned_dir, image_path,
                                                                              caplog):
    _, model, _, _ = finetuned
    parser = run_llava.build_parser()
    args = parser.parse_args(["--model-path", finetuned_dir, "--image-file", image_path, "--query", "What?"])
    schedule = apply_pruning_args(model, args)
    assert list(schedule.prune_layers) == RECORDED_LAYERS and abs(schedule.average_tokens - RECORDED_BUDGET) <= 0.25
    args = parser.parse_args(["--model-path", finetuned_dir, "--image-file", image_path, "--query", "What?",
                              "--prune-method", "pdrop", "--vision-token-budget", "12"])
    try:
        assert list(apply_pruning_args(model, args).prune_layers) == RECORDED_LAYERS
    finally:
        model.recorded_pruning.store(model.config)
    with caplog.at_level(logging.INFO):
        answer = run_llava.main(["--model-path", finetuned_dir, "--image-file", image_path, "--query", "What?",
                                 "--prune-method", "fastv", "--vision-token-budget", "12", "--max_new_tokens", "2"])
    assert isinstance(answer, str)
    assert any("prune method fastv: the checkpoint's layers [1]" in r.getMessage() for r in caplog.records)


def test_the_terminal_chat_runs_the_recorded_schedule_by_default(finetuned_dir, image_path):
    from io import StringIO

    from llava.serve import cli

    out = StringIO()
    replies = cli.main(["--model-path", finetuned_dir, "--image-file", image_path, "--temperature", "0",
                        "--max-new-tokens", "3"], stdin=StringIO("What is in the grid?\n\n"), stdout=out)
    assert len(replies) == 1 and replies[0].metrics.label == "adsc @ 12 · layers 1, 4"
    assert "[adsc @ 12 · layers 1, 4 — prefill of" in out.getvalue()
    assert abs(replies[0].metrics.mean_vision_tokens - RECORDED_BUDGET) <= 0.25


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_the_reachable_budget_range_is_every_budget_the_solver_accepts(finetuned, method):
    _, model, _, _ = finetuned
    layers = None if is_pre_llm(method) else EXPECTED_LAYERS[method]
    accepted = _scan_range(method, layers)
    assert accepted == list(range(accepted[0], accepted[-1] + 1))  # no holes
    assert model.reachable_budgets(method) == (accepted[0], accepted[-1])
    assert reachable_budget_range(method, NUM_LAYERS, GRID, TOWER_LAYERS_RUN, layers) == (accepted[0], accepted[-1])


@pytest.mark.parametrize("layers", [(2,), (1, 4), (3, 5, 7), (0, 2)])
def test_the_reachable_range_follows_the_layers(layers):
    for method in ("adsc", "pdrop"):
        accepted = _scan_range(method, layers)
        assert reachable_budget_range(method, NUM_LAYERS, GRID, TOWER_LAYERS_RUN, layers) == (accepted[0], accepted[-1])
    # later and fewer prune layers cannot go as low
    if layers == (3, 5, 7):
        assert reachable_budget_range("adsc", NUM_LAYERS, GRID, TOWER_LAYERS_RUN, layers)[0] > \
            reachable_budget_range("adsc", NUM_LAYERS, GRID, TOWER_LAYERS_RUN, (0, 2))[0]
