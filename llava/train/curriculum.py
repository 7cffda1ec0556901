"""Curriculum over the vision-token budget (the paper's section III-C).

Training is split into phases; phase ``i`` trains with ``factors[i] x`` the target budget,
at the same prune layers and method (the ratio, or a pre-LLM method's setting, is solved
per phase). Reverse: 0.8x, 0.9x, 1.0x
(starts harder than the target); standard: 1.2x, 1.1x, 1.0x; direct: 1.0x throughout.
The phase follows the optimizer step, so a resumed run picks up the phase of its step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from transformers import TrainerCallback

from adsc_patch import VisionSchedule
from adsc_patch.methods import is_pre_llm

from ..cli import InputError

logger = logging.getLogger(__name__)

__all__ = ["CurriculumPhase", "plan_curriculum", "phase_at", "CurriculumCallback"]


@dataclass(frozen=True)
class CurriculumPhase:
    index: int
    start_step: int
    factor: float
    budget: float
    schedule: VisionSchedule

    def describe(self, count: int) -> str:
        return (
            f"curriculum phase {self.index + 1}/{count} from step {self.start_step}: "
            f"budget {self.factor:g} x target = {self.budget:.2f} vision tokens "
            f"(drop ratio {self.schedule.drop_ratio:.4f}, {' -> '.join(map(str, self.schedule.stage_tokens))}, "
            f"average {self.schedule.average_tokens:.2f})"
        )


def plan_curriculum(
    target_budget: float,
    factors: tuple[float, ...],
    fractions: tuple[float, ...],
    total_steps: int,
    solve: Callable[[float], VisionSchedule],
) -> list[CurriculumPhase]:
    """Phases with their first optimizer step and solved schedule.

    Phase ``i`` starts at ``round(total_steps * sum(fractions[:i]))``. Every phase budget
    is solved here by ``solve`` (the model's ``solve_schedule`` for its method and prune
    layers), so an infeasible one fails before training starts.
    """
    if len(factors) != len(fractions):
        raise InputError(f"{len(factors)} curriculum factors but {len(fractions)} phase fractions")
    phases, cumulative = [], 0.0
    for index, (factor, fraction) in enumerate(zip(factors, fractions)):
        start = round(total_steps * cumulative)
        cumulative += fraction
        budget = factor * target_budget
        schedule = solve(budget)
        phases.append(CurriculumPhase(index, start, factor, budget, schedule))
    return phases


def phase_at(phases: list[CurriculumPhase], step: int) -> CurriculumPhase:
    """The phase an optimizer step (0-based count of completed steps) belongs to."""
    current = phases[0]
    for phase in phases:
        if step >= phase.start_step:
            current = phase
    return current


class CurriculumCallback(TrainerCallback):
    """Puts the phase of each step into effect, and logs it.

    ``model`` is the model the phases act on (inside any PEFT/DeepSpeed wrapper); ``plan``
    builds the phases once the Trainer knows its number of steps. ``apply(phase)`` puts a
    phase into effect; by default ``model.configure_pruning`` at the phase's budget
    (``LlavaLlamaForCausalLM``); transformers' VLMs pass their own (``apply_adsc`` with the
    phase's spec). ``describe(phase, count)`` is the log line's text (default
    ``CurriculumPhase.describe``).
    """

    def __init__(self, model, plan, apply: Callable[[CurriculumPhase], None] | None = None,
                 describe: Callable[[CurriculumPhase, int], str] | None = None):
        self.model = model
        self.plan = plan
        self.apply = apply or self._configure_pruning
        self.describe = describe or (lambda phase, count: phase.describe(count))
        self.phases: list[CurriculumPhase] = []
        self.current: CurriculumPhase | None = None

    def _configure_pruning(self, phase: CurriculumPhase) -> None:
        in_decoder = not is_pre_llm(self.model.config.prune_method)
        self.model.configure_pruning(
            prune_layers=list(phase.schedule.prune_layers) if in_decoder else [], vision_token_budget=phase.budget
        )

    def _apply(self, step: int) -> None:
        phase = phase_at(self.phases, step)
        if phase is self.current:
            return
        self.current = phase
        self.apply(phase)
        logger.info("step %d: %s", step, self.describe(phase, len(self.phases)))

    def on_train_begin(self, args, state, control, **kwargs):
        self.phases = self.plan(state.max_steps)
        if state.global_step:
            logger.info("resuming at step %d", state.global_step)
        self._apply(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state.global_step)
