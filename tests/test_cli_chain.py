"""Chained requests: ``mtunlearn unlearn`` on a checkpoint that is itself unlearned keeps what the
earlier requests of its lineage removed out of the retain set (and so out of any retraining),
says so, records it, and ``verify`` rebuilds that retain set; a checkpoint whose earlier removals
are not known (an older one keeps only their hash) is refused unless ``--retain-ids`` names the
retain set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import _err
from test_cli import FAST, _unlearn, ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli, lineage, workflow
from mtunlearn_ext.cli import _outputs as cli_outputs


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only)."""


def _ints(text: str) -> list[int]:
    return [int(i) for i in text.split(",")]


@pytest.fixture(scope="module")
def first(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """An unlearned checkpoint: a full request for 3 instances, then a partial one (digit) for
    2 others, from ``trained``."""
    folder = tmp_path_factory.mktemp("chain")
    one = folder / "one.pt"
    assert _unlearn(trained, one, "--forget-ids", ids(0, 1, 2)) == 0
    two = folder / "two.pt"
    assert _unlearn(one, two, "--forget-ids", ids(3, 4), "--target-tasks", "digit") == 0
    return two


def _meta(path: Path) -> dict[str, Any]:
    return dict(torch.load(path, weights_only=True)["meta"])


def test_a_chained_request_keeps_earlier_removals_out_of_the_retain_set(
        first: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI review: `unlearn` on an unlearned checkpoint put the instances its request had
    forgotten back into the retain set (num_retain_pairs 894 = 900 - 6), so they were trained
    on again (`--method retrain` too). They stay removed: out of the retain set every method
    gets, said on stderr and in the summary, recorded, and verified."""
    seen: list[Any] = []
    real = workflow.run_unlearning

    def spy(problem: Any, method: str, settings: Any) -> Any:
        seen.append(problem.retain)
        return real(problem, method, settings)

    monkeypatch.setattr(workflow, "run_unlearning", spy)
    for method, settings in (("interference_aware", FAST), ("retrain", '{"epochs": 1}')):
        out = tmp_path / f"{method}.pt"
        capsys.readouterr()
        assert cli.main(["unlearn", "--checkpoint", str(first), "--forget-ids", ids(5, 6),
                         "--method", method, "--method-config", settings, "--output",
                         str(out), "--quiet"]) == 0
        printed = capsys.readouterr()
        retain = seen[-1]
        rows = {int(i): r for r, i in enumerate(retain.ids.tolist())}
        for gone in _ints(ids(0, 1, 2)) + _ints(ids(5, 6)):
            assert gone not in rows  # every pair removed: the instance is no retain instance
        digit = retain.task_index("digit")
        for partial in _ints(ids(3, 4)):  # only their digit labels were removed
            assert not bool(retain.supervision[rows[partial], digit])
            assert bool(retain.supervision[rows[partial]].any())
        assert ("mtunlearn: 2 earlier request(s) of the checkpoint's lineage removed 3 "
                "instance(s) entirely and the target-task labels of 2 other(s): those pairs "
                "stay removed (11 kept out of the retain set)" in printed.err), printed.err
        assert "earlier removals: 2 request(s) of the input's lineage" in printed.out
        lineage = _meta(first)["removals"]
        assert [e["instance_ids"] for e in lineage] == [sorted(_ints(ids(0, 1, 2))),
                                                        sorted(_ints(ids(3, 4)))]
        assert [e["target_tasks"] for e in lineage] == [None, ["digit"]]
        record = json.loads(Path(str(out) + ".record.json").read_text())
        request = record["request"]
        assert request["earlier_removals"] == lineage
        # 300 instances x 3 tasks, less 2 forgotten instances, 3 earlier ones and 2 digit labels.
        assert request["num_excluded_pairs"] == 11
        assert request["num_retain_pairs"] == 900 - 6 - 11 == int(retain.supervision.sum())
        assert [e["instance_ids"] for e in _meta(out)["removals"]] == [
            *[e["instance_ids"] for e in lineage], sorted(_ints(ids(5, 6)))]
    # verify rebuilds the same retain set (after and before), and evaluate measures the input
    # checkpoint as the record's `before`.
    record_path = tmp_path / "interference_aware.pt.record.json"
    assert cli.main(["verify", "--record", str(record_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["metrics", "ok"] in rows and ["before", "ok"] in rows
    assert cli.main(["evaluate", "--checkpoint", str(first), "--forget-ids", ids(5, 6),
                     "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    record = json.loads(record_path.read_text())
    assert evaluated["metrics"] == record["before"]["metrics"]
    assert evaluated["retain_split"]["earlier_removals_excluded"] == 11
    # A record edited to drop the earlier removals no longer verifies (the retain set changes).
    record["request"]["earlier_removals"] = []
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(record))
    assert cli.main(["verify", "--record", str(edited)]) == 1
    assert "after.metrics.retain" in capsys.readouterr().err


def test_retain_ids_removed_earlier_are_refused(first: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _unlearn(first, tmp_path / "u.pt", "--forget-ids", ids(5, 6), "--retain-ids",
                    ids(0, 7, 8)) == 2
    assert _err(capsys) == (
        "mtunlearn: error: --retain-ids: expected ids that no earlier request of the "
        f"checkpoint's lineage removed, got '1 removed ids [{ids(0)}]'; an instance removed "
        "earlier stays removed; leave them out")
    assert list(tmp_path.iterdir()) == []
    # An instance of which an earlier partial request removed one task keeps its others.
    assert _unlearn(first, tmp_path / "u.pt", "--forget-ids", ids(5, 6), "--retain-ids",
                    ids(3, 7, 8)) == 0


def test_unknown_earlier_removals_are_refused_unless_the_retain_set_is_named(
        first: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unlearned checkpoint written before checkpoints kept the removed ids (its metadata
    has only their hash): its earlier removals cannot be kept out, so the request is refused
    with the ways out; with --retain-ids it runs, says so, and records them as unknown."""
    from mtunlearn_ext.training import save_checkpoint

    loaded = workflow.load_model(first)
    meta = dict(loaded.meta)
    del meta["removals"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, loaded.model, meta)
    assert _unlearn(old, tmp_path / "u.pt", "--forget-ids", ids(5, 6)) == 2
    err = _err(capsys)
    assert err.startswith(
        "mtunlearn: error: --checkpoint: expected a checkpoint whose earlier removals are known "
        f"(an original, or one unlearned by this version), got '{old}'; it is an unlearned "
        "checkpoint (method 'interference_aware', from the checkpoint with SHA-256 "), err
    assert err.endswith("would be re-learned; unlearn from the original checkpoint with the "
                        "earlier ids and the new ones together, or name the retain set, "
                        "without the earlier ids, with --retain-ids"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pt"]
    out = tmp_path / "u.pt"
    assert _unlearn(old, out, "--forget-ids", ids(5, 6), "--retain-ids", ids(7, 8, 9)) == 0
    printed = capsys.readouterr()
    assert "earlier removals are not known" in printed.err
    assert "earlier removals: unknown" in printed.out
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert record["request"]["earlier_removals"] is None
    assert _meta(out)["removals"] is None  # and a request chained to it is refused again
    assert _unlearn(out, tmp_path / "v.pt", "--forget-ids", ids(10)) == 2
    capsys.readouterr()
    assert cli.main(["verify", "--record", str(out) + ".record.json"]) == 0


def test_exclude_removed() -> None:
    from mtunlearn_ext.data import load_benchmark

    train = load_benchmark("digits", size="tiny").train
    some = train.ids[:3].tolist()
    retain, excluded = lineage.exclude_removed(train, [
        {"instance_ids": some[:2], "target_tasks": None},
        {"instance_ids": some[1:], "target_tasks": ["parity"]}])
    assert excluded == 3 * 2 + 1
    assert len(retain) == len(train) - 2 and int(retain.ids[0]) == some[2]
    assert retain.supervision[0].tolist() == [True, False, True]
    assert lineage.exclude_removed(train, []) == (train, 0)
    # An instance is removed entirely once its requests together took every supervised pair.
    tasks = train.task_names
    assert lineage.removal_counts(train, [
        {"instance_ids": some[:2], "target_tasks": None},
        {"instance_ids": some[1:], "target_tasks": tasks[:1]},
        {"instance_ids": some[2:], "target_tasks": tasks[1:]}]) == (3, 0)
    assert lineage.removal_counts(train, [
        {"instance_ids": some, "target_tasks": tasks[1:]}]) == (0, 3)
    assert lineage.removal_counts(train, []) == (0, 0)
    assert lineage.lineage_removals({"kind": "original"}) == []
    assert lineage.lineage_removals({"kind": "unlearned"}) is None
    with pytest.raises(workflow.UserInputError, match="'removals' is malformed"):
        lineage.lineage_removals({"kind": "unlearned", "removals": [{"instance_ids": "1"}]})


def test_default_output_names_of_a_chain_stay_short(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """Long-run review: each request on the previous output with the default --output appended
    `.interference_aware` to the whole name again, so the 13th request's default record name
    passed the file system's 255 bytes and was refused (exit 2, naming a --record never
    given). A chain's default names now count up: `<stem>.<method>-<k>.pt`. New-user review:
    a request on the original beside the chain retrained on the chain's removals without a
    word; it is warned of, naming the chain's newest checkpoint (the chain's own requests are
    not)."""
    import shutil

    shutil.copy(trained, tmp_path / "orig.pt")
    monkeypatch.chdir(tmp_path)
    current = "orig.pt"
    names = []
    for position in range(3):
        before = {p.name for p in tmp_path.iterdir()}
        assert cli.main(["unlearn", "--checkpoint", current, "--forget-ids", ids(position),
                         "--method-config", FAST, "--quiet"]) == 0
        made = sorted({p.name for p in tmp_path.iterdir()} - before)
        current = next(name for name in made if name.endswith(".pt"))
        names.append(made)
        assert "warning" not in capsys.readouterr().err
    assert names == [[f"orig.{tag}.pt", f"orig.{tag}.record.json"]
                     for tag in ("interference_aware", "interference_aware-2",
                                 "interference_aware-3")]
    # A rerun from the original never takes an earlier output's name, nor the next number:
    # `-4` looked like the chain's newest checkpoint, from which a request starts, yet held
    # none of its removals (audit). It is the first request of another lineage: `-1b`; the
    # next request on that, the second place, taken by the chain: `-2b`.
    assert cli_outputs._default_outputs(Path("orig.pt"), "interference_aware")[0] == Path(
        "orig.interference_aware-1b.pt")
    assert cli_outputs._default_outputs(Path("orig.interference_aware-1b.pt"), "interference_aware"
                                )[0] == Path("orig.interference_aware-2b.pt")
    assert cli_outputs._default_outputs(Path("orig.interference_aware-3.pt"), "interference_aware"
                                )[0] == Path("orig.interference_aware-4.pt")
    assert cli.main(["unlearn", "--checkpoint", "orig.pt", "--forget-ids", ids(5),
                     "--method-config", FAST, "--quiet"]) == 0
    assert Path("orig.interference_aware-1b.pt").is_file()
    assert ("mtunlearn: warning: orig.interference_aware.pt exists: a request on orig.pt was "
            "made before (a rerun, or a chain of requests from it, whose newest is "
            "orig.interference_aware-3.pt); this one starts from orig.pt, so what later "
            "requests removed is in its retain set again") in capsys.readouterr().err
    assert cli_outputs._default_outputs(Path("orig.pt"), "interference_aware")[0] == Path(
        "orig.interference_aware-1c.pt")
    # Another method, or a name this function did not write, starts its own.
    assert cli_outputs._default_outputs(Path("orig.interference_aware-3.pt"), "scrub")[0] == Path(
        "orig.interference_aware-3.scrub.pt")
    for name in ("orig.interference_aware-03.pt", "orig.interference_aware-x.pt",
                 ".interference_aware.pt"):
        stem = Path(name).stem
        assert cli_outputs._default_outputs(Path(name), "interference_aware")[0] == Path(
            f"{stem}.interference_aware.pt")


def test_a_warning_of_the_run_is_not_repeated_by_the_records_interference_matrix(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """The record's interference matrix runs the method's setup again: its warnings (here:
    the instance's other labels were all removed by the earlier request, so none of its pairs
    is retained) were printed twice (CLI audit)."""
    first = tmp_path / "first.pt"
    assert _unlearn(trained, first, "--forget-ids", ids(0), "--target-tasks",
                    "digit,parity") == 0
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _unlearn(first, tmp_path / "second.pt", "--forget-ids", ids(0),
                        "--target-tasks", "magnitude") == 0
    said = [str(w.message) for w in caught]
    assert sum("coupled=True, but the retain set holds no retained pair" in m
               for m in said) == 1, said


def test_the_superseded_checkpoint_warning_judges_main_chain_names_only(tmp_path: Path) -> None:
    """Diff review: a branch checkpoint (`-1b`, continued as `-2b`) was told that the main
    chain's `-2` superseded it, advice that would bring the branch's removal back; a branch
    is not judged, a main-chain checkpoint is told its successor and the chain's newest."""
    for name in ("orig.pt", "orig.ga.pt", "orig.ga-2.pt", "orig.ga-3.pt", "orig.ga-1b.pt",
                 "orig.ga-2b.pt"):
        (tmp_path / name).touch()
    expected = {"orig.pt": ("orig.ga.pt", "orig.ga-3.pt"),
                "orig.ga.pt": ("orig.ga-2.pt", "orig.ga-3.pt"),
                "orig.ga-2.pt": ("orig.ga-3.pt", "orig.ga-3.pt"),
                "orig.ga-3.pt": None, "orig.ga-1b.pt": None, "orig.ga-2b.pt": None}
    for name, names in expected.items():
        found = cli_outputs._later_in_chain(tmp_path / name, "ga")
        assert (found if found is None else tuple(p.name for p in found)) == names, name
