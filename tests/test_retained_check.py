"""The kept-performance check: ``mtunlearn_ext.metrics.check_retained`` and its use by
``mtunlearn unlearn`` (warning, record, ``--require-retained``), ``verify`` and ``report``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from mtunlearn_ext import cli
from mtunlearn_ext.cli import _parser as cli_parser
from mtunlearn_ext.metrics import (
    DEFAULT_TOLERANCE,
    KEPT_SPLITS,
    RetainedCheck,
    check_retained,
    retained_changes,
)
from mtunlearn_ext.records import read_record

BEFORE = {"retain": {"seg": {"miou": 0.80, "pixel_acc": 0.90}, "depth": {"abs_err": 0.20}},
          "test": {"seg": {"miou": 0.70, "pixel_acc": 0.85}, "depth": {"abs_err": 0.30}}}


def _after(**changes: float | None) -> dict[str, dict[str, dict[str, float | None]]]:
    """BEFORE with ``split__task__metric=value`` replaced."""
    after = json.loads(json.dumps(BEFORE))
    for key, value in changes.items():
        split, task, metric = key.split("__")
        after[split][task][metric] = value
    return after


def test_worsening_is_relative_and_follows_each_metrics_direction() -> None:
    changes = {(c.split, c.task, c.metric): c.worsening for c in retained_changes(
        BEFORE, _after(test__seg__miou=0.56, test__depth__abs_err=0.36,
                       retain__seg__pixel_acc=0.99, retain__depth__abs_err=0.10))}
    assert changes[("test", "seg", "miou")] == pytest.approx(0.2)  # higher is better: fell 20%
    assert changes[("test", "depth", "abs_err")] == pytest.approx(0.2)  # lower is better: rose
    assert changes[("retain", "seg", "pixel_acc")] == pytest.approx(-0.1)  # improved
    assert changes[("retain", "depth", "abs_err")] == pytest.approx(-0.5)
    assert changes[("test", "seg", "pixel_acc")] == 0.0
    assert len(changes) == 6  # every metric of every task on both kept splits


def test_the_tolerance_decides_and_the_worst_come_first() -> None:
    after = _after(test__seg__miou=0.56, test__depth__abs_err=0.45)  # 20% and 50% worse
    assert check_retained(BEFORE, after, 0.6).passed
    at_quarter = check_retained(BEFORE, after)
    assert at_quarter.tolerance == DEFAULT_TOLERANCE == 0.25
    assert not at_quarter.passed
    assert [(c.task, c.metric) for c in at_quarter.exceeded] == [("depth", "abs_err")]
    strict = check_retained(BEFORE, after, 0.1)
    assert [c.metric for c in strict.exceeded] == ["abs_err", "miou"]  # worst first
    assert strict.worst is not None and strict.worst.metric == "abs_err"
    assert "2 kept metric(s) (retain, test) worsened by more than 10.0%" in strict.summary()
    assert "test/depth/abs_err 0.3 -> 0.45 (+50.0%)" in strict.summary()
    assert check_retained(BEFORE, BEFORE, 0.0).passed  # unchanged passes even at 0
    assert check_retained(BEFORE, BEFORE).summary() == (
        "kept metrics (retain, test) within 25.0% of the input model's: none got worse")
    assert check_retained(BEFORE, _after(test__seg__miou=0.63)).summary().endswith(
        "worst test/seg/miou 0.7 -> 0.63 (+10.0%)")


def test_a_metric_that_is_no_longer_finite_fails_and_one_that_never_was_is_not_compared() -> None:
    gone = check_retained(BEFORE, _after(test__depth__abs_err=None))
    assert not gone.passed and math.isinf(gone.exceeded[0].worsening)
    assert gone.to_dict()["exceeded"][0]["worsening"] is None  # JSON has no inf
    assert "NaN/Inf" in gone.summary()
    before = json.loads(json.dumps(BEFORE))
    before["test"]["depth"]["abs_err"] = None
    unknown = check_retained(before, _after(test__depth__abs_err=5.0))
    assert unknown.passed
    test_depth = [c for c in unknown.changes if (c.split, c.task) == ("test", "depth")]
    assert len(test_depth) == 1 and math.isnan(test_depth[0].worsening)
    assert "not comparable" in test_depth[0].describe()
    assert unknown.worst is not None
    assert (unknown.worst.split, unknown.worst.task) != ("test", "depth")


def test_a_metric_at_zero_before_counts_any_worsening_as_infinite() -> None:
    before = _after(retain__depth__abs_err=0.0)
    assert not check_retained(before, _after(retain__depth__abs_err=1e-6), 100.0).passed
    assert check_retained(before, before, 0.0).passed


def test_only_the_splits_asked_for_are_compared() -> None:
    after = _after(retain__seg__miou=0.1)
    assert not check_retained(BEFORE, after).passed
    assert check_retained(BEFORE, after, splits=["test"]).passed
    assert check_retained(BEFORE, after, splits="test").splits == ("test",)
    assert KEPT_SPLITS == ("retain", "test")


@pytest.mark.parametrize("tolerance", [-0.1, math.nan, math.inf, "0.2", True])
def test_a_bad_tolerance_is_refused_by_name(tolerance: object) -> None:
    with pytest.raises(ValueError, match="`tolerance` must be a finite number >= 0"):
        check_retained(BEFORE, BEFORE, tolerance)  # type: ignore[arg-type]


def test_mismatched_inputs_are_refused_naming_what_differs() -> None:
    with pytest.raises(ValueError, match="`after` has no split 'retain'"):
        check_retained(BEFORE, {"test": BEFORE["test"]})
    with pytest.raises(ValueError, match=r"tasks of split 'test'.*missing \['depth'\]"):
        check_retained(BEFORE, {**BEFORE, "test": {"seg": BEFORE["test"]["seg"]}})
    with pytest.raises(ValueError, match=r"metrics of test/seg.*extra \['extra'\]"):
        check_retained(BEFORE, _after(test__seg__extra=1.0))
    with pytest.raises(KeyError, match="unknown metric 'score'"):
        check_retained({"test": {"t": {"score": 1.0}}}, {"test": {"t": {"score": 1.0}}},
                       splits=["test"])
    assert check_retained({"test": {"t": {"score": 1.0}}}, {"test": {"t": {"score": 0.5}}},
                          splits=["test"], higher_is_better={"score": True}).exceeded
    with pytest.raises(TypeError, match=r"after\['test'\]\['seg'\]\['miou'\] must be a number"):
        check_retained(BEFORE, _after(test__seg__miou="0.7"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`splits` must name at least one split"):
        check_retained(BEFORE, BEFORE, splits=[])


def test_the_json_form_round_trips_through_a_record() -> None:
    check = check_retained(BEFORE, _after(test__seg__miou=0.3))
    data = json.loads(json.dumps(check.to_dict()))
    assert data["passed"] is False and data["tolerance"] == 0.25
    assert data["splits"] == ["retain", "test"]
    assert data["worst"] == data["exceeded"][0]
    assert data["exceeded"][0]["metric"] == "miou"
    assert len(data["changes"]) == 6
    again = check_retained(BEFORE, _after(test__seg__miou=0.3), data["tolerance"],
                           splits=data["splits"])
    assert again.to_dict() == data  # what verify re-derives from a record
    assert isinstance(again, RetainedCheck)


def test_the_cli_default_is_the_library_default() -> None:
    assert cli_parser._DEFAULT_RETAINED_TOLERANCE == DEFAULT_TOLERANCE


# -- the command line ---------------------------------------------------------------------------

RUINOUS = '{"lr": 5.0, "steps": 20}'  # fine-tuning at this rate wrecks the digits model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Single-threaded, as the other CLI modules (conftest.one_thread)."""


@pytest.fixture()
def original(digits_tiny_checkpoint: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "orig.pt"
    shutil.copyfile(digits_tiny_checkpoint, ckpt)
    return ckpt


def _unlearn(ckpt: Path, *extra: str) -> int:
    return cli.main(["unlearn", "--checkpoint", str(ckpt), "--forget-fraction", "0.1",
                     "--quiet", *extra])


def test_unlearn_records_a_passed_check_for_a_gentle_run(
        original: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _unlearn(original, "--method-config", '{"steps": 3}') == 0
    out = capsys.readouterr().out
    assert "kept metrics (retain, test) within 25.0% of the input model's" in out
    record = read_record(original.parent / "orig.interference_aware.record.json")
    check = record["retained_check"]
    assert check["passed"] is True and check["tolerance"] == 0.25
    assert check == check_retained(record["before"]["metrics"], record["after"]["metrics"],
                                   0.25).to_dict()


def test_unlearn_warns_of_a_ruined_model_and_records_it(
        original: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _unlearn(original, "--method", "finetune", "--method-config", RUINOUS) == 0
    captured = capsys.readouterr()
    assert "mtunlearn: warning: 6 kept metric(s) (retain, test) worsened by more than 25.0%" \
        in captured.err
    assert "--require-retained makes this an error (exit 4" in captured.err
    assert "WARNING: 6 kept metric(s)" in captured.out
    record_path = original.parent / "orig.finetune.record.json"
    record = read_record(record_path)
    assert record["retained_check"]["passed"] is False
    assert {c["split"] for c in record["retained_check"]["exceeded"]} == {"retain", "test"}
    # verify re-derives the verdict: the honest record verifies, its outcome shown ...
    assert cli.main(["verify", "--record", str(record_path), "--quiet", "--json"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["checks"]["kept metrics"].startswith("ok, as recorded: 6 metric(s)")
    # ... and one edited to claim a pass does not.
    record["retained_check"]["passed"] = True
    edited = original.parent / "edited.record.json"
    edited.write_text(json.dumps(record))
    assert cli.main(["verify", "--record", str(edited), "--quiet", "--json"]) == 1
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["checks"]["kept metrics"] == "MISMATCH"
    assert any("retained_check: the record says passed True" in m
               for m in outcome["mismatches"])
    # One whose verdict stands but whose figures were edited names the figures (it said "the
    # record says passed False, its metrics give False", a mismatch that read as none).
    record["retained_check"]["passed"] = False
    record["retained_check"]["worst"]["after"] = 0.49
    edited.write_text(json.dumps(record))
    assert cli.main(["verify", "--record", str(edited), "--quiet", "--json"]) == 1
    outcome = json.loads(capsys.readouterr().out)
    assert any("retained_check: the record's worst differ from what its before and after "
               "metrics give (the same verdict, passed False)" in m
               for m in outcome["mismatches"]), outcome["mismatches"]
    # The report shows which metrics the run damaged.
    assert cli.main(["report", "--results", str(record_path), "--output-dir",
                     str(original.parent / "rep"), "--quiet"]) == 0
    report = (original.parent / "rep" / "report.md").read_text()
    assert "## Kept performance" in report
    assert "**6 task metric(s) on the retain, test split(s) worsened by more than 25%**" \
        in report
    assert "| test | digit | accuracy |" in report


def test_require_retained_fails_a_ruinous_run_and_writes_nothing(
        original: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = sorted(p.name for p in original.parent.iterdir())
    assert _unlearn(original, "--method", "finetune", "--method-config", RUINOUS,
                    "--require-retained") == 4
    err = capsys.readouterr().err
    assert "mtunlearn: error: 6 kept metric(s) (retain, test) worsened by more than 25.0%" in err
    assert "--require-retained: nothing was written" in err
    assert sorted(p.name for p in original.parent.iterdir()) == listing
    # A tolerance wide enough lets the same run through.
    assert _unlearn(original, "--method", "finetune", "--method-config", RUINOUS,
                    "--require-retained", "--retained-tolerance", "1") == 0
    record = read_record(original.parent / "orig.finetune.record.json")
    assert record["retained_check"]["passed"] is True
    assert record["retained_check"]["tolerance"] == 1.0


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf", "a lot"])
def test_a_bad_retained_tolerance_exits_2_naming_the_option(
        original: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _unlearn(original, "--retained-tolerance", value)
    assert exit_info.value.code == 2
    assert "--retained-tolerance" in capsys.readouterr().err


def test_the_options_and_exit_code_4_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["unlearn", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--retained-tolerance FRACTION" in text and "(default: 0.25, i.e. 25%)" in text
    assert "--require-retained" in text
    assert "4 unlearn --require-retained: a retain or test metric worsened past" in text
