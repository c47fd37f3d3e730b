#!/usr/bin/env bash
# Create .venv (if needed) and install zupatch into it, with the right torch build.
#
# torch: an installed torch is kept. Otherwise, on a machine with an NVIDIA GPU
# (nvidia-smi present) pip installs the default CUDA build; without one it pins
# torch==2.13.0, which on the project's CI machines is a local CPU wheel. Set
# ZUPATCH_TORCH="<pip requirement or pip args>" to choose yourself, e.g.
#   ZUPATCH_TORCH="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
# Extras to install come as arguments (default: demo), e.g. `bash scripts/setup.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${*:-demo}"
extras="${extras// /,}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${ZUPATCH_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    python -m pip install -q $ZUPATCH_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.2"
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[${extras}]"
echo "zupatch installed in $(pwd)/.venv (activate with: . .venv/bin/activate)" >&2
