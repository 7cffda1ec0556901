"""2-D average pooling of the patch grid: the content-blind pre-LLM baseline.

The ``h x w`` patch grid of an image is pooled into ``h2 x w2`` tokens by torch's
``adaptive_avg_pool2d`` (what LLaVA-NeXT-style code uses; pooling has no released
original of its own): output row ``i`` averages input rows ``[floor(i * h / h2),
ceil((i + 1) * h / h2))``, columns likewise, so neighbouring bins overlap by one row or
column where ``h2`` does not divide ``h``, and every bin is a plain mean of its patches.

It acts where ``tome`` and ``visionzip`` do: on the vision tower's patch features (CLS
dropped), before the projector. It reads nothing but the grid shape. Output tokens are the
bins in raster order, which is also ``reduction.py``'s order (by each token's first patch).
``groups`` gives every patch one token: the first bin (raster order) that holds it; no
patch is dropped (no group is -1).

``pool_shape`` picks the bin grid for a budget: the ``h2 x w2`` (``1 <= h2 <= h``,
``1 <= w2 <= w``) whose token count is closest to the budget, then the one whose aspect
ratio is closest to the grid's (``|log((h2 / w2) / (h / w))|``), then the one with
``h2 <= w2``. On LLaVA-1.5's 24x24 grid: 192 -> 12x16, 128 -> 8x16, 64 -> 8x8.
"""
from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real

import torch
import torch.nn.functional as F

from .method_base import PruneMethod
from .reduction import VisionReduction
from .schedule import ScheduleError
from .tower import clip_hidden_state

__all__ = ["Pool", "pool_features", "pool_groups", "pool_shape"]


def _check_grid(grid) -> tuple[int, int]:
    height, width = grid
    for side in (height, width):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ScheduleError(f"prune method pool: patch grid {tuple(grid)} is not two positive integers")
    return height, width


def pool_shape(grid: tuple[int, int], budget: float) -> tuple[int, int]:
    """``(h2, w2)``: the bin grid for ``budget`` tokens on an ``h x w`` patch grid.

    ``budget`` may be a float. Below 1 or above ``h * w`` raises ``ScheduleError``.
    """
    height, width = _check_grid(grid)
    if isinstance(budget, bool) or not isinstance(budget, Real) or math.isnan(budget):
        raise ScheduleError(f"prune method pool: budget {budget!r} is not a number")
    if not 1 <= budget <= height * width:
        raise ScheduleError(
            f"prune method pool: budget {budget} vision tokens is out of range for a {height}x{width} "
            f"patch grid (reachable 1..{height * width})"
        )
    target = Fraction(budget)

    def cost(shape: tuple[int, int]):
        rows, cols = shape
        # |log((rows / cols) / (h / w))| grows with max(a, b) / min(a, b): compared exactly.
        a, b = rows * width, cols * height
        return abs(rows * cols - target), Fraction(max(a, b), min(a, b)), rows > cols

    return min(((rows, cols) for rows in range(1, height + 1) for cols in range(1, width + 1)), key=cost)


def _first_bins(size: int, count: int) -> list[int]:
    """The first adaptive-pooling bin holding every input index (bin ``i`` spans
    ``[floor(i * size / count), ceil((i + 1) * size / count))``)."""
    return [min(i for i in range(count) if i * size // count <= index < -(-(i + 1) * size // count))
            for index in range(size)]


def pool_groups(grid: tuple[int, int], out_shape: tuple[int, int]) -> torch.Tensor:
    """``(h * w,)`` long: the first bin (output token, raster order) holding every patch."""
    height, width = _check_grid(grid)
    rows, cols = _check_grid(out_shape)
    if rows > height or cols > width:
        raise ScheduleError(
            f"prune method pool: cannot pool a {height}x{width} patch grid into {rows}x{cols} bins "
            f"(at most {height}x{width})"
        )
    row_bin = torch.tensor(_first_bins(height, rows), dtype=torch.long)
    col_bin = torch.tensor(_first_bins(width, cols), dtype=torch.long)
    return (row_bin[:, None] * cols + col_bin[None, :]).reshape(-1)


def pool_features(features: torch.Tensor, grid: tuple[int, int], out_shape: tuple[int, int]) -> VisionReduction:
    """Average-pool ``features`` ``(n, h * w, D)`` (raster order) into ``h2 * w2`` tokens."""
    height, width = _check_grid(grid)
    if features.dim() != 3 or features.shape[1] != height * width:
        raise ValueError(
            f"prune method pool: features {tuple(features.shape)} are not (images, {height}*{width}, dim)"
        )
    groups = pool_groups(grid, out_shape).to(features.device)
    n, _, dim = features.shape
    image = features.float().transpose(1, 2).reshape(n, dim, height, width)
    pooled = F.adaptive_avg_pool2d(image, out_shape).flatten(2).transpose(1, 2).to(features.dtype)
    return VisionReduction(features=pooled, groups=groups.unsqueeze(0).expand(n, -1).clone())


class Pool(PruneMethod):
    """``pool``: the patch grid average-pooled to the bin grid closest to the budget."""

    name = "pool"
    in_decoder = False

    def tower_setting(self, budget, grid, layers_run):
        shape = tuple(pool_shape(grid, budget))
        return shape, shape[0] * shape[1]

    def reduce(self, setting, grid, vision_model, pixel_values, select_layer):
        hidden = clip_hidden_state(vision_model, pixel_values, select_layer).hidden[:, 1:]
        return pool_features(hidden, grid, setting)
