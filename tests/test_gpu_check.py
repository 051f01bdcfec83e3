"""benchmarks/gpu_check.py runs only on a lent GPU machine, where a broken stage costs device
time that cannot be had back: what of it can run here is checked here."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

# Runs our scripts and command line end to end: left out of scripts/test_matrix.sh's
# legs by default (they run in the main suite; the legs check the library on other
# torch and Python versions).
pytestmark = pytest.mark.end_to_end

# As Stages.command runs the test stages: benchmarks/ (the failure-naming plugin) importable.
STAGE_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}


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
    for script in (gpu_check.ERROR_PATH_CASES, gpu_check.BLOCK_SOLVER_CASES,
                   gpu_check.TENSOR_CORE_CASES):
        ast.parse(script)


def test_the_sanitizer_scripts_run_on_the_cpu() -> None:
    """The block-solver and tensor-core scripts the sanitizer stages run, on the CPU (the same
    calls, so a mistake in them is not first found in a short GPU session)."""
    for script, done in ((gpu_check.BLOCK_SOLVER_CASES, "block solvers ran"),
                         (gpu_check.TENSOR_CORE_CASES, "tensor-core Grams ran")):
        cpu = script.replace(".cuda()", "").replace("torch.cuda.synchronize()", "pass")
        proc = subprocess.run([sys.executable, "-c", cpu], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)
        assert proc.returncode == 0 and done in proc.stdout, proc.stdout + proc.stderr


def test_tensor_cores_only_runs_their_checks_then_their_timings(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tensor-cores-only`` (a short GPU session's run): the tensor-core Gram's op tests,
    memcheck and racecheck with MTUNLEARN_CUDA_TENSOR_CORES=1, Gram timings with and without
    it, then the large-model many-row step without and with it. Commands recorded here, not
    run (no GPU)."""
    ran: list[tuple[str, list[str], dict[str, str]]] = []

    def record(self: gpu_check.Stages, name: str, argv: list[str], limit: float, *,
               need: float = 20.0, env: dict[str, str] | None = None) -> bool:
        ran.append((name, argv, env or {}))
        return True

    timed: list[set[str] | None] = []
    monkeypatch.setattr(gpu_check.Stages, "command", record)
    monkeypatch.setattr(gpu_check, "op_timings",
                        lambda quick, stages, only=None: timed.append(only) or ["| row |"])
    stages = gpu_check.Stages(budget=600)
    lines = gpu_check.tensor_core_stages(stages, sys.executable, {"X": "1"},
                                         "compute-sanitizer", tmp_path, quick=True)
    assert [name for name, _, _ in ran] == [
        "op tests, tensor-core Gram", "memcheck, tensor-core Gram", "racecheck, tensor-core Gram",
        "large model step (b16-k32)", "large model step (b16-k32-tensor-cores)"]
    on = [name for name, _, env in ran if env.get("MTUNLEARN_CUDA_TENSOR_CORES") == "1"]
    assert on == [name for name, _, _ in ran if name != "large model step (b16-k32)"]
    assert all(env.get("X") == "1" for _, _, env in ran)
    tests = ran[0][1]
    assert "tests/test_cuda.py" in tests and "graph" in tests[-1] and "gram" in tests[-1]
    assert timed == [{"gram", "gram, tensor cores"}] and lines == ["| row |"]


def test_pytest_takes_the_stage_arguments() -> None:
    """The op-test stages' extra pytest arguments (xdist and pytest-timeout where installed)."""
    args = gpu_check.pytest_parallel_args()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--collect-only", *args, "tests/test_gpu_check.py"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=STAGE_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit on a machine without a GPU")
def test_without_a_gpu_it_says_so_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", "/dev/null"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr


def test_a_failed_test_is_named_as_it_happens(tmp_path: Path) -> None:
    """The op-test stages name each failure at once (run 6 was stopped before pytest's summary
    and left "1 failed" unnamed), also under xdist where installed."""
    # A sample suite for the stage to run: one test that passes (it must not be named) and
    # one that fails (it must be, with its message).
    (tmp_path / "test_sample.py").write_text(
        "def test_sorting_passes():\n    assert sorted([3, 1, 2]) == [1, 2, 3]\n\n"
        "def test_bad():\n    assert sorted([2, 1]) == [2, 1], 'sorted moved them'\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *gpu_check.pytest_parallel_args(), str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=STAGE_ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    named = [line for line in proc.stdout.splitlines() if line.startswith("[gpu_check] FAILED")]
    assert len(named) == 1 and "test_sample.py::test_bad (call)" in named[0], proc.stdout
    assert "sorted moved them" in named[0], named
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout  # the passing sample ran, unnamed


def test_a_stage_out_of_time_is_interrupted_first(tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    """A stage past its limit gets SIGINT (pytest then prints its summary) before SIGKILL, and
    is reported as timed out."""
    script = ("import time\ntry:\n    print('started', flush=True); time.sleep(60)\n"
              "except KeyboardInterrupt:\n    print('summary printed', flush=True)\n")
    stages = gpu_check.Stages(budget=60)
    assert not stages.command("slow", [sys.executable, "-c", script], 4, need=1)
    out = capfd.readouterr().out
    assert "started" in out and "summary printed" in out, out
    assert "timed out after 4 s" in stages.summary[-1]
    stages = gpu_check.Stages(budget=60)  # one that ignores SIGINT is killed after the grace
    pid_file, done_file = tmp_path / "pid", tmp_path / "done"
    stubborn = ("import os, signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                f"time.sleep(60)\nopen({str(done_file)!r}, 'w').write('done')\n")
    assert not stages.command("stubborn", [sys.executable, "-c", stubborn], 4, need=1)
    out = capfd.readouterr().out
    assert "[gpu_check] stubborn: FAILED (timed out after 4 s)" in out, out
    assert "timed out after 4 s" in stages.summary[-1]
    # Killed, not run to its end: the process is gone (reaped) and never reached its last line.
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not done_file.exists()


def test_a_torch_time_is_reported_only_when_torch_and_ours_agree(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fairness: the op timings timed ``torch`` beside ours without checking that both computed
    the same values. Now one call of each is compared first; a torch call that disagrees gets
    no time (a fast wrong answer is no win), only its difference in the table."""
    timed: list[object] = []

    def fake_cuda_time(fn: object, repeats: int = 20) -> float:
        timed.append(fn)
        return 0.5

    monkeypatch.setattr(gpu_check, "cuda_time", fake_cuda_time)
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    ours = lambda: x @ x.T  # noqa: E731
    same = lambda: (x.double() @ x.double().T).float()  # noqa: E731
    wrong = lambda: x[:, :900] @ x[:, :900].T  # noqa: E731
    seconds, cell = gpu_check.agreeing_time(ours, same, "float32")
    assert seconds == 0.5 and timed == [same] and float(cell) < 1e-6
    seconds, cell = gpu_check.agreeing_time(ours, wrong, "float32")
    assert seconds != seconds and cell.startswith("differs by ") and timed == [same]
    assert gpu_check.relative_difference(torch.ones(3), torch.ones(2)) == float("inf")
