"""``mtunlearn``'s settings from files and inline text: a ``--config`` file's null value keeps the
default and a flag's value must be a boolean, ``benchmark``'s pass-through arguments given in a
YAML or TOML config, ``--import`` from a config (its option name as the key, a list or one
string), and inline JSON (``--train``) or a ``--config`` name too long to be a file name."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import _err
from test_cli import _listing, ids, trained  # noqa: F401  (trained: a fixture)
from test_cli_plugins import PLUGIN

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _config as cli_config
from mtunlearn_ext.unlearning.registry import UNLEARNERS


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


# -- a null config value means "not given" --------------------------------------------------------


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
    # The settings came from the file: the record names it and its SHA-256.
    import hashlib

    assert record["invocation"] == {
        "argv": ["unlearn", "--config", str(config)], "cwd": str(tmp_path.resolve()),
        "imports": [], "config": {"file": str(config.resolve()),
                                  "sha256": hashlib.sha256(config.read_bytes()).hexdigest()},
        "method_config": None}
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


# -- a config's relative paths name files from its folder ----------------------------------------


def test_a_configs_relative_paths_are_read_from_its_folder(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: `checkpoint: orig.pt` in proj/c.yaml was read from the current folder, so a
    config and the files beside it worked only when run from their folder. Every path the
    config gives is now read from its folder (the ids file, the settings file and a plugin's
    .py too), the outputs land there, and the record's invocation reruns the same files."""
    project, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    shutil.copy(trained, project / "orig.pt")
    (project / "ids.txt").write_text(ids(1, 2).replace(",", "\n"))
    (project / "m.json").write_text('{"steps": 2}')
    (project / "plug.py").write_text("LOADED = True\n")
    (project / "c.yaml").write_text(
        "checkpoint: orig.pt\nforget_ids: '@ids.txt'\nmethod_config: m.json\n"
        "import: [plug.py]\noutput: u.pt\nquiet: true\n")
    monkeypatch.chdir(elsewhere)
    try:
        assert cli.main(["unlearn", "--config", "../proj/c.yaml"]) == 0, capsys.readouterr().err
    finally:
        sys.modules.pop("plug", None)
    assert _listing(elsewhere) == set()
    record = json.loads((project / "u.pt.record.json").read_text())
    assert record["request"]["instance_ids"] == [int(i) for i in ids(1, 2).split(",")]
    assert record["method"]["settings"]["steps"] == 2
    invocation = record["invocation"]
    assert invocation["method_config"]["file"] == str((project / "m.json").resolve())
    assert invocation["imports"][0]["file"] == str((project / "plug.py").resolve())
    # The same option on the command line is read from the current folder, as before.
    capsys.readouterr()
    assert cli.main(["unlearn", "--config", "../proj/c.yaml", "--checkpoint", "orig.pt",
                     "--output", "v.pt"]) == 2
    assert _err(capsys).startswith("mtunlearn: error: --checkpoint: expected a readable "
                                   "mtunlearn checkpoint, got 'orig.pt'")
    # The recorded command, from the recorded folder, reads the same files: the same weights.
    (project / "c.yaml").write_text((project / "c.yaml").read_text().replace("u.pt", "w.pt"))
    try:
        assert cli.main(invocation["argv"]) == 0
    finally:
        sys.modules.pop("plug", None)
    first = torch.load(project / "u.pt", weights_only=True)["state_dict"]
    second = torch.load(project / "w.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    # A file the config names that is not there is said with the path looked for.
    (project / "c.yaml").write_text("checkpoint: orig.pt\nforget_ids: nope.txt\n")
    assert cli.main(["unlearn", "--config", "../proj/c.yaml", "--quiet"]) == 2
    assert "'../proj/nope.txt'" in _err(capsys)
    # train's and report's paths too.
    (project / "t.yaml").write_text("output: t.pt\nepochs: 1\nquiet: true\nthreads: 1\n")
    assert cli.main(["train", "--config", "../proj/t.yaml"]) == 0
    (project / "r.toml").write_text('results = "u.pt.record.json"\noutput_dir = "rep"\n')
    assert cli.main(["report", "--config", str(Path("..") / "proj" / "r.toml")]) == 0
    assert (project / "t.pt").is_file() and (project / "rep" / "report.md").is_file()
    assert _listing(elsewhere) == set()


def test_a_config_path_under_an_unknown_users_home_is_a_path_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review: `~name/...` in a config, where no user `name` exists, made Path.expanduser()
    raise RuntimeError out of the config's reading: a traceback and exit 1 (verify's mismatch
    code). As a shell does, the text stays as written: a relative path from the config's
    folder, and the error names the file looked for."""
    project, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "v.yaml").write_text("record: ~mtunlearn-no-such-user/r.json\n")
    monkeypatch.chdir(elsewhere)
    assert cli.main(["verify", "--config", "../proj/v.yaml"]) == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --record: "), err
    assert str(Path("..") / "proj" / "~mtunlearn-no-such-user" / "r.json") in err, err


def test_a_configs_id_text_is_ids_beside_it_and_says_what_an_id_is(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review of the config's folder as its paths' base: `forget_ids: 7` was refused for a
    stray file `7` in the current folder (the ambiguity judged there, where the config's
    paths are not read) while a file `7` beside the config went unnoticed; `7.0` and a JSON
    list as settings were taken for file names (their errors said "no file '../proj/7.0'")."""
    project, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    shutil.copy(trained, project / "orig.pt")
    first = ids(1, 2).split(",")[0]
    (elsewhere / first).write_text("not read\n")  # a stray file named as the id, here
    monkeypatch.chdir(elsewhere)

    def run(text: str) -> int:
        (project / "c.yaml").write_text(f"checkpoint: orig.pt\nquiet: true\n{text}")
        return cli.main(["unlearn", "--config", "../proj/c.yaml", "--method", "finetune",
                         "--method-config", '{"steps": 1}', "--output", "u.pt",
                         "--record", "u.json"])

    assert run(f"forget_ids: {first}\n") == 0, capsys.readouterr().err
    record = json.loads((elsewhere / "u.json").read_text())
    assert record["request"]["instance_ids"] == [int(first)]
    (project / first).write_text(f"{first}\n")  # now beside the config: ambiguous there
    (elsewhere / "u.pt").unlink()
    (elsewhere / "u.json").unlink()
    assert run(f"forget_ids: {first}\n") == 2
    err = _err(capsys)
    assert "it is both an id list and the name of a file beside the config" in err, err
    assert run("forget_ids: 7.0\n") == 2
    err = _err(capsys)
    assert "--forget-ids" in err and "proj" not in err, err
    (project / "c.yaml").write_text("checkpoint: orig.pt\nforget_ids: '1'\n"
                                    "method_config: '[1]'\n")
    assert cli.main(["unlearn", "--config", "../proj/c.yaml"]) == 2
    err = _err(capsys)
    assert "--method-config" in err and "proj" not in err, err


def test_a_configs_list_of_ids_is_never_a_file_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review: `forget_ids: [3]` (a YAML list, a TOML array) was joined to the text '3' and
    refused for a file `3` beside the config, the message asking for '3,' as if the list
    could name a file; a list of integers is ids."""
    (tmp_path / "3").write_text("5\n")
    (tmp_path / "c.yaml").write_text("checkpoint: nope.pt\nforget_ids: [3]\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["unlearn", "--config", "c.yaml"]) == 2
    err = _err(capsys)
    assert "--checkpoint" in err and "beside the config" not in err, err


def test_a_configs_ids_are_quoted_as_written(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review: a config's id list gets a trailing comma (ids, not a file of that name), which
    showed in evaluate's refusal of --retain-ids without a request: "got '7,13,'" for the
    '7,13' the config holds."""
    shutil.copy(trained, tmp_path / "orig.pt")
    (tmp_path / "c.yaml").write_text(f"checkpoint: orig.pt\nretain_ids: '{ids(1, 2)}'\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", "--config", "c.yaml"]) == 2
    err = _err(capsys)
    assert f"got '{ids(1, 2)}';" in err, err


def test_a_config_path_up_a_folder_is_said_without_the_detour(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI audit: `checkpoint: ../orig.pt` in proj/cfg/c.yaml was said as
    `proj/cfg/../orig.pt`; it is `proj/orig.pt` unless a link in the dropped part would take
    `..` elsewhere, when the joined text is the truthful one and stays."""
    config_folder, elsewhere, deep = (tmp_path / "proj" / "cfg", tmp_path / "elsewhere",
                                      tmp_path / "other" / "deep")
    for folder in (config_folder, elsewhere, deep):
        folder.mkdir(parents=True)
    (config_folder / "link").symlink_to(deep)
    monkeypatch.chdir(elsewhere)
    for checkpoint, said in [("../nope.pt", "'../proj/nope.pt'"),
                             ("link/../nope.pt", "'../proj/cfg/link/../nope.pt'")]:
        (config_folder / "c.yaml").write_text(f"checkpoint: {checkpoint}\nforget_ids: '1,2'\n")
        assert cli.main(["unlearn", "--config", "../proj/cfg/c.yaml", "--quiet"]) == 2
        err = _err(capsys)
        assert err.startswith("mtunlearn: error: --checkpoint:") and said in err, err


def test_a_linked_config_is_recorded_as_the_link(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review: a config reached through a link has its paths read from the link's folder, but
    the record named the file behind the link, from whose folder a rerun read other files."""
    project, links = tmp_path / "proj", tmp_path / "links"
    project.mkdir()
    links.mkdir()
    shutil.copy(trained, links / "orig.pt")
    (project / "c.yaml").write_text(f"checkpoint: orig.pt\nforget_ids: '{ids(1, 2)}'\n"
                                    "method: finetune\nmethod_config: '{\"steps\": 1}'\n"
                                    "output: u.pt\nquiet: true\n")
    (links / "c.yaml").symlink_to(project / "c.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["unlearn", "--config", "links/c.yaml"]) == 0, capsys.readouterr().err
    record = json.loads((links / "u.pt.record.json").read_text())
    assert record["invocation"]["config"]["file"] == str(links.resolve() / "c.yaml")
    assert record["invocation"]["config"]["sha256"] is not None


# -- benchmark's positional `extra` from a config -------------------------------------------------


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


# -- --import from a config ----------------------------------------------------------------------

_PLUGIN_NUMBER = itertools.count()


def _plugin(folder: Path) -> tuple[str, str]:
    """A new module in ``folder`` that registers a method; returns (module, method) names, both
    unused so far in this process (an imported module stays in ``sys.modules``)."""
    n = next(_PLUGIN_NUMBER)
    module, method = f"cfg_plugin_{n}", f"cfg_method_{n}"
    (folder / f"{module}.py").write_text(PLUGIN.format(name=method))
    return module, method


@pytest.mark.parametrize(("name", "text"), [
    ("c.yaml", "import: {m}\n"),       # the option's name (docs/cli.md: keys are option names)
    ("c.yaml", "import: [{m}]\n"),
    ("c.yaml", "imports: [{m}]\n"),    # the name argparse stores it under, as before
    ("c.toml", 'imports = "{m}"\n'),   # one string is one module, not its characters
    ("c.toml", 'import = ["{m}"]\n')])
def test_config_import_takes_the_option_name_and_a_list_or_a_string(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        registries_restored: None, name: str, text: str) -> None:
    monkeypatch.chdir(tmp_path)
    module, method = _plugin(tmp_path)
    config = tmp_path / name
    config.write_text("dry_run = true\n" + text.format(m=module) if name.endswith(".toml")
                      else "dry_run: true\n" + text.format(m=module))
    try:
        assert cli.main(["benchmark", "--config", str(config)]) == 0, capsys.readouterr().err
        assert method in UNLEARNERS  # the module was imported, under its whole name
    finally:
        sys.modules.pop(module, None)


def test_config_imports_add_to_the_command_line_and_bad_values_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        registries_restored: None) -> None:
    monkeypatch.chdir(tmp_path)
    (m1, name1), (m2, name2), (m3, name3) = (_plugin(tmp_path) for _ in range(3))
    config = tmp_path / "c.yaml"
    config.write_text(f"dry_run: true\nimport: [{m1}, {m2}]\n")
    try:
        # A repeatable option: --import on the command line imports one more module.
        assert cli.main(["benchmark", "--config", str(config), "--import", m3]) == 0
        assert {name1, name2, name3} <= set(UNLEARNERS)
    finally:
        for module in (m1, m2, m3):
            sys.modules.pop(module, None)
    capsys.readouterr()
    config.write_text("dry_run: true\nimport: 5\n")
    assert cli.main(["benchmark", "--config", str(config)]) == 2
    assert _err(capsys) == ("mtunlearn: error: --config: expected a valid value for 'import', "
                            "got 5; a string or a list of strings (--import is repeatable)")
    config.write_text("dry_run: true\nimport: a\nimports: [b]\n")
    assert cli.main(["benchmark", "--config", str(config)]) == 2
    assert _err(capsys) == ("mtunlearn: error: --config: expected one key per option, got "
                            "'imports'; 'import' sets the same option")


# -- text too long to be a file name is the literal value -----------------------------------------


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


def test_yaml_errors_end_with_their_line_and_column(tmp_path: Path) -> None:
    """User review: PyYAML's position text (`in "<unicode string>", line 2, column 14`) followed
    our advice "or quote it", reading as "quote it in <unicode string>". The problem comes
    first now, then the position in parentheses; a context that began elsewhere (an unclosed
    quote or bracket) says where it began too."""
    from mtunlearn_ext.workflow import UserInputError

    for text, said in (("checkpoint: a.pt\nforget_ids: [0020, 7]\n",
                        "without leading zeros, or quote it (at line 2, column 14)"),
                       ("checkpoint: [a.pt\n", "while parsing a flow sequence (from line 1, "
                                               "column 13): expected ',' or ']', but got "
                                               "'<stream end>' (at line 2, column 1)"),
                       ("a: 1\na: 2\n", "while reading a mapping (from line 1, column 1): key "
                                        "'a' is given twice; keep one (at line 2, column 1)"),
                       ('x: "abc\n\n', "while scanning a quoted scalar (from line 1, column 4): "
                                      "found unexpected end of stream (at line 3, column 1)"),
                       ("a: b: c\n", "mapping values are not allowed here (at line 1, "
                                    "column 5)")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(UserInputError) as caught:
            cli_config._load_config(str(path))
        message = str(caught.value)
        assert message.endswith(said) and "unicode string" not in message, message


def test_yaml_aliases_that_expand_without_end_are_refused_before_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config's lists of two aliases of the list before ("billion laughs"): PyYAML shares
    them, but the value was then written out as JSON for --method-config, 34 s and 1.5 GB from
    1 KB at 22 levels, twice that per further level (20 here: seconds without the check). An
    alias inside the value it names never ends either. Merge keys stay (other tests)."""
    levels = ["a0: &l0 [1, 1]"] + [f"a{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 20)]
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text("checkpoint: none.pt\nmethod_config: {" + ", ".join(levels) + "}\n")
    selfish = tmp_path / "self.yaml"
    selfish.write_text("checkpoint: none.pt\nmethod_config: &m {a: *m}\n")
    for path, said in ((laughs, r"its aliases \(\*name\) expand it to 4,194,305 values from 47 "
                                r"written \(at most 1,000,000 more are read\); write the values "
                                r"out \(at line 1, column 1\)$"),
                       (selfish, r"an alias \(\*name\) lies inside the value it names")):
        assert cli.main(["unlearn", "--config", str(path), "--forget-ids", "3"]) == 2
        err = _err(capsys)
        assert err.startswith("mtunlearn: error: --config: expected valid YAML/TOML"), err
        assert re.search(said, err), err


def test_a_number_read_as_text_says_how_yaml_reads_numbers() -> None:
    """User review: `lr: 1e-3` in a YAML file is the string '1e-3' (YAML 1.1 wants a dot and a
    sign in the exponent); the refusal now shows the form it reads as a number, which
    PyYAML indeed reads as the value meant."""
    import re

    import yaml

    from mtunlearn_ext.unlearning import get_unlearner

    for text, value in (("1e-3", 1e-3), ("3E5", 3e5), ("-2e+3", -2e3)):
        with pytest.raises(ValueError, match=r"`lr` must be a number, got .* YAML 1\.1 reads an "
                                             r"exponent as a number only with a dot and a sign"):
            get_unlearner("interference_aware", {"lr": text})
        try:
            get_unlearner("interference_aware", {"lr": text})
        except ValueError as error:
            written = re.search(r"a sign, (\S+);", str(error))
            assert written is not None
            assert yaml.safe_load(f"lr: {written.group(1)}")["lr"] == value
    with pytest.raises(ValueError, match=r"got '0\.5' \(text, not a number: leave out the "
                                         r"quotes\)$"):
        get_unlearner("interference_aware", {"lr": "0.5"})
    with pytest.raises(ValueError, match=r"got 'fast'$"):
        get_unlearner("interference_aware", {"lr": "fast"})
    for text in ("nan", "inf", "-Infinity"):  # YAML 1.1 writes them .nan, .inf: no advice
        with pytest.raises(ValueError, match=rf"got {text!r}$"):
            get_unlearner("interference_aware", {"lr": text})


# -- a command run in-process, and its record rerun from elsewhere --------------------------------


def test_a_record_keeps_the_folder_its_relative_paths_name_files_from(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Reproducibility review: a command given relative paths (``--checkpoint ../a.pt``) was
    recorded and printed without the folder it ran in, so rerunning it from the record's
    folder failed; a ``--method-config`` file had no SHA-256 in the record; and ``evaluate``'s
    JSON named its checkpoint as given, so the same measurement differed by the folder it ran
    in and could not find its checkpoint from another. A caller's float64 default dtype (a
    notebook) built a float64 model beside float32 data: a traceback instead of a run."""
    import hashlib

    (tmp_path / "sub").mkdir()
    shutil.copy(trained, tmp_path / "a.pt")
    (tmp_path / "sub" / "m.json").write_text('{"steps": 2}')
    monkeypatch.chdir(tmp_path / "sub")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert cli.main(["unlearn", "--checkpoint", "../a.pt", "--forget-ids", ids(1, 2),
                         "--method-config", "m.json", "--output", "../u.pt", "--quiet"]) == 0
        assert torch.get_default_dtype() == torch.float64  # the caller's, put back
        assert cli.main(["evaluate", "--checkpoint", "../u.pt", "--quiet",
                         "--output", "e.json"]) == 0
    finally:
        torch.set_default_dtype(previous)
    record = json.loads((tmp_path / "u.pt.record.json").read_text())
    invocation = record["invocation"]
    assert invocation["cwd"] == str((tmp_path / "sub").resolve())
    assert invocation["method_config"] == {
        "file": str((tmp_path / "sub" / "m.json").resolve()),
        "sha256": hashlib.sha256(b'{"steps": 2}').hexdigest()}
    assert json.loads((tmp_path / "sub" / "e.json").read_text())["checkpoint"] == str(
        (tmp_path / "u.pt").resolve())
    # The recorded command, run again in the recorded folder, gives the same weights.
    monkeypatch.chdir(invocation["cwd"])
    again = [*invocation["argv"][:-3], "--output", "../again.pt", "--quiet"]
    assert invocation["argv"][-3:-1] == ["--output", "../u.pt"]
    assert cli.main(again) == 0
    first = torch.load(tmp_path / "u.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "again.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
