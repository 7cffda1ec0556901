"""The pre-LLM methods behind one door: solve a budget once, reduce a batch of images.

``solve_pre_llm(method, budget, grid, layers_run)`` turns a budget (mean vision tokens per
decoder layer, which for these methods is simply the tokens each image hands the language
model) into a ``PreLlmPlan``: the pool shape, the VisionZip split or ToMe's merges per
tower layer. ``reduce_images(plan, vision_model, pixel_values, select_layer)`` runs the
transformers CLIP vision model with that plan and returns a ``VisionReduction``.
``pre_llm_trace`` describes the prefill in the same ``PruningTrace`` the decoder loop fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decoder import PruningTrace
from .methods import PRE_LLM_METHODS, get_method
from .reduction import VisionReduction
from .schedule import ScheduleError, VisionSchedule

__all__ = ["PreLlmPlan", "pre_llm_schedule", "pre_llm_trace", "reduce_images", "solve_pre_llm"]


@dataclass(frozen=True)
class PreLlmPlan:
    """How one image's ``num_patches`` (a ``grid`` of patches) become ``num_tokens``.

    ``setting``: the method's (``PruneMethod.tower_setting``): ``pool`` ``(rows, cols)`` of the
    pooled grid; ``visionzip`` ``(dominant, contextual)``; ``tome`` the tokens merged in each
    tower layer that runs.
    """

    method: str
    budget: float
    num_patches: int
    grid: tuple[int, int]
    num_tokens: int
    setting: tuple[int, ...]


def solve_pre_llm(method: str, budget: float, grid: tuple[int, int], num_layers_run: int) -> PreLlmPlan:
    """The plan meeting ``budget`` tokens per image; infeasible budgets raise ``ScheduleError``
    naming the method, the request and the reachable range."""
    rule = get_method(method)
    if rule.in_decoder:
        raise ScheduleError(f"{method!r} is not a pre-LLM method ({', '.join(PRE_LLM_METHODS)})")
    setting, count = rule.tower_setting(budget, tuple(grid), num_layers_run)
    return PreLlmPlan(method, float(budget), grid[0] * grid[1], tuple(grid), int(count), tuple(setting))


def pre_llm_schedule(plan: PreLlmPlan, num_decoder_layers: int) -> VisionSchedule:
    """The plan in the decoder's accounting: all patches before layer 0, ``num_tokens`` in every layer."""
    return VisionSchedule(num_decoder_layers, plan.num_patches, (0,), 1.0 - plan.num_tokens / plan.num_patches,
                          (plan.num_patches, plan.num_tokens))


def reduce_images(plan: PreLlmPlan, vision_model, pixel_values: torch.Tensor, select_layer: int) -> VisionReduction:
    """Run the CLIP ``vision_model`` on ``(n, 3, H, W)`` pixels under ``plan``; the tokens handed on (patch
    features; released VisionZip hands CLS on as its first token)."""
    return get_method(plan.method).reduce(plan.setting, plan.grid, vision_model, pixel_values, select_layer)


def pre_llm_trace(vision_mask: torch.Tensor, attention_mask: torch.Tensor | None, num_layers: int,
                  merge_groups: torch.Tensor) -> PruningTrace:
    """The trace of a prefill whose images were reduced before the decoder (nothing drops inside)."""
    batch, length = vision_mask.shape
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(vision_mask)
    positions = torch.arange(length).expand(batch, -1).masked_fill(~real.cpu(), -1)
    return PruningTrace(
        prune_layers=(),
        kept_vision_positions=[[torch.nonzero(row).flatten().cpu() for row in vision_mask]],
        tokens_per_layer=real.sum(1, keepdim=True).cpu().expand(batch, num_layers).clone(),
        padded_length_per_layer=[length] * num_layers,
        token_positions=positions,
        merge_groups=merge_groups.detach().cpu(),
    )
