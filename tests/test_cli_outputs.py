"""The files ``mtunlearn`` writes (checkpoints, records): output paths refused before any work
(names too long for the file system, dangling links, a file where a folder should be, folders
that cannot be written to), names at the file system's limit, an output made by a concurrent
run, a write failing after another output was written, interrupts (Ctrl-C, SIGTERM: exit 130)
that leave no output and no temporary file, and ``train``'s reproducible checkpoint file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import _err, _train
from test_cli import FAST, _listing, _unlearn, ids, trained  # noqa: F401  (trained: a fixture)

import mtunlearn_ext
from mtunlearn_ext import _io, cli
from mtunlearn_ext.cli import _report as cli_report
from mtunlearn_ext.cli import _run as cli_run
from mtunlearn_ext.unlearning import available_unlearners
from mtunlearn_ext._io import sha256_of_file
from mtunlearn_ext.workflow import OutputTransaction, UserInputError

# Runs our scripts and command line end to end: left out of scripts/test_matrix.sh's
# legs by default (they run in the main suite; the legs check the library on other
# torch and Python versions).
pytestmark = pytest.mark.end_to_end


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


# -- output paths checked before the run ----------------------------------------------------------


def test_reserve_refuses_paths_that_cannot_be_created(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mtunlearn_ext._io import name_max

    limit = name_max(tmp_path)
    with OutputTransaction() as tx:
        for path in (tmp_path / ("r" * (limit + 1)), tmp_path / ("d" * (limit + 1)) / "x.pt"):
            with pytest.raises(UserInputError, match=rf"^--record: expected file and folder "
                                                     rf"names of at most {limit} bytes"):
                tx.reserve("--record", path)
        # Bytes, not characters: 128 two-byte characters are 256 bytes.
        with pytest.raises(UserInputError, match="has 256 bytes"):
            tx.reserve("--record", tmp_path / ("é" * 128))
        with pytest.raises(UserInputError, match="--output: expected a file path, got .*NUL"):
            tx.reserve("--output", str(tmp_path / "a\0b.pt"))
        assert tx.reserve("--output", tmp_path / ("o" * limit)).name == "o" * limit
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
        with pytest.raises(UserInputError, match="--record: expected a path in a folder you can "
                                                 "write to, got .* is not writable"):
            tx.reserve("--record", tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_no_one_can_write_to_is_refused_also_as_root() -> None:
    """os.access says root may write anywhere: an output under /proc passed the check as root
    and failed only after the whole run."""
    with OutputTransaction() as tx:
        with pytest.raises(UserInputError, match=r"^--output: expected a path in a folder you "
                                                 r"can write to, got '/proc/mtunlearn-out.pt'; "
                                                 r"'/proc' is not writable \(making a file "
                                                 r"there failed: "):
            tx.reserve("--output", "/proc/mtunlearn-out.pt")


def test_outputs_are_refused_before_the_run_when_they_cannot_be_written(tmp_path: Path) -> None:
    """A dangling symbolic link passed (exists() follows it) and so did a path under a file;
    both failed only after the whole run, naming no option."""
    dangling = tmp_path / "out.pt"
    dangling.symlink_to(tmp_path / "nowhere" / "target.pt")
    a_file = tmp_path / "afile"
    a_file.write_text("")
    with OutputTransaction() as tx:
        with pytest.raises(UserInputError, match="--output: expected a path that does not "
                                                 "exist yet"):
            tx.reserve("--output", dangling)
        with pytest.raises(UserInputError, match=r"--record: expected a path in a folder, got "
                                                 r".*afile/x.json.* is a file, not a folder"):
            tx.reserve("--record", a_file / "x.json")
        assert tx.reserve("--output", tmp_path / "new" / "deeper" / "x.pt").name == "x.pt"
        # CLI review: Path() drops a trailing separator, so "newdir/" became a file newdir.
        for folder in (f"{tmp_path}/newdir/", ".", f"{tmp_path}/.."):
            with pytest.raises(UserInputError, match=r"--record: expected a file path, got "
                                                     r".*; it names a folder"):
                tx.reserve("--record", folder)
    assert not (tmp_path / "newdir").exists()


def test_unlearn_refuses_a_folder_as_the_checkpoint_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: `--checkpoint .` (or `/`) failed with a traceback (ValueError: "has an
    empty name") while naming the default outputs."""
    for folder in (".", "/"):
        assert cli.main(["unlearn", "--checkpoint", folder, "--forget-ids", "3",
                         "--quiet"]) == 2
        assert _err(capsys) == (f"mtunlearn: error: --checkpoint: expected a checkpoint file, "
                                f"got '{folder}'; it names a folder")


def test_an_empty_required_option_says_it_came_empty(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """CLI review: `--checkpoint ""` said "got None", as if the option had been left out."""
    assert cli.main(["unlearn", "--checkpoint", "", "--forget-ids", "3", "--quiet"]) == 2
    assert _err(capsys) == ("mtunlearn: error: --checkpoint: expected a value (flag or config "
                            "key), got ''; `mtunlearn unlearn` requires it")


def _fail_if_run(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the method ran although an output could not be written")


def test_unlearn_refuses_a_path_over_the_system_limit_before_any_work(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: only each name's length was checked up front, so an output path of more
    than PATH_MAX (4096) bytes, every name legal, failed after the whole run (exit 2, "File
    name too long")."""
    from mtunlearn_ext import workflow

    monkeypatch.setattr(workflow, "run_unlearning", _fail_if_run)
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # past 4096 bytes with the file's name
    assert _unlearn(trained, deep / "u.pt", "--forget-ids", ids(1, 2)) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --output: expected a path shorter than 4096 "
                          "bytes (the system's limit"), err
    assert _listing(tmp_path) == set()


def test_unlearn_refuses_a_record_name_too_long_before_any_work(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """A --record name over the file system's limit passed reserve() (lexists() is False on
    any OSError): the whole method ran, the checkpoint was written, the record failed with
    ENAMETOOLONG, and the cleanup's own ENAMETOOLONG left the checkpoint behind (traceback,
    exit 1)."""
    from mtunlearn_ext import workflow

    monkeypatch.setattr(workflow, "run_unlearning", _fail_if_run)
    monkeypatch.chdir(tmp_path)
    long_record = "r" * 260 + ".json"
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-ids", ids(1, 2),
                    "--record", long_record) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --record: expected file and folder names of at "
                          "most"), err
    assert "choose a shorter name" in err, err
    assert _listing(tmp_path) == set()
    # A folder still to be created is checked too, and so is a default name made too long.
    assert _unlearn(trained, tmp_path / ("d" * 300) / "u.pt", "--forget-ids", ids(1, 2)) == 2
    assert _err(capsys).startswith("mtunlearn: error: --output: expected file and folder "
                                   "names of at most")
    long_input = tmp_path / ("i" * 240 + ".pt")
    shutil.copy(trained, long_input)
    assert cli.main(["unlearn", "--checkpoint", str(long_input), "--forget-ids", ids(1, 2),
                     "--quiet"]) == 2
    assert _err(capsys).startswith("mtunlearn: error: --output: expected file and folder "
                                   "names of at most")
    assert _listing(tmp_path) == {long_input.name}


def test_a_default_record_in_the_way_is_refused_as_the_outputs(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: `unlearn --output u.pt` beside an earlier run's u.pt.record.json was
    refused as `--record: ...; choose a new path`, an option the user never gave. The error
    names --output, the file in the way, that it is the record --output implies, and the two
    ways out; given --record, the refusal stays the plain one."""
    from mtunlearn_ext import workflow
    from mtunlearn_ext._io import name_max

    monkeypatch.setattr(workflow, "run_unlearning", _fail_if_run)
    stale = tmp_path / "u.pt.record.json"
    stale.write_text("{}")
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-ids", ids(1, 2)) == 2
    assert _err(capsys) == (
        f"mtunlearn: error: --output: expected a path that does not exist yet, got "
        f"'{stale}'; refusing to overwrite; the file is --record's default, named after "
        "--output (--record was not given): pass --record, or choose another --output")
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-ids", ids(1, 2),
                    "--record", str(stale)) == 2
    assert _err(capsys) == (
        f"mtunlearn: error: --record: expected a path that does not exist yet, got "
        f"'{stale}'; refusing to overwrite; choose a new path")
    # A legal --output whose record name is one the file system refuses.
    name = "o" * (name_max(tmp_path) - 3) + ".pt"
    assert _unlearn(trained, tmp_path / name, "--forget-ids", ids(1, 2)) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --output: expected file and folder names of at "
                          "most"), err
    assert err.endswith("the file is --record's default, named after --output (--record was "
                        "not given): pass --record, or choose another --output"), err
    assert _listing(tmp_path) == {stale.name}
    assert stale.read_text() == "{}"


def test_train_writes_a_legal_name_of_the_longest_length(tmp_path: Path) -> None:
    """The temporary file `.{name}.XXXXXXXX.tmp` is 14 characters longer than the target: a
    legal name over 241 characters trained, then failed with ENAMETOOLONG."""
    from mtunlearn_ext._io import name_max

    name = "o" * (name_max(tmp_path) - 3) + ".pt"
    assert _train(tmp_path / name) == 0
    assert _listing(tmp_path) == {name}


# -- an output that appears during the run is named by its argument -------------------------------


def _racing_checkpoint_writes(monkeypatch: pytest.MonkeyPatch, runs: int) -> None:
    """The first ``runs`` checkpoint writes find their name taken by another run that chose
    the same name and got there first (made between this run's choice and its write)."""
    import mtunlearn_ext.training as training

    real = training.save_checkpoint
    lost = [0]

    def racing(path: Path, *args: Any, **kwargs: Any) -> str:
        if lost[0] < runs:
            lost[0] += 1
            path.write_bytes(b"the other run's")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", racing)


def _unlearn_racing(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    runs: int, *options: str) -> int:
    """`unlearn` of a copy of ``trained`` in ``tmp_path`` while a concurrent run takes each of
    the first ``runs`` checkpoint names this run tries; its exit code."""
    _racing_checkpoint_writes(monkeypatch, runs=runs)
    shutil.copy(trained, tmp_path / "orig.pt")
    monkeypatch.chdir(tmp_path)
    return cli.main(["unlearn", "--checkpoint", "orig.pt", "--forget-ids", ids(1),
                     "--method-config", FAST, "--quiet", *options])


def test_an_output_named_with_output_and_made_by_a_concurrent_run_names_the_argument(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _unlearn_racing(trained, tmp_path, monkeypatch, 1, "--output", "mine.pt") == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --output: expected a path that does not exist "
                          "yet, got 'mine.pt'; the file appeared during the run"), err
    assert "overwrite=True" not in err
    assert (tmp_path / "mine.pt").read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pt", "orig.pt"]


@pytest.mark.parametrize("taken", [1, 2])
def test_a_default_name_taken_by_a_concurrent_run_moves_to_the_next_number(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str], taken: int) -> None:
    """Two runs on one input without --output chose the same default name; the one that
    wrote second failed ("the file appeared during the run ... run it again", blaming an
    --output never given) and its computed model was lost. Now it takes the next free
    name, as a run started after the other would (a first request's branch letter: `-1b`,
    `-1c`), with the record beside it naming it."""
    assert _unlearn_racing(trained, tmp_path, monkeypatch, taken) == 0
    capsys.readouterr()
    stem = "orig.interference_aware"
    others = [f"{stem}.pt"] + [f"{stem}-1{letter}.pt" for letter in "bc"[:taken - 1]]
    mine = f"{stem}-1{'bc'[taken - 1]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["orig.pt", *others, f"{mine}.pt", f"{mine}.record.json"])
    for other in others:
        assert (tmp_path / other).read_bytes() == b"the other run's"
    record = json.loads((tmp_path / f"{mine}.record.json").read_text())
    assert record["output"] == {"checkpoint": str((tmp_path / f"{mine}.pt").resolve()),
                                "sha256": sha256_of_file(tmp_path / f"{mine}.pt")}
    assert cli.main(["verify", "--record", f"{mine}.record.json", "--quiet"]) == 0


def test_a_taken_default_checkpoint_name_keeps_the_record_named_with_record(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _unlearn_racing(trained, tmp_path, monkeypatch, 1, "--record", "mine.json") == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["orig.pt", "orig.interference_aware.pt", "orig.interference_aware-1b.pt", "mine.json"])
    record = json.loads((tmp_path / "mine.json").read_text())
    assert record["output"]["checkpoint"] == str(
        (tmp_path / "orig.interference_aware-1b.pt").resolve())
    assert cli.main(["verify", "--record", "mine.json", "--quiet"]) == 0


# -- a failed write removes what was written ------------------------------------------------------


def test_an_output_write_failing_is_one_line_and_removes_what_was_written(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError while writing an output (disk full, ...) after the checkpoint was written:
    a traceback before; now one line naming the argument, exit 2, the checkpoint removed."""
    import errno

    from mtunlearn_ext import records

    def disk_full(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records, "write_record", disk_full)
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-ids", ids(1, 2)) == 2
    err = _err(capsys)
    # The record is --output's (no --record given): the error names --output and says so.
    assert err.startswith("mtunlearn: error: --output: expected a path that can be written, "
                          f"got '{tmp_path / 'u.pt.record.json'}'"), err
    assert "No space left on device" in err and "nothing was written" in err, err
    assert err.endswith("the file is --record's default, named after --output (--record was "
                        "not given)"), err
    assert _listing(tmp_path) == set()


def test_cleanup_removes_every_output_past_one_it_cannot_remove(tmp_path: Path) -> None:
    """__exit__ caught only FileNotFoundError: unlinking a path whose name the file system
    refuses (ENAMETOOLONG) raised, and the checkpoint written before it stayed. The write's
    own OSError is a UserInputError naming the argument."""
    from mtunlearn_ext._io import write_text_new

    written = tmp_path / "u.pt"
    too_long = tmp_path / ("r" * 300 + ".json")
    with pytest.raises(UserInputError, match=r"^--record: expected a path that can be "
                                             r"written, got .*File name too long"):
        with OutputTransaction() as tx:
            tx.outputs["--output"], tx.outputs["--record"] = written, too_long  # not reserved
            tx.write(written, lambda p: write_text_new(p, "checkpoint"))
            assert written.is_file()
            tx.write(too_long, lambda p: write_text_new(p, "record"))
    assert list(tmp_path.iterdir()) == []


# -- interrupts (Ctrl-C, SIGTERM): exit 130, nothing left -----------------------------------------


def test_interrupted_unlearn_leaves_no_temporary_file(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's tmp_leak.py: the CLI's own interrupt handling around the write."""
    shutil.copy(trained, tmp_path / "orig.pt")
    monkeypatch.chdir(tmp_path)

    def interrupted() -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_io, "_umask", interrupted)
    assert cli.main(["unlearn", "--checkpoint", "orig.pt", "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--quiet"]) == 130
    assert "interrupted" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orig.pt"]


def test_sigterm_exits_130_and_leaves_nothing(trained: Path, tmp_path: Path,  # noqa: F811
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from mtunlearn_ext import records

    sha = sha256_of_file(trained)
    handler = signal.getsignal(signal.SIGTERM)

    def terminated(*args: object, **kwargs: object) -> str:
        # A real SIGTERM after the checkpoint is written, while the record is being written.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(records, "write_record", terminated)
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-ids", ids(1, 2)) == 130
    err = _err(capsys)
    assert err.startswith("mtunlearn: interrupted") and "no output was written" in err, err
    assert _listing(tmp_path) == set() and sha256_of_file(trained) == sha
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_sigterm_while_the_checkpoint_is_written_exits_130(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review (intr.py): SIGTERM while torch.save wrote the checkpoint gave exit 1 and the
    traceback `RuntimeError: [enforce fail at inline_container.cc:672] unexpected pos`: the
    zip writer's second failure hid the interrupt. It is exit 130 and the `interrupted` line."""
    real_fdopen = os.fdopen

    class Terminated:
        def __init__(self, fd: int, mode: str) -> None:
            self.file, self.written = real_fdopen(fd, mode), 0

        def write(self, data: Any) -> int:
            self.written += memoryview(data).nbytes
            if self.written > 2048:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler interrupts this
            return int(self.file.write(data))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(_io.os, "fdopen",
                        lambda fd, mode="r", *a: Terminated(fd, mode) if "b" in mode
                        else real_fdopen(fd, mode, *a))
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-ids", ids(1, 2)) == 130
    monkeypatch.undo()
    err = _err(capsys)
    assert err == ("mtunlearn: interrupted by SIGTERM; no output was written, inputs are "
                   "unchanged"), err
    assert _listing(tmp_path) == set()


def test_an_interrupt_after_the_outputs_are_complete_says_they_are(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: an interrupt while the summary was printed (the outputs already committed)
    said "no output was written", yet the checkpoint and record were there, complete."""
    real_print = print

    def interrupted_summary(*args: object, **kwargs: object) -> None:
        if kwargs.get("file") is None and args and "u.pt" in str(args[0]):
            raise KeyboardInterrupt
        real_print(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.print", interrupted_summary)
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(tmp_path / "u.pt"),
                     "--quiet"]) == 130
    monkeypatch.undo()
    err = _err(capsys)
    assert (f"mtunlearn: interrupted after its outputs were written in full "
            f"({tmp_path / 'u.pt'}, {tmp_path / 'u.pt.record.json'}); inputs are unchanged"
            in err), err
    assert _listing(tmp_path) == {"u.pt", "u.pt.record.json"}
    assert cli.main(["verify", "--record", str(tmp_path / "u.pt.record.json")]) == 0


def test_an_interrupted_report_says_its_files_were_written(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """Final review: `report` writes its files itself (not through an output transaction), so
    an interrupt during its summary still said "no output was written" beside the files."""
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    real_table = cli_report._table

    def interrupted_table(*args: Any, **kwargs: Any) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_report, "_table", interrupted_table)
    folder = tmp_path / "report"
    assert cli.main(["report", "--results", str(out) + ".record.json", "--output-dir",
                     str(folder), "--quiet"]) == 130
    monkeypatch.setattr(cli_report, "_table", real_table)
    err = _err(capsys)
    assert err.startswith("mtunlearn: interrupted after its outputs were written in full (")
    assert str(folder / "report.md") in err and (folder / "report.md").is_file()


def test_a_signal_as_the_report_lands_keeps_the_complete_report_and_says_so(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """The files were registered as complete only after write_report returned: a SIGINT in
    between (then: as report.md's last byte landed) removed a complete report, or, a moment
    later, left it beside "no output was written". Now the signal is held until the files are
    registered, the report stays and the message says it was written in full. (SIGTERM: the
    command installs its own handler for it, whereas SIGINT is ignored in a process started in
    the background by a non-interactive shell, as CI may start the tests.)"""
    import os
    import signal

    from mtunlearn_ext import report

    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    # The files are drawn into a staging folder and put in place together at the end: a
    # signal as report.md's text lands there is before that, and nothing is left.
    real_write = report.write_text_new

    def write_then_interrupt(path: Path, text: str) -> Any:
        written = real_write(path, text)
        os.kill(os.getpid(), signal.SIGTERM)
        return written

    monkeypatch.setattr(report, "write_text_new", write_then_interrupt)
    folder = tmp_path / "report"
    assert cli.main(["report", "--results", str(out) + ".record.json", "--output-dir",
                     str(folder)]) == 130
    monkeypatch.undo()
    assert _err(capsys) == ("mtunlearn: interrupted by SIGTERM; no output was written, inputs "
                            "are unchanged")
    assert not folder.exists()
    # A signal as report.md lands under its own name (the last file put in place) is held
    # until the files are registered: the report stays, and the message says so.
    real_link = report.link_new

    def link_then_interrupt(tmp: Any, target: Path, message: str) -> None:
        real_link(tmp, target, message)
        if target.name == "report.md":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(report, "link_new", link_then_interrupt)
    assert cli.main(["report", "--results", str(out) + ".record.json", "--output-dir",
                     str(folder)]) == 130
    monkeypatch.undo()
    err = _err(capsys)
    assert err.startswith("mtunlearn: interrupted by SIGTERM after its outputs were written in "
                          "full ("), err
    assert (folder / "report.md").read_text().startswith("# u.pt.record.json")
    assert {p.name for p in folder.iterdir()} == {"report.md", "metrics_forget.png",
                                                  "metrics_retain.png", "metrics_test.png",
                                                  "loss_curves.png", "interference.png"}


def test_an_interrupt_during_the_commands_imports_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: main() imported records/training/workflow (about a second) before its
    handler, so a Ctrl-C then printed a traceback from the imports, and SIGTERM killed the
    process silently (its handler came after the argument parsing)."""
    import builtins

    real_import = builtins.__import__

    def interrupted_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "mtunlearn_ext.records":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    assert cli.main(["train", "--benchmark", "digits"]) == 130
    monkeypatch.undo()
    assert _err(capsys) == "mtunlearn: interrupted; no output was written, inputs are unchanged"
    handler = signal.getsignal(signal.SIGTERM)
    seen: list[object] = []

    def parse_known_args(*args: object, **kwargs: object) -> None:
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_run.argparse.ArgumentParser, "parse_known_args", parse_known_args)
    assert cli.main(["train"]) == 130
    assert seen == [cli._on_sigterm] and signal.getsignal(signal.SIGTERM) == handler


def test_a_signal_after_the_command_returns_keeps_its_exit_code(tmp_path: Path) -> None:
    """CLI review: main() gave SIGTERM's handler back on return, before the interpreter's
    shutdown (torch's clean-up, ~1.6 s); a signal then ended the command with exit 143 (SIGINT:
    130 and nothing said, or a traceback with exit 0) though its outputs were complete. The
    command's entry point ignores both once main() has returned: the exit code stands.
    Simulated: the signals are sent to the process just after console_main returns."""
    import subprocess
    import sys

    out = tmp_path / "o.pt"
    script = ("import os, signal, sys; from mtunlearn_ext.cli import console_main; "
              "code = console_main(['train', '--benchmark', 'digits', '--size', 'tiny', "
              f"'--epochs', '1', '--threads', '1', '--quiet', '--output', {str(out)!r}]); "
              "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGINT); "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and out.is_file()


def test_the_command_prints_warnings_as_its_own_lines() -> None:
    """CLI review: the library's warnings printed in Python's format, with the source line of
    the command's entry point (where warn_at_caller points from the command):
    `.../bin/mtunlearn:8: UserWarning: ...` and then `sys.exit(console_main())`."""
    import subprocess
    import sys

    script = ("import warnings; from mtunlearn_ext import cli; "
              "from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, warn_at_caller; "
              "cli.main = lambda argv: (warn_at_caller('the heads check found a layer'), "
              "warnings.warn('an odd value', RuntimeWarning), "
              "warn_at_caller('a NaN loss', MtUnlearnRuntimeWarning), 0)[-1]; "
              "raise SystemExit(cli.console_main([]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["mtunlearn: warning: the heads check found a layer",
                                        "mtunlearn: warning (RuntimeWarning): an odd value",
                                        # the package's categories as the standard ones
                                        "mtunlearn: warning (RuntimeWarning): a NaN loss"]


def test_a_value_starting_with_a_dash_gets_the_equals_form(
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: `--forget-ids -3,7` or `--output -x.pt` failed with argparse's "expected one
    argument" and no hint that such a value is written `--output=-x.pt`."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["unlearn", "--checkpoint", "c.pt", "--output", "-x.pt"])
    assert exit_.value.code == 2
    assert ("argument --output: expected one argument; a value that starts with '-' is "
            "written with '=': --output=-... (see --help)") in capsys.readouterr().err


# -- the same train command writes the same checkpoint file ---------------------------------------


def test_train_is_reproducible_to_the_file_hash(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path / "a.pt") == 0
    assert _train(tmp_path / "b.pt") == 0
    assert sha256_of_file(tmp_path / "a.pt") == sha256_of_file(tmp_path / "b.pt")
    meta = torch.load(tmp_path / "a.pt", weights_only=True)["meta"]
    assert "train_seconds" not in meta
    assert "seconds" in capsys.readouterr().out  # the wall time is printed instead
    # Reproducibility review: the same command gave another file with another thread count
    # (indoor/tiny, 1 epoch: 1 thread against 2), torch's default being the core count, and
    # the checkpoint did not say which count, nor which torch build, made it.
    assert meta["environment"]["threads"] == 1  # _train passes --threads 1
    assert meta["environment"]["torch"] == torch.__version__
    # Reproducibility audit: nor which code trained it (the same command at another commit
    # may give other weights; only the unlearn record named a commit, the unlearning one's).
    from mtunlearn_ext.records import code_version

    assert meta["code"] == code_version()


def test_threads_flag_gives_the_callers_count_back(tmp_path: Path) -> None:
    """``--threads`` sets torch's process-wide count for the command; ``main`` called in the
    caller's own process (a notebook, a pipeline step) left it set after returning."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _train(tmp_path / "a.pt") == 0  # passes --threads 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_train_rerun_from_its_checkpoints_metadata_gives_the_same_file(
        trained: Path, tmp_path: Path) -> None:  # noqa: F811
    """Reproducibility review: the metadata did not store the device, and its recipe (which
    holds the seed) was refused as --train ("seed (0) is not a recipe override")."""
    from mtunlearn_ext.training import load_checkpoint

    meta = load_checkpoint(trained).meta
    assert meta["device"] == "cpu"
    again = tmp_path / "again.pt"
    assert cli.main(["train", "--benchmark", meta["benchmark"], "--size", meta["size"],
                     "--seed", str(meta["seed"]), "--device", meta["device"],
                     "--train", json.dumps(meta["recipe"]),
                     "--threads", str(meta["environment"]["threads"]),
                     "--output", str(again), "--quiet"]) == 0
    assert sha256_of_file(again) == sha256_of_file(trained)


def test_the_order_of_target_tasks_gives_one_checkpoint(trained: Path,  # noqa: F811
                                                        tmp_path: Path) -> None:
    """`--target-tasks digit,parity` and `parity,digit` trained the same weights but wrote
    other checkpoints (the metadata and removals held the tasks as typed; reproducibility
    review)."""
    from mtunlearn_ext.training import load_checkpoint

    hashes = []
    for order in ("digit,parity", "parity,digit"):
        out = tmp_path / f"{order}.pt"
        assert _unlearn(trained, out, "--forget-ids", ids(1, 2, 3), "--target-tasks",
                        order) == 0
        hashes.append(sha256_of_file(out))
        assert load_checkpoint(out).meta["target_tasks"] == ["digit", "parity"]
    assert hashes[0] == hashes[1]


def test_the_order_of_retain_ids_gives_one_record_and_one_evaluation(
        trained: Path, tmp_path: Path) -> None:  # noqa: F811
    """`--retain-ids 16,26,43` and `43,26,16` name one retain set and wrote the same
    checkpoint, but the record's `request.retain_ids` and evaluate's `retain_split.retain_ids`
    held them as typed (while the forget ids are sorted)."""
    request = ["--forget-ids", ids(1, 2, 3), "--target-tasks", "digit"]
    in_order = [int(i) for i in ids(4, 5, 6).split(",")]
    assert in_order == sorted(in_order)
    for name, retain in (("typed", in_order), ("reversed", in_order[::-1])):
        text = ",".join(map(str, retain))
        out = tmp_path / f"{name}.pt"
        assert _unlearn(trained, out, *request, "--retain-ids", text) == 0
        record = json.loads(Path(str(out) + ".record.json").read_text())
        assert record["request"]["retain_ids"] == in_order, name
        measured = tmp_path / f"{name}.json"
        assert cli.main(["evaluate", "--checkpoint", str(out), *request, "--retain-ids", text,
                         "--output", str(measured), "--quiet"]) == 0
        assert json.loads(measured.read_text())["retain_split"]["retain_ids"] == in_order, name


@pytest.mark.parametrize("method", available_unlearners())
def test_an_unlearn_rerun_from_its_record_alone_gives_the_same_checkpoint(
        trained: Path, tmp_path: Path, method: str) -> None:  # noqa: F811
    """Reproducibility review: the record held the seed, the method's settings and the request
    but not the thread count nor the torch build, which decide the weights' last bits too
    (indoor/tiny, 6 steps: 1 thread against 2 gave other bytes, up to 1.5e-8 apart), so a
    rerun months later on a machine with another core count (torch's default count) gave
    another checkpoint, and the record could not say why. Every method: SCRUB's recorded
    settings named the objective of its curves, which its settings refuse (exit 2)."""
    import platform

    out = tmp_path / "u.pt"
    settings = '{"epochs": 1}' if method == "retrain" else FAST
    assert _unlearn(trained, out, "--forget-ids", ids(1, 2, 3), "--target-tasks", "digit",
                    "--method", method, "--method-config", settings) == 0
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert record["environment"] == {"torch": torch.__version__,
                                     "python": platform.python_version(),
                                     "threads": torch.get_num_threads(),
                                     "extension": mtunlearn_ext.build_info()["extension"],
                                     "cpu_isa": _cpu_isas()}
    # Everything a rerun needs, read from the record alone, gives the same file.
    request = record["request"]
    again = tmp_path / "again.pt"
    args = ["unlearn", "--checkpoint", record["input"]["checkpoint"], "--output", str(again),
            "--forget-ids", ",".join(map(str, request["instance_ids"])),
            "--request", request["type"], "--target-tasks", ",".join(request["target_tasks_arg"]),
            "--method", record["method"]["name"],
            "--method-config", json.dumps(record["method"]["settings"]),
            "--seed", str(record["seed"]), "--device", record["device"],
            "--eval-batch-size", str(record["eval_batch_size"]),
            "--threads", str(record["environment"]["threads"]), "--quiet"]
    assert cli.main(args) == 0
    assert sha256_of_file(again) == record["output"]["sha256"]
    if method == "retrain":  # it trains with the recipe's seed, not --seed: the record says so
        from mtunlearn_ext.training import load_checkpoint

        assert record["method"]["settings"]["seed"] == load_checkpoint(trained).meta["seed"]


def test_a_run_that_changes_no_weight_says_so(trained: Path, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: --method-config '{"steps": 0}' wrote an "unlearned" checkpoint equal to
    the input and a record that verify accepts, without a word."""
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", '{"steps": 0}', "--output", str(out), "--quiet"]) == 0
    assert ("mtunlearn: warning: interference_aware left the weights exactly as they were "
            "(0 steps): the output model is the input model") in capsys.readouterr().err
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(tmp_path / "v.pt"),
                     "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    # CLI review: the run exited 0 and its record kept no trace, so `verify` said "verified".
    # The record says so, and verify does not pass it (exit 1), with or without the record's
    # word, and says what it checks when it passes.
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert record["weights_changed"] is False
    assert json.loads((tmp_path / "v.pt.record.json").read_text())["weights_changed"] is True
    assert cli.main(["verify", "--record", str(out) + ".record.json"]) == 1
    printed = capsys.readouterr()
    rows = [line.split() for line in printed.out.splitlines()]
    assert ["weights", "UNCHANGED"] in rows and ["metrics", "ok"] in rows, printed.out
    assert printed.out.splitlines()[-1].startswith(
        f"FAILED: {out} against {out}.record.json: not verified, its weights are the input "
        "model's, so nothing was unlearned"), printed.out
    assert "the output checkpoint's weights are exactly the input model's" in printed.err
    assert "removed other pairs" not in printed.err and "earlier removals" not in printed.err
    # Data-removal review: the ids still counted as removed in the output's lineage, so a
    # retry on it was refused ("already removed every pair") and the next request's record
    # listed them among the lineage's removals: an audit trail erasing what was never erased.
    from mtunlearn_ext.training import load_checkpoint

    assert load_checkpoint(out).meta["removals"] == load_checkpoint(trained).meta.get(
        "removals", [])
    assert cli.main(["unlearn", "--checkpoint", str(out), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(tmp_path / "retry.pt"),
                     "--quiet"]) == 0
    retry = json.loads((tmp_path / "retry.pt.record.json").read_text())["request"]
    assert retry["earlier_removals"] == [] and len(retry["forgotten_instance_ids"]) == 2
    capsys.readouterr()
    record["weights_changed"] = True
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(record))
    assert cli.main(["verify", "--record", str(edited), "--checkpoint", str(out)]) == 1
    assert "(the record's weights_changed says true)" in capsys.readouterr().err
    assert cli.main(["verify", "--record", str(tmp_path / "v.pt.record.json")]) == 0
    printed = capsys.readouterr()
    assert ["weights", "ok"] in [line.split() for line in printed.out.splitlines()]
    assert printed.out.splitlines()[-1].endswith(
        "this checks the files and the record, not how much was forgotten: the record's "
        "before/after metrics show that"), printed.out


def test_unchanged_weights_of_an_older_checkpoint_are_found_from_its_input(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """A record and checkpoint from before `weights_changed` / `parent_state_sha256`: the
    input checkpoint, when still there, tells; when gone, the row says it was not checked."""
    from mtunlearn_ext.training import save_checkpoint
    from mtunlearn_ext.workflow import load_model

    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", '{"steps": 0}', "--output", str(out), "--quiet"]) == 0
    loaded = load_model(out)
    meta = {k: v for k, v in loaded.meta.items() if k != "parent_state_sha256"}
    older = tmp_path / "older.pt"
    sha = save_checkpoint(older, loaded.model, meta)
    record = json.loads(Path(str(out) + ".record.json").read_text())
    del record["weights_changed"]
    record["output"] = {"checkpoint": str(older), "sha256": sha}
    path = tmp_path / "older.json"
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(path)]) == 1
    assert ["weights", "UNCHANGED"] in [line.split() for line in
                                        capsys.readouterr().out.splitlines()]
    record["input"]["checkpoint"] = str(tmp_path / "gone.pt")
    path.write_text(json.dumps(record))
    assert cli.main(["verify", "--record", str(path)]) == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    assert ["weights", "not checked (no input weights hash: an older checkpoint whose input is "
                       "gone)"] in [[r[0], r[1].strip()] for r in rows if len(r) == 2]


def _cpu_isas() -> dict[str, str]:
    """What a record's ``environment`` says of the CPU instruction sets in this process."""
    return {"torch": torch.backends.cpu.get_cpu_capability(),
            "mtunlearn_ext": mtunlearn_ext.ops.cpu_isa()["active"]}


def test_the_record_is_ready_before_the_checkpoint_lands(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Data-removal review: the code version (three git calls) was read after the checkpoint's
    final rename, widening to ~24 ms the window in which a SIGKILL leaves a checkpoint without
    its record. Between the two writes now: nothing but the record's own write."""
    from mtunlearn_ext import records, training

    calls: list[str] = []
    real_code, real_save, real_write = (records.code_version, training.save_checkpoint,
                                        records.write_record)

    def code_version() -> dict[str, Any]:
        calls.append("code_version")
        return real_code()

    def save_checkpoint(*args: Any, **kwargs: Any) -> str:
        calls.append("save_checkpoint")
        return real_save(*args, **kwargs)

    def write_record(*args: Any, **kwargs: Any) -> str:
        calls.append("write_record")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(records, "code_version", code_version)
    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(records, "write_record", write_record)
    assert _unlearn(trained, tmp_path / "u.pt") == 0
    assert calls == ["code_version", "save_checkpoint", "write_record"]


def test_the_record_names_the_commit_the_run_started_from(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The code version was read when the record was written: a commit made during a run
    (its code already imported) was named as the run's. Read once per process, at the start;
    here the checkout's commit changes while the model is unlearned."""
    from mtunlearn_ext import records, training

    heads = iter(["a" * 40, "b" * 40, "c" * 40])
    monkeypatch.setattr(records, "_CODE_VERSION", None)
    monkeypatch.setattr(records, "_git_commit", lambda root: (next(heads), False))
    real_save = training.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> str:
        assert records.code_version()["commit"] == "a" * 40  # no second read
        return real_save(*args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", save_checkpoint)
    assert _unlearn(trained, tmp_path / "u.pt") == 0
    record = json.loads((tmp_path / "u.pt.record.json").read_text())
    assert record["code"]["commit"] == "a" * 40
    assert next(heads) == "b" * 40  # git was asked once


def test_a_failed_command_removes_the_folders_its_writes_made(tmp_path: Path) -> None:
    """Safety audit: `--output new/sub/o.pt` with a record that then failed to write left the
    empty folders new/ and new/sub/ behind (exit 2, "nothing was written"). A folder that
    existed before, or that holds another file by then, stays."""
    from mtunlearn_ext._io import write_text_new

    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="the record failed"):
        with OutputTransaction() as tx:
            out = tx.reserve("--output", tmp_path / "new" / "sub" / "o.pt")
            beside = tx.reserve("--report", tmp_path / "kept" / "deeper" / "r.md")
            other = tx.reserve("--record", tmp_path / "shared" / "r.json")
            tx.write(out, lambda p: write_text_new(p, "weights"))
            tx.write(beside, lambda p: write_text_new(p, "report"))
            tx.write(other, lambda p: write_text_new(p, "{}"))
            (tmp_path / "shared" / "theirs.txt").write_text("another process's file")
            assert out.is_file() and beside.is_file()
            raise RuntimeError("the record failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "shared"]
    assert list((tmp_path / "kept").iterdir()) == []
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["theirs.txt"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"),
                                     KeyboardInterrupt()])
def test_a_write_that_fails_before_its_link_leaves_another_runs_file_of_that_name(
        tmp_path: Path, failure: BaseException) -> None:
    """Failure injection: run A's checkpoint write failed at its fsync (disk full, or Ctrl-C)
    after run B had finished writing the same name; A's rollback unlinked the path by name and
    deleted B's checkpoint, leaving B's record naming a file that was gone. A rollback removes
    only a file this run put there."""
    from mtunlearn_ext._io import write_text_new

    def writer(p: Path) -> str:
        p.write_text("run B's finished checkpoint")  # another process, while A wrote
        raise failure

    expected = UserInputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        with OutputTransaction() as tx:
            tx.write(tx.reserve("--output", tmp_path / "u.pt"), writer)
    assert (tmp_path / "u.pt").read_text() == "run B's finished checkpoint"
    # What the run did put in place goes, also when its name was replaced by the same file.
    with pytest.raises(RuntimeError, match="the record failed"):
        with OutputTransaction() as tx:
            mine = tx.reserve("--output", tmp_path / "mine.pt")
            tx.write(mine, lambda p: write_text_new(p, "A's checkpoint"))
            raise RuntimeError("the record failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.pt"]
    # Diff review: the files put in place were one table for the process, so a transaction
    # of the same process (another thread of a service) that wrote the name first lost it.
    with OutputTransaction() as first:
        shared = first.reserve("--output", tmp_path / "shared.pt")
        with OutputTransaction() as second:
            second.reserve("--output", tmp_path / "shared.pt")
        first.write(shared, lambda p: write_text_new(p, "the first's"))

    def fails_after_the_first_wrote(p: Path) -> str:
        raise OSError(28, "No space left on device")

    with pytest.raises(UserInputError):
        with second:
            second.write(tmp_path / "shared.pt", fails_after_the_first_wrote)
    assert (tmp_path / "shared.pt").read_text() == "the first's"


def test_a_report_whose_link_failed_leaves_the_file_of_that_name(tmp_path: Path) -> None:
    """The report's files are linked into place one by one; one whose link failed with an
    OSError (not FileExistsError) stayed in the list of files to remove, and the rollback
    deleted whatever had that name."""
    from mtunlearn_ext._io import write_text_new
    from mtunlearn_ext.report import _NewFiles

    files = _NewFiles(tmp_path)
    files.write(tmp_path / "a.png", lambda p: bool(write_text_new(p, "a")))
    files.write(tmp_path / "b.png", lambda p: bool(write_text_new(p, "b")))
    real_link = os.link

    def link(src: Any, dst: Any) -> None:
        if Path(dst).name == "b.png":  # no hard links there: check, then rename
            raise PermissionError(1, "Operation not permitted")
        real_link(src, dst)

    def replace(src: Any, dst: Any) -> None:
        Path(dst).write_text("theirs")  # another process's, between the check and the rename
        raise OSError(5, "Input/output error")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "link", link)
        patch.setattr(os, "replace", replace)
        with pytest.raises(UserInputError, match="Input/output error"):
            files.commit()
    files.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]
    assert (tmp_path / "b.png").read_text() == "theirs"


def test_a_folder_another_run_made_meanwhile_stays_on_rollback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrency: a folder missing when the write began but made by another run before this
    one could (its ``mkdir`` lost the race) is the other run's: this run's rollback used to
    remove it (empty), under the other run about to write into it."""
    from mtunlearn_ext._io import write_text_new

    theirs = tmp_path / "shared"
    real_mkdir = os.mkdir

    def mkdir_losing_the_race(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path) == theirs and not theirs.exists():
            real_mkdir(path, *args, **kwargs)  # the other run's
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir_losing_the_race)
    with pytest.raises(RuntimeError, match="later failure"):
        with OutputTransaction() as tx:
            out = tx.reserve("--output", theirs / "mine" / "o.pt")
            tx.write(out, lambda p: write_text_new(p, "weights"))
            raise RuntimeError("later failure")
    assert theirs.is_dir() and list(theirs.iterdir()) == []  # ours (mine/) went, theirs stayed


def test_a_folder_removed_by_a_concurrent_rollback_is_made_again(tmp_path: Path) -> None:
    """Concurrency: another run that made the folder an output shares, and then failed,
    removes it (empty) again; when that happened between this run making sure of the folder
    and its write, the write failed (exit 2, "No such file or directory")."""
    from mtunlearn_ext._io import write_text_new

    (tmp_path / "shared").mkdir()
    attempts = []

    def writer(p: Path) -> str:
        attempts.append(p)
        if len(attempts) == 1:
            p.parent.rmdir()  # the other run's rollback, just before the write
            with open(p, "x"):
                pass
        return write_text_new(p, "weights")

    with OutputTransaction() as tx:
        out = tx.reserve("--output", tmp_path / "shared" / "o.pt")
        tx.write(out, writer)
    assert len(attempts) == 2 and out.read_text() == "weights"

    # A write that fails so with the folder in place is not retried: that is another error.
    def missing_elsewhere(p: Path) -> str:
        attempts.append(p)
        raise FileNotFoundError(2, "No such file or directory")

    attempts.clear()
    with pytest.raises(UserInputError, match=r"^--record: expected a path that can be written"):
        with OutputTransaction() as tx:
            tx.write(tx.reserve("--record", tmp_path / "shared" / "r.json"), missing_elsewhere)
    assert len(attempts) == 1


def test_a_folder_made_as_an_interrupt_arrives_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Diff review: a folder was recorded only after ``mkdir`` returned, so an interrupt landing
    right then left it behind; it is recorded first, as a file is."""
    from mtunlearn_ext._io import write_text_new

    real_mkdir = os.mkdir

    def mkdir_then_interrupt(path: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(path, *args, **kwargs)
        if Path(path).name == "new":
            raise KeyboardInterrupt  # SIGINT delivered as the system call returns

    monkeypatch.setattr(os, "mkdir", mkdir_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with OutputTransaction() as tx:
            out = tx.reserve("--output", tmp_path / "new" / "o.txt")
            tx.write(out, lambda p: write_text_new(p, "w"))
    assert list(tmp_path.iterdir()) == []
