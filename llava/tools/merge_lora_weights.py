"""Merge a LoRA training output into a complete checkpoint (upstream's script, same flags).

    python scripts/merge_lora_weights.py --model-path OUT --model-base BASE --save-model-path MERGED
    python -m llava.tools.merge_lora_weights ...   (the same)

The merged folder is written beside its destination and renamed into place at the end, so
an interrupted merge never leaves a half-written checkpoint under the final name.

An adapter of transformers' own VLMs (Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision, the
output of ``llava.train.train`` on them) merges into a complete transformers checkpoint in
the base's dtype, with the processor files and the ``adsc_pruning.json`` it was trained with,
which ``llava.model.vlm.load_transformers_vlm`` loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile

from llava.cli import InputError, fail
from llava.model.builder import load_pretrained_model, write_tower_relative


def _is_transformers_vlm(model_path: str, model_base: str) -> bool:
    from llava.model.vlm import is_transformers_vlm

    try:
        return is_transformers_vlm(model_path, model_base)
    except InputError:
        return False


def _saved_dtype(path: str):
    """The dtype a checkpoint folder records in its config.json (float32 when it records none)."""
    import json

    import torch

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else torch.float32


def _write_vlm(model_path: str, model_base: str, scratch: str) -> None:
    """The merged transformers VLM, its processor files and recorded spec, into ``scratch``."""
    from llava.model.hub import resolve_pretrained
    from llava.model.vlm import load_transformers_vlm, write_recorded_spec
    from llava.train.vlm_train import PROCESSOR_FILES, copy_processor_files

    if not os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        raise InputError(f"{model_path} is not a LoRA adapter (no adapter_config.json): nothing to merge")
    base = resolve_pretrained(model_base, "--model-base")
    loaded = load_transformers_vlm(model_path, model_base, device="cpu", dtype=_saved_dtype(base))
    loaded.model.save_pretrained(scratch)
    has_processor = any(os.path.isfile(os.path.join(model_path, name)) for name in PROCESSOR_FILES)
    copy_processor_files(model_path if has_processor else base, scratch)
    if loaded.recorded is not None:
        write_recorded_spec(scratch, loaded.recorded)


def merge_lora(model_path: str, model_base: str, save_model_path: str) -> str:
    """Load ``model_path`` (a LoRA output) on ``model_base``, merge, save; returns the path."""
    if os.path.exists(save_model_path) and os.listdir(save_model_path):
        raise FileExistsError(f"{save_model_path} exists and is not empty")
    vlm = _is_transformers_vlm(model_path, model_base)
    if not vlm:
        tokenizer, model, _, _ = load_pretrained_model(model_path, model_base, device="cpu", checkpoint_format="lora")
    parent = os.path.dirname(os.path.abspath(save_model_path))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".merge-", dir=parent)
    try:
        if vlm:
            _write_vlm(model_path, model_base, scratch)
        else:
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
