#!/usr/bin/env bash
# Create .venv if absent, install, run the main job on its default:
# a tiny LLaVA checkpoint, then one generation with and without ADSC pruning.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" playground
RUN="${RUN:-playground/runs/quickstart}"
mkdir -p "$RUN"
if [ ! -f "$RUN/tiny/config.json" ]; then
  python -m llava.tools.make_tiny_checkpoint --out "$RUN/tiny" --layers 8
fi
python - "$RUN/image.png" <<'PY'
import sys
from PIL import Image, ImageDraw
image = Image.new("RGB", (96, 64), "white")
ImageDraw.Draw(image).ellipse((20, 10, 70, 55), fill="red")
image.save(sys.argv[1])
PY
for flags in "--no-pruning" "--prune-layers 1,3 --vision-token-budget 12"; do
  echo "== run_llava $flags"
  # shellcheck disable=SC2086
  python -m llava.eval.run_llava --model-path "$RUN/tiny" --image-file "$RUN/image.png" \
    --query "What is in the image?" --temperature 0 --max_new_tokens 16 --device cpu $flags
done
