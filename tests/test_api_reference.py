"""docs/api.md kept honest against the code: every name a public ``__all__`` exports is in its
module's section, every function or class with a readable signature has one written there,
every written signature has the real parameters (names, kinds, order, defaults), every
example marked ``python run`` runs, and every relative link leads to a file."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import mtunlearn_ext

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"

# `ops` is loaded with the package, so it is not among the lazily imported submodules.
_PACKAGES = ["mtunlearn_ext", "mtunlearn_ext.ops",
             *(f"mtunlearn_ext.{name}" for name in mtunlearn_ext._SUBMODULES),
             "mtunlearn_ext.unlearning.baselines"]

_MODULE_HEADING = re.compile(r"^#+ `(mtunlearn_ext(?:\.\w+)*)`\s*$")
# A signature opens a heading or a table row: `name(params)`, `Class.method(params)`.
_SIGNATURE = re.compile(r"^(?:#+ |\| )`([A-Za-z_][\w.]*)\((.*?)\)`")
_RUNNABLE = re.compile(r"^```python run\n(.*?)^```", flags=re.S | re.M)
_LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


@dataclass(frozen=True)
class _Written:
    module: str
    name: str
    params: str
    line: int

    def __str__(self) -> str:
        return f"docs/api.md:{self.line} {self.module}.{self.name}({self.params})"


def _sections() -> tuple[dict[str, str], list[_Written]]:
    """Module -> the text of its sections; every signature written, with its module."""
    text_of: dict[str, list[str]] = {}
    written: list[_Written] = []
    module = None
    in_code = False
    for number, line in enumerate(DOC.read_text().splitlines(), start=1):
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        heading = _MODULE_HEADING.match(line)
        if heading:
            module = heading.group(1)
            text_of.setdefault(module, [])
            continue
        if module is None:
            continue
        text_of[module].append(line)
        signature = _SIGNATURE.match(line)
        if signature:
            written.append(_Written(module, signature.group(1), signature.group(2), number))
    return {name: "\n".join(lines) for name, lines in text_of.items()}, written


_SECTION_TEXT, _WRITTEN = _sections()


def _exported() -> list[tuple[str, str]]:
    return [(package, name) for package in _PACKAGES
            for name in getattr(importlib.import_module(package), "__all__", [])]


def _resolve(written: _Written) -> Any:
    value: Any = importlib.import_module(written.module)
    for part in written.name.split("."):
        value = getattr(value, part)
    return value


def _readable_signature(value: object) -> inspect.Signature | None:
    """The signature a reader is owed, or None: aliases and constants have none, nor do a
    Protocol (no constructor of its own) and a class inspect cannot read (a TypedDict)."""
    if not (inspect.isfunction(value) or inspect.isclass(value)):
        return None
    if getattr(value, "_is_protocol", False):
        return None
    try:
        return inspect.signature(value)
    except (TypeError, ValueError):
        return None


_MISSING = object()


def _literal(node: ast.expr) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


#: A parameter as the checks compare it: its name, its kind's name
#: (``"KEYWORD_ONLY"``, ...) and its default (``_MISSING`` for none).
_Param = tuple[str, str, object]


def _parse_written(params: str) -> list[_Param]:
    function = ast.parse(f"def _written({params}): pass").body[0]
    assert isinstance(function, ast.FunctionDef)
    arguments = function.args
    positional = [*arguments.posonlyargs, *arguments.args]
    defaults = [_MISSING] * (len(positional) - len(arguments.defaults)) + [
        _literal(node) for node in arguments.defaults]
    parsed: list[_Param] = []
    for index, (arg, default) in enumerate(zip(positional, defaults)):
        is_positional_only = index < len(arguments.posonlyargs)
        parsed.append((arg.arg, "POSITIONAL_ONLY" if is_positional_only
                       else "POSITIONAL_OR_KEYWORD", default))
    if arguments.vararg:
        parsed.append((arguments.vararg.arg, "VAR_POSITIONAL", _MISSING))
    for arg, node in zip(arguments.kwonlyargs, arguments.kw_defaults):
        parsed.append((arg.arg, "KEYWORD_ONLY", _MISSING if node is None else _literal(node)))
    if arguments.kwarg:
        parsed.append((arguments.kwarg.arg, "VAR_KEYWORD", _MISSING))
    return parsed


def _real(value: Any) -> list[_Param]:
    """The real parameters; a dataclass field's factory stands for what it makes. A private
    parameter with a default (a dataclass's bookkeeping field) is no part of the interface."""
    factories = ({field.name: field.default_factory for field in dataclasses.fields(value)}
                 if inspect.isclass(value) and dataclasses.is_dataclass(value) else {})
    real: list[_Param] = []
    for parameter in inspect.signature(value).parameters.values():
        default: object = parameter.default
        if default is inspect.Parameter.empty:
            default = _MISSING
        elif default is dataclasses._HAS_DEFAULT_FACTORY:  # type: ignore[attr-defined]
            default = factories[parameter.name]()  # type: ignore[operator]
        if parameter.name.startswith("_") and default is not _MISSING:
            continue
        real.append((parameter.name, parameter.kind.name, default))
    return real


def _same_default(written: object, real: object) -> bool:
    if written is _MISSING or real is _MISSING:
        return written is real
    if isinstance(written, str) and not isinstance(real, str) and written == repr(real):
        return True  # a default no literal spells (an object): written as its repr
    return type(written) is type(real) and written == real  # True is no 1, 1.0 no 1


def test_the_reference_parses_into_module_sections() -> None:
    """Guards the checks below: a reformatted page must not silently check nothing."""
    exporting = {package for package in _PACKAGES
                 if hasattr(importlib.import_module(package), "__all__")}
    assert exporting <= set(_SECTION_TEXT), exporting - set(_SECTION_TEXT)
    assert len(_WRITTEN) >= 200, len(_WRITTEN)
    assert len(_RUNNABLE.findall(DOC.read_text())) >= 5


@pytest.mark.parametrize("package,name", _exported(), ids=lambda part: str(part))
def test_every_exported_name_is_in_its_modules_section(package: str, name: str) -> None:
    section = _SECTION_TEXT.get(package)
    assert section is not None, f"docs/api.md has no section headed `{package}`"
    assert re.search(rf"`{re.escape(name)}[`(]", section), (
        f"{package}.{name} is exported but not in docs/api.md's `{package}` section")


@pytest.mark.parametrize("package,name", _exported(), ids=lambda part: str(part))
def test_every_exported_callable_has_its_signature_written(package: str, name: str) -> None:
    value = getattr(importlib.import_module(package), name)
    if _readable_signature(value) is None:
        return
    assert any(entry.module == package and entry.name == name for entry in _WRITTEN), (
        f"docs/api.md's `{package}` section writes no `{name}(...)` signature")


@pytest.mark.parametrize("written", _WRITTEN, ids=str)
def test_every_written_signature_is_the_real_one(written: _Written) -> None:
    value = _resolve(written)
    documented = _parse_written(written.params)
    real = _real(value)
    names_and_kinds = [(name, kind) for name, kind, _ in real]
    assert [(name, kind) for name, kind, _ in documented] == names_and_kinds, (
        f"{written}: the code has {inspect.signature(value)}")
    for (name, _, doc_default), (_, _, real_default) in zip(documented, real):
        assert _same_default(doc_default, real_default), (
            f"{written}: default of {name} written {doc_default!r}, the code's is "
            f"{real_default!r}")


@pytest.mark.parametrize("index", range(len(_RUNNABLE.findall(DOC.read_text()))))
def test_every_runnable_example_runs(index: int, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    match = list(_RUNNABLE.finditer(DOC.read_text()))[index]
    line = DOC.read_text()[:match.start()].count("\n") + 2
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    code = compile(match.group(1), f"docs/api.md:{line}", "exec")
    exec(code, {"__name__": f"api_md_example_{index}"})  # noqa: S102


def _prose() -> str:
    """The page without its code (a fenced block's `d["x"](y)` is no link)."""
    text = re.sub(r"^```.*?^```", "", DOC.read_text(), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but '-' and '_' dropped,
    spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_leads_to_a_file_or_a_heading() -> None:
    anchors = {_anchor(line.lstrip("#")) for line in DOC.read_text().splitlines()
               if line.startswith("#")}
    links = _LINK.findall(_prose())
    assert links, "the page links the other docs"
    for target, anchor in links:
        if "://" in target:
            continue
        if target:
            assert (DOC.parent / target).exists(), f"docs/api.md links {target}, which is missing"
        elif anchor:
            assert anchor in anchors, f"docs/api.md links #{anchor}, which no heading has"
