#!/usr/bin/env bash
# MME: inference, then perception / cognition scores per subtask.
. "$(dirname "$0")/_common.sh"
ANSWERS="$EVAL_DIR/MME/answers/$CKPT"
run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
  --question-file "$EVAL_DIR/MME/llava_mme.jsonl" --image-folder "$EVAL_DIR/MME/MME_Benchmark_release_version"
python -m llava.eval.eval_mme --gt-dir "$EVAL_DIR/MME/MME_Benchmark_release_version" \
  --result-file "$ANSWERS/merge.jsonl" --output-json "$ANSWERS/scores.json"
