"""What an installed package carries, and what it says about itself: the parts of a
`pip install` that the source checkout's tests would not see. scripts/check_package.sh builds
a wheel from the sdist and imports it from elsewhere (CI runs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtunlearn_ext import records

ROOT = Path(__file__).resolve().parents[1]


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
def test_the_source_checkout_records_its_own_commit() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert records.code_version()["commit"] == head


def test_the_package_marks_itself_typed_and_ships_its_sources() -> None:
    """py.typed (else mypy skips the installed package: "missing library stubs or py.typed"),
    and an sdist that holds every header and CUDA source a build from it needs."""
    assert (ROOT / "mtunlearn_ext" / "py.typed").is_file()
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert "graft" in manifest and "csrc" in manifest
