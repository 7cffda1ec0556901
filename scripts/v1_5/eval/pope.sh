#!/usr/bin/env bash
# POPE (COCO, 3 splits): inference, then accuracy / precision / recall / F1 / yes ratio and mean F1.
. "$(dirname "$0")/_common.sh"
ANSWERS="$EVAL_DIR/pope/answers/$CKPT"
run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
  --question-file "$EVAL_DIR/pope/llava_pope_test.jsonl" --image-folder "$EVAL_DIR/pope/val2014"
python -m llava.eval.eval_pope --annotation-dir "$EVAL_DIR/pope/coco" --question-file "$EVAL_DIR/pope/llava_pope_test.jsonl" \
  --result-file "$ANSWERS/merge.jsonl" --output-json "$ANSWERS/scores.json"
