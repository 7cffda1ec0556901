#!/usr/bin/env bash
# The GPU measurement of docs/efficiency.md in one short run (under 10 minutes on one H100/H200):
# the real LLaVA-1.5-7B shape with random weights, bf16, sdpa (and flash_attention_2 when the
# flash-attn package is installed), batch 1 and 16, full and every in-decoder method at 192 / 128
# / 64, plus one LoRA training step per setting. Writes $OUT (default bench-gpu/): bench.json,
# bench.md, bench.png, and nvidia-smi's view of the device.
#
#   bash scripts/bench_gpu.sh                 # then copy bench-gpu/bench.md into docs/efficiency.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-gpu}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" || true
ATTENTION=sdpa
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then ATTENTION=sdpa,flash_attention_2; fi
HF_HUB_OFFLINE=1 "$PYTHON" -m llava.bench --shape llava-1.5-7b --device cuda --dtype bf16 \
  --methods "${METHODS:-adsc,fastv,pdrop,tome,visionzip,pool}" --budgets 192,128,64 --batches 1,16 \
  --attention "$ATTENTION" --new-tokens 32 --repeats 5 --train-step --out "$OUT"
