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
# The `mtunlearn` console script (setup.py's entry point). A plain `pip install -e .` would
# recompile every source in a fresh temporary folder (measured: 84 s for the CPU-only build with
# one job; minutes more with the CUDA kernels) on every set-up and copy that library over the one
# just built in place. MTUNLEARN_METADATA_ONLY=1 makes setup.py leave the extension out, so the
# editable install only writes the package metadata, the import hook pointing at this checkout
# (which finds the in-place library) and the script (about 6 s). Redone only when setup.py or the
# checkout's location changes, or the script is gone.
want=$( { sha256sum setup.py; echo "$ROOT"; } | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.mtunlearn-console-script 2>/dev/null || true)
if [ ! -x .venv/bin/mtunlearn ] || [ "$want" != "$have" ]; then
  echo "[setup] installing the mtunlearn console script (metadata only, no compile)"
  t0=$(date +%s)
  if ! MTUNLEARN_METADATA_ONLY=1 "$PY" -m pip install --no-deps --no-build-isolation -e . \
      > .venv/console-script.log 2>&1 || [ ! -x .venv/bin/mtunlearn ]; then
    tail -n 30 .venv/console-script.log
    echo "[setup] console script install FAILED (full log: .venv/console-script.log)" >&2
    exit 1
  fi
  echo "$want" > .venv/.mtunlearn-console-script
  echo "[setup] console script installed in $(( $(date +%s) - t0 )) s"
fi
export PY
