"""Every pruning method by name, and where it acts; the one table the rest reads.

In the decoder (``decoder.pruned_decoder_forward`` runs them, sharing its schedule, cache
and trace):

* ``adsc``: positional survivors (``select``), the same for every image;
* ``fastv``: top attention of the last prompt token at layer ``K-1`` (``fastv``);
* ``pdrop``: top attention of the last instruction token at each prune layer (``pdrop``).

Before the decoder, on the vision tower's features (``reduction``): ``tome`` (``tome``),
``visionzip`` (``visionzip``), ``pool`` (``pool``).
"""

from __future__ import annotations

from typing import Callable

from . import fastv, pdrop
from .reduction import PRE_LLM_METHODS

__all__ = ["IN_LLM_METHODS", "PRE_LLM_METHODS", "PRUNE_METHODS", "SCORE_LAYER", "is_pre_llm"]

IN_LLM_METHODS = ("adsc", "fastv", "pdrop")
PRUNE_METHODS = IN_LLM_METHODS + PRE_LLM_METHODS

# Score-based in-LLM methods: prune layer -> the layer whose attention ranks the tokens there.
SCORE_LAYER: dict[str, Callable[[int], int]] = {"fastv": fastv.score_layer, "pdrop": pdrop.score_layer}


def is_pre_llm(method: str) -> bool:
    return method in PRE_LLM_METHODS
