"""The CMake library in a Python process, alone and beside the package (scripts/build_cmake.sh
runs it with the library's path). Each case runs in a process of its own, as each is a
different process history:

- the library alone: its ops run, and backward through one fails naming the op (PyTorch's
  default for an op without an autograd kernel is a warning and no gradient);
- the library, then ``import mtunlearn_ext``, and the other way round: both builds in one
  process (torch aborts a process that defines a namespace twice); the one loaded first
  registers the ops, the package's autograd formulas and fake kernels work on them.

Usage: python tests/cpp/shared_process_check.py build-cmake/libmtunlearn_ops.so
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

CASES = {
    "library alone": """
import torch
torch.ops.load_library(LIBRARY)
x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
gram = torch.ops.mtunlearn.gram(x)
assert torch.allclose(gram, x.detach() @ x.detach().T)
try:
    gram.sum().backward()
except RuntimeError as error:
    assert "mtunlearn::gram" in str(error), error
else:
    raise AssertionError("backward through the library's gram gave no error")
""",
    "library, then the package": """
import torch
torch.ops.load_library(LIBRARY)
import mtunlearn_ext
from mtunlearn_ext import _extension, ops
assert _extension._C.registration() == {"owner": False, "schema_mismatch": ""}
CHECK
""",
    "the package, then the library": """
import torch
import mtunlearn_ext
from mtunlearn_ext import _extension, ops
torch.ops.load_library(LIBRARY)
assert _extension._C.registration() == {"owner": True, "schema_mismatch": ""}
CHECK
""",
}

# With both loaded: the ops run and differentiate, and the fake kernels answer opcheck.
CHECK = """
x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
ops.gram(x).sum().backward()
assert torch.allclose(x.grad, 2 * x.detach().sum(0).expand(3, 5))
torch.library.opcheck(torch.ops.mtunlearn.gram.default, (torch.randn(3, 5, requires_grad=True),))
"""


def main(library: str) -> int:
    has_package = importlib.util.find_spec("mtunlearn_ext._C") is not None
    failed = 0
    for name, body in CASES.items():
        if "mtunlearn_ext" in body and not has_package:
            print(f"shared process: {name:32s} skipped (mtunlearn_ext._C is not built here)")
            continue
        script = f"LIBRARY = {library!r}\n" + body.replace("CHECK", CHECK)
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=600)
        verdict = "ok" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
        print(f"shared process: {name:32s} {verdict}")
        if run.returncode != 0:
            failed += 1
            print(run.stdout + run.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
