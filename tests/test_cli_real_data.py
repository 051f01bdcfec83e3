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
from cli_helpers import _err, _train
from test_data import _write_libmtl

from mtunlearn_ext import cli
from mtunlearn_ext.training import meta_sha256


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
        f"on the data now under {real.data}: its training data differ from the files "
        f"recorded at training: train/image/2.npy edited (files added, removed, renumbered or "
        f"edited): instance ids name files by number"), err
    assert "'nyuv2'" not in err
    assert cli.main(["verify", "--record", str(real.record), "--quiet"]) == 0


@pytest.mark.parametrize("change", ["edit", "add", "remove"])
def test_a_changed_test_split_is_refused_naming_val(
        real: SimpleNamespace, change: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Only the training split was hashed: after val/image/0.npy was edited, or a val instance
    added, `unlearn` exited 0 measuring the test metrics and the attack's AUC on the changed
    data, and `verify` exited 1 with 20 metric mismatches and no word on the data."""
    out, record = tmp_path / "u2.pt", tmp_path / "u2.json"
    with _restored(real.data):
        if change == "edit":
            _edit_image(real.data / "val" / "image" / "0.npy")
        elif change == "add":
            for folder in (real.data / "val").iterdir():
                shutil.copy(folder / "0.npy", folder / "2.npy")
        else:  # mutation review: a removed file was named as edited, and nothing noticed
            for folder in (real.data / "val").iterdir():
                (folder / "1.npy").unlink()
        for argv in (["unlearn", "--checkpoint", str(real.orig), "--forget-ids", "1",
                      "--method-config", '{"steps": 2}', "--output", str(out), "--record",
                      str(record)],
                     ["evaluate", "--checkpoint", str(real.out), "--output",
                      str(tmp_path / "e.json")],
                     ["verify", "--record", str(real.record)]):
            assert cli.main([*argv, "--quiet"]) == 2, argv
            err = _err(capsys)
            changed = {"edit": "val/image/0.npy edited",
                       "add": "val/depth/2.npy added, val/image/2.npy added, val/label/2.npy "
                              "added (and 1 more)",
                       "remove": "val/depth/1.npy missing, val/image/1.npy missing, "
                                 "val/label/1.npy missing (and 1 more)"}[change]
            assert (f" its test data (val/) differ from the files recorded at training: "
                    f"{changed} (files added, removed, renumbered or edited): the test metrics "
                    "and the attack's AUC would be measured on other data than the "
                    "checkpoint's; restore the data or train again") in err, err
        assert not out.exists() and not record.exists() and not (tmp_path / "e.json").exists()
    assert cli.main(["verify", "--record", str(real.record), "--quiet"]) == 0


def test_checkpoints_without_a_test_data_hash_keep_working(
        real: SimpleNamespace, tmp_path: Path) -> None:
    """A checkpoint written before the test split was hashed (no test_data_sha256, no
    test_files_sha256) is read as before: its training data is checked, its test split is
    not."""
    import torch

    from mtunlearn_ext.training import load_checkpoint

    loaded = load_checkpoint(real.orig)
    assert isinstance(loaded.meta.get("test_data_sha256"), str)
    assert load_checkpoint(real.out).meta["test_data_sha256"] == loaded.meta["test_data_sha256"]
    record = __import__("json").loads(real.record.read_text())
    assert record["benchmark"]["test_data_sha256"] == loaded.meta["test_data_sha256"]
    payload = torch.load(real.orig, weights_only=True)
    older = tmp_path / "older.pt"
    del payload["meta"]["test_data_sha256"], payload["meta"]["test_files_sha256"]
    del payload["meta_sha256"]  # nor the metadata's hash
    torch.save(payload, older)
    with _restored(real.data):
        _edit_image(real.data / "val" / "image" / "0.npy")
        assert cli.main(["evaluate", "--checkpoint", str(older), "--output",
                         str(tmp_path / "e.json"), "--quiet"]) == 0


def test_the_same_files_read_at_another_thread_count_or_cpu_are_accepted(
        real: SimpleNamespace, tmp_path: Path) -> None:
    """The data were checked by the hash of the tensors read from the files, whose last bits
    follow the thread count and the CPU (the resampling: 23,620 of 124,416 input values moved
    between 1 and 2 threads): `train --threads 1`, then `evaluate` at the default count was
    refused as edited data. The files' digests decide now; stand-in tensor hashes (as another
    machine would have recorded) are not looked at."""
    import torch

    payload = torch.load(real.orig, weights_only=True)
    payload["meta"]["data_sha256"] = payload["meta"]["test_data_sha256"] = "0" * 64
    payload["meta_sha256"] = meta_sha256(payload["meta"])  # written so on that machine
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save(payload, elsewhere)
    assert cli.main(["evaluate", "--checkpoint", str(elsewhere), "--output",
                     str(tmp_path / "e.json"), "--quiet"]) == 0


def test_moved_data_are_found_with_data_root_when_they_hash_alike(
        real: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data_root` is stored absolute and unlearn / evaluate / verify took no --data-root: after
    the data folder moved, every command exited 2 with no way back but recreating the path.
    The new root is accepted when its data hash to the recorded ones; the outputs say which root
    was read."""
    import json

    from mtunlearn_ext.training import load_checkpoint

    moved = tmp_path / "elsewhere"
    real.data.rename(moved)
    try:
        assert cli.main(["evaluate", "--checkpoint", str(real.orig), "--quiet"]) == 2
        assert _err(capsys).endswith("; if the data moved, pass --data-root with its new folder")
        evaluated = tmp_path / "e.json"
        assert cli.main(["evaluate", "--checkpoint", str(real.orig), "--data-root", str(moved),
                         "--output", str(evaluated), "--quiet"]) == 0
        assert json.loads(evaluated.read_text())["data_root"] == str(moved.resolve())
        out, record = tmp_path / "u2.pt", tmp_path / "u2.json"
        assert cli.main(["unlearn", "--checkpoint", str(real.orig), "--forget-ids", "1",
                         "--method-config", '{"steps": 2}', "--data-root", str(moved),
                         "--output", str(out), "--record", str(record), "--quiet"]) == 0
        written = json.loads(record.read_text())["benchmark"]
        assert written["data_root"] == str(moved.resolve())
        assert written["input_data_root"] == str(real.data)
        assert load_checkpoint(out).meta["data_root"] == str(moved.resolve())
        capsys.readouterr()
        assert cli.main(["verify", "--record", str(record), "--quiet"]) == 0
        assert cli.main(["verify", "--record", str(real.record), "--data-root", str(moved),
                         "--quiet"]) == 0
        assert f"data read from {moved.resolve()} (--data-root;" in capsys.readouterr().out
        # Other data at the new root: refused naming --data-root and the split.
        for split in ("train", "val"):
            with _restored(moved):
                _edit_image(moved / split / "image" / "1.npy")
                assert cli.main(["verify", "--record", str(real.record), "--data-root",
                                 str(moved), "--quiet"]) == 2
                err = _err(capsys)
                assert err.startswith(f"mtunlearn: error: --data-root: expected a folder "
                                      f"holding the data the checkpoint was trained on "
                                      f"(recorded under {real.data}), got '{moved}'; under "
                                      f"{moved.resolve()}: its "), err
                assert (" its test data (val/) differ from the files recorded at training: "
                        "val/image/1.npy edited" if split == "val" else
                        " its training data differ from the files recorded at training: "
                        "train/image/1.npy edited") in err, err
    finally:
        moved.rename(real.data)


def test_data_root_is_refused_for_a_generated_benchmark(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orig = tmp_path / "orig.pt"
    assert _train(orig) == 0
    assert cli.main(["evaluate", "--checkpoint", str(orig), "--data-root", str(tmp_path),
                     "--quiet"]) == 2
    assert _err(capsys) == (
        f"mtunlearn: error: --data-root: expected no value for a checkpoint of a benchmark "
        f"that reads no data root (only for one trained on nyuv2 / cityscapes data), got "
        f"'{tmp_path}'; the checkpoint's benchmark 'digits' reads none; drop --data-root")
