"""From a request to a setting: the pruning policy of a model that prunes by its config.

A model with the config hook (``llava.LlavaLlamaForCausalLM``) saves its schedule as five
fields (``PruningSetting``). A request (``configure_pruning``'s arguments, or a
``PruningSpec``) is resolved against what the model is (``HostFacts``: depth, tokens and grid
of one image, tower layers that run), what its config saves and what its checkpoint's
fine-tune recorded, into the setting to store or to use for one call, and the per-image
schedule it means. Defaults, layer rules and the solving are the methods' (``methods``,
``solve``); nothing here knows a method by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .methods import DEFAULT_METHOD, get_method
from .prellm import PreLlmPlan, pre_llm_schedule
from .schedule import ScheduleError, VisionSchedule, kept_tokens, solve_drop_ratio, validate_drop_ratio, vision_schedule
from .select import SELECTIONS
from .solve import MethodSchedule, reachable_budget_range, solve_method
from .spec import PruningSpec

__all__ = ["HostFacts", "PruningSetting", "layers_for", "pre_llm_plan", "reachable_budgets", "recorded_layers",
           "resolve_request", "resolve_spec", "schedule_of", "solve_for_host"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruningSetting:
    """The five pruning fields of a config (``prune_layers``, ``drop_ratio``,
    ``vision_token_budget``, ``prune_selection``, ``prune_method``), resolved."""

    prune_layers: tuple[int, ...] = ()
    drop_ratio: float = 0.0
    vision_token_budget: float | None = None
    prune_selection: str = "uniform_2d"
    prune_method: str = DEFAULT_METHOD

    @property
    def enabled(self) -> bool:
        """Whether anything is pruned: in-decoder layers with a ratio, or a pre-LLM budget."""
        if not get_method(self.prune_method).in_decoder:
            return self.vision_token_budget is not None
        return bool(self.prune_layers) and self.drop_ratio > 0

    @classmethod
    def of_config(cls, config) -> "PruningSetting":
        return cls(tuple(config.prune_layers), config.drop_ratio, config.vision_token_budget,
                   config.prune_selection, config.prune_method)

    def store(self, config) -> None:
        """Write the setting into ``config`` (what ``configure_pruning`` does)."""
        config.prune_layers = list(self.prune_layers)
        config.drop_ratio = self.drop_ratio
        config.vision_token_budget = self.vision_token_budget
        config.prune_selection = self.prune_selection
        config.prune_method = self.prune_method


@dataclass(frozen=True)
class HostFacts:
    """What resolving needs to know about a model: ``num_layers`` of its decoder; per image
    ``num_tokens`` vision tokens (``None``: no vision tower) on a patch ``grid`` (``None``:
    the tokens are not a grid, e.g. CLS handed on); ``tower_layers_run`` (the pre-LLM methods)."""

    num_layers: int
    num_tokens: int | None
    grid: tuple[int, int] | None
    tower_layers_run: int | None = None


def _solve_grid(host: HostFacts, method: str) -> tuple[int, int]:
    if host.num_tokens is None:
        raise ScheduleError(f"prune method {method} needs a vision tower")
    if host.grid is None:
        if not get_method(method).in_decoder:
            raise ScheduleError(f"prune method {method} works on the patch grid; this model's image tokens are "
                                "not one (its tower hands on CLS too)")
        return (1, host.num_tokens)
    return host.grid


def solve_for_host(host: HostFacts, method: str, budget: float, prune_layers=None) -> MethodSchedule:
    """``solve.solve_method`` on this host (layers ``None``: the method's defaults)."""
    return solve_method(method, budget, host.num_layers, _solve_grid(host, method), host.tower_layers_run,
                        None if prune_layers is None else list(prune_layers))


def recorded_layers(host: HostFacts, recorded: PruningSetting | None, method: str) -> tuple[int, ...]:
    """The checkpoint's recorded prune layers as ``method`` takes them; ``()`` when none are recorded."""
    if recorded is None or not recorded.prune_layers:
        return ()
    return get_method(method).layers_on_recorded(recorded.prune_layers, host.num_layers)


def layers_for(host: HostFacts, saved: PruningSetting, recorded: PruningSetting | None, method: str) -> tuple[int, ...]:
    """The layers ``method`` prunes at when none are given: the saved ones when it is the saved
    method, else the checkpoint's recorded ones where they fit it, else its defaults."""
    rule = get_method(method)
    if not rule.in_decoder:
        return ()
    if method == saved.prune_method and saved.prune_layers:
        return tuple(saved.prune_layers)
    return recorded_layers(host, recorded, method) or rule.default_layers(host.num_layers)


def reachable_budgets(host: HostFacts, saved: PruningSetting, recorded: PruningSetting | None, method: str,
                      prune_layers=None) -> tuple[int, int]:
    """``(lowest, highest)`` whole-token budgets ``method`` reaches at ``prune_layers`` (default:
    ``layers_for``); ``ScheduleError`` for bad layers."""
    grid = _solve_grid(host, method)
    layers = layers_for(host, saved, recorded, method) if prune_layers is None else tuple(prune_layers)
    in_decoder = get_method(method).in_decoder
    return reachable_budget_range(method, host.num_layers, grid, host.tower_layers_run,
                                  layers if in_decoder else None)


def resolve_spec(host: HostFacts, saved: PruningSetting, recorded: PruningSetting | None,
                 spec: PruningSpec) -> tuple[PruningSetting, VisionSchedule | None]:
    """``resolve_request`` of a ``PruningSpec`` (a ``budget_fraction`` of this host's tokens per image)."""
    if spec.options:
        raise ScheduleError(f"prune method {spec.method} takes no options (got {dict(spec.options)})")
    budget = spec.budget_for(host.num_tokens if host.num_tokens is not None else 1)
    return resolve_request(host, saved, recorded, prune_layers=None if spec.layers is None else list(spec.layers),
                           drop_ratio=spec.drop_ratio, vision_token_budget=budget, selection=spec.selection,
                           method=spec.method)


def resolve_request(host: HostFacts, saved: PruningSetting, recorded: PruningSetting | None, prune_layers=None,
                    drop_ratio: float | None = None, vision_token_budget: float | None = None,
                    selection: str | None = None, method: str | None = None
                    ) -> tuple[PruningSetting, VisionSchedule | None]:
    """The setting (and its per-image schedule, ``None`` without a vision tower) a request
    means on top of ``saved``; see ``LlavaLlamaForCausalLM.resolve_pruning`` for the rules."""
    if drop_ratio is not None and vision_token_budget is not None:
        raise ScheduleError("give drop_ratio or vision_token_budget, not both")
    if selection is not None and selection not in SELECTIONS:
        raise ScheduleError(f"prune selection {selection!r}: expected one of {SELECTIONS}")
    method = method or saved.prune_method
    rule = get_method(method)
    selection = selection or saved.prune_selection
    if not rule.in_decoder:
        return _resolve_pre_llm(host, saved, method, prune_layers, drop_ratio, vision_token_budget, selection)
    layers = list(saved.prune_layers if prune_layers is None else prune_layers)
    if prune_layers is None and method != saved.prune_method:
        recorded_here = recorded_layers(host, recorded, method)
        if recorded_here:
            logger.info("prune method %s: the checkpoint's layers %s", method, list(recorded_here))
            layers = list(recorded_here)
        elif layers:
            logger.info("prune method %s replaces %s: its own default layers, not the saved %s",
                        method, saved.prune_method, layers)
            layers = []  # the saved layers were the other method's
    n_tokens = host.num_tokens if host.num_tokens is not None else 1
    asks_pruning = vision_token_budget is not None or (drop_ratio or 0) > 0
    if prune_layers is None and layers and not rule.fits_layers(layers):
        layers = list(rule.default_layers(host.num_layers))
        logger.info("prune method %s: its own layers %s (the saved ones do not fit it)", method, layers)
    elif prune_layers is None and not layers and asks_pruning:
        layers = list(rule.default_layers(host.num_layers))
        logger.info("no prune layers given or saved: using the default layers %s (prune method %s)", layers, method)
    if layers:
        rule.check_layers(layers)
    if drop_ratio is None and vision_token_budget is None and layers:
        vision_token_budget = saved.vision_token_budget
    try:
        if vision_token_budget is not None:
            schedule = solve_drop_ratio(host.num_layers, n_tokens, layers, vision_token_budget)
        else:
            ratio = saved.drop_ratio if drop_ratio is None else drop_ratio
            schedule = vision_schedule(host.num_layers, n_tokens, layers, ratio)
    except ScheduleError as error:
        raise ScheduleError(f"prune method {method}: {error}") from None
    setting = PruningSetting(tuple(schedule.prune_layers), schedule.drop_ratio, vision_token_budget, selection, method)
    return setting, (schedule if host.num_tokens is not None else None)


def _resolve_pre_llm(host, saved, method, prune_layers, drop_ratio, vision_token_budget, selection):
    get_method(method).check_layers(tuple(prune_layers or ()))
    if host.num_tokens is None:
        raise ScheduleError(f"prune method {method} needs a vision tower")
    if drop_ratio is not None:
        budget = None if drop_ratio == 0 else kept_tokens(host.num_tokens, validate_drop_ratio(drop_ratio))
    elif vision_token_budget is not None:
        budget = vision_token_budget
    else:
        budget = saved.vision_token_budget
    setting = PruningSetting((), 0.0, budget, selection, method)
    if budget is None:
        return setting, vision_schedule(host.num_layers, host.num_tokens, [], 0.0)
    return setting, pre_llm_schedule(solve_for_host(host, method, budget).pre_llm, host.num_layers)


def pre_llm_plan(host: HostFacts, setting: PruningSetting) -> PreLlmPlan | None:
    """The plan of a pre-LLM ``setting`` (``None``: an in-decoder method, no budget or no tower)."""
    if get_method(setting.prune_method).in_decoder or setting.vision_token_budget is None:
        return None
    if host.num_tokens is None:
        return None
    return solve_for_host(host, setting.prune_method, setting.vision_token_budget).pre_llm


def schedule_of(host: HostFacts, setting: PruningSetting) -> VisionSchedule:
    """The per-image ``VisionSchedule`` of ``setting`` (a pre-LLM method: all patches before layer
    0, its emitted count in every decoder layer)."""
    if host.num_tokens is None:
        raise ValueError("model has no vision tower")
    plan = pre_llm_plan(host, setting)
    if plan is not None:
        return pre_llm_schedule(plan, host.num_layers)
    return vision_schedule(host.num_layers, host.num_tokens, setting.prune_layers, setting.drop_ratio)
