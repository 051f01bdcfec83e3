"""``mtunlearn`` fixes: config nulls and positional lists, evaluate's request options, the seed
range, SIGTERM (exit 130), report values checked before writing, reproducible ``train``
checkpoints, and arguments too long to be a file name."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import _listing, _unlearn, ids, trained  # noqa: F401  (trained: a fixture)
from test_report import _json_data, _record

from mtunlearn_ext import cli
from mtunlearn_ext._io import sha256_of_file


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of the last command: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _train(output: Path, *extra: str) -> int:
    return cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--epochs", "1",
                     "--output", str(output), "--quiet", "--threads", "1", *extra])


# -- 4: a null config value means "not given" ------------------------------------------------


def test_config_null_keeps_the_default(trained: Path, tmp_path: Path,  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # a checkpoint named "None" would land here
    ckpt = tmp_path / "orig.pt"
    shutil.copy(trained, ckpt)
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {ckpt}\nforget_ids: [{ids(1, 2)}]\n"
                      "method_config: {steps: 2}\noutput: null\nrecord: ~\nseed: null\n"
                      "target_tasks: null\nrequest: null\nquiet: true\n")
    assert cli.main(["unlearn", "--config", str(config)]) == 0
    assert _listing(tmp_path) == {"orig.pt", "c.yaml", "orig.interference_aware.pt",
                                  "orig.interference_aware.record.json"}
    record = json.loads((tmp_path / "orig.interference_aware.record.json").read_text())
    assert record["seed"] == 0 and record["request"]["type"] == "full"  # the defaults
    config.write_text(f"checkpoint: {ckpt}\nforget_ids: [{ids(1, 2)}]\ntarget_tasks: null\n")
    assert cli.main(["evaluate", "--config", str(config), "--quiet"]) == 0
    config.write_text(f"output: {tmp_path / 't.pt'}\nseed: null\nepochs: 1\nquiet: true\n")
    assert cli.main(["train", "--config", str(config)]) == 0
    meta = torch.load(tmp_path / "t.pt", weights_only=True)["meta"]
    assert meta["seed"] == 0
    capsys.readouterr()
    # A flag's value must be a boolean: the string "false" is not silently true.
    config.write_text(f"checkpoint: {ckpt}\nquiet: \"false\"\n")
    assert cli.main(["evaluate", "--config", str(config)]) == 2
    err = _err(capsys)
    assert "--config: expected a valid value for 'quiet', got 'false'" in err, err


# -- 5: benchmark's positional `extra` from a config --------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("c.yaml", 'extra: ["--repeats", "3"]\n'),
                                            ("c.toml", 'extra = "--repeats 3"\n')])
def test_benchmark_extra_from_config_is_words(tmp_path: Path, name: str, text: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / name
    config.write_text(text)
    assert cli.main(["benchmark", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(" --repeats 3"), out  # as `mtunlearn benchmark -- --repeats 3`
    assert cli.main(["benchmark", "--config", str(config), "--dry-run", "--", "--other"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.endswith(" --other") and "--repeats" not in out, out  # the command line wins


# -- 6: evaluate refuses request options without a request ---------------------------------------


@pytest.mark.parametrize(("extra", "argument", "fragment"), [
    (["--target-tasks", "nope"], "--target-tasks", "got ['nope']; unknown task names"),
    (["--target-tasks", "digit"], "--target-tasks", "--target-tasks has no effect"),
    (["--request", "partial"], "--request", "--request has no effect"),
    (["--target-tasks", "digit", "--request", "partial"], "--target-tasks",
     "--target-tasks and --request have no effect"),
    (["--seed", "3"], "--seed", "--seed has no effect"),
    (["--request", "full", "--seed", "3"], "--request", "--request and --seed have no effect"),
    (["--target-tasks", "digit", "--request", "partial", "--seed", "3"], "--target-tasks",
     "--target-tasks, --request and --seed have no effect"),
])
def test_evaluate_refuses_request_options_without_request(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        extra: list[str], argument: str, fragment: str) -> None:
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--output", str(out),
                     "--quiet", *extra]) == 2
    err = _err(capsys)
    assert err.startswith(f"mtunlearn: error: {argument}: expected") and fragment in err, err
    assert not out.exists()
    # With a request they are used (and an unknown task is still named).
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--quiet", *extra]) == (2 if "nope" in extra else 0)


# -- 8: the seed range ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**32, 2**64])
def test_seed_beyond_32_bits_is_blamed_on_seed(trained: Path, tmp_path: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str],
                                               seed: int) -> None:
    expected = f"mtunlearn: error: --seed: expected an integer in [0, 2**32-1], got {seed}"
    assert _train(tmp_path / "t.pt", "--seed", str(seed)) == 2
    assert _err(capsys).startswith(expected)
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-fraction", "0.02",
                    "--seed", str(seed)) == 2
    assert _err(capsys).startswith(expected)
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--forget-fraction", "0.02",
                     "--seed", str(seed), "--quiet"]) == 2
    assert _err(capsys).startswith(expected)
    assert _listing(tmp_path) == set()


def test_largest_seed_works_end_to_end(tmp_path: Path) -> None:
    assert _train(tmp_path / "t.pt", "--seed", str(2**32 - 1)) == 0
    assert _unlearn(tmp_path / "t.pt", tmp_path / "u.pt", "--forget-fraction", "0.02") == 0


# -- 9: SIGTERM is an interruption: exit 130, the "interrupted" line, nothing left -------------


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


# -- 10: report: bad values refused before anything is written ------------------------------------


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


# -- 11: the same train command writes the same checkpoint file ---------------------------------


def test_train_is_reproducible_to_the_file_hash(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path / "a.pt") == 0
    assert _train(tmp_path / "b.pt") == 0
    assert sha256_of_file(tmp_path / "a.pt") == sha256_of_file(tmp_path / "b.pt")
    assert "train_seconds" not in torch.load(tmp_path / "a.pt", weights_only=True)["meta"]
    assert "seconds" in capsys.readouterr().out  # the wall time is printed instead


# -- 2: text too long to be a file name is the literal value -------------------------------------


def test_long_json_and_config_are_not_file_names(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    long_json = '{"epochs": 1' + " " * 300 + "}"
    assert cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--train", long_json,
                     "--output", str(tmp_path / "t.pt"), "--quiet", "--threads", "1"]) == 0
    assert torch.load(tmp_path / "t.pt", weights_only=True)["meta"]["recipe"]["epochs"] == 1
    capsys.readouterr()
    long_name = str(tmp_path / ("c" * 300 + ".yaml"))
    assert cli.main(["train", "--config", long_name]) == 2
    assert "--config: expected an existing .yaml/.yml/.toml file" in _err(capsys)


def test_an_unknown_method_is_refused_before_it_names_the_outputs(trained,  # noqa: F811
                                                                   capsys) -> None:  # type: ignore[no-untyped-def]
    """`--method foo/bar` went into the default output names first: a ValueError traceback
    ("Invalid name 'orig.foo/bar.pt'") instead of the unknown-method error."""
    folder = trained.parent  # where the default outputs would go
    before = sorted(p.name for p in folder.iterdir())
    code = cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", "3,7",
                     "--method", "foo/bar"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--method: expected one of [" in err and "'interference_aware'" in err, err
    assert sorted(p.name for p in folder.iterdir()) == before


# -- review of the docs: output paths, NaN in train, verify from elsewhere, small fixes -----------


FAST_STEPS = '{"steps": 2}'


def _fail_if_run(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the method ran although an output could not be written")


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
    assert err.startswith("mtunlearn: error: --record: expected a path that can be written"), err
    assert "No space left on device" in err and "nothing was written" in err, err
    assert _listing(tmp_path) == set()


def test_train_writes_a_legal_name_of_the_longest_length(tmp_path: Path) -> None:
    """The temporary file `.{name}.XXXXXXXX.tmp` is 14 characters longer than the target: a
    legal name over 241 characters trained, then failed with ENAMETOOLONG."""
    from mtunlearn_ext._io import name_max

    name = "o" * (name_max(tmp_path) - 3) + ".pt"
    assert _train(tmp_path / name) == 0
    assert _listing(tmp_path) == {name}


def test_train_nan_loss_is_the_nonfinite_policy(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`train --train '{"lr": 1e30}'` raised FloatingPointError (traceback, exit 1); the
    documented policy is exit 3 with one line naming the step, nothing written."""
    assert _train(tmp_path / "nan.pt", "--train", '{"lr": 1e30}') == 3
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: non-finite values (NaN/Inf) at step 1: training "
                          "loss nan"), err
    assert "nothing was written" in err
    assert _listing(tmp_path) == set()


def test_train_refuses_a_seed_in_the_recipe_overrides(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--train '{"seed": 5}'` was silently replaced by --seed (0): a model of seed 0."""
    assert _train(tmp_path / "s.pt", "--train", '{"seed": 5}') == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --train: expected fields of TrainConfig, got "
                          "{'seed': 5}") and "use --seed" in err, err
    assert _listing(tmp_path) == set()


def test_verify_from_another_folder_after_relative_paths(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """`unlearn --output ck/m.pt --record recs/m.json` stored the paths as typed; `verify`
    from another folder failed ("checkpoint ck/m.pt does not exist", naming no argument)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained, run / "orig.pt")
    monkeypatch.chdir(run)
    assert cli.main(["unlearn", "--checkpoint", "orig.pt", "--forget-ids", ids(1, 2),
                     "--method-config", FAST_STEPS, "--quiet", "--output", "ck/m.pt",
                     "--record", "recs/m.json"]) == 0
    record = json.loads((run / "recs" / "m.json").read_text())
    assert record["output"]["checkpoint"] == str(run / "ck" / "m.pt")
    assert record["input"]["checkpoint"] == str(run / "orig.pt")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["verify", "--record", "run/recs/m.json"]) == 0
    assert "verified" in capsys.readouterr().out
    # A checkpoint that is not there: one line naming the argument it came from.
    (run / "ck" / "m.pt").rename(run / "ck" / "moved.pt")
    assert cli.main(["verify", "--record", "run/recs/m.json"]) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --record: expected a record whose output "
                          "checkpoint exists") and "pass --checkpoint" in err, err
    assert cli.main(["verify", "--record", "run/recs/m.json", "--checkpoint", "nope.pt"]) == 2
    assert _err(capsys).startswith("mtunlearn: error: --checkpoint: expected an existing "
                                   "checkpoint file, got 'nope.pt'")
    assert cli.main(["verify", "--record", "run/recs/m.json",
                     "--checkpoint", "run/ck/moved.pt"]) == 0


def test_verify_a_partial_record_without_target_tasks_arg(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """`verify` rebuilt the request from the undocumented `request.target_tasks_arg` only: a
    partial record without it was measured as a full request (metrics mismatch, exit 1)."""
    out = tmp_path / "u.pt"
    assert _unlearn(trained, out, "--forget-ids", ids(1, 2, 3), "--target-tasks", "digit") == 0
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert record["request"]["type"] == "partial" and "eval_batch_size" in record
    del record["request"]["target_tasks_arg"]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(edited)]) == 0, capsys.readouterr().err
    # The fields verify reads are documented in the record format.
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    record_format = doc.split("### The unlearning record", 1)[1].split("\n### ", 1)[0]
    for name in ("target_tasks_arg", "eval_batch_size", "retain_ids"):
        assert f"`{name}`" in record_format, name


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


def test_dropin_guide_says_per_layer_true_is_one_problem_per_tensor() -> None:
    """docs/dropin.md said `per_layer=True` solves "one problem per layer"; the code makes one
    per parameter tensor (a layer's weight and bias are two); a layer id list groups them."""
    from mtunlearn_ext.surgery._tensor_lists import layer_index

    assert layer_index(True, 4, "op") == ([0, 1, 2, 3], 4)
    assert layer_index([0, 0, 1, 1], 4, "op") == ([0, 0, 1, 1], 2)
    doc = " ".join((Path(__file__).resolve().parents[1] / "docs" / "dropin.md").read_text()
                   .split())
    assert "per_layer=True)` (or a layer id per parameter) solves one problem per layer" \
        not in doc
    assert "`GradientSurgery(..., per_layer=True)` solves one problem per parameter *tensor*" \
        in doc


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
