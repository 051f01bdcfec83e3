"""Atomic writers: whole files or none, and the permissions a plain ``open(path, "w")`` gives
(``mkstemp``'s owner-only temporary file used to leave every checkpoint, record and report
unreadable to the user's group and other users)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from mtunlearn_ext._io import atomic_torch_save, temporary_file_beside, write_text_atomic
from mtunlearn_ext.training import save_checkpoint
from mtunlearn_ext.workflow import write_json_new


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):  # type: ignore[no-untyped-def]
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = 0o666 & ~umask
    assert _mode(plain) == expected  # what users get from any other tool

    write_text_atomic(tmp_path / "a.json", "{}")
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
    save_checkpoint(tmp_path / "c.pt", torch.nn.Linear(2, 2))
    write_json_new(tmp_path / "d.record.json", {"k": 1})
    names = ["a.json", "b.pt", "c.pt", "d.record.json"]
    for name in names:
        assert _mode(tmp_path / name) == expected, name
    # No temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "plain.txt"])


def test_temporary_file_beside(tmp_path: Path) -> None:
    fd, name = temporary_file_beside(tmp_path / "out.bin", suffix=".part")
    os.close(fd)
    path = Path(name)
    assert path.parent == tmp_path and path.name.startswith(".out.bin.")
    assert path.name.endswith(".part")
