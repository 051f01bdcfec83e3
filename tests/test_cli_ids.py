"""``mtunlearn``'s instance-id arguments (``--forget-ids``, ``--retain-ids``): an id list longer
than a file name, text that is both an id list and a file's name (``@file`` and ``./file`` read
the file), id files that are not text, unknown ids (the valid ones shown, and the documented
command that lists them), duplicate retain ids, and the random 10% forgotten when no ids are
given."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import ROOT, _err, _train
from test_cli import FAST, _listing, ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _parser as cli_parser
from mtunlearn_ext.data import load_benchmark
from mtunlearn_ext.workflow import UserInputError, parse_ids


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


# -- an id list or a file of ids ------------------------------------------------------------------


def test_a_long_id_list_is_ids_not_a_file_name() -> None:
    """Text past the system's file-name limit made Path.is_file() raise OSError (Errno 36):
    about 80 ids on the command line crashed."""
    ids = list(range(3, 400, 4))
    text = ",".join(map(str, ids))
    assert len(text) > 255
    assert parse_ids(text, "--forget-ids") == ids
    with pytest.raises(UserInputError, match="--forget-ids: expected integer instance ids"):
        parse_ids("x" * 300, "--forget-ids")


def test_ids_written_as_json_are_told_to_be_plain_text(tmp_path: Path) -> None:
    """Compliance review: a file holding `[3, 7]` was refused with "got '[3'", a fragment of
    it, and nothing about its format."""
    (tmp_path / "ids.json").write_text("[3, 7]\n")
    for given, where in ((str(tmp_path / "ids.json"), "line 1 of "), ("[3,7]", "")):
        with pytest.raises(UserInputError, match=rf"got '\[3'; {where}.*not JSON: write the ids "
                                                 r"as plain text, '3,7' or one per line$"):
            parse_ids(given, "--forget-ids")


def test_an_at_file_that_is_not_a_file_says_what_is_there(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """CLI review: `--forget-ids @.` said "ids are decimal integers", not that `.` is a
    folder; `@missing.txt` did not say the file is missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "idsdir").mkdir()
    os.mkfifo(tmp_path / "fifo.txt")  # failure injection: it was "no file 'fifo.txt'"
    (tmp_path / "dangling.txt").symlink_to("gone.txt")  # diff review: "not a regular file"
    for given, said in (("@dangling.txt", "'dangling.txt' is a symbolic link to a missing file "
                                          "('gone.txt')"),
                        ("@fifo.txt", "'fifo.txt' is not a regular file; write the ids into "
                                      "one"),
                        ("@.", "'.' is a folder, not a file of ids"),
                        ("@idsdir", "'idsdir' is a folder, not a file of ids"),
                        ("idsdir/", "'idsdir' is a folder, not a file of ids"),
                        ("@missing.txt", "no file 'missing.txt'"),
                        ("missing.txt", "no file 'missing.txt' either")):
        with pytest.raises(UserInputError) as caught:
            parse_ids(given, "--forget-ids")
        assert str(caught.value).startswith("--forget-ids: expected "), caught.value
        assert str(caught.value).endswith(said), (given, str(caught.value))


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


# -- unknown and duplicate ids --------------------------------------------------------------------


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


@pytest.mark.parametrize("twice, shown", [
    (["--forget-ids", "3,7", "--forget-ids", "13"], "--forget-ids: expected --forget-ids once "
     "(argparse keeps only the last), got ['3,7', '13']; give every id in one --forget-ids, "
     "e.g. --forget-ids 3,7,13"),
    (["--forget-ids=3", "--forget-i", "7"], "got ['3', '7']"),  # abbreviated: the same option
    (["--forget-ids", "3", "--retain-ids", "7", "--retain-ids", "13"], "--retain-ids: expected "
     "--retain-ids once"),
    (["--forget-ids", "3", "--target-tasks", "digit", "--target-tasks", "parity"],
     "got ['digit', 'parity']; give every task in one --target-tasks, e.g. --target-tasks "
     "digit,parity"),
    # The example joins the values given, and names no other instance (it said "3,7,13").
    (["--forget-ids", "3", "--forget-ids", "7"], "got ['3', '7']; give every id in one "
     "--forget-ids, e.g. --forget-ids 3,7"),
    (["--forget-fraction", "0.1", "--forget-fraction", "0.2"], "--forget-fraction: expected "
     "--forget-fraction once (argparse keeps only the last), got ['0.1', '0.2']; give one value"),
    (["--forget-ids", "3", "--request", "full", "--request", "partial"], "--request: expected"),
    (["--forget-fraction", "0.1", "--seed", "1", "--seed", "2"], "--seed: expected --seed once"),
])
@pytest.mark.parametrize("command", ["unlearn", "evaluate"])
def test_a_request_option_given_twice_is_refused(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        command: str, twice: list[str], shown: str) -> None:
    """argparse keeps an option's last value: `--forget-ids 3,7 --forget-ids 13` forgot id 13
    alone and kept 3 and 7 in the model, without a word (a config's key written twice was
    refused already)."""
    assert cli.main([command, "--checkpoint", str(trained), *twice,
                     "--output", str(tmp_path / "o.out"), "--quiet"]) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --") and shown in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_still_overrides_a_configs_forget_ids(
        trained: Path, tmp_path: Path) -> None:  # noqa: F811
    config = tmp_path / "c.yaml"
    config.write_text(f"forget_ids: [{ids(1)}]\n")
    out = tmp_path / "e.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--config", str(config),
                     "--forget-ids", ids(2), "--output", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["request"]["instance_ids"] == [int(ids(2))]


# -- no ids: a random 10%, said in --help and at run time -----------------------------------------


def test_unlearn_without_forget_ids_says_it_forgets_a_random_share(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    help_text = " ".join(cli_parser._subparser(cli.build_parser(), "unlearn").format_help().split())
    assert "without it, a random 10% of the training instances is forgotten" in help_text
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--method-config", FAST,
                     "--output", str(out), "--seed", "5", "--quiet"]) == 0
    err = _err(capsys)
    assert err.startswith("mtunlearn: no --forget-ids: forgetting a random 10% of the training "
                          "instances (--forget-fraction 0.1, seed 5)"), err
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert f"{len(record['request']['instance_ids'])} instances" in err
    # Compliance review: the record did not say that the tool chose the ids.
    assert record["request"]["ids_drawn"] == {"fraction": 0.1, "seed": 5}
    # The same from a config without a forget_ids key, and not with ids.
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {trained}\nforget_fraction: 0.05\n"
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


@pytest.mark.parametrize("empty", ["forget_ids: null", "forget_ids: ~", "forget_ids:",
                                   "forget-ids: null"])
def test_an_empty_forget_ids_in_a_config_is_refused(
        trained: Path, tmp_path: Path, empty: str,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: `forget_ids: null` (a YAML null: a template's blank, a variable that did not
    expand) silently forgot a random 10%. Only an absent key draws; an empty one is refused
    (exit 2, nothing written) unless the command line names the ids."""
    config = tmp_path / "c.yaml"
    config.write_text(f"checkpoint: {trained}\n{empty}\nmethod_config: '{FAST}'\n"
                      f"output: {tmp_path / 'v.pt'}\nquiet: true\n")
    assert cli.main(["unlearn", "--config", str(config)]) == 2
    key = empty.split(":")[0]
    assert _err(capsys) == (
        f"mtunlearn: error: --config: expected instance ids for '{key}', or no {key} key (then "
        "a random --forget-fraction of the training instances is forgotten), got 'null'; an "
        f"empty {key} is refused, not taken for a random draw: list the ids, or remove the key "
        "to draw them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]
    assert cli.main(["evaluate", "--config", str(config)]) == 2  # every command alike
    capsys.readouterr()
    # The command line's ids override the config's empty value.
    assert cli.main(["unlearn", "--config", str(config), "--forget-ids", ids(1, 2)]) == 0
    assert capsys.readouterr().err == ""


# -- ids mean what they say: decimal digits only ------------------------------------------------


@pytest.mark.parametrize("text", ["1_3", "+3", "３", "0x1f", "3.0", "1e2"])
def test_ids_are_plain_decimal_digits(text: str) -> None:
    """CLI review: int() took "1_3" as 13 (a typo of "1,3" named another instance), and "+3"
    and full-width digits as ids: the record then held an instance nobody asked for."""
    with pytest.raises(UserInputError, match=rf"--forget-ids: expected integer instance ids .*"
                                             rf"got {re.escape(repr(text))}; ids are decimal "
                                             r"integers in ASCII digits"):
        parse_ids(f"7,{text}", "--forget-ids")
    assert parse_ids("0020, 7 -3", "--forget-ids") == [20, 7, -3]  # negatives: refused later


def test_id_files_take_a_bom_and_comments_and_errors_name_the_line(tmp_path: Path) -> None:
    """CLI review: a file saved with a byte-order mark (Windows Notepad) was refused as
    '\\ufeff3', '#' comment lines were refused as ids, and an error named no file or line."""
    good = tmp_path / "ids.txt"
    good.write_text("\ufeff# forget request 2026-11\n3, 7  # two instances\n\n13\n",
                    encoding="utf-8")
    assert parse_ids(f"@{good}", "--forget-ids") == [3, 7, 13]
    bad = tmp_path / "bad.txt"
    bad.write_text("3\n7\n1_3\n")
    with pytest.raises(UserInputError, match=rf"got '1_3'; line 3 of {re.escape(repr(str(bad)))}"
                                             r": ids are decimal integers in ASCII digits"):
        parse_ids(f"@{bad}", "--forget-ids")


def test_an_id_file_without_ids_is_named(tmp_path: Path) -> None:
    """Review: an empty ids file (or one of comments only) came through as an empty list and
    was refused later as "got 'an empty list'", naming no file."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("\ufeff# none yet\n\n  \n")
    for given in (f"@{tmp_path / 'empty.txt'}", str(tmp_path / "comments.txt")):
        for argument in ("--forget-ids", "--retain-ids"):
            with pytest.raises(UserInputError, match=rf"^{argument}: expected at least one "
                                                     rf"instance id, got {re.escape(repr(given))}"
                                                     r"; the file holds no ids \(it is empty, or "
                                                     r"holds only blank lines and '#' "
                                                     r"comments\)$"):
                parse_ids(given, argument)


def test_yaml_configs_refuse_integers_yaml_would_convert(
        trained: Path, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: YAML 1.1 reads 0020 as octal 16 and 0032 as 26, both training ids here: the
    run forgot instances 16 and 26, exit 0, where --forget-ids 0020,0032 names 20 and 32."""
    config = tmp_path / "request.yaml"
    config.write_text("forget_ids: [0020, 0032]\n")
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--config", str(config),
                     "--method-config", FAST, "--output", str(out), "--quiet"]) == 2
    assert re.search(r"^mtunlearn: error: --config: .*'0020' is not a plain decimal integer: "
                     r"YAML 1\.1 reads it as 16 .*write the decimal number meant", _err(capsys))
    assert not out.exists()
    for text, read in (("1:13", 73), ("1_3", 13), ("0x10", 16)):
        config.write_text(f"seed: {text}\n")
        assert cli.main(["unlearn", "--checkpoint", str(trained), "--config", str(config),
                         "--output", str(out), "--quiet"]) == 2
        assert f"{text!r} is not a plain decimal integer: YAML 1.1 reads it as {read}" in _err(
            capsys)
    config.write_text("forget_ids: ['0020', 7]\nseed: 0\n")  # quoted: the decimal text
    from mtunlearn_ext.cli._config import _load_config

    assert _load_config(str(config)) == {"forget_ids": ["0020", 7], "seed": 0}


def test_an_id_past_pythons_digit_limit_is_named_not_a_traceback(tmp_path: Path) -> None:
    """An id of 5000 digits (on the command line or in an ids file) passed the digits check
    and int() raised Python's digit-limit ValueError: a traceback with exit 1."""
    from mtunlearn_ext.workflow import UserInputError, parse_ids

    huge = "9" * 5000
    with pytest.raises(UserInputError, match=r"^--forget-ids: expected ids of training "
                                             r"instances, got 'an id of 5,000 digits'; no "
                                             r"instance has such an id$"):
        parse_ids(f"3,{huge}", "--forget-ids")
    listed = tmp_path / "ids.txt"
    listed.write_text(f"3\n{huge}\n")
    with pytest.raises(UserInputError, match=r"an id of 5,000 digits \(line 2 of "):
        parse_ids(f"@{listed}", "--forget-ids")


def test_trains_seed_given_twice_is_refused_as_the_requests_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI contract review: `unlearn --seed 1 --seed 2` was refused, `train --seed 1 --seed 2`
    trained with seed 2 without a word, though the seed decides the checkpoint's bytes as
    much. Refused the same way now, before anything is written; any other option twice keeps
    its last value, as docs/cli.md says."""
    assert _train(tmp_path / "t.pt", "--seed", "1", "--seed", "2") == 2
    assert _err(capsys) == ("mtunlearn: error: --seed: expected --seed once (argparse keeps "
                            "only the last), got ['1', '2']; give one value")
    assert list(tmp_path.iterdir()) == []
    assert _train(tmp_path / "a.pt", "--output", str(tmp_path / "b.pt")) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["b.pt"]
    docs = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    assert "`--seed`, `train`'s `--seed` too) is refused (exit 2)" in docs
    assert "Any other option given twice takes its last value" in docs
