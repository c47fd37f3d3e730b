#!/usr/bin/env bash
# Create a venv (if needed) and install zupatch into it, with the right torch build.
# Extras to install come as arguments (default: demo), e.g. `bash scripts/setup.sh test`.
#
# Versions (docs/dependencies.md):
#   pinned (default)       .venv, every package at the version in constraints/ci.txt: the
#                          versions the suite is known to pass with. A release of any
#                          dependency cannot change what gets installed.
#                          ZUPATCH_CONSTRAINTS=FILE uses another file; ZUPATCH_CONSTRAINTS=
#                          (empty) installs by pyproject.toml's ranges only.
#   ZUPATCH_DEPS=latest    .venv-latest, every package upgraded to its newest release
#                          (pip --upgrade --upgrade-strategy eager, no constraints), except
#                          torch, which stays the build chosen below. A separate venv, so
#                          switching back and forth never leaves one mode's versions in the
#                          other's venv.
# Pinned mode does nothing when nothing changed since the last successful run: a stamp in
# the venv holds a hash of pyproject.toml, the constraints, ZUPATCH_TORCH, the Python version
# and this script (delete <venv>/.zupatch-setup to force a reinstall). Latest mode always
# asks the index for newer releases.
#
# torch: an installed torch is kept (and then not pinned). Otherwise, on a machine with an
# NVIDIA GPU (nvidia-smi present) pip installs the default CUDA build; without one it installs
# torch==2.13.0 as the CPU build from PyTorch's CPU index when that index answers within 5 s
# (ZUPATCH_TORCH_CPU_INDEX overrides its URL), else from the usual index (on the project's CI
# machines, a local CPU wheel). Pinned mode applies the constraints to torch too. Set ZUPATCH_TORCH="<pip requirement or pip args>" to choose
# yourself (then torch is not pinned either), e.g.
#   ZUPATCH_TORCH="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${*:-demo}"
extras="${extras// /,}"
PY="${PYTHON:-python3}"
mode="${ZUPATCH_DEPS:-pinned}"
case "$mode" in
  pinned) venv=.venv; constraints="${ZUPATCH_CONSTRAINTS-constraints/ci.txt}" ;;
  latest) venv=.venv-latest; constraints="" ;;
  *) echo "error: ZUPATCH_DEPS must be pinned or latest, not '$mode'" >&2; exit 2 ;;
esac
if [ -n "$constraints" ] && [ ! -f "$constraints" ]; then
  echo "error: $constraints: constraints file not found (ZUPATCH_CONSTRAINTS)" >&2
  exit 2
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_CPU_INDEX="${ZUPATCH_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
# setuptools' note that a flat-layout editable install uses an import hook: informational only.
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation"

if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp="$venv/.zupatch-setup"
digest=$( {
  echo "mode=$mode torch=${ZUPATCH_TORCH:-} python=$("$venv/bin/python" -c 'import sys; print(sys.version)')"
  cat pyproject.toml scripts/setup.sh
  if [ -n "$constraints" ]; then cat "$constraints"; fi
} | sha256sum | cut -d' ' -f1)
# Extras installed before stay installed (and pinned): record and reinstall their union.
previous=""
if [ -f "$stamp" ]; then
  previous=$(sed -n 2p "$stamp")
  if [ "$mode" = pinned ] && [ "$(sed -n 1p "$stamp")" = "$digest" ]; then
    missing=""
    for extra in ${extras//,/ }; do
      case ",$previous," in *",$extra,"*) ;; *) missing=1 ;; esac
    done
    [ -z "$missing" ] && exit 0  # up to date: nothing to do
  fi
fi
extras=$(printf '%s\n' ${extras//,/ } ${previous//,/ } | sort -u | paste -sd, -)

rm -f "$stamp"
. "$venv/bin/activate"
pins=()
if [ -n "$constraints" ]; then
  effective="$venv/zupatch-constraints.txt"
  if [ -n "${ZUPATCH_TORCH:-}" ] || python -c "import torch" >/dev/null 2>&1; then
    grep -v '^torch==' "$constraints" >"$effective"  # the torch you chose or had stays
  else
    cp "$constraints" "$effective"
  fi
  pins=(-c "$effective")
  echo "installing zupatch[$extras] into $venv with the versions of $constraints" >&2
  python -m pip install -qq ${pins[@]+"${pins[@]}"} pip setuptools
else
  if [ "$mode" = latest ]; then what="the latest releases"; else what="pyproject.toml's ranges"; fi
  echo "installing zupatch[$extras] into $venv with $what" >&2
  python -m pip install -qq --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -qq --upgrade "setuptools>=77"
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${ZUPATCH_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    python -m pip install -qq ${pins[@]+"${pins[@]}"} $ZUPATCH_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -qq ${pins[@]+"${pins[@]}"} "torch>=2.2"
  elif python -c "import urllib.request as u; u.urlopen('$TORCH_CPU_INDEX/torch/', timeout=5)" >/dev/null 2>&1; then
    # No GPU: the CPU build from PyTorch's index (2.13.0+cpu sorts above PyPI's 2.13.0, whose
    # Linux wheel is the multi-GB CUDA build); everything else from the index pip is set up with.
    python -m pip install -qq ${pins[@]+"${pins[@]}"} --extra-index-url "$TORCH_CPU_INDEX" "torch==2.13.0"
  else
    # PyTorch's index unreachable (the project's CI machines): the pinned release from the usual
    # index, which on those machines is a local CPU wheel.
    python -m pip install -qq ${pins[@]+"${pins[@]}"} "torch==2.13.0"
  fi
fi
# The venv's own (pinned) setuptools builds the editable install: no download, no surprise.
if [ "$mode" = latest ]; then
  keep_torch="$venv/zupatch-keep-torch.txt"
  python -c "from importlib.metadata import version; print('torch==' + version('torch'))" >"$keep_torch"
  python -m pip install -qq --no-build-isolation --upgrade --upgrade-strategy eager -c "$keep_torch" -e ".[${extras}]"
else
  python -m pip install -qq --no-build-isolation ${pins[@]+"${pins[@]}"} -e ".[${extras}]"
fi
# -qq hides pip's warnings (index locations, notes); a conflict still shows here.
if ! python -m pip check >/dev/null 2>&1; then
  python -m pip check >&2 || true
  echo "error: the installed packages do not fit together (pip check above)" >&2
  exit 1
fi
printf '%s\n%s\n' "$digest" "$extras" >"$stamp"
echo "zupatch installed in $(pwd)/$venv (activate with: . $venv/bin/activate)" >&2
