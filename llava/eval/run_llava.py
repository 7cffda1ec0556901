"""One-shot inference: ``python -m llava.eval.run_llava --model-path P --image-file F --query Q``.

Upstream's flags, plus the pruning flags; prints the answer (and, with pruning, how many
vision tokens each layer kept).
"""

from __future__ import annotations

import argparse
import logging

import torch

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from llava.conversation import get_conv_template
from llava.eval.inference import generation_kwargs
from llava.eval.pruning_args import add_pruning_args, apply_pruning_args
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model


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


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-file", required=True, help="one image, or several joined by --sep")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default=None, help="default: the checkpoint's conv_mode, else vicuna_v1")
    parser.add_argument("--sep", default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--device", default=None)
    add_pruning_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, args.model_base, device=args.device)
    apply_pruning_args(model, args)
    images = [load_image(path) for path in args.image_file.split(args.sep)]
    conv_mode = args.conv_mode or model.config.conv_mode or "vicuna_v1"
    prompt = build_prompt(args.query, conv_mode, model.config.mm_use_im_start_end)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None].to(model.device)
    pixels = process_images(images, image_processor, model.config).to(model.device, model.dtype)
    with torch.inference_mode():
        output_ids = model.generate(input_ids, images=pixels, **generation_kwargs(args, tokenizer.pad_token_id))
    answer = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    print(answer)
    trace = model.pruning_trace
    if trace is not None and model.config.prune_layers:
        kept = [len(stage[0]) for stage in trace.kept_vision_positions]
        print(f"[vision tokens entering each stage: {kept}; tokens per layer: {trace.tokens_per_layer[0].tolist()}]")
    return answer


if __name__ == "__main__":
    main()
