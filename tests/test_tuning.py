"""``python -m mtunlearn_ext.tuning``: the learning-rate x step-budget grid of step-based
methods, scored by the gap to the retrained model, and its command line's input checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from mtunlearn_ext.experiment import ExperimentConfig
from mtunlearn_ext.metrics import retrain_gap
from mtunlearn_ext.tuning import main, tune


def test_tune_scores_every_grid_point_and_keeps_each_methods_best(tmp_path: Path) -> None:
    config = ExperimentConfig(benchmark="digits", size="tiny", request="partial",
                              target_tasks=["digit"], methods=["finetune", "neggrad_plus"],
                              seed=0, output=str(tmp_path / "r.json"),
                              cache_dir=str(tmp_path / "cache"), threads=1)
    result = tune(config, [1e-3, 1e-2], [1, 3], retain_eval=50)
    grid = [r for r in result["records"] if r["method"] != "original"]
    assert sorted((r["method"], r["lr"], r["steps"]) for r in grid) == sorted(
        (m, lr, s) for m in ("finetune", "neggrad_plus") for lr in (1e-3, 1e-2) for s in (1, 3))
    for method in ("finetune", "neggrad_plus"):
        mine = [r for r in grid if r["method"] == method]
        lowest = min(mine, key=lambda r: r["gap"])
        assert result["best"][method] == {"gap": lowest["gap"], "settings": lowest["settings"]}
        assert lowest["settings"]["steps"] == lowest["steps"]
    # The record's gap is the retrain gap of its own metrics against the gold model's.
    record = grid[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # metrics undefined on a tiny split
        assert record["gap"] == pytest.approx(retrain_gap(record["metrics"], result["gold"]))
    assert set(result["gold"]) == {"forget", "retain"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--lrs", "abc"], "--lrs / --checkpoints: expected positive numbers"),
    (["--checkpoints", "0"], "--lrs / --checkpoints: expected positive numbers"),
    (["--benchmark", "nope"], "unknown benchmark 'nope'"),
    (["--methods", "nope"], "unknown methods ['nope']"),
])
def test_cli_refuses_bad_arguments_before_any_training(tmp_path: Path, capsys, argv, message
                                                       ) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "t.json"
    assert main(["--benchmark", "digits", "--size", "tiny", "--output", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
