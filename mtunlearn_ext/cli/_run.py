"""One command line, from the arguments to the exit code (:func:`mtunlearn_ext.cli.main` runs it
under its interrupt handling): the checks of what argparse lets through (a command's option
before the command, an empty path), the ``--config`` file, ``--threads`` and ``--import``, the
invocation a record keeps, the command itself, and the exit code of each kind of error."""

from __future__ import annotations

import argparse
import os
import site
import sys
import sysconfig
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtunlearn_ext._errors import NonFiniteError, UserInputError
from mtunlearn_ext.cli._config import _apply_config, _load_config, _refuse_config_nulls
from mtunlearn_ext.cli._console import _say
from mtunlearn_ext.cli._parser import _build_parser, _Parser, _subparser


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (captured)
        pass
    finally:
        # stdout holds its own copy after dup2: kept open, this one leaked a descriptor at
        # every closed pipe of a process that runs main() again (tests, notebooks, services).
        os.close(devnull)


def _refuse_command_as_import(parser: _Parser, argv: list[str]) -> None:
    """`mtunlearn --import benchmark --dry-run` (the module left out) took the command as the
    module and argparse said only "the following arguments are required: command"."""

    commands = set(parser.commands)
    for i, token in enumerate(argv):
        if token in commands:
            return  # the command comes first: --import after it belongs to the command
        if token == "--import" and i + 1 < len(argv) and argv[i + 1] in commands and not any(
                later in commands for later in argv[i + 2:]):
            raise UserInputError("--import", "a module name", argv[i + 1],
                                 f"no command follows, so `{argv[i + 1]}` was read as the "
                                 f"module to import: write `mtunlearn --import MODULE "
                                 f"{argv[i + 1]} ...`")


def _refuse_command_options_first(parser: _Parser, argv: list[str]) -> None:
    """`mtunlearn --config c.yaml train` (a command's option before the command): argparse
    skipped the unknown option and took its value for the command ("invalid choice:
    'c.yaml'"), which named neither the option nor the fix."""

    commands = parser.commands
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in commands or token in ("-h", "--help", "--"):
            return
        if token == "--import":
            i += 2
            continue
        if token.startswith("-") and not token.startswith("--import="):
            option = token.split("=", 1)[0]
            command = next((later for later in argv[i + 1:] if later in commands), None)
            if command is not None and any(
                    option in action.option_strings
                    for action in commands[command]._actions):
                raise UserInputError(option, f"after the command (`mtunlearn {command} "
                                     f"{option} ...`)", token,
                                     f"it is an option of `{command}`; only --import may "
                                     "come before the command")
            return  # argparse names an unknown option itself
        i += 1


def _invocation(argv: Sequence[str], plugins: list[dict[str, Any]], config: str | None,
                method_config: str | None = None) -> dict[str, Any]:
    """How the command was called, for its record: the arguments as given and the folder they
    were given in (relative paths in them name files from there), the ``--import`` modules
    with their files' SHA-256 (a plugin method's code is named by nothing else), the
    ``--config`` file's, and the ``--method-config`` file's when it names one."""
    from mtunlearn_ext._io import sha256_of_file
    from mtunlearn_ext.workflow import is_existing_file

    def named_file(given: str) -> dict[str, Any]:
        # Its folder resolved, the name not followed: a linked config's relative paths are
        # read from the link's folder, so the record names the link (its hash is of the file
        # behind it).
        given_path = Path(given).expanduser()
        path = given_path.absolute().parent.resolve() / given_path.name
        return {"file": str(path), "sha256": sha256_of_file(path) if path.is_file() else None}

    settings_file = (named_file(method_config)
                     if method_config and is_existing_file(method_config) else None)
    return {"argv": list(argv), "cwd": str(Path.cwd()), "imports": plugins,
            "config": named_file(config) if config else None,
            "method_config": settings_file}


def _main(argv: Sequence[str] | None) -> int:
    from mtunlearn_ext.records import RecordError
    from mtunlearn_ext.training import CheckpointError
    from mtunlearn_ext.workflow import KeptMetricsError, import_plugins

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    # --threads sets torch's process-wide count; a caller of main() in its own process (a
    # notebook, a test, a pipeline step) gets its count back.
    callers_threads = torch.get_num_threads()
    # A command's models and data are float32 whatever the caller's process set as torch's
    # default (a float64 default built a float64 model beside float32 data: a traceback).
    callers_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        _refuse_command_as_import(parser, argv)
        _refuse_command_options_first(parser, argv)
        pre, _ = parser.parse_known_args(argv)
        if getattr(pre, "config", None):
            _apply_config(_subparser(parser, pre.command), _load_config(pre.config),
                          Path(pre.config).parent)
        args = parser.parse_args(argv)
        missing = [(f"--{d.replace('_', '-')}", getattr(args, d, None)) for d in args._required
                   if getattr(args, d, None) in (None, "")]
        if missing:  # `--checkpoint ""` came as "", not as nothing: the message says which
            raise UserInputError(missing[0][0], "a value (flag or config key)", missing[0][1],
                                 f"`mtunlearn {args.command}` requires it")
        _refuse_config_nulls(args)
        _refuse_empty_paths(args)
        _threads(args)
        plugins = import_plugins([*(args.imports_first or []), *(args.imports or [])])
        _PLUGIN_FILES.update(p["file"] for p in plugins if p["file"])
        args.invocation = _invocation(argv, plugins, getattr(args, "config", None),
                                      getattr(args, "method_config", None))
        return int(args.func(args))
    except (UserInputError, CheckpointError, RecordError, FileExistsError) as error:
        _say(f"mtunlearn: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        _say(f"mtunlearn: error: {error}", file=sys.stderr)
        return 3
    except KeptMetricsError as error:
        _say(f"mtunlearn: error: {error}", file=sys.stderr)
        return 4
    except BrokenPipeError:
        # The reader of stdout went away (`mtunlearn evaluate ... | head`): no traceback, and
        # stdout pointed at /dev/null so that the interpreter's final flush does not raise
        # again. Outputs not yet committed were removed by their transaction.
        _silence_stdout()
        _say("mtunlearn: stdout was closed by its reader", file=sys.stderr)
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    finally:
        if torch.get_num_threads() != callers_threads:
            torch.set_num_threads(callers_threads)
        torch.set_default_dtype(callers_dtype)


#: Options that name a file or folder: an empty value named none, and was taken as not given
#: (`--output ""` wrote to the default name).
_PATH_OPTIONS = ("output", "output_dir", "record", "checkpoint", "data_root", "results",
                 "config")


def _refuse_empty_paths(args: argparse.Namespace) -> None:

    for name in _PATH_OPTIONS:
        if getattr(args, name, None) == "":
            raise UserInputError(f"--{name.replace('_', '-')}", "a path (or the option left "
                                 "out, for its default)", "")


#: The source files ``--import`` loaded in this process (:func:`_outside_code_frame`).
_PLUGIN_FILES: set[str] = set()


def _outside_code_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The frame of ``error``'s traceback to blame on a module given to ``--import`` (a
    plugin's method or benchmark), or ``None`` (the library's: "internal error"). The
    innermost frame that is neither Python's nor an installed package's decides: a plugin
    file's (an exception of that code's, which "please report" sent to the library), or
    else the library's (one raised beneath a plugin's call into it stays the library's).
    Frames of ``<string>`` and the like, which name no file, are passed over."""
    library = Path(__file__).resolve().parents[1]
    installed = {Path(p).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if (p := sysconfig.get_paths().get(key))}
    installed.update(Path(p).resolve() for p in [*site.getsitepackages(),
                                                  site.getusersitepackages()])
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename)
        if not path.is_file():
            continue
        path = path.resolve()
        if path.is_relative_to(library):  # (installed or not)
            return None
        if any(path.is_relative_to(root) for root in installed):
            continue
        return frame if str(path) in _PLUGIN_FILES else None
    return None
