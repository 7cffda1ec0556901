"""The playground's LLaVA before training: a small Llama, a fresh projector, the trained tower."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import CLIPVisionConfig

from llava.model import LlavaConfig, LlavaLlamaForCausalLM
from llava.tools.make_tiny_checkpoint import train_tiny_tokenizer

from .digitgrid import random_grid


def build_initial_checkpoint(out: str, tower_dir: str, layers: int = 12, hidden_size: int = 128,
                             intermediate_size: int = 256, seed: int = 0) -> str:
    """Write a LLaVA-1.5-layout checkpoint with random language model and projector.

    The tokenizer is a sentencepiece BPE like Llama's, except that digits are not split off:
    " 7", " _" and " ;" are single tokens, so a transcription is one token per cell and the
    position of cell k in the answer is fixed (with split digits a cell takes one or two
    tokens and the model must count; it learned several times slower here). The tower is
    referenced relative to the checkpoint, like a released LLaVA whose ``mm_vision_tower``
    names the CLIP model.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    transcriptions = [random_grid(rng, "train").transcription() for _ in range(50)]
    vocab = train_tiny_tokenizer(out, extra_text=transcriptions, split_digits=False)
    tower = CLIPVisionConfig.from_pretrained(tower_dir)
    heads = max(2, hidden_size // 32)
    config = LlavaConfig(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=os.path.abspath(tower_dir), mm_hidden_size=tower.hidden_size,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="pad", tokenizer_model_max_length=512, tokenizer_padding_side="right",
        conv_mode="vicuna_v1",
    )
    model = LlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_pretrained_weights()
    model.config.mm_vision_tower = os.path.relpath(os.path.abspath(tower_dir), os.path.abspath(out))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    model.save_pretrained(out, state_dict=state)
    return out
