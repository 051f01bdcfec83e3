"""``mtunlearn`` review fixes: the README's exit code for NaN/Inf, evaluate's stdout as pure
JSON, valid ids shown for unknown ones, ``train --epochs 0``, the record's resolved
``forget_objective``, ``verify``'s record errors, ``benchmark --dry-run``'s wording, and
``--data-root`` for benchmarks that read none."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_cli import _listing, ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli
from mtunlearn_ext.data import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread, for this module only)."""


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of the last command: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _flat(text: str) -> str:
    """Markdown text with its line breaks folded into single spaces."""
    return " ".join(text.split())


# -- 1: the README gives exit code 3 for NaN/Inf, as the CLI does ---------------------------------


def test_readme_gives_exit_3_for_nonfinite_values(trained: Path, tmp_path: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The README listed "NaN/Inf losses or gradients" among the bad input that "exits with
    code 2"; a diverging run exits 3 (docs/cli.md, the NaN/Inf policy)."""
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(0, 1),
                     "--method", "neggrad_plus", "--method-config", '{"lr": 1e30, "steps": 3}',
                     "--output", str(tmp_path / "u.pt"), "--quiet"]) == 3
    assert "non-finite values (NaN/Inf)" in _err(capsys)
    readme = _flat((ROOT / "README.md").read_text())
    passage = readme.split("## Command line, records and safety", 1)[1].split("\n## ", 1)[0]
    two = passage.split("exits with code 2", 1)[0]
    assert "NaN/Inf" not in two.rsplit("bad input", 1)[-1], two
    assert "a NaN/Inf loss, gradient or parameter during a run stops it with exit code 3" \
        in passage


# -- 2: evaluate without --output prints the JSON alone on stdout ---------------------------------


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


# -- 3: an unknown id shows valid ones, and the docs say how to list them --------------------------


def test_unknown_ids_show_valid_ones_and_the_docs_list_them(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    train_ids = load_benchmark("digits", size="tiny").train.ids.tolist()
    first = ", ".join(str(i) for i in sorted(train_ids)[:8])
    unknown = next(i for i in range(10**6) if i not in set(train_ids))
    for flag, extra in (("--forget-ids", ["--forget-ids", str(unknown)]),
                        ("--retain-ids", ["--forget-ids", ids(0), "--retain-ids",
                                          str(unknown)])):
        assert cli.main(["unlearn", "--checkpoint", str(trained), *extra,
                         "--output", str(tmp_path / "u.pt"), "--quiet"]) == 2
        err = _err(capsys)
        assert f"{flag}: expected ids of training instances ({len(train_ids)} instances in " \
               f"[{min(train_ids)}, {max(train_ids)}]: {first}, ...), got '1 unknown ids " \
               f"[{unknown}]'; all of them: mtunlearn_ext.workflow.load_model(CKPT)" in err, err
    assert _listing(tmp_path) == set()
    # The documented one-liner prints every id of the checkpoint's training set.
    doc = (ROOT / "docs" / "cli.md").read_text()
    command = next(line for line in re.findall(r"```bash\n(.*?)```", doc, flags=re.S)[0]
                   .splitlines() if "load_model" in line)
    assert command.startswith("python -c ") and trained.name == "orig.pt"
    command = shlex.quote(sys.executable) + command[len("python"):]  # this environment's
    proc = subprocess.run(["bash", "-c", command], cwd=trained.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [int(i) for i in proc.stdout.strip().split(",")] == train_ids


# -- 4: train refuses fewer than one epoch ---------------------------------------------------------


def test_train_refuses_zero_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --epochs 0` exited 0 with `final_loss nan` and a checkpoint holding NaN."""
    base = ["train", "--benchmark", "digits", "--size", "tiny", "--quiet",
            "--output", str(tmp_path / "t.pt")]
    with pytest.raises(SystemExit) as stopped:  # argparse refuses it: exit 2
        cli.main([*base, "--epochs", "0"])
    assert stopped.value.code == 2
    assert "argument --epochs: expected an integer >= 1, got '0'" in _err(capsys)
    assert cli.main([*base, "--train", '{"epochs": 0}']) == 2
    assert _err(capsys).startswith("mtunlearn: error: --train: expected fields of TrainConfig, "
                                   "got {'epochs': 0}; TrainConfig: `epochs` must be >= 1")
    assert _listing(tmp_path) == set()


# -- 5: the record shows the forget objective the run used ---------------------------------------


@pytest.mark.parametrize(("method", "settings", "expected"), [
    ("interference_aware", {"steps": 2}, "capped_ascent"),  # docs/unlearning.md's default
    ("neggrad_plus", {"steps": 2}, "ascent"),
    ("interference_aware", {"steps": 2, "forget_objective": "ascent"}, "ascent"),  # as given
])
def test_record_settings_show_the_forget_objective_used(
        trained: Path, tmp_path: Path, method: str, settings: dict[str, object],  # noqa: F811
        expected: str) -> None:
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(0, 1),
                     "--method", method, "--method-config", json.dumps(settings),
                     "--output", str(out), "--quiet"]) == 0
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert record["method"]["settings"]["forget_objective"] == expected
    used = set(record["report"]["extra"]["forget_objectives"].values())
    assert used == {expected}


def test_resolved_settings_keep_per_task_objectives_and_methods_without_one() -> None:
    report = SimpleNamespace(config={"steps": 3, "forget_objective": None},
                             extra={"forget_objectives": {"digit": "capped_ascent",
                                                          "parity": "uniform"}})
    assert cli._resolved_settings(report)["forget_objective"] == {
        "digit": "capped_ascent", "parity": "uniform"}
    assert report.config["forget_objective"] is None  # the report itself is not changed
    retrain = SimpleNamespace(config={"epochs": 2}, extra={})
    assert cli._resolved_settings(retrain) == {"epochs": 2}


# -- 6: verify's record errors name --record -------------------------------------------------------


def test_verify_record_errors_name_the_argument(trained: Path, tmp_path: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    assert cli.main(["verify", "--record", str(missing)]) == 2
    assert _err(capsys) == ("mtunlearn: error: --record: expected an existing unlearning "
                            f"record file (JSON), got '{missing}'; no such file")
    assert cli.main(["verify", "--record", str(trained)]) == 2  # a checkpoint, not JSON
    assert _err(capsys).startswith("mtunlearn: error: --record: expected a readable JSON "
                                   f"unlearning record, got '{trained}'; 'utf-8' codec")
    listing = tmp_path / "list.json"
    listing.write_text("[1]")
    assert cli.main(["verify", "--record", str(listing)]) == 2
    assert _err(capsys).endswith(f"got '{listing}'; it holds a JSON list, not an object")


# -- 7: benchmark --dry-run says what would run ---------------------------------------------------


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

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli.main(["benchmark"]) == 0
    assert capsys.readouterr().out.startswith("running: ") and len(calls) == 1


# -- 8: --data-root is refused for benchmarks that read none --------------------------------------


def test_train_refuses_data_root_for_a_benchmark_that_reads_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --benchmark digits --data-root /nonexistent` was accepted, and the ignored path,
    stored in the metadata, changed the checkpoint's SHA-256."""
    assert cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--data-root",
                     "/nonexistent", "--output", str(tmp_path / "t.pt"), "--quiet"]) == 2
    assert _err(capsys) == (
        "mtunlearn: error: --data-root: expected no value unless --benchmark is one of "
        "['nyuv2', 'cityscapes'] (the real data sets it locates), got '/nonexistent'; "
        "'digits' reads no data root; drop --data-root")
    assert _listing(tmp_path) == set()
    # The benchmarks named are exactly those load_benchmark reads from a data root.
    from mtunlearn_ext.data import registry

    assert set(cli._DATA_ROOT_BENCHMARKS) == set(registry._REAL)
