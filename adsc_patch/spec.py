"""``PruningSpec``: one frozen, serialisable value for every pruning request.

A spec names the method and how much to keep, in exactly one unit:

* ``budget``: mean vision tokens per decoder layer (the ADSC paper's accounting; for the
  pre-LLM methods the tokens each image hands on);
* ``budget_fraction``: that mean as a fraction of each image's own tokens (the natural unit
  when images differ in size);
* ``drop_ratio``: the fraction dropped at every prune layer (``0``: nothing pruned);

and where: ``layers`` (decoder layers whose input drops tokens; ``None``: the method's own, or
a checkpoint's recorded ones where they fit; ``()``: none, so an in-decoder method prunes
nothing), ``selection`` (ADSC's positional rule) and ``options`` (method options, sorted
``(name, value)`` pairs, empty for the released methods). Constructing one validates it and
raises ``ScheduleError`` with one line naming the problem.

Every format saved so far reads into a spec (``PruningSpec.read``): a checkpoint's
config.json fields (``prune_method``, ``prune_layers``, ``drop_ratio``, ``vision_token_budget``,
``prune_selection``), the ``pruning`` settings of answer files (``selection``, ``method``
absent for ADSC, derived counts ignored), the playground's run schedules (``method``,
``prune_layers``, ``vision_token_budget``, ``selection``) and the spec's own ``to_dict``.
``config_fields`` writes the config.json form back.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from .methods import DEFAULT_METHOD, get_method, is_pre_llm
from .schedule import ScheduleError
from .select import SELECTIONS

__all__ = ["PruningSpec", "add_spec_flags", "parse_layer_list", "spec_from_flags"]

_UNITS = ("budget", "budget_fraction", "drop_ratio")
# Fields an answer file's ``pruning`` settings derive from the schedule; not part of a request.
_DERIVED = ("vision_tokens_per_stage", "average_vision_tokens", "vision_tokens_after_last_stage",
            "vision_tokens_per_layer")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScheduleError(f"pruning {name} {value!r} is not a finite number")
    return float(value)


@dataclass(frozen=True)
class PruningSpec:
    """What to prune: ``method``, one of ``budget`` / ``budget_fraction`` / ``drop_ratio``,
    ``layers`` (``None``: the method's own), ``selection`` and method ``options``."""

    method: str = DEFAULT_METHOD
    budget: float | None = None
    budget_fraction: float | None = None
    drop_ratio: float | None = None
    layers: tuple[int, ...] | None = None
    selection: str = "uniform_2d"
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        rule = get_method(self.method)
        if self.selection not in SELECTIONS:
            raise ScheduleError(f"prune selection {self.selection!r}: expected one of {', '.join(SELECTIONS)}")
        given = [unit for unit in _UNITS if getattr(self, unit) is not None]
        if len(given) != 1:
            raise ScheduleError(f"a pruning spec takes exactly one of budget, budget_fraction, drop_ratio "
                                f"(got {', '.join(given) or 'none'})")
        unit = given[0]
        value = _number(unit, getattr(self, unit))
        object.__setattr__(self, unit, value)
        if unit == "budget" and value <= 0:
            raise ScheduleError(f"vision token budget {value:g} must be positive")
        if unit == "budget_fraction" and not 0 < value <= 1:
            raise ScheduleError(f"budget_fraction {value:g} must be in (0, 1]")
        if unit == "drop_ratio" and not 0 <= value < 1:
            raise ScheduleError(f"drop_ratio {value:g} must be in [0, 1)")
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
                    isinstance(layer, int) and not isinstance(layer, bool) for layer in self.layers):
                raise ScheduleError(f"prune layers {self.layers!r}: expected decoder layer indices")
            layers = tuple(int(layer) for layer in self.layers)
            if any(layer < 0 for layer in layers) or list(layers) != sorted(set(layers)):
                raise ScheduleError(f"prune layers {list(layers)}: expected distinct, increasing layer indices >= 0")
            if layers:
                rule.check_layers(layers)
            object.__setattr__(self, "layers", layers)
            if not layers and rule.in_decoder and self.drop_ratio != 0:
                raise ScheduleError(f"prune method {self.method} needs at least one prune layer to meet a "
                                    f"{unit.replace('_', ' ')} (give layers, or None for the method's own)")
        options = dict(self.options)
        if len(options) != len(self.options) or not all(isinstance(name, str) for name in options):
            raise ScheduleError(f"pruning options {self.options!r}: expected distinct (name, value) pairs")
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    # ------------------------------------------------------------------ meaning
    @classmethod
    def off(cls) -> "PruningSpec":
        """Nothing pruned."""
        return cls(drop_ratio=0.0, layers=())

    @property
    def enabled(self) -> bool:
        """Whether this spec prunes anything (a ratio of 0, or an in-decoder method without
        layers, does not)."""
        if self.drop_ratio == 0:
            return False
        return is_pre_llm(self.method) or self.layers != ()

    def budget_for(self, num_tokens: int) -> float | None:
        """The budget in tokens for an image of ``num_tokens`` (``None`` for a ratio spec)."""
        if self.budget_fraction is not None:
            return self.budget_fraction * num_tokens
        return self.budget

    # ------------------------------------------------------------------ formats
    def to_dict(self) -> dict:
        """Plain JSON-able fields, the unset ones left out (``read`` takes it back)."""
        out = {key: value for key, value in asdict(self).items() if value is not None}
        out["layers"] = None if self.layers is None else list(self.layers)
        if out["layers"] is None:
            del out["layers"]
        out["options"] = dict(self.options)
        if not out["options"]:
            del out["options"]
        return out

    def config_fields(self) -> dict:
        """The five fields a checkpoint's config.json saves (``prune_layers`` empty for the
        method's own layers: the model resolves and stores them)."""
        return {"prune_method": self.method, "prune_layers": list(self.layers or ()),
                "drop_ratio": self.drop_ratio or 0.0,
                "vision_token_budget": self.budget if self.budget_fraction is None else None,
                "prune_selection": self.selection}

    @classmethod
    def from_config(cls, config) -> "PruningSpec":
        """The spec a model config (or a config.json mapping) holds in its five fields."""
        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        fields = {key: get(key) for key in ("prune_method", "prune_layers", "drop_ratio", "vision_token_budget",
                                            "prune_selection") if get(key) is not None}
        fields.setdefault("prune_method", DEFAULT_METHOD)
        return cls.read(fields)

    @classmethod
    def read(cls, saved: Mapping[str, Any] | None) -> "PruningSpec":
        """A spec from any saved form (see the module docstring); ``None`` or an empty mapping
        is ``off()``. Unknown keys raise, naming them."""
        if not saved:
            return cls.off()
        saved = {key: value for key, value in saved.items() if key not in _DERIVED}
        if "prune_method" in saved or "prune_selection" in saved:  # config.json
            rename = {"prune_method": "method", "prune_layers": "layers", "vision_token_budget": "budget",
                      "prune_selection": "selection"}
        else:  # answer files, playground schedules, to_dict
            rename = {"prune_layers": "layers", "vision_token_budget": "budget"}
        fields = {rename.get(key, key): value for key, value in saved.items()}
        known = {"method", "budget", "budget_fraction", "drop_ratio", "layers", "selection", "options"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ScheduleError(f"pruning settings hold unknown fields: {', '.join(unknown)}")
        fields.setdefault("method", DEFAULT_METHOD)
        if fields.get("layers") is not None:
            fields["layers"] = tuple(fields["layers"])
        if "options" in fields:
            fields["options"] = tuple(dict(fields["options"] or {}).items())
        if fields.get("budget") is not None:  # a saved budget wins over the ratio solved for it
            fields.pop("drop_ratio", None)
            fields.pop("budget_fraction", None)
        elif fields.get("budget_fraction") is not None:
            fields.pop("drop_ratio", None)
            fields.pop("budget", None)
        else:
            fields.pop("budget", None)
            fields.pop("budget_fraction", None)
            fields["drop_ratio"] = float(fields.get("drop_ratio") or 0.0)
        if fields.get("drop_ratio") == 0:
            fields["layers"] = ()
        elif fields.get("layers") == () and not is_pre_llm(fields["method"]):
            fields["layers"] = None  # saved without layers: the method's own, as the model resolves them
        return cls(**fields)


# ---------------------------------------------------------------------- command-line flags
_FLAGS = ("prune_method", "prune_layers", "vision_token_budget", "budget_fraction", "drop_ratio", "prune_selection")


def parse_layer_list(text: str) -> list[int]:
    """``'1, 4'`` -> ``[1, 4]`` (the ``--prune-layers`` flag; the demo's layers box)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prune-layers takes comma-separated layer indices, got {text!r}") from None


def add_spec_flags(parser: argparse.ArgumentParser, title: str = "vision-token pruning") -> None:
    """The pruning flags every entry point takes: ``--prune-method``, ``--prune-layers``, one of
    ``--vision-token-budget`` / ``--budget-fraction`` / ``--drop-ratio``, ``--prune-selection``,
    ``--no-pruning``; ``spec_from_flags`` reads them."""
    from .methods import PRUNE_METHODS

    group = parser.add_argument_group(title)
    group.add_argument("--prune-layers", type=parse_layer_list, default=None,
                       help="comma-separated 0-based decoder layers; tokens drop at the input of each")
    unit = group.add_mutually_exclusive_group()
    unit.add_argument("--drop-ratio", type=float, default=None, help="fraction dropped at every prune layer")
    unit.add_argument("--vision-token-budget", type=float, default=None,
                      help="average vision tokens over all layers; the drop ratio is solved for it")
    unit.add_argument("--budget-fraction", type=float, default=None,
                      help="the budget as a fraction of each image's vision tokens (e.g. 0.333)")
    group.add_argument("--prune-selection", choices=SELECTIONS, default=None)
    group.add_argument("--prune-method", choices=PRUNE_METHODS, default=None,
                       help="adsc (positional), fastv or pdrop (attention-ranked) in the decoder; tome, visionzip or "
                            "pool before it (docs/methods.md)")
    group.add_argument("--no-pruning", action="store_true", help="run on all vision tokens")


def spec_from_flags(args: argparse.Namespace, saved: PruningSpec) -> PruningSpec | None:
    """The request the flags make on top of ``saved`` (a checkpoint's own spec); ``None`` when
    no flag is given (keep ``saved``). A flag replaces its field; a new unit replaces the saved
    one; a new method without ``--prune-layers`` takes its own layers (the model resolves them,
    a checkpoint's recorded ones where they fit), and so does a saved spec without layers.
    ``ScheduleError`` for a combination that cannot be a request."""
    given = {name: getattr(args, name, None) for name in _FLAGS}
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None]
    if getattr(args, "no_pruning", False):
        if named:
            raise ScheduleError(f"--no-pruning runs on all vision tokens and cannot be combined with "
                                f"{', '.join(named)}")
        return replace(PruningSpec.off(), method=saved.method)  # the method recorded as it was
    if not named:
        return None
    method = given["prune_method"] or saved.method
    units = {"budget": given["vision_token_budget"], "budget_fraction": given["budget_fraction"],
             "drop_ratio": given["drop_ratio"]}
    if all(value is None for value in units.values()):
        units = {"budget": saved.budget, "budget_fraction": saved.budget_fraction, "drop_ratio": saved.drop_ratio}
    layers = given["prune_layers"]
    if layers is None and method == saved.method and saved.layers:
        layers = saved.layers
    if layers is None and units.get("drop_ratio") == 0:
        layers = ()
    return replace(saved, method=method, layers=None if layers is None else tuple(layers),
                   selection=given["prune_selection"] or saved.selection, **units)
