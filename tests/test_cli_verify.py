"""``mtunlearn verify`` and the unlearning record it checks: record files that are missing or not
a JSON object, malformed fields (exit 2 naming the field), a changed or unloadable checkpoint, a
record edited against the checkpoint's own metadata (a mismatch, exit 1), paths recorded relative
to another folder, a partial request rebuilt from its type and target tasks, and the resolved
``forget_objective`` the record shows."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli_helpers import _err
from test_cli import FAST, _unlearn, ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _unlearn as cli_unlearn
from mtunlearn_ext.records import recorded_path


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


@pytest.fixture(scope="module")
def unlearned(trained: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
              ) -> tuple[Path, Path]:
    """``(checkpoint, record)`` of one unlearning run of ``trained``."""
    folder = tmp_path_factory.mktemp("verify")
    out = folder / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(out), "--quiet"]) == 0
    return out, Path(str(out) + ".record.json")


# -- the record file and its fields ---------------------------------------------------------------


def test_verify_record_errors_name_the_argument(trained: Path, tmp_path: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.json"
    assert cli.main(["verify", "--record", str(missing)]) == 2
    assert _err(capsys) == ("mtunlearn: error: --record: expected an existing unlearning "
                            f"record file (JSON), got '{missing}'; no such file")
    assert cli.main(["verify", "--record", str(trained)]) == 2  # a checkpoint, not JSON
    assert _err(capsys).startswith("mtunlearn: error: --record: expected a readable JSON "
                                   f"unlearning record, got '{trained}'; it is a zip archive, a "
                                   "checkpoint (its record is the `.record.json` file `unlearn` "
                                   "wrote beside it)")
    listing = tmp_path / "list.json"
    listing.write_text("[1]")
    assert cli.main(["verify", "--record", str(listing)]) == 2
    assert _err(capsys).endswith(f"got '{listing}'; it holds a JSON list, not an object")


def test_verify_refuses_a_record_giving_a_key_twice(unlearned: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Data-removal review: a second ``"instance_ids"`` inserted before the real one passed
    verify (json keeps the last key; a person reading the file sees the first)."""
    out, record = unlearned
    text = record.read_text()
    assert text.count('"instance_ids": [') >= 1
    edited = tmp_path / "edited.json"
    edited.write_text(text.replace('"instance_ids": [', '"instance_ids": [53, 55], '
                                   '"instance_ids": [', 1))
    assert cli.main(["verify", "--record", str(edited), "--checkpoint", str(out)]) == 2
    assert _err(capsys) == ("mtunlearn: error: --record: expected a JSON unlearning record with "
                            f"each key once, got '{edited}'; key 'instance_ids' is given twice "
                            "in one object (edited?)")
    assert cli.main(["verify", "--record", str(record)]) == 0


@pytest.mark.parametrize(("path", "value", "field"), [
    (("eval_batch_size",), 0, "eval_batch_size"),
    (("eval_batch_size",), "abc", "eval_batch_size"),
    (("eval_batch_size",), True, "eval_batch_size"),
    (("request", "retain_ids"), 5, "request.retain_ids"),
    (("request", "retain_ids"), ["a"], "request.retain_ids"),
    (("request", "ids_drawn"), {"fraction": 2, "seed": 0}, "request.ids_drawn"),
    (("request", "ids_drawn"), "0.1", "request.ids_drawn"),
])
def test_verify_malformed_fields_exit_2_naming_the_field(
        unlearned: tuple[Path, Path], tmp_path: Path, path: tuple[str, ...], value: Any,
        field: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, record = unlearned
    payload = json.loads(record.read_text())
    node = payload
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(bad)]) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --record:") and f"{field} (" in err, err


# -- the checkpoint checked against the record ----------------------------------------------------


@pytest.mark.parametrize("change", ["flip", "truncate", "empty"])
def test_verify_a_changed_checkpoint_is_a_mismatch(
        unlearned: tuple[Path, Path], tmp_path: Path, change: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, record = unlearned
    data = bytearray(ckpt.read_bytes())
    if change == "flip":
        data[len(data) // 2] ^= 1
    elif change == "truncate":
        data = data[:200]
    else:
        data = bytearray()
    copy = tmp_path / "r.json"
    changed = tmp_path / "changed.pt"
    changed.write_bytes(bytes(data))
    payload = json.loads(record.read_text())
    payload["output"]["checkpoint"] = str(changed)
    copy.write_text(json.dumps(payload))
    for argv in (["verify", "--record", str(copy)],
                 ["verify", "--record", str(record), "--checkpoint", str(changed)]):
        assert cli.main(argv) == 1, argv
        printed = capsys.readouterr()
        assert "--checkpoint" not in printed.err and "Traceback" not in printed.err
        assert "SHA-256" in printed.err and "differs from the record's" in printed.err
        assert printed.out.split()[:2] == ["check", "result"], printed.out
        assert printed.out.split()[4:6] == ["sha256", "MISMATCH"], printed.out
        assert "FAILED" in printed.out


def test_verify_re_measures_the_input_model_when_its_checkpoint_is_there(
        trained: Path, unlearned: tuple[Path, Path], tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: an edited `before` (the forget-set attack AUC raised to 0.99, so the
    forgetting looks larger) verified ok: only `after` was re-measured."""
    ckpt, record = unlearned
    assert cli.main(["verify", "--record", str(record)]) == 0
    out = capsys.readouterr().out
    assert ["before", "ok"] in [line.split() for line in out.splitlines()], out
    assert "(metric tolerance 0.0001)" in out
    payload = json.loads(record.read_text())
    payload["before"]["mia_auc"] = 0.99
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(edited), "--checkpoint", str(ckpt)]) == 1
    printed = capsys.readouterr()
    assert ["before", "MISMATCH"] in [line.split() for line in printed.out.splitlines()]
    assert "before" in printed.err and "mia_auc" in printed.err, printed.err
    # The input checkpoint gone (deleted with its data): the rest is verified, `before` is
    # reported as not measured.
    payload["input"]["checkpoint"] = str(tmp_path / "deleted.pt")
    edited.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(edited), "--checkpoint", str(ckpt)]) == 0
    rows = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    assert ["before", "not measured (input checkpoint not found)"] in rows


@pytest.mark.parametrize(("path", "value", "said"), [
    (("method", "name"), "retrain", "metadata has method 'interference_aware'"),
    (("input", "sha256"), "0" * 64, "metadata has parent_sha256"),
    (("request", "ids_sha256"), None, "metadata has ids_sha256"),  # None: ids and hash edited
    (("request", "type"), "partial", "metadata has request_type 'full'"),
    (("request", "target_tasks"), ["digit"], "metadata has target_tasks ['digit', 'parity', "
                                             "'magnitude']"),
    # Data-removal review: the record's data hash and seed were not compared with anything.
    (("benchmark", "data_sha256"), "0" * 64, "metadata has data_sha256"),
    (("benchmark", "seed"), 99, "the record's benchmark.seed 99"),
])
def test_verify_compares_the_checkpoints_own_metadata(
        unlearned: tuple[Path, Path], tmp_path: Path, path: tuple[str, str], value: Any,
        said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Review: a record edited to name another method, another input checkpoint, or other ids
    (with their hash edited to match) still verified, although the unlearned checkpoint's
    metadata says otherwise. It is now a mismatch (exit 1, `provenance MISMATCH`)."""
    from mtunlearn_ext.data.request import ForgetRequest

    _, record = unlearned
    payload = json.loads(record.read_text())
    if value is None:  # other ids, consistently hashed: only the checkpoint can tell
        request = payload["request"]
        request["instance_ids"] = [i + 1 for i in request["instance_ids"]]
        value = ForgetRequest(tuple(request["instance_ids"]), None).ids_hash()
    payload[path[0]][path[1]] = value
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(edited)]) == 1
    printed = capsys.readouterr()
    assert "provenance" in printed.out and said in printed.err, (printed.out, printed.err)
    rows = printed.out.split()
    assert rows[rows.index("provenance") + 1] == "MISMATCH"
    assert cli.main(["verify", "--record", str(record)]) == 0  # the record as written
    assert "provenance" in capsys.readouterr().out


def test_verify_fails_for_a_checkpoint_that_is_not_the_records_unlearned_output(
        trained: Path, unlearned: tuple[Path, Path], tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: a record edited so that its output is the original checkpoint (with its
    SHA-256) and `after` = `before` verified ok on every check: the provenance check skipped a
    checkpoint of `kind: original`, and nothing compared output.sha256 with input.sha256."""
    from mtunlearn_ext._io import sha256_of_file

    _, record = unlearned
    payload = json.loads(record.read_text())
    payload["output"] = {"checkpoint": str(trained), "sha256": sha256_of_file(trained)}
    payload["after"] = payload["before"]
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(forged)]) == 1
    printed = capsys.readouterr()
    rows = [line.split() for line in printed.out.splitlines()]
    assert ["provenance", "MISMATCH"] in rows and ["metrics", "ok"] in rows, printed.out
    assert ("mismatch: the checkpoint's metadata has kind 'original' (written by `mtunlearn "
            "train`), not 'unlearned': it is not the output of an unlearning run, so not this "
            "record's output") in printed.err
    assert ("mismatch: the record's output.sha256 is its input.sha256 (" in printed.err
            and "the output checkpoint is the input checkpoint, so nothing was unlearned"
            in printed.err), printed.err
    assert "FAILED" in printed.out


def test_verify_fails_for_a_partial_checkpoint_recorded_as_a_full_request(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """CLI review: the checkpoint's metadata did not hold the request type or target tasks, so a
    partial request's checkpoint verified against its record edited to `type: full` with the
    metrics of a full request (consistent, re-measurable numbers)."""
    out = tmp_path / "part.pt"
    assert _unlearn(trained, out, "--forget-ids", ids(1, 2, 3), "--target-tasks", "digit") == 0
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(out), "--forget-ids", ids(1, 2, 3),
                     "--quiet"]) == 0
    full = json.loads(capsys.readouterr().out)
    payload = json.loads(Path(str(out) + ".record.json").read_text())
    payload["request"].update(type="full", target_tasks=["digit", "parity", "magnitude"],
                              target_tasks_arg=None)
    payload["after"] = {k: full[k] for k in payload["after"]}
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(forged)]) == 1
    printed = capsys.readouterr()
    rows = [line.split() for line in printed.out.splitlines()]
    assert ["provenance", "MISMATCH"] in rows and ["metrics", "ok"] in rows, printed.out
    assert "metadata has request_type 'partial', the record's request.type 'full'" in printed.err
    assert "metadata has target_tasks ['digit'], the record's request.target_tasks" in printed.err
    assert "removed other pairs than the record's request" in printed.err


def test_provenance_of_older_checkpoints_and_lineages() -> None:
    """An older genuine checkpoint (no request type, tasks or removals in its metadata) still
    verifies, and says what was not compared; a record whose earlier removals differ from the
    checkpoint's lineage is a mismatch."""
    from mtunlearn_ext.records import OLDER_CHECKPOINT_NOTE, _provenance_differences

    record = {"method": {"name": "m"}, "input": {"sha256": "a"}, "output": {"sha256": "b"},
              "request": {"type": "full", "instance_ids": [3], "ids_sha256": "h",
                          "target_tasks": ["x", "y"], "target_tasks_arg": None,
                          "earlier_removals": []}}
    older = {"kind": "unlearned", "method": "m", "parent_sha256": "a", "ids_sha256": "h"}
    assert _provenance_differences(older, record) == ([], False)
    assert OLDER_CHECKPOINT_NOTE.startswith("ok (")
    newer = {**older, "request_type": "full", "target_tasks": ["x", "y"],
             "removals": [{"instance_ids": [3], "target_tasks": None, "ids_sha256": "h"}]}
    assert _provenance_differences(newer, record) == ([], True)
    chained = {**newer, "removals": [{"instance_ids": [1], "target_tasks": None},
                                     *newer["removals"]]}
    differences, _ = _provenance_differences(chained, record)
    assert len(differences) == 1 and "lists 1 earlier removals" in differences[0]
    same = {**record, "output": {"sha256": "a"}}
    differences, _ = _provenance_differences(newer, same)
    assert len(differences) == 1 and "nothing was unlearned" in differences[0]


def test_verify_an_unloadable_recorded_checkpoint_names_the_record(
        unlearned: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Bytes that are the recorded ones but cannot be loaded (here: a record whose SHA-256 is
    that of a damaged file) are bad input, named by the argument that supplied the file."""
    from mtunlearn_ext._io import sha256_of_file

    ckpt, record = unlearned
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(ckpt.read_bytes()[:200])
    payload = json.loads(record.read_text())
    payload["output"].update(checkpoint=str(damaged), sha256=sha256_of_file(damaged))
    copy = tmp_path / "r.json"
    copy.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(copy)]) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --record: expected a record whose output "
                          "checkpoint can be loaded") and "output.checkpoint" in err, err
    assert "--checkpoint" not in err
    assert cli.main(["verify", "--record", str(copy), "--checkpoint", str(damaged)]) == 2
    assert _err(capsys).startswith("mtunlearn: error: --checkpoint: expected a readable")


# -- recorded paths, from any folder --------------------------------------------------------------


FAST_STEPS = '{"steps": 2}'


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


def test_verify_finds_the_checkpoint_beside_the_record_from_any_folder(tmp_path: Path,
                                                                        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Records named their checkpoint relative to the folder `unlearn` ran in; `verify` from
    another folder failed with "does not exist"."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "out.pt").write_bytes(b"x")
    record = run / "out.pt.record.json"
    record.write_text(json.dumps({"output": {"checkpoint": "out.pt"}}))
    monkeypatch.chdir(tmp_path)
    assert not Path("out.pt").exists()
    assert recorded_path("out.pt", record) == run / "out.pt"
    # A path that exists as recorded (absolute, or relative from here) is taken as it is.
    assert recorded_path(str(run / "out.pt"), record) == run / "out.pt"
    assert recorded_path(os.path.join("run", "out.pt"), record) == Path("run/out.pt")
    assert recorded_path("gone.pt", record) == Path("gone.pt")


def test_recorded_relative_paths_are_tried_from_the_record_folder(tmp_path: Path,
                                                                  monkeypatch) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    (run / "ck").mkdir(parents=True)
    (run / "ck" / "m.pt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert recorded_path("ck/m.pt", run / "m.json") == run / "ck" / "m.pt"


# -- the request rebuilt from the record ----------------------------------------------------------


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


def test_verify_rebuilds_the_request_from_type_and_target_tasks() -> None:
    """Without `target_tasks_arg` a partial record was rebuilt as a full request."""
    from mtunlearn_ext.records import _request_from_record

    partial = {"type": "partial", "instance_ids": [1, 2], "target_tasks": ["a"]}
    assert _request_from_record(partial) == ([1, 2], ["a"])
    assert _request_from_record({**partial, "type": "full", "target_tasks": ["a", "b"]}) == (
        [1, 2], None)
    assert _request_from_record({**partial, "target_tasks_arg": ["b"]}) == ([1, 2], ["b"])
    with pytest.raises(ValueError, match="request.type is 'odd'"):
        _request_from_record({**partial, "type": "odd"})


# -- the record shows the forget objective the run used -------------------------------------------


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


def test_resolved_settings_fill_only_what_the_config_left_to_a_default() -> None:
    per_task = {"digit": "capped_ascent", "parity": "uniform"}
    report = SimpleNamespace(config={"steps": 3, "forget_objective": None},
                             extra={"resolved_settings": {"forget_objective": per_task}})
    assert cli_unlearn._resolved_settings(report) == {"steps": 3, "forget_objective": per_task}
    assert report.config["forget_objective"] is None  # the report itself is not changed
    retrain = SimpleNamespace(config={"epochs": 2, "seed": None},
                              extra={"resolved_settings": {"seed": 0, "epochs": 9}})
    assert cli_unlearn._resolved_settings(retrain) == {"epochs": 2, "seed": 0}  # a given one stays
    assert cli_unlearn._resolved_settings(SimpleNamespace(config={"epochs": 2}, extra={})) == {
        "epochs": 2}


@pytest.mark.parametrize("field", ["num_forget_pairs", "num_retain_pairs"])
def test_verify_recounts_the_requests_pairs(unlearned: tuple[Path, Path], tmp_path: Path,
                                            field: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: a record whose pair counts (the request's scope, as the summary and the
    report show it) were edited verified."""
    ckpt, record = unlearned
    payload = json.loads(record.read_text())
    recorded = payload["request"][field]
    payload["request"][field] = recorded + 7
    edited = tmp_path / "r.json"
    edited.write_text(json.dumps(payload))
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(edited), "--checkpoint", str(ckpt)]) == 1
    printed = capsys.readouterr()
    assert f"request.{field} {recorded + 7} differs from the split the request gives, " \
           f"{recorded} (record edited?)" in printed.err, printed.err
    assert "pair counts MISMATCH" in " ".join(printed.out.split()), printed.out
    assert cli.main(["verify", "--record", str(record), "--checkpoint", str(ckpt),
                     "--quiet"]) == 0
    assert "pair counts ok" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def chained(unlearned: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    """Records of two requests chained to ``unlearned`` (which forgot ids(1, 2)): ``named``
    forgets ids(2, 3), of which ids(2) was removed already, and ``drawn`` a random 2%."""
    folder = tmp_path_factory.mktemp("chained")
    ckpt, _ = unlearned
    out = {}
    for name, request in (("named", ["--forget-ids", ids(2, 3)]),
                          ("drawn", ["--forget-fraction", "0.02"])):
        assert _unlearn(ckpt, folder / f"{name}.pt", *request) == 0
        out[name] = folder / f"{name}.pt.record.json"
    return out


@pytest.mark.parametrize(("which", "field", "value", "message"), [
    ("named", "forgotten_instance_ids", "request", "request.forgotten_instance_ids {value} "
     "differ from the request's ids less those the earlier removals took, {real}"),
    ("named", "num_excluded_pairs", 0, "request.num_excluded_pairs 0 differs from the split "
     "the request gives, {real}"),
    ("named", "ids_drawn", {"fraction": 0.5, "seed": 0}, "request.ids_drawn {value} does not "
     "give the recorded request.instance_ids: it draws "),
    ("drawn", "ids_drawn", {"fraction": 0.02, "seed": 1}, "request.ids_drawn.seed 1 is not "
     "the run's seed 0, which draws the ids"),
    ("drawn", "ids_drawn", {"fraction": 0.1, "seed": 0}, "request.ids_drawn {value} does not "
     "give the recorded request.instance_ids: it draws "),
])
def test_verify_re_derives_the_requests_own_fields(
        chained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        which: str, field: str, value: Any, message: str) -> None:
    """CLI review: request.forgotten_instance_ids, num_excluded_pairs and ids_drawn could be
    edited and the record still verified. Each is made again as `unlearn` made it: the ids
    less those the lineage removed, the earlier removals' pairs in the retain split, the
    draw from the fraction and the seed."""
    record = chained[which]
    payload = json.loads(record.read_text())
    real = payload["request"][field]
    if value == "request":  # the ids named, as if none had been removed before
        value = payload["request"]["instance_ids"]
        assert value != real
    payload["request"][field] = value
    edited = tmp_path / "r.json"
    edited.write_text(json.dumps(payload))
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(edited), "--checkpoint",
                     str(record).removesuffix(".record.json"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message.format(value=value, real=real) in err, err
    assert cli.main(["verify", "--record", str(record), "--quiet"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "pair counts ok forgotten ids ok ids drawn " + (
        "ok (drawn again: fraction 0.02, seed 0)" if which == "drawn"
        else "not checked (the ids were named)") in out, out


def test_the_chained_records_fields_are_what_verify_re_derives(
        chained: dict[str, Path]) -> None:
    """The fields the test above edits hold what they claim in an unedited record (else the
    edits would prove nothing): one of the named ids forgotten, three pairs of ids(1) kept
    out, a draw recorded."""
    named = json.loads(chained["named"].read_text())["request"]
    assert named["forgotten_instance_ids"] == [int(ids(3))]
    assert named["num_excluded_pairs"] == 3 and named["ids_drawn"] is None
    drawn = json.loads(chained["drawn"].read_text())["request"]
    assert drawn["ids_drawn"] == {"fraction": 0.02, "seed": 0}


def test_a_recorded_metric_edited_into_a_boolean_is_a_mismatch() -> None:
    """CLI review: an accuracy of 0.0 edited to `false` verified (False == 0.0 in Python),
    while `report` refused the value."""
    from mtunlearn_ext.records import compare_measurements

    measured = {"forget": {"digit": {"accuracy": 0.0}}, "mia_auc": 1.0}
    assert compare_measurements({"forget": {"digit": {"accuracy": 0.0}}, "mia_auc": 1.0},
                                measured, 1e-4) == []
    assert compare_measurements({"forget": {"digit": {"accuracy": False}}, "mia_auc": True},
                                measured, 1e-4, "after") == [
        "after.forget.digit.accuracy: recorded False, measured 0.0",
        "after.mia_auc: recorded True, measured 1.0"]


def test_verify_json_is_the_outcome_alone_on_stdout_also_on_a_mismatch(
        unlearned: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI contract review: verify printed its table and verdict on stdout and its mismatches
    on stderr, nothing a CI step could read to say which check failed. `--json` prints one
    JSON object on stdout, valid on a mismatch too (exit 1), the table on stderr; bad input
    (exit 2) prints none."""
    checkpoint, record = unlearned
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(record), "--json"]) == 0
    captured = capsys.readouterr()
    verdict = json.loads(captured.out)
    assert verdict["verified"] is True and verdict["mismatches"] == []
    assert verdict["checkpoint"] == str(checkpoint.resolve())
    assert verdict["checks"]["sha256"] == "ok" and verdict["tolerance"] == 1e-4
    assert "verified: " in captured.err and "check" in captured.err
    edited = tmp_path / "edited.json"
    payload = json.loads(record.read_text())
    payload["benchmark"]["seed"] += 1
    edited.write_text(json.dumps(payload))
    assert cli.main(["verify", "--record", str(edited), "--json"]) == 1
    captured = capsys.readouterr()
    verdict = json.loads(captured.out)
    assert verdict["verified"] is False and verdict["checks"]["provenance"] == "MISMATCH"
    assert verdict["record"] == str(edited.resolve()) and verdict["mismatches"]
    assert "FAILED: " in captured.err
    assert cli.main(["verify", "--record", str(tmp_path / "nope.json"), "--json"]) == 2
    assert capsys.readouterr().out == ""
