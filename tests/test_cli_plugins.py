"""``mtunlearn --import MODULE``: methods registered in the user's own module are usable from
the command line (the registry only knew the built-in names, and the console script does not
search the current folder), and an unknown ``--method`` says how to add one."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from cli_helpers import ROOT, _err
from test_cli import ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _parser as cli_parser
from mtunlearn_ext.unlearning.registry import UNLEARNERS

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from mtunlearn_ext.unlearning.loop import GradientUnlearner, StepConfig
    from mtunlearn_ext.unlearning.registry import register_unlearner


    @dataclass
    class RetainOnlyConfig(StepConfig):
        steps: int = 2
        forget_weight: float = 0.0


    @register_unlearner
    class RetainOnly(GradientUnlearner):
        name = "{name}"
        config_class = RetainOnlyConfig
        uses_forget = False

        def compute_update(self, ctx, forget_batch, retain_batch):
            return self.weighted_update(ctx, None, retain_batch)
    ''')


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread, for this module only)."""


@pytest.mark.parametrize("place", ["after the command", "before the command"])
@pytest.mark.parametrize("how", ["module in the current folder", "path of a .py file"])
def test_a_method_registered_in_an_imported_module_runs(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str], registries_restored: None, how: str,
        place: str) -> None:
    """`--import` after the command, and before it (`mtunlearn --import X unlearn ...`, as the
    docs once wrote it: "invalid choice" then)."""
    name = ("retain_only_" + ("module" if how.startswith("module") else "file")
            + ("_first" if place.startswith("before") else ""))
    module = f"plugin_{name}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(name=name))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "u.pt"
    base = ["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2), "--method", name,
            "--output", str(out), "--quiet"]
    assert cli.main(base) == 2  # not registered without the import
    assert "--import MODULE" in _err(capsys)
    target = module if how.startswith("module") else str(tmp_path / f"{module}.py")
    argv = (["--import", target, *base] if place.startswith("before")
            else [*base, "--import", target])
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert out.is_file() and name in UNLEARNERS
    # The record names the plugin's code (reproducibility review: nothing named the module,
    # so a plugin method's record could not be rerun, nor a changed plugin be told).
    import hashlib
    import json

    from mtunlearn_ext.report import write_report

    record = json.loads(Path(str(out) + ".record.json").read_text())
    source = tmp_path / f"{module}.py"
    plugin = {"module": target, "file": str(source.resolve()),
              "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert record["invocation"] == {"argv": argv, "cwd": str(Path.cwd()), "imports": [plugin],
                                    "config": None, "method_config": None}
    write_report(record, tmp_path / "rep")
    assert (f"`--import {target}`: `{source.resolve()}`, SHA-256 `{plugin['sha256']}`"
            in (tmp_path / "rep" / "report.md").read_text())


def test_an_import_that_fails_is_bad_input_naming_the_module(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('plugin failed')\n")
    for target, reason in [("no_such_plugin_module", "ModuleNotFoundError"),
                           (str(tmp_path / "missing.py"), "FileNotFoundError"),
                           (str(tmp_path / "broken_plugin.py"), "RuntimeError: plugin failed")]:
        assert cli.main(["benchmark", "--dry-run", "--import", target]) == 2
        err = _err(capsys)
        assert err.startswith("mtunlearn: error: --import: expected an importable module name "
                              "or .py file") and reason in err, err


BENCHMARK_PLUGIN = textwrap.dedent('''
    import torch

    from mtunlearn_ext.data import Benchmark, MultiTaskDataset, TaskSpec, register_benchmark

    TASKS = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression")]


    @register_benchmark("{name}")
    def toy(seed, size, data_root):
        gen = torch.Generator().manual_seed(seed)

        def split(n, first_id):
            x = torch.randn(n, 6, generator=gen)
            targets = {{"kind": (x[:, 0] > 0).long() + (x[:, 1] > 1).long(),
                       "size": x[:, 2:3] * 2.0}}
            return MultiTaskDataset(x, targets, TASKS, ids=torch.arange(first_id, first_id + n))

        return Benchmark("{name}", split(80, 0), split(40, 1000), TASKS,
                         info={{"train_config": {{"epochs": 2, "batch_size": 16}}}})
    ''')


def test_a_benchmark_registered_in_an_imported_module_trains_unlearns_and_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """load_benchmark knew only the built-in names; a registered benchmark is loaded by name
    by every command that --imports its module (a checkpoint records the name)."""
    from mtunlearn_ext.data import registry

    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    (tmp_path / "toy_plugin.py").write_text(BENCHMARK_PLUGIN.format(name="toy_cli"))
    monkeypatch.chdir(tmp_path)
    plugin = ["--import", "toy_plugin", "--quiet", "--threads", "1"]
    assert cli.main(["train", "--benchmark", "toy_cli", "--output", "orig.pt"]) == 2
    assert "register_benchmark" in _err(capsys)
    assert cli.main(["train", "--benchmark", "toy_cli", "--output", "orig.pt", *plugin]) == 0
    assert cli.main(["unlearn", "--checkpoint", "orig.pt", "--forget-ids", "3,7",
                     "--method-config", '{"steps": 2}', "--output", "u.pt", *plugin]) == 0
    capsys.readouterr()
    assert cli.main(["verify", "--record", "u.pt.record.json", *plugin]) == 0, \
        capsys.readouterr().err


def test_register_benchmark_refuses_built_in_and_taken_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mtunlearn_ext.data import load_benchmark, register_benchmark, registry

    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    with pytest.raises(ValueError, match="'digits' is a built-in benchmark"):
        register_benchmark("digits", lambda **kwargs: None)  # type: ignore[arg-type,return-value]
    def returns_none(**kwargs: object) -> None:
        return None

    def returns_one(**kwargs: object) -> int:
        return 1

    register_benchmark("mine", returns_none)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the name 'mine' is taken by .*returns_none"):
        register_benchmark("mine", returns_one)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must return a Benchmark named 'mine', got NoneType"):
        load_benchmark("mine")
    # Callable objects and partials are one definition only as one object (their module and
    # name say nothing of what they hold): two of them under one name are refused.
    import functools

    register_benchmark("mine_partial", functools.partial(returns_none, flavour=1))
    with pytest.raises(ValueError, match="the name 'mine_partial' is taken by functools.partial"):
        register_benchmark("mine_partial", functools.partial(returns_none, flavour=2))


def test_import_before_the_command_without_its_module_names_the_mix_up(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Review: `mtunlearn --import benchmark --dry-run` read the command as the module, and
    argparse said only "the following arguments are required: command"."""
    assert cli.main(["--import", "benchmark", "--dry-run"]) == 2
    assert _err(capsys) == (
        "mtunlearn: error: --import: expected a module name, got 'benchmark'; no command "
        "follows, so `benchmark` was read as the module to import: write `mtunlearn --import "
        "MODULE benchmark ...`")


@pytest.mark.parametrize("argv, option, command", [
    (["--config", "c.yaml", "train"], "--config", "train"),
    (["--seed=3", "unlearn", "--checkpoint", "x.pt"], "--seed", "unlearn"),
    (["--import", "json", "--output", "o.pt", "train"], "--output", "train")])
def test_a_commands_option_before_the_command_names_the_option(
        capsys: pytest.CaptureFixture[str], argv: list[str], option: str, command: str) -> None:
    """Review: `mtunlearn --config c.yaml train` said "invalid choice: 'c.yaml'" (argparse
    skipped the option it did not know and took its value for the command)."""
    assert cli.main(argv) == 2
    err = _err(capsys)
    assert err.startswith(f"mtunlearn: error: {option}: expected after the command "
                          f"(`mtunlearn {command} {option} ...`)"), err
    assert "only --import may come before the command" in err


def test_an_option_no_command_has_is_left_to_argparse(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    with pytest.raises(SystemExit) as exit_:  # argparse's own error
        cli.main(["--bogus", "train"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_import_and_a_configs_import_key_say_that_they_run_code() -> None:
    """An --import (and a config's `import` key, which may name a .py file beside a config
    someone else wrote) runs code with the user's rights, by design: the help and the docs say
    so, where neither did."""
    for command in ("train", "unlearn", "evaluate", "verify", "report"):
        sub = cli_parser._subparser(cli_parser._build_parser(), command)
        texts = {a.dest: " ".join((a.help or "").split()) for a in sub._actions}
        assert "runs the module's code with your rights" in texts["imports"], command
        assert "its `import` key runs code" in texts["config"], command
    docs = " ".join((ROOT / "docs" / "cli.md").read_text(encoding="utf-8").split())
    assert "`--import` runs the module's code with your rights, by design" in docs


def test_a_plugins_own_error_is_named_as_its_code_not_the_librarys(
        trained: Path, tmp_path: Path) -> None:  # noqa: F811
    """Extension audit: an exception raised in a plugin's method ended with "mtunlearn:
    internal error (KeyError); ... please report the traceback above", which sent the
    plugin's author to the library. The last line now names the plugin's file and line; a
    failure inside the library still says "internal error" (test_cli_docs)."""
    import subprocess
    import sys

    source = tmp_path / "broken_plugin.py"
    text = PLUGIN.format(name="broken_plugin_method")
    broken = text.replace("return self.weighted_update(ctx, None, retain_batch)",
                          "raise KeyError('a setting this plugin expected')")
    assert broken != text
    source.write_text(broken)
    script = ("import sys; from mtunlearn_ext import cli\n"
              "raise SystemExit(cli.console_main(sys.argv[1:]))\n")
    proc = subprocess.run(
        [sys.executable, "-c", script, "unlearn", "--checkpoint", str(trained), "--forget-ids",
         ids(1, 2), "--method", "broken_plugin_method", "--import", str(source), "--output",
         str(tmp_path / "u.pt"), "--quiet"], capture_output=True, text=True, timeout=300,
        cwd=tmp_path)
    assert proc.returncode == cli.EXIT_INTERNAL_ERROR, proc.stderr
    assert "KeyError: 'a setting this plugin expected'" in proc.stderr
    line = next(n for n, text in enumerate(source.read_text().splitlines(), 1)
                if "raise KeyError" in text)
    assert proc.stderr.splitlines()[-1] == (
        f"mtunlearn: error (KeyError) in {source.resolve()}, line {line}, code outside the "
        "library (a module given to --import?); exit 70: see the traceback above")
    assert not (tmp_path / "u.pt").exists()


def test_only_a_plugins_own_frame_is_blamed_on_it(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Diff review: the innermost frame outside the library was blamed, so a library error
    raised beneath a plugin's call into it lost its "please report". The innermost frame
    that is neither Python's nor an installed package's decides: a file ``--import`` loaded,
    or the library's (then nothing is blamed on the plugin); a file no ``--import`` loaded is
    not blamed either."""
    import sys

    from mtunlearn_ext.cli import _run
    from mtunlearn_ext.workflow import import_plugins

    source = tmp_path / "calling_plugin.py"
    source.write_text("from mtunlearn_ext.surgery import UPGradWeighting\n\n\n"
                      "def own():\n    raise KeyError('its own')\n\n\n"
                      "def into_the_library():\n    return UPGradWeighting()('not a gram')\n")
    monkeypatch.delitem(sys.modules, "calling_plugin", raising=False)
    (loaded,) = import_plugins([str(source)])
    module = sys.modules["calling_plugin"]
    monkeypatch.setitem(sys.modules, "calling_plugin", module)
    monkeypatch.setattr(_run, "_PLUGIN_FILES", set())
    errors = {}
    for name in ("own", "into_the_library"):
        try:
            getattr(module, name)()
        except Exception as error:  # noqa: BLE001
            errors[name] = error
    assert _run._outside_code_frame(errors["own"]) is None  # not loaded by --import here
    _run._PLUGIN_FILES.add(loaded["file"])
    frame = _run._outside_code_frame(errors["own"])
    assert frame is not None and frame.filename == str(source) and frame.lineno == 5
    assert _run._outside_code_frame(errors["into_the_library"]) is None
