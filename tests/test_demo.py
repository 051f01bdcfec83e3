"""The main job's demo end to end on the tiny benchmark: both requests, the parallel schedule,
the tables, and a report whose every image exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mtunlearn_ext import _io, demo
from mtunlearn_ext import report as report_module


def test_demo_runs_both_requests_and_writes_the_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    # Every file of the report goes through the atomic writers (a reader never sees half a
    # report or plot); record what each wrote.
    written: list[str] = []
    for module, name in ((_io, "write_text_atomic"), (report_module, "save_png")):
        original = getattr(module, name)

        def spy(*args, _original=original, **kwargs):
            path = args[0] if isinstance(args[0], (str, Path)) else args[1]
            written.append(Path(path).name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    rc = demo.main(["--size", "tiny", "--baselines", "finetune", "--jobs", "2",
                    "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "full-task request done" in text and "partial-task request done" in text
    for request in ("full", "partial"):
        results = json.loads((out / f"{request}.json").read_text())
        assert {"original", "retrained", "finetune", demo.METHOD} <= set(results["models"])
        assert results["request"]["type"] == request
    partial = json.loads((out / "partial.json").read_text())
    assert partial["request"]["target_tasks"] == ["segmentation"]
    report = (out / "report.md").read_text()
    assert "## Full-task request" in report and "## Partial-task request" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"metrics_full.png", "metrics_partial.png", "interference_full.png",
            "interference_partial.png", "samples.png"} <= set(images)
    for image in images:
        assert (out / image).stat().st_size > 1000, image
    assert {"report.md", *images} <= set(written), sorted(written)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    # Each request's table is followed by its UIS floor.
    floors = re.findall(r"UIS floor: (\d+\.\d+) \(5-95% of draws", report)
    assert len(floors) == 2 and all(float(f) > 0 for f in floors)
    assert "UIS floor of the partial-task request" in text
    # Three trainings were scheduled (original, one gold model per request), none skipped.
    assert len(re.findall(r"model (trained|from the cache)", text)) == 3
