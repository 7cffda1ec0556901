# Sourced by the benchmark scripts in this folder (upstream's playground/data/eval layout).
#
# Environment (all optional):
#   MODEL_PATH   checkpoint to evaluate                    liuhaotian/llava-v1.5-7b
#   MODEL_BASE   base model for LoRA / projector outputs  (unset)
#   CKPT         name of the answers folder               basename of MODEL_PATH (+ -budgetN / -ratioR)
#   EVAL_DIR     benchmark data root                      ./playground/data/eval
#   CONV_MODE    conversation template                    vicuna_v1 (none for Qwen2.5-VL, Qwen3-VL,
#                LLaVA-NeXT, LLaVA-OneVision checkpoints: their own chat template)
#   BATCH_SIZE   prompts per generate call                8 with CUDA, 4 on the CPU
#   PRUNE_METHOD, PRUNE_LAYERS, VISION_TOKEN_BUDGET or BUDGET_FRACTION or DROP_RATIO, PRUNE_SELECTION,
#   NO_PRUNING=1
#                pruning at evaluation (default: the checkpoint's own schedule; docs/methods.md)
#   EXTRA_ARGS   appended to every inference command
#   OVERWRITE=1  start the answer files afresh (--overwrite) instead of resuming them
#   CUDA_VISIBLE_DEVICES   one chunk per listed GPU
#   CHUNKS       without a GPU: CPU processes, each on a contiguous chunk     1
set -euo pipefail

# The project's environment when none is active (bash scripts/quickstart.sh or scripts/test.sh made it).
_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$_ROOT/.venv/bin/python" ]; then
  export PATH="$_ROOT/.venv/bin:$PATH"
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
fi
if ! python -c 'import torch, llava' >/dev/null 2>&1; then
  echo "error: no Python environment with this project here: run 'bash scripts/quickstart.sh' (it makes .venv) or activate yours" >&2
  exit 2
fi

MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
EVAL_DIR="${EVAL_DIR:-./playground/data/eval}"
# transformers' own VLMs are prompted with their chat template; LLaVA-1.5 with upstream's vicuna_v1
IS_TRANSFORMERS_VLM="$(python -c 'import sys; from llava.model.vlm import is_transformers_vlm
print(int(is_transformers_vlm(sys.argv[1], sys.argv[2] or None)))' "$MODEL_PATH" "${MODEL_BASE:-}" 2>/dev/null || echo 0)"
# (a path that does not resolve is reported by the inference command below, in one line)
if [ "$IS_TRANSFORMERS_VLM" = 1 ]; then CONV_MODE="${CONV_MODE:-}"; else CONV_MODE="${CONV_MODE:-vicuna_v1}"; fi
SUFFIX=""
[ -n "${VISION_TOKEN_BUDGET:-}" ] && SUFFIX="-budget${VISION_TOKEN_BUDGET}"
[ -n "${BUDGET_FRACTION:-}" ] && SUFFIX="-fraction${BUDGET_FRACTION}"
[ -n "${DROP_RATIO:-}" ] && SUFFIX="-ratio${DROP_RATIO}"
[ -n "${NO_PRUNING:-}" ] && SUFFIX="-full"
[ -n "${PRUNE_METHOD:-}" ] && [ -z "${NO_PRUNING:-}" ] && SUFFIX="-${PRUNE_METHOD}${SUFFIX}"
CKPT="${CKPT:-$(basename "${MODEL_PATH%/}")${SUFFIX}}"

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=',' read -ra GPULIST <<< "$CUDA_VISIBLE_DEVICES"
else
  n_gpus="$(python -c 'import torch; print(torch.cuda.device_count())')"
  GPULIST=()
  for ((i = 0; i < n_gpus; i++)); do GPULIST+=("$i"); done
fi
if [ "${#GPULIST[@]}" -gt 0 ]; then
  CHUNKS=${#GPULIST[@]}
  BATCH_SIZE="${BATCH_SIZE:-8}"
else
  CHUNKS="${CHUNKS:-1}"
  BATCH_SIZE="${BATCH_SIZE:-4}"
fi

COMMON_ARGS=(--model-path "$MODEL_PATH" --temperature 0 --batch-size "$BATCH_SIZE")
[ -n "$CONV_MODE" ] && COMMON_ARGS+=(--conv-mode "$CONV_MODE")
[ -n "${MODEL_BASE:-}" ] && COMMON_ARGS+=(--model-base "$MODEL_BASE")
[ -n "${PRUNE_LAYERS:-}" ] && COMMON_ARGS+=(--prune-layers "$PRUNE_LAYERS")
[ -n "${VISION_TOKEN_BUDGET:-}" ] && COMMON_ARGS+=(--vision-token-budget "$VISION_TOKEN_BUDGET")
[ -n "${DROP_RATIO:-}" ] && COMMON_ARGS+=(--drop-ratio "$DROP_RATIO")
[ -n "${BUDGET_FRACTION:-}" ] && COMMON_ARGS+=(--budget-fraction "$BUDGET_FRACTION")
[ -n "${PRUNE_SELECTION:-}" ] && COMMON_ARGS+=(--prune-selection "$PRUNE_SELECTION")
[ -n "${PRUNE_METHOD:-}" ] && COMMON_ARGS+=(--prune-method "$PRUNE_METHOD")
[ -n "${NO_PRUNING:-}" ] && COMMON_ARGS+=(--no-pruning)
[ -n "${OVERWRITE:-}" ] && COMMON_ARGS+=(--overwrite)
# shellcheck disable=SC2206
COMMON_ARGS+=(${EXTRA_ARGS:-})

# run_chunks MODULE ANSWER_DIR [inference args...]
# Runs one chunk per GPU (or one on the CPU), stops on any failure, and merges the chunks
# into ANSWER_DIR/merge.jsonl (with the first chunk's settings beside it).
run_chunks() {
  local module="$1" answer_dir="$2"
  shift 2
  mkdir -p "$answer_dir"
  local pids=() idx
  for ((idx = 0; idx < CHUNKS; idx++)); do
    local device_args=(--device cpu)
    local env_gpu=()
    if [ "${#GPULIST[@]}" -gt 0 ]; then
      device_args=(--device cuda)
      env_gpu=(env "CUDA_VISIBLE_DEVICES=${GPULIST[$idx]}")
    fi
    "${env_gpu[@]}" python -m "$module" "$@" "${COMMON_ARGS[@]}" "${device_args[@]}" \
      --answers-file "$answer_dir/${CHUNKS}_${idx}.jsonl" --num-chunks "$CHUNKS" --chunk-idx "$idx" &
    pids+=($!)
  done
  local failed=0 refused=0 pid code
  for pid in "${pids[@]}"; do
    code=0
    wait "$pid" || code=$?
    [ "$code" -eq 2 ] && refused=1
    [ "$code" -ne 0 ] && failed=1
  done
  if [ "$refused" -ne 0 ]; then  # bad input or other settings: a rerun as it is cannot help
    echo "inference refused its input (the error above); in these scripts --overwrite is OVERWRITE=1 and other flags go in EXTRA_ARGS" >&2
    exit 2
  fi
  if [ "$failed" -ne 0 ]; then
    echo "inference failed; rerun to resume the unfinished chunks" >&2
    exit 1
  fi
  local merged="$answer_dir/merge.jsonl"
  : > "$merged.tmp"
  for ((idx = 0; idx < CHUNKS; idx++)); do cat "$answer_dir/${CHUNKS}_${idx}.jsonl" >> "$merged.tmp"; done
  mv "$merged.tmp" "$merged"
  cp "$answer_dir/${CHUNKS}_0.jsonl.settings.json" "$merged.settings.json"
  echo "answers: $merged"
}
