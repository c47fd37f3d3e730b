#!/usr/bin/env bash
# Refresh constraints/ci.txt (the versions CI installs) from a venv whose test suite passed.
#
#   bash scripts/update-constraints.sh             # run the suite on the latest releases
#                                                  # (ZUPATCH_DEPS=latest bash scripts/test.sh),
#                                                  # and only if it is green, pin what it used
#   bash scripts/update-constraints.sh --no-test   # pin .venv-latest as it is (you just ran it green)
#   bash scripts/update-constraints.sh --no-test --venv .venv   # pin another venv
#
# Writes `name==version` for every installed package but zupatch itself, local version
# labels dropped (torch 2.13.0+cpu -> torch==2.13.0, which a CUDA build of 2.13.0 also
# satisfies). Review the diff, then run `bash scripts/test.sh` (it reinstalls .venv with
# the new pins) and commit the file.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-latest
run_tests=1
out=constraints/ci.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --no-test) run_tests="" ;;
    --venv) venv="${2:?--venv needs a folder}"; shift ;;
    *) echo "usage: bash scripts/update-constraints.sh [--no-test] [--venv DIR]" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$run_tests" ]; then
  if [ "$venv" != .venv-latest ]; then
    echo "error: --venv needs --no-test (the suite run here uses .venv-latest)" >&2
    exit 2
  fi
  if ! ZUPATCH_DEPS=latest bash scripts/test.sh; then
    echo "error: the suite failed on the latest releases; $out left unchanged" >&2
    exit 1
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "error: $venv: no venv there (run ZUPATCH_DEPS=latest bash scripts/test.sh first)" >&2
  exit 2
fi
python_version=$("$venv/bin/python" -c 'import platform; print(platform.python_version(), platform.system(), platform.machine())')
mkdir -p "$(dirname "$out")"
tmp="$out.tmp"
{
  echo "# Versions the test suite passes with: scripts/setup.sh installs zupatch with these"
  echo "# by default (pip install -c $out). Refresh: bash scripts/update-constraints.sh"
  echo "# (docs/dependencies.md). Frozen from $venv, Python $python_version."
  "$venv/bin/python" -m pip list --format=freeze --exclude-editable --disable-pip-version-check \
    | grep -viE '^zupatch==' \
    | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/' \
    | LC_ALL=C sort -f -t= -k1,1
} >"$tmp"
mv "$tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages); review with: git diff $out" >&2
