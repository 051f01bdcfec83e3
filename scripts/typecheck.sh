#!/usr/bin/env bash
# The package's type check: mypy with mypy.ini (mtunlearn_ext only, not the tests), from the
# repository root. Usage: scripts/typecheck.sh [mypy args]; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s.%N)
rc=0
"${PYTHON:-.venv/bin/python}" -m mypy "$@" || rc=$?
t1=$(date +%s.%N)
echo "[typecheck] mypy took $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
exit "$rc"
