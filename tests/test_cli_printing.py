"""What ``mtunlearn`` prints, and on which stream: ``evaluate``'s JSON alone on stdout (read
through a pipe) with its summary table on stderr, or the table on stdout with ``--output``; no MIA
row without a request; one line, exit 141, when the reader closes the pipe; and ``benchmark
--dry-run``'s "would run"."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from test_cli import ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _benchmark as cli_benchmark
from mtunlearn_ext.cli import _console as cli_console
from mtunlearn_ext.cli import _run as cli_run

# Runs our scripts and command line end to end: left out of scripts/test_matrix.sh's
# legs by default (they run in the main suite; the legs check the library on other
# torch and Python versions).
pytestmark = pytest.mark.end_to_end


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


# -- evaluate: the JSON on stdout, the table beside it --------------------------------------------


def test_evaluate_stdout_is_pure_json_and_the_table_has_real_headers(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--quiet"]) == 0
    printed = capsys.readouterr()
    payload = json.loads(printed.out)  # the whole of stdout, nothing before or after
    assert set(payload["metrics"]) == {"train", "test"}
    header = printed.err.splitlines()[0].split()
    assert header == ["split", "task", "metric", "value"], printed.err
    assert re.search(r"^train\s+digit\s+accuracy\s+\d\.\d{4}\s*$", printed.err, flags=re.M)
    # With --output the file holds the JSON and the table is the summary on stdout.
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--output", str(out),
                     "--quiet"]) == 0
    printed = capsys.readouterr()
    assert json.loads(out.read_text()) == payload
    assert printed.out.split()[:4] == ["split", "task", "metric", "value"] and not printed.err


def test_evaluate_pipes_into_a_json_reader(trained: Path) -> None:  # noqa: F811
    """The reviewer's pipe: `mtunlearn evaluate ... --quiet | python -c json.load(...)`."""
    reader = f"{shlex.quote(sys.executable)} -c 'import json,sys; json.load(sys.stdin)'"
    command = (f"{shlex.quote(sys.executable)} -m mtunlearn_ext.cli evaluate --checkpoint "
               f"{shlex.quote(str(trained))} --quiet --threads 1 | {reader}")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "metric" in proc.stderr  # the summary table, on stderr


def test_python_dash_m_on_the_package_runs_the_command_line() -> None:
    """Docs review: `python -m mtunlearn_ext --help` failed (no __main__), where `mtunlearn`
    and `python -m mtunlearn_ext.cli` work; now all three are the same command, exit codes
    included."""
    helped = subprocess.run([sys.executable, "-m", "mtunlearn_ext", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: mtunlearn ") and "unlearn" in helped.stdout
    refused = subprocess.run([sys.executable, "-m", "mtunlearn_ext", "unlearn"],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--checkpoint" in refused.stderr, refused.stderr


def test_evaluate_without_a_request_has_no_mia_row(trained: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Without a request there is no forget split: the summary printed `forget * mia_auc - -`.
    (Without --output the table is on stderr, the JSON alone on stdout.)"""
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--quiet"]) == 0
    table = capsys.readouterr().err
    assert "train" in table and "mia_auc" not in table and "forget" not in table, table
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--quiet"]) == 0
    table = capsys.readouterr().err
    assert re.search(r"^forget\s+\*\s+mia_auc", table, flags=re.M), table


# -- a reader that closes the pipe ----------------------------------------------------------------


def test_a_closed_stdout_pipe_is_one_line_not_a_traceback(trained: Path) -> None:  # noqa: F811
    """`mtunlearn evaluate ... | head` closed the pipe under the JSON print: a BrokenPipeError
    traceback (and a second one from the interpreter's final flush). `true` closes the pipe
    at once, seconds before evaluate prints."""

    command = (f"{sys.executable} -m mtunlearn_ext.cli evaluate --checkpoint {trained} "
               "--threads 1 | true; echo \"rc=${PIPESTATUS[0]}\" >&2")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert "mtunlearn: stdout was closed by its reader" in proc.stderr, proc.stderr
    assert "rc=141" in proc.stderr, proc.stderr


# -- benchmark --dry-run says what would run ------------------------------------------------------


def test_benchmark_dry_run_says_would_run(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["benchmark", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would run: ") and "running" not in out, out
    # A real run still says it is running (the subprocess itself is stubbed out here).
    calls: list[list[str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli_benchmark.subprocess, "run", fake_run)
    assert cli.main(["benchmark"]) == 0
    assert capsys.readouterr().out.startswith("running: ") and len(calls) == 1


# -- a retain split limited by --retain-ids: said, and measurable by evaluate ---------------------


def test_a_limited_retain_split_is_said_and_evaluate_measures_it(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """CLI review: with --retain-ids the record and report showed metrics of a 10-instance
    retain split, `evaluate` (which had no --retain-ids) those of the whole retain set, and
    report.md did not say that the split was limited."""
    out = tmp_path / "u.pt"
    retain = ids(*range(10, 20))
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--retain-ids", retain, "--method-config", '{"steps": 3}', "--output",
                     str(out), "--quiet"]) == 0
    assert ("retain split: 30 pairs of 10 instances, limited by --retain-ids to 10 instances "
            "(the retain metrics describe these only)") in capsys.readouterr().out
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert cli.main(["evaluate", "--checkpoint", str(out), "--forget-ids", ids(1, 2),
                     "--retain-ids", retain, "--quiet"]) == 0
    printed = capsys.readouterr()
    evaluated = json.loads(printed.out)
    assert evaluated["metrics"] == record["after"]["metrics"]
    assert evaluated["mia_auc"] == record["after"]["mia_auc"]
    assert evaluated["retain_split"] == {"pairs": 30, "instances": 10,
                                         "retain_ids": [int(i) for i in retain.split(",")],
                                         "earlier_removals_excluded": 0}
    assert "limited by --retain-ids to 10 instances" in printed.err  # beside the table
    # Without a request there is no retain split: refused like the other request options.
    assert cli.main(["evaluate", "--checkpoint", str(out), "--retain-ids", retain]) == 2
    assert "--retain-ids: expected --forget-ids or --forget-fraction with it" in \
        capsys.readouterr().err
    folder = tmp_path / "rep"
    assert cli.main(["report", "--results", str(out) + ".record.json", "--output-dir",
                     str(folder), "--quiet"]) == 0
    report = (folder / "report.md").read_text()
    assert ("Retain split: limited by `--retain-ids` to 10 instances (30 pairs), not the whole "
            "retain set: the retain metrics and the attack's member set describe these "
            "instances only.") in report
    # A run without --retain-ids says that its retain split is the whole retain set.
    whole = tmp_path / "w.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", '{"steps": 3}', "--output", str(whole), "--quiet"]) == 0
    assert cli.main(["report", "--results", str(whole) + ".record.json", "--output-dir",
                     str(tmp_path / "rep2"), "--quiet"]) == 0
    assert ("Retain split: every training pair outside the request (894 pairs)."
            in (tmp_path / "rep2" / "report.md").read_text())


def test_a_closed_stdout_pipe_leaves_no_descriptor_open(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """Pointing stdout at /dev/null kept the descriptor it opened for that: one more open
    descriptor at every closed pipe of a process that runs main() again and again."""

    def reader_gone(parser: object, argv: object) -> None:
        raise BrokenPipeError

    def open_descriptors() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("counts descriptors through /proc/self/fd (Linux)")
    monkeypatch.setattr(cli_run, "_refuse_command_as_import", reader_gone)
    with open(tmp_path / "stdout", "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        before = open_descriptors()
        assert [cli.main(["evaluate"]) for _ in range(3)] == [141] * 3
        assert open_descriptors() == before


# -- names holding control characters are shown, not obeyed ---------------------------------------

#: A task name a benchmark module may give: an escape sequence (red text), a carriage return
#: (back to the line's start) and a right-to-left override.
ACTING_NAME = "ki\x1b[31mnd\rX\u202egp"

ACTING_PLUGIN = '''
import torch

from mtunlearn_ext.data import Benchmark, MultiTaskDataset, TaskSpec, register_benchmark

TASKS = [TaskSpec({name!r}, "classification", num_classes=2), TaskSpec("size", "regression")]


@register_benchmark("acting_names")
def acting(seed, size, data_root):
    gen = torch.Generator().manual_seed(seed)

    def split(n, first_id):
        x = torch.randn(n, 4, generator=gen)
        targets = {{TASKS[0].name: (x[:, 0] > 0).long(), "size": x[:, 1:2]}}
        return MultiTaskDataset(x, targets, TASKS, ids=torch.arange(first_id, first_id + n))

    return Benchmark("acting_names", split(40, 0), split(20, 1000), TASKS,
                     info={{"train_config": {{"epochs": 1, "batch_size": 16}}}})
'''


def test_control_characters_in_a_task_name_are_printed_as_escapes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        registries_restored: None) -> None:
    """A task name's ESC sequence reached the terminal as it was (the table's task column
    turned red, and stayed so), its CR sent the cursor back over the row, and the width of
    the column counted the escape's characters, which take no column."""
    (tmp_path / "acting_plugin.py").write_text(ACTING_PLUGIN.format(name=ACTING_NAME))
    monkeypatch.chdir(tmp_path)
    plugin = ["--import", "acting_plugin", "--quiet", "--threads", "1"]
    assert cli.main(["train", "--benchmark", "acting_names", "--output", "o.pt", *plugin]) == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", "o.pt", "--output", "m.json", *plugin]) == 0
    out = capsys.readouterr().out
    assert not re.search("[\x00-\x09\x0b-\x1f\u202e]", out), repr(out)
    shown = r"ki\x1b[31mnd\rX\u202egp"
    rows = [line for line in out.splitlines() if shown in line]
    assert len(rows) == 2, out  # train and test, each on one line
    # The columns line up: every row's metric starts where the header's does.
    header = out.splitlines()[0]
    assert {row.index("accuracy") for row in rows} == {header.index("metric")}, out
    # The JSON keeps the name itself: only what is shown is escaped.
    assert ACTING_NAME in json.loads((tmp_path / "m.json").read_text())["metrics"]["test"]


def test_tables_align_names_of_wide_characters_by_the_columns_they_take() -> None:
    """The tables were padded by character count: a CJK task name takes two terminal columns
    a character, so every cell after it in its row was shifted right by its length."""
    from mtunlearn_ext._text import display_width
    from mtunlearn_ext.experiment import format_table

    table = cli_console._table([["test", "距离", "accuracy"], ["test", "depth", "mse"]],
                       ["split", "task", "metric"])
    starts = {display_width(line[:line.index(metric)])
              for line, metric in zip(table.splitlines(), ["metric", "", "accuracy", "mse"])
              if metric}
    assert len(starts) == 1, table
    results = {"benchmark": {"tasks": [{"name": "a", "kind": "classification"}]},
               "request": {"target_tasks": ["a"]},
               "models": {label: {"metrics": {"test": {"a": {"accuracy": 0.5}}}}
                          for label in ("原始模型", "retrained")}}
    lines = format_table(results).splitlines()[:4]
    ends = {display_width(line) for i, line in enumerate(lines) if i != 1}
    assert len(ends) == 1, lines  # every row's last column ends at the same column


def test_a_method_name_with_an_escape_is_refused_and_shown_as_one(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str], registries_restored: None) -> None:
    """A registered method's name with an ESC sequence recoloured the terminal in `unlearn`'s
    progress bar (stderr) and the method's step bar. Such a name is now refused when it is
    registered (register_unlearner takes identifier-like names), and the refusal shows it as
    an escape; an unregistered method's step bar (the API's `progress=True`) shows it so too."""
    from test_cli_plugins import PLUGIN  # a method registered by a module of the user's

    (tmp_path / "acting_method.py").write_text(PLUGIN.format(name="red\\x1b[31mretain"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method", "red\x1b[31mretain", "--output", "u.pt", "--threads", "1",
                     "--import", "acting_method"]) == 2
    printed = capsys.readouterr()
    assert "\x1b[31m" not in printed.err + printed.out
    assert "must be an identifier-like string" in printed.err, printed.err
    assert r"got 'red\x1b[31mretain'" in printed.err, printed.err
    assert not (tmp_path / "u.pt").exists()
    from mtunlearn_ext.api._unlearn import progress_bar
    from mtunlearn_ext.unlearning import GradientUnlearner

    class Quiet(GradientUnlearner):  # not registered: the registry refuses its name
        name = "red\x1b[31mretain"

        def compute_update(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
            return self.weighted_update(ctx, None, retain_batch)

    bar = progress_bar(Quiet())
    try:
        assert bar.desc == r"red\x1b[31mretain"
    finally:
        bar.close()


def _save_api_record(path: Path) -> None:
    """A one-step Python-API unlearning saved at ``path`` with its record beside it."""
    import mtunlearn_ext
    from mtunlearn_ext import ForgetRequest
    from test_api_validation import TASKS, _data, _trunk, _TwoHeads

    x, y = _data()
    model = _TwoHeads()
    new, report = mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=(x, y),
                                        forget_request=ForgetRequest.create(range(5)),
                                        shared_parameters=_trunk, config={"steps": 1})
    mtunlearn_ext.save_unlearned(new, report, path, original=model)


def test_a_path_with_a_line_break_stays_on_its_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`verify` of a record whose checkpoint is named 'u\\n.pt' printed 'verified: .../u' and
    '.pt against ...' as two lines, as if they were two messages."""
    _save_api_record(tmp_path / "u\n.pt")
    assert cli.main(["verify", "--record", str(tmp_path / "u\n.pt.record.json")]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"verified: {tmp_path}/u\\n.pt against {tmp_path}/u\\n.pt.record"), last


def test_benchmark_runs_at_the_threads_given(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """CLI contract review: `benchmark --threads 2` set the count of the command's own process
    only; the benchmark it starts ran at torch's default, every core, and the printed command
    did not say otherwise. The count now reaches the benchmark (OMP_NUM_THREADS, which torch
    reads as its default) and the printed command shows it."""
    assert cli.main(["benchmark", "--dry-run", "--threads", "2"]) == 0
    assert capsys.readouterr().out.startswith("would run: OMP_NUM_THREADS=2 ")
    envs: list[Mapping[str, str]] = []

    def fake_run(command: list[str], env: Mapping[str, str],
                 **kwargs: object) -> subprocess.CompletedProcess[str]:
        envs.append(env)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli_benchmark.subprocess, "run", fake_run)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert cli.main(["benchmark", "--threads", "2"]) == 0
    assert capsys.readouterr().out.startswith("running: OMP_NUM_THREADS=2 ")
    assert cli.main(["benchmark"]) == 0  # without --threads: the caller's environment
    assert [env["OMP_NUM_THREADS"] for env in envs] == ["2", "7"]


def test_verify_json_of_a_save_unlearned_record(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`verify --json` of the Python API's record: the same object, with nothing measured (no
    tolerance), the table on stderr."""
    import mtunlearn_ext
    from mtunlearn_ext import ForgetRequest
    from test_api_validation import TASKS, _data, _trunk, _TwoHeads

    x, y = _data()
    model = _TwoHeads()
    new, report = mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=(x, y),
                                        forget_request=ForgetRequest.create(range(5)),
                                        shared_parameters=_trunk, config={"steps": 1})
    mtunlearn_ext.save_unlearned(new, report, tmp_path / "u.pt", original=model)
    assert cli.main(["verify", "--record", str(tmp_path / "u.pt.record.json"), "--json"]) == 0
    captured = capsys.readouterr()
    verdict = json.loads(captured.out)
    assert verdict["verified"] is True and verdict["tolerance"] is None
    assert verdict["checkpoint"] == str(tmp_path / "u.pt") and verdict["mismatches"] == []
    assert "(files and hashes only)" in captured.err
