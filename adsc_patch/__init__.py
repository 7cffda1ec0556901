"""ADSC: attention-driven self-compression of vision tokens inside a decoder-only LLM.

The method and its baselines as small pure pieces (``schedule``, ``select``, ``scores``,
``adsc``, ``fastv``, ``pdrop``, ``tome``, ``visionzip``, ``pool``, each a ``PruneMethod``;
``methods`` is their registry: ``register_method`` adds one), the pre-LLM door (``prellm``), the pruned decoder loop
(``decoder``), cache accounting (``cache``), analytic cost (``profile``) and the patch for
models we did not write (``patch``), one adapter per architecture (``adapters``); transformers' version-dependent names live in
``compat`` (checked at import). Nothing here imports ``llava``.
"""

from . import compat, resolve
from .adapters import ImageLayout, ModelAdapter, adapter_for, register_adapter
from .decoder import (
    AdscPlan,
    PrunedDecoderOutput,
    PruningTrace,
    compact_labels,
    image_spans,
    last_prefill_trace,
    pruned_decoder_forward,
)
from .methods import IN_LLM_METHODS, PRE_LLM_METHODS, PRUNE_METHODS, PruneMethod, get_method, register_method
from .patch import apply_adsc, last_trace, remove_adsc
from .prellm import PreLlmPlan, pre_llm_schedule, reduce_images, solve_pre_llm
from .reduction import VisionReduction
from .schedule import (
    ScheduleError,
    VisionSchedule,
    default_prune_layers,
    kept_tokens,
    solve_drop_ratio,
    vision_schedule,
)
from .select import keep_sets
from .session import PruningSession, pruning
from .spec import PruningSpec

__all__ = [
    "IN_LLM_METHODS",
    "PRE_LLM_METHODS",
    "PRUNE_METHODS",
    "PreLlmPlan",
    "PruneMethod",
    "VisionReduction",
    "AdscPlan",
    "ImageLayout",
    "ModelAdapter",
    "PrunedDecoderOutput",
    "PruningSession",
    "PruningSpec",
    "PruningTrace",
    "ScheduleError",
    "VisionSchedule",
    "adapter_for",
    "apply_adsc",
    "compact_labels",
    "default_prune_layers",
    "get_method",
    "image_spans",
    "keep_sets",
    "kept_tokens",
    "last_prefill_trace",
    "last_trace",
    "pre_llm_schedule",
    "pruned_decoder_forward",
    "pruning",
    "reduce_images",
    "register_adapter",
    "register_method",
    "remove_adsc",
    "solve_drop_ratio",
    "solve_pre_llm",
    "vision_schedule",
]
