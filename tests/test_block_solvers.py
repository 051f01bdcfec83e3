"""The CUDA backend's block-per-problem solvers (include/mtunlearn/block_solvers.h), run on CPU
threads against the one-thread solvers: tests/cpp/block_solvers_emulation.cpp, built with the
machine's C++ compiler (the one that builds the extension). Their CUDA runs are in
benchmarks/gpu_check.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_block_solvers_match_the_one_thread_solvers(tmp_path: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert compiler, "a C++20 compiler (g++ or $CXX) is needed, as for building the extension"
    binary = tmp_path / "block_solvers_emulation"
    subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "cpp" / "block_solvers_emulation.cpp"), "-o",
                    str(binary)], check=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok: 0 mismatching case(s)" in run.stdout
    # Every kind of case ran, at the largest k the solvers accept too.
    assert run.stdout.count("k=256") == 12 and "dropped rows" in run.stdout
