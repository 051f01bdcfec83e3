"""The evaluation script's bookkeeping: a finished run is kept, a changed preset re-runs only the
methods it changes, and merged entries replace exactly those methods."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluation():
    spec = importlib.util.spec_from_file_location("unlearning_eval",
                                                  ROOT / "benchmarks" / "unlearning_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["unlearning_eval"] = module
    spec.loader.exec_module(module)
    return module


def _run_file(path: Path, models: dict, configs: dict) -> None:
    path.write_text(json.dumps({
        "benchmark": {"name": "indoor"}, "request": {"type": "full"},
        "config": {"methods": list(models), "method_configs": configs},
        "phases_seconds": {f"unlearn/{m}": 1.0 for m in models},
        "models": {**{m: {"uis": 1.0, "marker": "old"} for m in models},
                   "original": {"uis": 2.0}, "retrained": {"uis": 0.0}}}))


def test_stale_methods(evaluation, tmp_path):
    path = tmp_path / "run.json"
    settings = {"finetune": {"lr": 1e-3}, "interference_aware": {"lr": 6e-3, "alpha": 1.0}}
    methods = ["retrain", "finetune", "interference_aware"]
    assert evaluation._stale_methods(path, methods, settings) == methods  # no file yet
    _run_file(path, {"retrain": 0, "finetune": 0, "interference_aware": 0},
              {"finetune": {"lr": 1e-3}, "interference_aware": {"lr": 6e-3, "alpha": 3.0}})
    assert evaluation._stale_methods(path, methods, settings) == ["interference_aware"]
    assert evaluation._stale_methods(path, [*methods, "pcgrad"], settings) == [
        "interference_aware", "pcgrad"]
    path.write_text("{truncated")
    assert evaluation._stale_methods(path, methods, settings) == methods


def test_merge_replaces_only_the_given_methods(evaluation, tmp_path):
    path = tmp_path / "run.json"
    _run_file(path, {"finetune": 0, "interference_aware": 0},
              {"finetune": {"lr": 1e-3}, "interference_aware": {"alpha": 3.0}})
    update = {"benchmark": {"name": "indoor"}, "request": {"type": "full"},
              "config": {"method_configs": {"interference_aware": {"alpha": 1.0}}},
              "phases_seconds": {"unlearn/interference_aware": 5.0},
              "models": {"interference_aware": {"uis": 0.5, "marker": "new"},
                         "original": {"uis": 99.0}}}
    evaluation._merge_methods(path, update, ["interference_aware"])
    merged = json.loads(path.read_text())
    assert merged["models"]["interference_aware"]["marker"] == "new"
    assert merged["models"]["finetune"]["marker"] == "old"
    assert merged["models"]["original"]["uis"] == 2.0  # the reference rows are kept
    assert merged["config"]["method_configs"]["interference_aware"] == {"alpha": 1.0}
    assert merged["phases_seconds"]["unlearn/interference_aware"] == 5.0
    update["request"] = {"type": "partial"}
    with pytest.raises(RuntimeError, match="different request"):
        evaluation._merge_methods(path, update, ["interference_aware"])


def test_unlearning_time_script_compares_like_with_like(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("unlearning_time",
                                                  ROOT / "benchmarks" / "unlearning_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "t.json"
    assert module.main(["--size", "tiny", "--benchmarks", "indoor", "--requests", "partial",
                        "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["request"] == "partial" and row["best"]["retrain"] > 0
    assert row["ratio"]["interference_aware"] == pytest.approx(
        row["best"]["interference_aware"] / row["best"]["retrain"])
    assert "| indoor | partial |" in capsys.readouterr().out
