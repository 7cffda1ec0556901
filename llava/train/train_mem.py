"""Upstream's DeepSpeed entry point: ``deepspeed llava/train/train_mem.py <flags>`` (or
``python llava/train/train_mem.py <flags>``), the flags of ``llava.train.train``.

Upstream's train_mem trains with flash attention; this one does when flash-attn is installed
and a CUDA GPU is present, and otherwise with sdpa (a log line says why). An explicit
``--attn_implementation`` wins.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # run as a file: see _run_as_file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also under python -P
    import _run_as_file  # noqa: F401

from llava.cli import run_command
from llava.train.train import train


def train_mem(argv: list[str] | None = None) -> str:
    """``train`` preferring flash_attention_2; returns the output folder."""
    return train(argv, attn_implementation="flash_attention_2")


def main(argv: list[str] | None = None) -> str:
    """The command line: bad input ends it with ``error: ...`` and exit code 2."""
    return run_command(train_mem, argv)


if __name__ == "__main__":
    main()
