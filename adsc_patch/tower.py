"""Reading one layer's hidden state of a CLIP vision tower by running the layers ourselves.

LLaVA reads ``hidden_states[select_layer]`` of its CLIP tower (-2: the penultimate layer).
Asking transformers for it (``output_hidden_states=True``) goes through its output-capture
hooks, which are installed per model on the first capturing call and, when a composite model
holding the tower captures too, installed on the tower's layers a second time: the tower then
records every layer twice and ``hidden_states[-2]`` silently becomes another layer's output
(docs/compatibility.md). Running embeddings, pre-layernorm and the layers up to the selected
one ourselves touches no hook state, and skips the layers after it (LLaVA-1.5's last layer
was computed and thrown away).

Convention (transformers'): hidden state ``i`` is the input of layer ``i``, so a tower of
``L`` layers has ``L + 1`` hidden states; state 0 is the pre-layernormed embeddings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .compat import clip_vision_parts

__all__ = ["TowerOutput", "clip_hidden_state", "layers_run"]


def layers_run(num_layers: int, select_layer: int = -2) -> int:
    """How many of a tower's ``num_layers`` layers produce ``hidden_states[select_layer]``
    (hidden state ``i`` is the input of layer ``i``; there are ``num_layers + 1``)."""
    run = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= run <= num_layers:
        raise ValueError(f"select_layer {select_layer} is out of range for a tower of {num_layers} layers")
    return run


class TowerOutput(NamedTuple):
    """``hidden``: ``hidden_states[select_layer]``, ``(n, 1 + N, D)`` (CLS first);
    ``layer_input``: the input of the layer that produced it (``hidden_states[select_layer - 1]``),
    ``None`` when ``select_layer`` names the embeddings."""

    hidden: torch.Tensor
    layer_input: torch.Tensor | None


def clip_hidden_state(vision_model, pixel_values: torch.Tensor, select_layer: int = -2) -> TowerOutput:
    """``hidden_states[select_layer]`` of a transformers ``CLIPVisionModel`` on ``(n, 3, H, W)``
    pixels, computed by its own modules (bit-equal to its ``output_hidden_states``), no hooks."""
    parts = clip_vision_parts(vision_model)
    run = layers_run(len(parts.layers), select_layer)
    hidden = parts.pre_layernorm(parts.embeddings(pixel_values))
    layer_input = None
    for layer in parts.layers[:run]:
        layer_input = hidden
        hidden = layer(hidden, None)
    return TowerOutput(hidden, layer_input)
