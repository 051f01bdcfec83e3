"""benchmarks/fresh_output_pages.py: the table of first-write times it prints, one row per way
of getting the output's pages and pause, and its argument checks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fresh_output_pages.py"


def test_prints_one_timed_row_per_way_and_pause() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--mib", "8", "--calls", "2",
                           "--pauses", "0", "0.01"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| [a-zA-Z0-9]", line)]
    ways = ["4 KiB pages", "huge pages (madvise)", "existing tensor"]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ways * 2  # rows[0] is the header
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0] == "huge pages (madvise)" and cells[5].startswith("unavailable: "):
            continue  # a kernel without transparent huge pages says so instead of timing
        low, median, high = (float(c) for c in cells[2:5])
        assert 0 <= low <= median <= high
        assert len(cells[5].split()) == 2  # every call
    assert "free page reporting:" in done.stdout.splitlines()[0]


@pytest.mark.parametrize("argv", [["--mib", "0"], ["--calls", "0"], ["--pauses", "-1"]])
def test_refuses_sizes_it_cannot_run(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--mib must be > 0, --calls >= 1 and every pause >= 0" in done.stderr
