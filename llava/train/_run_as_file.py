"""Imported first by ``train.py`` and ``train_mem.py`` when they run as files (upstream's
``python llava/train/train.py``, ``deepspeed llava/train/train_mem.py``): takes this folder
off ``sys.path`` (its data.py, trainer.py, ... would shadow top-level modules of the same
names) and puts the repository root first, so ``import llava`` finds the package."""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))
