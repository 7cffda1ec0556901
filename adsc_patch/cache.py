"""What a (pruned) KV cache holds: per-layer lengths and bytes, measured on the object."""

from __future__ import annotations

from transformers.cache_utils import Cache

__all__ = ["cache_layer_lengths", "cache_nbytes"]


def cache_layer_lengths(cache: Cache) -> list[int]:
    """Cached positions per decoder layer (layers differ after pruning)."""
    return [cache.get_seq_length(i) for i in range(len(cache.layers))]


def cache_nbytes(cache: Cache) -> int:
    """Bytes of the key and value tensors the cache holds, summed over layers."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
