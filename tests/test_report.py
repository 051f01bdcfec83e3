"""Reports: the interference plot from JSON data and its section in ``report.md``; and
``mtunlearn report``'s refusals, before anything is written or with what was written
removed: values in the record that are not numbers, a failure after a plot was written, and
a link named like a report file in the output folder."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import _err
from test_cli import _listing

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _console as cli_console
from mtunlearn_ext.records import RECORD_SCHEMA
from mtunlearn_ext.report import interference_to_json, plot_interference, write_report
from mtunlearn_ext.unlearning.interference import InterferenceMatrix
from mtunlearn_ext.unlearning.interference_aware import InterferenceAwareConfig
from mtunlearn_ext.workflow import UserInputError

# Runs our scripts and command line end to end: left out of scripts/test_matrix.sh's
# legs by default (they run in the main suite; the legs check the library on other
# torch and Python versions).
pytestmark = pytest.mark.end_to_end

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = ["forget/a", "retain/a", "retain/b"]


def _matrix() -> InterferenceMatrix:
    before = torch.tensor([[1.0, -0.4, 0.2], [-0.4, 1.0, 0.3], [0.2, 0.3, 1.0]])
    after = before.clone()
    after[0, 1] = after[1, 0] = 0.05
    return InterferenceMatrix(LABELS, before, after, {"a": 0.8})


def _json_data() -> dict[str, Any]:
    """What a record holds: plain lists after a JSON round trip, a missing cosine as null."""
    data = json.loads(json.dumps(interference_to_json(_matrix(), InterferenceAwareConfig())))
    data["after"][2][0] = None
    return data


def _record(**extra: Any) -> dict[str, Any]:
    metrics = {split: {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.75}}
               for split in ("forget", "retain", "test")}
    return {"schema": RECORD_SCHEMA, "method": {"name": "interference_aware", "settings": {}},
            "request": {"type": "partial", "target_tasks": ["a"], "instance_ids": [1, 2]},
            "output": {"checkpoint": "u.pt", "sha256": "0" * 64},
            "before": {"metrics": metrics, "mia_auc": 0.6},
            "after": {"metrics": metrics, "mia_auc": 0.5}, "report": {}, **extra}


def test_interference_to_json_is_plain_json() -> None:
    data = interference_to_json(_matrix(), InterferenceAwareConfig())
    assert json.loads(json.dumps(data)) == data
    assert data["labels"] == LABELS and data["forget_kept"] == {"a": pytest.approx(0.8)}
    assert data["before"][0][1] == pytest.approx(-0.4) and len(data["after"]) == 3
    assert data["projections"] == "task + nonconflicting instance"
    assert "num_snapshots" in data["config"]


def test_plot_interference_from_json_and_from_the_object(tmp_path: Path) -> None:
    assert plot_interference(_json_data(), "from JSON", tmp_path / "a.png") == "a.png"
    assert plot_interference(_matrix(), "from the object", str(tmp_path / "b.png")) == "b.png"
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # New files only, unless asked; no temporary file is left behind either way.
    with pytest.raises(FileExistsError):
        plot_interference(_json_data(), "again", tmp_path / "a.png")
    plot_interference(_json_data(), "again", tmp_path / "a.png", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize(("change", "fragment"), [
    ({"after": None}, "missing"),
    ({"before": [[1.0, 0.0], [0.0, 1.0]]}, "shape"),
    ({"before": [["x", 0, 0], [0, 1, 0], [0, 0, 1]]}, "numbers"),
])
def test_plot_interference_rejects_malformed_data(tmp_path: Path, change: dict[str, Any],
                                                  fragment: str) -> None:
    data = {**_json_data(), **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValueError, match=fragment):
        plot_interference(data, "bad", tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_report_embeds_the_interference_plot(tmp_path: Path) -> None:
    written = write_report(_record(interference=_json_data()), tmp_path / "rep", title="t")
    assert tmp_path / "rep" / "interference.png" in written
    assert (tmp_path / "rep" / "interference.png").read_bytes()[:8] == PNG_MAGIC
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "## Task interference" in markdown and "![interference](interference.png)" in markdown
    assert "negative forget/retain cosine is interference" in markdown
    assert "a: 0.80" in markdown  # the share of the forget gradient kept


def test_report_explains_why_an_after_cosine_can_be_more_negative(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A digits partial request's forget/retain cosine went from -0.04 before to -0.20 after
    projection, which the report did not explain. Its explanation, and that it is what the
    code does: the after-row's forget gradient is -d, d the forget step made non-conflicting
    with another retain batch's per-sample gradients (<d, r_j> <= 0), not with the row shown."""
    from torch import nn

    from mtunlearn_ext import ForgetRequest
    from mtunlearn_ext.api import build_problem
    from mtunlearn_ext.unlearning.interference import interference_matrix
    from mtunlearn_ext.unlearning.interference_aware import InterferenceAware

    write_report(_record(interference=_json_data()), tmp_path / "rep", title="t")
    markdown = " ".join((tmp_path / "rep" / "report.md").read_text().split())
    assert ("A forget/retain cosine can also grow more negative there, because the projections "
            "are built from one retain batch, not the rows shown") in markdown
    assert ("the sign-aware one only their conflicting part (<d, r_j> <= 0 for the forget step "
            "d = -(forget gradient)") in markdown
    # Report audit: the text said the task projection and the sign-aware step ran where the
    # request's settings ran neither; it names them as what runs where on (the title says).
    assert "the projections that this request's settings run (its title names them" in markdown
    assert "divides by the projected gradient's smaller norm (the share kept)" in markdown

    torch.manual_seed(0)
    model = nn.ModuleDict({"trunk": nn.Sequential(nn.Linear(8, 16), nn.Tanh()),
                           "kind": nn.Linear(16, 3), "size": nn.Linear(16, 1)})

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = model

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = self.parts["trunk"](x)
            return {"kind": self.parts["kind"](z), "size": self.parts["size"](z)}

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(120, 8, generator=generator)
    y = {"kind": torch.randint(0, 3, (120,), generator=generator),
         "size": torch.randn(120, 1, generator=generator)}
    problem = build_problem(TwoHeads(), tasks={"kind": "classification", "size": "regression"},
                            train_data=(x, y),
                            forget_request=ForgetRequest.create(range(12), ["kind"]),
                            shared_parameters=lambda name: ".trunk." in f".{name}")
    projected: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    instance_project = InterferenceAware.instance_project

    def recorded(self: InterferenceAware, ctx: Any, step_dir: Any, names: Any, batch: Any,
                 *args: Any, **kwargs: Any) -> Any:
        d, rows = instance_project(self, ctx, step_dir, names, batch, *args, **kwargs)
        projected.append((d, rows))
        return d, rows

    monkeypatch.setattr(InterferenceAware, "instance_project", recorded)
    config = InterferenceAwareConfig()
    assert config.instance_projection == "nonconflicting"
    interference_matrix(problem, config)
    assert projected
    for d, rows in projected:
        step = torch.cat([v.detach().flatten().double() for v in d])
        per_sample = torch.cat([r.detach().flatten(1).double() for r in rows], dim=1)
        cosines = per_sample @ step / (per_sample.norm(dim=1) * step.norm())
        assert float(cosines.max()) <= 1e-6, cosines  # <d, r_j> <= 0 up to rounding


def test_report_without_or_with_a_failed_matrix(tmp_path: Path) -> None:
    # Records from before the field existed: no section, no PNG.
    write_report(_record(), tmp_path / "old")
    assert not (tmp_path / "old" / "interference.png").exists()
    assert "Task interference" not in (tmp_path / "old" / "report.md").read_text()
    write_report(_record(interference={"error": "too few rows"}), tmp_path / "failed")
    assert not (tmp_path / "failed" / "interference.png").exists()
    assert "not computed: too few rows" in (tmp_path / "failed" / "report.md").read_text()
    # Malformed matrices are refused before anything is written: no folder is left behind.
    for name, bad in [("missing", {"labels": ["x"]}),
                      ("shape", {"labels": ["x", "y"], "before": [[1.0]], "after": [[1.0]]}),
                      ("labels", {"labels": "xy", "before": [[1.0]], "after": [[1.0]]}),
                      ("type", [1, 2])]:
        with pytest.raises(UserInputError, match="--results: expected .*interference"):
            write_report(_record(interference=bad), tmp_path / name / "deeper")
        assert not (tmp_path / name).exists(), name


def test_a_failed_report_removes_the_folders_it_created(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A failure after the first plot (here: the loss-curve chart) removes the plots drawn and
    the folders the report created, but not a folder that existed, nor one holding a file
    someone else put there."""
    import mtunlearn_ext.report as report

    def broken(*args: Any) -> bool:
        raise OSError("disk full")

    monkeypatch.setattr(report, "_curves_chart", broken)
    # A file that cannot be written is a user error naming --output-dir (one line in the CLI).
    fails = r"^--output-dir: expected a folder the report files can be written to, .*disk full"
    with pytest.raises(UserInputError, match=fails):
        write_report(_record(), tmp_path / "new" / "rep")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(UserInputError, match=fails):
        write_report(_record(), tmp_path / "kept" / "rep")
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_report_killed_while_drawing_does_not_block_its_rerun(tmp_path: Path) -> None:
    """CLI review: SIGKILL (no clean-up runs) while the loss curves were drawn left the
    finished metrics PNGs under their final names, and the rerun into the same folder was
    refused ("refusing to overwrite"). The figures are drawn into a hidden staging folder and
    put in place together at the end: the kill leaves that folder only."""
    import subprocess
    import sys

    source, out = tmp_path / "r.json", tmp_path / "rep"
    source.write_text(json.dumps(_record()))
    script = ("import json, os, signal; from pathlib import Path; import mtunlearn_ext.report "
              "as report; report._curves_chart = lambda *a: os.kill(os.getpid(), "
              "signal.SIGKILL); report.write_report(json.loads(Path(%r).read_text()), Path(%r))"
              % (str(source), str(out)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9, done.stderr
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 1 and left[0].startswith(".report-") and left[0].endswith(".partial")
    assert {p.name for p in (out / left[0]).iterdir()} >= {"metrics_forget.png"}  # drawn there
    written = write_report(_record(), out)  # the rerun into the same folder
    assert {p.name for p in written} == {"report.md", "metrics_forget.png", "metrics_retain.png",
                                         "metrics_test.png"}  # the record has no loss curves


def test_a_report_killed_while_linking_its_files_names_what_it_left(tmp_path: Path) -> None:
    """Failure injection: a SIGKILL as the report's files were linked into place (one by one,
    report.md last) left finished figures without report.md, and the rerun was refused with
    the plain "refusing to overwrite", the docs promising that a rerun succeeds. The refusal
    now says what happened and what to delete; a folder holding a whole report gets no hint."""
    import subprocess
    import sys

    source, out = tmp_path / "r.json", tmp_path / "rep"
    source.write_text(json.dumps(_record()))
    script = ("import os, signal, json; from pathlib import Path; import mtunlearn_ext._io as io; "
              "real = os.link\n"
              "def link(src, dst):\n"
              "    if Path(dst) == Path(%r) / 'metrics_retain.png':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    real(src, dst)\n"
              "os.link = link\n"
              "from mtunlearn_ext.report import write_report\n"
              "write_report(json.loads(Path(%r).read_text()), Path(%r))"
              % (str(out), str(source), str(out)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9, done.stderr
    left = sorted(p.name for p in out.iterdir())
    assert "metrics_forget.png" in left and "report.md" not in left
    partial = next(name for name in left if name.endswith(".partial"))
    with pytest.raises(UserInputError, match=rf"refusing to overwrite; choose a new folder "
                                             rf"\(report\.md, put in place last, is missing and "
                                             rf"{re.escape(partial)} is there: a report killed "
                                             rf"while putting its files in place left these; "
                                             rf"delete them and that folder"):
        write_report(_record(), out)
    whole = tmp_path / "whole"
    write_report(_record(), whole)
    (whole / ".report-x.partial").mkdir()
    with pytest.raises(UserInputError, match=r"choose a new folder$"):
        write_report(_record(), whole)


def test_report_names_inputs_that_are_not_complete_results(tmp_path: Path) -> None:
    """A JSON list, or a record without a field the report reads, is a user error naming
    --results (exit 2 in the CLI), not an AttributeError or KeyError."""
    with pytest.raises(UserInputError, match=r"--results: expected a JSON object .* got 'list'"):
        write_report([1], tmp_path / "list")  # type: ignore[arg-type]
    record = _record()
    del record["method"]
    with pytest.raises(UserInputError, match=r"--results: expected complete experiment results "
                                             r"or a complete record.*KeyError\('method'\)"):
        write_report(record, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()


def test_report_says_what_a_file_of_another_format_is(tmp_path: Path) -> None:
    """User review: `evaluate`'s JSON fed to `report` said "got None" (its missing schema),
    naming neither the problem nor what to pass. The message now says the file has no
    schema, recognises `evaluate`'s output, and names the two inputs `report` draws."""
    # With a request (attack AUCs beside the metrics) and without one (the metrics alone).
    for evaluated in ({"checkpoint": "m.pt", "sha256": "0" * 64, "metrics": {}, "mia_auc": 0.5},
                      {"checkpoint": "m.pt", "sha256": "0" * 64, "metrics": {}}):
        with pytest.raises(UserInputError, match=r"got None; the file has no `schema` field; "
                                                 r"it looks like `mtunlearn evaluate`'s output "
                                                 r".*record\.json"):
            write_report(evaluated, tmp_path / "evaluated")
    with pytest.raises(UserInputError, match=r"got None; the file has no `schema` field; pass "):
        write_report({"models": {}}, tmp_path / "other")
    with pytest.raises(UserInputError, match=r"got 'mtunlearn_ext.api-record/1'; the file's "
                                             r"`schema` field names another format"):
        write_report({"schema": "mtunlearn_ext.api-record/1"}, tmp_path / "api")
    assert not list(tmp_path.iterdir())


def test_report_names_the_record_by_the_names_unlearn_gives_it(tmp_path: Path) -> None:
    """Docs audit: the hint called the record `<checkpoint>.record.json`, which it is only with
    `unlearn --output` (`orig.interference_aware.record.json` beside
    `orig.interference_aware.pt` without), as `unlearn --record`'s help says since a3f1f05."""
    for results in ({"schema": "mtunlearn_ext.api-record/1"}, {"models": {}}):
        with pytest.raises(UserInputError) as refused:
            write_report(results, tmp_path / "rep")
        assert "<checkpoint>.record.json" not in str(refused.value)
        assert ("the record that `mtunlearn unlearn` writes beside its checkpoint "
                "(`<output>.record.json` with --output, else `<input>.<method>.record.json`)"
                ) in str(refused.value)


def test_report_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        written = write_report(_record(interference=_json_data()), tmp_path / "rep")
    finally:
        os.umask(previous)
    assert {p.suffix for p in written} == {".md", ".png"}
    for path in written:  # not mkstemp's owner-only 0o600
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the report saves (kept open for inspection; an empty file is written in
    place of each PNG, for the report to put in place)."""
    import mtunlearn_ext.report as report

    figures: list[Any] = []

    def keep(fig: Any, path: Path, overwrite: bool = False, dpi: int = 100) -> None:
        figures.append(fig)
        path.write_bytes(b"")

    monkeypatch.setattr(report, "save_png", keep)
    return figures


def test_a_missing_metric_is_marked_not_drawn_as_a_zero_bar(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """A null metric was drawn as a 0 bar, the same as a real 0."""
    import math

    import matplotlib.pyplot as plt

    from mtunlearn_ext.report import MISSING_LABEL, _bar_chart

    figures = _drawn(monkeypatch)
    models = {"before": {"metrics": {"test": {"a": {"accuracy": 0.0}, "b": {"accuracy": 0.5}}}},
              "after": {"metrics": {"test": {"a": {"accuracy": None}, "b": {"accuracy": 0.7}}}}}
    assert _bar_chart(models, "test", tmp_path / "m.png", "before")
    (ax,) = figures[0].axes
    before, after = ax.containers
    assert [bar.get_height() for bar in before] == [0.0, 0.5]  # a real 0: a bar of height 0
    assert math.isnan(after[0].get_height()) and after[1].get_height() == 0.7
    marks = [t for t in ax.texts if t.get_text() == MISSING_LABEL]
    assert len(marks) == 1  # only the missing one, at its bar
    assert marks[0].get_position()[0] == pytest.approx(after[0].get_x() + after[0].get_width() / 2)
    plt.close(figures[0])


@pytest.mark.parametrize(("path", "field"), [
    (("after", "metrics", "test", "a", "accuracy"), "after.metrics.test.a.accuracy"),
    (("before", "mia_auc"), "before.mia_auc"),
    (("report",), "report.curves.forget_loss"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_values_are_refused_naming_the_field(tmp_path: Path, path: tuple[str, ...],
                                                        field: str, value: float) -> None:
    """json.loads accepts NaN/Infinity, which the report drew (or failed on); the docs promise
    "a number or null"."""
    record = json.loads(json.dumps(_record()))  # no dicts shared between before and after
    node: Any = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = {"curves": {"forget_loss": [1.0, value]}} if path == ("report",) else value
    source = json.loads(json.dumps(record))  # as read back: Infinity / NaN
    with pytest.raises(UserInputError, match=rf"^--results: expected a (list of )?finite "
                                             rf"numbers? or nulls? at .*{field}, got"):
        write_report(source, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()


# -- `mtunlearn report`: refusals that leave nothing written --------------------------------------


def _with(path: tuple[str, ...], value: Any, **extra: Any) -> dict[str, Any]:
    record = json.loads(json.dumps(_record(**extra)))
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return record


@pytest.mark.parametrize(("record", "field"), [
    (_with(("after", "metrics", "test", "a", "accuracy"), "0.5"), "after.metrics.test.a.accuracy"),
    (_with(("before", "mia_auc"), "high"), "before.mia_auc"),
    # Found by fuzzing a record's fields: printed with :.4f, never checked (a traceback).
    (_with(("after", "mia_member_auc"), [1]), "after.mia_member_auc"),
    (_with(("interference", "forget_kept", "a"), "n/a", interference=_json_data()),
     "interference.forget_kept.a"),
    (_with(("report",), {"curves": {"forget_loss": [1.0, "x"]}}), "report.curves.forget_loss"),
    (_with(("report",), {"curves": {"forget_loss": [1.0, 0.5]},
                         "curve_steps": {"forget_loss": [0, 1, 2]}}),
     "report.curve_steps.forget_loss"),
])
def test_report_refuses_bad_values_and_writes_nothing(tmp_path: Path, record: dict[str, Any],
                                                      field: str,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    source = tmp_path / "r.json"
    source.write_text(json.dumps(record))
    assert cli.main(["report", "--results", str(source), "--output-dir",
                     str(tmp_path / "rep")]) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --results: expected") and field in err, err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("empty", [None, []], ids=["null", "list"])
def test_null_or_empty_curves_are_no_curves(tmp_path: Path, empty: Any) -> None:
    """The check read `report.curves: null` (or []) as no curves, the chart read it as a
    mapping: an AttributeError traceback (found by fuzzing a record's fields)."""
    for key in ("curves", "curve_steps"):
        record = _with(("report",), {"curves": {"forget_loss": [1.0, 0.5]}, key: empty})
        written = write_report(record, tmp_path / f"rep-{key}")
        assert (tmp_path / f"rep-{key}" / "report.md") in written


def test_report_removes_a_png_written_before_a_failure(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from mtunlearn_ext import report

    def fails_after_writing(data: Any, title: str, path: Any, **kwargs: Any) -> str:
        Path(path).write_bytes(b"half")
        raise ValueError("interference data: failed after writing")

    monkeypatch.setattr(report, "plot_interference", fails_after_writing)
    source = tmp_path / "r.json"
    source.write_text(json.dumps(_record(interference=_json_data())))
    assert cli.main(["report", "--results", str(source), "--output-dir",
                     str(tmp_path / "rep")]) == 2
    assert "--results" in _err(capsys)
    # interference.png too, and the folder the report created (kept only if it existed).
    assert not (tmp_path / "rep").exists()
    (tmp_path / "rep").mkdir()
    assert cli.main(["report", "--results", str(source), "--output-dir",
                     str(tmp_path / "rep")]) == 2
    assert "--results" in _err(capsys)
    assert _listing(tmp_path / "rep") == set()


def test_report_refuses_a_dangling_link_in_the_folder_naming_output_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dangling symbolic link named like a report file passed the exists() check; writing
    failed with `mtunlearn: error: [Errno 17] File exists: ...` (no argument named)."""
    source = tmp_path / "r.json"
    source.write_text(json.dumps(_record()))
    folder = tmp_path / "rep"
    folder.mkdir()
    for name in ("metrics_test.png", "report.md"):
        link = folder / name
        link.symlink_to(tmp_path / "nowhere" / name)
        assert cli.main(["report", "--results", str(source), "--output-dir", str(folder)]) == 2
        err = _err(capsys)
        assert err.startswith("mtunlearn: error: --output-dir: expected a folder without "
                              f"report files, got '{link}'"), err
        assert _listing(folder) == {name} and link.is_symlink()
        link.unlink()


# -- names the user chose (tasks, methods, titles) -------------------------------------------------

ODD_NAMES = ["a|b", "<img src=x onerror=alert(1)>", "R&D", "cost $x$ $\\frac{a$"]


def _odd_record() -> dict[str, Any]:
    metrics = {split: {name: {"accuracy": 0.5} for name in ODD_NAMES}
               for split in ("forget", "retain", "test")}
    return {**_record(), "method": {"name": "my`<m>`|x", "settings": {}},
            "request": {"type": "partial", "target_tasks": [ODD_NAMES[0]], "instance_ids": [1]},
            "before": {"metrics": metrics, "mia_auc": 0.6},
            "after": {"metrics": metrics, "mia_auc": 0.5},
            "report": {"curves": {"forget_loss": [1.0, 0.5]}},
            "interference": {"labels": [f"forget/{ODD_NAMES[3]}", f"retain/{ODD_NAMES[1]}"],
                             "before": [[1.0, -0.5], [-0.5, 1.0]],
                             "after": [[1.0, 0.1], [0.1, 1.0]],
                             "forget_kept": {ODD_NAMES[1]: 0.5}}}


def test_names_with_markup_are_escaped_and_drawn_as_they_are(tmp_path: Path) -> None:
    """A task named 'a|b' split its table row into an extra column, '<img ...>' went into the
    Markdown as raw HTML, a backtick in a method name ended its code span, and a task named
    with '$' signs was parsed by matplotlib as a formula: an unbalanced one made the plot (and
    the report) fail with a mathtext traceback."""
    # The plots draw the names as they are ('$' escaped for matplotlib): no formula is parsed.
    written = write_report(_odd_record(), tmp_path / "rep", title="T <script>")
    assert {p.name for p in written} >= {"report.md", "metrics_test.png", "interference.png"}
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "<img" not in markdown and "<script>" not in markdown and "&lt;img" in markdown
    assert "# T &lt;script&gt;" in markdown and "R&amp;D" in markdown
    assert "``my`<m>`|x``" in markdown  # a code span that the backticks inside cannot end
    # Every table row has as many cells as its header: no '|' of a name splits a cell.
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len({len(re.findall(r"(?<!\\)\|", row)) for row in rows}) == 1, rows
    assert any("a\\|b" in row for row in rows)


def test_names_that_would_italicise_strike_or_link_are_escaped_and_plain_names_are_not(
        tmp_path: Path) -> None:
    """A task named '_x_' rendered as an italic x, '~~old~~' struck through and '[x](y)' as a
    link; three backticks inside a task name closed the experiment report's code block, so the
    rest of its table rendered as Markdown. Intraword underscores (neggrad_plus) cannot start
    emphasis and stay as they are in the raw file."""
    names = ["_x_", "~~old~~", "[x](y)", "neggrad_plus", "a```b"]
    results = {"schema": "mtunlearn_ext.experiment/1",
               "benchmark": {"name": "b", "size": "tiny",
                             "tasks": [{"name": n, "kind": "classification"} for n in names]},
               "request": {"type": "full", "target_tasks": names},
               "models": {label: {"metrics": {"test": {n: {"accuracy": 0.5} for n in names}},
                                  "mia_auc": None} for label in ("original", "retrained")}}
    write_report(results, tmp_path / "rep")
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    cells = [line.split(" | ")[1] for line in lines if line.startswith("| test | ")]
    assert cells == ["\\_x\\_", "\\~\\~old\\~\\~", "\\[x\\](y)", "neggrad_plus", "a\\`\\`\\`b"]
    start = lines.index("````")  # a fence longer than the name's three backticks
    assert lines.index("````", start + 1) > start + 1
    assert "```" not in [line.strip() for line in lines]


def test_control_characters_in_names_are_written_as_escapes(tmp_path: Path) -> None:
    """A task named with an escape sequence put a raw ESC into report.md (a `cat` of it
    recoloured the terminal), a right-to-left override reordered the checkpoint path after it,
    and the plots drew neither: matplotlib warned "Glyph 27 missing" once per character and
    label, which the command printed as a screenful of warnings."""
    task, method = "ki\x1b[31mnd\x00", "m\u202egp.kcab"
    metrics = {split: {task: {"accuracy": 0.5}} for split in ("forget", "retain", "test")}
    record = {**_record(), "method": {"name": method, "settings": {}},
              "request": {"type": "full", "target_tasks": [task], "instance_ids": [1]},
              "output": {"checkpoint": "out\u202ept.exe", "sha256": "0" * 64},
              "before": {"metrics": metrics, "mia_auc": 0.6},
              "after": {"metrics": metrics, "mia_auc": 0.5},
              "report": {"curves": {"forget_loss": [1.0, 0.5]}},
              "interference": {"labels": [f"forget/{task}", f"retain/{task}"],
                               "before": [[1.0, -0.5], [-0.5, 1.0]],
                               "after": [[1.0, 0.1], [0.1, 1.0]], "forget_kept": {task: 0.5}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(record, tmp_path / "rep", title=f"T {task}")
    assert not [str(w.message) for w in caught if "Glyph" in str(w.message)]
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert not re.search("[\x00-\x09\x0b-\x1f\u202e]", markdown), repr(markdown)
    assert "# T ki\\x1b\\[31mnd\\x00" in markdown  # '[' escaped as Markdown, ESC shown
    assert "`out\\u202ept.exe`" in markdown and "`m\\u202egp.kcab`" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len({len(re.findall(r"(?<!\\)\|", row)) for row in rows}) == 1, rows


def test_paths_and_commands_are_shown_exactly(tmp_path: Path) -> None:
    """The code spans of paths and the command line collapsed whitespace: an output checkpoint
    `run  1/u.pt` (two spaces) was shown as `run 1/u.pt`, a path with a line break or a tab
    as one with a space, a cwd ' x ' lost the spaces that Markdown strips from a span's ends:
    each names another file than the one written."""
    record = _record(invocation={"argv": ["unlearn", "--output", "a\tb\nc.pt"], "cwd": " x "})
    record["output"] = {"checkpoint": "run  1/u.pt", "sha256": "0" * 64}
    write_report(record, tmp_path / "rep")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "output `run  1/u.pt` (SHA-256" in markdown
    assert "`mtunlearn unlearn --output 'a\\tb\\nc.pt'`, run in `  x  `" in markdown


def test_a_file_name_that_is_not_utf8_is_written_as_its_escape(tmp_path: Path) -> None:
    """`mtunlearn unlearn --output $'u\\xff.pt'` records the path as Python decodes it, with a
    lone surrogate ('u\\udcff.pt'); the report of that record failed with UnicodeEncodeError
    ("surrogates not allowed") and a traceback, as report.md is UTF-8."""
    record = _record()
    record["output"] = {"checkpoint": "u\udcff.pt", "sha256": "0" * 64}
    write_report(record, tmp_path / "rep")
    assert "output `u\\udcff.pt` (SHA-256" in (tmp_path / "rep" / "report.md").read_text()


def test_a_very_long_name_is_shortened_in_the_plots_and_whole_in_the_text(
        tmp_path: Path) -> None:
    """A plot drew every name whole: a task and a method named with 5,000 characters made each
    bar chart 30,711 x 17,843 pixels (3 MB, refused by image viewers as a decompression bomb),
    and 20,000 characters failed the report with std::bad_alloc. The plots now draw a long
    name's start and end around an ellipsis; the report's text keeps the whole name."""
    import struct

    long_task, long_method = "t" * 1990 + "_task_end", "m" * 1990 + "_method_end"
    metrics = {split: {long_task: {"accuracy": 0.5}} for split in ("forget", "retain", "test")}
    record = {**_record(), "method": {"name": long_method, "settings": {}},
              "request": {"type": "full", "target_tasks": [long_task], "instance_ids": [1]},
              "before": {"metrics": metrics, "mia_auc": 0.6},
              "after": {"metrics": metrics, "mia_auc": 0.5},
              "report": {"curves": {"forget_loss": [1.0, 0.5]}}}
    written = write_report(record, tmp_path / "rep")
    for png in (p for p in written if p.suffix == ".png"):
        width, height = struct.unpack(">II", png.read_bytes()[16:24])  # the IHDR chunk
        assert width < 1500 and height < 1000, (png.name, width, height)
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert f"| {long_task} |" in markdown.replace("\\_", "_") and long_method in markdown


def test_a_method_named_with_a_leading_underscore_is_in_the_legends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib leaves out of a legend every artist whose label starts with '_' (its mark
    of an internal artist): a method named '_mine' had loss curves without a legend entry,
    and an experiment's model '_mine' a bar colour nobody could tell."""
    from mtunlearn_ext import report

    legends: dict[str, list[str]] = {}
    save_png = report.save_png

    def keep_legend(fig: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        legend = fig.axes[0].get_legend()
        legends[path.name] = [] if legend is None else [t.get_text() for t in legend.get_texts()]
        save_png(fig, path, *args, **kwargs)

    monkeypatch.setattr(report, "save_png", keep_legend)
    models = {label: {"metrics": {"test": {"a": {"accuracy": 0.5}}}, "mia_auc": None,
                      "report": {"curves": {"forget_loss": [1.0, 0.5]}}}
              for label in ("_mine", "retrained")}
    results = {"schema": "mtunlearn_ext.experiment/1",
               "benchmark": {"name": "b", "size": "tiny",
                             "tasks": [{"name": "a", "kind": "classification"}]},
               "request": {"type": "full", "target_tasks": ["a"]}, "models": models}
    write_report(results, tmp_path / "rep")
    assert legends["metrics_test.png"] == ["_mine", "retrained"]
    assert legends["loss_curves.png"] == ["_mine forget_loss", "retrained forget_loss"]


def test_a_record_report_compares_before_and_after_side_by_side(tmp_path: Path) -> None:
    """The table listed before and after in separate blocks of rows (a row per model, split and
    task), gave no metric's direction (an error such as mse is better lower), no change and no
    word on the attack AUC; and the report said nothing of the input checkpoint, the ids' hash
    or whether the weights changed, which a reader who must trust the record looks for."""
    record = json.loads(json.dumps(_record(weights_changed=False)))
    for which, value in (("before", 2.0), ("after", None)):
        record[which]["metrics"]["test"]["size"] = {"mse": value}
    record["input"] = {"checkpoint": "/data/orig.pt", "sha256": "ab" * 32}
    record["request"]["ids_sha256"] = "cd" * 32
    write_report(record, tmp_path / "rep")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    lines = markdown.splitlines()
    assert "| split | task | metric | before | after | change |" in lines
    assert "| forget | a | accuracy ↑ | 0.5000 | 0.5000 | +0.0000 |" in lines
    assert "| test | size | mse ↓ | 2.0000 | - | - |" in lines  # a null stays '-'
    assert "| forget | (forget instances) | MIA AUC | 0.6000 | 0.5000 | -0.1000 |" in lines
    rows = [line for line in lines if line.startswith("| ")]
    assert len(rows) == 1 + 3 * 2 + 1 + 1  # header, 3 splits x 2 tasks, size, MIA: one row each
    assert "0.5 means the attack cannot tell them apart" in markdown
    assert f"SHA-256 `{'ab' * 32}`" in markdown and f"SHA-256 `{'cd' * 32}`" in markdown
    assert "output weights differ from the input's: **no: nothing was unlearned**" in markdown
    # Compliance review: the settings, the seed and who chose the ids were not in the report.
    assert ("- method: `interference_aware`, seed not recorded, device not recorded; settings "
            "`{}`") in lines
    assert "- forgotten ids: not recorded" in lines  # a record older than `ids_drawn`
    assert "- command: not recorded" in lines  # a record older than `invocation`
    record["invocation"] = {"argv": ["unlearn", "--forget-ids", "3 7", "--config", "c.yaml"],
                            "imports": [], "config": {"file": "/w/c.yaml", "sha256": "ef" * 32}}
    write_report(record, tmp_path / "rep-invocation")
    lines = (tmp_path / "rep-invocation" / "report.md").read_text().splitlines()
    assert ("- command: `mtunlearn unlearn --forget-ids '3 7' --config c.yaml`; `--config`: "
            f"`/w/c.yaml`, SHA-256 `{'ef' * 32}`") in lines  # an older record: no cwd
    # Reproducibility review: relative paths in the command name files from the folder it ran
    # in, which the record did not keep; nor the --method-config file's SHA-256.
    record["invocation"].update(cwd="/w/sub", method_config={"file": "/w/m.json",
                                                             "sha256": "aa" * 32})
    write_report(record, tmp_path / "rep-cwd")
    lines = (tmp_path / "rep-cwd" / "report.md").read_text().splitlines()
    assert ("- command: `mtunlearn unlearn --forget-ids '3 7' --config c.yaml`, run in `/w/sub`; "
            f"`--config`: `/w/c.yaml`, SHA-256 `{'ef' * 32}`; `--method-config`: `/w/m.json`, "
            f"SHA-256 `{'aa' * 32}`") in lines
    for drawn, said in ((None, "named with --forget-ids"),
                        ({"fraction": 0.1, "seed": 5}, "**drawn at random by the tool** "
                         "(--forget-fraction `0.1`, seed `5`), not named by a request")):
        record["request"]["ids_drawn"] = drawn
        record["seed"], record["method"]["settings"] = 5, {"steps": 3, "lr": 0.01}
        folder = tmp_path / f"rep-{drawn is None}"
        write_report(record, folder)
        lines = (folder / "report.md").read_text().splitlines()
        assert f"- forgotten ids: {said}" in lines
        assert ("- method: `interference_aware`, seed `5`, device not recorded; settings "
                '`{"lr": 0.01, "steps": 3}`') in lines


def test_an_experiment_report_has_a_column_per_model_with_the_retrained_one(
        tmp_path: Path) -> None:
    metrics = {"original": 0.9, "retrained": 0.6, "m": 0.65}
    results = {"schema": "mtunlearn_ext.experiment/1",
               "benchmark": {"name": "b", "size": "tiny",
                             "tasks": [{"name": "a", "kind": "classification"}]},
               "request": {"type": "full", "target_tasks": ["a"]},
               "models": {label: {"metrics": {"forget": {"a": {"accuracy": value}}},
                                  "mia_auc": None} for label, value in metrics.items()}}
    write_report(results, tmp_path / "rep")
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert "| split | task | metric | original | retrained | m |" in lines
    assert "| forget | a | accuracy ↑ | 0.9000 | 0.6000 | 0.6500 |" in lines
    assert not any("MIA AUC |" in line for line in lines)  # no attack measured: no row


def test_plots_give_each_model_one_colour_and_each_task_its_metric(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss-curve chart took a new colour from the 10-colour cycle for every line, forget
    and retain alike: with 6 methods the 11th line (the 6th method's forget loss) was drawn in
    the 1st method's colour and style, and a method's two curves had different colours. The bar
    charts named no metric: an accuracy and an mse (lower is better) shared an unnamed axis."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    figures = _drawn(monkeypatch)
    methods = [f"m{i}" for i in range(6)]
    tasks = [{"name": "a", "kind": "classification"}, {"name": "size", "kind": "regression"}]
    results = {"schema": "mtunlearn_ext.experiment/1",
               "benchmark": {"name": "b", "size": "tiny", "tasks": tasks},
               "request": {"type": "full", "target_tasks": ["a", "size"]},
               "models": {label: {"metrics": {"test": {"a": {"accuracy": 0.5},
                                                       "size": {"mse": 0.2}}},
                                  "report": {"curves": {"forget_loss": [1.0, 2.0],
                                                        "retain_loss": [0.5, 0.4]}}}
                          for label in ["original", "retrained", *methods]}}
    write_report(results, tmp_path / "rep")
    (bars,) = [fig for fig in figures if fig.axes[0].get_title().startswith("test")]
    ticks = [t.get_text() for t in bars.axes[0].get_xticklabels()]
    assert ticks == ["a\naccuracy ↑", "size\nmse ↓"]
    (curves,) = [fig for fig in figures if fig.axes[0].get_title().startswith("loss")]
    colour = {line.get_label(): to_hex(line.get_color()) for line in curves.axes[0].get_lines()}
    for method in methods:  # both curves of a method in its colour, which is its bars' colour
        assert colour[f"{method} forget_loss"] == colour[f"{method} retain_loss"], method
    assert len({colour[f"{m} forget_loss"] for m in methods}) == len(methods)
    bar_colour = {c.get_label(): to_hex(c.patches[0].get_facecolor()) for c in
                  bars.axes[0].containers}
    assert all(bar_colour[m] == colour[f"{m} forget_loss"] for m in methods)
    for fig in figures:
        plt.close(fig)


def test_the_attack_is_read_beside_its_member_auc_and_a_missing_auc_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Data-removal review: the report and the command's table showed the forget set's attack
    AUC without the members' (how well the attack works at all), so 0.92 from an attack at
    chance (member AUC 0.45) read as a verdict; and an AUC not measured was a bare "-" whose
    reason (the record's mia_error) was in the record alone."""
    record = json.loads(json.dumps(_record()))
    record["before"].update(mia_member_auc=0.47)
    record["after"].update(mia_auc=None, mia_member_auc=0.45,
                           mia_error="no forget instance has every task")
    write_report(record, tmp_path / "rep")
    lines = (tmp_path / "rep" / "report.md").read_text().splitlines()
    assert any(line.startswith("| retain | (held-out members) | MIA AUC | 0.4700 | 0.4500 |")
               for line in lines), lines
    assert "MIA AUC not measured: after: no forget instance has every task." in lines
    assert any(line.startswith("**The attack is at chance on the members** (AUC <= 0.55: "
                               "before, after)") for line in lines)
    record["before"]["mia_member_auc"] = record["after"]["mia_member_auc"] = 0.9
    record["after"].update(mia_auc=0.6, mia_error=None)
    write_report(record, tmp_path / "rep2")
    text = (tmp_path / "rep2" / "report.md").read_text()
    assert "at chance" not in text and "not measured:" not in text
    # The command line's table and notes (cli_console._metric_rows / _attack_notes).
    rows = cli_console._metric_rows(record["before"], {**record["after"], "mia_member_auc": 0.45,
                                               "mia_auc": None, "mia_error": "too few"})
    assert rows[-2:] == [["forget", "*", "mia_auc", 0.6, None],
                         ["retain", "*", "mia_member_auc", 0.9, 0.45]]
    assert cli_console._attack_notes({"mia_auc": None, "mia_error": "too few",
                              "mia_member_auc": 0.45}) == [
        "mia_auc not measured: too few",
        "note: the attack tells training members from unseen data no better than chance here "
        "(mia_member_auc 0.45), so its forget-set AUC says nothing about forgetting"]
    assert cli_console._attack_notes({"mia_auc": 0.7, "mia_member_auc": 0.8}) == []


def test_a_record_report_says_how_many_named_instances_this_run_forgot(tmp_path: Path) -> None:
    """Data-removal review: a request naming [3, 48] after 3 had been removed forgot 48 only,
    as the command said, but the report printed "2 instances" beside the SHA-256 of both."""
    record = json.loads(json.dumps(_record()))
    record["request"]["forgotten_instance_ids"] = [2]
    write_report(record, tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert ("2 instances named, **1 forgotten by this run** (the others' pairs were removed by "
            "earlier requests: the ids' SHA-256 covers all named)") in text
    record["request"]["forgotten_instance_ids"] = [1, 2]
    write_report(record, tmp_path / "rep2")
    assert "request on tasks `a`, 2 instances; output" in (
        tmp_path / "rep2" / "report.md").read_text()



def test_the_report_is_utf_8_in_any_locale(tmp_path: Path) -> None:
    """Same command, same bytes, whatever the locale: under a locale whose encoding is not
    UTF-8 (LC_ALL=C with Python's coercion to C.UTF-8 turned off: ASCII) `report` failed with
    a UnicodeEncodeError traceback (exit 1) on report.md's own arrows, and a config's
    non-ASCII title was read in the locale's encoding. Both are UTF-8 now."""
    import subprocess
    import sys

    source = tmp_path / "r.json"
    source.write_text(json.dumps(_record()))
    config = tmp_path / "c.yaml"
    config.write_text("title: Löschung ↑\n", encoding="utf-8")
    written = {}
    for name, locale_env in (("utf-8", {"LC_ALL": "C.UTF-8"}),
                             ("ascii", {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0",
                                        "PYTHONUTF8": "0"})):
        env = {**os.environ, "PYTHONIOENCODING": "utf-8", **locale_env}
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "mtunlearn_ext", "report", "--config",
                               str(config), "--results", str(source), "--output-dir", str(out)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        written[name] = (out / "report.md").read_bytes()
    assert written["ascii"] == written["utf-8"]
    assert "# Löschung ↑" in written["utf-8"].decode("utf-8")


def test_a_report_that_cannot_be_written_says_so_as_the_other_outputs_do(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """CLI contract review: `train`, `unlearn` and `evaluate` end a write failure with the
    system's reason and "nothing was written"; `report` said "[Errno 20] Not a directory:
    'x/rep'" (Python's number, the path again) for a folder it could not make, and nothing
    after a full disk's reason."""
    import errno

    import mtunlearn_ext.report as report

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserInputError) as info:
        write_report(_record(), blocker / "rep")
    assert str(info.value) == (f"--output-dir: expected a folder that can be created, got "
                               f"'{blocker / 'rep'}'; Not a directory; nothing was written")

    def disk_full(*args: Any) -> bool:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report, "_curves_chart", disk_full)
    with pytest.raises(UserInputError, match=r"No space left on device; nothing was written$"):
        write_report(_record(), tmp_path / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_provenance_names_the_environment_the_numbers_depend_on(tmp_path: Path) -> None:
    """Reproducibility audit: report.md named the code, seed and settings but not the thread
    count, torch build or CPU kernels, which the weights' last bits follow (indoor at 1 and 2
    threads gave other checkpoints and metrics); the record had them."""
    environment = {"torch": "2.14.1+cu130", "python": "3.11.9", "threads": 2,
                   "extension": False, "cpu_isa": {"torch": "AVX512", "mtunlearn_ext": "avx2"}}
    write_report(_record(environment=environment), tmp_path / "rep", title="t")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    (line,) = [x for x in markdown.splitlines() if x.startswith("- environment:")]
    assert line == ("- environment: torch `2.14.1+cu130`, Python `3.11.9`, intra-op threads `2`, "
                    "ops **the Python fallback**, CPU kernels `AVX512` (torch), `avx2` "
                    "(mtunlearn_ext)")
    write_report(_record(), tmp_path / "old", title="t")  # an older record: said, not guessed
    assert "- environment: not recorded" in (tmp_path / "old" / "report.md").read_text()
