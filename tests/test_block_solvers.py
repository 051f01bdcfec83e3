"""The CUDA backend's block-per-problem solvers (include/mtunlearn/block_solvers.h), run on CPU
threads against the one-thread solvers: tests/cpp/block_solvers_emulation.cpp, built with the
machine's C++ compiler (the one that builds the extension). Their CUDA runs are in
benchmarks/gpu_check.py."""

from __future__ import annotations

from pathlib import Path

from emulation_helpers import run_emulation


def test_block_solvers_match_the_one_thread_solvers(tmp_path: Path) -> None:
    out = run_emulation("block_solvers_emulation", tmp_path)
    # Every kind of case ran, at the largest k the solvers accept too.
    assert out.count("k=256") == 12 and "dropped rows" in out
