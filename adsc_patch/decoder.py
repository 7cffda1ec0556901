"""The pruned decoder loop: a Llama-style decoder that drops vision tokens between layers.

``pruned_decoder_forward(decoder, plan, ...)`` replaces ``LlamaModel.forward`` for any
decoder with ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb`` and ``config`` (Llama,
Vicuna, Mistral-style models in transformers 5). It runs the layers in *stages*: stage 0 is
layers ``[0, p1)``, stage ``s`` is ``[p_s, p_{s+1})``; before each stage the vision tokens
not kept by the schedule are removed from the hidden states, so later layers compute on,
and cache, fewer tokens. The plan's method (``methods.get_method``) decides which survive: a positional one by its
``keep_sets`` (a table per image shape), a score-based one by one attention row of a query
token at the layer its ``score_layer`` names, computed from that layer's own projections;
the schedule (how many per image and stage), the loop, the cache and the trace are shared.

Token layout inside a stage (``B`` rows, ``T_s`` slots):

* surviving tokens keep their relative order and their ORIGINAL position ids (RoPE sees
  the positions of the full prompt, so decode steps continue from the full length), except
  for methods with ``renumbers_positions`` (PyramidDrop as released): after every
  drop a row's survivors are renumbered consecutively from its first position, and a decode
  step's position in a stage is its original one minus the row's tokens dropped before it;
* after a prune layer only real kept tokens remain (input padding is dropped too); rows
  that keep fewer tokens than the longest row are left-padded with masked slots (hidden
  state zero), so every row ends at the last slot and generated tokens append
  contiguously;
* each stage gets its own 2-D padding mask and its own rotary embeddings; the mask object
  is built by transformers' ``create_causal_mask`` for the configured attention backend
  (eager, sdpa, flash_attention_*), sized by that stage's first cache layer.

With a cache, the per-stage slot masks are stored on the cache object
(``ADSC_STATE_ATTR``) after prefill; decode steps extend them with the generation mask.
Beams and returned sequences are expanded before prefill and reordered only within a
prompt's group, so the stored masks never need reordering.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import compat
from .methods import PRUNE_METHODS, get_method
from .scores import last_query_mask, query_attention, top_k_in_groups
from .schedule import ScheduleError, VisionSchedule, solve_drop_ratio, vision_schedule
from .select import SELECTIONS

__all__ = [
    "AdscPlan",
    "PRUNE_METHODS",
    "PrunedDecoderOutput",
    "PruningTrace",
    "PrefillState",
    "ADSC_STATE_ATTR",
    "last_prefill_trace",
    "record_prefill_trace",
    "image_spans",
    "pruned_decoder_forward",
    "compact_labels",
]

logger = logging.getLogger(__name__)

ADSC_STATE_ATTR = "_adsc_prefill_state"
# (weakref to a decoder, its last prefill's trace) pairs of THIS thread or asyncio task: a
# context variable, so one request never reads another's trace off the shared module.
_LAST_TRACES: contextvars.ContextVar[tuple] = contextvars.ContextVar("adsc_last_traces", default=())


def record_prefill_trace(decoder, trace: "PruningTrace") -> None:
    """Make ``trace`` what ``last_prefill_trace(decoder)`` returns in this thread or task."""
    kept = tuple((ref, old) for ref, old in _LAST_TRACES.get() if ref() is not None and ref() is not decoder)
    _LAST_TRACES.set((*kept, (weakref.ref(decoder), trace)))


def last_prefill_trace(decoder) -> "PruningTrace | None":
    """The ``PruningTrace`` of ``decoder``'s last pruned prefill run by this thread or asyncio
    task (``None`` if none): never another request's."""
    for ref, trace in reversed(_LAST_TRACES.get()):
        if ref() is decoder:
            return trace
    return None

@dataclass(frozen=True)
class AdscPlan:
    """What to prune: the config hook, independent of any model class.

    Attributes:
        prune_layers: 0-based decoder layers at whose input vision tokens are dropped.
        drop_ratio: fraction ``r`` in [0, 1) dropped at every prune layer.
        selection: ``"uniform_2d"`` (spatial lattice) or ``"uniform_1d"`` (sequence stride).
        tokens_per_image: vision tokens produced per image; consecutive vision tokens are
            split into images of this size. ``None``: every run of vision tokens is one image.
        grid: ``(height, width)`` patch grid of one image; ``None``: square if possible.
        method: a registered in-decoder method (``methods.get_method``): ``adsc``
            (positional, ``selection``), ``fastv`` (exactly one prune layer ``K >= 1``),
            ``pdrop``, or one of the user's; the score-based ones ignore ``selection``.
        budget_fraction: instead of one ``drop_ratio``, each image's own ratio is solved so
            that its mean tokens per layer are this fraction of its own count (images of
            different sizes; ``drop_ratio`` is then unused).
    """

    prune_layers: tuple[int, ...] = ()
    drop_ratio: float = 0.0
    selection: str = "uniform_2d"
    tokens_per_image: int | None = None
    grid: tuple[int, int] | None = None
    method: str = "adsc"
    budget_fraction: float | None = None

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ScheduleError(f"unknown selection {self.selection!r}; expected one of {SELECTIONS}")
        rule = get_method(self.method)
        if not rule.in_decoder:
            raise ScheduleError(f"prune method {self.method} acts on the vision tower's features before the "
                                "language model, not in the decoder loop")
        if self.prune_layers:
            rule.check_layers(self.prune_layers)
        object.__setattr__(self, "prune_layers", tuple(self.prune_layers))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(self.grid))

    @property
    def enabled(self) -> bool:
        return bool(self.prune_layers) and (self.drop_ratio > 0 or self.budget_fraction is not None)

    @property
    def rule(self):
        """The ``PruneMethod`` of ``method``."""
        return get_method(self.method)

    def schedule(self, num_layers: int, num_vision_tokens: int) -> VisionSchedule:
        """One image's schedule: the plan's ratio, or its own solved for ``budget_fraction``."""
        if self.budget_fraction is None:
            return vision_schedule(num_layers, num_vision_tokens, self.prune_layers, self.drop_ratio)
        return _fraction_schedule(num_layers, num_vision_tokens, self.prune_layers, self.budget_fraction, self.method)


@lru_cache(maxsize=1024)
def _fraction_schedule(num_layers, num_tokens, prune_layers, fraction, method) -> VisionSchedule:
    try:
        return solve_drop_ratio(num_layers, num_tokens, prune_layers, fraction * num_tokens)
    except ScheduleError as error:
        raise ScheduleError(f"prune method {method}: an image of {num_tokens} vision tokens at budget fraction "
                            f"{fraction:g}: {error}") from None


@dataclass
class PruningTrace:
    """What the last pruned prefill did, for profiling, tests and the demo.

    Attributes:
        prune_layers: the prune layers of the plan.
        kept_vision_positions: ``[stage][row]`` LongTensor of the positions (in the prefill
            input sequence) of the vision tokens entering stage ``stage``; stage 0 holds all
            vision tokens, stage ``s`` those kept at ``prune_layers[s-1]``.
        tokens_per_layer: ``(batch, num_layers)`` real (unmasked) tokens each layer processed.
        padded_length_per_layer: slots each layer ran on (the tensor length).
        token_positions: ``(batch, T_last)`` input position of every slot after the last
            stage, ``-1`` for padding slots.
        merge_groups: pre-LLM methods only (``prune_layers`` empty, one stage): ``(images,
            N)`` the vision token each original patch of each image (in batch order) went
            into, ``-1`` if dropped (``reduction.VisionReduction.groups``).
        images: per row, ``(positions, grid)`` of every image the loop pruned (its input
            positions and its 2-D grid or ``None``); ``None`` when none were (no vision).
    """

    prune_layers: tuple[int, ...]
    kept_vision_positions: list[list[torch.Tensor]]
    tokens_per_layer: torch.Tensor
    padded_length_per_layer: list[int]
    token_positions: torch.Tensor
    merge_groups: torch.Tensor | None = None
    images: list[list[tuple]] | None = None

    def kept_at(self, prune_layer: int) -> list[torch.Tensor]:
        """Per row, positions of the vision tokens that enter ``prune_layer``."""
        return self.kept_vision_positions[self.prune_layers.index(prune_layer) + 1]

    def tokens_per_image_per_layer(self, num_layers: int) -> list[list[list[int]]]:
        """``[row][image][layer]``: the vision tokens of each image each decoder layer ran on
        (images of different sizes each have their own schedule)."""
        bounds = list(zip((0, *self.prune_layers), (*self.prune_layers, num_layers)))
        out = []
        for row, row_images in enumerate(self.images or []):
            per_image = []
            for positions, _ in row_images:
                mine = set(positions)
                counts = []
                for stage, (first, end) in enumerate(bounds):
                    kept = sum(1 for p in self.kept_vision_positions[stage][row].tolist() if p in mine)
                    counts += [kept] * (end - first)
                per_image.append(counts)
            out.append(per_image)
        return out


@dataclass
class PrefillState:
    """Per-stage layout of a pruned prefill, kept on the cache for decode steps."""

    prompt_length: int
    stage_first_layers: tuple[int, ...]
    stage_masks: list[torch.Tensor] = field(default_factory=list)  # (B, T_s) bool per stage
    renumbered: bool = False  # survivors renumbered after each drop (PruneMethod.renumbers_positions)

    def position_offsets(self) -> list[torch.Tensor]:
        """Per stage, ``(B, 1)``: what a decode position drops by there (the row's prompt
        tokens dropped before the stage when renumbered, else 0)."""
        real = [mask.sum(1, keepdim=True) for mask in self.stage_masks]
        return [(real[0] - count) if self.renumbered else torch.zeros_like(count) for count in real]

    def stage_lengths(self) -> list[int]:
        return [m.shape[1] for m in self.stage_masks]


@dataclass
class PrunedDecoderOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus where each output slot came from.

    ``token_positions``: ``(batch, T_out)`` index into the input sequence of every slot of
    ``last_hidden_state``, ``-1`` for padding slots; ``None`` when nothing was dropped (the
    output is aligned with the input).
    """

    token_positions: torch.Tensor | None = None


def compact_labels(labels: torch.Tensor, token_positions: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for the slots of a pruned output, for the usual shifted causal-LM loss.

    Slot ``i`` gets the label of input position ``token_positions[:, i]``; padding slots and
    the first real slot of each row (its predecessor is padding, so nothing predicts it)
    get ``ignore_index``. Every other text target is then predicted by the slot before it
    (the last surviving token before it), so the set of targets is the same as without
    pruning. Dropped vision positions carry ``ignore_index`` labels in LLaVA data anyway.
    """
    out = labels.gather(1, token_positions.clamp(min=0))
    out = out.masked_fill(token_positions < 0, ignore_index)
    unpredicted = torch.zeros_like(token_positions, dtype=torch.bool)
    unpredicted[:, 0] = True
    unpredicted[:, 1:] = token_positions[:, :-1] < 0
    return out.masked_fill(unpredicted, ignore_index)


def image_spans(vision_mask: torch.Tensor, tokens_per_image: int | None) -> list[list[tuple[int, int]]]:
    """``[(start, length), ...]`` of every image in every row of a ``(B, T)`` bool mask."""
    spans: list[list[tuple[int, int]]] = []
    mask = vision_mask.to("cpu", torch.int8)
    padded = torch.nn.functional.pad(mask, (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]
    for row in range(mask.shape[0]):
        starts = torch.nonzero(edges[row] == 1).flatten().tolist()
        ends = torch.nonzero(edges[row] == -1).flatten().tolist()
        row_spans = []
        for start, end in zip(starts, ends):
            length = end - start
            if tokens_per_image is None:
                row_spans.append((start, length))
                continue
            if length % tokens_per_image:
                raise ValueError(
                    f"row {row}: a run of {length} vision tokens at position {start} is not a "
                    f"multiple of the {tokens_per_image} tokens of one image"
                )
            row_spans.extend((s, tokens_per_image) for s in range(start, end, tokens_per_image))
        spans.append(row_spans)
    return spans


@lru_cache(maxsize=256)
def _stage_keep_table(plan: AdscPlan, num_layers: int, num_tokens: int,
                      grid: tuple[int, int] | None) -> torch.Tensor:
    """``(num_prune_layers, N)`` bool: which of an image's tokens survive each prune layer."""
    schedule = plan.schedule(num_layers, num_tokens)
    counts = tuple(schedule.stage_tokens[1:])
    sets = plan.rule.keep_sets(num_tokens, counts, plan.selection, grid)
    if [len(kept) for kept in sets] != list(counts):
        raise ValueError(f"prune method {plan.method}: keep_sets gave {[len(k) for k in sets]} tokens per "
                         f"stage for {num_tokens}, the schedule asks {list(counts)}")
    table = torch.zeros(len(sets), num_tokens, dtype=torch.bool)
    for stage, kept in enumerate(sets):
        table[stage, list(kept)] = True
    return table


ImageSpans = list[list[tuple]]  # per row: (start, length, grid) or (positions, grid) per image


def _image_layout(plan: AdscPlan, vision_mask: torch.Tensor, images: ImageSpans | None) -> list[list[tuple]]:
    """Per row, ``(positions, grid)`` of every image (``positions`` a tuple of input indices):
    ``images`` as given (each image's own size and grid; ``(start, length, grid)`` for a
    contiguous one, ``(positions, grid)`` for one interleaved with other tokens), checked to
    cover exactly the vision tokens of the mask; else runs of vision tokens split by the plan's
    ``tokens_per_image``, each on the plan's ``grid``."""
    if images is None:
        return [[(tuple(range(start, start + length)), plan.grid) for start, length in row]
                for row in image_spans(vision_mask, plan.tokens_per_image)]
    if len(images) != vision_mask.shape[0]:
        raise ValueError(f"images: {len(images)} rows of image spans for a batch of {vision_mask.shape[0]}")
    covered = torch.zeros_like(vision_mask, dtype=torch.bool, device="cpu")
    out = []
    for row, row_images in enumerate(images):
        spans = []
        for image in row_images:
            if len(image) == 3:
                start, length, grid = image
                positions = tuple(range(int(start), int(start) + int(length)))
            else:
                positions, grid = tuple(int(p) for p in image[0]), image[1]
            grid = tuple(grid) if grid is not None else None
            if grid is not None and grid[0] * grid[1] != len(positions):
                raise ValueError(f"row {row}: the image at {positions[0]} has {len(positions)} tokens, not a "
                                 f"{grid[0]}x{grid[1]} grid")
            covered[row, list(positions)] = True
            spans.append((positions, grid))
        out.append(spans)
    if not torch.equal(covered, vision_mask.to("cpu", torch.bool)):
        raise ValueError("images: the given image spans do not cover exactly the vision tokens of vision_mask")
    return out


def _keep_masks(plan: AdscPlan, num_layers: int, vision_mask: torch.Tensor, layout: list[list[tuple]]) -> list[torch.Tensor]:
    """Per prune layer, a ``(B, T)`` bool mask over the input: text, or vision kept there."""
    keep = torch.ones((len(plan.prune_layers), *vision_mask.shape), dtype=torch.bool)
    for row, row_images in enumerate(layout):
        for positions, grid in row_images:
            keep[:, row, list(positions)] = _stage_keep_table(plan, num_layers, len(positions), grid)
    return list(keep.to(vision_mask.device).unbind(0))


def _query_scores(decoder, layer, hidden, slot_mask, positions, query_slots) -> torch.Tensor:
    """``(B, T)``: attention of each row's query slots in ``layer`` (whose input is ``hidden``)."""
    with torch.no_grad():
        position_embeddings = decoder.rotary_emb(hidden, position_ids=_rope_ids(positions))
        normed = layer.input_layernorm(hidden)
        return query_attention(layer.self_attn, normed, position_embeddings, slot_mask, query_slots)


def _query_slots(query_mask, slot_index, slot_mask) -> torch.Tensor:
    """``(B, T)`` bool query slots: the given input positions still present, else (and for rows
    with none) each row's last real slot."""
    last = last_query_mask(slot_mask)
    if query_mask is None:
        return last
    queries = query_mask.bool().gather(1, slot_index.clamp(min=0)) & slot_mask & (slot_index >= 0)
    empty = ~queries.any(1, keepdim=True)
    return queries | (last & empty)


def _scored_keep(plan, num_layers, spans, stage, scores, slot_index, input_length) -> torch.Tensor:
    """``(B, T_in)`` over the input: text, and in each image the stage's count of its
    top-scored tokens among those still present (slot scores mapped back to input positions)."""
    batch = scores.shape[0]
    by_input = torch.full((batch, input_length + 1), float("-inf"), device=scores.device)
    by_input.scatter_(1, slot_index + 1, scores.masked_fill(slot_index < 0, float("-inf")))
    by_input = by_input[:, 1:]
    groups = [[positions for positions, _ in row] for row in spans]
    counts = [[plan.schedule(num_layers, len(positions)).stage_tokens[stage] for positions in row] for row in groups]
    keep = top_k_in_groups(by_input, groups, counts)
    in_image = torch.zeros_like(keep)
    for row, row_groups in enumerate(groups):
        for positions in row_groups:
            in_image[row, list(positions)] = True
    return ~in_image | keep


def _compaction_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index that packs the kept slots of each row to the right.

    Returns ``(src, valid)``, both ``(B, T_new)`` with ``T_new`` the largest kept count:
    ``src`` indexes the current slots, ``valid`` is False for the left padding slots.
    """
    length = keep.shape[1]
    arange = torch.arange(length, device=keep.device)
    order = torch.argsort(torch.where(keep, arange + length, arange), dim=1)
    new_length = int(keep.sum(1).max())
    src = order[:, length - new_length :]
    return src, keep.gather(1, src)


def _gather_slots(hidden: torch.Tensor, src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    gathered = hidden.gather(1, src.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return gathered * valid.unsqueeze(-1).to(gathered.dtype)


def _pop_output_flags(kwargs: dict) -> None:
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.pop(flag, False):
            raise NotImplementedError(
                f"{flag}=True is not available while vision tokens are pruned (layers hold "
                "different numbers of tokens); read the PruningTrace instead or disable pruning"
            )


def _position_rows(position_ids, batch: int, length: int, start: int, device) -> torch.Tensor:
    """Position ids as ``(R, B, T)``: ``R = 1`` for 1-D RoPE; 3 (t, h, w) or 4 (text row + t, h, w)
    for multimodal RoPE (Qwen-VL); ``None``: ``start + arange(T)``."""
    if position_ids is None:
        position_ids = torch.arange(length, device=device) + start
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() == 2:
        position_ids = position_ids[None]
    if position_ids.shape[0] not in (1, 3, 4):
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: expected (B, T), (3, B, T) or (4, B, T)")
    return position_ids.expand(-1, batch, -1)


def _rope_ids(rows: torch.Tensor) -> torch.Tensor:
    """What the rotary embedding takes: ``(B, T)`` for 1-D, the ``(3, B, T)`` axes for M-RoPE."""
    if rows.shape[0] == 1:
        return rows[0]
    return rows[1:] if rows.shape[0] == 4 else rows


def _text_ids(rows: torch.Tensor) -> torch.Tensor | None:
    """The text positions the mask and the layers see (``None`` for 3-row M-RoPE, as transformers)."""
    return rows[0] if rows.shape[0] in (1, 4) else None


def _run_stage(decoder, layers, hidden, mask2d, positions, cache, use_cache, first_layer, pass_positions, kwargs,
               additions=None, slot_index=None):
    """Run ``layers`` on ``hidden`` with positions ``(R, B, T)`` and one stage's 2-D mask; after
    layer ``l`` add ``additions[l]`` (``(B, T_input, D)`` over the input) at each slot's input
    position (``slot_index``; Qwen3-VL's DeepStack features)."""
    causal_mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        position_ids=_text_ids(positions),
        layer_idx=first_layer,
        **compat.cache_kwargs(cache),
    )
    position_embeddings = decoder.rotary_emb(hidden, position_ids=_rope_ids(positions))
    for offset, layer in enumerate(layers):
        hidden = layer(
            hidden,
            attention_mask=causal_mask,
            position_embeddings=position_embeddings,
            # Gapped ids would read as packed sequences to FlashAttention: only the RoPE
            # embeddings carry them after a prune layer.
            position_ids=_text_ids(positions) if pass_positions else None,
            use_cache=use_cache,
            **compat.cache_kwargs(cache),
            **kwargs,
        )
        if additions and first_layer + offset in additions:
            add = additions[first_layer + offset]
            gathered = add.gather(1, slot_index.clamp(min=0)[..., None].expand(-1, -1, add.shape[-1]))
            hidden = hidden + gathered * (slot_index >= 0)[..., None].to(gathered.dtype)
    return hidden


def _resolve_cache(decoder, cache: Cache | None, use_cache: bool | None, kwargs: dict) -> tuple[Cache | None, bool]:
    """The cache this forward fills (or ``None``) and whether it is used; see ``pruned_decoder_forward``."""
    cache = compat.take_cache(kwargs, cache, "pruned_decoder_forward")
    compat.reject_stray_cache(kwargs, "pruned_decoder_forward")
    checkpointing = decoder.training and torch.is_grad_enabled() and any(
        getattr(layer, "gradient_checkpointing", False) for layer in decoder.layers
    )
    if checkpointing and (cache is not None or use_cache):
        # The backward replay of a checkpointed layer would write the cache a second time.
        _warn_once("gradient checkpointing in training: the KV cache is not used (use_cache=False)")
        return None, False
    if use_cache is None:
        use_cache = decoder.config.use_cache and (cache is not None or not torch.is_grad_enabled())
    if use_cache and cache is None:
        cache = DynamicCache(config=decoder.config)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise TypeError(
            f"vision-token pruning keeps a different length per layer and needs a DynamicCache; "
            f"got {type(cache).__name__}"
        )
    return (cache if use_cache else None), bool(use_cache)


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def pruned_decoder_forward(
    decoder,
    plan: AdscPlan,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache: Cache | None = None,
    inputs_embeds: torch.FloatTensor | None = None,
    use_cache: bool | None = None,
    vision_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    on_trace=None,
    images: ImageSpans | None = None,
    additions: dict[int, torch.Tensor] | None = None,
    **kwargs,
) -> PrunedDecoderOutput:
    """Forward of a Llama-style ``decoder`` that drops vision tokens per ``plan``.

    Args:
        decoder: the decoder module (``LlamaModel`` or compatible).
        plan: what to prune; a disabled plan must not reach here (call the stock forward).
        attention_mask: ``(B, past + T)`` 2-D padding mask or ``None``.
        position_ids: ``(B, T)`` original positions of the input tokens; default
            ``past + arange(T)`` like ``LlamaModel``; or M-RoPE's ``(3, B, T)`` / ``(4, B, T)``
            (text row first), every row gathered with the survivors.
        cache: a ``DynamicCache`` to fill or continue; also accepted as ``past_key_values``
            (transformers up to 5.23). Without one, a cache is built only when ``use_cache``
            (default ``config.use_cache``) asks for it and gradients are off: a training
            forward never builds one, and gradient-checkpointed training drops a given one.
        vision_mask: ``(B, T)`` bool, True at vision tokens of this input. Only a prefill
            (empty or no cache) may carry vision tokens.
        query_mask: ``(B, T)`` bool, the tokens whose attention ranks vision tokens for the
            score-based methods (training: ``scores.answer_query_mask(labels)``); ``None``:
            each row's last real token (the last prompt token at inference).
        on_trace: called with the ``PruningTrace`` of a prefill (the call's own: a session
            takes it so, never from the shared module).
        images: per row, ``(start, length, grid)`` of each image in this input, for images of
            different sizes (an adapter's per-call layout); ``None``: runs of vision tokens
            split by ``plan.tokens_per_image``, each on ``plan.grid``. Each image's counts come
            from the plan's ratio on its own length.
        additions: prefill only: ``{layer: (B, T, D)}`` added to the hidden states after that
            layer at the tokens still present (an adapter's per-layer visual features, e.g.
            Qwen3-VL's DeepStack); a dropped token's addition goes with it.

    Returns:
        ``PrunedDecoderOutput``: hidden states of the last stage's slots (``B, T_out, D``)
        and ``token_positions`` mapping them to input positions. The trace of a prefill
        is handed to ``on_trace`` and kept for this thread or task (``last_prefill_trace``).
    """
    _pop_output_flags(kwargs)
    config = decoder.config
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = decoder.embed_tokens(input_ids)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"vision-token pruning needs a 2-D padding mask (batch, length); got shape "
            f"{tuple(attention_mask.shape)}"
        )
    batch, length, _ = inputs_embeds.shape
    cache, use_cache = _resolve_cache(decoder, cache, use_cache, kwargs)
    has_vision = vision_mask is not None and bool(vision_mask.any())
    state: PrefillState | None = getattr(cache, ADSC_STATE_ATTR, None)
    cache_empty = cache is None or all(
        cache.get_seq_length(i) == 0 for i in range(len(cache.layers))
    )
    if cache_empty:
        state = None
    elif has_vision:
        raise NotImplementedError(
            "vision tokens arrived with a non-empty cache: ADSC prunes at prefill, so the whole "
            "prompt with its images must be sent in one forward"
        )

    num_layers = config.num_hidden_layers
    schedule_bounds = list(zip((0, *plan.prune_layers), (*plan.prune_layers, num_layers)))
    layers = decoder.layers

    if state is not None:
        hidden = _decode_step(
            decoder, state, schedule_bounds, inputs_embeds, attention_mask, position_ids,
            cache, use_cache, kwargs,
        )
        return PrunedDecoderOutput(last_hidden_state=decoder.norm(hidden), **compat.output_cache_kwargs(cache))

    past_length = 0 if cache is None else cache.get_seq_length(0)
    position_ids = _position_rows(position_ids, batch, length, past_length, inputs_embeds.device)
    slot_mask = (
        attention_mask[:, -length:].bool()
        if attention_mask is not None
        else torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)
    )
    score_layer = plan.rule.score_layer if has_vision and plan.rule.score_based else None
    layout = _image_layout(plan, vision_mask.bool(), images) if has_vision else None
    if has_vision and score_layer is None:
        keep_masks = _keep_masks(plan, num_layers, vision_mask.bool(), layout)
    else:
        # positional: nothing to drop without vision; score-based: chosen at each prune layer
        keep_masks = [torch.ones(batch, length, dtype=torch.bool, device=inputs_embeds.device)] * len(plan.prune_layers)
    no_vision = torch.zeros(batch, length, dtype=torch.bool, device=inputs_embeds.device)
    vision = vision_mask.bool() if has_vision else no_vision
    spans = layout if score_layer is not None else None

    hidden = inputs_embeds
    positions = position_ids
    renumber = plan.rule.renumbers_positions
    first_position = position_ids[0].masked_fill(~slot_mask, torch.iinfo(position_ids.dtype).max).amin(1, keepdim=True)
    first_slot = torch.where(slot_mask, torch.arange(length, device=slot_mask.device), length).amin(1, keepdim=True)
    slot_index = torch.arange(length, device=inputs_embeds.device).expand(batch, -1)
    stage_masks: list[torch.Tensor] = []
    kept_positions: list[list[torch.Tensor]] = []
    tokens_per_layer = torch.zeros(batch, num_layers, dtype=torch.long)
    padded_lengths = [0] * num_layers

    def score(layer_idx: int) -> torch.Tensor:
        queries = _query_slots(query_mask, slot_index, slot_mask)
        return _query_scores(decoder, layers[layer_idx], hidden, slot_mask, positions, queries)

    scores = None
    for stage, (first, end) in enumerate(schedule_bounds):
        if stage > 0:
            if score_layer is not None:
                if scores is None:  # ranked by the prune layer itself, from its input
                    scores = score(first)
                keep_masks[stage - 1] = _scored_keep(plan, num_layers, spans, stage, scores, slot_index, length)
                scores = None
            # Padding slots go too: only real, kept tokens move on.
            keep = keep_masks[stage - 1].gather(1, slot_index.clamp(min=0)) & slot_mask
            src, valid = _compaction_index(keep)
            hidden = _gather_slots(hidden, src, valid)
            positions = positions.gather(2, src[None].expand(positions.shape[0], -1, -1)).masked_fill(~valid[None], 0)
            slot_mask = slot_mask.gather(1, src) & valid
            slot_index = slot_index.gather(1, src).masked_fill(~valid, -1)
            if renumber and positions.shape[0] == 1:  # as released: 0..len-1 from the row's first position
                positions = (first_position + slot_mask.cumsum(1) - 1).masked_fill(~slot_mask, 0)[None]
            elif renumber:  # M-RoPE: every axis of the original ids down by the row's tokens dropped before
                dropped = (slot_index - first_slot) - (slot_mask.cumsum(1) - 1)
                original = position_ids.gather(2, slot_index.clamp(min=0)[None].expand(position_ids.shape[0], -1, -1))
                positions = (original - dropped[None]).masked_fill(~slot_mask[None], 0)
        stage_masks.append(slot_mask)
        present = vision.gather(1, slot_index.clamp(min=0)) & (slot_index >= 0)
        kept_positions.append([slot_index[row][present[row]].cpu() for row in range(batch)])
        tokens_per_layer[:, first:end] = slot_mask.sum(1, keepdim=True).cpu()
        padded_lengths[first:end] = [hidden.shape[1]] * (end - first)
        split = end
        if score_layer is not None and stage < len(plan.prune_layers):
            ranked_by = score_layer(plan.prune_layers[stage])
            if first <= ranked_by < end:  # ranked inside this stage (FastV: layer K-1)
                split = ranked_by
        hidden = _run_stage(decoder, layers[first:split], hidden, slot_mask, positions, cache,
                            use_cache, first, stage == 0, kwargs, additions, slot_index)
        if split < end:
            scores = score(split)
            hidden = _run_stage(decoder, layers[split:end], hidden, slot_mask, positions, cache,
                                use_cache, split, stage == 0, kwargs, additions, slot_index)
    hidden = decoder.norm(hidden)

    if cache is not None and use_cache:
        setattr(
            cache,
            ADSC_STATE_ATTR,
            PrefillState(length, tuple(first for first, _ in schedule_bounds), stage_masks, renumber),
        )
    trace = PruningTrace(
        prune_layers=plan.prune_layers,
        kept_vision_positions=kept_positions,
        tokens_per_layer=tokens_per_layer,
        padded_length_per_layer=padded_lengths,
        token_positions=slot_index.detach().cpu(),
        images=layout,
    )
    record_prefill_trace(decoder, trace)
    if on_trace is not None:
        on_trace(trace)
    return PrunedDecoderOutput(
        last_hidden_state=hidden,
        token_positions=slot_index,
        **compat.output_cache_kwargs(cache),
    )


def _decode_step(decoder, state, schedule_bounds, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    """Tokens after a pruned prefill: nothing is dropped, each stage attends to its cache."""
    batch, length, _ = inputs_embeds.shape
    last_first = state.stage_first_layers[-1]
    # Original-space length so far, from any stage: its cache minus its prefill slots.
    seen = cache.get_seq_length(last_first) - state.stage_masks[-1].shape[1] + state.prompt_length
    positions = _position_rows(position_ids, batch, length, seen, inputs_embeds.device)
    offsets = state.position_offsets()
    hidden = inputs_embeds
    for stage, (first, end) in enumerate(schedule_bounds):
        if end == first:
            continue
        prefill_mask = state.stage_masks[stage]
        extra = cache.get_seq_length(first) + length - prefill_mask.shape[1]
        if attention_mask is not None:
            tail = attention_mask[:, attention_mask.shape[1] - extra :].bool()
        else:
            tail = torch.ones(batch, extra, dtype=torch.bool, device=prefill_mask.device)
        mask2d = torch.cat([prefill_mask, tail.to(prefill_mask.device)], dim=1)
        hidden = _run_stage(
            decoder, decoder.layers[first:end], hidden, mask2d, positions - offsets[stage].to(positions.device),
            cache, use_cache, first, stage == 0, kwargs,
        )
    return hidden
