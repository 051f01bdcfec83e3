#!/usr/bin/env bash
# The main job: sets everything up (venv, pinned deps, build), then runs the demo.
# Extra arguments go to the demo (see: ./run.sh --help).
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
exec "$PY" -m mtunlearn_ext.demo "$@"
