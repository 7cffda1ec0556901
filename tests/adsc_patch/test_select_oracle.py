"""Oracle tests for the token selections: exact kept sets derived by hand from the
documented rules, plus properties computed here (never from the code under test).

The 2-D rule (``adsc_patch/select.py`` module docstring), as used for the derivations:

* deepest stage first; ``k`` lattice points: ``R = round(sqrt(k * h / w))`` rows (at most
  ``k``), the ``k`` points shared between rows as evenly as possible, the rows that get
  one more point being ``spread_indices(R, k % R)``; point ``(r, c)`` at
  ``y = (r + 0.5) * h / R``, ``x = (c + 0.5) * w / n_r``;
* patch ``(i, j)`` (token ``i * w + j``) has its centre at ``(i + 0.5, j + 0.5)``;
* matching is greedy by increasing squared distance, ties going to the lower flat index of
  the distance matrix (earlier row of the matrix first, then earlier column);
* an earlier stage first lets the already kept patches (in token order, the matrix rows)
  claim lattice points (the columns), then snaps the unclaimed lattice points (rows, in
  lattice order) to the free patches (columns, in token order).

Every literal set below is derived that way in its comment: lattice points -> cells.
"""

import math

import numpy as np
import pytest

from adsc_patch.select import RANDOM_SEED, keep_sets
from tests.helpers import reference_lattice as _ref_lattice
from tests.helpers import reference_uniform_2d as _ref_two_d

# ----------------------------------------------------------------------------------------
# exact 2-D sets, derived by hand


def _two_d(h, w, counts):
    return keep_sets(h * w, tuple(counts), "uniform_2d", (h, w))


def test_6x6_keep_4_is_the_four_cell_centred_lattice_points():
    # R = round(sqrt(4)) = 2 rows of 2; y, x in {(0+.5)*6/2, (1+.5)*6/2} = {1.5, 4.5}.
    # Each point is exactly a patch centre: (1.5,1.5)->(1,1)=7, (1.5,4.5)->(1,4)=10,
    # (4.5,1.5)->(4,1)=25, (4.5,4.5)->(4,4)=28 (distance 0).
    # (Un-centred lattice c*w/n: points (0,0),(0,3),(3,0),(3,3) -> {0,2,12,14}; cells shifted
    # by one patch: {6,9,24,27} or {8,11,26,29}.)
    assert _two_d(6, 6, (4,)) == ((7, 10, 25, 28),)


def test_6x6_keep_1_and_2():
    # k=1: one point (3,3), four patch centres at d2=0.5: (2,2),(2,3),(3,2),(3,3); lowest
    # flat index -> (2,2)=14.
    assert _two_d(6, 6, (1,)) == ((14,),)
    # k=2: R = round(sqrt 2) = 1 row of 2: y=3, x in {1.5, 4.5}.
    # (3,1.5): (2,1),(3,1) tie at d2=.25 -> (2,1)=13; (3,4.5) -> (2,4)=16.
    assert _two_d(6, 6, (2,)) == ((13, 16),)


def test_6x6_keep_16_single_stage():
    # R = 4 rows of 4; y, x in {(r+.5)*1.5} = {.75, 2.25, 3.75, 5.25}; each coordinate has a
    # unique nearest centre: .75->0, 2.25->2, 3.75->3, 5.25->5 (|d| = .25 each, d2=.125).
    # rows {0,2,3,5} x cols {0,2,3,5}.
    expected = tuple(r * 6 + c for r in (0, 2, 3, 5) for c in (0, 2, 3, 5))
    assert expected == (0, 2, 3, 5, 12, 14, 15, 17, 18, 20, 21, 23, 30, 32, 33, 35)
    assert _two_d(6, 6, (16,)) == (expected,)


def test_6x6_keep_9_resolves_four_way_ties_by_lowest_flat_index():
    # R = 3 rows of 3; y, x in {1, 3, 5}: every point is a patch corner, four centres at
    # d2 = .5. Greedy order = target order, each takes its lowest free cell:
    # (1,1)->(0,0)=0, (1,3)->(0,2)=2, (1,5)->(0,4)=4, (3,*)->12,14,16, (5,*)->24,26,28.
    assert _two_d(6, 6, (9,)) == ((0, 2, 4, 12, 14, 16, 24, 26, 28),)


def test_6x6_keep_8_uneven_rows():
    # R = round(sqrt 8) = 3; 8 = 3*2 + 2, extra rows spread_indices(3, 2) = [0, 2]:
    # per row [3, 2, 3]. y in {1, 3, 5}.
    # row 0: x in {1,3,5} -> 0, 2, 4 (4-way ties, lowest flat index);
    # row 1: x = (c+.5)*6/2 in {1.5, 4.5}: (3,1.5) -> (2,1),(3,1) tie -> 13; (3,4.5) -> 16;
    # row 2: x in {1,3,5} at y=5 -> (4,0)=24, (4,2)=26, (4,4)=28.
    assert _two_d(6, 6, (8,)) == ((0, 2, 4, 13, 16, 24, 26, 28),)


def test_6x6_keep_12():
    # R = round(sqrt 12) = 3 rows of 4; y in {1,3,5}; x = (c+.5)*1.5 in {.75,2.25,3.75,5.25}
    # -> cols 0, 2, 3, 5; y=1 -> rows 0/1 tie -> 0; y=3 -> rows 2/3 -> 2; y=5 -> 4.
    expected = tuple(r * 6 + c for r in (0, 2, 4) for c in (0, 2, 3, 5))
    assert expected == (0, 2, 3, 5, 12, 14, 15, 17, 24, 26, 27, 29)
    assert _two_d(6, 6, (12,)) == (expected,)


def test_6x6_two_stages_16_then_4():
    # stage 1 (k=4): {7,10,25,28} as above.
    # stage 0 (k=16): lattice L0..L15 on {.75,2.25,3.75,5.25}^2 (row-major).
    # Claims (kept patches = matrix rows in token order 7,10,25,28): each kept centre, e.g.
    # 7 at (1.5,1.5), is at d2 = 1.125 from four lattice points (L0,L1,L4,L5); lowest flat
    # index wins: 7->L0, 10->L2, 25->L8, 28->L10.
    # The 12 unclaimed points each have a unique nearest free patch (d2=.125):
    # L1->(0,2)=2, L3->(0,5)=5, L4->(2,0)=12, L5->(2,2)=14, L6->(2,3)=15, L7->(2,5)=17,
    # L9->(3,2)=20, L11->(3,5)=23, L12->(5,0)=30, L13->32, L14->33, L15->35.
    assert _two_d(6, 6, (16, 4)) == (
        (2, 5, 7, 10, 12, 14, 15, 17, 20, 23, 25, 28, 30, 32, 33, 35),
        (7, 10, 25, 28),
    )


def test_6x6_three_stages_16_9_4():
    # stage 2 (k=4): {7,10,25,28}.
    # stage 1 (k=9): lattice M on {1,3,5}^2. Claims at d2=.5: 7->M0 (1,1), 10->M2 (1,5),
    # 25->M6 (5,1), 28->M8 (5,5). Unclaimed M1 (1,3), M3 (3,1), M4 (3,3), M5 (3,5),
    # M7 (5,3) each sit on a patch corner (4 free cells at d2=.5), lowest index wins:
    # M1->2, M3->12, M4->14, M5->16, M7->(4,2)=26.  -> {2,7,10,12,14,16,25,26,28}
    # stage 0 (k=16): lattice L on {.75,2.25,3.75,5.25}^2. Claims by increasing d2:
    # .125: 2->L1, 12->L4, 14->L5;  .625: 16 (2.5,4.5)->L6 (L6/L7 tie, lower index),
    # 26 (4.5,2.5)->L9 (L9/L13 tie);  1.125: 7->L0, 10->L2, 25->L8, 28->L10.
    # Unclaimed L3, L7, L11, L12, L13, L14, L15 -> unique nearest patches (d2=.125):
    # 5, 17, 23, 30, 32, 33, 35.
    assert _two_d(6, 6, (16, 9, 4)) == (
        (2, 5, 7, 10, 12, 14, 16, 17, 23, 25, 26, 28, 30, 32, 33, 35),
        (2, 7, 10, 12, 14, 16, 25, 26, 28),
        (7, 10, 25, 28),
    )


def test_5x7_single_stages():
    # k=1: (2.5, 3.5) is the centre of (2,3) = 17.
    assert _two_d(5, 7, (1,)) == ((17,),)
    # k=2: R = min(2, max(1, round(sqrt(2*5/7) = 1.195))) = 1 row of 2; y=2.5,
    # x in {1.75, 5.25} -> cols 1, 5 (d2=.0625) -> (2,1)=15, (2,5)=19.
    assert _two_d(5, 7, (2,)) == ((15, 19),)
    # k=6: R = round(sqrt(6*5/7) = 2.07) = 2 rows of 3; y in {1.25, 3.75} -> rows 1, 3;
    # x in {7/6, 3.5, 35/6} -> cols 1, 3, 5.  -> {8,10,12,22,24,26}
    assert _two_d(5, 7, (6,)) == ((8, 10, 12, 22, 24, 26),)
    # k=10: R = round(sqrt(10*5/7) = 2.67) = 3; 10 = 3*3 + 1, extra row
    # spread_indices(3, 1) = [1]: per row [3, 4, 3]; y in {5/6, 2.5, 25/6} -> rows 0, 2, 4.
    # rows 0 and 2 of the lattice: x in {7/6, 3.5, 35/6} -> cols 1, 3, 5;
    # middle row: x = (c+.5)*7/4 in {.875, 2.625, 4.375, 6.125} -> cols 0, 2, 4, 6.
    assert _two_d(5, 7, (10,)) == ((1, 3, 5, 14, 16, 18, 20, 29, 31, 33),)
    # k=15: R = round(sqrt(15*5/7) = 3.27) = 3 rows of 5; y -> rows 0, 2, 4;
    # x = (c+.5)*7/5 in {.7, 2.1, 3.5, 4.9, 6.3} -> cols 0, 2, 3, 4, 6.
    expected = tuple(r * 7 + c for r in (0, 2, 4) for c in (0, 2, 3, 4, 6))
    assert _two_d(5, 7, (15,)) == (expected,)


def test_5x7_two_stages_10_then_6():
    # stage 1 (k=6): {8,10,12,22,24,26}.
    # stage 0 (k=10): lattice L0..L9 = (5/6, {7/6, 3.5, 35/6}), (2.5, {.875, 2.625, 4.375,
    # 6.125}), (25/6, {7/6, 3.5, 35/6}). Claims: 10->L1 and 24->L8 (d2=4/9), then
    # 8->L0, 12->L2, 22->L7, 26->L9 (d2=4/9+1/9). Unclaimed: the middle row L3..L6 ->
    # (2,0)=14, (2,2)=16, (2,4)=18, (2,6)=20.
    assert _two_d(5, 7, (10, 6)) == (
        (8, 10, 12, 14, 16, 18, 20, 22, 24, 26),
        (8, 10, 12, 22, 24, 26),
    )


def test_5x7_three_stages_15_10_6():
    # stages 2 and 1 as above: {8,10,12,22,24,26} and that plus {14,16,18,20}.
    # stage 0 (k=15): lattice P0..P14 = rows y in {5/6, 2.5, 25/6} x x in {.7, 2.1, 3.5,
    # 4.9, 6.3}. Claims by increasing d2: .04: 14->P5, 20->P9; .16: 16->P6, 18->P8;
    # 4/9: 10->P2, 24->P12; 4/9+.36: 8->P1, 12->P3, 22->P11, 26->P13.
    # Unclaimed P0 (5/6,.7)->(0,0)=0, P4->(0,6)=6, P7 (2.5,3.5)->(2,3)=17,
    # P10->(4,0)=28, P14->(4,6)=34.
    assert _two_d(5, 7, (15, 10, 6)) == (
        (0, 6, 8, 10, 12, 14, 16, 17, 18, 20, 22, 24, 26, 28, 34),
        (8, 10, 12, 14, 16, 18, 20, 22, 24, 26),
        (8, 10, 12, 22, 24, 26),
    )


def test_grid_defaults_to_square_and_explicit_transposed_grid_differs():
    # N = 36 with no grid is the 6x6 square: same as the explicit grid.
    assert keep_sets(36, (4,), "uniform_2d") == ((7, 10, 25, 28),)
    # 7x5 (the transpose of 5x7), k=6: R = round(sqrt(6*7/5) = 2.9) = 3 rows of 2;
    # y = (r+.5)*7/3 in {7/6, 3.5, 35/6} -> rows 1, 3, 5; x = (c+.5)*5/2 in {1.25, 3.75}
    # -> cols 1, 3.  -> (1,1)=6, (1,3)=8, (3,1)=16, (3,3)=18, (5,1)=26, (5,3)=28.
    assert keep_sets(35, (6,), "uniform_2d", (7, 5)) == ((6, 8, 16, 18, 26, 28),)


# ----------------------------------------------------------------------------------------
# an independent reference of the 2-D rule (pure Python, tests/helpers.py), for larger grids


def test_reference_reproduces_the_hand_derived_sets():
    # the reference is itself checked against the hand derivations above
    assert _ref_two_d(6, 6, (16, 9, 4))[0] == (2, 5, 7, 10, 12, 14, 16, 17, 23, 25, 26, 28, 30, 32, 33, 35)
    assert _ref_two_d(5, 7, (15, 10, 6))[0] == (0, 6, 8, 10, 12, 14, 16, 17, 18, 20, 22, 24, 26, 28, 34)


@pytest.mark.parametrize(
    "h, w, counts",
    [
        (24, 24, (361, 226, 141, 88)),
        (24, 24, (192, 64)),
        (24, 24, (145, 36, 9, 2)),
        (14, 14, (80, 33, 13)),
        (12, 24, (48,)),
        (9, 9, (40, 20, 10, 5)),
        (8, 10, (30, 12, 5)),
    ],
)
def test_2d_matches_an_independent_reference(h, w, counts):
    assert _two_d(h, w, counts) == _ref_two_d(h, w, counts)


# ----------------------------------------------------------------------------------------
# properties computed here

PROPERTY_CASES = [
    (6, 6, (16, 9, 4)),
    (6, 6, (12,)),
    (5, 7, (15, 10, 6)),
    (7, 5, (20, 6)),
    (12, 12, (72, 24, 8)),
    (24, 24, (361, 226, 141, 88)),
    (24, 24, (192, 64)),
    (14, 14, (80, 33, 13)),
    (12, 24, (48, 18)),
    (9, 9, (40, 20, 10, 5)),
]


@pytest.mark.parametrize("h, w, counts", PROPERTY_CASES)
def test_2d_exact_counts_sorted_in_range_and_nested(h, w, counts):
    sets = _two_d(h, w, counts)
    assert len(sets) == len(counts)
    previous = set(range(h * w))
    for kept, k in zip(sets, counts):
        assert len(kept) == k == len(set(kept))
        assert list(kept) == sorted(kept)
        assert all(0 <= i < h * w for i in kept)
        assert set(kept) <= previous
        previous = set(kept)


@pytest.mark.parametrize("h, w, counts", PROPERTY_CASES)
def test_2d_sets_are_centred_on_the_grid(h, w, counts):
    sets = _two_d(h, w, counts)
    for kept, k in zip(sets, counts):
        rows = np.array(kept) // w
        cols = np.array(kept) % w
        # lattice rows are symmetric about w/2, so columns are centred up to half a patch
        # of snapping (ties go to the lower index)
        assert abs(cols.mean() - (w - 1) / 2) <= 0.5 + 1e-9, (k, cols.mean())
        # rows: the lattice's own mean row (uneven rows put extra points on some rows)
        lattice_row = np.mean([y for y, _ in _ref_lattice(h, w, k)]) - 0.5
        assert abs(rows.mean() - lattice_row) <= 0.5 + 1e-9, (k, rows.mean(), lattice_row)
    # the deepest stage is the lattice itself: when its points are patch centres or on
    # unique nearest patches the mean is exact (checked per case below)


@pytest.mark.parametrize(
    "h, w, k, mean_row, mean_col",
    [
        (6, 6, 4, 2.5, 2.5),  # {7,10,25,28}
        (6, 6, 16, 2.5, 2.5),  # rows/cols {0,2,3,5}
        (5, 7, 6, 2.0, 3.0),  # {8,10,12,22,24,26}
        (5, 7, 15, 2.0, 3.0),  # rows {0,2,4} x cols {0,2,3,4,6}
        (24, 24, 64, 11.5, 11.5),  # 8x8 lattice at 1.5 + 3c: patches 1 + 3c
    ],
)
def test_2d_deepest_stage_mean_is_exactly_the_grid_centre(h, w, k, mean_row, mean_col):
    (kept,) = _two_d(h, w, (k,))
    assert np.mean(np.array(kept) // w) == mean_row
    assert np.mean(np.array(kept) % w) == mean_col


def _largest_gap(h, w, kept):
    """Largest distance (in patches) from any patch to its nearest kept patch."""
    ys, xs = np.divmod(np.arange(h * w), w)
    k = np.array(kept)
    d = np.sqrt((ys[:, None] - ys[k][None]) ** 2 + (xs[:, None] - xs[k][None]) ** 2)
    return d.min(1).max()


@pytest.mark.parametrize(
    "h, w, k",
    [(6, 6, 4), (6, 6, 9), (6, 6, 16), (5, 7, 6), (5, 7, 10), (7, 5, 6), (12, 12, 24), (24, 24, 64),
     (24, 24, 88), (24, 24, 9), (14, 14, 13), (12, 24, 48), (9, 9, 5), (8, 10, 5)],
)
def test_2d_single_stage_largest_gap_is_bounded_by_the_lattice_spacing(h, w, k):
    (kept,) = _two_d(h, w, (k,))
    rows = min(k, max(1, round(math.sqrt(k * h / w))))
    fewest_per_row = k // rows
    # every patch centre lies within half a row spacing and half the widest point spacing
    # of a lattice point; each lattice point is snapped to its own patch (at most half a
    # patch off in each axis)
    bound = math.hypot(h / (2 * rows), w / (2 * fewest_per_row)) + math.hypot(0.5, 0.5)
    assert _largest_gap(h, w, kept) <= bound + 1e-9


def test_2d_largest_gap_exact_small_cases():
    # {7,10,25,28} on 6x6: every patch is within one diagonal step of a kept one
    assert _largest_gap(6, 6, (7, 10, 25, 28)) == pytest.approx(math.sqrt(2))
    assert _largest_gap(6, 6, _two_d(6, 6, (4,))[0]) == pytest.approx(math.sqrt(2))
    # 5x7, k=6 {8,10,12,22,24,26}: corners (0,0)->(1,1), (4,6)->(3,5), ... sqrt 2
    assert _largest_gap(5, 7, _two_d(5, 7, (6,))[0]) == pytest.approx(math.sqrt(2))


# ----------------------------------------------------------------------------------------
# 1-D and random


def test_uniform_1d_exact_sets():
    # N=20, k=8: floor((2i+1)*20/16) = floor(1.25*(2i+1)) = 1,3,6,8,11,13,16,18;
    # then k=3 of those 8: floor((2i+1)*8/6) = 1, 4, 6 -> 3, 11, 16.
    assert keep_sets(20, (8, 3), "uniform_1d") == ((1, 3, 6, 8, 11, 13, 16, 18), (3, 11, 16))
    # N=36, k=9: floor(2*(2i+1)) = 2,6,...,34; then 4 of 9: floor(9(2i+1)/8) = 1,3,5,7
    # -> 6, 14, 22, 30. (uniform_1d ignores the square grid.)
    assert keep_sets(36, (9, 4), "uniform_1d") == ((2, 6, 10, 14, 18, 22, 26, 30, 34), (6, 14, 22, 30))
    # N=7: k=7 keeps all; k=1 keeps floor(7/2) = 3
    assert keep_sets(7, (7, 1), "uniform_1d") == ((0, 1, 2, 3, 4, 5, 6), (3,))
    # N=35, k=10: floor(7(2i+1)/4) = 1,5,8,12,15,19,22,26,29,33; then 4 of 10:
    # floor(10(2i+1)/8) = 1,3,6,8 -> 5, 12, 22, 29
    assert keep_sets(35, (10, 4), "uniform_1d") == (
        (1, 5, 8, 12, 15, 19, 22, 26, 29, 33),
        (5, 12, 22, 29),
    )


@pytest.mark.parametrize("n, counts", [(20, (8, 3)), (576, (361, 226, 141, 88)), (35, (10, 4, 1)), (100, (100, 37))])
def test_uniform_1d_matches_the_floor_rule(n, counts):
    current = list(range(n))
    expected = []
    for k in counts:
        current = [current[(2 * i + 1) * len(current) // (2 * k)] for i in range(k)]
        expected.append(tuple(current))
    assert keep_sets(n, counts, "uniform_1d") == tuple(expected)


def test_2d_without_a_grid_is_the_1d_rule():
    # 35 tokens, no grid given, not a square: 1-D fallback, see test_uniform_1d_exact_sets
    assert keep_sets(35, (10, 4), "uniform_2d") == (
        (1, 5, 8, 12, 15, 19, 22, 26, 29, 33),
        (5, 12, 22, 29),
    )


@pytest.mark.parametrize("n, counts", [(36, (16, 9, 4)), (576, (192, 64)), (35, (10, 6, 1))])
def test_random_is_a_prefix_of_the_seed_0_permutation(n, counts):
    assert RANDOM_SEED == 0
    order = np.random.RandomState(0).permutation(n)
    expected = tuple(tuple(sorted(int(i) for i in order[:k])) for k in counts)
    sets = keep_sets(n, counts, "random")
    assert sets == expected
    for a, b in zip(sets, sets[1:]):
        assert set(b) <= set(a)
