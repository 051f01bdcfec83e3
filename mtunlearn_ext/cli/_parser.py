"""The ``mtunlearn`` argument parser: the texts every ``--help`` shows (the exit codes, the
examples, the output and NaN/Inf policies), the argparse classes (the help formatter, the parser
with its one-line error, the option given once), the option groups several commands share, and
:func:`build_parser`, which wires each command to its function in the command's own module."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext.cli._benchmark import _cmd_benchmark
from mtunlearn_ext.cli._evaluate import _cmd_evaluate
from mtunlearn_ext.cli._report import _cmd_report
from mtunlearn_ext.cli._train import _DATA_ROOT_BENCHMARKS, _cmd_train
from mtunlearn_ext.cli._unlearn import _cmd_unlearn
from mtunlearn_ext.cli._verify import _cmd_verify


#: The exit codes, the same for the same outcome in every command: shown at the end of every
#: command's --help, tabled in docs/cli.md (tests/test_cli_docs.py holds the three together).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "verify found a mismatch between the record and the files (no other command exits 1, "
        "except benchmark, which exits with its benchmark's code)"),
    (2, "bad input or an output that cannot be written: one line on stderr naming the "
        "argument, nothing written"),
    (3, "NaN/Inf during a run: the step is reported, nothing written"),
    (4, "unlearn --require-retained: a retain or test metric worsened past "
        "--retained-tolerance; the metrics are named on stderr, nothing written"),
    (70, "an internal error (a bug): Python's traceback on stderr, then one line"),
    (130, "interrupted by Ctrl-C or SIGTERM: nothing written, unless the outputs were already "
          "complete (the line on stderr says which)"),
    (141, "stdout closed by its reader (`... | head`)"),
)
#: The code of an unexpected exception: sysexits.h's EX_SOFTWARE. Python's own 1 for it was
#: verify's "mismatch", so a crash in a CI step read as a failed verification.
EXIT_INTERNAL_ERROR = 70
_EXIT_CODES_HELP = "exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES)
#: One request from training to its report, in one folder: each command's --help shows its own
#: lines, mtunlearn's all of them (tests/test_cli_docs.py runs them, in this order).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "train": ("mtunlearn train --benchmark digits --size tiny --output orig.pt",),
    "unlearn": ("mtunlearn unlearn --checkpoint orig.pt --forget-ids 3,7",),
    "evaluate": ("mtunlearn evaluate --checkpoint orig.interference_aware.pt --forget-ids 3,7 "
                 "--output metrics.json",
                 "mtunlearn evaluate --checkpoint orig.pt"),
    "verify": ("mtunlearn verify --record orig.interference_aware.record.json",
               "mtunlearn verify --record orig.interference_aware.record.json --json"),
    "report": ("mtunlearn report --results orig.interference_aware.record.json "
               "--output-dir report",),
    "benchmark": ("mtunlearn benchmark --dry-run -- --repeats 3",),
}

#: ``unlearn --retained-tolerance``'s default: :data:`mtunlearn_ext.metrics.DEFAULT_TOLERANCE`
#: (not imported here, which would load the metrics package for `--help`; a test holds the two
#: equal).
_DEFAULT_RETAINED_TOLERANCE = 0.25

_NAN_POLICY = ("NaN/Inf policy: a non-finite loss, gradient or parameter is detected after the "
               "step it appears in; the run stops, the step is reported, nothing is written, "
               "and the exit code is 3.")
_SAFETY = ("Outputs are new files only (existing files and inputs are never overwritten), "
           "written atomically (temporary file, fsync, rename); an interrupted run leaves no "
           "output (unless every output was already written in full: then they stay, and "
           "the interrupt line says so) and the input untouched.")


def _at_least(low: float, kind: type = int) -> Any:
    """An argparse type: ``kind`` (int or float) and ``>= low``, or an error that says so."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} >= {low:g}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help, except that a description's or epilog's line breaks are kept, each line
    filled alone, and an indented line (an example) is kept whole: argparse ran the examples
    together into one paragraph, or broke a long one over two lines, so that neither could be
    copied as it is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if line.startswith(" ")
                         else super(_HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) instead of usage + message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    #: The command parsers by name (``mtunlearn``'s own parser, :func:`_build_parser`), kept
    #: where they are made, so that nothing has to search argparse's actions for them.
    commands: Mapping[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        if "expected one argument" in message:
            # argparse takes a value starting with '-' for an option: "--forget-ids -3" or
            # "--output -x.pt" fail here before any check of ours could name the fix.
            option = message.split(":")[0].removeprefix("argument").strip().split("/")[-1]
            message += f"; a value that starts with '-' is written with '=': {option}=-..."
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _StoreOnce(argparse.Action):
    """Store an option's value, refusing the option a second time on the command line:
    argparse keeps the last value, so `--forget-ids 3,7 --forget-ids 13` forgot id 13 only and
    kept 3 and 7 without a word. Only the request's options and the seed (also `train`'s):
    elsewhere the last value wins, as a shell alias's options are overridden by those typed
    after it. (A config's value is a default, which the command line still overrides.)"""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:

        given: dict[str, str] = namespace.__dict__.setdefault("_given_once", {})
        flag = self.option_strings[-1]
        if self.dest in given:
            # The example joins the values given, and only them: a fixed example ("3,7,13")
            # copied as it stands would name an instance nobody asked to remove.
            item = ("id" if flag.endswith("-ids") else "task" if flag == "--target-tasks"
                    else None)
            hint = (f"give every {item} in one {flag}, e.g. {flag} {given[self.dest]},{values}"
                    if item else "give one value")
            raise UserInputError(flag, f"{flag} once (argparse keeps only the last)",
                                 [given[self.dest], str(values)], hint)
        given[self.dest] = str(values)
        setattr(namespace, self.dest, values)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML (.yaml/.yml) or TOML (.toml) file whose keys are this command's "
                        "options (e.g. forget_ids: [1, 2]); command-line options override it; "
                        "its relative paths are read from its own folder; its `import` key "
                        "runs code, as --import does")
    p.add_argument("--threads", type=_at_least(1), default=None, metavar="N",
                   help="torch intra-op CPU threads (default: torch's choice; 1 is best on a "
                        "busy shared machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE",
                   help="import MODULE first (a module name, found on the Python path or in "
                        "the current folder, or a .py file): methods or forget objectives it "
                        "registers become available; repeatable (config key `import`: a "
                        "list or one name; the command line's add to the config's). Importing "
                        "runs the module's code with your rights: import only code you trust, "
                        "and read a config from others for its `import` key first")


def _moved_data_root_option(p: argparse.ArgumentParser) -> None:
    # For the commands that read a checkpoint: the data is the checkpoint's, found again.
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="where a real data set's (nyuv2 / cityscapes) LibMTL folder is now, "
                        "when it moved since train: accepted only if its data hash to the "
                        "checkpoint's recorded ones; refused for generated benchmarks")


def _request_options(p: argparse.ArgumentParser, required: bool) -> None:
    # required: `unlearn`, which forgets the request; else `evaluate`, which only measures the
    # model on the request's forget / retain split.
    p.add_argument("--forget-ids", action=_StoreOnce, default=None, metavar="IDS",
                   help=("instance ids to forget" if required else "instance ids of the forget "
                         "split to measure (nothing is unlearned)")
                        + ": '1,2,3' (ASCII decimal digits), or a file (or @file) holding them "
                        "(text that is both an id list and a file's name is refused: @3 or ./3 "
                        "for the file, '3,' for the id)"
                        + ("; without it, a random 10%% of the training instances is forgotten "
                           "(--forget-fraction 0.1, drawn with --seed), as a line on stderr "
                           "says" if required else ""))
    p.add_argument("--forget-fraction", action=_StoreOnce, type=float, default=None,
                   metavar="FRACTION",
                   help=("share of training instances to forget" if required else "share of "
                         "training instances in the forget split")
                        + ", drawn with --seed (refused with --forget-ids, which names them)"
                        + ("; default 0.1" if required else ""))
    p.add_argument("--target-tasks", action=_StoreOnce, default=None, metavar="TASKS",
                   help="comma-separated target tasks; a proper subset makes a partial "
                        "request (which needs them; default: every task, a full request)"
                        + ("" if required else "; needs --forget-ids or --forget-fraction"))
    p.add_argument("--request", action=_StoreOnce, default=None, choices=["full", "partial"],
                   help="request type (default: partial iff --target-tasks is a proper "
                        "subset); partial needs --target-tasks")
    p.add_argument("--retain-ids", action=_StoreOnce, default=None, metavar="IDS",
                   help="optional explicit retain instances (disjoint from --forget-ids), as "
                        "for --forget-ids" + ("" if required else "; measures the retain split "
                                              "`unlearn --retain-ids` used (needs a request)"))
    p.add_argument("--seed", action=_StoreOnce, type=int, default=None,
                   help=("seeds the forget-id draw, the method (not retrain, which trains with "
                         "the checkpoint's recipe seed unless its `seed` setting is given) and "
                         "the attack" if required else "seeds the forget-id draw and the attack")
                        + " (default: the checkpoint's seed)")
    p.add_argument("--eval-batch-size", type=_at_least(1), default=64, metavar="N",
                   help="evaluation batch size (default: 64)")


def build_parser() -> argparse.ArgumentParser:
    """The ``mtunlearn`` argument parser (one subparser per command)."""
    return _build_parser()


def _build_parser() -> _Parser:
    parser = _Parser(prog="mtunlearn", epilog=_epilog(*EXAMPLES.values()), description=(
        "Interference-aware multi-task machine unlearning: train, unlearn, evaluate, verify. "
        + _SAFETY + " " + _NAN_POLICY + " Bad input exits with code 2 and one line naming the "
        "argument, the expected and the received value."))
    # Also taken before the command (`mtunlearn --import mymethods unlearn ...`), where a
    # global option is usually written; its own dest, as a subparser's default would
    # overwrite a shared one.
    parser.add_argument("--import", dest="imports_first", action="append", default=None,
                        metavar="MODULE", help="as a command's --import (before the command)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.commands = sub.choices

    p = sub.add_parser("train", help="train the original model of a benchmark",
                       description="Train a benchmark's default model with its recipe and write "
                                   "a new checkpoint. " + _SAFETY)
    p.add_argument("--benchmark", default="digits",
                   help="benchmark name: indoor, street, digits, nyuv2, cityscapes "
                        "(default: digits)")
    p.add_argument("--size", default="tiny", choices=["tiny", "small", "medium"],
                   help="benchmark size (default: tiny)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="LibMTL data root (only for " + " / ".join(_DATA_ROOT_BENCHMARKS)
                        + "; refused for the others, which read none)")
    # Refused twice as in `unlearn` / `evaluate`: the seed decides the checkpoint's bytes.
    p.add_argument("--seed", action=_StoreOnce, type=int, default=0,
                   help="data, initialisation and training seed (default: 0)")
    p.add_argument("--epochs", type=_at_least(1), default=None,
                   help="override the recipe's epochs (at least 1; default: the recipe's)")
    p.add_argument("--train", default=None, metavar="JSON",
                   help='JSON overrides of the training recipe, e.g. {"lr": 1e-3} (default: '
                        'none, the benchmark\'s recipe as it is)')
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--output", required=False, default=None, metavar="CKPT",
                   help="new checkpoint path (never overwritten)")
    _common(p)
    p.set_defaults(func=_cmd_train, _required=["output"])

    p = sub.add_parser("unlearn", help="unlearn a request from a checkpoint",
                       description="Unlearn a forget request from a checkpoint with a method; "
                                   "write a new checkpoint and an unlearning record. " + _SAFETY
                                   + " " + _NAN_POLICY)
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="input checkpoint (from `mtunlearn train`); never modified")
    _request_options(p, required=True)
    p.add_argument("--method", default="interference_aware",
                   help="unlearning method (registry name, e.g. interference_aware, "
                        "neggrad_plus, finetune, retrain; default: interference_aware)")
    p.add_argument("--method-config", default=None, metavar="JSON",
                   help='method settings as JSON or a JSON file, e.g. {"steps": 20} (default: '
                        'the method\'s own settings)')
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    p.add_argument("--output", default=None, metavar="CKPT",
                   help="new checkpoint path (default: <input>.<method>.pt, numbered if taken; "
                        "<stem>.<method>-<k+1>.pt from <stem>.<method>[-k].pt)")
    p.add_argument("--record", default=None, metavar="JSON",
                   help="record path (default: <output>.record.json with --output, else "
                        "<input>.<method>.record.json, numbered as the checkpoint)")
    p.add_argument("--retained-tolerance", type=_at_least(0.0, float),
                   default=_DEFAULT_RETAINED_TOLERANCE, metavar="FRACTION",
                   help="the largest relative worsening of any task metric on the retain and "
                        "test splits against the input model's (default: "
                        f"{_DEFAULT_RETAINED_TOLERANCE:g}, i.e. "
                        f"{100 * _DEFAULT_RETAINED_TOLERANCE:g}%%); a run past it is warned of "
                        "and recorded (retained_check)")
    p.add_argument("--require-retained", action="store_true",
                   help="fail a run that worsened a retain or test metric past "
                        "--retained-tolerance: exit 4, nothing written")
    _moved_data_root_option(p)
    _common(p)
    p.set_defaults(func=_cmd_unlearn, _required=["checkpoint"])

    p = sub.add_parser("evaluate", help="metrics of a checkpoint as JSON",
                       description="Evaluate a checkpoint: per-task metrics on train and test, "
                                   "or, with a request, on forget / retain / test plus the MIA "
                                   "AUC.")
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="checkpoint to evaluate")
    _request_options(p, required=False)
    p.add_argument("--output", default=None, metavar="JSON",
                   help="new JSON file for the metrics (default: print the JSON alone to "
                        "stdout, the summary table to stderr)")
    _moved_data_root_option(p)
    _common(p)
    p.set_defaults(func=_cmd_evaluate, _required=["checkpoint"])

    p = sub.add_parser("verify", help="re-check a model against its unlearning record",
                       description="Check a checkpoint against its unlearning record: its "
                                   "SHA-256, the ids' hash, what the checkpoint says of its "
                                   "making, the pair counts, the forgotten ids, a draw of the "
                                   "ids, whether the weights changed, and its metrics, "
                                   "measured again; exit 1 on any mismatch. A record of the "
                                   "Python API's save_unlearned gets the file and hash checks "
                                   "only. The command line a record holds is not checked.")
    p.add_argument("--record", default=None, metavar="JSON", help="the unlearning record")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint to verify (default: the record's output checkpoint)")
    p.add_argument("--tolerance", type=_at_least(0.0, float), default=1e-4,
                   help="metric tolerance (absolute below 1, relative above; default: 1e-4)")
    p.add_argument("--json", action="store_true",
                   help="print the outcome as one JSON object on stdout (verified, record, "
                        "checkpoint, sha256, checks, mismatches, tolerance), the table and the "
                        "lines on stderr; also on a mismatch (exit 1); bad input (exit 2) "
                        "prints none")
    _moved_data_root_option(p)
    _common(p)
    p.set_defaults(func=_cmd_verify, _required=["record"])

    p = sub.add_parser("benchmark", help="run the op benchmarks (quick) or the showcase",
                       description="Run benchmarks/compare.py --quick when present (a source "
                                   "checkout), else `python -m mtunlearn_ext.showcase`.")
    p.add_argument("--showcase", action="store_true", help="run the showcase even if "
                                                           "benchmarks/compare.py exists")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("extra", nargs="*", help="extra arguments for the benchmark (after --)")
    _common(p)
    p.set_defaults(func=_cmd_benchmark, _required=[])

    p = sub.add_parser("report", help="Markdown report with plots from a results JSON",
                       description="Write report.md and PNG plots from an experiment results "
                                   "file (python -m mtunlearn_ext.experiment) or an unlearning "
                                   "record: per-task metrics against the retrained model and "
                                   "forget/retain loss curves when present, and the task-"
                                   "gradient cosine (interference) matrices before and after "
                                   "the projections when the input holds them (`unlearn` "
                                   "records them).")
    p.add_argument("--results", default=None, metavar="JSON", help="results file or record")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="directory for report.md and the PNGs (existing files are refused)")
    p.add_argument("--title", default=None,
                   help="report title (default: the results file's name)")
    _common(p)
    p.set_defaults(func=_cmd_report, _required=["results", "output_dir"])
    _say_required(parser)
    for name, command in parser.commands.items():
        # The same codes in every command's --help: a script's author reads that one command's.
        command.epilog = _epilog(EXAMPLES[name])
    return parser


def _epilog(*examples: Sequence[str]) -> str:
    lines = [line for group in examples for line in group]
    return "\n".join(["examples:", *(f"  {line}" for line in lines), _EXIT_CODES_HELP])


def _say_required(parser: _Parser) -> None:
    """Mark in each subcommand's help the options it requires: they are optional to argparse
    (a --config file may give them; :func:`_main` checks), so the usage line shows them in
    brackets like any other."""
    for sub in parser.commands.values():
        required = sub.get_default("_required") or []
        for option in sub._actions:
            if option.dest in required and option.help and "(required" not in option.help:
                option.help += " (required: here or as a --config key)"


def _subparser(parser: _Parser, name: str) -> argparse.ArgumentParser:
    """The parser of command ``name``, one argparse accepted (:func:`_main` parses first)."""
    return parser.commands[name]
