"""Every pruning method by name, and where it acts; the one table the rest reads.

In the decoder (``decoder.pruned_decoder_forward`` runs them, sharing its schedule, cache
and trace):

* ``adsc``: positional survivors (``select``), the same for every image;
* ``fastv``: top attention of the last prompt token at layer ``K-1`` (``fastv``);
* ``pdrop``: top attention of the last instruction token at each prune layer, the survivors
  renumbered after every drop, as PyramidDrop's release does (``pdrop``).

Before the decoder, on the vision tower's features (``reduction``): ``tome`` (``tome``),
``visionzip`` (``visionzip``: CLS handed on, targets at a stride, target + mean, as
released), ``pool`` (``pool``).

Variants: a name in ``VARIANT_OF`` is a documented departure from the released rule of the
method it names, accepted everywhere a method is (docs/methods.md):

* ``pdrop_original_ids``: PyramidDrop whose survivors keep their original position ids (the
  convention of ``adsc`` and ``fastv``), decode positions continuing from the full length;
* ``visionzip_spread``: VisionZip over patches only (CLS neither ranked nor handed on),
  contextual targets spread evenly and centred, each contextual token the plain mean.
"""

from __future__ import annotations

from typing import Callable

from . import fastv, pdrop
from .reduction import PRE_LLM_METHODS

__all__ = [
    "IN_LLM_METHODS",
    "PRE_LLM_METHODS",
    "PRUNE_METHODS",
    "RENUMBERS_POSITIONS",
    "SCORE_LAYER",
    "VARIANT_OF",
    "is_pre_llm",
    "released_method",
]

IN_LLM_METHODS = ("adsc", "fastv", "pdrop", "pdrop_original_ids")

# variant -> the method whose released rule it departs from
VARIANT_OF = {"pdrop_original_ids": "pdrop", "visionzip_spread": "visionzip"}

# ADSC and the released baselines, then the variants
PRUNE_METHODS = tuple(m for m in IN_LLM_METHODS + PRE_LLM_METHODS if m not in VARIANT_OF) + tuple(VARIANT_OF)

# Score-based in-LLM methods: prune layer -> the layer whose attention ranks the tokens there.
SCORE_LAYER: dict[str, Callable[[int], int]] = {
    "fastv": fastv.score_layer,
    "pdrop": pdrop.score_layer,
    "pdrop_original_ids": pdrop.score_layer,
}

# In-LLM methods whose survivors get position ids 0..len-1 after every drop (and decode
# positions shifted down by the number dropped); the others keep the original ids.
RENUMBERS_POSITIONS = ("pdrop",)


def is_pre_llm(method: str) -> bool:
    return method in PRE_LLM_METHODS


def released_method(method: str) -> str:
    """The released method a name is (itself) or departs from (a variant)."""
    return VARIANT_OF.get(method, method)
