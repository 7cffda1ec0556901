import math

import pytest

from adsc_patch.schedule import (
    ScheduleError,
    default_prune_layers,
    kept_tokens,
    solve_drop_ratio,
    vision_schedule,
)


def test_kept_tokens_is_floor_of_kept_fraction():
    assert kept_tokens(576, 0.5) == 288
    assert kept_tokens(576, 2 / 3) == 192  # float round-off would give 191
    assert kept_tokens(10, 0.15) == 8
    assert kept_tokens(7, 0.0) == 7


def test_schedule_counts_drop_at_the_input_of_each_prune_layer():
    s = vision_schedule(num_layers=8, num_vision_tokens=100, prune_layers=[5, 2], drop_ratio=0.5)
    assert s.prune_layers == (2, 5)
    assert s.stage_tokens == (100, 50, 25)
    # layers 0,1 see all; layer 2 (the prune layer itself) already sees the reduced set
    assert s.tokens_per_layer == (100, 100, 50, 50, 50, 25, 25, 25)
    assert s.average_tokens == pytest.approx(sum(s.tokens_per_layer) / 8)
    assert s.stage_bounds == ((0, 2), (2, 5), (5, 8))


def test_no_prune_layers_or_zero_ratio_is_the_full_model():
    assert vision_schedule(32, 576, [], 0.5).average_tokens == 576
    full = vision_schedule(32, 576, [2, 6], 0.0)
    assert full.average_tokens == 576 and not full.enabled


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_solver_meets_paper_budgets_within_one_token_with_default_layers(budget):
    layers = default_prune_layers(32)
    assert layers == (2, 6, 12, 20)
    s = solve_drop_ratio(32, 576, layers, budget)
    assert abs(s.average_tokens - budget) <= 1.0
    # the returned ratio really produces that schedule
    again = vision_schedule(32, 576, layers, s.drop_ratio)
    assert again.tokens_per_layer == s.tokens_per_layer
    assert all(c >= 1 for c in s.stage_tokens)


def test_solver_is_optimal_over_a_dense_scan_of_ratios():
    layers = (1, 3, 5)
    budget = 11.3
    best = solve_drop_ratio(8, 30, layers, budget)
    scanned = []
    for i in range(1, 20000):
        r = i / 20000
        try:
            scanned.append(vision_schedule(8, 30, layers, r).average_tokens)
        except ScheduleError:
            continue
    assert abs(best.average_tokens - budget) <= min(abs(a - budget) for a in scanned) + 1e-12


def test_solver_full_budget_means_no_pruning():
    s = solve_drop_ratio(32, 576, (2, 6), 576)
    assert s.drop_ratio == 0.0 and s.average_tokens == 576


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=600), "above the 576"),
        (dict(budget=10), "below what prune layers"),
        (dict(budget=-5), "below what prune layers"),
        (dict(budget=float("nan")), "not a number"),
        (dict(budget=100, prune_layers=(2, 32)), "out of range"),
        (dict(budget=100, prune_layers=()), "needs at least one prune layer"),
    ],
)
def test_solver_refuses_infeasible_requests(kwargs, message):
    args = dict(num_layers=32, num_vision_tokens=576, prune_layers=(2, 6, 12, 20))
    args.update(kwargs)
    with pytest.raises(ScheduleError, match=message):
        solve_drop_ratio(args["num_layers"], args["num_vision_tokens"], args["prune_layers"], args["budget"])


@pytest.mark.parametrize(
    "layers, ratio, message",
    [
        ([32], 0.5, "out of range"),
        ([-1], 0.5, "out of range"),
        ([2, 2], 0.5, "duplicates"),
        (["2"], 0.5, "not an integer"),
        ([2], 1.0, r"\[0, 1\)"),
        ([2], -0.1, r"\[0, 1\)"),
        ([2, 4, 6, 8, 10], 0.9, "leaves zero"),
    ],
)
def test_schedule_refuses_bad_layers_and_ratios(layers, ratio, message):
    with pytest.raises(ScheduleError, match=message):
        vision_schedule(32, 576, layers, ratio)


def test_default_prune_layers_scale_with_depth():
    assert default_prune_layers(12) == (1, 2, 4, 8)
    assert all(1 <= layer < 40 for layer in default_prune_layers(40))
    with pytest.raises(ScheduleError):
        default_prune_layers(1)


def test_lowest_budget_is_bounded_by_the_first_prune_layer():
    # with layers [2, ...] of 32, layers 0 and 1 always carry 576: average >= 36
    lowest = solve_drop_ratio(32, 576, (2,), 36.5)
    assert lowest.average_tokens >= 2 * 576 / 32
    assert lowest.stage_tokens == (576, 1)
    assert math.isclose(lowest.average_tokens, 36.5, abs_tol=1.0)
    with pytest.raises(ScheduleError, match="lowest reachable average 36.94"):
        solve_drop_ratio(32, 576, (2,), 35.0)
