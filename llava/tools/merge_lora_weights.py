"""Merge a LoRA training output into a complete checkpoint (upstream's script, same flags).

    python scripts/merge_lora_weights.py --model-path OUT --model-base BASE --save-model-path MERGED
    python -m llava.tools.merge_lora_weights ...   (the same)

The merged folder is written beside its destination and renamed into place at the end, so
an interrupted merge never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

from llava.cli import InputError, fail
from llava.model.builder import load_pretrained_model, write_tower_relative


def merge_lora(model_path: str, model_base: str, save_model_path: str) -> str:
    """Load ``model_path`` (a LoRA output) on ``model_base``, merge, save; returns the path."""
    if os.path.exists(save_model_path) and os.listdir(save_model_path):
        raise FileExistsError(f"{save_model_path} exists and is not empty")
    tokenizer, model, _, _ = load_pretrained_model(model_path, model_base, device="cpu", checkpoint_format="lora")
    parent = os.path.dirname(os.path.abspath(save_model_path))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".merge-", dir=parent)
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        write_tower_relative(scratch, save_model_path)
        if os.path.isdir(save_model_path):
            os.rmdir(save_model_path)
        os.replace(scratch, save_model_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return save_model_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="the LoRA output folder")
    parser.add_argument("--model-base", required=True, help="the model the LoRA was trained on")
    parser.add_argument("--save-model-path", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(merge_lora(args.model_path, args.model_base, args.save_model_path))
    except (FileExistsError, InputError) as error:
        fail(error)


if __name__ == "__main__":
    main()
