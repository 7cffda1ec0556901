"""PyramidDrop's rule (Xing et al., 2025): at each prune layer keep a ratio ``lambda`` of the
previous stage's vision tokens, ranked by the attention of the last instruction token.

The attention row is computed with the prune layer's OWN input norm and query/key
projections on its input (``scores.query_attention``; softmax over all keys the query sees,
mean over heads), before the layer runs, so the tokens it drops never enter it. In
training the query is the token before each answer span (``scores.answer_query_mask``),
as PyramidDrop ranks with the last instruction token there too.

Positions, as released (``pdrop_forward`` in Cooperx521/PyramidDrop's
``llava/model/modeling_llama_pdrop.py``): after every drop the survivors' position ids are
renumbered ``0..len-1`` (``PyramidDrop.renumbers_positions``), so a later stage's RoPE, and so
its ranking, see compacted positions; a decode step's position is shifted down, stage by
stage, by the tokens dropped before it. The variant ``pdrop_original_ids`` keeps the
original ids instead (the convention of ``adsc`` and ``fastv``).

``lambda`` is ``1 - drop_ratio`` of the shared schedule (``floor(lambda * n)`` per image and
stage), so the budget solver is ADSC's. The default prune layers are ADSC's (2, 6, 12, 20 of
32), so the two differ only in how they pick; PyramidDrop's published setting is
``PUBLISHED_PRUNE_LAYERS`` with ``PUBLISHED_KEEP_RATIO`` (``--prune-layers 8,16,24
--drop-ratio 0.5``), whose average is 270 of 576. Its lowest reachable average is 164.5:
layers 0-7 always see all 576, and one ``lambda`` for every stage must leave at least one
token after layer 24 (576 -> 69 -> 8 -> 1), so 192 is reachable there and 128 and 64 are not.
"""

from __future__ import annotations

from .method_base import PruneMethod

__all__ = ["PUBLISHED_KEEP_RATIO", "PUBLISHED_PRUNE_LAYERS", "PyramidDrop", "PyramidDropOriginalIds", "score_layer"]

PUBLISHED_PRUNE_LAYERS = (8, 16, 24)  # for LLaVA-1.5's 32 layers
PUBLISHED_KEEP_RATIO = 0.5  # lambda


def score_layer(prune_layer: int) -> int:
    """The layer whose projections rank the tokens dropped at ``prune_layer``: itself."""
    return prune_layer


class PyramidDrop(PruneMethod):
    """``pdrop`` as released: ranked by each prune layer's own projections, survivors renumbered."""

    name = "pdrop"
    score_based = True
    renumbers_positions = True

    def score_layer(self, prune_layer: int) -> int:
        return score_layer(prune_layer)


class PyramidDropOriginalIds(PyramidDrop):
    """``pdrop_original_ids``: PyramidDrop whose survivors keep their original position ids."""

    name = "pdrop_original_ids"
    variant_of = "pdrop"
    renumbers_positions = False
