"""benchmarks/gpu_check.py runs only on a lent GPU machine, where a broken stage costs device
time that cannot be had back: what of it can run here is checked here."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_error_path_stage_passes_on_a_good_build() -> None:
    """The stage's script, on the CPU: every op error arrives whole as a ValueError."""
    script = gpu_check.ERROR_PATH_CASES.replace("device='cuda'", "device='cpu'")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(": ok rc=0 ValueError:" in line for line in lines), lines


def test_the_error_path_stage_fails_when_an_error_is_missing() -> None:
    """A call that raises nothing (or something else) fails the stage."""
    script = gpu_check.ERROR_PATH_CASES.replace("device='cuda'", "device='cpu'").replace(
        "torch.zeros(2, 4, device='cpu')", "torch.zeros(2, 3, device='cpu')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert "inner cuda: FAILED rc=0 no error raised" in proc.stdout, proc.stdout


def test_the_embedded_scripts_parse() -> None:
    for script in (gpu_check.ERROR_PATH_CASES, gpu_check.BLOCK_SOLVER_CASES):
        ast.parse(script)


def test_pytest_takes_the_stage_arguments() -> None:
    """The op-test stages' extra pytest arguments (xdist and pytest-timeout where installed)."""
    args = gpu_check.pytest_parallel_args()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", *args, "tests/test_gpu_check.py"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", "/dev/null"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
