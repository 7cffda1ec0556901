"""The one interface every pruning method implements (``methods`` registers an instance per name).

A method says where it acts and answers the few questions the shared machinery asks:

* in the decoder (``in_decoder``): its default prune layers for a depth, which saved layers
  it takes as they are, its layer checks, and which tokens of an image survive each prune
  layer: positional methods (``adsc``) give the survivor sets (``keep_sets``), score-based
  ones (``fastv``, ``pdrop``) name the layer whose attention ranks them (``score_layer``);
  the schedule (how many per image and stage), the loop, the cache and the trace are shared
  (``decoder.pruned_decoder_forward``);
* before the decoder, on the vision tower (``in_decoder = False``): how a budget becomes its
  setting (``tower_setting``), how it reduces a batch of images (``reduce``) and the tokens
  each tower layer runs on (``tower_tokens_per_layer``, for the cost model).

Budgets are always the paper's: mean vision tokens per image over the decoder's layers.
"""

from __future__ import annotations

from typing import Sequence

from .schedule import ScheduleError, default_prune_layers

__all__ = ["PruneMethod"]


class PruneMethod:
    """One pruning method. Subclasses set ``name`` and override what their kind needs.

    Attributes:
        name: what users type (``--prune-method``, ``PruningSpec.method``, config.json).
        in_decoder: drops tokens between decoder layers (``False``: reduces each image's
            tokens on the vision tower, before the language model; takes no prune layers).
        variant_of: for a documented departure from a released rule, the released method's name.
        renumbers_positions: in-decoder only: survivors get consecutive position ids after
            every drop (PyramidDrop as released); otherwise they keep their original ids.
        score_based: in-decoder only: ranks tokens by attention (implements ``score_layer``);
            otherwise positional (implements ``keep_sets``).
        uses_selection: the ``selection`` option (``uniform_2d`` ...) changes what it keeps.
    """

    name: str = ""
    in_decoder: bool = True
    variant_of: str | None = None
    renumbers_positions: bool = False
    score_based: bool = False
    uses_selection: bool = False

    # ------------------------------------------------------------------ where it prunes
    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        """Prune layers when none are given or saved (ADSC's for a decoder of ``num_layers``)."""
        return tuple(default_prune_layers(num_layers)) if self.in_decoder else ()

    def fits_layers(self, layers: Sequence[int]) -> bool:
        """Whether saved layers (of this method, non-empty) can be taken as they are."""
        return True

    def layers_on_recorded(self, recorded: Sequence[int], num_layers: int) -> tuple[int, ...]:
        """The layers taken on a checkpoint whose fine-tune recorded ``recorded``: them where
        they fit, else the defaults (none before the decoder)."""
        if not self.in_decoder:
            return ()
        recorded = tuple(recorded)
        return recorded if recorded and self.fits_layers(recorded) else self.default_layers(num_layers)

    def check_layers(self, layers: Sequence[int]) -> None:
        """``ScheduleError`` for layers this method cannot prune at (range is the schedule's check)."""
        if not self.in_decoder and layers:
            raise ScheduleError(f"prune method {self.name} reduces the image's tokens before the language "
                                f"model; it takes no prune layers (got {list(layers)})")

    # ------------------------------------------------------------------ in the decoder
    def score_layer(self, prune_layer: int) -> int:
        """Score-based methods: the layer whose attention ranks the tokens dropped at
        ``prune_layer`` (``prune_layer - 1``: ranked inside the stage before it; equal: by
        the prune layer's own projections on its input)."""
        raise NotImplementedError(f"prune method {self.name} does not rank tokens by attention")

    def keep_sets(self, num_tokens: int, counts: tuple[int, ...], selection: str,
                  grid: tuple[int, int] | None) -> tuple[tuple[int, ...], ...]:
        """Positional methods: the survivors of one image of ``num_tokens`` (row-major over
        ``grid``, ``None``: unknown) after each prune layer, one sorted tuple per entry of
        ``counts`` with exactly that many indices, each a subset of the one before."""
        raise NotImplementedError(f"prune method {self.name} has no positional survivor sets")

    # ------------------------------------------------------------------ before the decoder
    def tower_setting(self, budget: float, grid: tuple[int, int], layers_run: int) -> tuple[tuple[int, ...], int]:
        """``(setting, tokens emitted per image)`` meeting ``budget`` on a ``grid`` of patches
        whose tower runs ``layers_run`` layers; ``ScheduleError`` naming what is reachable."""
        raise NotImplementedError(f"prune method {self.name} does not act on the vision tower")

    def reduce(self, setting: tuple[int, ...], grid: tuple[int, int], vision_model, pixel_values,
               select_layer: int):
        """Run the CLIP ``vision_model`` on ``(n, 3, H, W)`` pixels; returns a ``VisionReduction``."""
        raise NotImplementedError(f"prune method {self.name} does not act on the vision tower")

    def tower_tokens_per_layer(self, setting: tuple[int, ...], num_patches: int, layers_run: int) -> list[int]:
        """Tokens (CLS included) each tower layer that runs computes on (the cost model)."""
        return [num_patches + 1] * layers_run

    def __repr__(self) -> str:
        return f"<prune method {self.name}>"
