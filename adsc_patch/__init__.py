"""ADSC: attention-driven self-compression of vision tokens inside a decoder-only LLM.

The method as small pure pieces (``schedule``, ``select``), the pruned decoder loop
(``decoder``), cache accounting (``cache``), analytic cost (``profile``) and the patch for
models we did not write (``patch``); transformers' version-dependent names live in
``compat`` (checked at import). Nothing here imports ``llava``.
"""

from . import compat
from .decoder import (
    PRUNE_METHODS,
    AdscPlan,
    PrunedDecoderOutput,
    PruningTrace,
    compact_labels,
    image_spans,
    pruned_decoder_forward,
)
from .patch import apply_adsc, last_trace, remove_adsc
from .schedule import (
    ScheduleError,
    VisionSchedule,
    default_prune_layers,
    kept_tokens,
    solve_drop_ratio,
    vision_schedule,
)
from .select import keep_sets

__all__ = [
    "PRUNE_METHODS",
    "AdscPlan",
    "PrunedDecoderOutput",
    "PruningTrace",
    "ScheduleError",
    "VisionSchedule",
    "apply_adsc",
    "compact_labels",
    "default_prune_layers",
    "image_spans",
    "keep_sets",
    "kept_tokens",
    "last_trace",
    "pruned_decoder_forward",
    "remove_adsc",
    "solve_drop_ratio",
    "vision_schedule",
]
