# Sourced by quickstart.sh and test.sh: create .venv if absent, activate it, install the package.
# Usage: . scripts/_venv.sh EXTRAS   (e.g. "dev" or "playground"; empty for the core only)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(cat setup.py | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing -e $spec (torch is capped at 2.13.0: a CPU wheel where one is offered)"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -e "$spec"
  touch "$stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
