#!/usr/bin/env bash
# VQAv2: test-dev inference and the EvalAI upload file (scored by the server). With SPLIT=val
# (question file llava_vqav2_mscoco_val2014.jsonl, images val2014, annotations
# v2_mscoco_val2014_annotations.json) the official formula scores it locally instead.
. "$(dirname "$0")/_common.sh"
SPLIT="${SPLIT:-llava_vqav2_mscoco_test-dev2015}"
ANSWERS="$EVAL_DIR/vqav2/answers/$SPLIT/$CKPT"
if [ "$SPLIT" = "llava_vqav2_mscoco_val2014" ]; then
  run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
    --question-file "$EVAL_DIR/vqav2/$SPLIT.jsonl" --image-folder "$EVAL_DIR/vqav2/val2014"
  python -m llava.eval.eval_vqav2 score --annotation-file "$EVAL_DIR/vqav2/v2_mscoco_val2014_annotations.json" \
    --result-file "$ANSWERS/merge.jsonl" --output-json "$ANSWERS/scores.json"
else
  run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
    --question-file "$EVAL_DIR/vqav2/$SPLIT.jsonl" --image-folder "$EVAL_DIR/vqav2/test2015"
  mkdir -p "$EVAL_DIR/vqav2/answers_upload/$SPLIT"
  python -m llava.eval.eval_vqav2 submission --question-file "$EVAL_DIR/vqav2/llava_vqav2_mscoco_test2015.jsonl" \
    --result-file "$ANSWERS/merge.jsonl" --output "$EVAL_DIR/vqav2/answers_upload/$SPLIT/$CKPT.json"
fi
