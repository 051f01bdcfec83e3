"""docs/cli.md against the code it describes: the command table names every option that a
command's ``--help`` lists, and the NaN/Inf paragraph says which ops raise for a non-finite input
and which let it through, as they do."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import ROOT

from mtunlearn_ext import cli, ops
from mtunlearn_ext.cli import _parser as cli_parser
from mtunlearn_ext.cli import _run as cli_run

DOC = (ROOT / "docs" / "cli.md").read_text()
#: The options of every command, documented once in the introduction, not in each row.
COMMON = {"--config", "--threads", "--quiet", "--import"}


def _command_rows() -> dict[str, str]:
    """command name -> its row of the command table."""
    table = DOC.split("| command | does |", 1)[1].split("\n\n", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)[ `].*$", table, re.M)}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_command_parsers_are_kept_where_they_are_made() -> None:
    """CLI review: `_subparsers` searched argparse's actions for the commands and ended in a
    `KeyError("subparsers")` that no call could reach (main's parser always has them): the
    parser now keeps its commands, the same ones argparse lists, each found by name."""
    parser = cli_parser._build_parser()
    listed = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert parser.commands is listed.choices
    assert set(parser.commands) == {"train", "unlearn", "evaluate", "verify", "benchmark",
                                    "report"}
    assert cli_parser._subparser(parser, "verify").prog == "mtunlearn verify"


def test_the_help_says_the_record_default_and_what_verify_checks() -> None:
    """Help review: `--record` said "beside the output checkpoint" (it is <output>.record.json
    with --output, <input>.<method>.record.json without), and verify's description named the
    hash and the metrics only, also for a save_unlearned record, which is never measured."""
    helps = {name: " ".join(parser.format_help().split())
             for name, parser in _subparsers().items()}
    assert ("--record JSON record path (default: <output>.record.json with --output, else "
            "<input>.<method>.record.json") in helps["unlearn"]
    assert "the forgotten ids, a draw of the ids, whether the weights changed" in helps["verify"]
    assert "save_unlearned gets the file and hash checks only" in helps["verify"]


def test_the_command_table_names_every_option_of_help() -> None:
    rows = _command_rows()
    missing = {}
    for name, parser in _subparsers().items():
        options = [flag for action in parser._actions for flag in action.option_strings
                   if flag.startswith("--") and flag != "--help"]
        assert COMMON <= set(options), name
        row = rows[name]
        # `--output` must not count as named by `--output-dir`.
        absent = [o for o in options
                  if o not in COMMON and not re.search(re.escape(o) + r"(?![\w-])", row)]
        if absent:
            missing[name] = absent
    assert missing == {}, f"docs/cli.md's command table omits {missing}"
    intro = DOC.split("| command | does |", 1)[0] + DOC.split("Every command also takes", 1)[1]
    assert all(f"`{o}" in intro for o in COMMON)


def _nan_paragraph() -> str:
    section = DOC.split("### NaN/Inf policy", 1)[1].split("\n### ", 1)[0]
    text = " ".join(section.split())
    assert "At the op level a NaN/Inf input raises" not in text  # the blanket claim, untrue
    return text


def _nan(*shape: int) -> torch.Tensor:
    t = torch.randn(*shape)
    t.view(-1)[0] = math.nan
    return t


#: The ops docs/cli.md says raise FloatingPointError naming the argument, with the argument.
RAISING = {
    "gram": (lambda: ops.gram(_nan(3, 8)), "x"),
    "gram_list": (lambda: ops.gram_list([_nan(3, 8)]), "xs[0]"),
    "gram_list_stacked": (lambda: ops.gram_list_stacked([torch.randn(2, 8)], [_nan(3, 8)]),
                          "ys[0]"),
    "inner": (lambda: ops.inner(torch.randn(2, 8), _nan(3, 8)), "b"),
    "inner_list": (lambda: ops.inner_list([_nan(2, 8)], [torch.randn(3, 8)]), "as_[0]"),
    "project_out": (lambda: ops.project_out(torch.randn(2, 8), _nan(3, 8)), "basis"),
    "project_nonconflicting": (lambda: ops.project_nonconflicting(_nan(2, 8),
                                                                  torch.randn(3, 8)), "g"),
    "pcgrad": (lambda: ops.pcgrad(_nan(3, 8)), "x"),
    "combine": (lambda: ops.combine(_nan(2, 3), torch.randn(3, 8)), "coeffs"),
}


def _combine_list_nan_xs() -> torch.Tensor:
    out = torch.zeros(2, 8)
    ops.combine_list(torch.randn(2, 3), [_nan(3, 8)], [out])
    return out


#: The ops it says let NaN/Inf through (no error, non-finite output).
PROPAGATING = {
    "combine": lambda: ops.combine(torch.randn(2, 3), _nan(3, 8)),  # `x` is not scanned
    "combine_list": _combine_list_nan_xs,
    "ridge_solve": lambda: ops.ridge_solve(_nan(3, 3), torch.randn(3, 2)),
    "nonconflicting_dual": lambda: ops.nonconflicting_dual(_nan(3, 3), torch.randn(2, 3)),
    "pcgrad_weights": lambda: ops.pcgrad_weights(_nan(3, 3)),
}


@pytest.mark.parametrize("name", sorted(RAISING))
def test_the_ops_docs_say_raise_do_raise_naming_the_argument(name: str) -> None:
    text = _nan_paragraph()
    says_raise = text.split("raise `FloatingPointError`", 1)[0].rsplit("check_finite=True", 1)[1]
    assert f"`{name}`" in says_raise or (name == "combine" and "check `coeffs` only" in text)
    call, argument = RAISING[name]
    with pytest.raises(FloatingPointError, match=f"`{re.escape(argument)}` contains NaN or Inf"):
        call()


@pytest.mark.parametrize("name", sorted(PROPAGATING))
def test_the_ops_docs_say_propagate_do_propagate(name: str) -> None:
    text = _nan_paragraph()
    says_propagate = text.split("raise `FloatingPointError`", 1)[1]
    assert f"`{name}`" in says_propagate, name
    assert not bool(torch.isfinite(PROPAGATING[name]()).all())


def test_the_record_format_names_every_field_of_the_invocation() -> None:
    """Docs audit: the record format listed `invocation`'s `argv`, `imports` and `config`, not
    `cwd` (the folder the relative paths are read from) or `method_config` (the settings
    file's SHA-256), which the records hold since f3205be."""
    written = cli_run._invocation(["unlearn", "--checkpoint", "orig.pt"], [], None)
    text = " ".join(DOC.split("### The unlearning record", 1)[1].split())
    described = text.split("`invocation` (", 1)[1].split("), `benchmark`", 1)[0]
    assert [key for key in written if f"`{key}`" not in described] == []


def _documented_exit_codes() -> dict[int, str]:
    table = DOC.split("| code | meaning |", 1)[1].split("\n\n", 1)[0]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (.*) \|$", table, re.M)}


def test_every_commands_help_ends_with_the_exit_codes_docs_table() -> None:
    """CLI contract review: the codes were a paragraph of docs/cli.md; `verify --help` named
    only its 1, `unlearn --help` only 3 and the others none, so a cron job's author reading one
    command's help did not learn 2, 130 or 141. Every command's help (and mtunlearn's own) now
    ends with the same list, the one docs/cli.md tables."""
    documented = _documented_exit_codes()
    assert sorted(documented) == [code for code, _ in cli.EXIT_CODES]
    parsers = {"mtunlearn": cli.build_parser(), **_subparsers()}
    for name, parser in parsers.items():
        tail = " ".join(parser.format_help().split()).rsplit("exit codes: ", 1)[-1]
        assert tail == "; ".join(f"{code} {text}" for code, text in cli.EXIT_CODES), name


def test_an_internal_error_exits_70_not_verifys_mismatch_code() -> None:
    """CLI contract review: an exception no check foresaw (a bug, a MemoryError) left the
    command with Python's exit 1, the code of `verify`'s mismatch, so a CI step read a crash
    as a failed verification. The command (console_main; main() still raises, for callers
    that catch it) prints the traceback, one line, and exits 70. In a process of its own, as
    console_main leaves SIGINT/SIGTERM ignored for the interpreter's shutdown."""
    script = ("import sys; from mtunlearn_ext import cli\n"
              "def crash(argv=None):\n    raise RuntimeError('an unforeseen failure')\n"
              "cli.main = crash\n"
              "raise SystemExit(cli.console_main(['verify', '--record', 'r.json']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == cli.EXIT_INTERNAL_ERROR == 70, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" in proc.stderr and "RuntimeError: an unforeseen failure" in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("mtunlearn: internal error (RuntimeError); exit 70"), last
    assert "an internal error" in _documented_exit_codes()[70]


def _help_examples(parser: argparse.ArgumentParser) -> list[str]:
    text = parser.format_help().split("\nexamples:\n", 1)[1].split("\nexit codes: ", 1)[0]
    return [line.strip() for line in text.splitlines()]


def test_the_examples_of_every_help_run_in_order(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """CLI contract review: no command's --help showed an example. Each shows its own lines now,
    whole (argparse would run them into one paragraph), and mtunlearn's all of them: one
    request from training to its report, which runs as written in an empty folder."""
    parsers = _subparsers()
    lines = [line for name in cli.EXAMPLES for line in _help_examples(parsers[name])]
    assert _help_examples(cli.build_parser()) == lines
    assert all(line.startswith("mtunlearn ") for line in lines)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert cli.main(shlex.split(line)[1:]) == 0, (line, capsys.readouterr().err)
        out = capsys.readouterr().out
        if line.endswith("--json") or line == "mtunlearn evaluate --checkpoint orig.pt":
            json.loads(out)  # stdout is the JSON alone
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "report" / "report.md").is_file()


def test_an_option_reads_the_same_and_says_its_default_in_every_command() -> None:
    """CLI contract review: `train --data-root DATA_ROOT` was `--data-root DIR` in the other
    commands (`--forget-fraction FORGET_FRACTION`, `--eval-batch-size EVAL_BATCH_SIZE`:
    argparse's upper-cased names), and the help of `--epochs`, `--train`, `--method-config`
    and `--target-tasks` said nothing of what leaving them out does (the recipe's epochs and
    recipe, the method's settings, every task: a full request)."""
    metavars: dict[str, set[str]] = {}
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:  # `extra`, the flags
                continue
            flag = action.option_strings[-1]
            metavars.setdefault(flag, set()).add(str(action.metavar))
            # None: argparse's upper-cased dest, which read `--eval-batch-size EVAL_BATCH_SIZE`.
            assert action.metavar is not None or "_" not in action.dest, (name, flag)
            if (flag, name) in (("--epochs", "train"), ("--train", "train"),
                                ("--method-config", "unlearn"), ("--target-tasks", "unlearn")):
                assert "default: " in (action.help or ""), (name, flag)
    # `--output` names what the command writes: a checkpoint (train, unlearn), JSON (evaluate).
    assert {flag: names for flag, names in metavars.items() if len(names) > 1} == {
        "--output": {"CKPT", "JSON"}}


def test_the_ids_one_liner_prints_the_checkpoints_training_ids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docs audit (commands run as written): the `python -c` line that lists a checkpoint's
    instance ids was never run. It is run here, from the checkpoint's folder, as the shell
    would (`python` being this interpreter), on a `train` output named as the docs name it."""
    from cli_helpers import _train

    from mtunlearn_ext.workflow import load_model

    command = DOC.split("to list them all for a\ncheckpoint", 1)[1]
    command = command.split("```bash\n", 1)[1].split("\n```", 1)[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"] and "load_model('orig.pt')" in argv[2]
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path / "orig.pt") == 0
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = load_model(str(tmp_path / "orig.pt")).benchmark.train.ids.tolist()
    assert done.stdout.strip() == ",".join(map(str, ids))
    assert ids[:3] == [3, 7, 13]  # not 0..n-1, as the paragraph above the command says
