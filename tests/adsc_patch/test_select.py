import numpy as np
import pytest

from adsc_patch.select import keep_sets, spread_indices, square_grid


def _coverage(height, width, kept):
    """Largest and mean distance from any patch to its nearest kept patch."""
    ys, xs = np.divmod(np.arange(height * width), width)
    cells = np.stack([ys, xs], 1)
    dist = np.sqrt(((cells[:, None, :] - cells[list(kept)][None]) ** 2).sum(-1)).min(1)
    return dist.max(), dist.mean()


@pytest.mark.parametrize("selection", ["uniform_2d", "uniform_1d"])
def test_sets_have_exact_counts_are_sorted_and_nested(selection):
    counts = (361, 226, 141, 88)
    sets = keep_sets(576, counts, selection)
    previous = set(range(576))
    for kept, k in zip(sets, counts):
        assert len(kept) == k
        assert list(kept) == sorted(kept)
        assert set(kept) <= previous  # dropped tokens never come back
        previous = set(kept)


def test_selection_is_deterministic_and_content_free():
    a = keep_sets.__wrapped__(576, (192, 64), "uniform_2d", None)
    b = keep_sets.__wrapped__(576, (192, 64), "uniform_2d", None)
    assert a == b


def test_1d_is_centred_stride_over_current_survivors():
    assert spread_indices(12, 4) == [1, 4, 7, 10]
    (first, second) = keep_sets(12, (6, 2), "uniform_1d")
    assert first == (1, 3, 5, 7, 9, 11)
    assert second == (first[1], first[4])


def test_2d_does_not_alias_into_columns_where_1d_does():
    # The case seen in an experiment: every 6th of 12 x 12 patches keeps only two columns.
    (one_d,) = keep_sets(144, (24,), "uniform_1d")
    (two_d,) = keep_sets(144, (24,), "uniform_2d")
    assert len({i % 12 for i in one_d}) == 2
    assert len({i % 12 for i in two_d}) >= 6
    assert len({i // 12 for i in two_d}) >= 4
    worst_1d, _ = _coverage(12, 12, one_d)
    worst_2d, _ = _coverage(12, 12, two_d)
    assert worst_2d < worst_1d


@pytest.mark.parametrize("side, counts", [(24, (361, 226, 141, 88)), (24, (145, 36, 9, 2)), (14, (80, 33, 13))])
def test_2d_stages_stay_close_to_a_regular_lattice(side, counts):
    sets = keep_sets(side * side, counts, "uniform_2d")
    for kept, k in zip(sets, counts):
        worst, _ = _coverage(side, side, kept)
        # a regular lattice of k points leaves no patch farther than half a lattice
        # diagonal, sqrt(area / k) * sqrt(2) / 2; nesting costs at most half as much again
        # plus one patch of snapping
        ideal = np.sqrt(side * side / k) * np.sqrt(2) / 2
        assert worst <= 1.5 * ideal + 1.0, (k, worst, ideal)
    # the deepest stage has no earlier stage to honour: it is the lattice itself, rows x
    # points per row, so no patch is farther than half a lattice cell's diagonal (+ snapping)
    k = counts[-1]
    rows = max(1, round(np.sqrt(k)))
    cell_h, cell_w = side / rows, side / (k // rows)
    worst, _ = _coverage(side, side, sets[-1])
    assert worst <= 0.5 * np.hypot(cell_h, cell_w) + 0.75


def test_non_square_counts_fall_back_to_1d_and_explicit_grid_is_honoured():
    assert square_grid(576) == (24, 24) and square_grid(577) is None
    assert keep_sets(577, (100,), "uniform_2d") == keep_sets(577, (100,), "uniform_1d")
    (wide,) = keep_sets(12 * 24, (48,), "uniform_2d", (12, 24))
    assert len({i % 24 for i in wide}) >= 8
    with pytest.raises(ValueError, match="does not hold"):
        keep_sets(100, (10,), "uniform_2d", (9, 9))


@pytest.mark.parametrize("counts", [(0,), (10, 20), (101,)])
def test_bad_counts_are_refused(counts):
    with pytest.raises(ValueError, match="non-increasing"):
        keep_sets(100, counts, "uniform_2d")


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="unknown selection"):
        keep_sets(100, (10,), "saliency")  # "random" is a selection since the baselines
