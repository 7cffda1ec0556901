"""2-D average pooling against torch's ``adaptive_avg_pool2d``, a slow per-bin reference of its
overlapping bins, and an exhaustive shape search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adsc_patch.pool import pool_features, pool_groups, pool_shape
from adsc_patch.reduction import group_sizes
from adsc_patch.schedule import ScheduleError

pytestmark = pytest.mark.usefixtures("one_thread")


def bin_bounds(size: int, count: int, index: int) -> range:
    """Adaptive pooling's bin: ``[floor(i * size / count), ceil((i + 1) * size / count))``."""
    return range(math.floor(index * size / count), math.ceil((index + 1) * size / count))


def disjoint_bounds(size: int, count: int, index: int) -> range:
    """Our first reading (non-overlapping bins), kept here as the negative control."""
    return range(math.floor(index * size / count), math.floor((index + 1) * size / count))


def slow_shape(grid, budget):
    """The stated criteria, in floats, over every candidate (ties resolved by h2 <= w2)."""
    h, w = grid
    best = None
    for rows in range(1, h + 1):
        for cols in range(1, w + 1):
            key = (abs(rows * cols - budget), round(abs(math.log((rows / cols) / (h / w))), 9), rows > cols)
            if best is None or key < best[0]:
                best = (key, (rows, cols))
    return best[1]


@pytest.mark.parametrize("budget, shape", [(192, (12, 16)), (128, (8, 16)), (64, (8, 8)), (576, (24, 24)), (1, (1, 1))])
def test_llava_grid_shapes(budget, shape):
    assert pool_shape((24, 24), budget) == shape


@pytest.mark.parametrize("budget, shape", [(121 / 3, (5, 8)), (121 * 2 / 9, (3, 9)), (121 / 9, (2, 7))])
def test_playground_grid_counts(budget, shape):
    rows, cols = pool_shape((11, 11), budget)
    assert (rows, cols) == shape
    assert abs(rows * cols - budget) <= 1  # 40 for 40.3, 27 for 26.9, 14 for 13.4


def test_float_budget_and_aspect_tie_breaks():
    assert pool_shape((24, 24), 191.6) == (12, 16)
    assert pool_shape((6, 12), 18) == (3, 6)  # exact aspect beats (2, 9) and (6, 3)
    assert pool_shape((12, 6), 18) == (6, 3)  # aspect outranks the h2 <= w2 preference
    assert pool_shape((24, 24), 48) == (6, 8)  # 6x8 and 8x6 tie on aspect: h2 <= w2


@pytest.mark.parametrize("grid", [(24, 24), (11, 11), (5, 9), (7, 3)])
def test_shape_matches_exhaustive_search(grid):
    total = grid[0] * grid[1]
    for budget in [1, 2.5, total / 3, total / 7 + 0.2, total] + list(range(1, 40, 3)):
        if budget <= grid[0] * grid[1]:
            assert pool_shape(grid, budget) == slow_shape(grid, budget), (grid, budget)


@pytest.mark.parametrize("budget", [0, 0.5, -1, 577, 576.5, float("nan"), "64", None, True])
def test_shape_errors_name_the_method_and_range(budget):
    with pytest.raises(ScheduleError) as info:
        pool_shape((24, 24), budget)
    message = str(info.value)
    assert message.startswith("prune method pool:") and "\n" not in message
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and not math.isnan(budget):
        assert "1..576" in message and str(budget) in message


@pytest.mark.parametrize("grid, out_shape", [((24, 24), (12, 16)), ((24, 24), (8, 16)), ((11, 11), (3, 9)),
                                             ((11, 11), (2, 7)), ((5, 9), (5, 9)), ((7, 3), (1, 1))])
def test_groups_give_every_patch_the_first_bin_that_holds_it(grid, out_shape):
    h, w = grid
    rows, cols = out_shape
    groups = pool_groups(grid, out_shape)
    assert groups.shape == (h * w,) and groups.dtype == torch.long
    expected = torch.full((h, w), -1, dtype=torch.long)
    for i in range(rows):
        for j in range(cols):
            for r in bin_bounds(h, rows, i):
                for c in bin_bounds(w, cols, j):
                    if expected[r, c] == -1:  # bins overlap: the first one (raster order) keeps the patch
                        expected[r, c] = i * cols + j
    assert (expected >= 0).all()  # and they cover the grid
    assert torch.equal(groups, expected.flatten())
    sizes = group_sizes(groups.unsqueeze(0), rows * cols)
    assert (sizes >= 1).all() and sizes.sum() == h * w


@pytest.mark.parametrize(
    "grid, out_shape", [((24, 24), (12, 16)), ((11, 11), (5, 8)), ((11, 11), (2, 7)), ((4, 6), (3, 4))]
)
def test_features_equal_slow_bin_means(grid, out_shape):
    h, w = grid
    rows, cols = out_shape
    features = torch.randn(3, h * w, 5)
    reduction = pool_features(features, grid, out_shape)
    assert reduction.features.shape == (3, rows * cols, 5) and reduction.num_tokens == rows * cols
    assert reduction.groups.shape == (3, h * w)
    grid_features = features.view(3, h, w, 5)
    operator = F.adaptive_avg_pool2d(grid_features.permute(0, 3, 1, 2), out_shape)  # (3, 5, rows, cols)
    torch.testing.assert_close(reduction.features, operator.flatten(2).transpose(1, 2), atol=1e-6, rtol=1e-6)
    overlapping = False
    for i in range(rows):
        for j in range(cols):
            r = bin_bounds(h, rows, i)
            c = bin_bounds(w, cols, j)
            expected = grid_features[:, r.start:r.stop, c.start:c.stop].reshape(3, -1, 5).mean(1)
            torch.testing.assert_close(reduction.features[:, i * cols + j], expected, atol=1e-6, rtol=1e-6)
            r0, c0 = disjoint_bounds(h, rows, i), disjoint_bounds(w, cols, j)
            overlapping |= (r0, c0) != (r, c)
    if overlapping:  # negative control: non-overlapping bins are not what the operator computes
        disjoint = torch.stack([grid_features[:, r.start:r.stop, c.start:c.stop].reshape(3, -1, 5).mean(1)
                                for r in (disjoint_bounds(h, rows, i) for i in range(rows))
                                for c in (disjoint_bounds(w, cols, j) for j in range(cols))], 1)
        assert not torch.allclose(reduction.features, disjoint, atol=1e-3)
    assert overlapping == (h % rows != 0 or w % cols != 0)
    for image in range(3):
        assert torch.equal(reduction.groups[image], pool_groups(grid, out_shape))


def test_features_keep_dtype():
    features = torch.randn(1, 121, 4, dtype=torch.bfloat16)
    reduction = pool_features(features, (11, 11), (3, 9))
    assert reduction.features.dtype == torch.bfloat16
    expected = features.float().view(1, 11, 11, 4)[:, 0:4, 0:2].reshape(1, -1, 4).mean(1)  # rows [0, 4), cols [0, 2)
    torch.testing.assert_close(reduction.features[:, 0].float(), expected, atol=1e-2, rtol=1e-2)


def test_bad_shapes_raise():
    with pytest.raises(ScheduleError, match="prune method pool"):
        pool_groups((4, 4), (5, 2))
    with pytest.raises(ScheduleError, match="prune method pool"):
        pool_groups((4, 4), (0, 2))
    with pytest.raises(ValueError, match="prune method pool"):
        pool_features(torch.randn(1, 15, 2), (4, 4), (2, 2))
