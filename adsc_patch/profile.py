"""Analytic cost of a decoder under a vision-token schedule: FLOPs and KV-cache bytes.

Counting conventions (state them with every number you publish):

* a multiply-add is 2 FLOPs; matrix products are counted dense, as a profiler of the
  kernels sees them (attention ``QK^T`` and ``AV`` over the full ``q x kv`` rectangle);
* per layer: q/k/v/o projections, attention, the gated MLP (3 matrices); norms, RoPE and
  softmax are left out (under 0.5% for Llama shapes);
* prefill computes logits for the last position only (as ``generate`` does); each decode
  step feeds one token and computes its logits;
* the KV cache of layer ``l`` holds ``2 * kv_heads * head_dim`` values per cached token.

Reads the schedule, never recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import VisionSchedule

__all__ = ["LLAVA_15_7B", "LLAVA_15_13B", "DecoderShape", "GenerationCost", "tokens_per_layer", "kv_cache_bytes", "layer_flops", "generation_cost"]


@dataclass(frozen=True)
class DecoderShape:
    """Sizes of a Llama-style decoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
        )


LLAVA_15_7B = DecoderShape(32, 4096, 11008, 32, 32, 128, 32000)
LLAVA_15_13B = DecoderShape(40, 5120, 13824, 40, 40, 128, 32000)


def tokens_per_layer(
    num_layers: int, text_tokens: int, schedule: VisionSchedule | None = None, num_images: int = 1,
    vision_tokens: int = 0,
) -> list[int]:
    """Tokens entering each layer: all text plus each image's scheduled vision tokens.

    Without a schedule, ``vision_tokens`` per image enter every layer.
    """
    if schedule is None:
        return [text_tokens + num_images * vision_tokens] * num_layers
    if schedule.num_layers != num_layers:
        raise ValueError(f"schedule is for {schedule.num_layers} layers, the decoder has {num_layers}")
    return [text_tokens + num_images * n for n in schedule.tokens_per_layer]


def kv_cache_bytes(shape: DecoderShape, cached_tokens: list[int], batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values when layer ``l`` caches ``cached_tokens[l]`` positions."""
    per_token = 2 * shape.num_kv_heads * shape.head_dim * bytes_per_value
    return batch * per_token * sum(cached_tokens)


def layer_flops(shape: DecoderShape, q_tokens: int, kv_tokens: int) -> int:
    """FLOPs of one decoder layer for ``q_tokens`` queries over ``kv_tokens`` keys."""
    d, heads, kv_heads, hd = shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim
    projections = 2 * q_tokens * d * (heads * hd + 2 * kv_heads * hd) + 2 * q_tokens * heads * hd * d
    attention = 2 * 2 * q_tokens * kv_tokens * heads * hd
    mlp = 2 * q_tokens * 3 * d * shape.intermediate_size
    return projections + attention + mlp


@dataclass(frozen=True)
class GenerationCost:
    prefill_flops: int
    decode_flops: int
    kv_bytes_after_prefill: int
    peak_kv_bytes: int
    tokens_per_layer: tuple[int, ...]

    @property
    def total_flops(self) -> int:
        return self.prefill_flops + self.decode_flops


def generation_cost(
    shape: DecoderShape,
    text_tokens: int,
    new_tokens: int = 1,
    schedule: VisionSchedule | None = None,
    vision_tokens: int = 0,
    num_images: int = 1,
    batch: int = 1,
    bytes_per_value: int = 2,
) -> GenerationCost:
    """Cost of generating ``new_tokens`` after a prompt of ``text_tokens`` + images.

    The first new token comes from the prefill; each of the other ``new_tokens - 1`` is fed
    back through every layer, attending to that layer's cache.
    """
    per_layer = tokens_per_layer(shape.num_layers, text_tokens, schedule, num_images, vision_tokens)
    logits = 2 * shape.hidden_size * shape.vocab_size
    prefill = sum(layer_flops(shape, n, n) for n in per_layer) + logits
    decode = 0
    for step in range(1, new_tokens):
        decode += sum(layer_flops(shape, 1, n + step) for n in per_layer) + logits
    kv_prefill = kv_cache_bytes(shape, per_layer, batch, bytes_per_value)
    kv_peak = kv_cache_bytes(shape, [n + max(new_tokens - 1, 0) for n in per_layer], batch, bytes_per_value)
    return GenerationCost(batch * prefill, batch * decode, kv_prefill, kv_peak, tuple(per_layer))
