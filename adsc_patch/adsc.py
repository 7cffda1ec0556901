"""ADSC's rule: at each prune layer keep an evenly spaced, fixed subset of each image's vision
tokens (``select.keep_sets``: the ``selection`` option picks the layout), the same for every
image, prompt and step; survivors keep their original position ids."""

from __future__ import annotations

from .method_base import PruneMethod
from .select import keep_sets

__all__ = ["Adsc"]


class Adsc(PruneMethod):
    """``adsc``: positional survivors, nested across prune layers."""

    name = "adsc"
    uses_selection = True

    def keep_sets(self, num_tokens, counts, selection, grid):
        return keep_sets(num_tokens, tuple(counts), selection, grid)
