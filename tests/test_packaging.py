"""What an installed package carries, and what it says about itself: the parts of a
`pip install` that the source checkout's tests would not see. scripts/check_package.sh builds
a wheel from the sdist and imports it from elsewhere (CI runs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from mtunlearn_ext import records

ROOT = Path(__file__).resolve().parents[1]
#: What no distribution carries: build products (the global-exclude of MANIFEST.in).
BUILT_SUFFIXES = (".so", ".o", ".pyc")


def _copy_package(into: Path) -> Path:
    """The package's Python files under ``into`` (as an install lays them out), without the
    compiled library: enough for records.code_version."""
    shutil.copytree(ROOT / "mtunlearn_ext", into / "mtunlearn_ext",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return into


def _code_version_of(tree: Path) -> dict[str, object]:
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
              "from mtunlearn_ext import records; print(json.dumps(records.code_version()))")
    proc = subprocess.run([sys.executable, "-c", script, str(tree)], capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make the user's repo")
def test_an_install_inside_another_repository_records_no_commit(tmp_path: Path) -> None:
    """A package installed into a virtual environment inside the user's own git project
    recorded that project's commit and dirty state as the library's version."""
    project = tmp_path / "userproj"
    site = project / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    (project / "notes.txt").write_text("x")
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a"]
    for args in (["init", "-q"], ["add", "notes.txt"], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *args], cwd=project, check=True, capture_output=True)
    (project / "notes.txt").write_text("changed")  # the user's tree is dirty
    version = _code_version_of(_copy_package(site))
    assert version["commit"] is None and version["dirty"] is None, version


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="runs from a git checkout")
def test_the_source_checkout_records_its_own_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read afresh: the process's reading (once per process) may predate a commit made while
    # the suite ran.
    monkeypatch.setattr(records, "_CODE_VERSION", None)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert records.code_version()["commit"] == head


def test_the_package_marks_itself_typed_and_ships_its_sources() -> None:
    """py.typed (else mypy skips the installed package: "missing library stubs or py.typed"),
    and an sdist that holds every header and CUDA source a build from it needs."""
    assert (ROOT / "mtunlearn_ext" / "py.typed").is_file()
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert "graft" in manifest and "csrc" in manifest


@dataclass(frozen=True)
class Declared:
    """What setup.py declares: file paths relative to the distribution's root."""

    sdist: set[str]
    wheel: set[str]  # the package files build_py lays out (no compiled library)
    metadata: str  # PKG-INFO


@pytest.fixture(scope="module")
def declared(tmp_path_factory: pytest.TempPathFactory) -> Declared:
    """The sdist's files, the wheel's package files (setup.py's build_py: its packages and
    package data, without compiling) and the metadata.
    MTUNLEARN_METADATA_ONLY=1: the sdist must carry the C++ sources through MANIFEST.in, not
    through the extension that setup.py declares on this machine. The egg-info goes to the
    temporary folder, not the checkout."""
    out = tmp_path_factory.mktemp("declared")
    env = {**os.environ, "MTUNLEARN_METADATA_ONLY": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out),
                    "sdist", "--dist-dir", str(out), "build_py", "--build-lib", str(out / "lib")],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    with tarfile.open(next(out.glob("mtunlearn_ext-*.tar.gz"))) as sdist:
        sdist_files = {name.split("/", 1)[1] for name in sdist.getnames()
                       if "/" in name and sdist.getmember(name).isfile()}
    wheel_files = {path.relative_to(out / "lib").as_posix()
                   for path in (out / "lib").rglob("*") if path.is_file()}
    metadata = (out / "mtunlearn_ext.egg-info" / "PKG-INFO").read_text(encoding="utf-8")
    return Declared(sdist=sdist_files, wheel=wheel_files, metadata=metadata)


def _checkout_files(folder: str) -> set[str]:
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
            and not path.name.endswith(BUILT_SUFFIXES)}


def test_the_sdist_carries_what_a_build_needs_and_no_partial_test_suite(
        declared: Declared) -> None:
    """setuptools adds tests/test*.py to every sdist: 79 test files went out without
    tests/conftest.py, the helpers half of them import or the benchmarks/ and scripts/ they
    run."""
    sdist = declared.sdist
    needed = (_checkout_files("csrc") | _checkout_files("mtunlearn_ext") | _checkout_files("docs")
              | _checkout_files("cmake")
              | {"setup.py", "MANIFEST.in", "CMakeLists.txt", "README.md", "requirements.txt",
                 "tests/cpp/consumer_check.cpp"})
    assert not needed - sdist, f"missing from the sdist: {sorted(needed - sdist)}"
    assert not [name for name in sdist if name.startswith("tests/") and name.endswith(".py")]
    assert not [name for name in sdist if name.endswith(BUILT_SUFFIXES)]


def test_the_wheel_carries_every_package_file_and_nothing_else(
        declared: Declared) -> None:
    """Every file of the package (its modules, py.typed, any data it reads) is declared to the
    build: a data file missing from package_data, or a folder without __init__.py, would be
    left out of the wheel while every test run from the checkout still found it."""
    package = _checkout_files("mtunlearn_ext")
    wheel = declared.wheel
    assert wheel == package, (f"left out of the wheel: {sorted(package - wheel)}; "
                              f"not in the package: {sorted(wheel - package)}")


def test_the_version_is_written_once(tmp_path: Path) -> None:
    """setup.py carried its own "0.1.0" beside the package's: a release that bumped one gave a
    wheel whose metadata (``pip list``, importlib.metadata) disagreed with ``__version__``."""
    copy = _copy_package(tmp_path)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, copy)
    (copy / "mtunlearn_ext" / "_version.py").write_text('__version__ = "9.8.7"\n')
    env = {**os.environ, "MTUNLEARN_METADATA_ONLY": "1", "MTUNLEARN_REQUIRE_EXTENSION": "0",
           "PYTHONPATH": str(copy)}
    declared = subprocess.run([sys.executable, "setup.py", "--version"], cwd=copy, env=env,
                              capture_output=True, text=True, check=True, timeout=300)
    script = ("import warnings; warnings.simplefilter('ignore'); import mtunlearn_ext; "
              "print(mtunlearn_ext.__version__, mtunlearn_ext.build_info()['package_version'])")
    imported = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env,
                              capture_output=True, text=True, check=True, timeout=300)
    assert declared.stdout.split()[-1] == "9.8.7", declared.stdout
    assert imported.stdout.split() == ["9.8.7", "9.8.7"], imported.stdout


def test_build_info_names_the_package_version() -> None:
    import mtunlearn_ext

    assert mtunlearn_ext.build_info()["package_version"] == mtunlearn_ext.__version__


def test_a_build_without_torch_names_the_flag_of_each_build_front_end() -> None:
    """pip and ``python -m build`` build in an isolated environment, without the user's torch;
    the refusal named only pip's ``--no-build-isolation``, not ``python -m build``'s flag.
    (``-S``: no site-packages, as in that isolated environment.)"""
    run = subprocess.run([sys.executable, "-S", "setup.py", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    message = run.stderr.strip()
    assert message.startswith("mtunlearn_ext: the build needs the torch it will run with"), message
    for command in ("pip install --no-build-isolation .", "python -m build --no-isolation"):
        assert command in message, message


def test_an_installed_benchmark_command_runs_no_other_distributions_script(
        tmp_path: Path) -> None:
    """``mtunlearn benchmark`` looked for benchmarks/compare.py beside the package, which for an
    installed package is site-packages: a top-level benchmarks/ another distribution put there
    was run, from site-packages as the working folder."""
    site = _copy_package(tmp_path / "site")
    (site / "benchmarks").mkdir()
    (site / "benchmarks" / "compare.py").write_text("raise SystemExit('not ours')\n")
    where = tmp_path / "user"
    where.mkdir()
    script = ("import subprocess, sys, warnings; warnings.simplefilter('ignore'); "
              "sys.path.insert(0, sys.argv[1]); from mtunlearn_ext import cli; "
              "subprocess.run = lambda command, cwd, check, env: print('cwd', cwd) or "
              "subprocess.CompletedProcess(command, 0); "
              "assert cli.main(['benchmark', '--dry-run']) == 0; "
              "assert cli.main(['benchmark']) == 0")
    run = subprocess.run([sys.executable, "-c", script, str(site)], cwd=where,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MTUNLEARN_REQUIRE_EXTENSION": "0"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("would run: ") and lines[0].endswith("-m mtunlearn_ext.showcase")
    assert "cwd None" in lines, lines  # the showcase runs where the user is


def test_the_metadata_carries_the_readme_as_its_description(
        declared: Declared) -> None:
    """The metadata held a one-line summary and no description: an index page (and
    ``twine check``) had nothing to show."""
    assert "Description-Content-Type: text/markdown" in declared.metadata
    assert "## Set-up: two commands" in declared.metadata
