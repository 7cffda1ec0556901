"""Write a tiny random LLaVA checkpoint, entirely offline.

    python -m llava.tools.make_tiny_checkpoint --out DIR [--format llava|hf] [--seed N] [--layers N]

``--format llava`` mirrors a released LLaVA-1.5 folder: ``config.json`` with the ``mm_*``
fields, ``model.safetensors`` without vision-tower weights, a sentencepiece
``tokenizer.model`` + ``tokenizer_config.json`` (no ``tokenizer.json``), and the CLIP tower
(weights, config, image processor) in ``DIR/vision_tower``, which ``mm_vision_tower`` names
relative to the checkpoint.

``--format hf`` writes transformers' ``LlavaForConditionalGeneration`` layout (llava-hf):
``<image>`` is a real token expanded to one per patch, processor files included.

Both share the same random weights for the same seed: the tokenizer is the same
sentencepiece model, and the hf checkpoint holds the llava one's weights (plus rows for the
``<image>`` and ``<pad>`` tokens), so the two formats give the same logits.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tempfile
from typing import Sequence

import torch

logger = logging.getLogger(__name__)

# Text the tiny tokenizer is trained on: templates, benchmark prompts and playground words.
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is shown in the image? ASSISTANT: A cat sitting on a mat.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Is there a dog in the image? Please answer yes or no. Yes No",
    "Describe the grid. What digit is in row 1, column 2? How many times does the digit 7 appear?",
    "Is there a 5 in the image? In which row is the digit 3? _ ; 0 1 2 3 4 5 6 7 8 9",
    "Reference OCR token: STOP, Main Street. Context: The quick brown fox jumps over the lazy dog.",
    "A. red B. green C. blue D. yellow The answer is A.",
]


def train_tiny_tokenizer(out_dir: str, vocab_size: int = 512, extra_text: Sequence[str] = (),
                         split_digits: bool = True) -> int:
    """Train a Llama-style sentencepiece BPE model into ``out_dir/tokenizer.model``.

    Same settings as Llama's tokenizer (byte fallback, split digits, dummy prefix, ids
    unk=0, bos=1, eos=2), deterministic. ``extra_text`` joins the built-in corpus;
    ``split_digits=False`` lets " 7" become one token. Writes ``tokenizer_config.json`` as
    LLaVA-1.5 ships it. Returns the vocabulary size.
    """
    import sentencepiece as spm

    corpus = "\n".join((_CORPUS + list(extra_text)) * 20)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=split_digits,
        character_coverage=1.0,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "right",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return vocab_size


def _tiny_clip_config(image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def _tiny_image_processor(image_size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def _llava_model(out_dir: str, seed: int, layers: int, hidden_size: int, image_size: int, patch_size: int,
                 vocab_size: int, projector: str):
    """Build and save the llava-format checkpoint; returns the in-memory model."""
    from transformers import CLIPVisionModel

    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    torch.manual_seed(seed)
    tower_dir = os.path.join(out_dir, "vision_tower")
    vision = CLIPVisionModel(_tiny_clip_config(image_size, patch_size))
    vision.save_pretrained(tower_dir)
    _tiny_image_processor(image_size).save_pretrained(tower_dir)

    heads = max(2, hidden_size // 16)
    config = LlavaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        mm_vision_tower=tower_dir,
        mm_hidden_size=vision.config.hidden_size,
        mm_projector_type=projector,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
        architectures=["LlavaLlamaForCausalLM"],
    )
    model = LlavaLlamaForCausalLM(config)
    model.model.vision_tower.vision_tower.load_state_dict(vision.state_dict())
    model.config.mm_vision_tower = "vision_tower"  # relative to the checkpoint, like a moved folder
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    model.save_pretrained(out_dir, state_dict=state)
    return model


def _hf_model(out_dir: str, llava_model, tokenizer_dir: str, image_size: int, patch_size: int):
    """Write the llava-hf layout with ``llava_model``'s weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers import LlavaConfig as HFLlavaConfig

    cfg = llava_model.config
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_size = cfg.vocab_size + 64  # room for <image> and <pad>, padded like llava-hf's 32064
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    tower = llava_model.get_vision_tower()
    config = HFLlavaConfig(
        text_config=text_config.to_dict(),
        vision_config=tower.config.to_dict(),
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=tower.num_patches,
        pad_token_id=tokenizer.pad_token_id,
    )
    hf = LlavaForConditionalGeneration(config)
    ours = llava_model.state_dict()
    with torch.no_grad():
        lm = hf.model.language_model
        for name, param in lm.named_parameters():
            src = ours[f"model.{name}"]
            if name == "embed_tokens.weight":
                param.zero_()
                param[: src.shape[0]] = src
            else:
                param.copy_(src)
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[: cfg.vocab_size] = ours["lm_head.weight"]
        hf.model.vision_tower.load_state_dict(tower.vision_tower.state_dict())
        proj = hf.model.multi_modal_projector
        proj.linear_1.weight.copy_(ours["model.mm_projector.0.weight"])
        proj.linear_1.bias.copy_(ours["model.mm_projector.0.bias"])
        proj.linear_2.weight.copy_(ours["model.mm_projector.2.weight"])
        proj.linear_2.bias.copy_(ours["model.mm_projector.2.bias"])
    hf.save_pretrained(out_dir)
    processor = LlavaProcessor(
        image_processor=_tiny_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template="{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}ASSISTANT:",
    )
    processor.save_pretrained(out_dir)


def make_tiny_checkpoint(
    out: str,
    format: str = "llava",
    seed: int = 0,
    layers: int = 4,
    hidden_size: int = 64,
    image_size: int = 48,
    patch_size: int = 8,
    projector: str = "mlp2x_gelu",
) -> str:
    """Write a tiny random checkpoint to ``out`` and return ``out``.

    Defaults: 4-layer 64-wide Llama, 512-token sentencepiece vocabulary, 2-layer CLIP at
    48 px with 8 px patches (6 x 6 = 36 vision tokens), ``mlp2x_gelu`` projector.
    """
    if format not in ("llava", "hf"):
        raise ValueError(f"format must be 'llava' or 'hf', got {format!r}")
    if format == "hf" and projector != "mlp2x_gelu":
        raise ValueError("the hf format only has the mlp2x_gelu projector")
    os.makedirs(out, exist_ok=True)
    if format == "llava":
        vocab = train_tiny_tokenizer(out)
        _llava_model(out, seed, layers, hidden_size, image_size, patch_size, vocab, projector)
        return out
    with tempfile.TemporaryDirectory() as scratch:
        vocab = train_tiny_tokenizer(scratch)
        model = _llava_model(scratch, seed, layers, hidden_size, image_size, patch_size, vocab, projector)
        _hf_model(out, model, scratch, image_size, patch_size)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--format", default="llava", choices=["llava", "hf"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the language model")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--projector", default="mlp2x_gelu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} exists and is not empty")
    path = make_tiny_checkpoint(
        args.out, args.format, args.seed, args.layers, args.hidden_size, args.image_size, args.patch_size, args.projector
    )
    logger.info("wrote a tiny %s checkpoint to %s", args.format, path)


if __name__ == "__main__":
    main()
