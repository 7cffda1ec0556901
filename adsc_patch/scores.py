"""The attention rows the score-based methods (``fastv``, ``pdrop``) rank vision tokens by.

Only the rows of a few query tokens are needed, so they are computed from a decoder layer's
own input norm, query/key projections and rotary embeddings (softmax over every key the
query sees, mean over heads); the model keeps running SDPA or FlashAttention and no
attention matrix is ever materialised. ``tests/adsc_patch/test_fastv.py`` and
``test_pdrop.py`` check the rows against an eager forward's ``output_attentions``.

Which tokens query:

* at inference, the last prompt token of each row (``last_query_mask``): FastV's "last
  token" and PyramidDrop's "last instruction token";
* in training, where the answer follows in the same sequence, the token before each answer
  span (``answer_query_mask``): the token the answer is generated from, so ranking sees the
  same query as at inference. With several answer spans (multi-turn) the rows are averaged.
"""

from __future__ import annotations

import torch

__all__ = ["answer_query_mask", "last_query_index", "last_query_mask", "query_attention", "top_k_per_image"]


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


def last_query_mask(slot_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool, True only at each row's last real slot."""
    query = torch.zeros_like(slot_mask, dtype=torch.bool)
    query[torch.arange(slot_mask.shape[0], device=slot_mask.device), last_query_index(slot_mask)] = True
    return query & slot_mask


def answer_query_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``(B, T)`` bool: the tokens right before each answer span (label ``ignore_index``,
    followed by a supervised token). Rows without a supervised token get none."""
    supervised = labels != ignore_index
    query = torch.zeros_like(supervised)
    query[:, :-1] = ~supervised[:, :-1] & supervised[:, 1:]
    return query


def query_attention(
    attention: torch.nn.Module,
    normed: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    slot_mask: torch.Tensor,
    queries: torch.Tensor,
) -> torch.Tensor:
    """Attention that the query slots of each row pay to every slot, mean over heads and queries.

    Args:
        attention: a Llama-style attention module (``q_proj``, ``k_proj``, ``head_dim``,
            ``scaling``; grouped key/value heads allowed; per-head ``q_norm`` / ``k_norm``
            before RoPE where it has them, as Qwen3's).
        normed: ``(B, T, hidden)`` the layer's input after its input norm.
        position_embeddings: ``(cos, sin)`` of the slots, ``(B, T, head_dim)`` each.
        slot_mask: ``(B, T)`` bool, real slots.
        queries: ``(B,)`` slot index of one query per row, or ``(B, T)`` bool marking the
            query slots (at least one per row).

    Returns:
        ``(B, T)`` float32; each query's row is a softmax over the slots it sees (real, not
        after it), zero elsewhere; rows of several queries are averaged.
    """
    batch, length, _ = normed.shape
    head_dim = attention.head_dim
    if queries.dim() == 1:
        index, valid = queries[:, None], torch.ones(batch, 1, dtype=torch.bool, device=normed.device)
    else:
        count = int(queries.sum(1).max())
        if count == 0 or bool((queries.sum(1) == 0).any()):
            raise ValueError("every row needs at least one query slot")
        arange = torch.arange(length, device=normed.device)
        # query slots first, in order; the rest is padding (valid False)
        order = torch.argsort(torch.where(queries, arange, arange + length), dim=1)[:, :count]
        index, valid = order, queries.gather(1, order)
    rows = torch.arange(batch, device=normed.device)[:, None]
    q = attention.q_proj(normed[rows, index]).view(batch, index.shape[1], -1, head_dim)
    k = attention.k_proj(normed).view(batch, length, -1, head_dim)
    if getattr(attention, "q_norm", None) is not None:  # per-head norms before RoPE (Qwen3)
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q = _apply_rope(q, cos[rows, index], sin[rows, index])
    k = _apply_rope(k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attention.scaling  # (B, H, Q, T)
    arange = torch.arange(length, device=normed.device)
    visible = slot_mask[:, None, :] & (arange[None, None, :] <= index[:, :, None])  # (B, Q, T)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    rows_q = logits.softmax(dim=-1).mean(dim=1)  # (B, Q, T)
    rows_q = rows_q * valid[..., None]
    return rows_q.sum(1) / valid.sum(1, keepdim=True)


def top_k_per_image(scores: torch.Tensor, spans: list[list[tuple[int, int]]], counts: list[list[int]]) -> torch.Tensor:
    """``(B, T)`` bool: in each image span ``(start, length)`` of each row, the ``k`` slots
    with the highest score (ties to the earlier slot); everything outside the spans is False.
    ``counts[row][i]`` is ``k`` of span ``i``. Scores of ``-inf`` (tokens no longer present)
    rank last, so ``k`` must not exceed the present tokens of a span."""
    groups = [[range(start, start + length) for start, length in row] for row in spans]
    return top_k_in_groups(scores, groups, counts)


def top_k_in_groups(scores: torch.Tensor, groups: list[list], counts: list[list[int]]) -> torch.Tensor:
    """``top_k_per_image`` for images given as their positions (increasing; an image whose
    tokens are not contiguous, e.g. crops interleaved with newline tokens)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for row, row_groups in enumerate(groups):
        for positions, k in zip(row_groups, counts[row]):
            index = torch.as_tensor(list(positions), dtype=torch.long, device=scores.device)
            order = torch.sort(scores[row, index], descending=True, stable=True).indices[:k]
            keep[row, index[order]] = True
    return keep
