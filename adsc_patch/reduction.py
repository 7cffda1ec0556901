"""What a pre-LLM method (``tome``, ``visionzip``, ``pool``) hands to the language model.

These methods shrink an image's vision tokens before they are spliced into the prompt, so
every decoder layer sees the same, smaller set. They all return a ``VisionReduction``:
the reduced features and, for every original patch, which output token it went into. The
latter is what the trace and the demo show (merge groups); it is never recomputed.

Conventions (shared by the three methods):

* ``N`` is the number of patch tokens of one image (CLS excluded), row-major over the
  patch grid; ``k`` the number of tokens the method emits per image.
* Output tokens are ordered by the smallest original patch index they contain (raster
  order of their first patch), except where a method documents another order.
* ``groups[i, p]`` is the output token (``0..k-1``) that absorbed patch ``p`` of image
  ``i``, or ``-1`` if the patch was dropped without being merged anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["VisionReduction", "group_sizes"]


@dataclass
class VisionReduction:
    """Reduced vision features of a batch of images.

    Attributes:
        features: ``(n, k, D)`` the tokens handed on (to the projector, then the splice).
        groups: ``(n, N)`` long, output token of every original patch, ``-1`` if dropped.
    """

    features: torch.Tensor
    groups: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


def group_sizes(groups: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(n, k)`` long: how many original patches each output token holds."""
    sizes = torch.zeros(groups.shape[0], num_tokens + 1, dtype=torch.long, device=groups.device)
    sizes.scatter_add_(1, (groups + 1).clamp(min=0), torch.ones_like(groups))
    return sizes[:, 1:]
