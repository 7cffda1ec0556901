#!/usr/bin/env bash
# The GPU measurement of docs/efficiency.md in one short run (under 10 minutes on one H100/H200):
# the real LLaVA-1.5-7B shape with random weights, bf16, sdpa (and flash_attention_2 when the
# flash-attn package is installed), batch 1 and 16, full and every in-decoder method at 192 / 128
# / 64, plus one LoRA training step per setting; then the real Qwen2.5-VL-7B shape (transformers'
# Qwen2_5_VLForConditionalGeneration, random weights, bf16, sdpa) with one 1024x768 image (999
# vision tokens), batch 1 and 8, full and adsc / fastv / pdrop at budget fractions 0.5 / 0.333 /
# 0.111: time to first token, the tower's share, and the KV cache after the prefill measured beside
# adsc_patch.profile's prediction. Writes $OUT (default bench-gpu/): bench.json, bench.md,
# bench.png, and nvidia-smi's view of the device; the Qwen run under $OUT/qwen2.5-vl-7b/.
#
#   bash scripts/bench_gpu.sh                 # both; then copy bench-gpu/bench.md into docs/efficiency.md
#   bash scripts/bench_gpu.sh qwen2.5-vl-7b   # only the Qwen2.5-VL run (llava-1.5-7b: only LLaVA's)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-gpu}"
PYTHON="${PYTHON:-python}"
WHICH="${1:-all}"
case "$WHICH" in all|llava-1.5-7b|qwen2.5-vl-7b) ;; *) echo "usage: $0 [all|llava-1.5-7b|qwen2.5-vl-7b]" >&2; exit 2;; esac
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" || true
if [ "$WHICH" != qwen2.5-vl-7b ]; then
  ATTENTION=sdpa
  if "$PYTHON" -c "import flash_attn" 2>/dev/null; then ATTENTION=sdpa,flash_attention_2; fi
  HF_HUB_OFFLINE=1 "$PYTHON" -m llava.bench --shape llava-1.5-7b --device cuda --dtype bf16 \
    --methods "${METHODS:-adsc,fastv,pdrop,tome,visionzip,pool}" --budgets 192,128,64 --batches 1,16 \
    --attention "$ATTENTION" --new-tokens 32 --repeats 5 --train-step --out "$OUT"
fi
if [ "$WHICH" != llava-1.5-7b ]; then
  HF_HUB_OFFLINE=1 "$PYTHON" -m llava.bench --shape qwen2.5-vl-7b --device cuda --dtype bf16 \
    --methods adsc,fastv,pdrop --budget-fractions 0.5,0.333,0.111 --image-size 1024x768 --batches 1,8 \
    --attention sdpa --new-tokens 32 --repeats 5 --out "$OUT/qwen2.5-vl-7b"
fi
