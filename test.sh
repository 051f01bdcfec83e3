#!/usr/bin/env bash
# The test suite: sets everything up (venv, pinned deps, build), then runs pytest with the
# compiled extension required (a failed build can never fall back to the references here).
# Extra arguments go to pytest (e.g. ./test.sh -k gram).
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
export MTUNLEARN_REQUIRE_EXTENSION=1
exec "$PY" -m pytest -q tests "$@"
