"""``mtunlearn`` on real data (a fake NYUv2 in LibMTL's layout): a data root whose files changed
since ``train`` is refused naming the data and the checkpoint's path, not its benchmark name."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import _err
from test_data import _write_libmtl

from mtunlearn_ext import cli


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only)."""


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A fake NYUv2 (3 train, 2 val instances) under ``data``, ``orig.pt`` trained on it, and
    ``u.pt`` with its record ``u.json``, unlearned from it (forgetting id 1)."""
    folder = tmp_path_factory.mktemp("real")
    data, orig, out, record = (folder / n for n in ("data", "orig.pt", "u.pt", "u.json"))
    _write_libmtl(data, with_normals=True)
    assert cli.main(["train", "--benchmark", "nyuv2", "--size", "tiny", "--data-root", str(data),
                     "--epochs", "1", "--output", str(orig), "--quiet"]) == 0
    assert cli.main(["unlearn", "--checkpoint", str(orig), "--forget-ids", "1",
                     "--method-config", '{"steps": 2}', "--output", str(out), "--record",
                     str(record), "--quiet"]) == 0
    return SimpleNamespace(folder=folder, data=data, orig=orig, out=out, record=record)


@contextmanager
def _restored(data: Path) -> Iterator[Path]:
    """``data`` as it was once the block ends, whatever the block changed in it."""
    backup = data.with_name(data.name + ".backup")
    shutil.copytree(data, backup, symlinks=True)
    try:
        yield data
    finally:
        shutil.rmtree(data)
        backup.rename(data)


def _edit_image(path: Path) -> None:
    np.save(path, np.full_like(np.load(path), 0.9))  # the fake images are random, never 0.9


def test_verify_on_changed_data_names_the_checkpoint_path(
        real: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    """It said "its output.checkpoint nyuv2 is not a checkpoint trained on ...": the benchmark's
    name where the checkpoint's path belongs."""
    with _restored(real.data):
        _edit_image(real.data / "train" / "image" / "2.npy")
        assert cli.main(["verify", "--record", str(real.record), "--quiet"]) == 2
        err = _err(capsys)
    assert err.startswith(
        f"mtunlearn: error: --record: expected a record whose output checkpoint can be loaded, "
        f"got '{real.record}'; its output.checkpoint '{real.out}' is not a checkpoint trained "
        f"on the data now under {real.data}: its training data had SHA-256 "), err
    assert "'nyuv2'" not in err
    assert cli.main(["verify", "--record", str(real.record), "--quiet"]) == 0
