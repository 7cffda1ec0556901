#!/usr/bin/env bash
# TextVQA val (with OCR tokens in the prompt): inference, then accuracy (EvalAI normalisation).
. "$(dirname "$0")/_common.sh"
ANSWERS="$EVAL_DIR/textvqa/answers/$CKPT"
run_chunks llava.eval.model_vqa_loader "$ANSWERS" \
  --question-file "$EVAL_DIR/textvqa/llava_textvqa_val_v051_ocr.jsonl" --image-folder "$EVAL_DIR/textvqa/train_images"
python -m llava.eval.eval_textvqa --annotation-file "$EVAL_DIR/textvqa/TextVQA_0.5.1_val.json" \
  --result-file "$ANSWERS/merge.jsonl" --output-json "$ANSWERS/scores.json"
