#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k apply -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test >&2
exec .venv/bin/python -m pytest -q "$@"
