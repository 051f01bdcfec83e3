"""Choosing a step-based method's learning rate and step budget: ``python -m mtunlearn_ext.tuning``.

For each method and each learning rate of a grid, one run of ``max(checkpoints)`` steps is made;
after each checkpoint step the model is evaluated on the forget pairs and on a fixed, seeded
subset of the retain pairs, and scored by its gap to the retrained model on those two splits
(:func:`mtunlearn_ext.metrics.retrain_gap`, without the membership attack). A run of ``s`` steps
is exactly the first ``s`` steps of a longer run (constant learning rate, the same seeded batch
streams), so one run per learning rate scores every step budget; where a run ends with work
of its own (``head_refit_steps``, or ``recalibrate_norms`` on a model with BatchNorm-style
running statistics) or sizes its phases by its length (SCRUB), each budget is run on its own.

Selection uses only training data (forget and retain pairs) and the retrained model, never the
test set: the test split and the attack (which needs test instances) are left for the
experiment. The command line prints a line per scored point as it goes, then the chosen
settings as a ``--method-config`` JSON for the experiment. In the ``--output`` JSON a value
that is not finite (the gap ``inf`` of a run that diverged, a NaN metric) is ``null``.

:func:`tune` itself prints nothing, so that it can run inside other programs: it hands each
scored point to its ``progress`` callback, if given (the command line passes one that prints
those lines).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtunlearn_ext._io import json_safe
from mtunlearn_ext.data.base import Benchmark
from mtunlearn_ext.experiment import (
    ExperimentConfig,
    build_parser as experiment_parser,
    checked_benchmark,
    config_from_args,
    experiment_threads,
    prepare_experiment,
    write_json_atomic,
)
from mtunlearn_ext.metrics import evaluate, retrain_gap
from mtunlearn_ext.unlearning import GradientUnlearner, UnlearningProblem, get_unlearner
from mtunlearn_ext.workflow import imported_or_exit

__all__ = ["TuningProgress", "main", "score_budgets", "tune"]


#: :func:`tune`'s ``progress`` callback: called with each record as it is scored.
TuningProgress = Callable[[dict[str, Any]], None]


def tune(config: ExperimentConfig, lrs: Sequence[float], checkpoints: Sequence[int],
         retain_eval: int = 200, base: dict[str, dict[str, Any]] | None = None,
         benchmark: Benchmark | None = None, *,
         progress: TuningProgress | None = None) -> dict[str, Any]:
    """Score every ``(method, lr, steps)`` of the grid; return the records and the best setting
    of each method (lowest forget+retain gap to the retrained model). ``benchmark``: the
    loaded data (default: loaded by name). Runs at ``config.threads`` (restored after).

    Prints nothing. ``progress``: called with each record as soon as it is scored, the
    untouched model's (``{"method": "original", "gap": ...}``) first, then each grid point's
    (``method``, ``lr``, ``steps``, ``gap``, ``seconds``, ``metrics``, ``settings``), in the
    order of ``result["records"]``; it gets a copy, so changing it changes no result. An
    exception it raises stops the grid there and propagates (a way to stop early). ``None``
    (the default): no report while the grid runs."""
    if progress is not None and not callable(progress):
        raise TypeError(f"tune: `progress` must be a callable taking each scored record, or "
                        f"None, got {progress!r}")
    with experiment_threads(config.threads):
        return _tune_grid(config, lrs, checkpoints, retain_eval, base, benchmark, progress)


def _tune_grid(config: ExperimentConfig, lrs: Sequence[float], checkpoints: Sequence[int],
               retain_eval: int, base: dict[str, dict[str, Any]] | None,
               benchmark: Benchmark | None, progress: TuningProgress | None
               ) -> dict[str, Any]:
    prepared = prepare_experiment(config, benchmark)
    problem = prepared.problem(config)
    generator = torch.Generator().manual_seed(config.seed)
    rows = torch.randperm(len(prepared.retain), generator=generator)[:retain_eval]
    splits = {"forget": prepared.forget, "retain": prepared.retain.subset(rows)}

    def scores(model: nn.Module) -> dict[str, Any]:
        return {name: evaluate(model, ds, None, config.eval_batch_size)  # type: ignore[arg-type]
                for name, ds in splits.items()}

    gold = scores(prepared.retrained)
    original = scores(prepared.original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        original_gap = retrain_gap(original, gold)
    records: list[dict[str, Any]] = []
    best: dict[str, dict[str, Any]] = {}

    def keep(entry: dict[str, Any]) -> None:
        records.append(entry)
        if progress is not None:
            progress(copy.deepcopy(entry))

    keep({"method": "original", "gap": original_gap})

    def record(method: str, lr: float, steps: int, settings: dict[str, Any], model: nn.Module,
               elapsed: float) -> None:
        metrics = scores(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gap = retrain_gap(metrics, gold)
        entry = {"method": method, "lr": lr, "steps": steps, "gap": gap, "seconds": elapsed,
                 "metrics": metrics, "settings": {**settings, "steps": steps}}
        keep(entry)
        if method not in best or gap < best[method]["gap"]:
            best[method] = entry

    for method in config.methods:
        for lr in lrs:
            settings = {**(base or {}).get(method, {}), "lr": lr}

            def scored(steps: int, model: nn.Module, seconds: float, method: str = method,
                       lr: float = lr, settings: dict[str, Any] = settings) -> None:
                record(method, lr, steps, settings, model, seconds)

            score_budgets(method, settings, checkpoints, problem, scored)
    return {"records": records, "best": {m: {"gap": r["gap"], "settings": r["settings"]}
                                         for m, r in best.items()},
            "gold": gold, "original": original}


def score_budgets(method: str, settings: Mapping[str, Any], budgets: Sequence[int],
                  problem: UnlearningProblem,
                  score: Callable[[int, nn.Module, float], None]) -> None:
    """Unlearn ``problem`` with the step-based ``method`` (``settings`` but ``steps``) at every
    step budget of ``budgets``, calling ``score(steps, model, seconds)`` once per budget, in
    increasing order. One run of the largest budget, watched after each budget's step, where
    an ``s``-step run is that run's first ``s`` steps
    (:meth:`~mtunlearn_ext.unlearning.GradientUnlearner.shares_prefixes`); else, where a run
    ends with work of its own (the heads' refit, SCRUB's phases), one run per budget, scored on
    the model it returns. ``model`` must not be changed; ``seconds`` counts from the run's
    start."""
    ordered = sorted(set(budgets))
    unlearner = get_unlearner(method, {**settings, "steps": ordered[-1]})
    if not isinstance(unlearner, GradientUnlearner):
        raise ValueError(f"tune: {method!r} is not a step-based method")
    if not unlearner.shares_prefixes(problem.model):
        for steps in ordered:
            start = time.perf_counter()
            result = get_unlearner(method, {**settings, "steps": steps}).unlearn(problem)
            score(steps, result.model, time.perf_counter() - start)
        return
    wanted = set(ordered)
    start = time.perf_counter()

    def watch(steps: int, model: nn.Module) -> None:
        if steps in wanted:
            score(steps, model, time.perf_counter() - start)

    unlearner.step_callbacks.append(watch)
    unlearner.unlearn(problem)


def _print_record(record: Mapping[str, Any]) -> None:
    """The command line's line for a scored record, flushed so that a log written through a
    pipe shows a long grid's progress as it comes."""
    if record["method"] == "original":
        print(f"{'original':16s} gap={record['gap']:7.3f} (the untouched model)", flush=True)
        return
    print(f"{record['method']:16s} lr={record['lr']:<8g} steps={record['steps']:<4d} "
          f"gap={record['gap']:7.3f} ({record['seconds']:.0f}s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid from the command line (``python -m mtunlearn_ext.tuning``; ``argv``: its
    arguments, default ``sys.argv[1:]``); returns the exit code (2: refused)."""
    parser = experiment_parser()
    parser.prog = "python -m mtunlearn_ext.tuning"
    parser.description = "Grid over learning rate and step budget for step-based methods."
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--checkpoints", default="10,25,50,100")
    parser.add_argument("--retain-eval", type=int, default=200,
                        help="retain instances scored at each checkpoint (seeded subset)")
    args = parser.parse_args(argv)
    imported_or_exit(parser, args.imports)
    config = config_from_args(args)
    try:
        lrs = [float(v) for v in args.lrs.split(",")]
        checkpoints = sorted(int(v) for v in args.checkpoints.split(","))
        if not all(math.isfinite(v) and v > 0 for v in lrs) or min(checkpoints) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --lrs / --checkpoints: expected positive numbers / step counts, got "
              f"{args.lrs!r} / {args.checkpoints!r}", file=sys.stderr)
        return 2
    benchmark = checked_benchmark(config)
    if benchmark is None:
        return 2
    config.methods = [m for m in config.methods if m != "retrain"]
    base = config.method_configs
    config.method_configs = {}
    result = tune(config, lrs, checkpoints, args.retain_eval, base, benchmark,
                  progress=_print_record)
    result["config"] = {"experiment": vars(args)}
    # A run that diverged scores gap inf (and may leave NaN metrics): JSON has neither, and the
    # strict writer refused them after the whole grid had run, writing nothing. They are null.
    write_json_atomic(config.output, json_safe(result))
    print("best settings (--method-config):")
    print(json.dumps({m: b["settings"] for m, b in result["best"].items()}))
    for m, b in result["best"].items():
        print(f"  {m:16s} gap={b['gap']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
