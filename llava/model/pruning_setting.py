"""One call's pruning setting, and the context that makes it the model's for that call only.

The schedule a checkpoint saves lives in its config (``prune_layers``, ``drop_ratio``,
``vision_token_budget``, ``prune_selection``, ``prune_method``). A server that answers two
requests with different budgets on one model in memory must not write those fields: the
requests would race on them. ``pruning_override(config, setting)`` makes ``setting`` what
the model reads for the calls made inside it, in this thread or task only (a
``contextvars.ContextVar``: each thread, and each asyncio task, has its own), and collects
the ``PruningTrace`` of the prefill run inside it on a ``CallRecord``.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass

from adsc_patch import PruningTrace
from adsc_patch.methods import is_pre_llm

__all__ = ["PruningSetting", "CallRecord", "active_pruning", "active_record", "pruning_override"]


@dataclass(frozen=True)
class PruningSetting:
    """The five pruning fields of ``LlavaConfig``, resolved (``LlavaLlamaForCausalLM.resolve_pruning``)."""

    prune_layers: tuple[int, ...] = ()
    drop_ratio: float = 0.0
    vision_token_budget: float | None = None
    prune_selection: str = "uniform_2d"
    prune_method: str = "adsc"

    @property
    def enabled(self) -> bool:
        """Whether anything is pruned: in-decoder layers with a ratio, or a pre-LLM budget."""
        if is_pre_llm(self.prune_method):
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


@dataclass
class CallRecord:
    """What one call inside ``pruning_override`` left: the trace of its prefill."""

    trace: PruningTrace | None = None


_ACTIVE: contextvars.ContextVar[tuple[int, PruningSetting, CallRecord] | None] = contextvars.ContextVar(
    "llava_active_pruning", default=None)


def active_pruning(config) -> PruningSetting:
    """The setting in effect for ``config``: the override of this context, else the config's own."""
    active = _ACTIVE.get()
    if active is not None and active[0] == id(config):
        return active[1]
    return PruningSetting.of_config(config)


def active_record(config) -> CallRecord | None:
    active = _ACTIVE.get()
    return active[2] if active is not None and active[0] == id(config) else None


@contextmanager
def pruning_override(config, setting: PruningSetting):
    """Within the block (this context only), ``config``'s model prunes as ``setting``; yields
    the ``CallRecord`` that receives the prefill's trace."""
    record = CallRecord()
    token = _ACTIVE.set((id(config), setting, record))
    try:
        yield record
    finally:
        _ACTIVE.reset(token)
