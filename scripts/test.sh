#!/usr/bin/env bash
# Create .venv if absent, install with the dev extras, run the test suite offline on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k builder -x`.
set -euo pipefail
. "$(dirname "$0")/_venv.sh" dev
python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
