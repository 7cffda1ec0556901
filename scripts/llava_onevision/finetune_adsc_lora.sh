#!/usr/bin/env bash
# ADSC fine-tune of LLaVA-OneVision-7B (transformers' llava-hf checkpoint): the Qwen2.5-VL
# recipe (scripts/qwen2_5_vl/finetune_adsc_lora.sh, which documents every variable) with this
# model's defaults. LoRA on the Qwen2 text decoder; model.multi_modal_projector trained in full;
# the base view and the crop grid of each image are pruned as two grids at the budget fraction
# (newline tokens never); prune layers default to ADSC's for 28 layers (2,5,10,18).
# The code path is tested in-process on a tiny random LLaVA-OneVision (tests/llava/test_train_vlm.py);
# its processor needs torchvision here to read processor_config.json (num_image_tokens).
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-llava-hf/llava-onevision-qwen2-7b-ov-hf}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../qwen2_5_vl/finetune_adsc_lora.sh"
