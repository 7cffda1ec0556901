"""One-shot inference: ``python -m llava.eval.run_llava --model-path P --image-file F --query Q``.

Upstream's flags (and upstream's ``eval_model(args)``), plus the pruning, quantisation and
``--vision-tower`` flags; prints the answer (and, with pruning, how many vision tokens each
layer kept). Bad input ends in one line ``error: ...`` (exit code 2; ``--debug`` for the
traceback).
"""

from __future__ import annotations

import argparse
import logging

import torch

from llava.cli import InputError, add_debug_arg, run_command
from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from llava.conversation import get_conv_template
from llava.eval.inference import add_model_args, generation_kwargs, load_model_from_args, load_vlm_from_args
from llava.eval.pruning_args import add_pruning_args, apply_pruning_args, vlm_spec_from_args
from llava.model.vlm import chat_messages, encode_prompts, generate_replies, is_transformers_vlm
from llava.mm_utils import (context_length, fit_new_tokens, load_image, process_images, prompt_length_with_images,
                            tokenizer_image_token)


def build_prompt(query: str, conv_mode: str, use_im_start_end: bool, with_image: bool = True) -> str:
    """The chat prompt for ``query``; an image marker goes first unless the query places it."""
    image_token = DEFAULT_IMAGE_TOKEN
    if use_im_start_end:
        image_token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    if IMAGE_PLACEHOLDER in query:
        query = query.replace(IMAGE_PLACEHOLDER, image_token)
    elif with_image and DEFAULT_IMAGE_TOKEN not in query:
        query = image_token + "\n" + query
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], query)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    parser.add_argument("--image-file", required=True, help="one image, or several joined by --sep")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's conv_mode, else vicuna_v1")
    parser.add_argument("--sep", default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    add_pruning_args(parser)
    add_debug_arg(parser)
    return parser


def eval_model(args) -> str:
    """Upstream's entry: ``args`` is any object with upstream's attributes (``model_path``,
    ``model_base``, ``query``, ``conv_mode``, ``image_file``, ``sep``, ``temperature``,
    ``top_p``, ``num_beams``, ``max_new_tokens``; ``model_name`` is accepted and unused);
    the flags it lacks take their command-line defaults. Prints and returns the answer."""
    defaults = build_parser().parse_args(["--model-path", "", "--image-file", "", "--query", ""])
    given = {name: getattr(args, name) for name in vars(defaults) if hasattr(args, name)}
    return run(argparse.Namespace(**{**vars(defaults), **given}))


def run(args: argparse.Namespace) -> str:
    """Answer ``args.query`` about ``args.image_file``; prints and returns the answer."""
    if not args.query.strip():
        raise InputError("--query is empty: ask a question")
    images = [load_image(path) for path in args.image_file.split(args.sep)]
    if is_transformers_vlm(args.model_path, args.model_base):
        return _run_vlm(args, images)
    tokenizer, model, image_processor, _ = load_model_from_args(args)
    apply_pruning_args(model, args)
    conv_mode = args.conv_mode or model.config.conv_mode or "vicuna_v1"
    prompt = build_prompt(args.query, conv_mode, model.config.mm_use_im_start_end)
    markers = prompt.count(DEFAULT_IMAGE_TOKEN)
    if markers != len(images):
        raise InputError(f"the query places {markers} image(s) ({IMAGE_PLACEHOLDER} or {DEFAULT_IMAGE_TOKEN}) "
                         f"but --image-file gives {len(images)}")
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None].to(model.device)
    pixels = process_images(images, image_processor, model.config).to(model.device, model.dtype)
    generation = generation_kwargs(args, tokenizer.pad_token_id)
    length = prompt_length_with_images(input_ids, None, model.get_vision_tower().num_patches)
    generation["max_new_tokens"] = fit_new_tokens(length, args.max_new_tokens, context_length(model.config),
                                                  "shorten --query")
    with torch.inference_mode():
        output_ids = model.generate(input_ids, images=pixels, **generation)
    answer = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    print(answer)
    trace = model.pruning_trace
    if trace is not None and model.config.prune_layers:
        kept = [len(stage[0]) for stage in trace.kept_vision_positions]
        print(f"[vision tokens entering each stage: {kept}; tokens per layer: {trace.tokens_per_layer[0].tolist()}]")
    return answer


def _run_vlm(args: argparse.Namespace, images) -> str:
    """``run`` for a transformers VLM: its own chat template and processor, the spec per call."""
    loaded = load_vlm_from_args(args)
    spec = vlm_spec_from_args(loaded, args)
    query = args.query.replace(IMAGE_PLACEHOLDER, DEFAULT_IMAGE_TOKEN)
    inputs = encode_prompts(loaded, [chat_messages([(query, None)], [len(images)])], [images])
    generation = generation_kwargs(args, loaded.tokenizer.pad_token_id)
    generation["max_new_tokens"] = fit_new_tokens(int(inputs["input_ids"].shape[1]), args.max_new_tokens,
                                                  loaded.context_length, "shorten --query")
    reply = generate_replies(loaded, inputs, spec, **generation)
    answer = reply.texts[0]
    print(answer)
    if reply.trace is not None:
        for index, image in enumerate(reply.trace.tokens_per_image_per_layer(loaded.num_layers)[0]):
            print(f"[image {index + 1}: vision tokens per layer {list(image)}]")
    return answer


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    run_command(main)
