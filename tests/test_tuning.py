"""``python -m mtunlearn_ext.tuning``: the learning-rate x step-budget grid of step-based
methods, scored by the gap to the retrained model, and its command line's input checks."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mtunlearn_ext.experiment import ExperimentConfig, experiment_threads, prepare_experiment
from mtunlearn_ext.metrics import evaluate, retrain_gap
from mtunlearn_ext.tuning import main, tune
from mtunlearn_ext.unlearning import GradientUnlearner, get_unlearner


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


@pytest.mark.parametrize(("method", "base"), [
    ("finetune", {}),                       # one run scores both budgets
    ("finetune", {"head_refit_steps": 2}),  # the heads refitted after the forget steps
    ("scrub", {}),                          # forget steps: 2/3 of the run's length
])
def test_a_budget_is_scored_as_the_run_of_that_length(
        tmp_path: Path, method: str, base: dict) -> None:  # type: ignore[type-arg]
    """Each budget's score is that of the model an ``s``-step run returns, also where that run
    is not the first ``s`` steps of a longer one (a refit at the end, SCRUB's phases)."""
    config = ExperimentConfig(benchmark="digits", size="tiny", request="partial",
                              target_tasks=["digit"], methods=[method], seed=0,
                              output=str(tmp_path / "r.json"),
                              cache_dir=str(tmp_path / "cache"), threads=1)
    result = tune(config, [1e-2], [2, 3], retain_eval=50, base={method: base})
    grid = {r["steps"]: r for r in result["records"] if r["method"] == method}
    assert sorted(grid) == [2, 3]
    prepared = prepare_experiment(config)
    problem = prepared.problem(config)
    rows = torch.randperm(len(prepared.retain),
                          generator=torch.Generator().manual_seed(config.seed))[:50]
    with experiment_threads(1):
        for steps, record in grid.items():
            assert record["settings"] == {**base, "lr": 1e-2, "steps": steps}
            model = get_unlearner(method, record["settings"]).unlearn(problem).model
            assert record["metrics"] == {
                "forget": evaluate(model, prepared.forget, None, config.eval_batch_size),
                "retain": evaluate(model, prepared.retain.subset(rows), None,
                                   config.eval_batch_size)}


def test_running_statistics_recomputed_at_the_end_make_each_budget_a_run_of_its_own() -> None:
    with_norms = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    without = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GroupNorm(1, 2))
    recalibrating = get_unlearner("finetune", {"recalibrate_norms": True})
    assert isinstance(recalibrating, GradientUnlearner)
    assert not recalibrating.shares_prefixes(with_norms)
    assert recalibrating.shares_prefixes(without)
    kept = get_unlearner("finetune", {"recalibrate_norms": False})
    assert isinstance(kept, GradientUnlearner)
    assert kept.shares_prefixes(with_norms)
    scrub = get_unlearner("scrub", {"forget_steps": 2})
    assert isinstance(scrub, GradientUnlearner)
    assert scrub.shares_prefixes(without)


@pytest.mark.parametrize("base", [{}, {"head_refit_steps": 1}])
def test_budgets_are_scored_once_each_in_increasing_order(base: dict[str, int]) -> None:
    """Mutation review: budgets given out of order ([3, 2, 2]) ran the last one's length only
    (2 steps) when they were not sorted first, and budget 3 was never scored, silently; the
    command line sorts its --checkpoints, the Python API did not have to."""
    from torch import nn

    from mtunlearn_ext import ForgetRequest
    from mtunlearn_ext.api import build_problem
    from mtunlearn_ext.tuning import score_budgets

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g)
    y = {"a": torch.randint(0, 3, (30,), generator=g), "b": torch.randn(30, 1, generator=g)}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.trunk, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 1)

        def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            z = self.trunk(inputs).relu()
            return {"a": self.a(z), "b": self.b(z)}

    problem = build_problem(Net(), tasks={"a": "classification", "b": "regression"},
                            train_data=(x, y), forget_request=ForgetRequest.create(range(5)),
                            shared_parameters=lambda n: n.startswith("trunk."))
    scored: list[int] = []
    score_budgets("finetune", {"lr": 1e-2, **base}, [3, 2, 2], problem,
                  lambda steps, model, seconds: scored.append(steps))
    assert scored == [2, 3]


def test_a_grid_point_that_diverged_is_written_with_a_null_gap(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A learning rate that makes the run diverge scores gap inf (the retrain gap of a model
    with non-finite metrics): the strict JSON writer refused it after the whole grid had run
    ("Out of range float values are not JSON compliant: inf"), a traceback and no output."""
    import json

    out = tmp_path / "t.json"
    assert main(["--benchmark", "digits", "--size", "tiny", "--request", "partial",
                 "--target-tasks", "digit", "--methods", "neggrad_plus", "--lrs", "1e30",
                 "--checkpoints", "1", "--output", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--threads", "1"]) == 0
    assert "gap=    inf" in capsys.readouterr().out  # the run did diverge

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    result = json.loads(out.read_text(), parse_constant=refuse)
    assert [r["gap"] for r in result["records"] if r["method"] == "neggrad_plus"] == [None]
    assert result["best"]["neggrad_plus"]["gap"] is None


def _small_grid(tmp_path: Path) -> ExperimentConfig:
    return ExperimentConfig(benchmark="digits", size="tiny", request="partial",
                            target_tasks=["digit"], methods=["finetune"], seed=0,
                            output=str(tmp_path / "r.json"), cache_dir=str(tmp_path / "cache"),
                            threads=1)


def test_tune_prints_nothing_and_hands_each_record_to_its_progress_callback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tune() printed a line per grid point on stdout, in the middle of the output of any
    program that called it; it now prints nothing, and ``progress`` gets each record."""
    config = _small_grid(tmp_path)
    silent = tune(config, [1e-2], [1, 2], retain_eval=20)
    assert capsys.readouterr() == ("", "")

    received: list[dict[str, Any]] = []
    result = tune(config, [1e-2], [1, 2], retain_eval=20, progress=received.append)
    assert capsys.readouterr() == ("", "")
    assert received == result["records"]
    assert [(r["method"], r.get("steps")) for r in received] == [
        ("original", None), ("finetune", 1), ("finetune", 2)]
    assert [r["gap"] for r in received] == [r["gap"] for r in silent["records"]]
    received[1]["settings"]["lr"] = 99.0  # the callback's copy, not the result's record
    assert result["records"][1]["settings"]["lr"] == 1e-2


class _Enough(Exception):
    pass


def test_an_exception_in_the_progress_callback_stops_the_grid(tmp_path: Path) -> None:
    seen: list[str] = []

    def stop_after_the_original(record: dict[str, Any]) -> None:
        seen.append(record["method"])
        if record["method"] != "original":
            raise _Enough

    with pytest.raises(_Enough):
        tune(_small_grid(tmp_path), [1e-2, 1e-3], [1, 2], retain_eval=20,
             progress=stop_after_the_original)
    assert seen == ["original", "finetune"]
    with pytest.raises(TypeError, match="`progress` must be a callable"):
        tune(_small_grid(tmp_path), [1e-2], [1], progress=True)  # type: ignore[arg-type]


def test_the_command_line_still_prints_a_line_per_scored_point_then_the_best(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lines the command line printed before tune() went quiet, character for character,
    rebuilt from the records its --output holds."""
    import json

    out = tmp_path / "t.json"
    assert main(["--benchmark", "digits", "--size", "tiny", "--request", "partial",
                 "--target-tasks", "digit", "--methods", "finetune", "--lrs", "1e-2",
                 "--checkpoints", "2,1", "--retain-eval", "20", "--output", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    original, *grid = result["records"]
    best = result["best"]["finetune"]
    expected = [f"original         gap={original['gap']:7.3f} (the untouched model)",
                *(f"finetune         lr=0.01     steps={r['steps']:<4d} gap={r['gap']:7.3f} "
                  f"({r['seconds']:.0f}s)" for r in grid),
                "best settings (--method-config):",
                json.dumps({"finetune": best["settings"]}),
                f"  finetune         gap={best['gap']:.3f}"]
    assert [r["steps"] for r in grid] == [1, 2]
    assert capsys.readouterr().out == "\n".join(expected) + "\n"
