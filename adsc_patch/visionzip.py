"""VisionZip (Yang et al., 2025) as a pre-LLM baseline: keep the patches the CLS token looks
at most, and fold the rest into a few averaged "contextual" tokens.

The rule, per image, for a budget of ``k = dominant + contextual`` tokens:

1. *Dominant* tokens: the ``dominant`` patches with the highest attention from the CLS
   token (query 0), mean over heads; ties go to the earlier patch.
2. *Contextual* tokens: of the ``R = N - dominant`` remaining patches, ``contextual``
   *targets* are taken evenly spaced over their raster order (``select.spread_indices(R,
   contextual)``, centred in ``contextual`` equal bins). Every other remaining patch joins
   the target whose key is the most cosine-similar to its own (ties to the earlier target);
   a contextual token is the plain mean of its target's feature and those of the patches
   that joined it. With ``contextual == 0`` the remaining patches are dropped (group -1).

``visionzip_split`` turns a budget into ``(dominant, contextual)``: ``contextual =
round(budget * 5 / 32)`` (half up), which gives the published 162+30, 108+20 and 54+10 for
192, 128 and 64 tokens.

Where it acts and what it reads: on the CLIP vision tower's output, before the projector,
so the language model only ever sees ``k`` tokens per image. The features are LLaVA's
(``hidden_states[select_layer]`` with CLS dropped); the CLS attention and the keys (the
similarity metric, averaged over heads) are those of the layer that *produced* that hidden
state, recomputed from its input with the layer's own ``layer_norm1``, ``q_proj``,
``k_proj`` and ``scale`` (softmax over all ``1 + N`` keys). The tower keeps running
whatever attention implementation it was loaded with (SDPA, FlashAttention); no
attention matrix is requested from it. CLIP internals are reached only through
``compat.clip_vision_parts``.

Output order (the documented exception to ``reduction.py``'s "first patch" order): the
dominant tokens in raster order of their patches, then the contextual tokens in raster
order of their targets, as VisionZip concatenates them. ``groups`` follows
``reduction.py``: a dominant patch owns its token alone; a remaining patch points at its
contextual token.

Differences from the paper's release: the CLS token is never emitted and never counted
(we rank and emit patches only, so exactly ``dominant + contextual`` tokens reach the
projector); heads are averaged rather than summed (the same ranking); targets are spread
centred over the remaining patches instead of a stride from the first one; contextual
tokens are plain means (target counted once, like every patch that joined it).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F

from .compat import clip_vision_parts
from .reduction import VisionReduction
from .schedule import ScheduleError
from .select import spread_indices
from .tower import clip_hidden_state, layers_run

__all__ = [
    "VISIONZIP_CONTEXTUAL_FRACTION",
    "cls_attention",
    "layer_keys",
    "visionzip_select",
    "visionzip_split",
    "visionzip_vision_forward",
]

# The share of the budget that goes to contextual tokens: 30/192, 20/128, 10/64 in the paper.
VISIONZIP_CONTEXTUAL_FRACTION = 5 / 32
_MIN_BUDGET = 2


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def visionzip_split(budget: float, num_patches: int) -> tuple[int, int]:
    """``(dominant, contextual)`` for ``budget`` tokens out of ``num_patches`` patches.

    ``budget`` may be a float; it is rounded to the nearest integer (half up). Budgets
    below 2 or above ``num_patches`` raise ``ScheduleError``.
    """
    if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches < _MIN_BUDGET:
        raise ScheduleError(
            f"prune method visionzip: an image needs at least {_MIN_BUDGET} patches, got {num_patches!r}"
        )
    if isinstance(budget, bool) or not isinstance(budget, Real) or math.isnan(budget):
        raise ScheduleError(f"prune method visionzip: budget {budget!r} is not a number")
    if not _MIN_BUDGET <= budget <= num_patches:
        raise ScheduleError(
            f"prune method visionzip: budget {budget} vision tokens is out of range for {num_patches} patches "
            f"(reachable {_MIN_BUDGET}..{num_patches})"
        )
    total = _round_half_up(float(budget))
    contextual = _round_half_up(total * VISIONZIP_CONTEXTUAL_FRACTION)
    return total - contextual, contextual


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[i, index[i]]`` for ``values`` ``(n, N, C)`` and ``index`` ``(n, m)`` -> ``(n, m, C)``."""
    return values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _normed_query_keys(layer, hidden_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS query ``(n, H, 1, d)`` and all keys ``(n, H, T, d)`` of ``layer``, float32."""
    attention = layer.self_attn
    head_dim = attention.head_dim
    batch, length, _ = hidden_in.shape
    normed = layer.layer_norm1(hidden_in)
    query = attention.q_proj(normed[:, :1]).view(batch, 1, -1, head_dim).transpose(1, 2)
    keys = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    return query.float(), keys.float()


def _cls_scores(attention, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(query, keys.transpose(-1, -2)) * attention.scale  # (n, H, 1, T)
    return scores.softmax(dim=-1).mean(dim=1)[:, 0, 1:]


def cls_attention(layer, hidden_in: torch.Tensor) -> torch.Tensor:
    """``(n, N)`` float32: the attention CLS (query 0) pays to each patch in ``layer``.

    ``hidden_in`` ``(n, 1 + N, D)`` is the layer's input. Softmax over all ``1 + N`` keys
    (CLS included), mean over heads, then the patch columns ``1..N``.
    """
    query, keys = _normed_query_keys(layer, hidden_in)
    return _cls_scores(layer.self_attn, query, keys)


def layer_keys(layer, hidden_in: torch.Tensor) -> torch.Tensor:
    """``(n, 1 + N, head_dim)`` float32: ``layer``'s keys for input ``hidden_in``, mean over heads."""
    _, keys = _normed_query_keys(layer, hidden_in)
    return keys.mean(dim=1)


def visionzip_select(
    features: torch.Tensor,
    cls_attn: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
) -> VisionReduction:
    """Apply VisionZip's rule to a batch (see the module docstring).

    Args:
        features: ``(n, N, D)`` patch features (CLS excluded).
        cls_attn: ``(n, N)`` CLS attention to every patch.
        keys: ``(n, N, C)`` the similarity metric of every patch (CLS excluded).
        dominant, contextual: token counts, ``dominant + contextual <= N`` and
            ``contextual <= N - dominant``.

    Returns:
        ``VisionReduction`` with ``dominant + contextual`` tokens per image: dominant tokens
        in raster order, then contextual tokens in raster order of their targets.
    """
    n, num_patches, _ = features.shape
    if cls_attn.shape != (n, num_patches) or keys.shape[:2] != (n, num_patches):
        raise ValueError(
            f"prune method visionzip: features {tuple(features.shape)}, CLS attention {tuple(cls_attn.shape)} "
            f"and keys {tuple(keys.shape)} disagree on (images, patches)"
        )
    if dominant < 0 or contextual < 0 or dominant + contextual > num_patches:
        raise ScheduleError(
            f"prune method visionzip: {dominant} dominant + {contextual} contextual tokens is out of range "
            f"for {num_patches} patches (need both >= 0 and a total of at most {num_patches})"
        )
    device = features.device
    rest_count = num_patches - dominant

    # Dominant patches: a stable descending sort breaks ties towards the earlier patch.
    ranking = torch.sort(cls_attn.float(), dim=1, descending=True, stable=True).indices
    is_dominant = torch.zeros(n, num_patches, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, ranking[:, :dominant], True)
    # Non-dominant patches first, each part in raster order (a stable sort of 0/1 flags).
    by_flag = torch.sort(is_dominant.to(torch.uint8), dim=1, stable=True).indices
    rest, dominant_patches = by_flag[:, :rest_count], by_flag[:, rest_count:]

    groups = torch.full((n, num_patches), -1, dtype=torch.long, device=device)
    token_ids = torch.arange(dominant + contextual, device=device).expand(n, -1)
    groups.scatter_(1, dominant_patches, token_ids[:, :dominant])
    pieces = [_rows(features, dominant_patches)]

    if contextual > 0:
        target_slots = spread_indices(rest_count, contextual)
        chosen = set(target_slots)
        other_slots = [slot for slot in range(rest_count) if slot not in chosen]
        targets = rest[:, target_slots]  # (n, c), raster order
        others = rest[:, other_slots]  # (n, R - c)

        metric = F.normalize(keys.float(), dim=-1)
        similarity = torch.matmul(_rows(metric, others), _rows(metric, targets).transpose(1, 2))  # (n, R-c, c)
        joins = similarity.argmax(dim=-1)  # first maximum: ties to the earlier target

        width = features.shape[-1]
        sums = _rows(features, targets).float().scatter_add(
            1, joins.unsqueeze(-1).expand(-1, -1, width), _rows(features, others).float()
        )
        counts = torch.ones(n, contextual, device=device).scatter_add(
            1, joins, torch.ones(joins.shape, device=device)
        )
        pieces.append((sums / counts.unsqueeze(-1)).to(features.dtype))
        groups.scatter_(1, targets, token_ids[:, dominant:])
        groups.scatter_(1, others, dominant + joins)

    return VisionReduction(features=torch.cat(pieces, dim=1), groups=groups)


def visionzip_vision_forward(
    vision_model,
    pixel_values: torch.Tensor,
    dominant: int,
    contextual: int,
    select_layer: int = -2,
) -> VisionReduction:
    """Run a CLIP vision tower up to ``hidden_states[select_layer]`` and reduce it with VisionZip.

    ``vision_model`` is a transformers ``CLIPVisionModel`` (or ``CLIPVisionTransformer``), run
    layer by layer (``tower.clip_hidden_state``). The CLS attention and keys come from the
    layer that produced ``hidden_states[select_layer]``, computed from that layer's input
    (``hidden_states[select_layer - 1]``).
    """
    layers = clip_vision_parts(vision_model).layers
    num_layers = len(layers)
    if not (-num_layers - 1 <= select_layer <= num_layers) or select_layer in (0, -num_layers - 1):
        raise ValueError(
            f"prune method visionzip: select_layer {select_layer} names no layer's output "
            f"(the tower has {num_layers} layers; valid: 1..{num_layers} or -{num_layers}..-1)"
        )
    hidden, layer_input = clip_hidden_state(vision_model, pixel_values, select_layer)
    layer = layers[layers_run(num_layers, select_layer) - 1]
    query, keys = _normed_query_keys(layer, layer_input)
    scores = _cls_scores(layer.self_attn, query, keys)
    return visionzip_select(hidden[:, 1:], scores, keys.mean(dim=1)[:, 1:], dominant, contextual)
