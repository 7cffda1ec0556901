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
from adsc_patch.resolve import PruningSetting  # the five config fields; resolving them is adsc_patch.resolve's

__all__ = ["PruningSetting", "CallRecord", "active_pruning", "active_record", "pruning_override"]


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
