# Sourced by the fine-tune scripts (scripts/*/finetune_adsc_lora.sh), after their variables:
# the launcher (LAUNCHER auto: deepspeed with GPUs, else python), the devices, the gradient
# accumulation that makes GLOBAL_BATCH from PER_DEVICE_BATCH, the precision and data workers;
# then `launch_training ARGS...` runs `llava.train.train` with ARGS and EXTRA_ARGS.
GPUS_VISIBLE="$(python -c 'import torch; print(torch.cuda.device_count())')"
NUM_GPUS="${NUM_GPUS:-$GPUS_VISIBLE}"
if [ "$LAUNCHER" = "auto" ]; then
  if [ "$NUM_GPUS" -gt 0 ]; then LAUNCHER=deepspeed; else LAUNCHER=python; fi
fi
DEVICES=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
if (( GLOBAL_BATCH % (PER_DEVICE_BATCH * DEVICES) != 0 )); then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x $DEVICES device(s)" >&2
  exit 2
fi
GRAD_ACCUM=$(( GLOBAL_BATCH / (PER_DEVICE_BATCH * DEVICES) ))

if [ "$NUM_GPUS" -gt 0 ]; then
  PRECISION=(--bf16 True --tf32 True)
  NUM_WORKERS="${NUM_WORKERS:-4}"
else
  PRECISION=(--bf16 False --use_cpu True)
  NUM_WORKERS="${NUM_WORKERS:-0}"
fi

launch_training() {
  # shellcheck disable=SC2206
  local extra=(${EXTRA_ARGS:-})
  if [ "$LAUNCHER" = "deepspeed" ]; then
    exec deepspeed --num_gpus "$NUM_GPUS" --module llava.train.train "$@" "${extra[@]}"
  else
    exec python -m llava.train.train "$@" "${extra[@]}"
  fi
}
