"""Terminal chat about one image: ``python -m llava.serve.cli --model-path P --image-file F``.

Upstream's chat loop (``USER:`` prompt, the reply streamed after ``ASSISTANT:``, multi-turn
with the checkpoint's template; an empty line or end of input ends it), with the pruning
flags of every inference entry point and, after each reply, one line of metrics: time to
first token, tokens/s, mean vision tokens per layer, KV-cache MB and FLOPs. Reads piped
input as well as a terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..cli import InputError, add_debug_arg, run_command
from ..eval.inference import add_model_args, load_model_from_args, load_vlm_from_args
from ..eval.pruning_args import add_pruning_args, apply_pruning_args, vlm_spec_from_args
from ..model.vlm import is_transformers_vlm
from ..model.pruning_setting import PruningSetting
from .chat import MAX_IMAGE_PIXELS, ChatEngine, Reply, open_image
from .vlm_chat import VlmChatEngine

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava.serve.cli", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's conv_mode, else vicuna_v1")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="at most this many tokens per reply; cut to what the context leaves (logged)")
    parser.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS)
    add_pruning_args(parser)
    add_debug_arg(parser)
    return parser


def main(argv=None, stdin=None, stdout=None) -> list[Reply]:
    args = build_parser().parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    image = open_image(args.image_file, args.max_image_pixels)  # before the model loads
    if is_transformers_vlm(args.model_path, args.model_base):
        loaded = load_vlm_from_args(args)
        setting = vlm_spec_from_args(loaded, args)
        engine = VlmChatEngine(loaded, args.max_image_pixels)
    else:
        tokenizer, model, image_processor, _ = load_model_from_args(args)
        apply_pruning_args(model, args)
        engine = ChatEngine(tokenizer, model, image_processor, args.conv_mode, args.max_image_pixels)
        setting = PruningSetting.of_config(model.config)
    history, replies, refused = [], [], []
    while True:
        stdout.write("USER: ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            stdout.write("\n")
            break
        stdout.write("ASSISTANT: ")
        shown = ""
        try:
            for item in engine.stream(image, history, line.strip(), setting, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature):
                if isinstance(item, str):
                    stdout.write(item[len(shown):])
                    shown = item
                    stdout.flush()
                else:
                    replies.append(item)
        except InputError as error:  # e.g. the conversation outgrew the context: say so, keep chatting
            stdout.write(f"\n[error: {error}]\n")
            refused.append(str(error))
            continue
        reply = replies[-1]
        history = reply.history
        stdout.write(f"\n[{reply.metrics.prefill_line()}]\n[{reply.metrics.answer_line()}]\n")
        stdout.flush()
    if refused and not replies:  # a script piping questions in must see that nothing was answered
        raise InputError(f"no question was answered ({len(refused)} refused; the first: {refused[0]})")
    return replies


if __name__ == "__main__":
    run_command(main)
