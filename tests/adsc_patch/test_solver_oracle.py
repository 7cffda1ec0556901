"""Oracle tests for the budget solver: its answer is compared with a brute force written
here from the documented rules (``adsc_patch/schedule.py`` module docstring):

* a prune layer ``l`` drops tokens at the input of layer ``l``; layers before the first
  prune layer see all ``N`` tokens;
* every prune layer keeps ``floor(q * n)`` of the ``n`` tokens still present, ``q = 1 - r``
  being the keep fraction (the float code adds an epsilon only to make that floor exact);
* the average is the mean over all decoder layers of the tokens entering each layer;
* the solver returns the schedule whose average is closest to the budget, ties going to
  the one within the budget (average <= budget); it refuses budgets more than
  ``BUDGET_SLACK = 0.5`` below the lowest reachable average.

``floor(q * n)`` only changes where ``q * n`` is an integer for some ``n <= N``, so trying
every ``q = j / m`` with ``m <= N`` reaches every schedule. A budget below ``N`` asks for
pruning, so ``q < 1`` (drop ratio > 0) and every stage keeps at least one token.
"""

import math
from fractions import Fraction
from functools import lru_cache

import pytest

from adsc_patch.schedule import (
    ScheduleError,
    default_prune_layers,
    lowest_reachable_average,
    solve_drop_ratio,
    vision_schedule,
)


def _tokens_per_layer(num_layers, layers, counts):
    """Tokens entering each layer: stage s (after s prune layers at or before l)."""
    return [counts[sum(1 for p in layers if p <= layer)] for layer in range(num_layers)]


@lru_cache(maxsize=None)
def _reachable(num_layers, n, layers):
    """{exact average: set of stage count tuples} over every keep fraction j/m < 1."""
    layers = tuple(sorted(layers))
    averages = {}
    seen = set()
    for m in range(1, n + 1):
        for j in range(1, m):
            if math.gcd(j, m) != 1:
                continue
            counts = [n]
            for _ in layers:
                counts.append(j * counts[-1] // m)  # exact floor(q * count)
            counts = tuple(counts)
            if counts[-1] == 0 or counts in seen:
                continue
            seen.add(counts)
            average = Fraction(sum(_tokens_per_layer(num_layers, layers, counts)), num_layers)
            averages.setdefault(average, set()).add(counts)
    return averages


def _closest(averages, budget):
    """The closest reachable average; on a tie the one at or below the budget."""
    b = Fraction(budget)  # budgets used here are exact binary fractions
    best = None
    for a in averages:
        if best is None or abs(a - b) < abs(best - b) or (abs(a - b) == abs(best - b) and a < best):
            best = a
    return best


def _check(num_layers, n, layers, budget):
    averages = _reachable(num_layers, n, tuple(sorted(layers)))
    expected = _closest(averages, budget)
    s = solve_drop_ratio(num_layers, n, layers, budget)
    achieved = Fraction(sum(s.tokens_per_layer), num_layers)
    assert achieved == expected, (num_layers, n, layers, budget, float(achieved), float(expected))
    assert s.stage_tokens in averages[expected]
    assert tuple(s.tokens_per_layer) == tuple(_tokens_per_layer(num_layers, sorted(layers), s.stage_tokens))
    # the reported drop ratio reproduces the schedule through the public float path
    assert 0 < s.drop_ratio < 1
    assert vision_schedule(num_layers, n, layers, s.drop_ratio).stage_tokens == s.stage_tokens
    return s


CONFIGS = [
    (8, 16, (2,)),
    (8, 16, (1, 3, 5)),
    (4, 16, (0, 2)),
    (16, 16, (2, 6, 12)),
    (8, 36, (1, 3, 5)),
    (12, 36, (1, 4, 8)),
    (32, 36, (2, 6, 12, 20)),
    (8, 50, (0, 4)),
    (16, 50, (2, 6, 12)),
    (10, 50, (1, 2, 3, 4, 5)),
]


def _budgets(num_layers, n, layers):
    """Exact binary-fraction budgets: every reachable average, every midpoint between
    neighbours (exact ties), points 1/64 either side of those midpoints, and a 1/4 grid."""
    averages = sorted(_reachable(num_layers, n, tuple(sorted(layers))))
    out = set()
    for a in averages:
        out.add(a)
    for lo, hi in zip(averages, averages[1:]):
        mid = (lo + hi) / 2
        out.update({mid, mid - Fraction(1, 64), mid + Fraction(1, 64)})
    lo = averages[0] - Fraction(1, 2)
    step = Fraction(1, 4)
    b = Fraction(math.ceil(lo / step)) * step
    while b <= averages[-1]:
        out.add(b)
        b += step
    out.add(lo)  # the lowest accepted budget
    return sorted(x for x in out if x >= lo and Fraction(float(x)) == x)


@pytest.mark.parametrize("num_layers, n, layers", CONFIGS)
def test_solver_matches_brute_force_closest_average(num_layers, n, layers):
    for budget in _budgets(num_layers, n, layers):
        _check(num_layers, n, layers, float(budget))


@pytest.mark.parametrize("num_layers, n, layers", CONFIGS)
def test_exact_ties_go_to_the_schedule_within_the_budget(num_layers, n, layers):
    averages = sorted(_reachable(num_layers, n, tuple(sorted(layers))))
    ties = 0
    for lo, hi in zip(averages, averages[1:]):
        mid = (lo + hi) / 2
        if Fraction(float(mid)) != mid:
            continue  # not an exact float: not a tie as given
        s = solve_drop_ratio(num_layers, n, layers, float(mid))
        assert Fraction(sum(s.tokens_per_layer), num_layers) == lo, (float(mid), float(lo), float(hi))
        ties += 1
    assert ties >= 5


def test_constructed_tie_by_hand():
    # 8 layers, 16 tokens, prune at 2: average = (2*16 + 6*c) / 8 = 4 + 0.75 c for the kept
    # count c. c = 8 -> 10.0, c = 9 -> 10.75; budget 10.375 is exactly between: c = 8 wins.
    s = solve_drop_ratio(8, 16, (2,), 10.375)
    assert s.stage_tokens == (16, 8)
    assert s.average_tokens == 10.0
    # just above the midpoint the other neighbour is strictly closer
    assert solve_drop_ratio(8, 16, (2,), 10.376).stage_tokens == (16, 9)
    assert solve_drop_ratio(8, 16, (2,), 10.374).stage_tokens == (16, 8)
    # exact hits: 4 + 0.75 c for every c in 1..15
    for c in range(1, 16):
        assert solve_drop_ratio(8, 16, (2,), 4 + 0.75 * c).stage_tokens == (16, c)


def test_constructed_tie_two_stages_by_hand():
    # 4 layers, 16 tokens, prune at 1 and 2: counts (16, a, b), average (16 + a + 2b) / 4.
    # a = floor(16 q) = 11 for q in [11/16, 3/4); there b = floor(11 q) with 11 q in
    # [7.5625, 8.25): b = 7 below q = 8/11, b = 8 from it. Averages 41/4 = 10.25 and
    # 43/4 = 10.75; the nearest other ones are (16,10,6) -> 9.5 and (16,12,9) -> 11.5.
    # Budget 10.5 is exactly between: (16, 11, 7) wins.
    assert solve_drop_ratio(4, 16, (1, 2), 10.5).stage_tokens == (16, 11, 7)
    assert solve_drop_ratio(4, 16, (1, 2), 10.5 + 1 / 64).stage_tokens == (16, 11, 8)
    assert solve_drop_ratio(4, 16, (1, 2), 10.75).stage_tokens == (16, 11, 8)
    # 9.875 is exactly between 9.5 and 10.25
    assert solve_drop_ratio(4, 16, (1, 2), 9.875).stage_tokens == (16, 10, 6)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_llava_paper_budgets_are_met_within_a_quarter_token(budget):
    layers = default_prune_layers(32)
    assert layers == (2, 6, 12, 20)
    s = _check(32, 576, layers, budget)
    # the promise next to DEFAULT_PRUNE_LAYER_FRACTIONS
    assert abs(Fraction(sum(s.tokens_per_layer), 32) - budget) <= Fraction(1, 4)
    assert abs(s.average_tokens - budget) <= 0.25


@pytest.mark.parametrize("budget", [191.5, 160, 100.25, 96, 77.7, 60, 57.0])
def test_llava_other_budgets_match_brute_force(budget):
    # 77.7 is not a binary fraction, but averages are k/32 and ties k/64, so it is no tie
    _check(32, 576, (2, 6, 12, 20), budget)


@pytest.mark.parametrize("num_layers, n, layers", CONFIGS + [(32, 576, (2, 6, 12, 20)), (32, 576, (2,))])
def test_lowest_reachable_average_and_the_refusal_below_it(num_layers, n, layers):
    lowest = min(_reachable(num_layers, n, tuple(sorted(layers))))
    assert lowest_reachable_average(num_layers, n, layers) == float(lowest)
    # budgets down to lowest - 0.5 get the lowest schedule ...
    edge = float(lowest - Fraction(1, 2))
    s = solve_drop_ratio(num_layers, n, layers, edge)
    assert Fraction(sum(s.tokens_per_layer), num_layers) == lowest
    # ... below that the request is refused, naming the lowest reachable average
    for below in (edge - 1 / 64, edge - 1, -1.0):
        with pytest.raises(ScheduleError, match="below what prune layers") as info:
            solve_drop_ratio(num_layers, n, layers, below)
        assert f"lowest reachable average {float(lowest):.2f}" in str(info.value)


def test_lowest_for_llava_single_layer_by_hand():
    # prune at layer 2 only: layers 0,1 see 576, layers 2..31 see at least 1:
    # (2*576 + 30*1) / 32 = 1182/32 = 36.9375
    assert lowest_reachable_average(32, 576, (2,)) == 36.9375
    with pytest.raises(ScheduleError, match="lowest reachable average 36.94"):
        solve_drop_ratio(32, 576, (2,), 36.4375 - 1 / 64)
    assert solve_drop_ratio(32, 576, (2,), 36.4375).stage_tokens == (576, 1)
