"""``--config file.yaml|file.toml``: reading the file (YAML with plain decimal integers, no
key written twice and no alias expansion beyond a bound; TOML), and making its values the
defaults of a command's parser, each through the option's own parsing, relative paths taken
from the file's folder, and a null refused where it would choose something
(``forget_ids``)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtunlearn_ext._errors import UserInputError


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
