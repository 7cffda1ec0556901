#!/usr/bin/env bash
# ScienceQA test: inference with the single-prediction prompt, then overall and IMG accuracy.
. "$(dirname "$0")/_common.sh"
ANSWERS="$EVAL_DIR/scienceqa/answers/$CKPT"
run_chunks llava.eval.model_vqa_science "$ANSWERS" \
  --question-file "$EVAL_DIR/scienceqa/llava_test_CQM-A.json" --image-folder "$EVAL_DIR/scienceqa/images/test" \
  --single-pred-prompt
python -m llava.eval.eval_science_qa --base-dir "$EVAL_DIR/scienceqa" --result-file "$ANSWERS/merge.jsonl" \
  --output-file "$ANSWERS/output.jsonl" --output-result "$ANSWERS/result.json" --output-json "$ANSWERS/scores.json"
