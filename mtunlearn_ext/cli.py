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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from mtunlearn_ext._errors import NonFiniteError, OutputTakenError, UserInputError
from mtunlearn_ext._io import json_safe, write_json_new
from mtunlearn_ext._random import MAX_RUN_SEED
from mtunlearn_ext._text import (display_width, pad_to, visible_controls,
                                 without_digit_limit_advice)
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, MtUnlearnWarning

__all__ = ["EXIT_CODES", "build_parser", "console_main", "main"]

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


# -- configuration files ------------------------------------------------------------------------


def _strict_int_loader() -> type:
    """yaml's SafeLoader, except that an integer must be written in plain decimal. YAML 1.1
    reads ``0020`` as octal 16, ``1:13`` as 73 and ``1_3`` as 13: in ``forget_ids`` each would
    forget another instance than the one meant (``--forget-ids 0020`` on the command line is
    20), so those forms are refused, naming the value, where PyYAML would convert them."""
    import re

    import yaml

    class StrictIntLoader(yaml.SafeLoader):
        pass

    def construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
        text = str(node.value)
        if not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", text):
            read = loader.construct_yaml_int(node)
            raise yaml.constructor.ConstructorError(
                None, None, f"{text!r} is not a plain decimal integer: YAML 1.1 reads it as "
                f"{read} (octal, sexagesimal, hexadecimal, binary or with '_'); write the "
                "decimal number meant, without leading zeros, or quote it", node.start_mark)
        return int(text)

    StrictIntLoader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return StrictIntLoader


def _refuse_repeated_keys(text: str, loader_class: type) -> None:
    """Raise (a yaml error) on a key written twice in one YAML mapping: PyYAML keeps the last,
    and `forget_ids` written twice forgot the second list's instances only, without a word
    (TOML refuses it). Checked on the composed nodes, before construction, whose merging
    rewrites them: a merge key's values (`<<: *defaults`) are overridden by the keys beside
    them, as YAML means, and are never counted as written twice."""
    import yaml

    loader = loader_class(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _refuse_alias_expansion(root)
        stack = [] if root is None else [root]
        visited: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in visited:  # an alias: the anchored node, seen already
                continue
            visited.add(id(node))
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, value_node in node.value:
                    stack += [key_node, value_node]
                    if key_node.tag == "tag:yaml.org,2002:merge" \
                            or not isinstance(key_node, yaml.ScalarNode):
                        continue  # (a complex key: PyYAML's own checks)
                    key = loader.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark,
                            f"key {key!r} is given twice; keep one", key_node.start_mark)
                    seen.add(key)
            elif isinstance(node, yaml.SequenceNode):
                stack += node.value
    finally:
        loader.dispose()


def _refuse_alias_expansion(root: Any) -> None:
    """Raise (a yaml error) where aliases (``*name``) expand the document far beyond what it
    writes: PyYAML shares the anchored value, but a config's value is then written out as JSON
    or text, and ten lines of lists of two aliases of the line before (the "billion laughs")
    took 34 s and 1.5 GB at 22 levels, twice that per further level."""
    import yaml

    from mtunlearn_ext._expansion import MAX_ADDED_BY_SHARING, SelfContainingError, expanded_size

    def parts(node: Any) -> list[Any] | None:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else None

    try:
        expanded, written = expanded_size(root, parts)
    except SelfContainingError:
        raise yaml.constructor.ConstructorError(
            None, None, "an alias (*name) lies inside the value it names, which never ends",
            root.start_mark) from None
    if expanded - written > MAX_ADDED_BY_SHARING:
        raise yaml.constructor.ConstructorError(
            None, None, f"its aliases (*name) expand it to {expanded:,} values from {written:,} "
            f"written (at most {MAX_ADDED_BY_SHARING:,} more are read); write the values out",
            root.start_mark)


def _yaml_error_text(error: Exception) -> str:
    """A YAML error in one line: what is wrong, then where (``line 2, column 14``), and where
    its context began when that is elsewhere (an unclosed quote's opening line). PyYAML's
    own text puts its position, ``in "<unicode string>", line 2, column 14``, after the
    problem, which ran into a sentence ending "or quote it" (user review)."""
    import yaml

    if not isinstance(error, yaml.MarkedYAMLError) or error.problem is None:
        return " ".join(str(error).split())

    def where(mark: Any, preposition: str) -> str:
        return f" ({preposition} line {mark.line + 1}, column {mark.column + 1})"

    problem = " ".join(error.problem.split())
    context = ""
    if error.context:
        # A context that starts elsewhere (an unclosed quote's opening) says where it began.
        elsewhere = error.context_mark is not None and (
            error.problem_mark is None or (error.context_mark.line, error.context_mark.column)
            != (error.problem_mark.line, error.problem_mark.column))
        context = " ".join(error.context.split()) + (
            where(error.context_mark, "from") if elsewhere else "") + ": "
    mark = error.problem_mark or error.context_mark
    return f"{context}{problem}{where(mark, 'at') if mark is not None else ''}"


def _load_config(path: str) -> dict[str, Any]:
    from mtunlearn_ext.workflow import is_existing_file

    p = Path(path)
    if not is_existing_file(path):
        raise UserInputError("--config", "an existing .yaml/.yml/.toml file", path)
    try:
        if p.suffix == ".toml":
            import tomllib

            values = tomllib.loads(p.read_text(encoding="utf-8"))
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            try:
                text = p.read_text(encoding="utf-8")
                loader_class = _strict_int_loader()
                _refuse_repeated_keys(text, loader_class)
                values = yaml.load(text, Loader=loader_class) or {}
            except yaml.YAMLError as error:  # not a ValueError; its text spans lines
                raise UserInputError("--config", "valid YAML/TOML", path,
                                     _yaml_error_text(error)) from error
        else:
            raise UserInputError("--config", "a .yaml, .yml or .toml file", path,
                                 "a JSON config is not read: write it as YAML or TOML, the "
                                 "options' names as keys" if p.suffix == ".json" else "")
    except (ValueError, OSError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError("--config", "valid YAML/TOML", path, str(error)) from error
    except RecursionError:  # not a ValueError: a traceback with exit 1 (the verify-mismatch code)
        raise UserInputError("--config", "valid YAML/TOML", path,
                             "nested too deeply to read") from None
    if not isinstance(values, dict):
        raise UserInputError("--config", "a mapping of option -> value", type(values).__name__)
    return values


def _config_value(action: argparse.Action, value: Any) -> Any:
    """A config value as the option's default, in the form its own parsing takes: JSON text
    for a mapping, comma-separated text for a list, and for a positional list (``benchmark``'s
    ``extra``) the words as on the command line (a string is split like a shell would)."""
    import shlex

    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):  # bool("false") would be True
            raise ValueError("a boolean (true or false)")
        return value
    if isinstance(action, argparse._AppendAction):
        # The default of a repeatable option is the list of its values; a lone string would be
        # iterated one character at a time (`imports = "mymethods"` imported a module 'm').
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"a string or a list of strings ({action.option_strings[0]} is "
                             "repeatable)")
        return list(items)
    if action.nargs in ("*", "+", argparse.REMAINDER):
        words = value if isinstance(value, (list, tuple)) else shlex.split(str(value))
        return [str(v) for v in words]
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


class _NullInConfig(str):
    """The default of an option whose config value was null although null may not stand for
    "not given" there (:data:`_NO_NULL`); refused once the command line is parsed, unless the
    command line gives the option (:func:`_refuse_config_nulls`)."""


#: Options a config may not set to null: the value has an effect of its own that a null (an
#: empty value, perhaps a template's placeholder or a variable that did not expand) must not
#: choose. Without ``forget_ids``, ``unlearn`` forgets a random share of the instances: a
#: data-removal tool takes that from an absent key, never from an empty one.
_NO_NULL = {"forget_ids": "(then a random --forget-fraction of the training instances is "
                          "forgotten)"}


def _refuse_config_nulls(args: argparse.Namespace) -> None:

    for dest, absent in _NO_NULL.items():
        key = getattr(args, dest, None)
        if isinstance(key, _NullInConfig):
            raise UserInputError("--config", f"instance ids for {str(key)!r}, or no {key} key "
                                 + absent, "null", f"an empty {key} is refused, not taken for a "
                                 "random draw: list the ids, or remove the key to draw them")


#: Options whose value is a file or folder (a config's relative one names it from the config's
#: folder, :func:`_config_path`).
_CONFIG_PATHS = ("checkpoint", "output", "record", "data_root", "results", "output_dir")
#: Options whose value is JSON text or the name of a file holding it.
_CONFIG_JSON_OR_FILE = ("method_config", "train")
#: Options whose value is instance ids or the name of a file holding them (``@`` optional).
_CONFIG_IDS_OR_FILE = ("forget_ids", "retain_ids")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _config_path(dest: str, value: Any, folder: Path) -> Any:
    """A config's value (as :func:`_config_value` made it) with a relative file or folder it
    names taken from the config's ``folder``, as most tools read their config files: a config
    and the files beside it then work from any current folder, and ``~`` is the home folder
    (no shell expands it in a file; ``~name`` of no known user stays as written, as a shell
    leaves it). Text that is no path stays: JSON (``{...}``), ids (``3,7``),
    a module name in ``import`` (a ``.py`` file is a path), and the empty text, which
    :func:`_refuse_empty_paths` refuses."""
    from mtunlearn_ext.workflow import is_existing_file, is_id_list

    def rebased(text: str) -> str:
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # `~name` of no user here: a shell leaves it as written too
            path = Path(text)
        if text == "" or path.is_absolute():
            return text if text == "" else str(path)
        joined = str(folder / path)
        # `cfg/../orig.pt` printed as `orig.pt`, unless a symbolic link in the part dropped
        # would take `..` elsewhere than the text says (then the path stays as joined).
        lexical = os.path.normpath(joined)
        return lexical if os.path.realpath(lexical) == os.path.realpath(joined) else joined

    if dest in _CONFIG_PATHS and isinstance(value, str):
        return rebased(value)
    if dest in _CONFIG_JSON_OR_FILE and isinstance(value, str) \
            and not value.lstrip().startswith(("{", "[")):  # JSON: its own error names it
        return rebased(value)
    if dest in _CONFIG_IDS_OR_FILE and isinstance(value, str):
        if value.startswith("@"):
            return "@" + rebased(value[1:])
        if not value.strip():
            return value
        if is_id_list(value):
            # Ids or a file of that name is decided beside the config, as its paths are: the
            # trailing comma (ids, unambiguously) keeps a file of that name in the current
            # folder from being taken instead.
            if is_existing_file(rebased(value)):
                raise ValueError(f"it is both an id list and the name of a file beside the "
                                 f"config; for the file write '@{value}', for the ids "
                                 f"'{value},' (a trailing comma)")
            return value if value.rstrip().endswith(",") else value + ","
        # One word that is no id names a file (its error then says where it was looked for);
        # words with a bad id among them (3,x) and numbers (7.0) stay, for the error to say
        # what an id is.
        one_word = len(value.replace(",", " ").split()) == 1
        if one_word and not _is_number(value):
            return rebased(value)
        return rebased(value) if is_existing_file(rebased(value)) else value
    if dest == "imports" and isinstance(value, list):
        return [rebased(v) if v.endswith(".py") else v for v in value]
    return value


def _apply_config(parser: argparse.ArgumentParser, values: Mapping[str, Any],
                  folder: Path = Path(".")) -> None:
    """Make config values the defaults of ``parser`` (so command-line flags override them).
    Values go through the option's own parsing (:func:`_config_value`); a relative file or
    folder they name is taken from the config's ``folder`` (:func:`_config_path`); a null value
    (YAML ``null`` / ``~``) means the option is not given: it keeps its default, except for the
    options of :data:`_NO_NULL` (``forget_ids``), where it is refused unless the command line
    gives the option."""

    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        actions[action.dest] = action
        # The option's own name too: `--import` stores into `imports`, and the documented
        # rule is that a key is the option's name.
        for flag in action.option_strings:
            if flag.startswith("--"):
                actions.setdefault(flag[2:].replace("-", "_"), action)
    defaults: dict[str, Any] = {}
    given: dict[str, str] = {}  # dest -> the key that set it
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            raise UserInputError("--config", f"keys among {sorted(actions)}", key,
                                 "unknown option")
        dest = actions[name].dest
        if dest in given:  # `import` and `imports`, `forget_ids` and `forget-ids`
            raise UserInputError("--config", "one key per option", key,
                                 f"{given[dest]!r} sets the same option")
        given[dest] = str(key)
        if value is None:
            if dest in _NO_NULL:
                defaults[dest] = _NullInConfig(key)
            continue
        if dest in _CONFIG_IDS_OR_FILE and isinstance(value, (list, tuple)) and value and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            # A list of integers (YAML `[3]`, a TOML array) is ids, never a file's name: the
            # trailing comma keeps parse_ids from taking a file of that name for it.
            defaults[dest] = ",".join(str(v) for v in value) + ","
            continue
        try:
            defaults[dest] = _config_path(dest, _config_value(actions[name], value), folder)
        except ValueError as error:  # not a boolean for a flag, an unbalanced quote
            raise UserInputError("--config", f"a valid value for {key!r}", value,
                                 str(error)) from error
    parser.set_defaults(**defaults)


# -- shared helpers ----------------------------------------------------------------------------


def _json_arg(text: str | None, argument: str) -> dict[str, Any]:
    from mtunlearn_ext._io import DuplicateKeyError, unique_keys
    from mtunlearn_ext.workflow import is_existing_file

    if text is None or text == "":
        return {}
    try:
        from_file = is_existing_file(text)
        raw = Path(text).read_text(encoding="utf-8") if from_file else text
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(argument, "a JSON object or a readable file holding one", text,
                             str(error)) from error
    try:
        value = json.loads(raw, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        stripped = text.strip()
        if not stripped.startswith(("{", "[", '"')) and not from_file and (
                stripped.lower().endswith((".json", ".yaml", ".yml", ".txt")) or "/" in stripped):
            # A file name that names no file: "Expecting value: line 1 column 1" said nothing of it.
            raise UserInputError(argument, "a JSON object or a readable file holding one", text,
                                 "no such file") from None
        raise UserInputError(argument, "a JSON object or a file holding one", text,
                             str(error)) from error
    except DuplicateKeyError as error:  # json keeps the last of two equal keys, without a word
        raise UserInputError(argument, "a JSON object with each key once", text,
                             f"key {error.args[0]!r} is given twice") from None
    except RecursionError:
        raise UserInputError(argument, "a JSON object or a file holding one", text,
                             "nested too deeply to read") from None
    except ValueError as error:  # an integer past Python's 4300 digits (not a JSONDecodeError)
        raise UserInputError(argument, "a JSON object or a file holding one", text,
                             without_digit_limit_advice(error)) from None
    if not isinstance(value, dict):
        raise UserInputError(argument, "a JSON object", type(value).__name__)
    return value


def _check_seed(seed: int | None) -> None:
    """Seeds are integers in ``[0, MAX_RUN_SEED]``, the range every generator the commands seed
    takes (a larger one would fail deep inside, blamed on another argument)."""

    if seed is not None and seed < 0:
        raise UserInputError("--seed", "an integer >= 0", seed)
    if seed is not None and seed > MAX_RUN_SEED:
        raise UserInputError("--seed", "an integer in [0, 2**32-1]", seed,
                             f"numpy/scikit-learn seeds are 32-bit (at most {MAX_RUN_SEED})")


def _say(*parts: object, **print_options: Any) -> None:
    """``print``, with the control characters of the text (but its line breaks) shown as
    escapes: task names, paths and a record's fields are the user's, or whoever wrote the
    record's, and an ESC or CR in one would recolour, clear or overwrite the terminal."""
    print(*(visible_controls(str(part), keep="\n") for part in parts), **print_options)


def _shown(path: object) -> str:
    """A path for a line that :func:`_say` prints: its line breaks shown as escapes too (a
    record's checkpoint path ``u\\n.pt`` split the ``verified:`` line in two)."""
    return visible_controls(str(path))


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """An aligned plain-text table (the end-of-command summary). A cell's control characters
    are shown as escapes: a line break in a name would break its row, an escape sequence would
    be obeyed and count towards the width although it takes no column. Columns are aligned by
    the terminal columns a cell takes (a CJK name takes two a character)."""
    cells = [[visible_controls(str(h)) for h in headers]] + [
        [visible_controls(_fmt(c)) for c in r] for r in rows]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(pad_to(c, w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _metric_rows(before: Mapping[str, Any] | None, after: Mapping[str, Any]
                 ) -> list[list[object]]:
    """Rows ``split, task, metric, before, after`` of the primary metrics, and the MIA AUC of
    the forget split when there is one (``evaluate`` without a request has none)."""
    from mtunlearn_ext.experiment import PRIMARY_METRIC

    rows: list[list[object]] = []
    for split, tasks in after["metrics"].items():
        for task, values in tasks.items():
            name = next((m for m in PRIMARY_METRIC.values() if m in values), None)
            if name is None:
                name = sorted(values)[0]
            prev = (before or {}).get("metrics", {}).get(split, {}).get(task, {}).get(name)
            rows.append([split, task, name, prev, values.get(name)])
    if "forget" in after["metrics"] or "mia_auc" in after:
        rows.append(["forget", "*", "mia_auc", (before or {}).get("mia_auc"),
                     after.get("mia_auc")])
        # How well the attack tells training members from unseen data at all: without it the
        # forget set's AUC was read as a verdict where the attack was at chance.
        if "mia_member_auc" in after:
            rows.append(["retain", "*", "mia_member_auc", (before or {}).get("mia_member_auc"),
                         after.get("mia_member_auc")])
    return rows


def _attack_notes(after: Mapping[str, Any]) -> list[str]:
    """Why the table's ``mia_auc`` is ``-`` (the record's ``mia_error``, seen nowhere else), and
    whether the attack works at all on this model (its member AUC)."""
    from mtunlearn_ext.metrics.membership import attack_at_chance

    notes = []
    if after.get("mia_auc") is None and after.get("mia_error"):
        notes.append(f"mia_auc not measured: {after['mia_error']}")
    member = after.get("mia_member_auc")
    if attack_at_chance(member):
        notes.append(f"note: the attack tells training members from unseen data no better than "
                     f"chance here (mia_member_auc {member:.2f}), so its forget-set AUC says "
                     "nothing about forgetting")
    return notes


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


# -- subcommands ----------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from mtunlearn_ext.data.registry import load_benchmark
    from mtunlearn_ext.data.fingerprint import dataset_fingerprint
    from mtunlearn_ext.experiment import default_recipe
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.training import save_checkpoint, train
    from mtunlearn_ext.workflow import (
        CLI_META_FORMAT,
        TEST_FILES_KEY,
        TRAIN_FILES_KEY,
        OutputTransaction,
        check_device,
    )

    from mtunlearn_ext.records import code_version, run_environment

    code = code_version()  # the code this run imported and trains with: read before the work
    device = check_device(args.device)
    _check_seed(args.seed)
    _check_data_root(args.benchmark, args.data_root)
    given = _json_arg(args.train, "--train")
    overrides = dict(given)
    if args.epochs is not None:
        overrides["epochs"] = int(args.epochs)
    with OutputTransaction() as tx:
        output = tx.reserve("--output", args.output)
        try:
            bench = load_benchmark(args.benchmark, seed=args.seed, size=args.size,
                                   data_root=args.data_root)
        except OSError as error:  # a real data set's root: missing, or not LibMTL's layout
            raise UserInputError("--data-root", f"a folder holding {args.benchmark!r} in "
                                 "LibMTL's layout", args.data_root, str(error)) from error
        except ValueError as error:
            raise UserInputError("--benchmark", "a loadable benchmark", args.benchmark,
                                 str(error)) from error
        try:
            recipe = default_recipe(bench, args.seed, overrides)
        except (TypeError, ValueError) as error:
            raise UserInputError("--train", "fields of TrainConfig", given,
                                 str(error)) from error
        model = build_model(bench, seed=args.seed).to(device)
        try:
            result = train(model, bench.train, None, recipe, progress=not args.quiet)
        except NonFiniteError:
            raise
        except FloatingPointError as error:  # train's non-finite loss: the NaN/Inf policy
            raise _training_nonfinite(error) from error
        # The absolute root: unlearn, evaluate and verify reload the data from it, from any
        # folder (a relative --data-root only resolved from the folder train ran in).
        data_root = (None if args.data_root is None
                     else str(Path(args.data_root).expanduser().resolve()))
        meta = {"format": CLI_META_FORMAT, "kind": "original", "benchmark": bench.name,
                "size": args.size, "seed": args.seed, "data_root": data_root,
                # The device trained on: it decides the weights' last bits too.
                "device": str(device),
                "recipe": recipe.to_dict(), "data_sha256": dataset_fingerprint(bench.train),
                # The test split too (hashed in memory, as the training split): unlearn,
                # evaluate and verify measure the test metrics and the attack's AUC on it.
                "test_data_sha256": dataset_fingerprint(bench.test),
                # Every file's SHA-256: what the later commands check the data by (the tensors'
                # last bits follow the thread count); once a removal was honoured, the
                # person's files may be erased and the rest still be checked file by file.
                **{key: bench.info[key] for key in (TRAIN_FILES_KEY, TEST_FILES_KEY)
                   if data_root is not None and key in bench.info},
                "train_steps": result.steps, "final_loss": result.final_loss,
                # The weights' last bits depend on the thread count (torch's default: the
                # core count) and the torch build: the same command reproduces the file with
                # the same ones.
                "environment": run_environment(recipe.num_threads or torch.get_num_threads()),
                # Which code trained it (the same command at another commit may not give
                # these weights; reproducibility audit).
                "code": code}
        # No wall time in the checkpoint: the same command must give the same file (SHA-256),
        # so a pipeline rerun from its command lines reproduces the records' hashes. The
        # seconds are printed in the summary below instead.
        sha = tx.write(output, lambda p: save_checkpoint(p, model, meta))
    _say(_table([[bench.name, args.size, args.seed, result.steps, result.final_loss,
                  round(result.seconds, 2), str(output), sha[:16]]],
                ["benchmark", "size", "seed", "steps", "final_loss", "seconds", "checkpoint",
                 "sha256"]))
    return 0


#: The benchmarks ``load_benchmark`` reads from ``data_root`` (LibMTL's preprocessed real data
#: sets); the others are generated or bundled (digits) and ignore it.
_DATA_ROOT_BENCHMARKS = ("nyuv2", "cityscapes")


def _check_data_root(benchmark: str, data_root: str | None) -> None:
    """Refuse ``--data-root`` for a benchmark that reads none: it would be ignored, yet stored in
    the checkpoint's metadata (changing its SHA-256) as if the data came from there. Like
    ``evaluate``'s request options without a request, an option without effect is refused.
    An unknown benchmark is left to ``load_benchmark``'s error, which names ``--benchmark``."""
    from mtunlearn_ext.data import BENCHMARKS

    if data_root is not None and benchmark in BENCHMARKS \
            and benchmark not in _DATA_ROOT_BENCHMARKS:
        raise UserInputError("--data-root", "no value unless --benchmark is one of "
                             f"{list(_DATA_ROOT_BENCHMARKS)} (the real data sets it locates)",
                             data_root, f"{benchmark!r} reads no data root; drop --data-root")


def _training_nonfinite(error: FloatingPointError) -> Exception:
    """``training.train``'s non-finite loss as the :class:`~mtunlearn_ext.workflow.NonFiniteError`
    of the NaN/Inf policy (exit 3, one line with the step)."""
    from mtunlearn_ext.training import NonFiniteLoss

    if not isinstance(error, NonFiniteLoss):
        return NonFiniteError(None, f"training: {error}")
    return NonFiniteError(error.step,
                          f"training loss {error.value} (per task: {error.per_task})")


def _default_outputs(checkpoint: Path, method: str) -> tuple[Path, Path]:
    """``<stem>.<method>.pt`` / ``<stem>.<method>.record.json`` beside the input. An input
    named so by this method, ``<stem>.<method>[-k].pt`` (a chained request on the previous
    output), gives ``<stem>.<method>-<k+1>.pt``: appending the method to the whole name again
    made a chain's names grow by its length each request, past the file system's 255 bytes at
    the 13th with ``interference_aware``. The number is the request's place in its chain; where
    that name is taken (a rerun, or a request on an older checkpoint of a chain), a letter
    follows it, ``-<k>b``, ``-<k>c``, ...: taking the next free number instead named a first
    request on the original ``-4`` beside a chain's third, the name that looks newest although
    its lineage holds none of the chain's removals."""

    if checkpoint.name in ("", ".", ".."):  # "." or "/": no name to put the outputs beside
        raise UserInputError("--checkpoint", "a checkpoint file", str(checkpoint),
                             "it names a folder")
    stem, place = _chained_stem(checkpoint.stem, method)
    for branch in range(10_000):
        tag = _chain_tag(method, place, branch)
        ckpt = checkpoint.with_name(f"{stem}.{tag}.pt")
        rec = checkpoint.with_name(f"{stem}.{tag}.record.json")
        # lexists: False (not an OSError) for a name too long for the file system, which
        # reserve() then refuses, naming the argument.
        if not os.path.lexists(ckpt) and not os.path.lexists(rec):
            return ckpt, rec
    raise FileExistsError(f"no free output name beside {checkpoint}")


#: How many default names one unlearn run tries before giving up: each one lost was taken by
#: another run that finished its checkpoint meanwhile, so this bounds the overlapping runs.
_DEFAULT_NAME_ATTEMPTS = 100


def _write_at_free_name(tx: Any, args: argparse.Namespace, checkpoint: Path, out_ckpt: Path,
                        out_rec: Path, write_checkpoint: Callable[[Path], str]
                        ) -> tuple[Path, Path, str]:
    """Write the unlearned checkpoint at ``out_ckpt``; return ``(checkpoint path, record
    path, SHA-256)``. Where ``out_ckpt`` is the default name and another run (the same
    request retried, another request on the same input) wrote that name after this run chose
    it, the checkpoint goes to the next free default name, with the record beside it unless
    ``--record`` named it: both runs keep their outputs, as when they run one after the other.
    A name given with ``--output`` is never changed (the run fails and writes nothing)."""

    for _ in range(_DEFAULT_NAME_ATTEMPTS - 1):
        try:
            return out_ckpt, out_rec, tx.write(out_ckpt, write_checkpoint)
        except OutputTakenError:
            if args.output is not None:
                raise
        # Names are chosen again from the first: the one lost is taken now, and the next
        # number may be too (a third run).
        default_ckpt, default_rec = _default_outputs(checkpoint, args.method)
        tx.release("--output")
        out_ckpt = tx.reserve("--output", default_ckpt)
        if args.record is None:
            tx.release("--record")
            out_rec = tx.reserve("--record", default_rec)
    return out_ckpt, out_rec, tx.write(out_ckpt, write_checkpoint)


def _branch_letters(branch: int) -> str:
    """``b`` for 1, ``c`` for 2, ... ``z`` for 25, then ``ba``, ``bb``, ...: base 26 in
    letters, never starting with ``a`` (so that no two branches read alike)."""
    letters = ""
    while branch:
        branch, digit = divmod(branch, 26)
        letters = chr(ord("a") + digit) + letters
    return letters


def _later_in_chain(checkpoint: Path, method: str) -> tuple[Path, Path] | None:
    """Where a request on ``checkpoint`` was made before (the default output name of its next
    place is taken): that name and the newest place of the chain beside it, else ``None``.
    A request on a superseded checkpoint trains on what the later ones removed (docs/cli.md:
    "always start a request from the newest checkpoint"), which nothing said. Only the main
    chain's names tell a checkpoint's successor: a branch (``-1b``) continues as ``-2b``, whose
    next place ``-2`` is the main chain's, not the branch's, so a branch input is not judged."""
    stem, place = _chained_stem(checkpoint.stem, method)
    tag = checkpoint.stem.rpartition(f".{method}")[2]
    if place > 1 and tag.startswith("-") and not tag[1:].isdigit():  # "-2b": a branch
        return None

    def at(k: int) -> Path:
        return checkpoint.with_name(f"{stem}.{_chain_tag(method, k)}.pt")

    if not os.path.lexists(at(place)):
        return None
    newest = place
    while os.path.lexists(at(newest + 1)):
        newest += 1
    return at(place), at(newest)


def _chain_tag(method: str, place: int, branch: int = 0) -> str:
    """The tag of a chain's default output name: ``<method>`` at place 1, ``<method>-<k>``
    after it, a branch's letters after its place (``<method>-<k>b``)."""
    if branch:
        return f"{method}-{place}{_branch_letters(branch)}"
    return method if place == 1 else f"{method}-{place}"


def _chained_stem(stem: str, method: str) -> tuple[str, int]:
    """``(stem, 1)``, or for a stem that :func:`_default_outputs` gave with this method,
    ``<base>.<method>`` or ``<base>.<method>-<k>[letters]``: ``(base, k + 1)``, the place
    after it."""
    base, dot, tag = stem.rpartition(f".{method}")
    if not dot or not base:
        return stem, 1
    if tag == "":
        return base, 2
    number = tag.removeprefix("-").rstrip("abcdefghijklmnopqrstuvwxyz")
    letters = tag.removeprefix("-")[len(number):]
    # "-2" or "-2b", not "-02", "-x" or "-2a": only the names this function writes continue a
    # chain.
    if (tag.startswith("-") and number.isascii() and number.isdigit() and number[0] != "0"
            and not letters.startswith("a")):
        return base, int(number) + 1
    return stem, 1


def _interference(problem: Any, method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The input model's task-gradient cosines before and after the interference-aware
    projections, JSON-safe (:func:`mtunlearn_ext.report.interference_to_json`).

    Projected with the run's settings when the method is ``interference_aware`` (what it
    actually removed), with that method's defaults otherwise, so that the record of any method
    shows how much the request's forget and retain gradients conflict on the input model.
    """
    from mtunlearn_ext.report import interference_to_json
    from mtunlearn_ext.unlearning import get_unlearner
    from mtunlearn_ext.unlearning.interference import interference_matrix

    own = method == "interference_aware"
    config = get_unlearner("interference_aware", dict(settings) if own else {}).config
    try:
        # Its setup would repeat the run's own warnings (the same problem and settings), or,
        # after another method, warn of settings no method of this run used.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MtUnlearnWarning)
            matrix = interference_matrix(problem, config)  # type: ignore[arg-type]
    except (RuntimeError, ValueError) as error:
        # A diagnostic: the unlearned model is already computed and must not be lost for it.
        _say(f"mtunlearn: warning: no interference matrix: {error}", file=sys.stderr)
        return {"error": str(error)}
    return {**interference_to_json(matrix, config),
            "settings_from": "the method's settings" if own else "interference_aware defaults"}


def _resolved_settings(report: Any) -> dict[str, Any]:
    """The method's settings as the run used them, for the record: the config, with the
    settings it left to a default (``None``) as the run resolved them
    (``report.extra["resolved_settings"]``: the forget objectives built, retraining's recipe
    seed), so that they reproduce the run given as ``--method-config``. The report's own
    ``config`` is left as the method stored it."""
    settings = dict(report.config)
    resolved = report.extra.get("resolved_settings")
    if isinstance(resolved, Mapping):
        settings.update({k: v for k, v in resolved.items() if settings.get(k) is None})
    return settings


def _request_fields(request: Any, request_type: str, targets: Sequence[str],
                    forget_ids: Sequence[int] | None, fraction: float | None,
                    seed: int) -> dict[str, Any]:
    """A request as records and ``evaluate``'s JSON give it: type, ids, their hash, resolved
    target tasks, and whether the ids were named by the user or drawn by the tool (a random
    share: said, since a removal record must show who chose what was removed)."""
    return {"type": request_type, "instance_ids": list(request.instance_ids),
            "ids_sha256": request.ids_hash(), "target_tasks": list(targets),
            "ids_drawn": (None if forget_ids is not None else
                          {"fraction": fraction, "seed": seed})}


def _checkpoint_recipe(loaded: Any, checkpoint: str) -> Any:
    """The training recipe a checkpoint recorded (retraining's), checked before any work: a
    recipe that is no mapping, or holds a field TrainConfig lacks, ended the run after the
    input model was measured, in a TypeError or ValueError traceback."""
    from mtunlearn_ext.experiment import default_recipe

    stored = loaded.meta.get("recipe") or {}
    try:
        if not isinstance(stored, Mapping):
            raise TypeError(f"it is a {type(stored).__name__}, not a mapping")
        return default_recipe(loaded.benchmark, int(loaded.meta["seed"]),
                              {k: v for k, v in stored.items() if k != "seed"})
    except (TypeError, ValueError) as error:
        raise UserInputError("--checkpoint", "a checkpoint whose recorded training recipe is "
                             "TrainConfig's fields", checkpoint, str(error)) from error


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from mtunlearn_ext._io import interrupts_held
    from mtunlearn_ext.erasure import erased_instances, refuse_erased_ids
    from mtunlearn_ext.metrics import check_retained
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.records import (
        RECORD_SCHEMA,
        code_version,
        run_environment,
        utc_now,
        write_record,
    )
    from mtunlearn_ext.training import save_checkpoint, state_dict_sha256
    from mtunlearn_ext.unlearning import UnlearningProblem, available_unlearners
    from mtunlearn_ext.lineage import REMOVALS_KEY, removal_counts, unknown_removals_hint
    from mtunlearn_ext.workflow import (
        CLI_META_FORMAT,
        UNKNOWN_METHOD_HINT,
        KeptMetricsError,
        OutputTransaction,
        TEST_FILES_KEY,
        TRAIN_FILES_KEY,
        build_user_request,
        check_device,
        check_forget_left,
        checked_unlearner,
        exclude_removed,
        lineage_removals,
        load_model,
        measure,
        parse_ids,
        parse_tasks,
        removal_entry,
        restrict_retain,
        run_unlearning,
        without_removed,
    )

    started = utc_now()
    code = code_version()  # the code this run imported and runs: read before the work
    device = check_device(args.device)
    _check_seed(args.seed)
    if args.method not in available_unlearners():  # before it names the output files
        raise UserInputError("--method", f"one of {available_unlearners()}", args.method,
                             UNKNOWN_METHOD_HINT)
    checkpoint = Path(args.checkpoint)
    settings = _json_arg(args.method_config, "--method-config")
    # Their types and ranges, before the model is loaded and measured (minutes on a large one);
    # what the settings need of the request is checked once it is built.
    checked_unlearner(args.method, settings)
    forget_ids = parse_ids(args.forget_ids, "--forget-ids")
    retain_ids = parse_ids(args.retain_ids, "--retain-ids")
    target_tasks = parse_tasks(args.target_tasks)
    fraction = _forget_fraction(args.forget_fraction, forget_ids, default=0.1)
    with OutputTransaction(inputs=[checkpoint]) as tx:
        default_ckpt, default_rec = _default_outputs(checkpoint, args.method)
        out_ckpt = tx.reserve("--output", args.output or default_ckpt)
        # Without --record, the record is named after --output when that is given: a file
        # already there (an earlier run's) is then refused as --output's, not as a --record.
        out_rec = tx.reserve("--record", args.record or (
            default_rec if args.output is None else Path(str(out_ckpt) + ".record.json")),
            default_of="--output" if args.record is None and args.output else None)
        loaded = load_model(checkpoint, data_root=args.data_root)
        # What earlier requests of this checkpoint's lineage removed stays removed: out of the
        # retain set (and so out of retraining). Unknown removals (an older unlearned
        # checkpoint keeps only their hash) are refused unless --retain-ids names the retain
        # set itself.
        earlier = lineage_removals(loaded.meta)
        if earlier is None:
            if retain_ids is None:
                raise UserInputError("--checkpoint", "a checkpoint whose earlier removals are "
                                     "known (an original, or one unlearned by this version)",
                                     str(checkpoint), unknown_removals_hint(loaded.meta))
            _say(f"mtunlearn: warning: {checkpoint} is an unlearned checkpoint whose earlier "
                 "removals are not known (only their hash is kept): the retain set is "
                 "--retain-ids as given, which must leave the ids forgotten before out",
                 file=sys.stderr)
        bench, seed = loaded.benchmark, int(args.seed if args.seed is not None
                                            else loaded.meta["seed"])
        train_set = bench.train
        refuse_erased_ids(bench, forget_ids, target_tasks)
        refuse_erased_ids(bench, retain_ids, None, "--retain-ids")
        # The pairs the lineage removed are not forgotten again (nor drawn by
        # --forget-fraction): only what is left of the request is.
        remaining = without_removed(train_set, earlier or [])
        request, request_type = build_user_request(
            remaining, forget_ids=forget_ids, forget_fraction=fraction,
            target_tasks=target_tasks, request_type=args.request, seed=seed)
        if forget_ids is None:  # a data-removal tool must not choose what to remove silently
            assert fraction is not None  # the default where no ids are named
            _say(f"mtunlearn: no --forget-ids: forgetting a random "
                 f"{100 * float(fraction):g}% of the training instances "
                 f"(--forget-fraction {fraction:g}, seed {seed}): "
                 f"{len(request.instance_ids)} instances", file=sys.stderr)
        already = check_forget_left(train_set, remaining, request, "--forget-ids"
                                    if forget_ids is not None else "--forget-fraction")
        forget, _ = request.split(remaining)
        if already:
            _say(f"mtunlearn: earlier requests of the checkpoint's lineage already removed "
                 f"pairs of {len(already)} of the ids named ({_ids_text(already)}): only the "
                 f"other {int(forget.supervision.sum())} pairs are forgotten", file=sys.stderr)
        # The retain split as before; exclude_removed takes the earlier removals out of it.
        _, retain = request.split(train_set)
        retain = restrict_retain(retain, request, retain_ids, train_set)
        retain, excluded = exclude_removed(retain, earlier or [], retain_ids)
        if earlier:
            entirely, partly = removal_counts(train_set, earlier)
            partly_text = (f" and the target-task labels of {partly} other(s)" if partly
                           else "")
            _say(f"mtunlearn: {len(earlier)} earlier request(s) of the checkpoint's lineage "
                 f"removed {entirely} instance(s) entirely{partly_text}: those pairs stay "
                 f"removed ({excluded} kept out of the retain set)", file=sys.stderr)
        targets = request.resolved_tasks(train_set)
        recipe = _checkpoint_recipe(loaded, args.checkpoint)
        if later := _later_in_chain(checkpoint, args.method):  # said once the inputs passed
            _say(f"mtunlearn: warning: {_shown(later[0])} exists: a request on "
                 f"{_shown(checkpoint)} was made before (a rerun, or a chain of requests from "
                 f"it, whose newest is {_shown(later[1])}); this one starts from "
                 f"{_shown(checkpoint)}, so what later requests "
                 "removed is in its retain set again; to continue the chain, unlearn from its "
                 "newest checkpoint", file=sys.stderr)
        from tqdm.auto import tqdm

        with tqdm(total=4, desc="unlearn", disable=args.quiet, leave=False) as bar:
            bar.set_postfix_str("measuring the input model")
            before = measure(loaded.model, forget, retain, bench.test, targets, seed,
                             args.eval_batch_size)
            bar.update()
            problem = UnlearningProblem(
                model=loaded.model.to(device), tasks=list(train_set.tasks), forget=forget,
                retain=retain, request=request, target_tasks=targets, device=device, seed=seed,
                train_config=recipe,
                model_factory=lambda: build_model(bench, seed=int(loaded.meta["seed"])),
                held_out=bench.validation)
            bar.set_postfix_str(f"running {visible_controls(args.method)}")
            result = run_unlearning(problem, args.method, settings)
            bar.update()
            # The input's weights as read from its file (a method may work on the loaded
            # model in place).
            input_weights = state_dict_sha256(loaded.checkpoint.state_dict)
            weights_changed = state_dict_sha256(result.model) != input_weights
            if not weights_changed:
                # A run that changed nothing (steps 0): said here, kept in the record
                # (weights_changed: false) and in the checkpoint, and `verify` does not pass it.
                bar.write(f"mtunlearn: warning: {args.method} left the weights exactly as they "
                          f"were ({result.report.steps} steps): the output model is the input "
                          "model; the record says so (weights_changed: false), verify will "
                          "not pass it, and the output's lineage does not count the request "
                          "as removed (a later request may name its ids again)",
                          file=sys.stderr)
            bar.set_postfix_str("measuring the output model")
            after = measure(result.model.cpu(), forget, retain, bench.test, targets, seed,
                            args.eval_batch_size)
            retained = check_retained(before["metrics"], after["metrics"],
                                      args.retained_tolerance)
            if not retained.passed:
                if args.require_retained:
                    raise KeptMetricsError(retained)
                bar.write(f"mtunlearn: warning: {retained.summary()}; the record says so "
                          "(retained_check.passed: false); --require-retained makes this an "
                          "error (exit 4, nothing written)", file=sys.stderr)
            bar.update()
            bar.set_postfix_str("interference matrix")
            interference = _interference(problem, args.method, settings)
            bar.update()
        meta = {**{k: loaded.meta.get(k) for k in ("benchmark", "size", "seed", "recipe",
                                                   "data_sha256")},
                # Where the data were read (--data-root when they moved), so that the output is
                # used with them there.
                "data_root": loaded.data_root,
                # Absent from checkpoints written before it was recorded: not carried as null.
                **{k: loaded.meta[k] for k in ("test_data_sha256", TRAIN_FILES_KEY,
                                               TEST_FILES_KEY) if k in loaded.meta},
                "format": CLI_META_FORMAT, "kind": "unlearned", "method": args.method,
                "parent_sha256": loaded.checkpoint.sha256, "ids_sha256": request.ids_hash(),
                # The request itself, so that verify can tell a record edited to another
                # request type or other tasks from the checkpoint's own.
                "request_type": request_type, "target_tasks": list(targets),
                "parent_state_sha256": input_weights,
                # A run that changed no weight removed nothing: its ids stay requestable
                # (counted as removed, they were refused by every later request and listed
                # among the lineage's removals by the next run's record).
                REMOVALS_KEY: None if earlier is None else [
                    *earlier, *([removal_entry(request)] if weights_changed else [])]}
        # Everything the record holds but the output's hash is made before the checkpoint
        # lands (the code version runs git): what follows its rename is the record's own
        # write, the window in which a SIGKILL leaves a checkpoint without its record.
        record = {
            "schema": RECORD_SCHEMA,
            "request": {**_request_fields(request, request_type, targets, forget_ids,
                                          fraction, seed),
                        "target_tasks_arg": (None if request.target_tasks is None
                                             else list(request.target_tasks)),
                        # Sorted, as the request's ids: one retain set, one record.
                        "retain_ids": None if retain_ids is None else sorted(retain_ids),
                        "earlier_removals": earlier,
                        "num_excluded_pairs": excluded,
                        # The instances this run forgot: those named, less any whose pairs
                        # earlier requests of the lineage had all removed already.
                        "forgotten_instance_ids": sorted(int(i) for i in forget.ids.tolist()),
                        "num_forget_pairs": int(forget.supervision.sum()),
                        "num_retain_pairs": int(retain.supervision.sum())},
            "method": {"name": args.method, "settings": _resolved_settings(result.report)},
            "seed": seed, "device": str(device), "eval_batch_size": args.eval_batch_size,
            "code": code, "environment": run_environment(result.report.threads),
            "invocation": getattr(args, "invocation", None),
            "benchmark": {**{k: loaded.meta.get(k) for k in ("benchmark", "size", "seed",
                                                             "data_sha256", "test_data_sha256")},
                          # The root read; the input's own when --data-root moved it.
                          "data_root": loaded.data_root,
                          **({"input_data_root": loaded.meta.get("data_root")}
                             if loaded.data_root != loaded.meta.get("data_root") else {})},
            # Absolute paths: `verify` finds the files from any folder.
            "input": {"checkpoint": str(checkpoint.resolve()),
                      "sha256": loaded.checkpoint.sha256},
            "output": {"checkpoint": str(out_ckpt.resolve()), "sha256": None},
            "weights_changed": weights_changed,
            "before": before, "after": after,
            "retained_check": retained.to_dict(),
            "report": result.report.to_dict(),
            "interference": interference,
            "started_at": started, "finished_at": utc_now(),
        }

        record = json_safe(record)
        out_ckpt, out_rec, out_sha = _write_at_free_name(
            tx, args, checkpoint, out_ckpt, out_rec,
            lambda p: save_checkpoint(p, result.model, meta))
        record["output"] = {"checkpoint": str(out_ckpt.resolve()), "sha256": out_sha}
        # The record is the commit marker: an interrupt while it is written is held until it
        # is there and the outputs are committed (a reader saw a complete record vanish).
        with interrupts_held():
            tx.write(out_rec, lambda p: write_record(p, record))
            tx.commit()
    _say(_table(_metric_rows(before, after), ["split", "task", "metric", "before", "after"]))
    for note in _attack_notes(after):
        _say(note)
    _say(f"method {args.method}: {result.report.steps} steps, "
         f"{result.report.wall_time_s:.2f} s; {request_type} request, "
         # The instances forgotten: those named whose pairs earlier requests had all removed
         # are not (the record's report counts the same).
         f"{len(forget)} instances{_named_note(len(request.instance_ids), len(forget))}, "
         f"tasks {targets}")
    _say(_retain_note({"pairs": int(retain.supervision.sum()), "instances": len(retain),
                       "retain_ids": retain_ids, "earlier_removals_excluded": excluded}))
    _say(retained.summary() if retained.passed else f"WARNING: {retained.summary()}")
    if earlier:
        # An instance is not read at all only once its image is gone; one that lost some
        # label files only (a partial request's) is still read, for its other tasks.
        present = set(train_set.ids.tolist())
        erased_ids = erased_instances(bench)
        gone = sum(1 for i in erased_ids if i not in present)
        labels = sum(1 for i in erased_ids if i in present)
        notes = ([f"{gone} of their instances' files erased since, so not read at all"]
                 if gone else []) + ([f"some of their label files erased since ({labels} "
                                      "instance(s) still read for their other tasks)"]
                                     if labels else [])
        erased = f" ({'; '.join(notes)})" if notes else ""
        _say(f"earlier removals: {len(earlier)} request(s) of the input's lineage; their "
             f"{excluded} pairs still in the data stayed out of the retain set{erased}")
    elif earlier is None:
        _say("earlier removals: unknown (the input keeps only their hash); the retain set was "
             "--retain-ids")
    _say(f"checkpoint: {_shown(out_ckpt)} (sha256 {out_sha[:16]})\nrecord:     {_shown(out_rec)}")
    return 0


def _ids_text(ids: Sequence[int], shown: int = 10) -> str:
    """``ids [3, 4]`` for a message, the first ``shown`` of them."""
    return f"ids {list(ids[:shown])}" + (" ..." if len(ids) > shown else "")


def _retain_note(split: Mapping[str, Any]) -> str:
    """One line on the retain split the metrics were measured on: its size, and whether
    ``--retain-ids`` limited it (then the retain metrics describe those instances only)."""
    ids = split.get("retain_ids")
    size = f"{split.get('pairs')} pairs of {split.get('instances')} instances"
    excluded = split.get("earlier_removals_excluded")
    earlier = (f"; {excluded} pairs removed by earlier requests kept out"
               if isinstance(excluded, int) and excluded else "")
    return (f"retain split: {size}, limited by --retain-ids to {len(ids)} instances (the retain "
            f"metrics describe these only){earlier}" if ids is not None
            else f"retain split: {size} (every training pair outside the request{earlier})")


def _refuse_request_options(args: argparse.Namespace, task_names: Sequence[str]) -> None:
    """``evaluate`` without a request (no ``--forget-ids`` / ``--forget-fraction``) measures
    every task on train and test: ``--target-tasks``, ``--request``, ``--retain-ids`` and
    ``--seed`` (which seeds the forget draw and the attack) would be silently ignored, so they
    are refused (an
    unknown task name first, as with a request)."""
    from mtunlearn_ext.workflow import parse_tasks

    unknown = [t for t in parse_tasks(args.target_tasks) or [] if t not in task_names]
    if unknown:
        raise UserInputError("--target-tasks", f"task names among {list(task_names)}", unknown,
                             "unknown task names")
    given = [(flag, value) for flag, value in (("--target-tasks", args.target_tasks),
                                               ("--request", args.request),
                                               ("--retain-ids", args.retain_ids),
                                               ("--seed", args.seed)) if value is not None]
    if given:
        if given[0][0] == "--retain-ids" and isinstance(given[0][1], str):
            # Ids as written: a config's id list got a trailing comma (_config_path).
            given[0] = (given[0][0], given[0][1].rstrip().rstrip(","))
        names = [flag for flag, _ in given]
        flags = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        raise UserInputError(given[0][0], "--forget-ids or --forget-fraction with it",
                             given[0][1], f"without a request, {flags} "
                             f"{'has' if len(given) == 1 else 'have'} no effect (evaluate then "
                             "measures every task on train and test)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mtunlearn_ext.erasure import refuse_erased_ids
    from mtunlearn_ext.workflow import (
        OutputTransaction,
        build_user_request,
        exclude_removed,
        lineage_removals,
        load_model,
        measure,
        parse_ids,
        parse_tasks,
        restrict_retain,
    )

    _check_seed(args.seed)
    loaded = load_model(args.checkpoint, data_root=args.data_root)
    bench = loaded.benchmark
    seed = int(args.seed if args.seed is not None else loaded.meta["seed"])
    with OutputTransaction(inputs=[Path(args.checkpoint)]) as tx:
        output = tx.reserve("--output", args.output) if args.output else None
        forget_ids = parse_ids(args.forget_ids, "--forget-ids")
        _forget_fraction(args.forget_fraction, forget_ids, default=None)
        if forget_ids is None and args.forget_fraction is None:
            _refuse_request_options(args, bench.train.task_names)
            from mtunlearn_ext.metrics import evaluate

            result: dict[str, Any] = {"metrics": {
                "train": evaluate(loaded.model, bench.train, None, args.eval_batch_size),
                "test": evaluate(loaded.model, bench.test, None, args.eval_batch_size)}}
        else:
            refuse_erased_ids(bench, forget_ids, parse_tasks(args.target_tasks))
            retain_ids = parse_ids(args.retain_ids, "--retain-ids")
            refuse_erased_ids(bench, retain_ids, None, "--retain-ids")
            request, request_type = build_user_request(
                bench.train, forget_ids=forget_ids, forget_fraction=args.forget_fraction,
                target_tasks=parse_tasks(args.target_tasks), request_type=args.request,
                seed=seed)
            forget, retain = request.split(bench.train)
            # As `unlearn` measured: limited to --retain-ids when given, and without the pairs
            # the checkpoint's lineage removed (the record's before/after of a chained request
            # are measured so).
            retain = restrict_retain(retain, request, retain_ids, bench.train)
            earlier = lineage_removals(loaded.meta)
            retain, excluded = exclude_removed(retain, earlier or [])
            result = measure(loaded.model, forget, retain, bench.test,
                             request.resolved_tasks(bench.train), seed, args.eval_batch_size)
            result["retain_split"] = {
                "pairs": int(retain.supervision.sum()), "instances": len(retain),
                "retain_ids": None if retain_ids is None else sorted(retain_ids),
                "earlier_removals_excluded": (excluded if earlier is not None else
                                              "unknown (the checkpoint keeps only their hash)")}
            # What was measured: the attack's AUC depends on the request and the seed.
            result["request"] = _request_fields(request, request_type,
                                                request.resolved_tasks(bench.train), forget_ids,
                                                args.forget_fraction, seed)
        from mtunlearn_ext.records import run_environment

        payload = {"checkpoint": str(Path(args.checkpoint).resolve()),
                   "sha256": loaded.checkpoint.sha256,
                   # Real data: which root was measured (--data-root when they moved).
                   **({"data_root": loaded.data_root} if loaded.data_root is not None else {}),
                   **json_safe(result), "seed": seed, "eval_batch_size": args.eval_batch_size,
                   "environment": run_environment(torch.get_num_threads())}
        if output is not None:
            tx.write(output, lambda p: write_json_new(p, payload))
    # One measurement, so no "before" column (_metric_rows' fourth cell is always empty here).
    table = _table([[split, task, metric, value]
                    for split, task, metric, _, value in _metric_rows(None, payload)],
                   ["split", "task", "metric", "value"])
    for note in _attack_notes(payload):
        table += "\n" + note
    if "retain_split" in payload:
        table += "\n" + _retain_note(payload["retain_split"])
    if output is None:
        # The JSON is the output: stdout holds it alone, so that it can be piped into a JSON
        # reader; the summary table still ends the command, on stderr.
        _say(table, file=sys.stderr)
        print(json.dumps(payload, indent=1))
    else:
        _say(table)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from mtunlearn_ext.api import API_RECORD_SCHEMA
    from mtunlearn_ext.records import FORGET_ERASED_CHECK, WEIGHTS_UNCHANGED, verify_record

    if _schema_of(args.record) == API_RECORD_SCHEMA:
        if args.data_root is not None:  # nothing is re-measured, so no data are read
            raise UserInputError("--data-root", "no value for a save_unlearned record (its "
                                 "model and data are the caller's; nothing is re-measured)",
                                 args.data_root, "drop --data-root")
        return _verify_api_record(args)
    result = verify_record(args.record, args.checkpoint, tolerance=args.tolerance,
                           data_root=args.data_root)
    shown = sys.stderr if args.json else sys.stdout
    _say(_table([[check, outcome] for check, outcome in result.checks.items()],
                ["check", "result"]), file=shown)
    for m in result.mismatches:
        _say(f"mismatch: {m}", file=sys.stderr)
    if args.data_root is not None:
        root = Path(args.data_root).expanduser().resolve()
        _say(f"data read from {_shown(root)} (--data-root; it hashes to the data the checkpoint "
             "records)", file=shown)
    if FORGET_ERASED_CHECK in result.checks:
        _say(f"note: before/after forget metrics: {result.checks[FORGET_ERASED_CHECK]}",
             file=shown)
    checked = f"{_shown(result.checkpoint)} against {_shown(args.record)}"
    if result.ok:
        _say(f"verified: {checked}: the checkpoint, the ids "
             "and the re-measured metrics agree with the record (metric tolerance "
             f"{args.tolerance:g}); this checks the files and the record, not how much was "
             "forgotten: the record's before/after metrics show that", file=shown)
    elif result.checks.get("weights") == WEIGHTS_UNCHANGED:
        _say(f"FAILED: {checked}: not verified, its weights "
             "are the input model's, so nothing was unlearned (metric tolerance "
             f"{args.tolerance:g})", file=shown)
    else:
        _say(f"FAILED: {checked} (metric tolerance "
             f"{args.tolerance:g})", file=shown)
    _print_verdict(args, result.ok, result.checkpoint, result.sha256, result.checks,
                   result.mismatches, tolerance=args.tolerance)
    return 0 if result.ok else 1


def _print_verdict(args: argparse.Namespace, ok: bool, checkpoint: str, sha256: str | None,
                   checks: Mapping[str, str], mismatches: Sequence[str],
                   tolerance: float | None) -> None:
    """With ``--json``, the outcome as one JSON object on stdout, the only thing there (the
    table and the lines went to stderr), for a CI step that needs to know which check failed
    and not only that one did (exit 1 either way). Bad input (exit 2) prints none."""
    if not args.json:
        return
    print(json.dumps({"verified": ok, "record": str(Path(args.record).resolve()),
                      "checkpoint": str(Path(checkpoint).resolve()), "sha256": sha256,
                      "checks": dict(checks), "mismatches": list(mismatches),
                      "tolerance": tolerance}, indent=1), flush=True)


def _schema_of(path: str) -> object:
    """The ``schema`` of a JSON record, or None when the file is no JSON object (verify_record
    then says what is wrong with it)."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return payload.get("schema") if isinstance(payload, dict) else None


def _named_note(named: int, forgotten: int) -> str:
    """`` (N named, ...)`` when fewer instances were forgotten than the request named."""
    if named == forgotten:
        return ""
    return f" ({named} named; the other {named - forgotten}: removed by earlier requests)"


def _verify_api_record(args: argparse.Namespace) -> int:
    """A record of mtunlearn_ext.save_unlearned: its model and data are the caller's, which the
    command cannot rebuild, so the files are checked (hashes) and nothing is re-measured."""
    from mtunlearn_ext.api import verify_saved
    from mtunlearn_ext.records import WEIGHTS_UNCHANGED

    try:
        result = verify_saved(args.record, checkpoint=args.checkpoint)
    except FileNotFoundError as error:
        if args.checkpoint:
            raise UserInputError("--checkpoint", "an existing checkpoint file",
                                 args.checkpoint) from error
        raise UserInputError("--record", "a record whose checkpoint exists", args.record,
                             str(error)) from error
    except ValueError as error:
        raise UserInputError("--record", "a readable save_unlearned record", args.record,
                             str(error)) from error
    rows = [[check, outcome] for check, outcome in result.checks.items()]
    rows.append(["metrics", "not measured (a save_unlearned record: the model and data are "
                            "the caller's; re-measure them with your code)"])
    shown = sys.stderr if args.json else sys.stdout
    _say(_table(rows, ["check", "result"]), file=shown)
    for m in result.mismatches:
        _say(f"mismatch: {m}", file=sys.stderr)
    unchanged = (", not verified, its weights are the original model's, so nothing was "
                 "unlearned" if result.checks.get("weights_changed") == WEIGHTS_UNCHANGED
                 else ", not verified, its parameters are the original model's (only buffers "
                      "changed), so the request's supervision was not removed"
                 if result.checks.get("parameters_changed") == WEIGHTS_UNCHANGED else "")
    _say(f"{'verified' if result.ok else 'FAILED'}: {_shown(result.checkpoint)} against "
         f"{_shown(args.record)} (files and hashes only){unchanged}", file=shown)
    # No tolerance (nothing was measured) and no hash of the checkpoint's bytes (the checks
    # name the file's outcome).
    _print_verdict(args, result.ok, result.checkpoint, None, result.checks,
                   result.mismatches, tolerance=None)
    return 0 if result.ok else 1


def _cmd_benchmark(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    compare = root / "benchmarks" / "compare.py"
    # An installed package's parent is site-packages, where another distribution may have put
    # a top-level benchmarks/ of its own: only a folder with our setup.py is our checkout.
    checkout = (root / "setup.py").is_file() and compare.is_file()
    if checkout and not args.showcase:
        # --quiet hid nothing: compare.py drew its bar over the cases all the same. The
        # showcase draws none, so it needs no flag.
        quiet = ["--no-progress"] if args.quiet else []
        command = [sys.executable, str(compare), "--quick", *quiet, *args.extra]
    else:
        command = [sys.executable, "-m", "mtunlearn_ext.showcase", *args.extra]
    # --threads set this process's count only, so the benchmark ran at torch's default (every
    # core) while the command line said otherwise. The child reads OMP_NUM_THREADS as its
    # intra-op default (the showcase has no flag of its own); the extra arguments, given
    # after it, still win (compare.py's `--threads`).
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    shown = " ".join([*(f"{name}={value}" for name, value in threads.items()), *command])
    if args.dry_run:
        _say("would run: " + shown, flush=True)
        return 0
    _say("running: " + shown, flush=True)
    # compare.py runs from the checkout; the showcase where the user is (not site-packages).
    return subprocess.run(command, cwd=root if checkout else None, check=False,
                          env={**os.environ, **threads}).returncode


def _cmd_report(args: argparse.Namespace) -> int:
    from mtunlearn_ext.report import write_report

    source = Path(args.results)
    try:
        results = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError("--results", "a readable JSON results file or record", str(source),
                             str(error)) from error
    except ValueError as error:  # an integer past Python's 4300 digits (not a JSONDecodeError)
        raise UserInputError("--results", "a readable JSON results file or record", str(source),
                             without_digit_limit_advice(error)) from None
    except RecursionError:
        raise UserInputError("--results", "a readable JSON results file or record", str(source),
                             "nested too deeply to read") from None
    # write_report registers its files as written in full (COMMITTED_OUTPUTS) as report.md
    # lands: an interrupt from then on finds them complete.
    written = write_report(results, Path(args.output_dir), title=args.title or source.name)
    _say(_table([[str(p), p.stat().st_size] for p in written], ["file", "bytes"]))
    return 0


# -- the parser ---------------------------------------------------------------------------------


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


def _forget_fraction(given: float | None, forget_ids: object, *, default: float | None
                     ) -> float | None:
    """``--forget-fraction`` as the run uses it: refused beside ``--forget-ids`` (which name
    the instances: a fraction there was ignored, silently), else as given or ``default``."""

    if given is not None and forget_ids is not None:
        raise UserInputError("--forget-fraction", "no share of instances to draw when "
                             "--forget-ids names them", given,
                             "give one of --forget-ids and --forget-fraction")
    return default if given is None and forget_ids is None else given


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


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: exit 130 with the "interrupted" line (documented)."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Turned into an exception so that the output transaction deletes what it created.
    raise _Terminated(signal.Signals(signum).name)


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


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    # The package's own categories are shown as the standard ones they extend, as before
    # they existed: users read "warning (RuntimeWarning)", not the class's name.
    shown = (RuntimeWarning if issubclass(category, MtUnlearnRuntimeWarning)
             else UserWarning if issubclass(category, MtUnlearnWarning) else category)
    kind = "" if shown is UserWarning else f" ({shown.__name__})"
    _say(f"mtunlearn: warning{kind}: {message}", file=sys.stderr if file is None else file)


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
            _say(f"mtunlearn: internal error ({type(error).__name__}); exit "
                 f"{EXIT_INTERNAL_ERROR}, not verify's 1: please report the traceback above",
                 file=sys.stderr)
            code = EXIT_INTERNAL_ERROR
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread: nothing to ignore from here
            pass
    return code


if __name__ == "__main__":
    raise SystemExit(console_main())
