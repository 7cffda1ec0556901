#!/usr/bin/env bash
# ADSC fine-tune of Qwen3-VL-8B-Instruct: the Qwen2.5-VL recipe (scripts/qwen2_5_vl/
# finetune_adsc_lora.sh, which documents every variable) with this model's defaults. LoRA on the
# text decoder; the merger and the DeepStack mergers (model.visual.deepstack_merger_list.*) are
# trained in full; prune layers default to ADSC's for 36 layers (2,7,14,22). Tested on a tiny
# random Qwen3-VL (tests/llava/test_train_vlm.py).
set -euo pipefail
export MODEL_PATH="${MODEL_PATH:-Qwen/Qwen3-VL-8B-Instruct}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/../qwen2_5_vl/finetune_adsc_lora.sh"
