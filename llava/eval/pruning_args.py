"""The pruning flags shared by every inference entry point (eval, one-shot CLI, terminal chat):
``adsc_patch.spec``'s, read into a ``PruningSpec`` on top of the checkpoint's own."""

from __future__ import annotations

import argparse
import logging

from adsc_patch import PruningSpec, ScheduleError
from adsc_patch.spec import add_spec_flags, parse_layer_list, spec_from_flags

from ..cli import fail

__all__ = ["add_pruning_args", "apply_pruning_args", "parse_layer_list", "vlm_spec_from_args"]

logger = logging.getLogger(__name__)


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    add_spec_flags(parser, "ADSC vision-token pruning (default: the checkpoint's own schedule)")


def apply_pruning_args(model, args: argparse.Namespace):
    """Configure ``model`` from the flags; returns the schedule in effect (``None`` without
    a vision tower). With no flag the checkpoint's saved schedule stays as it is."""
    try:
        spec = spec_from_flags(args, PruningSpec.from_config(model.config))
        if spec is not None:
            schedule = model.configure_pruning(spec)
        else:
            schedule = model.vision_schedule() if model.get_vision_tower() is not None else None
    except ScheduleError as error:
        fail(error)
    if schedule is not None:
        logger.info("vision tokens (prune method %s): %s; %d kept after the last stage", model.config.prune_method,
                    schedule.describe(), schedule.stage_tokens[-1])
    return schedule


def vlm_spec_from_args(loaded, args: argparse.Namespace) -> PruningSpec:
    """The spec a transformers VLM (``llava.model.vlm.LoadedVlm``) runs under: the flags on top
    of what its fine-tune recorded (a stock checkpoint: nothing pruned). Checked against the
    model now, so a bad request ends in one line before any question is asked."""
    from adsc_patch.patch import hf_plan

    saved = loaded.recorded or PruningSpec.off()
    try:
        spec = spec_from_flags(args, saved) or saved
        if spec.enabled:
            hf_plan(loaded.model, spec)
    except ScheduleError as error:
        fail(error)
    logger.info("pruning: %s", spec.to_dict() if spec.enabled else "none")
    return spec
