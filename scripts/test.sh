#!/usr/bin/env bash
# The test suite, offline on CPU, at both ends of the tested transformers range.
#   bash scripts/test.sh          the whole suite in .venv (installed from the lock) and, at the
#                                 same time, the tests marked `compat` (those that meet
#                                 transformers' internals) in .venv-lowest (the lowest
#                                 transformers setup.py allows); most tests run on one thread, so
#                                 the two runs share two cores well. The lowest run's output
#                                 follows the locked run's.
#   bash scripts/test.sh ARGS...  only the locked run, ARGS going to pytest (e.g. -k builder -x)
#   STACK=lowest|ranges bash scripts/test.sh [ARGS...]   one run on that stack (scripts/_venv.sh)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"

run_suite() {  # STACK then pytest arguments; in a subshell so each stack has its own venv
  (
    STACK="$1"
    shift
    . "$HERE/_venv.sh" dev
    echo "[test] stack $STACK: torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')"
    # each run its own temporary folder: two runs at once never share pytest's numbered folders
    basetemp="$(mktemp -d)"
    status=0
    python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 --basetemp="$basetemp/tmp" "$@" || status=$?
    rm -rf "$basetemp"
    exit "$status"
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
# Install the locked stack first (the two installs would write the project's egg-info at once),
# then the lowest stack installs and runs in the background while the locked suite runs.
( STACK=locked; . "$HERE/_venv.sh" dev )
lowest_log="$(mktemp)"
run_suite lowest -m compat > "$lowest_log" 2>&1 &
lowest_pid=$!
locked_status=0
run_suite locked || locked_status=$?
lowest_status=0
wait "$lowest_pid" || lowest_status=$?
cat "$lowest_log"
rm -f "$lowest_log"
echo "[test] locked: exit $locked_status; lowest (compat): exit $lowest_status"
[ "$locked_status" -eq 0 ] && [ "$lowest_status" -eq 0 ]
