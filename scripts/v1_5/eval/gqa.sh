#!/usr/bin/env bash
# GQA test-dev balanced: inference, then accuracy (and the prediction file of the official eval.py).
. "$(dirname "$0")/_common.sh"
SPLIT="llava_gqa_testdev_balanced"
GQADIR="$EVAL_DIR/gqa/data"
ANSWERS="$EVAL_DIR/gqa/answers/$SPLIT/$CKPT"
run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
  --question-file "$EVAL_DIR/gqa/$SPLIT.jsonl" --image-folder "$GQADIR/images"
python -m llava.eval.eval_gqa --questions "$GQADIR/testdev_balanced_questions.json" --result-file "$ANSWERS/merge.jsonl" \
  --predictions-out "$GQADIR/testdev_balanced_predictions.json" --output-json "$ANSWERS/scores.json"
