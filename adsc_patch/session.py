"""``pruning(model, spec)``: prune the calls inside a block, in this thread or task only.

``with adsc_patch.pruning(model, spec) as session:`` makes ``spec`` (a ``PruningSpec``) what
``model`` prunes by for every call made inside the block by this thread or asyncio task (a
``contextvars.ContextVar``); another thread calling the same model at the same time, inside
its own block or none, sees its own setting. ``session.trace`` is the ``PruningTrace`` of the
last pruned prefill inside the block, handed to the session by the call itself (never read
back from the shared module), and ``session.schedule`` the resolved per-image schedule.

The model's adapter (``adapters``, by ``config.model_type``) decides how: models with the
config hook (``llava.LlavaLlamaForCausalLM``) run the block under ``model.pruned_as``;
transformers' architectures (llava-hf) get the patch's forwards installed while
any session on them is open (a lock-guarded count; they fall through to transformers' own
forward for calls outside every session), so after the last block the model is untouched.
"""

from __future__ import annotations

import contextvars
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from .adapters import adapter_for
from .decoder import AdscPlan, PruningTrace
from .schedule import VisionSchedule
from .spec import PruningSpec

__all__ = ["PruningSession", "pruning", "active_session"]


@dataclass
class PruningSession:
    """One ``pruning`` block: its spec, what it resolved to, and its calls' last trace."""

    spec: PruningSpec
    schedule: VisionSchedule | None = None
    plan: AdscPlan | None = None
    _trace: PruningTrace | None = field(default=None, repr=False)
    _record: object | None = field(default=None, repr=False)  # a config-hook model's CallRecord

    @property
    def trace(self) -> PruningTrace | None:
        """The ``PruningTrace`` of the last pruned prefill inside the block (``None`` before one)."""
        return self._record.trace if self._record is not None else self._trace

    @trace.setter
    def trace(self, value: PruningTrace | None) -> None:
        self._trace = value


_SESSIONS: contextvars.ContextVar[tuple[tuple[int, PruningSession], ...]] = contextvars.ContextVar(
    "adsc_pruning_sessions", default=())
_INSTALLED: dict[int, int] = {}  # id(language model) -> open sessions on it
_LOCK = threading.Lock()


def active_session(module) -> PruningSession | None:
    """The innermost session of this context on ``module`` (by identity), else ``None``."""
    for key, session in reversed(_SESSIONS.get()):
        if key == id(module):
            return session
    return None


@contextmanager
def _entered(module, session: PruningSession):
    token = _SESSIONS.set((*_SESSIONS.get(), (id(module), session)))
    try:
        yield session
    finally:
        _SESSIONS.reset(token)


@contextmanager
def pruning(model, spec: PruningSpec):
    """Prune ``model``'s calls inside the block by ``spec`` (this thread or task only); yields
    the ``PruningSession``. A bad spec raises ``ScheduleError`` before anything changes."""
    if not isinstance(spec, PruningSpec):
        raise TypeError(f"pruning(model, spec) takes an adsc_patch.PruningSpec, got {type(spec).__name__}")
    if adapter_for(model).config_hook:  # our config-hook models
        setting, schedule = model.resolve_spec(spec)
        with model.pruned_as(setting) as record:
            yield PruningSession(spec, schedule, _record=record)
        return
    from . import patch

    language_model, plan, schedule = patch.hf_plan(model, spec)
    session = PruningSession(spec, schedule, plan)
    key = id(language_model)
    with _LOCK:
        if _INSTALLED.get(key, 0) == 0:
            patch.install_forwards(model)
        _INSTALLED[key] = _INSTALLED.get(key, 0) + 1
    try:
        with _entered(language_model, session):
            yield session
    finally:
        with _LOCK:
            _INSTALLED[key] -= 1
            if _INSTALLED[key] == 0:
                del _INSTALLED[key]
                if not patch.has_persistent_plan(model):
                    patch.uninstall_forwards(model)
