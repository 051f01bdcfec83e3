#!/usr/bin/env bash
# The test suite once more, against a CPU-only torch build of an older release (default 2.13.0,
# on this machine's disk): the build most users get from a plain `pip install torch` on a
# machine without a GPU. It checks that setup.py builds without the CUDA kernels and that the
# ops, the surgery and the unlearners hold on that torch too.
#
# Runs ./test.sh in a copy of the checkout's tracked files (their working-tree contents) with
# the torch pin replaced, so the checkout's own .venv and in-place build are left untouched.
# Extra arguments go to pytest. TORCH_CPU_VERSION picks the release; MTUNLEARN_CPU_LEG_DIR a
# folder to reuse between runs (default: a fresh temporary one, removed afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${TORCH_CPU_VERSION:-2.13.0}
if [ -n "${MTUNLEARN_CPU_LEG_DIR:-}" ]; then
  dir=$MTUNLEARN_CPU_LEG_DIR
  mkdir -p "$dir"
else
  dir=$(mktemp -d "${TMPDIR:-/tmp}/mtunlearn-cpu-torch.XXXXXX")
  trap 'rm -rf "$dir"' EXIT
fi
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$dir"
sed -i "s/^torch==.*/torch==$version/" "$dir/requirements.txt"
echo "[cpu-torch] torch==$version in $dir"
cd "$dir"
# torch's own modules (inductor's mkldnn helpers) warn about TorchScript on import in 2.13.
./test.sh -W 'ignore:`torch.jit.script_method` is deprecated:DeprecationWarning' "$@"
"$dir/.venv/bin/python" - "$version" <<'EOF'
import sys
import torch
import mtunlearn_ext

info = mtunlearn_ext.build_info()
assert torch.__version__.startswith(sys.argv[1]), torch.__version__
assert torch.version.cuda is None and not info["cuda"], (torch.version.cuda, info["cuda"])
print(f"[cpu-torch] passed on torch {torch.__version__}, extension built without CUDA kernels")
EOF
