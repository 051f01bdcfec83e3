#!/usr/bin/env bash
# Builds the op library with CMake against libtorch (the C++ users' build) and checks that
# torch.ops.load_library registers every op from it, then installs it (cmake --install) and
# builds and runs C++ programs of a project outside this tree against the installed package
# (find_package(mtunlearn), tests/cpp/outside_consumer).
# Usage: [BUILD_DIR=build-cmake] [PYTHON=.venv/bin/python] scripts/build_cmake.sh [cmake args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "build_cmake.sh: $PY cannot import torch; set PYTHON to a Python with torch" \
       "(./test.sh creates .venv)" >&2
  exit 2
fi
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
export BUILD_DIR=${BUILD_DIR:-build-cmake}
# The consumer check is built below the way a project outside this tree builds it, not here.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
      -DMTUNLEARN_BUILD_CONSUMER_CHECK=OFF "$@"
cmake --build "$BUILD_DIR"
"$PY" - <<'PYEOF'
import importlib.util
import os
import torch
# The library must take torch's C++ runtime (a private copy crashes on the first op error).
spec = importlib.util.spec_from_file_location("_elf", "mtunlearn_ext/_elf.py")
elf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(elf)
c10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
library = os.path.join(os.environ["BUILD_DIR"], "libmtunlearn_ops.so")
shares = elf.shares_cxx_runtime(library, c10)
assert shares is not False, f"{library} carries a private C++ runtime"
torch.ops.load_library(library)
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
print(f"CMake build OK: torch.ops.mtunlearn loaded from {library};",
      "gram and pcgrad run:", tuple(g.shape), tuple(out.shape), "; shares torch's C++ runtime:",
      shares, "; an op error arrives whole")
PYEOF
# The library beside the package in one Python process (each loaded first), and alone.
"$PY" tests/cpp/shared_process_check.py "$BUILD_DIR/libmtunlearn_ops.so"
# The package as a project outside this tree gets it: cmake --install into a prefix of its own
# (emptied first: a header or target dropped since the last run must not linger), then
# tests/cpp/outside_consumer configured with find_package(mtunlearn) against it, built and run:
# tests/cpp/consumer_check.cpp (every op through mtunlearn::ops against float64 ATen
# references) and ops called only by name under --as-needed. The install copies the built
# library; no kernel is compiled again.
outside_started=$SECONDS
# Absolute: CMake resolves a relative CMAKE_PREFIX_PATH entry against the consumer's source
# folder (tests/cpp/outside_consumer), not here, and would not find the install.
outside=$(realpath -m "$BUILD_DIR/outside")
rm -rf "$outside/prefix"
cmake --install "$BUILD_DIR" --prefix "$outside/prefix" >/dev/null
echo "installed into $outside/prefix:" $(cd "$outside/prefix" && find . -type f | sort)
cmake -S tests/cpp/outside_consumer -B "$outside/build" -G Ninja \
      -DCMAKE_PREFIX_PATH="$outside/prefix;$prefix"
cmake --build "$outside/build"
"$outside/build/mtunlearn_outside_check"
"$outside/build/mtunlearn_outside_by_name"
echo "outside consumer (install, configure, build, run): $((SECONDS - outside_started)) s"
