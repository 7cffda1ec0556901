# Sourced by quickstart.sh and test.sh: create the virtual environment if absent, activate
# it, install the package. Usage: . scripts/_venv.sh EXTRAS   (e.g. "dev" or "playground")
#
# STACK (environment variable) chooses what is installed:
#   locked (default)  requirements/lock-cpu.txt as pip constraints: exactly the tested CPU
#                     environment (torch's CPU wheel), in .venv
#   lowest            the same, with requirements/lowest.txt's pins (the lowest transformers
#                     setup.py allows), in .venv-lowest
#   newest            the lock, then requirements/newest.txt's pins installed without their
#                     dependencies (the newest transformers setup.py allows, whose declared
#                     dependencies the package index cannot satisfy: see that file), in .venv-newest
#   ranges            whatever setup.py's ranges resolve to today, no lock, in .venv-ranges
# Off this project's CI machines, torch's CPU wheel comes from PyTorch's index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/test.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
STACK="${STACK:-locked}"
extras="${1:-}"
LOCK="requirements/lock-cpu.txt"
case "$STACK" in
  locked) VENV=.venv; constraints="$LOCK" ;;
  lowest) VENV=.venv-lowest; constraints="$VENV.constraints.txt"; pins=requirements/lowest.txt ;;
  newest) VENV=.venv-newest; constraints="$LOCK"; pins=requirements/newest.txt ;;
  ranges) VENV=.venv-ranges; constraints="" ;;
  *) echo "[setup] STACK=$STACK: expected locked, lowest, newest or ranges" >&2; return 2 2>/dev/null || exit 2 ;;
esac
expected="$constraints"
if [ -n "${pins:-}" ]; then
  # The lock, with the packages the stack's pins file names replaced by its versions.
  names="$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' "$pins" | paste -sd'|')"
  expected="$VENV.constraints.txt"
  { grep -viE "^(${names})==" "$LOCK"; grep -v '^#' "$pins"; } > "$expected"
fi
# One stamp per installed set of extras, named by the checksum of setup.py and the constraints:
# other extras are installed on top, a changed setup.py or lock makes the environment anew.
sum="$(cat setup.py ${expected:+"$expected"} | cksum | cut -d' ' -f1)"
stamp="$VENV/.installed-$(echo "$extras" | tr ',' '-')-$sum"
if ls "$VENV"/.installed-* >/dev/null 2>&1 && ! ls "$VENV"/.installed-*-"$sum" >/dev/null 2>&1; then
  echo "[setup] setup.py or the lock changed since $VENV was made: making it anew"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version 2>&1) (stack: $STACK)"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
# lmms-eval comes without its declared dependencies (setup.py's LMMS says why; the extra
# holds what it needs), so pip check's lines about lmms-eval's own requirements are expected.
with_lmms=0
case ",$extras," in *,dev,*|*,lmms,*) with_lmms=1 ;; esac
pip_check() {
  local report
  report="$(python -m pip check 2>&1)" && return 0
  report="$(printf '%s\n' "$report" | grep -vE '^lmms-eval [^ ]+ (requires|has requirement) ' || true)"
  [ -z "$report" ] && return 0
  printf '%s\n' "$report"
  return 1
}
if [ ! -f "$stamp" ]; then
  if [ -n "$constraints" ]; then
    echo "[setup] installing -e $spec with the versions of $constraints"
    python -m pip install --quiet -c "$constraints" pip
    python -m pip install --quiet -c "$constraints" -e "$spec"
    [ "$with_lmms" = 1 ] && python -m pip install --quiet --no-deps -c "$constraints" lmms_eval
    if [ "$STACK" = newest ]; then
      python -m pip install --quiet --no-deps -r "$pins"
    fi
    python scripts/check_lock.py "$expected"
  else
    echo "[setup] installing -e $spec with the newest releases setup.py allows (no lock)"
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e "$spec"
    [ "$with_lmms" = 1 ] && python -m pip install --quiet --no-deps "lmms_eval>=0.7,<0.8"
  fi
  if [ "$STACK" = newest ]; then
    pip_check || echo "[setup] (expected: $pins says why those pins come without their dependencies)"
  else
    pip_check
  fi
  touch "$stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [ "$STACK" = newest ]; then
  # without the kernels package, transformers 5.25's from_pretrained refuses to load unless
  # hub kernels are switched off (requirements/newest.txt)
  export USE_HUB_KERNELS="${USE_HUB_KERNELS:-NO}"
fi
export TOKENIZERS_PARALLELISM=false
