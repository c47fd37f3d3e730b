#!/usr/bin/env bash
# Set up a venv with the test extras and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k apply -x`.
# Versions: pinned to constraints/ci.txt in .venv by default (what CI runs);
# `ZUPATCH_DEPS=latest bash scripts/test.sh` runs the suite on the newest release of
# every dependency instead, in .venv-latest (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
[ "${ZUPATCH_DEPS:-pinned}" = latest ] && venv=.venv-latest
bash scripts/setup.sh test >&2
exec "$venv/bin/python" -m pytest -q "$@"
