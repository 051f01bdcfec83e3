"""The package's layers, as the README's architecture section states them: nothing imports
upward. Checked on the source (every import statement, those inside functions included, since
a lazy import is still a dependency) and on what a fresh interpreter loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtunlearn_ext"

#: Private helpers every layer may use (they import nothing but each other and ``_C``).
FOUNDATION = frozenset({"_C", "_definitions", "_elf", "_errors", "_expansion", "_extension",
                        "_fields", "_functional", "_io", "_progress", "_random", "_text",
                        "_version", "_warnings"})
#: The top: the public API, the CLI, experiments, records and reports.
TOP = frozenset({"__main__", "api", "cli", "demo", "erasure", "experiment", "lineage", "records",
                 "report", "showcase", "tuning", "workflow"})
#: Component -> the components (besides the foundation and itself) it may import.
ALLOWED: dict[str, frozenset[str]] = {
    "ops": frozenset(),
    "surgery": frozenset({"ops"}),
    "data": frozenset(),
    "losses": frozenset({"data"}),
    "models": frozenset({"data"}),
    "metrics": frozenset({"data", "losses", "models"}),
    "training": frozenset({"data", "losses", "models"}),
    "unlearning": frozenset({"ops", "surgery", "data", "losses", "models", "metrics",
                             "training"}),
}


def _component(module: str) -> str:
    """``mtunlearn_ext.surgery.hook`` -> ``surgery``; the package itself -> ``<package>``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every ``mtunlearn_ext`` module ``path`` imports, relative imports resolved and
    ``from mtunlearn_ext import ops`` read as the submodule it names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mtunlearn_ext")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mtunlearn_ext":
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                as_module = PACKAGE.parent.joinpath(*candidate.split("."))
                is_module = (as_module.is_dir() or as_module.with_suffix(".py").exists()
                             or candidate == "mtunlearn_ext._C")
                found.add(candidate if is_module else target)
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _component(_module_name(path))
        if source in TOP or source == "<package>":
            continue  # the top may use anything; the package's __init__ loads lazily
        for target in sorted(_imported_modules(path)):
            component = _component(target)
            if component == source or component in FOUNDATION:
                continue
            if source in FOUNDATION:
                problems.append(f"{path.relative_to(PACKAGE.parent)} (a private helper) imports "
                                f"{target}")
            elif component not in ALLOWED.get(source, frozenset()):
                problems.append(f"{path.relative_to(PACKAGE.parent)} ({source}) imports {target}"
                                f" ({component})")
    return problems


def test_every_component_is_placed_in_a_layer() -> None:
    """A new subpackage or top-level module must be given its place here (or the check below
    would wave its imports through)."""
    components = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                  if (p.suffix == ".py" and p.name != "__init__.py")
                  or (p.is_dir() and (p / "__init__.py").exists())}
    unplaced = sorted(components - FOUNDATION - TOP - set(ALLOWED))
    assert not unplaced, f"components without a layer: {unplaced}"


def test_nothing_imports_upward() -> None:
    assert _violations() == []


def _top_cycles() -> list[list[str]]:
    """The import cycles among the top's components (lazy imports included), each once."""
    edges: dict[str, set[str]] = {c: set() for c in TOP}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _component(_module_name(path))
        if source not in TOP:
            continue
        edges[source] |= {_component(t) for t in _imported_modules(path)} & TOP - {source}
    return _cycles(edges)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles of an import graph (node -> the nodes it imports), each once."""
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(edges[node]):
            if nxt == path[0]:
                if frozenset(path) not in seen:
                    seen.add(frozenset(path))
                    cycles.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle from its smallest name
                walk(nxt, [*path, nxt])

    for start in sorted(edges):
        walk(start, [start])
    return cycles


def test_the_top_has_no_import_cycle() -> None:
    """Architecture review: the top's modules imported each other in circles, hidden by lazy
    imports (experiment <-> workflow, experiment <-> records, erasure <-> workflow), since
    small shared things lived in heavy modules (the CLI's errors in workflow, the request and
    the data fingerprint in experiment, the lineage in workflow). They now live below or on
    their own, and the top is a layered order too: lineage, erasure, workflow, records,
    experiment and report, then the CLI and the demo."""
    assert _top_cycles() == []


#: The modules of the command line (``mtunlearn_ext/cli/``) that each run one command; the
#: others are the package's entry points and the helpers the commands share.
CLI_COMMANDS = frozenset({"_train", "_unlearn", "_evaluate", "_verify", "_benchmark", "_report"})


def _cli_imports() -> dict[str, set[str]]:
    """The command line's modules (``mtunlearn_ext.cli`` for its ``__init__``) -> those of them
    each imports, lazy imports included: the top's check sees the package as one component."""
    modules = {_module_name(path): path for path in sorted((PACKAGE / "cli").glob("*.py"))}
    return {name: _imported_modules(path) & set(modules) - {name}
            for name, path in modules.items()}


def _cli_problems() -> list[str]:
    """The import cycles among the command line's modules, and any command module importing
    another: each imports the shared modules (or its own), never another command's."""
    edges = _cli_imports()
    commands = {f"mtunlearn_ext.cli.{name}" for name in CLI_COMMANDS}
    return ([" -> ".join(cycle) for cycle in _cycles(edges)]
            + [f"{source} imports {target}" for source in sorted(commands & set(edges))
               for target in sorted(edges[source] & commands)])


def test_the_command_lines_modules_import_each_other_in_no_cycle() -> None:
    """Architecture review: cli.py (about 2000 lines) became a package, one module per concern
    and per command; their imports stay one-way (the entry points, the run, the parser, the
    commands, the shared helpers), which the top's check, seeing ``cli`` as one component,
    would not see."""
    edges = _cli_imports()
    names = {name.rpartition(".")[2] for name in edges}
    assert CLI_COMMANDS <= names, CLI_COMMANDS - names
    assert edges["mtunlearn_ext.cli"], edges  # the check reads the package's own imports
    assert _cli_problems() == []


def test_the_cli_check_sees_a_cycle_and_a_command_importing_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a lazy import that closes a circle inside the command line's
    package, and a command importing another, are reported."""
    fake = tmp_path / "mtunlearn_ext"
    (fake / "cli").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli" / "__init__.py").write_text("from mtunlearn_ext.cli._parser import build\n")
    (fake / "cli" / "_parser.py").write_text("from mtunlearn_ext.cli import _train\n")
    (fake / "cli" / "_console.py").write_text("")
    (fake / "cli" / "_train.py").write_text(
        "from mtunlearn_ext.cli._console import say\n"
        "def run():\n    from mtunlearn_ext.cli._parser import build\n")
    (fake / "cli" / "_unlearn.py").write_text("from ._train import run\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _cli_problems() == [
        "mtunlearn_ext.cli._parser -> mtunlearn_ext.cli._train -> mtunlearn_ext.cli._parser",
        "mtunlearn_ext.cli._unlearn imports mtunlearn_ext.cli._train"]


def test_the_check_sees_a_lazy_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """The checker itself: an import of the CLI inside a surgery function is reported."""
    fake = tmp_path / "mtunlearn_ext"
    (fake / "surgery").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("")
    (fake / "ops.py").write_text("")
    (fake / "surgery" / "__init__.py").write_text("from . import hook\n")
    (fake / "surgery" / "hook.py").write_text(
        "def step():\n    from ..cli import main\n    from mtunlearn_ext import ops\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == ["mtunlearn_ext/surgery/hook.py (surgery) imports mtunlearn_ext.cli "
                             "(cli)"]


@pytest.mark.parametrize("module, must_not_load", [
    ("mtunlearn_ext.ops", ("surgery", "unlearning", "data", "models", "metrics") + tuple(TOP)),
    ("mtunlearn_ext.surgery", ("unlearning", "data", "models", "metrics") + tuple(TOP)),
    ("mtunlearn_ext.unlearning", tuple(TOP)),
    ("mtunlearn_ext.metrics", ("unlearning", "surgery") + tuple(TOP)),
])
def test_importing_a_layer_loads_nothing_above_it(module: str,
                                                  must_not_load: tuple[str, ...]) -> None:
    script = ("import importlib, sys; importlib.import_module(sys.argv[1]); "
              "print(' '.join(sorted(m for m in sys.modules if m.startswith('mtunlearn_ext.'))))")
    proc = subprocess.run([sys.executable, "-c", script, module], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr
    loaded = {_component(m) for m in proc.stdout.split()}
    assert loaded & set(must_not_load) == set(), f"{module} loaded {loaded & set(must_not_load)}"
