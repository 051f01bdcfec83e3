"""Building and running the C++ emulations of the CUDA backend's block-cooperative code
(tests/cpp/*_emulation.cpp: the same headers as the kernels, run on std::threads) with the
machine's C++ compiler, the one that builds the extension."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_emulation(name: str, build_dir: Path, timeout: float = 600) -> str:
    """Build tests/cpp/<name>.cpp against csrc/include, run it, and return its output; it must
    exit 0 and report no mismatching case."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++20 compiler (g++ or $CXX) is needed, as for building the extension"
    binary = build_dir / name
    subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "tests" / "cpp" / f"{name}.cpp"),
                    "-o", str(binary)], check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: 0 mismatching case(s)" in run.stdout
    return run.stdout
