#!/usr/bin/env bash
# The test suite, offline on CPU, at both ends of the tested transformers range.
#   bash scripts/test.sh          the whole suite in .venv (installed from the lock), then the
#                                 tests marked `compat` (those that meet transformers' internals)
#                                 in .venv-lowest (the lowest transformers setup.py allows) and in
#                                 .venv-newest (the newest: requirements/newest.txt)
#   bash scripts/test.sh ARGS...  only the locked run, ARGS going to pytest (e.g. -k builder -x)
#   STACK=lowest|newest|ranges bash scripts/test.sh [ARGS...]   one run on that stack (scripts/_venv.sh)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

run_suite() {  # STACK then pytest arguments; in a subshell so each stack has its own venv
  (
    STACK="$1"
    shift
    . "$HERE/_venv.sh" dev
    echo "[test] stack $STACK: torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')"
    python -m pytest -q -p no:cacheprovider --timeout=900 --durations=30 "$@"
  )
}

ensure_browser() {  # Debian's Chromium for the demo's browser test (skipped, saying why, without one)
  command -v chromium >/dev/null 2>&1 && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian's chromium for the demo's browser test"
    { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1 \
      || echo "[test] could not install chromium: the browser test will be skipped"
  else
    echo "[test] no chromium and not root: the browser test will be skipped (apt-get install chromium)"
  fi
}

ensure_browser
if [ -n "${STACK:-}" ] || [ $# -gt 0 ]; then
  run_suite "${STACK:-locked}" "$@"
  exit
fi
run_suite locked
run_suite lowest -m compat
run_suite newest -m compat
