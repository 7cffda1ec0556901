"""The projector from vision features to the language model's width."""

from __future__ import annotations

import re

from torch import nn

PROJECTOR_TYPES = "linear, mlp<N>x_gelu (e.g. mlp2x_gelu) or identity"


class IdentityMap(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def build_vision_projector(config) -> nn.Module:
    """``linear`` -> ``Linear``; ``mlp2x_gelu`` -> ``Linear, GELU, Linear`` (state-dict keys
    ``0.*`` and ``2.*`` as upstream); ``identity`` -> pass-through."""
    projector_type = getattr(config, "mm_projector_type", "linear")
    mm_hidden_size = config.mm_hidden_size
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, config.hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type or "")
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"projector {projector_type!r} needs at least one layer")
        modules: list[nn.Module] = [nn.Linear(mm_hidden_size, config.hidden_size)]
        for _ in range(1, depth):
            modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
        return nn.Sequential(*modules)
    if projector_type == "identity":
        return IdentityMap()
    raise ValueError(f"unknown projector type {projector_type!r}; expected {PROJECTOR_TYPES}")
