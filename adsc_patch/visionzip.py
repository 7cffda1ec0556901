"""VisionZip (Yang et al., 2025) as a pre-LLM baseline: keep the tokens the CLS token looks
at most, and fold the rest into a few "contextual" tokens.

The released rule (dvlab-research/VisionZip, ``visionzip/clip_encoder.py``), per image, for a
budget of ``k = dominant + contextual`` tokens (``RELEASED``, the ``visionzip`` method):

1. *Dominant* tokens: CLS, then the ``dominant - 1`` patches with the highest attention
   from the CLS token (query 0; heads averaged, the released code sums them: the same
   ranking; ties go to the earlier patch), in raster order. CLS is handed to the language
   model like every other token (the release's ``dominant=54`` is CLS + 53 patches).
2. *Contextual* tokens: of the ``R`` remaining patches (raster order), ``contextual``
   *targets* at a stride ``max(1, R // contextual)`` from the first. Every other remaining
   patch joins the target whose key is the most cosine-similar to its own (ties to the
   earlier target); a contextual token is the target's feature plus the mean of the features
   that joined it (the target alone when none did). With ``contextual == 0`` the remaining
   patches are dropped (group -1).

The variant ``visionzip_spread`` (``SPREAD``), this project's first reading, departs in all
three places: patches only (CLS neither ranked nor handed on, so ``dominant`` patches),
targets spread centred over the remaining patches (``select.spread_indices``), and each
contextual token the plain mean of its target and the patches that joined it.

``visionzip_split`` turns a budget into ``(dominant, contextual)``: ``contextual =
round(budget * 5 / 32)`` (half up), which gives the published 162+30, 108+20 and 54+10 for
192, 128 and 64 tokens (dominant counting CLS under the released rule).

Where it acts and what it reads: on the CLIP vision tower's output, before the projector,
so the language model only ever sees ``k`` tokens per image. The features are LLaVA's
``hidden_states[select_layer]`` (``tower.clip_hidden_state``); the CLS attention and the
keys (the similarity metric, averaged over heads) are those of the layer that *produced*
that hidden state, recomputed from its input with the layer's own ``layer_norm1``,
``q_proj``, ``k_proj`` and ``scale`` (softmax over all ``1 + N`` keys). No attention matrix
is requested from the tower. CLIP internals are reached only through
``compat.clip_vision_parts``.

Output order (the documented exception to ``reduction.py``'s "first patch" order): [CLS],
the dominant patches in raster order, then the contextual tokens in raster order of their
targets, as VisionZip concatenates them. ``groups`` follows ``reduction.py``: a dominant
patch owns its token alone; a remaining patch points at its contextual token; no patch
points at CLS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F

from .compat import clip_vision_parts
from .method_base import PruneMethod
from .reduction import VisionReduction
from .schedule import ScheduleError
from .select import spread_indices
from .tower import clip_hidden_state, layers_run

__all__ = [
    "RELEASED",
    "VisionZip",
    "VisionZipSpread",
    "RULES",
    "SPREAD",
    "VISIONZIP_CONTEXTUAL_FRACTION",
    "VisionZipRule",
    "contextual_targets",
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


@dataclass(frozen=True)
class VisionZipRule:
    """How VisionZip's three released choices are made (the module docstring).

    Attributes:
        cls_token: CLS is the first dominant token and handed on (``dominant`` counts it).
        targets: ``"stride"``: contextual targets at ``max(1, R // c)`` steps from the first
            remaining patch (released); ``"spread"``: ``select.spread_indices(R, c)``, centred.
        merge: ``"target_plus_mean"``: target + mean of the patches that joined it
            (released); ``"mean"``: the plain mean of the target and its joined patches.
    """

    cls_token: bool
    targets: str
    merge: str


RELEASED = VisionZipRule(cls_token=True, targets="stride", merge="target_plus_mean")
SPREAD = VisionZipRule(cls_token=False, targets="spread", merge="mean")
RULES = {"visionzip": RELEASED, "visionzip_spread": SPREAD}


def contextual_targets(rule: VisionZipRule, remaining: int, contextual: int) -> list[int]:
    """Indices (into the remaining patches, raster order) of the ``contextual`` targets."""
    if rule.targets == "spread":
        return spread_indices(remaining, contextual)
    step = max(1, remaining // contextual)
    return list(range(0, remaining, step))[:contextual]


def visionzip_select(
    features: torch.Tensor,
    cls_attn: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    rule: VisionZipRule = RELEASED,
    cls_features: torch.Tensor | None = None,
) -> VisionReduction:
    """Apply VisionZip's rule to a batch (see the module docstring).

    Args:
        features: ``(n, N, D)`` patch features (CLS excluded).
        cls_attn: ``(n, N)`` CLS attention to every patch.
        keys: ``(n, N, C)`` the similarity metric of every patch (CLS excluded).
        dominant, contextual: token counts, ``dominant + contextual <= N``; with
            ``rule.cls_token`` the dominant tokens are CLS and ``dominant - 1`` patches.
        rule: ``RELEASED`` or ``SPREAD``.
        cls_features: ``(n, D)`` CLS features, required by ``rule.cls_token``.

    Returns:
        ``VisionReduction`` with ``dominant + contextual`` tokens per image: [CLS], dominant
        patches in raster order, then contextual tokens in raster order of their targets.
    """
    n, num_patches, _ = features.shape
    if cls_attn.shape != (n, num_patches) or keys.shape[:2] != (n, num_patches):
        raise ValueError(
            f"prune method visionzip: features {tuple(features.shape)}, CLS attention {tuple(cls_attn.shape)} "
            f"and keys {tuple(keys.shape)} disagree on (images, patches)"
        )
    if rule.cls_token and (cls_features is None or cls_features.shape != (n, features.shape[-1])):
        raise ValueError("prune method visionzip: the released rule hands CLS on and needs its (n, D) features")
    with_cls = int(rule.cls_token)
    if dominant < with_cls or contextual < 0 or dominant + contextual > num_patches:
        raise ScheduleError(
            f"prune method visionzip: {dominant} dominant + {contextual} contextual tokens is out of range "
            f"for {num_patches} patches (need {'CLS among the dominant, ' if with_cls else ''}both >= 0 and "
            f"a total of at most {num_patches})"
        )
    device = features.device
    dominant_patch_count = dominant - with_cls
    rest_count = num_patches - dominant_patch_count

    # Dominant patches: a stable descending sort breaks ties towards the earlier patch.
    ranking = torch.sort(cls_attn.float(), dim=1, descending=True, stable=True).indices
    is_dominant = torch.zeros(n, num_patches, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, ranking[:, :dominant_patch_count], True)
    # Non-dominant patches first, each part in raster order (a stable sort of 0/1 flags).
    by_flag = torch.sort(is_dominant.to(torch.uint8), dim=1, stable=True).indices
    rest, dominant_patches = by_flag[:, :rest_count], by_flag[:, rest_count:]

    groups = torch.full((n, num_patches), -1, dtype=torch.long, device=device)
    token_ids = torch.arange(dominant + contextual, device=device).expand(n, -1)
    groups.scatter_(1, dominant_patches, token_ids[:, with_cls:dominant])
    pieces = [cls_features[:, None]] if with_cls else []
    pieces.append(_rows(features, dominant_patches))

    if contextual > 0:
        target_slots = contextual_targets(rule, rest_count, contextual)
        chosen = set(target_slots)
        other_slots = [slot for slot in range(rest_count) if slot not in chosen]
        targets = rest[:, target_slots]  # (n, c), raster order
        others = rest[:, other_slots]  # (n, R - c)

        metric = F.normalize(keys.float(), dim=-1)
        similarity = torch.matmul(_rows(metric, others), _rows(metric, targets).transpose(1, 2))  # (n, R-c, c)
        joins = similarity.argmax(dim=-1)  # first maximum: ties to the earlier target

        width = features.shape[-1]
        joined = torch.zeros(n, contextual, width, device=device).scatter_add(
            1, joins.unsqueeze(-1).expand(-1, -1, width), _rows(features, others).float()
        )
        counts = torch.zeros(n, contextual, device=device).scatter_add(1, joins, torch.ones(joins.shape, device=device))
        target_features = _rows(features, targets).float()
        if rule.merge == "mean":
            merged = (target_features + joined) / (counts + 1).unsqueeze(-1)
        else:
            merged = target_features + joined / counts.clamp(min=1).unsqueeze(-1)
        pieces.append(merged.to(features.dtype))
        groups.scatter_(1, targets, token_ids[:, dominant:])
        groups.scatter_(1, others, dominant + joins)

    return VisionReduction(features=torch.cat(pieces, dim=1), groups=groups)


def visionzip_vision_forward(
    vision_model,
    pixel_values: torch.Tensor,
    dominant: int,
    contextual: int,
    select_layer: int = -2,
    rule: VisionZipRule = RELEASED,
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
    return visionzip_select(hidden[:, 1:], scores, keys.mean(dim=1)[:, 1:], dominant, contextual, rule,
                            cls_features=hidden[:, 0] if rule.cls_token else None)


class VisionZip(PruneMethod):
    """``visionzip`` as released: dominant tokens by CLS attention, contextual ones merged."""

    name = "visionzip"
    in_decoder = False
    rule = RELEASED

    def tower_setting(self, budget, grid, layers_run):
        split = tuple(visionzip_split(budget, grid[0] * grid[1]))
        return split, sum(split)

    def reduce(self, setting, grid, vision_model, pixel_values, select_layer):
        dominant, contextual = setting
        return visionzip_vision_forward(vision_model, pixel_values, dominant, contextual,
                                        select_layer=select_layer, rule=self.rule)


class VisionZipSpread(VisionZip):
    """``visionzip_spread``: patches only, targets spread evenly, plain means (a variant)."""

    name = "visionzip_spread"
    variant_of = "visionzip"
    rule = SPREAD
