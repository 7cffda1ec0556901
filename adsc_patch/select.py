"""Which vision tokens of one image survive each prune layer (ADSC's uniform selection).

The selection is positional only: it depends on the image's token count, its patch grid
and the schedule's keep counts, never on the content, so it is identical for every image,
every batch and every training step. Survivor sets are *nested*: a token dropped at one
prune layer never comes back at a later one.

Two layouts:

``uniform_2d`` (default, the paper's "uniformly spaced spatial positions")
    For a patch grid of ``h x w`` tokens. The deepest stage (fewest tokens) is a regular
    lattice: ``R = round(sqrt(k * h / w))`` rows, the ``k`` points shared between rows as
    evenly as possible, cell-centred, snapped to distinct patches. Each earlier stage then
    adds patches so that it too is as close as possible to its own ``k``-point lattice:
    its already chosen patches claim their nearest lattice points and the unclaimed lattice
    points are snapped to the nearest free patches. A stride over the row-major order (the
    1-D layout) aliases into whole unseen columns whenever the stride divides the width;
    this does not.

``uniform_1d``
    Evenly spaced over the token sequence: of ``n`` current survivors, the ones at
    ``floor((2i + 1) * n / (2k))`` for ``i < k``. For token sequences that are not a grid.

``random``
    A fixed random subset: one permutation of the ``N`` tokens drawn with a fixed seed
    (``RANDOM_SEED``), each stage keeping its first ``k``. Identical for every image and
    every run, nested like the others; the floor every selection rule must beat.

``keep_sets`` is the one entry point; it is cached, so it runs once per shape and schedule.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

__all__ = ["RANDOM_SEED", "SELECTIONS", "keep_sets", "square_grid", "spread_indices"]

SELECTIONS = ("uniform_2d", "uniform_1d", "random")
RANDOM_SEED = 0


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)``, centred in ``k`` equal bins."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n}")
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def square_grid(num_tokens: int) -> tuple[int, int] | None:
    """``(side, side)`` if ``num_tokens`` is a perfect square, else ``None``."""
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else None


def _lattice(height: int, width: int, k: int) -> np.ndarray:
    """``k`` points ``(y, x)`` forming the most regular lattice over an ``h x w`` area."""
    rows = min(k, max(1, round(math.sqrt(k * height / width))))
    base, extra = divmod(k, rows)
    per_row = [base] * rows
    for r in spread_indices(rows, extra):
        per_row[r] += 1
    points = []
    for r, n in enumerate(per_row):
        y = (r + 0.5) * height / rows
        points.extend((y, (c + 0.5) * width / n) for c in range(n))
    return np.asarray(points, dtype=np.float64)


def _greedy_matching(dist: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, col) chosen greedily by increasing distance, ties by flat index."""
    flat = np.argsort(dist, axis=None, kind="stable")
    rows_used = np.zeros(dist.shape[0], dtype=bool)
    cols_used = np.zeros(dist.shape[1], dtype=bool)
    pairs = []
    limit = min(dist.shape)
    for f in flat:
        r, c = divmod(int(f), dist.shape[1])
        if rows_used[r] or cols_used[c]:
            continue
        rows_used[r] = cols_used[c] = True
        pairs.append((r, c))
        if len(pairs) == limit:
            break
    return pairs


def _uniform_2d(height: int, width: int, counts: Sequence[int]) -> list[tuple[int, ...]]:
    ys, xs = np.divmod(np.arange(height * width), width)
    cells = np.stack([ys + 0.5, xs + 0.5], axis=1)
    chosen = np.zeros(height * width, dtype=bool)
    sets: list[tuple[int, ...]] = [()] * len(counts)
    for stage in range(len(counts) - 1, -1, -1):
        lattice = _lattice(height, width, counts[stage])
        unclaimed = np.ones(len(lattice), dtype=bool)
        have = np.flatnonzero(chosen)
        if len(have):
            dist = ((cells[have][:, None, :] - lattice[None]) ** 2).sum(-1)
            for _, point in _greedy_matching(dist):
                unclaimed[point] = False
        targets = lattice[unclaimed]
        if len(targets):
            free = np.flatnonzero(~chosen)
            dist = ((targets[:, None, :] - cells[free][None]) ** 2).sum(-1)
            for _, cell in _greedy_matching(dist):
                chosen[free[cell]] = True
        sets[stage] = tuple(int(i) for i in np.flatnonzero(chosen))
    return sets


def _uniform_1d(num_tokens: int, counts: Sequence[int]) -> list[tuple[int, ...]]:
    current = list(range(num_tokens))
    sets = []
    for k in counts:
        current = [current[i] for i in spread_indices(len(current), k)]
        sets.append(tuple(current))
    return sets


def _random(num_tokens: int, counts: Sequence[int]) -> list[tuple[int, ...]]:
    order = np.random.RandomState(RANDOM_SEED).permutation(num_tokens)
    return [tuple(sorted(int(i) for i in order[:k])) for k in counts]


@lru_cache(maxsize=512)
def keep_sets(
    num_tokens: int,
    counts: tuple[int, ...],
    selection: str = "uniform_2d",
    grid: tuple[int, int] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Survivors of one image after each prune layer.

    Args:
        num_tokens: vision tokens of the image before any pruning (``N``).
        counts: keep count after each prune layer, non-increasing, each in ``[1, N]``.
        selection: ``"uniform_2d"``, ``"uniform_1d"`` or ``"random"`` (see the module docstring).
        grid: ``(height, width)`` of the patch grid in row-major token order; ``None``
            means square if ``N`` is a perfect square. A 2-D selection on tokens that do
            not form a grid falls back to the 1-D layout.

    Returns:
        One sorted tuple of token indices (``0..N-1``, row-major) per prune layer; each
        tuple is a subset of the previous one and has exactly ``counts[s]`` entries.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")
    previous = num_tokens
    for k in counts:
        if not 1 <= k <= previous:
            raise ValueError(f"keep counts {counts} must be non-increasing within [1, {num_tokens}]")
        previous = k
    if selection == "random":
        return tuple(_random(num_tokens, counts))
    if selection == "uniform_2d":
        grid = grid or square_grid(num_tokens)
        if grid is not None and grid[0] * grid[1] != num_tokens:
            raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
        if grid is not None:
            return tuple(_uniform_2d(grid[0], grid[1], counts))
    return tuple(_uniform_1d(num_tokens, counts))
