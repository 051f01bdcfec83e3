"""``./run.sh --showcase`` (``python -m mtunlearn_ext.showcase``): the ops against the plain
PyTorch code, each with its error against float64, in one table."""

from __future__ import annotations

import re

import pytest

from mtunlearn_ext import showcase


def test_showcase_prints_every_op_with_a_small_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert showcase.main(["--k", "4", "--n", "5000"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(gram|pcgrad|project_out|project_nonconflicting)\b.*?"
                      r"([\d.]+)x\s+([\d.e+-]+)$", out, flags=re.M)
    assert [r[0] for r in rows] == ["gram", "pcgrad", "project_out", "project_nonconflicting"]
    # The speed-up column is a measurement (it read "0.0x" on a loaded CI machine): the pattern
    # above requires it on every row; speed is proved in benchmarks/, never by a test.
    assert all(float(error) < 1e-4 for _, _, error in rows), rows
    assert "k=4 vectors of n=5,000 fp32 values" in out


@pytest.mark.parametrize("argv", [["--k", "0"], ["--k", "300"], ["--n", "0"], ["--seed", "-1"]])
def test_showcase_refuses_sizes_it_cannot_run(argv: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        showcase.main(argv)
    assert stopped.value.code == 2
    assert "expected 2 <= --k <= 256" in capsys.readouterr().err
