"""FastV's rule (Chen et al., 2024) as pure functions: at the input of layer ``K`` keep the
vision tokens that received the most attention from the last prompt token at layer ``K-1``.

The scores are the one attention row the rule needs, computed from layer ``K-1``'s own
input norm, query/key projections and rotary embeddings (softmax over every key the query
sees, mean over heads), so the model keeps running SDPA or FlashAttention and no attention
matrix is ever materialised. ``tests/adsc_patch/test_fastv.py`` checks the row against an
eager forward's ``output_attentions``.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_FASTV_LAYER", "last_query_index", "query_attention", "top_k_per_image"]

DEFAULT_FASTV_LAYER = 2  # FastV's K: prune at the input of layer 2 ("1/2 tokens after layer 2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, T, D)``; ``cos``/``sin`` ``(B, T, D)`` as Llama's rotary embedding returns them."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def last_query_index(slot_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of each row's last real slot (the last prompt token at prefill)."""
    arange = torch.arange(slot_mask.shape[1], device=slot_mask.device)
    return torch.where(slot_mask, arange, -1).max(dim=1).values


def query_attention(
    attention: torch.nn.Module,
    normed: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    slot_mask: torch.Tensor,
    query: torch.Tensor,
) -> torch.Tensor:
    """Attention that the slot ``query[b]`` of each row pays to every slot, mean over heads.

    Args:
        attention: a Llama-style attention module (``q_proj``, ``k_proj``, ``head_dim``,
            ``scaling``; grouped key/value heads allowed).
        normed: ``(B, T, hidden)`` the layer's input after its input norm.
        position_embeddings: ``(cos, sin)`` of the slots, ``(B, T, head_dim)`` each.
        slot_mask: ``(B, T)`` bool, real slots.
        query: ``(B,)`` slot index of the query of each row.

    Returns:
        ``(B, T)`` float32 probabilities; zero at padding and at slots after the query.
    """
    batch, length, _ = normed.shape
    head_dim = attention.head_dim
    rows = torch.arange(batch, device=normed.device)
    q = attention.q_proj(normed[rows, query].unsqueeze(1)).view(batch, 1, -1, head_dim).transpose(1, 2)
    k = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q = _apply_rope(q, cos[rows, query].unsqueeze(1), sin[rows, query].unsqueeze(1))
    k = _apply_rope(k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attention.scaling  # (B, H, T)
    arange = torch.arange(length, device=normed.device)
    visible = slot_mask & (arange[None] <= query[:, None])
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def top_k_per_image(scores: torch.Tensor, spans: list[list[tuple[int, int]]], counts: list[list[int]]) -> torch.Tensor:
    """``(B, T)`` bool: in each image span ``(start, length)`` of each row, the ``k`` slots
    with the highest score (ties to the earlier slot); everything outside the spans is False.
    ``counts[row][i]`` is ``k`` of span ``i``."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for row, row_spans in enumerate(spans):
        for (start, length), k in zip(row_spans, counts[row]):
            block = scores[row, start : start + length]
            # stable: among equal scores the earlier slot wins
            order = torch.sort(block, descending=True, stable=True).indices[:k]
            keep[row, start + order] = True
    return keep
