#!/usr/bin/env bash
# ADSC fine-tune of Qwen2.5-VL-7B-Instruct (transformers' own checkpoint): LoRA on the text
# decoder + trainable merger (the projector), reverse curriculum over the budget fraction
# (0.8x, 0.9x, 1.0x of the target; paper, section III-C), the same command as LLaVA-1.5's
# recipe (scripts/v1_5/finetune_adsc_lora.sh) with the budget as a fraction of each image's own
# vision tokens (images differ in size; an absolute --vision_token_budget is refused). Every
# path and size is an environment variable; the defaults are LLaVA-1.5's LoRA hyper-parameters
# (lr 2e-4, r 128, alpha 256, projector lr 2e-5, global batch 128, 1 epoch) at a third of the
# tokens. scripts/qwen3_vl/ and scripts/llava_onevision/ run this script with their defaults.
#
#   MODEL_PATH        checkpoint folder or hub id             Qwen/Qwen2.5-VL-7B-Instruct
#   DATA_PATH         LLaVA JSON or the chat format (docs/architectures.md, Fine-tuning)
#                                                             ./playground/data/llava_v1_5_mix665k.json
#   IMAGE_FOLDER      root of the image paths in DATA_PATH    ./playground/data
#   OUTPUT_DIR        adapter, processor, adsc_pruning.json   ./checkpoints/<model>-adsc-lora-$BUDGET_FRACTION
#   BUDGET_FRACTION   target mean vision tokens per layer, as a fraction of each image's   0.333
#   DROP_RATIO        give a ratio instead of BUDGET_FRACTION (unset)
#   PRUNE_METHOD      adsc | fastv | pdrop (in the decoder; the pre-LLM methods are refused)  adsc
#   PRUNE_LAYERS      0-based decoder layers                  (empty: the method's own for the depth:
#                                                             adsc/pdrop 2,5,10,18 of Qwen2.5-VL-7B's 28, fastv 2)
#   SELECTION         uniform_2d | uniform_1d | random (adsc) uniform_2d
#   CURRICULUM        reverse | standard | direct | none      reverse
#   CURRICULUM_FACTORS, PHASE_FRACTIONS  e.g. 0.8,0.9,1.0 and 0.5,0.25,0.25  (defaults per curriculum, equal thirds)
#   FINETUNE_MODE     lora | full                             lora
#   LORA_R LORA_ALPHA LORA_DROPOUT LR MM_PROJECTOR_LR         128 256 0.05 2e-4 2e-5
#   GLOBAL_BATCH PER_DEVICE_BATCH                             128 4  (accumulation = global / (per device x GPUs))
#   EPOCHS MAX_STEPS MAX_LENGTH WARMUP_RATIO                  1 -1 4096 0.03
#   SAVE_STEPS SAVE_TOTAL_LIMIT LOGGING_STEPS REPORT_TO SEED  50000 1 1 none 42
#   DEEPSPEED         ZeRO config (GPU runs)                  ./scripts/zero2.json
#   BITS              4 | 8: QLoRA on a quantised LM          16 (no quantisation)
#   ATTN_IMPLEMENTATION  eager | sdpa | flash_attention_2     sdpa
#   SAVE_EVERY_MINUTES  a checkpoint this often as well (0: off)  30
#   SKIP_BAD_SAMPLES  True: drop unusable samples, logged     False (stop, naming them)
#   NUM_GPUS          GPUs to use (default: all visible)
#   LAUNCHER          auto | deepspeed | python               auto: deepspeed with GPUs, python without
#   NUM_WORKERS GRADIENT_CHECKPOINTING                        4 True
#   EXTRA_ARGS        appended verbatim to the training command
#
# Images go in at the processor's own resolution (its preprocessor_config.json's min/max
# pixels); a sample longer than MAX_LENGTH tokens is refused before training, naming it (or
# dropped with SKIP_BAD_SAMPLES=True). Without CUDA the same script trains on the CPU in fp32
# with plain python (no DeepSpeed); tests/llava/test_train_vlm.py runs it on a tiny random
# Qwen2.5-VL (python -m llava.tools.make_tiny_vlm --out tiny; BUDGET_FRACTION=0.333
# PRUNE_LAYERS=1 with 32 x 32 pictures, 16 tokens each).
#
# Merge the adapter into a complete checkpoint (loads with llava.model.vlm.load_transformers_vlm):
#   python scripts/merge_lora_weights.py --model-path OUT --model-base "$MODEL_PATH" --save-model-path MERGED
set -euo pipefail

MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-7B-Instruct}"
DATA_PATH="${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data}"
BUDGET_FRACTION="${BUDGET_FRACTION:-0.333}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/$(basename "$MODEL_PATH")-adsc-lora-${BUDGET_FRACTION}}"
PRUNE_METHOD="${PRUNE_METHOD:-adsc}"
PRUNE_LAYERS="${PRUNE_LAYERS:-}"
SELECTION="${SELECTION:-uniform_2d}"
CURRICULUM="${CURRICULUM:-reverse}"
FINETUNE_MODE="${FINETUNE_MODE:-lora}"
LORA_R="${LORA_R:-128}"
LORA_ALPHA="${LORA_ALPHA:-256}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
LR="${LR:-2e-4}"
MM_PROJECTOR_LR="${MM_PROJECTOR_LR:-2e-5}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-4}"
EPOCHS="${EPOCHS:-1}"
MAX_STEPS="${MAX_STEPS:--1}"
MAX_LENGTH="${MAX_LENGTH:-4096}"
WARMUP_RATIO="${WARMUP_RATIO:-0.03}"
SAVE_STEPS="${SAVE_STEPS:-50000}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"
LOGGING_STEPS="${LOGGING_STEPS:-1}"
REPORT_TO="${REPORT_TO:-none}"
SEED="${SEED:-42}"
BITS="${BITS:-16}"
DEEPSPEED="${DEEPSPEED:-./scripts/zero2.json}"
SAVE_EVERY_MINUTES="${SAVE_EVERY_MINUTES:-30}"
SKIP_BAD_SAMPLES="${SKIP_BAD_SAMPLES:-False}"
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-True}"
LAUNCHER="${LAUNCHER:-auto}"

. "$(dirname "${BASH_SOURCE[0]}")/../_finetune_launch.sh"

TARGET=(--budget_fraction "$BUDGET_FRACTION")
[ -n "${DROP_RATIO:-}" ] && TARGET=(--drop_ratio "$DROP_RATIO")
[ "$CURRICULUM" = "none" ] && TARGET=()
OPTIONAL=()
[ -n "${CURRICULUM_FACTORS:-}" ] && OPTIONAL+=(--curriculum_factors "$CURRICULUM_FACTORS")
[ -n "${PHASE_FRACTIONS:-}" ] && OPTIONAL+=(--curriculum_phase_fractions "$PHASE_FRACTIONS")
[ "$LAUNCHER" = "deepspeed" ] && OPTIONAL+=(--deepspeed "$DEEPSPEED")
[ -n "${ATTN_IMPLEMENTATION:-}" ] && OPTIONAL+=(--attn_implementation "$ATTN_IMPLEMENTATION")

ARGS=(
  --model_name_or_path "$MODEL_PATH"
  --data_path "$DATA_PATH"
  --image_folder "$IMAGE_FOLDER"
  --group_by_modality_length True
  --finetune_mode "$FINETUNE_MODE"
  --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT"
  --mm_projector_lr "$MM_PROJECTOR_LR"
  --prune_method "$PRUNE_METHOD" --prune_layers "$PRUNE_LAYERS" --prune_selection "$SELECTION"
  --curriculum "$CURRICULUM"
  "${TARGET[@]}"
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$PER_DEVICE_BATCH"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit "$SAVE_TOTAL_LIMIT"
  --save_every_minutes "$SAVE_EVERY_MINUTES"
  --bits "$BITS"
  --skip_bad_samples "$SKIP_BAD_SAMPLES"
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio "$WARMUP_RATIO" --lr_scheduler_type cosine
  --logging_steps "$LOGGING_STEPS"
  --model_max_length "$MAX_LENGTH"
  --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
  --dataloader_num_workers "$NUM_WORKERS"
  --report_to "$REPORT_TO"
  --seed "$SEED"
  "${PRECISION[@]}"
  "${OPTIONAL[@]}"
)

echo "[finetune_adsc_lora] model=$MODEL_PATH launcher=$LAUNCHER gpus=$NUM_GPUS accumulation=$GRAD_ACCUM output=$OUTPUT_DIR"
launch_training "${ARGS[@]}"
