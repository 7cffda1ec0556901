"""The pruning flags shared by every inference entry point (eval, one-shot CLI, demo)."""

from __future__ import annotations

import argparse
import logging

from adsc_patch import PRUNE_METHODS, ScheduleError
from adsc_patch.select import SELECTIONS

from ..cli import fail

logger = logging.getLogger(__name__)


def parse_layer_list(text: str) -> list[int]:
    """``'1, 4'`` -> ``[1, 4]`` (the ``--prune-layers`` flag and the demo's layers box)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prune-layers takes comma-separated layer indices, got {text!r}") from None


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ADSC vision-token pruning (default: the checkpoint's own schedule)")
    group.add_argument("--prune-layers", type=parse_layer_list, default=None,
                       help="comma-separated 0-based decoder layers; tokens drop at the input of each")
    ratio = group.add_mutually_exclusive_group()
    ratio.add_argument("--drop-ratio", type=float, default=None, help="fraction dropped at every prune layer")
    ratio.add_argument("--vision-token-budget", type=float, default=None,
                       help="average vision tokens over all layers; the drop ratio is solved for it")
    group.add_argument("--prune-selection", choices=SELECTIONS, default=None)
    group.add_argument("--prune-method", choices=PRUNE_METHODS, default=None,
                       help="adsc (positional), fastv or pdrop (attention-ranked) in the decoder; tome, visionzip or "
                            "pool before it (docs/methods.md)")
    group.add_argument("--no-pruning", action="store_true", help="run on all vision tokens")


def apply_pruning_args(model, args: argparse.Namespace):
    """Configure ``model`` from the flags; returns the schedule in effect (``None`` without
    a vision tower). With no flag the checkpoint's saved schedule stays as it is."""
    given = [flag for flag, value in (("--prune-layers", args.prune_layers), ("--drop-ratio", args.drop_ratio),
                                      ("--vision-token-budget", args.vision_token_budget),
                                      ("--prune-selection", args.prune_selection),
                                      ("--prune-method", getattr(args, "prune_method", None))) if value is not None]
    if getattr(args, "no_pruning", False) and given:
        fail(f"--no-pruning runs on all vision tokens and cannot be combined with {', '.join(given)}")
    try:
        if getattr(args, "no_pruning", False):
            schedule = model.configure_pruning(prune_layers=[], drop_ratio=0.0)
        elif any(
            value is not None
            for value in (args.prune_layers, args.drop_ratio, args.vision_token_budget, args.prune_selection,
                          getattr(args, "prune_method", None))
        ):
            schedule = model.configure_pruning(
                prune_layers=args.prune_layers,
                drop_ratio=args.drop_ratio,
                vision_token_budget=args.vision_token_budget,
                selection=args.prune_selection,
                method=getattr(args, "prune_method", None),
            )
        else:
            schedule = model.vision_schedule() if model.get_vision_tower() is not None else None
    except ScheduleError as error:
        fail(error)
    if schedule is not None:
        logger.info("vision tokens (prune method %s): %s; %d kept after the last stage", model.config.prune_method,
                    schedule.describe(), schedule.stage_tokens[-1])
    return schedule
