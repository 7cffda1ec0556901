#!/usr/bin/env bash
# Refresh requirements/lock-cpu.txt: install ".[dev]" into a fresh virtual environment with
# the newest releases setup.py allows (torch: its CPU wheel) and freeze it. Then run
# `bash scripts/test.sh` (both ends of the transformers range) and commit the lock.
# TORCH_CPU picks the torch release (default 2.13.0); off this project's CI machines set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu so the CPU wheel is found.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${TORCH_CPU:-2.13.0}"
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps "lmms_eval>=0.7,<0.8"  # without its declared dependencies (setup.py)
report="$(python -m pip check 2>&1 || true)"
report="$(printf '%s\n' "$report" | grep -vE '^(No broken requirements found\.|lmms-eval [^ ]+ (requires|has requirement) )' || true)"
[ -z "$report" ] || { printf '%s\n' "$report" >&2; exit 1; }
out="requirements/lock-cpu.txt"
{
  echo "# The tested CPU environment: pip install -e \".[dev]\" with torch's CPU wheel, $(python --version)."
  echo "# Written by 'bash scripts/lock.sh' on $(date -u +%Y-%m-%d); installed as constraints by scripts/_venv.sh."
  python -m pip freeze --all --exclude-editable | grep -viE '^(setuptools|wheel)=='
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages); transformers $(python -c 'import transformers; print(transformers.__version__)')"
