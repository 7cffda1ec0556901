#!/usr/bin/env bash
# Create .venv if absent (the locked CPU stack, requirements/lock-cpu.txt), install, and run
# the main job on its default: the playground study (the ADSC paper's Tables I-IV and
# Figure 2 in miniature, on real handwritten digits; about 25 minutes on a 2-core CPU).
# Results: playground/runs/default/results.md.
# Arguments go to the study, e.g. `bash scripts/quickstart.sh --smoke` (a few minutes),
# `--seeds 0,1,2` (each ADSC fine-tune with three seeds: mean and range), `--ablations`
# (adds the training-regime and curriculum tables) or `--device cuda`; `--arch qwen2_5_vl` runs the
# same study on a tiny Qwen2.5-VL of transformers' own classes with images of varying size
# (playground/runs/qwen2_5_vl/results.md; docs/playground.md, "The second architecture").
# `STACK=lowest bash scripts/quickstart.sh` runs it on the lowest supported transformers.
# The demo extra comes too: afterwards `.venv/bin/python -m llava.serve.gradio_demo` serves the
# fine-tuned model beside the full one (docs/demo.md).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" playground,demo
python -m playground.study "$@"
echo "[quickstart] to chat with the fine-tuned model beside the full one: .venv/bin/python -m llava.serve.gradio_demo"
