#!/usr/bin/env bash
# Builds the op library with CMake against libtorch (the C++ users' build) and checks that
# torch.ops.load_library registers every op from it. Usage: scripts/build_cmake.sh [cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-cmake -G Ninja -DCMAKE_PREFIX_PATH="$prefix" "$@"
cmake --build build-cmake
"$PY" - <<'PYEOF'
import torch
torch.ops.load_library("build-cmake/libmtunlearn_ops.so")
x = torch.randn(4, 1000)
g = torch.ops.mtunlearn.gram(x)
assert torch.allclose(g, x @ x.T, rtol=1e-4, atol=1e-3)
out, w = torch.ops.mtunlearn.pcgrad(x, 0)
print("CMake build OK: torch.ops.mtunlearn loaded from build-cmake/libmtunlearn_ops.so;",
      "gram and pcgrad run:", tuple(g.shape), tuple(out.shape))
PYEOF
