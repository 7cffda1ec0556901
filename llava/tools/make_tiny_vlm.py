"""Write a tiny random checkpoint of transformers' own Qwen2.5-VL, entirely offline.

    python -m llava.tools.make_tiny_vlm --out DIR [--seed N] [--layers N]

The folder is laid out as a released ``Qwen/Qwen2.5-VL-*-Instruct`` one is: ``config.json``
(``model_type: qwen2_5_vl``), ``model.safetensors``, a byte-level BPE ``tokenizer.json`` with
Qwen's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|image_pad|>``, ...), ``preprocessor_config.json`` (Qwen2-VL's image processor: 4-pixel
patches, 2 x 2 merge, 8 x 8 to 32 x 32 pixels, so an image is 1 to 16 tokens on its own grid)
and ``chat_template.jinja`` in Qwen's chat format (a system turn first, images as
``<|vision_start|><|image_pad|><|vision_end|>``), written by us.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

import torch

from .make_tiny_checkpoint import _CORPUS

logger = logging.getLogger(__name__)

__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "make_tiny_vlm"]

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")

# Qwen's chat format: a default system turn, "<|im_start|>{role}\n{content}<|im_end|>\n" per
# message, images and videos as their pad token between the vision start and end tokens.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _tokenizer(vocab_size: int, extra_text: Sequence[str] = (), split_digits: bool = True):
    """A byte-level BPE with Qwen's special tokens. ``split_digits=False`` saves it as the generic
    ``PreTrainedTokenizerFast``, so that loading keeps its own pre-tokenizer (which leaves " 7"
    whole) instead of Qwen2Tokenizer's, which isolates every digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((_CORPUS + list(extra_text)) * 20, trainer)
    tokenizer_class = Qwen2TokenizerFast if split_digits else PreTrainedTokenizerFast
    tokenizer = tokenizer_class(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, model_max_length=2048)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def make_tiny_vlm(out: str, seed: int = 0, layers: int = 4, hidden_size: int = 64, vocab_size: int = 400,
                  extra_text: Sequence[str] = (), intermediate_size: int | None = None, heads: int = 4,
                  kv_heads: int | None = None, vision_config: dict | None = None, image_processor=None,
                  split_digits: bool = True) -> str:
    """Write a tiny random Qwen2.5-VL checkpoint (see the module docstring) to ``out``; returns it.
    ``extra_text`` joins the tokenizer's training text. ``intermediate_size`` (default twice the
    width), ``heads`` and ``kv_heads`` (default half the heads) shape the language model; its
    M-RoPE sections split half a head's width as Qwen2.5-VL-7B's do (1/4 time, the rest height
    and width). ``vision_config`` (``Qwen2_5_VLVisionConfig`` arguments) and ``image_processor``
    replace the 1-layer tower and its processor; ``split_digits`` as in ``_tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(vocab_size, extra_text, split_digits)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    half_head = hidden_size // heads // 2
    time_section = half_head // 4
    height_section = (half_head - time_section) // 2
    mrope_section = [time_section, height_section, half_head - time_section - height_section]
    vision = vision_config or dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                   out_hidden_size=hidden_size, patch_size=4, spatial_merge_size=2,
                                   temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[0], window_size=8)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or max(1, heads // 2),
                         max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor = image_processor or Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                                  min_pixels=8 * 8, max_pixels=32 * 32)
    image_processor.processor_class = "Qwen2_5_VLProcessor"
    image_processor.save_pretrained(out)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(QWEN_CHAT_TEMPLATE)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the language model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} exists and is not empty")
    logger.info("wrote a tiny Qwen2.5-VL checkpoint to %s", make_tiny_vlm(args.out, args.seed, args.layers))


if __name__ == "__main__":
    main()
