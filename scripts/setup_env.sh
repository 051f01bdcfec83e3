#!/usr/bin/env bash
# Shared set-up for ./run.sh and ./test.sh: create or reuse .venv, install the pinned
# dependencies when requirements change, and build the extension in place (ninja rebuilds only
# what changed). Source it; it leaves PY pointing at the environment's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON_BIN=${PYTHON_BIN:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv
fi
PY="$ROOT/.venv/bin/python"
want=$(cat requirements.txt requirements-dev.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.mtunlearn-requirements 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  echo "[setup] installing pinned dependencies (torch 2.14.1 comes from this machine's disk)"
  t0=$(date +%s)
  # pip warns about local index folders this machine does not have; keep the log readable.
  pip_quiet() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
  pip_quiet --upgrade pip
  pip_quiet -r requirements.txt
  [ -f requirements-dev.txt ] && pip_quiet -r requirements-dev.txt
  "$PY" -c "import torch" || { echo "[setup] torch did not install" >&2; exit 1; }
  echo "$want" > .venv/.mtunlearn-requirements
  echo "[setup] dependencies installed in $(( $(date +%s) - t0 )) s"
fi
echo "[setup] building the extension (ninja, incremental)"
t0=$(date +%s)
if ! MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q build_ext --inplace > .venv/build.log 2>&1; then
  tail -n 60 .venv/build.log
  echo "[setup] BUILD FAILED (full log: .venv/build.log)" >&2
  exit 1
fi
grep -A4 "mtunlearn_ext build configuration" .venv/build.log | sed 's/^/[build] /' || true
echo "[setup] build done in $(( $(date +%s) - t0 )) s"
export PY
