#!/usr/bin/env bash
# Create .venv if absent, install, and run the main job on its default: the playground study
# (the ADSC paper's Tables I-IV and Figure 2 in miniature, on real handwritten digits; about
# 20 minutes on a 2-core CPU). Results: playground/runs/default/results.md.
# Arguments go to the study, e.g. `bash scripts/quickstart.sh --smoke` (a few minutes) or
# `--ablations` (adds the training-regime and curriculum tables) or `--device cuda`.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" playground
python -m playground.study "$@"
