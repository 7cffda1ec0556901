#!/usr/bin/env bash
# ADSC fine-tune of LLaVA-1.5-7B: LoRA on the language model + trainable projector, reverse
# curriculum over the vision-token budget (paper, section III-C). Every path and size is an
# environment variable; the defaults are the 7B recipe (LLaVA-1.5 LoRA hyper-parameters:
# lr 2e-4, r 128, alpha 256, projector lr 2e-5, global batch 128, 1 epoch, max length 2048,
# ZeRO-3) at a budget of 192 of 576 vision tokens.
#
#   MODEL_PATH        LLaVA checkpoint to start from          liuhaotian/llava-v1.5-7b
#   VISION_TOWER      CLIP tower (default: the checkpoint's)  (unset)
#   DATA_PATH         LLaVA JSON                              ./playground/data/llava_v1_5_mix665k.json
#   IMAGE_FOLDER      root of the image paths in DATA_PATH    ./playground/data
#   OUTPUT_DIR        where adapter, projector, config go     ./checkpoints/llava-v1.5-7b-adsc-lora-$BUDGET
#   BUDGET            target average vision tokens per layer  192
#   DROP_RATIO        give a ratio instead of BUDGET          (unset)
#   PRUNE_METHOD      adsc | fastv | pdrop | tome | visionzip | pool, or a variant (docs/methods.md)  adsc
#   PRUNE_LAYERS      0-based decoder layers                  2,6,12,20 (fastv: 2; tome, visionzip, pool: none)
#   SELECTION         uniform_2d | uniform_1d | random (adsc) uniform_2d
#   CURRICULUM        reverse | standard | direct             reverse
#   CURRICULUM_FACTORS, PHASE_FRACTIONS  e.g. 0.8,0.9,1.0 and 0.5,0.25,0.25  (defaults per curriculum, equal thirds)
#   FINETUNE_MODE     lora | full                             lora
#   LORA_R LORA_ALPHA LORA_DROPOUT LR MM_PROJECTOR_LR         128 256 0.05 2e-4 2e-5
#   GLOBAL_BATCH PER_DEVICE_BATCH                             128 16  (accumulation = global / (per device x GPUs))
#   EPOCHS MAX_STEPS MAX_LENGTH WARMUP_RATIO                  1 -1 2048 0.03
#   SAVE_STEPS SAVE_TOTAL_LIMIT LOGGING_STEPS REPORT_TO SEED  50000 1 1 none 42
#   DEEPSPEED         ZeRO config (GPU runs)                  ./scripts/zero3.json (zero2.json with BITS 4/8)
#   BITS              4 | 8: QLoRA on a quantised LM          16 (no quantisation)
#   ATTN_IMPLEMENTATION  eager | sdpa | flash_attention_2     sdpa
#   SAVE_EVERY_MINUTES  a checkpoint this often as well (0: off)  30
#   SKIP_BAD_SAMPLES  True: drop unusable samples, logged     False (stop, naming them)
#   NUM_GPUS          GPUs to use (default: all visible)
#   LAUNCHER          auto | deepspeed | python               auto: deepspeed with GPUs, python without
#   NUM_WORKERS GRADIENT_CHECKPOINTING VERSION                4 True v1
#   EXTRA_ARGS        appended verbatim to the training command
#
# Without CUDA the same script trains on the CPU in fp32 with plain python (no DeepSpeed).
# CI does that on a tiny checkpoint (8 layers, 36 vision tokens) and data set, as written here:
#   python -m llava.tools.make_tiny_checkpoint --out tiny --layers 8
#   python -m llava.tools.make_tiny_dataset --out data
#   MODEL_PATH=tiny DATA_PATH=data/data.json IMAGE_FOLDER=data OUTPUT_DIR=out BUDGET=12 PRUNE_LAYERS=1,3 \
#   GLOBAL_BATCH=4 PER_DEVICE_BATCH=4 MAX_STEPS=12 LR=2e-3 MM_PROJECTOR_LR=2e-3 LORA_R=8 LORA_ALPHA=16 \
#   bash scripts/v1_5/finetune_adsc_lora.sh
set -euo pipefail

MODEL_PATH="${MODEL_PATH:-liuhaotian/llava-v1.5-7b}"
DATA_PATH="${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data}"
BUDGET="${BUDGET:-192}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-adsc-lora-${BUDGET}}"
PRUNE_METHOD="${PRUNE_METHOD:-adsc}"
case "$PRUNE_METHOD" in
  fastv) DEFAULT_LAYERS=2 ;;
  tome|visionzip|visionzip_spread|pool) DEFAULT_LAYERS= ;;
  *) DEFAULT_LAYERS=2,6,12,20 ;;
esac
PRUNE_LAYERS="${PRUNE_LAYERS-$DEFAULT_LAYERS}"
SELECTION="${SELECTION:-uniform_2d}"
CURRICULUM="${CURRICULUM:-reverse}"
FINETUNE_MODE="${FINETUNE_MODE:-lora}"
LORA_R="${LORA_R:-128}"
LORA_ALPHA="${LORA_ALPHA:-256}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
LR="${LR:-2e-4}"
MM_PROJECTOR_LR="${MM_PROJECTOR_LR:-2e-5}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-16}"
EPOCHS="${EPOCHS:-1}"
MAX_STEPS="${MAX_STEPS:--1}"
MAX_LENGTH="${MAX_LENGTH:-2048}"
WARMUP_RATIO="${WARMUP_RATIO:-0.03}"
SAVE_STEPS="${SAVE_STEPS:-50000}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"
LOGGING_STEPS="${LOGGING_STEPS:-1}"
REPORT_TO="${REPORT_TO:-none}"
SEED="${SEED:-42}"
BITS="${BITS:-16}"
if [ "$BITS" = "4" ] || [ "$BITS" = "8" ]; then
  DEEPSPEED="${DEEPSPEED:-./scripts/zero2.json}"  # bitsandbytes layers cannot be ZeRO-3 partitioned
else
  DEEPSPEED="${DEEPSPEED:-./scripts/zero3.json}"
fi
SAVE_EVERY_MINUTES="${SAVE_EVERY_MINUTES:-30}"
SKIP_BAD_SAMPLES="${SKIP_BAD_SAMPLES:-False}"
VERSION="${VERSION:-v1}"
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-True}"
LAUNCHER="${LAUNCHER:-auto}"

. "$(dirname "${BASH_SOURCE[0]}")/../_finetune_launch.sh"

TARGET=(--vision_token_budget "$BUDGET")
[ -n "${DROP_RATIO:-}" ] && TARGET=(--drop_ratio "$DROP_RATIO")
OPTIONAL=()
[ -n "${VISION_TOWER:-}" ] && OPTIONAL+=(--vision_tower "$VISION_TOWER")
[ -n "${CURRICULUM_FACTORS:-}" ] && OPTIONAL+=(--curriculum_factors "$CURRICULUM_FACTORS")
[ -n "${PHASE_FRACTIONS:-}" ] && OPTIONAL+=(--curriculum_phase_fractions "$PHASE_FRACTIONS")
[ "$LAUNCHER" = "deepspeed" ] && OPTIONAL+=(--deepspeed "$DEEPSPEED")
[ -n "${ATTN_IMPLEMENTATION:-}" ] && OPTIONAL+=(--attn_implementation "$ATTN_IMPLEMENTATION")

ARGS=(
  --model_name_or_path "$MODEL_PATH"
  --version "$VERSION"
  --data_path "$DATA_PATH"
  --image_folder "$IMAGE_FOLDER"
  --image_aspect_ratio pad
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
  --lazy_preprocess True
  --report_to "$REPORT_TO"
  --seed "$SEED"
  "${PRECISION[@]}"
  "${OPTIONAL[@]}"
)

echo "[finetune_adsc_lora] launcher=$LAUNCHER gpus=$NUM_GPUS accumulation=$GRAD_ACCUM output=$OUTPUT_DIR"
launch_training "${ARGS[@]}"
