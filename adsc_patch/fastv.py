"""FastV's rule (Chen et al., 2024): at the input of layer ``K`` keep the vision tokens that
received the most attention from the last prompt token at layer ``K-1``.

One prune layer; the attention row is computed by ``scores.query_attention`` from layer
``K-1``'s own projections (softmax over all keys it sees, mean over heads), so the model
never turns on eager attention. Survivors keep their original position ids (FastV's own
convention, as in its KV-cache variant; ADSC's too; PyramidDrop renumbers them). The keep count per image comes from the
shared schedule (``floor((1 - r) * N)``, solved for a budget like ADSC's).
"""

from __future__ import annotations

from typing import Sequence

from .method_base import PruneMethod
from .schedule import ScheduleError

__all__ = ["DEFAULT_FASTV_LAYER", "FastV", "check_prune_layers", "score_layer"]

DEFAULT_FASTV_LAYER = 2  # FastV's K: prune at the input of layer 2 ("1/2 tokens after layer 2")


def check_prune_layers(prune_layers) -> None:
    """FastV prunes once, at one layer ``K >= 1``; anything else raises ``ScheduleError``."""
    layers = list(prune_layers)
    if len(layers) != 1 or layers[0] < 1:
        raise ScheduleError(f"prune method fastv drops once, at one layer K >= 1 (it ranks by layer K-1's "
                            f"attention); got prune layers {layers}")


def score_layer(prune_layer: int) -> int:
    """The layer whose attention ranks the tokens dropped at ``prune_layer``: the one before it."""
    return prune_layer - 1


class FastV(PruneMethod):
    """``fastv``: one prune layer ``K`` (default 2), ranked by layer ``K-1``'s attention."""

    name = "fastv"
    score_based = True

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        return (DEFAULT_FASTV_LAYER,)

    def fits_layers(self, layers: Sequence[int]) -> bool:
        return len(layers) == 1

    def layers_on_recorded(self, recorded: Sequence[int], num_layers: int) -> tuple[int, ...]:
        """The first recorded layer (FastV drops once) when it is >= 1, else FastV's K."""
        return (recorded[0],) if recorded and recorded[0] >= 1 else self.default_layers(num_layers)

    def check_layers(self, layers: Sequence[int]) -> None:
        check_prune_layers(layers)

    def score_layer(self, prune_layer: int) -> int:
        return score_layer(prune_layer)
