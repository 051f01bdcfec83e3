#!/usr/bin/env bash
# The test suite once more in other environments than the pinned one, each in a copy of the
# checkout's tracked files (their working-tree contents) with its own .venv, so the checkout's
# .venv and in-place build are left untouched:
#
#   cpu-torch   torch 2.13.0's CPU-only build (on this machine's disk; TORCH_CPU_VERSION picks
#               another): what a plain `pip install torch` gives on a machine without a GPU.
#               setup.py must build without the CUDA kernels, and everything hold on that torch.
#   python3.12  the pinned requirements on Python 3.12 (the GPU machine's Python; a 3.12-only
#               bug of the surgery hook was once found there), CPU kernels only (the CUDA
#               kernels are compiled by the main run). Needs a python3.12 on PATH or in pyenv;
#               without one the leg is skipped and says so.
#   oldest-torch  torch 2.11.0 (TORCH_OLDEST_VERSION picks another), the oldest setup.py
#               accepts and the GPU machine's: its Dynamo refused the wrappers' compile-time
#               checks, which torch 2.13 and 2.14 take (found on the H200, run 7). From the
#               package registry (PyPI's build, CUDA libraries included: about 4.5 GB);
#               CPU kernels only.
#
# Each leg runs the suite less the tests marked end_to_end (the demo, the benchmark and GPU-check
# scripts, reports, the command line's files and printing: about 250 of the suite's 600 s, which
# the main run covers), to keep CI well inside its time; MTUNLEARN_MATRIX_ALL=1 runs everything.
#
# Usage: scripts/test_matrix.sh [leg ...] [-- pytest arguments]   (default: every leg)
set -euo pipefail
cd "$(dirname "$0")/.."
legs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do legs+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#legs[@]} -eq 0 ] && legs=(cpu-torch python3.12 oldest-torch)

find_python312() {
  # A pyenv shim is on PATH even when 3.12 is not the selected version (and then fails to
  # run), so each candidate must actually run.
  local candidate
  for candidate in $(command -v python3.12 2>/dev/null) \
      $(ls -d "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 \
        2>/dev/null | sort -rV); do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' > /dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

run_leg() {
  local leg=$1; shift
  local dir python_bin="" check=""
  dir=$(mktemp -d "${TMPDIR:-/tmp}/mtunlearn-$leg.XXXXXX")
  git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$dir"
  case $leg in
    cpu-torch)
      local version=${TORCH_CPU_VERSION:-2.13.0}
      sed -i "s/^torch==.*/torch==$version/" "$dir/requirements.txt"
      check="import sys, torch, mtunlearn_ext
assert torch.__version__.startswith('$version'), torch.__version__
assert torch.version.cuda is None and not mtunlearn_ext.build_info()['cuda']"
      ;;
    oldest-torch)
      local oldest=${TORCH_OLDEST_VERSION:-2.11.0}
      sed -i "s/^torch==.*/torch==$oldest/" "$dir/requirements.txt"
      # torch 2.11 wants setuptools < 82 and keeps the venv's own (65.5), which has no
      # bdist_wheel for the console script's editable install; torch 2.14 wants >= 77.0.3.
      echo "setuptools==80.9.0" >> "$dir/requirements.txt"
      check="import torch
assert torch.__version__.startswith('$oldest'), torch.__version__"
      ;;
    python3.12)
      if ! python_bin=$(find_python312); then
        echo "[matrix] python3.12: SKIPPED, no python3.12 on PATH or in pyenv"
        rm -rf "$dir"
        return 0
      fi
      check="import sys; assert sys.version_info[:2] == (3, 12), sys.version"
      ;;
    *) echo "[matrix] unknown leg '$leg' (legs: cpu-torch python3.12 oldest-torch)" >&2
       rm -rf "$dir"; return 2 ;;
  esac
  echo "[matrix] $leg in $dir"
  local t0 rc=0
  t0=$(date +%s)
  # torch's own modules (inductor's mkldnn helpers) warn about TorchScript on import in 2.13.
  (cd "$dir" && PYTHON_BIN=${python_bin:-python3} MTUNLEARN_CUDA=0 ./test.sh \
      -W 'ignore:`torch.jit.script_method` is deprecated:DeprecationWarning' "$@" \
    && .venv/bin/python -c "$check" \
    && .venv/bin/python -c "import sys, torch; print('[matrix] $leg passed: Python', \
sys.version.split()[0] + ', torch', torch.__version__)") || rc=$?
  echo "[matrix] $leg done in $(( $(date +%s) - t0 )) s (rc $rc)"
  rm -rf "$dir"
  return $rc
}

selection=(-m "not end_to_end")
[ "${MTUNLEARN_MATRIX_ALL:-0}" = "1" ] && selection=()

status=0
for leg in "${legs[@]}"; do
  run_leg "$leg" ${selection[@]+"${selection[@]}"} "$@" || status=1
done
exit $status
