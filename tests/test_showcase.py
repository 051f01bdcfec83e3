"""``./run.sh --showcase`` (``python -m mtunlearn_ext.showcase``): the ops against the plain
PyTorch code, each with its agreement with that code and its error against float64, in one
table."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from mtunlearn_ext import ops, showcase

ROW = re.compile(r"^(gram|pcgrad|project_out|project_nonconflicting)\b.*?"
                 r"([\d.]+)x\s+([\d.e+-]+)\s+([\d.e+-]+)$", flags=re.M)


def test_showcase_prints_every_op_with_a_small_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert showcase.main(["--k", "4", "--n", "5000", "--samples", "3"]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [r[0] for r in rows] == ["gram", "pcgrad", "project_out", "project_nonconflicting"]
    # The speed-up column is a measurement (it read "0.0x" on a loaded CI machine): the pattern
    # above requires it on every row; speed is proved in benchmarks/, never by a test.
    assert all(float(agreement) < 1e-4 for _, _, agreement, _ in rows), rows
    assert all(float(error) < 1e-4 for _, _, _, error in rows), rows
    assert "k=4 vectors of n=5,000 fp32 values" in out and "3 interleaved samples per side" in out
    assert "speed-up: ratio of the median times" in out
    assert "stand-in" not in out


def test_project_nonconflicting_is_timed_against_the_same_projection() -> None:
    """Its speed-up (39.6x; 133x at k=4, n=1e5) was measured against a pinv-based orthogonal
    projection, another quantity; the baseline now solves the same dual problem."""
    gen = torch.Generator().manual_seed(0)
    retain = torch.randn(6, 3000, generator=gen)
    forget = torch.randn(1, 3000, generator=gen) - 0.5 * retain[:3].sum(0, keepdim=True)
    for sign in (-1, 1):
        ours = ops.project_nonconflicting(forget, retain, sign=sign)
        plain = showcase._mm_scipy_nonconflicting(forget, retain, sign)
        assert showcase._relative_difference(ours, plain) < 1e-5
    # The former stand-in differs by far more than rounding: some constraints are inactive.
    pinv = showcase._pinv_project_out(forget, retain)
    assert showcase._relative_difference(ops.project_nonconflicting(forget, retain, sign=-1),
                                         pinv) > 0.1


def test_both_sides_get_equal_interleaved_samples_and_medians(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """It was the best of 5 of each side, taken back to back. A fake clock that ours advances
    by 1 and the baseline by 3 (some calls 10 more) gives the calls' order and
    the medians exactly, with no real timing."""
    clock = [0.0]
    calls: list[str] = []

    def call(name: str, seconds: float, slow_every: int) -> Callable[[], None]:
        def run() -> None:
            calls.append(name)
            clock[0] += seconds + (10.0 if len(calls) % slow_every == 0 else 0.0)
        return run

    monkeypatch.setattr(showcase.time, "perf_counter", lambda: clock[0])
    ours, baseline = showcase._interleaved_medians(call("ours", 1.0, 7), call("base", 3.0, 5), 5)
    assert calls == ["ours", "base"] + ["ours", "base", "base", "ours"] * 2 + ["ours", "base"]
    assert (ours, baseline) == (1.0, 3.0)  # medians: the slow samples do not move them


def test_a_pair_that_disagrees_is_not_timed(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    timed: list[object] = []
    medians = showcase._interleaved_medians

    def recorded(ours: Callable[[], object], baseline: Callable[[], object],
                 samples: int) -> tuple[float, float]:
        timed.append(ours)
        return medians(ours, baseline, samples)

    monkeypatch.setattr(showcase, "_interleaved_medians", recorded)
    monkeypatch.setattr(showcase, "_pinv_project_out", lambda g, basis: 2 * g)
    assert showcase.main(["--k", "3", "--n", "2000", "--samples", "1"]) == 1
    out = capsys.readouterr().out
    assert len(timed) == 3  # gram, pcgrad and project_nonconflicting; not project_out
    row = next(line for line in out.splitlines() if line.startswith("project_out"))
    assert row.split()[3:6] == ["-", "-", "-"], row  # after "project_out (orthogonal complement)"
    assert "not timed, the results disagree: project_out" in out


@pytest.mark.parametrize("argv", [["--k", "0"], ["--k", "300"], ["--n", "0"], ["--seed", "-1"],
                                  ["--samples", "0"], ["--k", "8", "--n", "4"],
                                  ["--k", "8", "--n", "8"]])
def test_showcase_refuses_sizes_it_cannot_run(argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        showcase.main(argv)
    assert stopped.value.code == 2
    assert "expected 2 <= --k <= 256" in capsys.readouterr().err
