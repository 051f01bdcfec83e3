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
import importlib.util
import os
import torch
# The library must take torch's C++ runtime (a private copy crashes on the first op error).
spec = importlib.util.spec_from_file_location("_elf", "mtunlearn_ext/_elf.py")
elf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(elf)
c10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
shares = elf.shares_cxx_runtime("build-cmake/libmtunlearn_ops.so", c10)
assert shares is not False, "build-cmake/libmtunlearn_ops.so carries a private C++ runtime"
torch.ops.load_library("build-cmake/libmtunlearn_ops.so")
x = torch.randn(4, 1000)
g = torch.ops.mtunlearn.gram(x)
assert torch.allclose(g, x @ x.T, rtol=1e-4, atol=1e-3)
out, w = torch.ops.mtunlearn.pcgrad(x, 0)
try:
    torch.ops.mtunlearn.inner(x, torch.randn(4, 999))
except ValueError as error:  # the error path through the library's frames
    assert str(error).endswith("[4, 999]"), error
else:
    raise AssertionError("inner accepted mismatched inputs")
print("CMake build OK: torch.ops.mtunlearn loaded from build-cmake/libmtunlearn_ops.so;",
      "gram and pcgrad run:", tuple(g.shape), tuple(out.shape), "; shares torch's C++ runtime:",
      shares, "; an op error arrives whole")
PYEOF
