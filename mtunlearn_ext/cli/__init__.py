"""The ``mtunlearn`` command (also ``python -m mtunlearn_ext.cli``).

Subcommands: ``train``, ``unlearn``, ``evaluate``, ``verify``, ``benchmark``, ``report``; each has
``--help``. Every option can also come from ``--config file.yaml|file.toml`` whose keys are the
option names (``forget_ids`` or ``forget-ids``; ``import``, or ``imports``, a list or one string,
for the repeatable ``--import``, which the command line adds to); options on the command line
override it, and a null value (YAML ``null``) leaves the option at its default (``forget_ids:
null`` is refused: only an absent key draws a random share to forget). A relative path in the
file names a file from the file's folder.

Exit codes: 0 success; 1 ``verify`` found a mismatch; 2 bad input (one line on stderr naming the
argument, what was expected and what was received; nothing written); 3 NaN/Inf during a run
(the step is reported; nothing written); 130 interrupted by Ctrl-C or SIGTERM (a
``mtunlearn: interrupted`` line on stderr; nothing written, unless the interrupt came after the
outputs were complete, which then stay and are named); 141 stdout closed by its reader (files
already committed stay); 70 an internal error (a bug: Python's traceback, then one line), so that
a crash is never read as ``verify``'s 1. ``benchmark`` exits with its benchmark's code.
:data:`EXIT_CODES` holds them for ``--help``; docs/cli.md tables them.

The package: :func:`main` and :func:`console_main` here; ``_run`` runs one command line
(``--config`` from ``_config``), ``_parser`` builds the parser, and each command is a module of
its own (``_train``, ``_unlearn``, ``_evaluate``, ``_verify``, ``_benchmark``, ``_report``),
which imports the shared ``_checks``, ``_console`` and ``_outputs``, never another command.
"""

from __future__ import annotations

import signal
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from mtunlearn_ext.cli import _parser
from mtunlearn_ext.cli._console import _say, _show_warning
from mtunlearn_ext.cli._parser import EXIT_CODES, EXIT_INTERNAL_ERROR, build_parser
from mtunlearn_ext.cli._run import _main, _outside_code_frame

__all__ = ["EXIT_CODES", "build_parser", "console_main", "main"]

#: The examples of every command's ``--help``, by command (made in :mod:`._parser`).
EXAMPLES = _parser.EXAMPLES


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: exit 130 with the "interrupted" line (documented)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turned into an exception so that the output transaction deletes what it created.
    raise _Terminated(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mtunlearn`` command; returns the exit code (see the module docstring)."""
    # SIGTERM is an interrupt from the start (the imports below take about a second), and so
    # is a Ctrl-C during them: one line, exit 130, as for an interrupt during the work.
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: no handler, the atomic writes still hold
        pass
    loaded = sys.modules.get("mtunlearn_ext.workflow")
    if loaded is not None:  # an earlier command in this process (tests, notebooks)
        loaded.COMMITTED_OUTPUTS.clear()
    try:
        return _main(argv)
    except KeyboardInterrupt as interrupt:
        # Not imported here: the interrupt may have cut that very import short.
        workflow = sys.modules.get("mtunlearn_ext.workflow")
        committed: list[Path] = list(getattr(workflow, "COMMITTED_OUTPUTS", []))
        how = " by SIGTERM" if isinstance(interrupt, _Terminated) else ""
        if committed:
            # The outputs were complete before the interrupt (it came while the summary was
            # printed): they stay, and the message says so.
            written = ", ".join(str(p) for p in committed)
            _say(f"mtunlearn: interrupted{how} after its outputs were written in full "
                 f"({written}); inputs are unchanged", file=sys.stderr)
        else:
            _say(f"mtunlearn: interrupted{how}; no output was written, inputs are unchanged",
                 file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def console_main(argv: Sequence[str] | None = None) -> int:
    """The ``mtunlearn`` command itself (and ``python -m mtunlearn_ext.cli``): :func:`main`,
    then SIGINT and SIGTERM ignored for the interpreter's shutdown, which takes torch about a
    second and a half. The exit code is final once ``main`` returns, its outputs complete; a
    signal in that time ended the process with exit 130 or 143 and nothing said, or a
    traceback from a clean-up with exit 0, and a pipeline retrying on 130 would have run the
    request again. (:func:`main` itself gives the caller's handlers back: a notebook or test
    that calls it keeps its Ctrl-C.) The library's warnings print as the command's own lines,
    ``mtunlearn: warning: ...``, not in Python's format with a source line of the command's
    entry point (where :func:`~mtunlearn_ext._warnings.warn_at_caller` points from here)."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = main(argv)
        except Exception as error:  # noqa: BLE001  (what no check of ours foresaw)
            traceback.print_exc()
            outside = _outside_code_frame(error)
            if outside is None:
                _say(f"mtunlearn: internal error ({type(error).__name__}); exit "
                     f"{EXIT_INTERNAL_ERROR}, not verify's 1: please report the traceback above",
                     file=sys.stderr)
            else:  # (extension audit: a plugin's own bug was reported as the library's)
                _say(f"mtunlearn: error ({type(error).__name__}) in {outside.filename}, line "
                     f"{outside.lineno}, code outside the library (a module given to --import?); "
                     f"exit {EXIT_INTERNAL_ERROR}: see the traceback above", file=sys.stderr)
            code = EXIT_INTERNAL_ERROR
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread: nothing to ignore from here
            pass
    return code
