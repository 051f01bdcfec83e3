"""Erasing a person's raw files after ``mtunlearn unlearn`` removed them (a fake Cityscapes in
LibMTL's layout). Deleting ``train/*/5.npy`` after forgetting id 5 made `verify`, `evaluate` and a
chained `unlearn` exit 2 (the loader refused the gap, the data hash no longer matched): a data
removal tool that breaks once the data are removed. Files removed by the checkpoint's lineage
may now be missing; anything else (a file erased without a request, a removed file blanked
instead of deleted, an image of a partial request's instance) is still refused, naming it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cli_helpers import _err
from test_cli_real_data import _restored
from test_data import _write_libmtl

from mtunlearn_ext import cli
from mtunlearn_ext.data.libmtl import TRAIN_FILES_KEY, LayoutError, load_cityscapes
from mtunlearn_ext.training import load_checkpoint

NOTE = ("before/after forget metrics: not re-measured, the forget instances' files were erased "
        "after the run")
STEPS = ["--method-config", '{"steps": 2}', "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only)."""


@pytest.fixture(scope="module")
def erasable(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A fake Cityscapes (8 train, 3 val instances) under ``cs``, ``orig.pt`` trained on it,
    ``u1.pt`` forgetting id 5 (full request) and ``p1.pt`` forgetting id 2's segmentation
    (partial), each with its record beside it."""
    folder = tmp_path_factory.mktemp("erased")
    data = folder / "cs"
    _write_libmtl(data, with_normals=False, counts=(8, 3), hw=(8, 16), num_classes=7)
    orig, u1, p1 = folder / "orig.pt", folder / "u1.pt", folder / "p1.pt"
    assert cli.main(["train", "--benchmark", "cityscapes", "--size", "tiny", "--data-root",
                     str(data), "--epochs", "1", "--output", str(orig), "--quiet"]) == 0
    assert cli.main(["unlearn", "--checkpoint", str(orig), "--forget-ids", "5", "--output",
                     str(u1), *STEPS]) == 0
    assert cli.main(["unlearn", "--checkpoint", str(orig), "--forget-ids", "2",
                     "--target-tasks", "segmentation", "--output", str(p1), *STEPS]) == 0
    return SimpleNamespace(folder=folder, data=data, orig=orig, u1=u1, p1=p1)


def _record(checkpoint: Path) -> str:
    return str(checkpoint) + ".record.json"


def _erase(data: Path, *files: str) -> None:
    for name in files:
        (data / "train" / name).unlink()


def _instance(i: int) -> list[str]:
    return [f"{folder}/{i}.npy" for folder in ("image", "label", "depth")]


def test_train_records_every_training_file_digest_and_unlearn_carries_it(
        erasable: SimpleNamespace) -> None:
    files = load_checkpoint(erasable.orig).meta[TRAIN_FILES_KEY]
    assert sorted(files) == sorted(f for i in range(8) for f in _instance(i))
    assert all(isinstance(v, str) and len(v) == 64 for v in files.values())
    assert load_checkpoint(erasable.u1).meta[TRAIN_FILES_KEY] == files


def test_erasing_a_removed_instance_keeps_verify_evaluate_and_chained_unlearn_working(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's reproduction: after `rm train/*/5.npy`, verify exited 2."""
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(5))
        capsys.readouterr()
        assert cli.main(["verify", "--record", _record(erasable.u1)]) == 0
        out = capsys.readouterr().out
        assert NOTE in out and "verified:" in out, out
        assert "pair counts     ok (retain pairs; the forget pairs' files are erased)" in out
        # CLI review: with the forget files erased the pair counts were not compared, so an
        # edited count verified.
        record = json.loads(Path(_record(erasable.u1)).read_text())
        real = record["request"]["num_retain_pairs"]
        record["request"]["num_retain_pairs"] = 1
        edited = Path(_record(erasable.u1)).with_name("edited.record.json")
        edited.write_text(json.dumps(record))
        assert cli.main(["verify", "--record", str(edited)]) == 1
        edited.unlink()
        captured = capsys.readouterr()
        out = captured.out + captured.err
        assert (f"mismatch: request.num_retain_pairs 1 differs from the split the request "
                f"gives, {real} (record edited?)") in out, out
        assert cli.main(["evaluate", "--checkpoint", str(erasable.u1), "--output",
                         str(tmp_path / "e.json"), "--quiet"]) == 0
        u2 = tmp_path / "u2.pt"
        assert cli.main(["unlearn", "--checkpoint", str(erasable.u1), "--forget-ids", "6",
                         "--output", str(u2), *STEPS]) == 0
        # Not "their 0 pairs stayed out": the erased instance is not read at all.
        assert ("earlier removals: 1 request(s) of the input's lineage; their 0 pairs still "
                "in the data stayed out of the retain set (1 of their instances' files erased "
                "since, so not read at all)") in capsys.readouterr().out
        record = json.loads(Path(_record(u2)).read_text())
        assert record["request"]["earlier_removals"][0]["instance_ids"] == [5]
        assert cli.main(["verify", "--record", _record(u2), "--quiet"]) == 0
        # Nothing of id 5 is left to forget or measure: said naming --forget-ids.
        capsys.readouterr()
        for argv in (["unlearn", "--checkpoint", str(erasable.u1), "--forget-ids", "5",
                      "--output", str(tmp_path / "u3.pt"), *STEPS],
                     ["evaluate", "--checkpoint", str(erasable.u1), "--forget-ids", "5",
                      "--quiet"]):
            assert cli.main(argv) == 2, argv
            err = _err(capsys)
            assert err.startswith("mtunlearn: error: --forget-ids: expected ids of training "
                                  "data still present, got '1 erased ids [5]'; "), err
            assert "already removed them and their files were erased" in err, err
        # --retain-ids too: it said "unknown ids [5]", not why.
        for argv in (["unlearn", "--checkpoint", str(erasable.u1), "--forget-ids", "6",
                      "--retain-ids", "5,7", "--output", str(tmp_path / "u3.pt"), *STEPS],
                     ["evaluate", "--checkpoint", str(erasable.u1), "--forget-ids", "6",
                      "--retain-ids", "5,7", "--quiet"]):
            assert cli.main(argv) == 2, argv
            err = _err(capsys)
            assert err.startswith("mtunlearn: error: --retain-ids: expected ids of training "
                                  "data still present, got '1 erased ids [5]'; "), err
        assert not (tmp_path / "u3.pt").exists()
        # The original was trained on id 5 and its lineage did not remove it: its data are gone.
        assert cli.main(["evaluate", "--checkpoint", str(erasable.orig), "--quiet"]) == 2
        assert ("instance 5 was not removed by this checkpoint's lineage (if a later request "
                "removed it, use that request's output, the latest checkpoint)") in _err(capsys)
        # A later request's files erased: the earlier record is refused (u2 removed 6, not
        # u1's lineage), saying so (it said that 6 "was never removed"); the latest
        # checkpoint's record verifies.
        _erase(erasable.data, *_instance(6))
        assert cli.main(["verify", "--record", _record(erasable.u1), "--quiet"]) == 2
        err = _err(capsys)
        assert ("are missing but instance 6 was not removed by this checkpoint's lineage (if a "
                "later request removed it, use that request's output, the latest checkpoint)"
                ) in err, err
        assert cli.main(["verify", "--record", _record(u2), "--quiet"]) == 0


def test_verify_re_derives_a_chained_and_a_drawn_request_after_erasure(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Erasing files after the run makes what verify re-counts smaller than the run counted:
    the pairs of an earlier removal kept out of the retain set, a draw made from the data.
    Neither is a mismatch then (the row says why); the forgotten ids are still checked, from
    the record when the forget files are gone."""
    chained, drawn = tmp_path / "c.pt", tmp_path / "d.pt"
    assert cli.main(["unlearn", "--checkpoint", str(erasable.u1), "--forget-ids", "6",
                     "--output", str(chained), *STEPS]) == 0
    assert json.loads(Path(_record(chained)).read_text())["request"]["num_excluded_pairs"] > 0
    assert cli.main(["unlearn", "--checkpoint", str(erasable.u1), "--forget-fraction", "0.3",
                     "--output", str(drawn), *STEPS]) == 0
    request = json.loads(Path(_record(drawn)).read_text())["request"]
    assert request["ids_drawn"] == {"fraction": 0.3, "seed": 0}
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(5))  # u1's removal, earlier for both records
        capsys.readouterr()
        assert cli.main(["verify", "--record", _record(chained), "--quiet"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert ("pair counts ok; num_excluded_pairs not re-counted: files of the earlier "
                "removals were erased, after the run or before it") in out, out
        assert "forgotten ids ok" in out, out
        for i in request["instance_ids"]:  # the drawn request's own files too
            _erase(erasable.data, *_instance(i))
        assert cli.main(["verify", "--record", _record(drawn), "--quiet"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert ("forgotten ids ok (against the request and the earlier removals; the forget "
                "files are erased)") in out, out
        assert ("ids drawn not re-drawn (fraction 0.3, seed 0): files were erased since the "
                "data the ids were drawn from") in out, out
        # An edited forgotten id is found all the same: 5 is no id of this request.
        payload = json.loads(Path(_record(drawn)).read_text())
        payload["request"]["forgotten_instance_ids"] = [5]
        edited = tmp_path / "edited.json"
        edited.write_text(json.dumps(payload))
        assert cli.main(["verify", "--record", str(edited), "--checkpoint", str(drawn),
                         "--quiet"]) == 1
        assert ("mismatch: request.forgotten_instance_ids [5] are not the request's ids "
                "(sorted, at least one) less those the earlier removals took (record edited?)"
                ) in capsys.readouterr().err


def test_erasing_an_instance_never_removed_is_refused_naming_the_file(
        erasable: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(5), *_instance(7))
        capsys.readouterr()
        assert cli.main(["verify", "--record", _record(erasable.u1), "--quiet"]) == 2
        err = _err(capsys)
        assert ("train/depth/7.npy, train/image/7.npy, train/label/7.npy are missing but "
                "instance 7 was not removed by this checkpoint's lineage") in err, err
        assert cli.main(["evaluate", "--checkpoint", str(erasable.u1), "--quiet"]) == 2
        assert "instance 7 was not removed by this checkpoint's lineage" in _err(capsys)


@pytest.mark.parametrize("also_delete", [True, False])
def test_a_removed_file_blanked_instead_of_deleted_is_refused(
        erasable: SimpleNamespace, also_delete: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A blanked image is still read as an image (zeros are valid RGB): it must be deleted."""
    with _restored(erasable.data):
        image = erasable.data / "train" / "image" / "5.npy"
        np.save(image, np.zeros_like(np.load(image)))
        if also_delete:
            _erase(erasable.data, "label/5.npy", "depth/5.npy")
        capsys.readouterr()
        assert cli.main(["verify", "--record", _record(erasable.u1), "--quiet"]) == 2
        err = _err(capsys)
        assert "train/image/5.npy" in err, err
        assert ("does not hash to the SHA-256 recorded at training" if also_delete else
                "differ from the files recorded at training: train/image/5.npy edited"
                ) in err, err


def test_a_partial_request_may_erase_its_tasks_label_files_only(
        erasable: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    with _restored(erasable.data):
        _erase(erasable.data, "label/2.npy")
        capsys.readouterr()
        assert cli.main(["verify", "--record", _record(erasable.p1)]) == 0
        assert NOTE in capsys.readouterr().out
        # Its depth is still there to forget; its segmentation is not.
        assert cli.main(["evaluate", "--checkpoint", str(erasable.p1), "--forget-ids", "2",
                         "--target-tasks", "depth", "--quiet"]) == 0
        capsys.readouterr()
        assert cli.main(["evaluate", "--checkpoint", str(erasable.p1), "--forget-ids", "2",
                         "--target-tasks", "segmentation", "--quiet"]) == 2
        assert "--forget-ids: expected ids of training data still present" in _err(capsys)
        _erase(erasable.data, "depth/2.npy")
        assert cli.main(["verify", "--record", _record(erasable.p1), "--quiet"]) == 2
        assert ("train/depth/2.npy is missing but instance 2 was removed only from the tasks "
                "of a partial request") in _err(capsys)
    with _restored(erasable.data):
        _erase(erasable.data, "label/2.npy", "image/2.npy")
        assert cli.main(["verify", "--record", _record(erasable.p1), "--quiet"]) == 2
        err = _err(capsys)
        assert "image/2.npy is missing, yet " in err, err
        assert "--data-root" not in err, err  # the data did not move: no hint that they did


def test_train_still_refuses_a_root_with_a_gap(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(3))
        assert cli.main(["train", "--benchmark", "cityscapes", "--size", "tiny", "--data-root",
                         str(erasable.data), "--epochs", "1", "--output",
                         str(tmp_path / "o.pt"), "--quiet"]) == 2
        assert "without gaps" in _err(capsys)


def test_a_checkpoint_without_file_digests_keeps_the_old_behaviour(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Older checkpoints (no train_files_sha256) read complete data only, as before."""
    payload = torch.load(erasable.u1, weights_only=True)
    del payload["meta"][TRAIN_FILES_KEY], payload["meta_sha256"]  # neither was kept then
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    assert cli.main(["evaluate", "--checkpoint", str(older), "--quiet"]) == 0
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(5))
        capsys.readouterr()
        assert cli.main(["evaluate", "--checkpoint", str(older), "--quiet"]) == 2
        assert "without gaps" in _err(capsys)


def test_the_loader_reads_erased_data_only_when_asked(erasable: SimpleNamespace) -> None:
    """Ids stay file numbers, an erased label file unsupervises its pair, test ids still start
    at the complete split's size, val/ takes no gap."""
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(7), "label/2.npy")
        with pytest.raises(LayoutError, match="without gaps"):
            load_cityscapes(erasable.data)
        bench = load_cityscapes(erasable.data, allow_erased=True, num_train=8)
        assert bench.train.ids.tolist() == [0, 1, 2, 3, 4, 5, 6]
        assert bench.test.ids.tolist() == [8, 9, 10]
        assert bench.train.supervision[2].tolist() == [False, True]
        assert bench.train.supervision[[0, 1, 3]].all()
        assert "image/7.npy" not in bench.info[TRAIN_FILES_KEY]
        (erasable.data / "val" / "image" / "1.npy").unlink()
        with pytest.raises(LayoutError):
            load_cityscapes(erasable.data, allow_erased=True, num_train=8)


@pytest.fixture(scope="module")
def both_tasks(erasable: SimpleNamespace) -> Path:
    """``p1.pt`` (id 2's segmentation forgotten) then id 2's depth: two partial requests that
    together remove every task of id 2."""
    b = erasable.folder / "b.pt"
    # Id 2's segmentation is gone already: none of its pairs is left to protect.
    with pytest.warns(UserWarning, match="coupled=True, but the retain set holds no retained "
                                         "pair of the forget instances"):
        assert cli.main(["unlearn", "--checkpoint", str(erasable.p1), "--forget-ids", "2",
                         "--target-tasks", "depth", "--output", str(b), *STEPS]) == 0
    return b


def test_partial_requests_naming_every_task_together_let_the_whole_instance_be_erased(
        erasable: SimpleNamespace, both_tasks: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each removal was looked at alone: id 2's image could never be erased, and a full
    request on 2 once its label files were erased ended in a traceback (exit 1)."""
    with _restored(erasable.data):
        _erase(erasable.data, "label/2.npy", "depth/2.npy")
        capsys.readouterr()
        for argv in (["unlearn", "--checkpoint", str(both_tasks), "--forget-ids", "2",
                      "--output", str(tmp_path / "c.pt"), *STEPS],
                     ["evaluate", "--checkpoint", str(both_tasks), "--forget-ids", "2",
                      "--quiet"]):
            assert cli.main(argv) == 2, argv
            err = _err(capsys)
            assert err.startswith("mtunlearn: error: --forget-ids: expected ids of training "
                                  "data still present, got '1 erased ids [2]'; "), err
        _erase(erasable.data, "image/2.npy")
        assert cli.main(["verify", "--record", _record(both_tasks)]) == 0
        assert NOTE in capsys.readouterr().out
        assert cli.main(["evaluate", "--checkpoint", str(both_tasks), "--quiet"]) == 0
        capsys.readouterr()
        # p1's lineage removed only id 2's segmentation: its image was still trained on.
        assert cli.main(["evaluate", "--checkpoint", str(erasable.p1), "--quiet"]) == 2
        err = _err(capsys)
        assert ("train/depth/2.npy, train/image/2.npy are missing but instance 2 was removed "
                "only from the tasks of a partial request") in err, err
    assert not (tmp_path / "c.pt").exists()


def test_pairs_the_lineage_removed_are_not_forgotten_again(
        erasable: SimpleNamespace, both_tasks: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Files not erased: `unlearn` ran gradient ascent again on pairs removed before (the API
    refuses that), `--forget-fraction` drew them, and a request left with nothing to forget
    ended in a traceback."""
    capsys.readouterr()
    for checkpoint, tasks in ((both_tasks, []), (erasable.p1, ["--target-tasks",
                                                               "segmentation"])):
        assert cli.main(["unlearn", "--checkpoint", str(checkpoint), "--forget-ids", "2",
                         *tasks, "--output", str(tmp_path / "none.pt"), *STEPS]) == 2
        err = _err(capsys)
        assert err.startswith("mtunlearn: error: --forget-ids: expected ids with pairs of the "
                              "target tasks "), err
        assert "not removed yet, got '1 removed ids [2]'; " in err, err
    assert not (tmp_path / "none.pt").exists()
    # Id 2's segmentation was removed: of 2 and 3, only 3's segmentation is forgotten.
    some = tmp_path / "some.pt"
    assert cli.main(["unlearn", "--checkpoint", str(erasable.p1), "--forget-ids", "2,3",
                     "--target-tasks", "segmentation", "--output", str(some), *STEPS]) == 0
    printed = capsys.readouterr()
    assert ("earlier requests of the checkpoint's lineage already removed pairs of 1 of the "
            "ids named (ids [2]): only the other 1 pairs are forgotten") in printed.err
    # The summary counts the instances forgotten, as the record's report does (it said 2).
    assert ("partial request, 1 instances (2 named; the other 1: removed by earlier "
            "requests), tasks ['segmentation']") in printed.out, printed.out
    request = json.loads(Path(_record(some)).read_text())["request"]
    assert request["instance_ids"] == [2, 3] and request["num_forget_pairs"] == 1
    # Compliance review: which of the named ids this run forgot was not in the record.
    assert request["forgotten_instance_ids"] == [3] and request["ids_drawn"] is None
    # verify splits the request as unlearn did.
    assert cli.main(["verify", "--record", _record(some), "--quiet"]) == 0
    # A full request on 2: its depth only.
    full = tmp_path / "full.pt"
    assert cli.main(["unlearn", "--checkpoint", str(erasable.p1), "--forget-ids", "2",
                     "--output", str(full), *STEPS]) == 0
    assert json.loads(Path(_record(full)).read_text())["request"]["num_forget_pairs"] == 1
    # The draw is among the instances whose segmentation is still there: never id 2.
    drawn = tmp_path / "drawn.pt"
    with pytest.warns(UserWarning, match="the retain set has no supervised pair of task "
                                         "'segmentation'"):  # 7 of the 7 labelled instances
        assert cli.main(["unlearn", "--checkpoint", str(erasable.p1), "--forget-fraction",
                         "0.875", "--target-tasks", "segmentation", "--output", str(drawn),
                         *STEPS]) == 0
    request = json.loads(Path(_record(drawn)).read_text())["request"]
    assert request["instance_ids"] == [0, 1, 3, 4, 5, 6, 7], request


def test_the_chained_line_tells_a_partial_erasure_from_an_instance_gone(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Erasing only id 2's label file (p1's partial request) was counted as an instance "not
    read at all", though 2 is still read for its depth."""
    with _restored(erasable.data):
        _erase(erasable.data, "label/2.npy")
        capsys.readouterr()
        assert cli.main(["unlearn", "--checkpoint", str(erasable.p1), "--forget-ids", "6",
                         "--output", str(tmp_path / "u.pt"), *STEPS]) == 0
        out = capsys.readouterr().out
        assert "not read at all" not in out, out
        assert ("stayed out of the retain set (some of their label files erased since (1 "
                "instance(s) still read for their other tasks))") in out, out


def test_a_request_leaving_a_capped_task_no_retain_pair_is_a_one_line_error(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Review: forgetting every instance's depth left the retain set no depth pair, and the
    method's setup refused it with a traceback (exit 1) instead of the usual one-line error."""
    out = tmp_path / "all_depth.pt"
    code = cli.main(["unlearn", "--checkpoint", str(erasable.orig), "--forget-ids",
                     ",".join(str(i) for i in range(8)), "--target-tasks", "depth", "--output",
                     str(out), "--method-config", '{"steps": 2, "cap_quantile": null}',
                     "--quiet"])
    err = _err(capsys)
    assert code == 2, err
    assert err.startswith("mtunlearn: error: --method-config: expected settings of "
                          "'interference_aware' that fit this request"), err
    assert "the retain set has none" in err and "forget_objective={'depth': 'ascent'}" in err, err
    assert not out.exists()


def test_another_models_checkpoint_is_a_mismatch_not_a_call_to_restore_erased_data(
        erasable: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: verifying a record against a checkpoint of another model, with the record's
    forget files erased, exited 2 asking to restore them (its input, re-measured, was trained
    on them) instead of failing on the checkpoint (exit 1)."""
    other, other_u = tmp_path / "indoor.pt", tmp_path / "indoor_u.pt"
    assert cli.main(["train", "--benchmark", "indoor", "--size", "tiny", "--epochs", "1",
                     "--output", str(other), "--quiet"]) == 0
    assert cli.main(["unlearn", "--checkpoint", str(other), "--forget-ids", "5",
                     "--output", str(other_u), *STEPS]) == 0
    with _restored(erasable.data):
        _erase(erasable.data, *_instance(5))
        capsys.readouterr()
        assert cli.main(["verify", "--record", _record(erasable.u1), "--checkpoint",
                         str(other_u)]) == 1
        printed = capsys.readouterr()
        assert "restore" not in printed.err, printed.err
        table = " ".join(printed.out.split())
        assert "sha256 MISMATCH" in table and "provenance MISMATCH" in table, table
        assert "before not measured (the checkpoint is not the record's output)" in table, table
