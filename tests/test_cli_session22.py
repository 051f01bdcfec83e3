"""``mtunlearn`` review fixes (session 22): no temporary file left by an interrupt, ``verify`` of
a changed checkpoint as a mismatch, malformed record fields as bad input, id files that are not
text, ambiguous id arguments, the random-10% default made visible, a concurrent run's output
name, and duplicate retain ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_cli import FAST, ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import _io, cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread, for this module only)."""


@pytest.fixture(scope="module")
def unlearned(trained: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
              ) -> tuple[Path, Path]:
    """``(checkpoint, record)`` of one unlearning run of ``trained``."""
    folder = tmp_path_factory.mktemp("s22")
    out = folder / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method-config", FAST, "--output", str(out), "--quiet"]) == 0
    return out, Path(str(out) + ".record.json")


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of the last command: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- 1: an interrupt inside temporary_file_beside leaves no temporary file ------------------------


@pytest.mark.parametrize("where", ["_umask", "fchmod"])
def test_interrupt_after_mkstemp_leaves_no_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt  # as if SIGINT arrived here

    if where == "_umask":
        monkeypatch.setattr(_io, "_umask", interrupted)
    else:
        monkeypatch.setattr(_io.os, "fchmod", interrupted)
    for write in (lambda: _io.write_text_atomic(tmp_path / "a.json", "{}"),
                  lambda: _io.write_text_new(tmp_path / "b.json", "{}"),
                  lambda: _io.atomic_torch_save({"x": 1}, tmp_path / "c.pt")):
        with pytest.raises(KeyboardInterrupt):
            write()
    assert list(tmp_path.iterdir()) == []


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


# -- 2: verify of a changed checkpoint is a mismatch; unreadable ones name their argument ------


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


@pytest.mark.parametrize(("path", "value", "said"), [
    (("method", "name"), "retrain", "metadata has method 'interference_aware'"),
    (("input", "sha256"), "0" * 64, "metadata has parent_sha256"),
    (("request", "ids_sha256"), None, "metadata has ids_sha256"),  # None: ids and hash edited
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


# -- 3: malformed record fields are bad input naming the field ----------------------------------


@pytest.mark.parametrize(("path", "value", "field"), [
    (("eval_batch_size",), 0, "eval_batch_size"),
    (("eval_batch_size",), "abc", "eval_batch_size"),
    (("eval_batch_size",), True, "eval_batch_size"),
    (("request", "retain_ids"), 5, "request.retain_ids"),
    (("request", "retain_ids"), ["a"], "request.retain_ids"),
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


# -- 4: an id file that is not text is bad input naming the argument -----------------------------


@pytest.mark.parametrize("argument", ["--forget-ids", "--retain-ids"])
def test_a_binary_id_file_exits_2_naming_the_argument(
        trained: Path, tmp_path: Path, argument: str,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    extra = [] if argument == "--forget-ids" else ["--forget-ids", ids(1)]
    for given in (str(trained), "@" + str(trained)):
        assert cli.main(["unlearn", "--checkpoint", str(trained), argument, given, *extra,
                         "--output", str(tmp_path / "o.pt"), "--quiet"]) == 2
        err = _err(capsys)
        assert err.startswith(f"mtunlearn: error: {argument}: expected instance ids or a "
                              "readable text file") and "not UTF-8 text" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- 5: text that is an id list and a file's name is refused; @file and ./file read the file ----


def test_an_id_list_that_is_also_a_file_name_is_refused(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    from mtunlearn_ext.workflow import UserInputError, parse_ids

    monkeypatch.chdir(tmp_path)
    first, second = ids(1), ids(2)
    Path(first).write_text(f"{second}\n")
    with pytest.raises(UserInputError) as caught:
        parse_ids(first, "--forget-ids")
    message = str(caught.value)
    assert message.startswith("--forget-ids: expected instance ids or a file of them, "
                              "unambiguously")
    assert f"@{first}" in message and f"./{first}" in message and f"{first}," in message
    assert parse_ids(f"@{first}", "--forget-ids") == [int(second)]
    assert parse_ids(f"./{first}", "--forget-ids") == [int(second)]
    assert parse_ids(f"{first},", "--forget-ids") == [int(first)]
    assert parse_ids(f"{first},{second}", "--forget-ids") == [int(first), int(second)]
    # A file name that is no id list stays a file.
    Path("ids.txt").write_text(f"{first} {second}")
    assert parse_ids("ids.txt", "--retain-ids") == [int(first), int(second)]
    # The CLI: one line, exit 2, nothing written.
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", first,
                     "--output", "o.pt", "--quiet"]) == 2
    assert "both an id list and the name of a file" in _err(capsys)
    assert not Path("o.pt").exists()


# -- 6: forgetting a random 10% is said, in --help and at run time -------------------------------


def test_unlearn_without_forget_ids_says_it_forgets_a_random_share(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    help_text = " ".join(cli._subparser(cli.build_parser(), "unlearn").format_help().split())
    assert "without it, a random 10% of the training instances is forgotten" in help_text
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--method-config", FAST,
                     "--output", str(out), "--seed", "5", "--quiet"]) == 0
    err = _err(capsys)
    assert err.startswith("mtunlearn: no --forget-ids: forgetting a random 10% of the training "
                          "instances (--forget-fraction 0.1, seed 5)"), err
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert f"{len(record['request']['instance_ids'])} instances" in err
    # The same from a config with forget_ids: null, and not with ids.
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {trained}\nforget_ids: null\nforget_fraction: 0.05\n"
                      f"method_config: '{FAST}'\noutput: {tmp_path / 'v.pt'}\nquiet: true\n")
    assert cli.main(["unlearn", "--config", str(config)]) == 0
    assert "forgetting a random 5% of the training instances (--forget-fraction 0.05" \
        in _err(capsys)
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1),
                     "--method-config", FAST, "--output", str(tmp_path / "w.pt"),
                     "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    docs = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    assert "without `--forget-ids`, `unlearn` forgets a random 10%" in docs.lower()


# -- 7: an output that appears during the run is named by its argument --------------------------


@pytest.mark.parametrize("named", [True, False])
def test_an_output_made_by_a_concurrent_run_names_the_argument(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str], named: bool) -> None:
    import mtunlearn_ext.training as training

    real = training.save_checkpoint

    def racing(path: Path, *args: Any, **kwargs: Any) -> str:
        path.write_bytes(b"the other run's")  # the other run got there first
        return real(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", racing)
    shutil.copy(trained, tmp_path / "orig.pt")
    monkeypatch.chdir(tmp_path)
    extra = ["--output", "mine.pt"] if named else []
    assert cli.main(["unlearn", "--checkpoint", "orig.pt", "--forget-ids", ids(1),
                     "--method-config", FAST, "--quiet", *extra]) == 2
    err = _err(capsys)
    name = "mine.pt" if named else "orig.interference_aware.pt"
    assert err.startswith(f"mtunlearn: error: --output: expected a path that does not exist "
                          f"yet, got '{name}'; the file appeared during the run"), err
    assert "overwrite=True" not in err
    assert (tmp_path / name).read_bytes() == b"the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["orig.pt", name])


# -- 8: duplicate retain ids are refused like duplicate forget ids ------------------------------


def test_duplicate_retain_ids_are_refused(trained: Path, tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str]) -> None:
    kept = ids(3)
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1),
                     "--retain-ids", f"{kept},{ids(4)},{kept}", "--method-config", FAST,
                     "--output", str(tmp_path / "o.pt"), "--quiet"]) == 2
    assert _err(capsys) == (f"mtunlearn: error: --retain-ids: expected distinct ids, got "
                            f"'duplicates [{kept}]'")
    assert list(tmp_path.iterdir()) == []
    docs = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    assert "YAML 1.1, which takes `1e-3` for a string: write `1.0e-3`" in docs
