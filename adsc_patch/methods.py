"""The method registry: every pruning method by name, one ``PruneMethod`` each (``method_base``).

Built in (docs/methods.md describes each):

* in the decoder: ``adsc`` (``adsc``: positional, the ``selection`` option), ``fastv``
  (``fastv``: top attention of the last prompt token at layer ``K-1``), ``pdrop``
  (``pdrop``: top attention of the last instruction token at each prune layer, survivors
  renumbered after every drop, as PyramidDrop's release does);
* before the decoder, on the vision tower's features: ``tome`` (``tome``), ``visionzip``
  (``visionzip``: CLS handed on, targets at a stride, target + mean, as released), ``pool``
  (``pool``);
* variants, documented departures from the released rule of the method ``variant_of``
  names: ``pdrop_original_ids`` (survivors keep their original position ids) and
  ``visionzip_spread`` (patches only, targets spread evenly, plain means).

Adding a method is one module with a ``PruneMethod`` subclass and one ``register_method``
line (here, or in the user's own code before the model runs). Code outside the registry
asks the method object (``get_method(name)``), never compares names.
"""

from __future__ import annotations

from collections.abc import Sequence

from .adsc import Adsc
from .fastv import FastV
from .method_base import PruneMethod
from .pdrop import PyramidDrop, PyramidDropOriginalIds
from .pool import Pool
from .schedule import ScheduleError
from .tome import ToMe
from .visionzip import VisionZip, VisionZipSpread

__all__ = [
    "DEFAULT_METHOD",
    "IN_LLM_METHODS",
    "PRE_LLM_METHODS",
    "PRUNE_METHODS",
    "PruneMethod",
    "get_method",
    "is_pre_llm",
    "method_names",
    "register_method",
    "released_method",
    "unregister_method",
]

DEFAULT_METHOD = "adsc"

_REGISTRY: dict[str, PruneMethod] = {}


def register_method(method: PruneMethod, replace: bool = False) -> PruneMethod:
    """Make ``method`` known by ``method.name`` everywhere (flags, configs, specs, the profiler)."""
    if not isinstance(method, PruneMethod):
        raise TypeError(f"register_method takes a PruneMethod instance, got {type(method).__name__}")
    if not method.name or not method.name.replace("_", "").isalnum():
        raise ValueError(f"a prune method needs a name of letters, digits and '_', got {method.name!r}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"prune method {method.name!r} is already registered (replace=True to override)")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Forget a method registered by ``register_method`` (tests, plugins); built-ins stay."""
    if name in _BUILT_IN:
        raise ValueError(f"prune method {name!r} is built in")
    _REGISTRY.pop(name, None)


def get_method(name: str) -> PruneMethod:
    """The registered method ``name``; ``ScheduleError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ScheduleError(f"unknown prune method {name!r}; known: {', '.join(method_names())}") from None


def method_names(in_decoder: bool | None = None) -> tuple[str, ...]:
    """Registered names: released methods first, then variants (registration order within)."""
    chosen = [m for m in _REGISTRY.values() if in_decoder is None or m.in_decoder == in_decoder]
    return tuple(m.name for m in chosen if m.variant_of is None) + tuple(m.name for m in chosen if m.variant_of)


class _Names(Sequence):
    """A live, read-only view of the registered names (argparse ``choices``, ``in`` checks)."""

    def __init__(self, in_decoder: bool | None):
        self._in_decoder = in_decoder

    def _names(self) -> tuple[str, ...]:
        return method_names(self._in_decoder)

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


PRUNE_METHODS: Sequence[str] = _Names(None)
IN_LLM_METHODS: Sequence[str] = _Names(True)
PRE_LLM_METHODS: Sequence[str] = _Names(False)


def is_pre_llm(method: str) -> bool:
    """Whether ``method`` reduces each image's tokens before the language model."""
    return not get_method(method).in_decoder


def released_method(method: str) -> str:
    """The released method a name is (itself) or departs from (a variant)."""
    return get_method(method).variant_of or method


for _method in (Adsc(), FastV(), PyramidDrop(), ToMe(), VisionZip(), Pool(), PyramidDropOriginalIds(),
                VisionZipSpread()):
    register_method(_method)
_BUILT_IN = frozenset(_REGISTRY)
