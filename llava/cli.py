"""How every command line of ours ends on bad input: one line ``error: ...`` on stderr and
exit code 2 (argparse's code for bad usage); the traceback only with ``--debug``.

Bad input is an :class:`InputError` (``CheckpointError``, ``EvalInputError``, ``DataError``,
``MissingDependencyError`` derive from it) or ``adsc_patch.ScheduleError``; anything else is a
bug of ours and keeps its traceback. ``--debug`` is taken out of the arguments only when it
stands alone, so ``--debug underflow_overflow`` still reaches transformers' TrainingArguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Sequence, TypeVar

from adsc_patch import ScheduleError

__all__ = ["InputError", "MissingDependencyError", "UsageExit", "USAGE_EXIT_CODE", "add_debug_arg", "fail", "run_command"]

USAGE_EXIT_CODE = 2
T = TypeVar("T")


class InputError(ValueError):
    """Input a user gave (a path, a file, a flag) that cannot be used; the message names it."""


class MissingDependencyError(InputError, ImportError):
    """An optional package a flag needs (bitsandbytes, flash-attn) is not installed."""


class UsageExit(SystemExit):
    """Exit code 2; ``str()`` is the ``error: ...`` line already printed to stderr."""

    def __init__(self, line: str):
        super().__init__(USAGE_EXIT_CODE)
        self.line = line

    def __str__(self) -> str:
        return self.line


def fail(error: BaseException | str) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with code 2."""
    message = str(error).strip().replace("\n", " ") or type(error).__name__
    line = f"error: {message}"
    print(line, file=sys.stderr)
    raise UsageExit(line) from None


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    """List ``--debug`` in ``--help`` (``run_command`` consumes it before parsing)."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    for index, arg in enumerate(argv):
        if arg == "--debug" and (index + 1 == len(argv) or argv[index + 1].startswith("-")):
            return argv[:index] + argv[index + 1:], True
    return argv, False


def run_command(main: Callable[[list[str]], T], argv: Sequence[str] | None = None) -> T:
    """``main(argv)``, with bad input turned into ``error: <message>`` and exit code 2."""
    args, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return main(args)
    except (InputError, ScheduleError) as error:
        if debug:
            raise
        fail(error)
