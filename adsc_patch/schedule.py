"""Vision-token schedules: how many vision tokens of one image enter every decoder layer.

Conventions, used everywhere in this package:

* Decoder layers are indexed from 0. A *prune layer* ``l`` drops vision tokens at the
  **input** of layer ``l``: layer ``l`` and every later layer see the reduced set (FastV's
  ``K`` and PyramidDrop's layer list are counted the same way). Layer 0 is allowed and
  means "drop before the language model".
* At every prune layer ``floor((1 - r) * N)`` of the ``N`` vision tokens still present are
  kept (per image), ``r`` being the drop ratio. Text tokens are never dropped.
* The *budget* of a schedule is the mean over all decoder layers of the number of vision
  tokens entering each layer (the accounting of the ADSC paper's tables and PyramidDrop).

Everything here is pure Python on integers; the solver enumerates every breakpoint of the
step function "drop ratio -> average", so its answer is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "ScheduleError",
    "VisionSchedule",
    "kept_tokens",
    "validate_prune_layers",
    "validate_drop_ratio",
    "vision_schedule",
    "solve_drop_ratio",
    "lowest_reachable_average",
    "default_prune_layers",
    "DEFAULT_PRUNE_LAYER_FRACTIONS",
]

# Relative depths of the default prune layers: (2, 6, 12, 20) for a 32-layer LLaVA-1.5.
# With these, budgets 192, 128 and 64 of 576 tokens are all met to within 0.25 tokens.
DEFAULT_PRUNE_LAYER_FRACTIONS: tuple[float, ...] = (2 / 32, 6 / 32, 12 / 32, 20 / 32)

# Guards floor((1 - r) * n) against float round-off, e.g. r = 2/3 and n = 576 -> 192, not 191.
_FLOOR_EPS = 1e-9


class ScheduleError(ValueError):
    """A pruning schedule that cannot be built (bad layers, ratio or budget)."""


def kept_tokens(num_tokens: int, drop_ratio: float) -> int:
    """Vision tokens kept at one prune layer: ``floor((1 - drop_ratio) * num_tokens)``."""
    return math.floor((1.0 - drop_ratio) * num_tokens + _FLOOR_EPS)


def validate_prune_layers(prune_layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Return the prune layers sorted, after checking they are distinct layer indices."""
    layers = list(prune_layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ScheduleError(f"prune layer {layer!r} is not an integer layer index")
        if not 0 <= layer < num_layers:
            raise ScheduleError(
                f"prune layer {layer} is out of range: the language model has {num_layers} "
                f"decoder layers (valid indices 0..{num_layers - 1})"
            )
    if len(set(layers)) != len(layers):
        raise ScheduleError(f"prune layers {layers} contain duplicates")
    return tuple(sorted(layers))


def validate_drop_ratio(drop_ratio: float) -> float:
    if isinstance(drop_ratio, bool) or not isinstance(drop_ratio, (int, float)):
        raise ScheduleError(f"drop ratio {drop_ratio!r} is not a number")
    if not (0.0 <= drop_ratio < 1.0) or math.isnan(drop_ratio):
        raise ScheduleError(f"drop ratio must be in [0, 1), got {drop_ratio}")
    return float(drop_ratio)


@dataclass(frozen=True)
class VisionSchedule:
    """Vision tokens of one image entering every decoder layer.

    ``tokens_per_layer[l]`` is the count entering layer ``l`` (length ``num_layers``);
    ``stage_tokens[s]`` is the count after the ``s``-th prune layer (``stage_tokens[0]`` is
    the full count), so ``stage_tokens[1:]`` are the keep counts, one per prune layer.
    """

    num_layers: int
    num_vision_tokens: int
    prune_layers: tuple[int, ...]
    drop_ratio: float
    stage_tokens: tuple[int, ...]

    @property
    def tokens_per_layer(self) -> tuple[int, ...]:
        counts = []
        bounds = (*self.prune_layers, self.num_layers)
        current_stage = 0
        for layer in range(self.num_layers):
            while current_stage < len(self.prune_layers) and layer >= bounds[current_stage]:
                current_stage += 1
            counts.append(self.stage_tokens[current_stage])
        return tuple(counts)

    @property
    def average_tokens(self) -> float:
        """The budget this schedule achieves: mean vision tokens over all decoder layers."""
        return sum(self.tokens_per_layer) / self.num_layers

    @property
    def enabled(self) -> bool:
        return self.stage_tokens[-1] < self.num_vision_tokens

    @property
    def stage_bounds(self) -> tuple[tuple[int, int], ...]:
        """``(first_layer, end_layer)`` of every stage; stage 0 starts at layer 0."""
        starts = (0, *self.prune_layers)
        ends = (*self.prune_layers, self.num_layers)
        return tuple(zip(starts, ends))

    def describe(self) -> str:
        if self.prune_layers == (0,):  # dropped (or merged) before the language model
            return (f"{self.num_vision_tokens} -> {self.stage_tokens[-1]} vision tokens before the language model, "
                    f"the same in all {self.num_layers} layers")
        counts = " -> ".join(str(c) for c in self.stage_tokens)
        return (
            f"prune layers {list(self.prune_layers)}, drop ratio {self.drop_ratio:.4f}: "
            f"{counts} vision tokens, average {self.average_tokens:.2f} over {self.num_layers} layers"
        )


def _stage_counts(num_vision_tokens: int, num_prune_layers: int, drop_ratio: float) -> tuple[int, ...]:
    counts = [num_vision_tokens]
    for _ in range(num_prune_layers):
        counts.append(kept_tokens(counts[-1], drop_ratio))
    return tuple(counts)


def vision_schedule(
    num_layers: int,
    num_vision_tokens: int,
    prune_layers: Sequence[int] = (),
    drop_ratio: float = 0.0,
) -> VisionSchedule:
    """Build and validate the schedule for fixed prune layers and drop ratio.

    Raises ``ScheduleError`` for layers out of range, a ratio outside [0, 1), or a schedule
    that would leave zero vision tokens of an image.
    """
    if num_layers <= 0:
        raise ScheduleError(f"number of decoder layers must be positive, got {num_layers}")
    if num_vision_tokens <= 0:
        raise ScheduleError(f"number of vision tokens must be positive, got {num_vision_tokens}")
    layers = validate_prune_layers(prune_layers, num_layers)
    ratio = validate_drop_ratio(drop_ratio)
    counts = _stage_counts(num_vision_tokens, len(layers), ratio)
    if counts[-1] == 0:
        raise ScheduleError(
            f"drop ratio {ratio} at prune layers {list(layers)} leaves zero of the "
            f"{num_vision_tokens} vision tokens ({' -> '.join(map(str, counts))}); "
            "use a smaller ratio or fewer prune layers"
        )
    return VisionSchedule(num_layers, num_vision_tokens, layers, ratio, counts)


@lru_cache(maxsize=256)
def _achievable(num_layers: int, num_vision_tokens: int, prune_layers: tuple[int, ...]):
    """All distinct schedules reachable by some ratio, as (keep fraction q, counts, average).

    ``floor(q * c)`` only changes where ``q * c`` is an integer for some count ``c <= N``,
    so evaluating at every reduced fraction ``j / m`` with ``m <= N`` visits every step of
    the step function. Returned sorted by ``q``; each entry holds on ``[q, next q)``.
    Distinct fractions with denominators ``<= N`` differ by more than ``1 / N**2``, far
    above float resolution, so sorting them as floats is exact.
    """
    n = num_vision_tokens
    m = np.repeat(np.arange(1, n + 1, dtype=np.int64), np.arange(2, n + 2))
    j = np.concatenate([np.arange(0, k + 1, dtype=np.int64) for k in range(1, n + 1)])
    reduced = np.gcd(j, m) == 1
    j, m = j[reduced], m[reduced]
    order = np.argsort(j / m, kind="stable")
    j, m = j[order], m[order]
    counts = [np.full_like(j, n)]
    for _ in prune_layers:
        counts.append(j * counts[-1] // m)
    table = np.stack(counts, axis=1)
    changed = np.ones(len(table), dtype=bool)
    changed[1:] = np.any(table[1:] != table[:-1], axis=1)
    bounds = (*prune_layers, num_layers)
    span = np.array([bounds[0]] + [bounds[i + 1] - bounds[i] for i in range(len(prune_layers))])
    totals = table @ span
    out = []
    for idx in np.flatnonzero(changed):
        out.append((Fraction(int(j[idx]), int(m[idx])), tuple(int(c) for c in table[idx]),
                    Fraction(int(totals[idx]), num_layers)))
    return out


def solve_drop_ratio(
    num_layers: int,
    num_vision_tokens: int,
    prune_layers: Sequence[int],
    budget: float,
) -> VisionSchedule:
    """Find the drop ratio whose schedule's average vision tokens is closest to ``budget``.

    Ties go to the schedule that stays within the budget. The returned schedule carries the
    ratio and its achieved average (``schedule.average_tokens``), which the caller should
    report. Infeasible requests raise ``ScheduleError`` naming the feasible range.
    """
    if num_layers <= 0 or num_vision_tokens <= 0:
        raise ScheduleError("number of layers and vision tokens must be positive")
    layers = validate_prune_layers(prune_layers, num_layers)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget):
        raise ScheduleError(f"vision token budget {budget!r} is not a number")
    if budget > num_vision_tokens:
        raise ScheduleError(
            f"vision token budget {round(budget, 6)} is above the {num_vision_tokens} vision tokens of an image"
        )
    if budget >= num_vision_tokens or not layers:
        if budget < num_vision_tokens:
            raise ScheduleError(
                f"vision token budget {round(budget, 6)} needs at least one prune layer (none given)"
            )
        return vision_schedule(num_layers, num_vision_tokens, layers, 0.0)

    candidates = _achievable(num_layers, num_vision_tokens, layers)
    feasible = [(i, c) for i, c in enumerate(candidates) if c[1][-1] > 0 and c[0] < 1]
    lowest = lowest_reachable_average(num_layers, num_vision_tokens, layers)
    if budget < lowest - BUDGET_SLACK:
        first = layers[0]
        raise ScheduleError(
            f"vision token budget {round(budget, 6)} is below what prune layers {list(layers)} allow "
            f"with {num_layers} layers and {num_vision_tokens} tokens (reachable averages {lowest:.2f}.."
            f"{num_vision_tokens}; lowest reachable average {lowest:.2f}: the {first} layer(s) before layer "
            f"{first} always see all tokens and every stage must keep at least one); prune earlier or with "
            "fewer stages"
        )
    target = Fraction(budget).limit_denominator(10**6)

    def key(item):
        _, (_, _, average) = item
        return (abs(average - target), average > target)

    index, (q, counts, _) = min(feasible, key=key)
    q_next = candidates[index + 1][0] if index + 1 < len(candidates) else Fraction(1)
    # The middle of the interval where these counts hold: robust to float round-off.
    ratio = 1.0 - float((q + q_next) / 2)
    schedule = vision_schedule(num_layers, num_vision_tokens, layers, ratio)
    assert schedule.stage_tokens == counts, (schedule.stage_tokens, counts)
    return schedule


# A budget this far below the lowest reachable average still gets that lowest schedule.
BUDGET_SLACK = 0.5


def lowest_reachable_average(num_layers: int, num_vision_tokens: int, prune_layers: Sequence[int]) -> float:
    """The smallest mean vision tokens per layer that ``prune_layers`` can reach (every stage
    keeps at least one token); ``solve_drop_ratio`` accepts budgets from
    ``lowest - BUDGET_SLACK`` up to ``num_vision_tokens``."""
    layers = validate_prune_layers(prune_layers, num_layers)
    if not layers:
        return float(num_vision_tokens)
    candidates = _achievable(num_layers, num_vision_tokens, layers)
    return min(float(average) for q, counts, average in candidates if counts[-1] > 0 and q < 1)


def default_prune_layers(num_layers: int) -> tuple[int, ...]:
    """Default prune layers for a language model of ``num_layers`` decoder layers.

    ``(2, 6, 12, 20)`` for LLaVA-1.5's 32 layers; other depths scale the same relative
    positions (at least layer 1, so the first layer always sees the whole image).
    """
    if num_layers < 2:
        raise ScheduleError(f"a model with {num_layers} decoder layer(s) has nowhere to prune")
    layers = sorted({max(1, min(num_layers - 1, round(f * num_layers))) for f in DEFAULT_PRUNE_LAYER_FRACTIONS})
    return tuple(layers)
