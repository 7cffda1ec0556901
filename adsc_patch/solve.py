"""Any method at any budget, for a model described by its sizes alone: the one solver that
the model hook (``configure_pruning``), the profiler and the benchmark share.

``solve_method(method, budget, num_layers, grid, tower_layers_run)`` returns the decoder's
``VisionSchedule`` (tokens per layer, the paper's accounting) and, for a pre-LLM method, its
``PreLlmPlan``. Prune layers default per method (``PruneMethod.default_layers``): ADSC's for
``adsc`` and ``pdrop``, FastV's K for ``fastv``, none for the pre-LLM ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .methods import get_method
from .prellm import PreLlmPlan, pre_llm_schedule, solve_pre_llm
from .schedule import BUDGET_SLACK, ScheduleError, VisionSchedule, lowest_reachable_average, solve_drop_ratio

__all__ = ["MethodSchedule", "default_prune_layers_for", "reachable_budget_range", "recorded_prune_layers_for",
           "solve_method"]


@dataclass(frozen=True)
class MethodSchedule:
    method: str
    budget: float
    schedule: VisionSchedule
    pre_llm: PreLlmPlan | None = None

    @property
    def kept_after_last_stage(self) -> int:
        return self.schedule.stage_tokens[-1]


def default_prune_layers_for(method: str, num_layers: int) -> tuple[int, ...]:
    return get_method(method).default_layers(num_layers)


def recorded_prune_layers_for(method: str, recorded: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """The prune layers ``method`` takes on a checkpoint that records ``recorded`` (a fine-tuned
    schedule): the pre-LLM methods none; FastV, which drops once, the first recorded layer
    (when it is >= 1); the others the recorded layers; the method's defaults without any."""
    return get_method(method).layers_on_recorded(tuple(recorded), num_layers)


def solve_method(method: str, budget: float, num_layers: int, grid: tuple[int, int], tower_layers_run: int,
                 prune_layers: Sequence[int] | None = None) -> MethodSchedule:
    """The schedule meeting ``budget`` (mean vision tokens per decoder layer) by ``method``;
    errors name the method, the request and what is reachable."""
    rule = get_method(method)
    if not rule.in_decoder:
        rule.check_layers(tuple(prune_layers or ()))
        try:
            plan = solve_pre_llm(method, budget, tuple(grid), tower_layers_run)
        except ScheduleError as error:
            message = str(error)
            raise ScheduleError(message if message.startswith("prune method") else
                                f"prune method {method}: {message}") from None
        return MethodSchedule(method, float(budget), pre_llm_schedule(plan, num_layers), plan)
    layers = rule.default_layers(num_layers) if prune_layers is None else tuple(prune_layers)
    rule.check_layers(layers)
    try:
        schedule = solve_drop_ratio(num_layers, grid[0] * grid[1], layers, budget)
    except ScheduleError as error:
        raise ScheduleError(f"prune method {method}: {error}") from None
    return MethodSchedule(method, float(budget), schedule)


def reachable_budget_range(method: str, num_layers: int, grid: tuple[int, int], tower_layers_run: int,
                           prune_layers: Sequence[int] | None = None) -> tuple[int, int]:
    """``(lowest, highest)``: the whole-token budgets ``solve_method`` accepts for ``method``
    (at ``prune_layers``, default: the method's); every whole budget between them is accepted.
    ``ScheduleError`` when none is (e.g. bad layers)."""
    num_tokens = grid[0] * grid[1]
    rule = get_method(method)
    if rule.in_decoder:
        layers = rule.default_layers(num_layers) if prune_layers is None else tuple(prune_layers)
        rule.check_layers(layers)
        if not layers:
            return num_tokens, num_tokens
        lowest = lowest_reachable_average(num_layers, num_tokens, layers)
        return max(1, math.ceil(lowest - BUDGET_SLACK)), num_tokens

    def reachable(budget: int) -> bool:
        try:
            solve_method(method, budget, num_layers, grid, tower_layers_run, prune_layers)
        except ScheduleError:
            return False
        return True

    accepted = [budget for budget in range(1, num_tokens + 1) if reachable(budget)]
    if not accepted:
        raise ScheduleError(f"prune method {method}: no budget of 1..{num_tokens} tokens is reachable")
    return accepted[0], accepted[-1]
