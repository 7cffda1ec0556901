"""ToMe (Token Merging, Bolya et al., ICLR 2023) inside a transformers CLIP vision tower.

A pre-LLM baseline: the tower itself merges tokens, so LLaVA's projector and every decoder
layer see ``budget`` patch tokens per image instead of ``N``.

The rule, per layer that runs (ToMe's place: after attention + residual, before the MLP):

* **Metric.** The layer's keys, ``k_proj(layer_norm1(x))``, averaged over heads, ``(n, T, C)``.
* **Bipartite soft matching.** Tokens alternate into set A (even indices ``0, 2, ...``) and
  set B (odd indices). The first ``protected`` tokens (CLS) are never merged, neither as a
  source nor as a destination. Each unprotected A token's match is its most cosine-similar
  unprotected B token; the ``r`` A tokens whose match is most similar are merged into their
  matches (several A tokens may land in one B token).
* **Size-weighted merging.** Every token carries a size (how many original patches it
  holds, 1 at the start). A merged token is ``sum(size * x) / sum(size)``; sizes add.
* **Proportional attention.** In every layer the attention logits get ``+ log(size)`` of
  each key, passed to CLIP's attention as an additive ``(n, 1, 1, T)`` float mask (CLIP's
  ``eager`` and ``sdpa`` attention both take it on transformers 5.23 and 5.24; flash
  attention takes no additive mask and is not supported).

Our conventions:

* **Token order after one merge:** ``[protected tokens, unmerged unprotected A tokens, all
  unprotected B tokens]``, each part in its previous relative order (ToMe's ``[unm, dst]``
  layout with the unmerged A tokens sorted, so CLS stays at index 0). The next layer's A/B
  alternation is taken on this new order, as in ToMe.
* **Ties:** an A token equally similar to several B tokens matches the lowest-index one; A
  tokens with equal best similarity are merged lowest-index first (stable sort). Scores are
  computed in float32.
* **Source map:** ``source[i, p]`` is the current token index of original patch ``p`` (CLS
  excluded, so patch ``p`` starts at token ``p + 1``).
* **Output** (``tome_vision_forward``): a ``reduction.VisionReduction`` with CLS dropped and
  the tokens reordered by the smallest original patch index they hold; no patch is dropped.
* **Merge counts** (``tome_merge_counts``): one ``r`` per layer that runs, as even as
  possible, earlier layers taking the extra one; a layer's cap (it can merge at most its
  unprotected A tokens, i.e. ``(T - 1) // 2`` with one protected token) may force more
  merges onto earlier layers. With one protected token each layer can at most halve the
  patch tokens (rounding up), so ``L`` layers reach ``ceil(N / 2**L) .. N`` patch tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .compat import clip_vision_parts
from .method_base import PruneMethod
from .reduction import VisionReduction
from .schedule import ScheduleError
from .tower import layers_run

__all__ = [
    "ToMe",
    "Merge",
    "ToMeState",
    "bipartite_soft_matching",
    "layers_run",
    "merge_cap",
    "merge_tokens",
    "proportional_attention",
    "size_bias",
    "tome_encode",
    "tome_layer",
    "tome_merge_counts",
    "tome_reachable_range",
    "tome_vision_forward",
    "track_sources",
]


# ----------------------------------------------------------------------------- counting
def merge_cap(num_tokens: int, protected: int = 1) -> int:
    """Most tokens one merge can remove from ``num_tokens``: the unprotected A tokens (even
    indices ``>= protected``), or 0 when there is no unprotected B token to merge into."""
    if num_tokens <= protected:
        return 0
    a = (num_tokens + 1) // 2 - (protected + 1) // 2  # even indices in [protected, T)
    b = num_tokens // 2 - protected // 2  # odd indices in [protected, T)
    return a if b > 0 else 0


def _final_tokens(num_tokens: int, levels: Sequence[int], protected: int) -> int:
    for level in levels:
        num_tokens -= min(level, merge_cap(num_tokens, protected))
    return num_tokens


def tome_reachable_range(num_patches: int, num_layers: int, protected: int = 1) -> tuple[int, int]:
    """``(lowest, num_patches)``: the patch-token counts ``num_layers`` merging layers can emit.

    Every count in between is reachable. ``lowest`` merges each layer's cap; with one
    protected token it equals ``ceil(num_patches / 2**num_layers)``.
    """
    lowest = _final_tokens(num_patches + protected, [num_patches + protected] * num_layers, protected)
    return lowest - protected, num_patches


def _levels(step: int, num_layers: int) -> list[int]:
    base, extra = divmod(step, num_layers)
    return [base + (layer < extra) for layer in range(num_layers)]


def tome_merge_counts(num_patches: int, num_layers: int, budget: float, protected: int = 1) -> tuple[int, ...]:
    """``r`` for each of the ``num_layers`` layers that run, so the tower emits ``budget`` patches.

    ``r[l] = min(level[l], cap at layer l)`` with ``level = (c + 1,) * e + (c,) * (L - e)``
    and the smallest ``c * L + e`` that reaches the budget (each step of that index lowers
    the final count by 0 or 1, so the budget is met exactly). A float budget is rounded to
    the nearest integer (halves up). Raises ``ScheduleError`` naming the reachable range.
    """
    for name, value, least in (("num_patches", num_patches, 1), ("num_layers", num_layers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ScheduleError(f"prune method tome: {name} must be an integer >= {least}, got {value!r}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ScheduleError(f"prune method tome: vision token budget {budget!r} is not a finite number")
    target = int(budget) if isinstance(budget, int) else math.floor(budget + 0.5)
    lowest, highest = tome_reachable_range(num_patches, num_layers, protected)
    if not lowest <= target <= highest:
        asked = f"{budget}" if target == budget else f"{budget} (rounded to {target})"
        raise ScheduleError(
            f"prune method tome: a budget of {asked} patch tokens is not reachable with {num_patches} "
            f"patches and {num_layers} merging layer(s); reachable {lowest}..{highest} (each layer "
            "merges at most half of its unprotected tokens)"
        )
    start = num_patches + protected
    goal = target + protected
    lo, hi = 0, num_layers * merge_cap(start, protected)  # step hi merges every cap: the lowest
    while lo < hi:  # smallest step whose final count is <= goal (final count is nonincreasing)
        mid = (lo + hi) // 2
        if _final_tokens(start, _levels(mid, num_layers), protected) <= goal:
            hi = mid
        else:
            lo = mid + 1
    counts, tokens = [], start
    for level in _levels(lo, num_layers) if num_layers else []:
        counts.append(min(level, merge_cap(tokens, protected)))
        tokens -= counts[-1]
    assert tokens == goal, (num_patches, num_layers, target, counts)
    return tuple(counts)


# ----------------------------------------------------------------------------- merging
@dataclass(frozen=True)
class Merge:
    """One merge step.

    Attributes:
        dest: ``(n, T)`` long, the token after the merge that each current token goes into.
        num_out: ``T - r``, the tokens after the merge (every one receives at least one).
    """

    dest: torch.Tensor
    num_out: int


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> Merge:
    """ToMe's matching on ``metric`` ``(n, T, C)``; ``r`` A tokens are merged per image.

    See the module docstring for the sets, the output order and the tie rule. Raises
    ``ValueError`` when ``r`` is negative or above ``merge_cap(T, protected)``.
    """
    n, num_tokens, _ = metric.shape
    cap = merge_cap(num_tokens, protected)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= cap:
        raise ValueError(f"ToMe can merge 0..{cap} of {num_tokens} tokens ({protected} protected), got r={r!r}")
    device = metric.device
    keep_first = min(protected, num_tokens)
    a_pos = torch.arange(keep_first + (keep_first % 2), num_tokens, 2, device=device)
    b_pos = torch.arange(keep_first + 1 - (keep_first % 2), num_tokens, 2, device=device)
    num_a, num_b = a_pos.numel(), b_pos.numel()
    dest = torch.empty(n, num_tokens, dtype=torch.long, device=device)
    dest[:, :keep_first] = torch.arange(keep_first, device=device)
    b_dest = keep_first + num_a - r + torch.arange(num_b, device=device)
    dest[:, b_pos] = b_dest
    if r == 0:
        dest[:, a_pos] = keep_first + torch.arange(num_a, device=device)
        return Merge(dest, num_tokens)
    unit = F.normalize(metric.float(), dim=-1)
    scores = unit[:, a_pos] @ unit[:, b_pos].transpose(1, 2)  # (n, num_a, num_b); r > 0: num_b > 0
    match = torch.argmax(scores, dim=-1)  # the first index among equal maxima
    best = scores.gather(-1, match[..., None])[..., 0]
    ranked = torch.sort(best, dim=-1, descending=True, stable=True).indices  # ties: lower index first
    merged, kept = ranked[:, :r], torch.sort(ranked[:, r:], dim=-1).values
    kept_dest = keep_first + torch.arange(num_a - r, device=device).expand(n, -1)
    dest.scatter_(1, a_pos[kept], kept_dest)
    dest.scatter_(1, a_pos[merged], b_dest[match.gather(1, merged)])
    return Merge(dest, num_tokens - r)


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, merge: Merge) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``merge`` to ``x`` ``(n, T, D)`` with ``sizes`` ``(n, T)``.

    Returns ``(x', sizes')`` ``(n, T - r, D)``, ``(n, T - r)``: ``x'`` the size-weighted mean
    of the tokens each output absorbed (accumulated in float32, returned in ``x``'s dtype),
    ``sizes'`` their summed sizes (``sizes``' dtype).
    """
    n, _, dim = x.shape
    weights = sizes.to(torch.float32)
    index = merge.dest[..., None].expand(-1, -1, dim)
    total = weights.new_zeros(n, merge.num_out, dim).scatter_add_(1, index, x.float() * weights[..., None])
    mass = weights.new_zeros(n, merge.num_out).scatter_add_(1, merge.dest, weights)
    new_sizes = sizes.new_zeros(n, merge.num_out).scatter_add_(1, merge.dest, sizes)
    return (total / mass[..., None]).to(x.dtype), new_sizes


def track_sources(source: torch.Tensor, merge: Merge) -> torch.Tensor:
    """``source`` ``(n, N)`` (current token of every original patch) after ``merge``."""
    return merge.dest.gather(1, source)


# ----------------------------------------------------------------------------- attention
def size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(n, 1, 1, T)`` additive attention mask ``log(size)`` of each key, in ``dtype``."""
    return sizes.to(torch.float32).log()[:, None, None, :].to(dtype)


def proportional_attention(attention, hidden_states: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """CLIP ``self_attn`` on ``hidden_states`` ``(n, T, D)`` with ``+ log(size)`` on every key's logit."""
    out, _ = attention(hidden_states=hidden_states, attention_mask=size_bias(sizes, hidden_states.dtype))
    return out


# ----------------------------------------------------------------------------- the tower
@dataclass
class ToMeState:
    """Tokens inside the tower.

    Attributes:
        hidden: ``(n, T, D)`` CLS first, then the merged tokens in ToMe's order.
        sizes: ``(n, T)`` long, original tokens each holds (CLS holds itself).
        source: ``(n, N)`` long, current token index of every original patch.
    """

    hidden: torch.Tensor
    sizes: torch.Tensor
    source: torch.Tensor


def tome_layer(layer, state: ToMeState, r: int, protected: int = 1) -> ToMeState:
    """One CLIP encoder layer with proportional attention and ``r`` merges before its MLP."""
    attention = layer.self_attn
    normed = layer.layer_norm1(state.hidden)
    hidden = state.hidden + proportional_attention(attention, normed, state.sizes)
    sizes, source = state.sizes, state.source
    if r:
        n, num_tokens, _ = normed.shape
        keys = attention.k_proj(normed).view(n, num_tokens, -1, attention.head_dim).mean(dim=2)
        merge = bipartite_soft_matching(keys, r, protected)
        hidden, sizes = merge_tokens(hidden, sizes, merge)
        source = track_sources(source, merge)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return ToMeState(hidden, sizes, source)


def tome_encode(vision_model, pixel_values: torch.Tensor, merge_counts: Sequence[int],
                select_layer: int = -2) -> ToMeState:
    """Embeddings, pre-layernorm, then the layers producing ``hidden_states[select_layer]`` with
    ``merge_counts[l]`` merges in layer ``l``; raises ``ValueError`` on a wrong number of counts."""
    parts = clip_vision_parts(vision_model)
    run = layers_run(len(parts.layers), select_layer)
    counts = tuple(merge_counts)
    if len(counts) != run:
        raise ValueError(
            f"ToMe needs one merge count per layer that runs: select_layer {select_layer} of a "
            f"{len(parts.layers)}-layer tower runs {run} layers, got {len(counts)} counts"
        )
    hidden = parts.pre_layernorm(parts.embeddings(pixel_values))
    n, num_tokens, _ = hidden.shape
    sizes = torch.ones(n, num_tokens, dtype=torch.long, device=hidden.device)
    source = torch.arange(1, num_tokens, device=hidden.device).expand(n, -1)
    state = ToMeState(hidden, sizes, source)
    for layer, r in zip(parts.layers[:run], counts):
        state = tome_layer(layer, state, r)
    return state


def tome_vision_forward(vision_model, pixel_values: torch.Tensor, merge_counts: Sequence[int],
                        select_layer: int = -2) -> VisionReduction:
    """ToMe's ``hidden_states[select_layer]`` patch features: ``features`` ``(n, k, D)`` (CLS
    dropped, ordered by smallest original patch), ``groups`` ``(n, N)``."""
    state = tome_encode(vision_model, pixel_values, merge_counts, select_layer)
    patches = state.hidden[:, 1:]
    n, k, dim = patches.shape
    groups = state.source - 1  # CLS is token 0 and never absorbs a patch
    num_patches = groups.shape[1]
    first = torch.full((n, k), num_patches, dtype=torch.long, device=groups.device)
    first.scatter_reduce_(1, groups, torch.arange(num_patches, device=groups.device).expand(n, -1), "amin")
    order = torch.argsort(first, dim=1)  # distinct values: no ties
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=order.device).expand(n, -1))
    features = patches.gather(1, order[..., None].expand(-1, -1, dim))
    return VisionReduction(features, rank.gather(1, groups))


class ToMe(PruneMethod):
    """``tome``: the tower merges tokens layer by layer until each image hands on the budget."""

    name = "tome"
    in_decoder = False

    def tower_setting(self, budget, grid, layers_run):
        merges = tuple(tome_merge_counts(grid[0] * grid[1], layers_run, budget))
        return merges, grid[0] * grid[1] - sum(merges)

    def reduce(self, setting, grid, vision_model, pixel_values, select_layer):
        return tome_vision_forward(vision_model, pixel_values, setting, select_layer)

    def tower_tokens_per_layer(self, setting, num_patches, layers_run):
        tokens, current = [], num_patches + 1
        for merged in setting:
            tokens.append(current)
            current -= merged
        return tokens
