"""What a (pruned) KV cache holds: per-layer lengths and bytes, measured on the object."""

from __future__ import annotations

from transformers.cache_utils import Cache

__all__ = ["cache_layer_lengths", "cache_nbytes"]


def cache_layer_lengths(cache: Cache) -> list[int]:
    """Cached positions per decoder layer (layers differ after pruning)."""
    return [cache.get_seq_length(i) for i in range(len(cache.layers))]


def cache_nbytes(cache: Cache, without_last: int = 0) -> int:
    """Bytes of the key and value tensors the cache holds, summed over layers; with
    ``without_last`` the last that many positions of every layer are left out (after
    ``generate``: the answer's tokens, one per step in every layer, so what stays is the
    prefill's)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None and tensor.numel():
                length = tensor.shape[-2]
                if without_last > length:
                    raise ValueError(f"cannot leave out {without_last} positions of a layer caching {length}")
                total += tensor.numel() // length * (length - without_last) * tensor.element_size()
    return total
