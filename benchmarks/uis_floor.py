"""The UIS floor of the evaluation's benchmarks, beside the targets and the measured UIS.

    python benchmarks/uis_floor.py --recipe memorising --seeds 0,1,2,3,4,5,6
    python benchmarks/uis_floor.py --seeds 0 --sizes 60,120,240,480 --pool 2000

For every benchmark and seed, the cached original model (the one ``unlearning_eval.py`` trained;
trained here if the cache lacks it) is scored by :func:`mtunlearn_ext.metrics.uis_floor`: its
test-split score ``O_t`` against random forget sets of ``n`` instances it never saw (fresh scenes
of the same generator, :func:`mtunlearn_ext.data.unseen_instances`), with its test score left
as it is. That is the UIS of an ideal unlearner whose forget pairs look exactly like unseen data
and whose test score does not move: full requests over every task, partial requests over the
target task (``segmentation``). ``n`` defaults to the evaluation's forget set (10% of the
training split: 60 instances on ``small``).

With ``--eval-dir`` (the evaluation's output, default ``runs/unlearning_eval`` for the
default recipe, else ``runs/unlearning_eval_<recipe>``) the table also shows, per request, the
UIS target (0.7x / 0.5x the best baseline's), the method's UIS, the best baseline's and the
retrained model's, means over the same seeds. Nothing here is tuned or selected: the floor is
a property of the benchmark, the forget-set size and the original model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import _eval_common as cells  # noqa: E402

from mtunlearn_ext._io import write_text_atomic  # noqa: E402
from mtunlearn_ext.data import unseen_instances  # noqa: E402
from mtunlearn_ext.experiment import ExperimentConfig, prepare_experiment  # noqa: E402
from mtunlearn_ext.metrics import evaluate, uis_floor  # noqa: E402
from mtunlearn_ext.unlearning.presets import RECIPES  # noqa: E402

RATIO = {"full": 0.7, "partial": 0.5}


def floors_for_seed(benchmark: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """request -> size -> the floor's summary, for one benchmark and seed."""
    config = ExperimentConfig(
        benchmark=benchmark, size=args.size, request="full", forget_fraction=0.1, methods=[],
        seed=seed, output=os.devnull, cache_dir=args.cache_dir,
        train_overrides=dict(RECIPES[args.recipe]), threads=args.threads, progress=False)
    prepared = prepare_experiment(config)
    model, test = prepared.original, prepared.benchmark.test
    pool = unseen_instances(benchmark, args.pool, seed=seed, size=args.size)
    original_test = evaluate(model, test)
    sizes = args.sizes or [len(prepared.forget)]
    out: dict[str, Any] = {"evaluation_forget_size": len(prepared.forget)}
    for request in ("full", "partial"):
        tasks = None if request == "full" else [cells.PARTIAL_TASK]
        for n in sizes:
            floor = uis_floor(model, test, pool, n, tasks=tasks, draws=args.draws, seed=seed,
                              original_test=original_test)
            out.setdefault(request, {})[str(n)] = {
                "mean": floor.mean, "q05": floor.quantile(0.05), "q95": floor.quantile(0.95),
                "forget_change": floor.forget_change}
    return out


def measured(args: argparse.Namespace, benchmark: str, request: str
             ) -> dict[str, float] | None:
    """Mean UIS over ``seeds`` of the method, the best baseline, the retrained and the
    untouched model, from the evaluation's run files (None when any is missing)."""
    seeds = args.seeds
    per_model: dict[str, list[float]] = {}
    for seed in seeds:
        path = cells.evaluation_run(args, benchmark, request, seed)
        if not path.is_file():
            return None
        models = json.loads(path.read_text())["models"]
        for name in (cells.METHOD, "original", "retrained", *cells.STEP_BASELINES):
            if name in models and "uis" in models[name]:
                # null: a seed on which the model diverged, as bad as unlearning_eval counts
                # it (float(None) raised here)
                value = models[name]["uis"]
                per_model.setdefault(name, []).append(math.inf if value is None else float(value))
    means = {m: sum(v) / len(v) for m, v in per_model.items() if len(v) == len(seeds)}
    for name in sorted(set(per_model) - set(means)):
        print(f"uis_floor: {benchmark}/{request}: {name} left out (not on every seed)",
              file=sys.stderr)
    baselines = {m: means[m] for m in cells.STEP_BASELINES if m in means}
    if cells.METHOD not in means or not baselines:
        return None
    best = min(baselines, key=baselines.__getitem__)
    return {"method": means[cells.METHOD], "best_baseline": baselines[best], "best_name": best,
            "retrained": means.get("retrained", float("nan")),
            "original": means.get("original", float("nan")),
            "target": RATIO[request] * baselines[best]}


def table(results: dict[str, dict[int, Any]], args: argparse.Namespace) -> str:
    """The floors beside the evaluation's figures; those are shown on the rows of the
    evaluation's own forget-set size only (they were measured at that ``n``)."""
    seeds = args.seeds
    lines = [f"UIS floor: the original model untouched, forget sets of unseen instances "
             f"(recipe {args.recipe}, seeds {seeds}, {args.draws} draws each, pool "
             f"{args.pool}); mean over seeds of each seed's mean [mean of the 5% / 95% "
             f"draw quantiles]", ""]
    header = ("| benchmark / request | n | floor | target | method | best baseline | "
              "retrained | untouched |")
    lines += [header, "|---|---|---|---|---|---|---|---|"]
    for benchmark, per_seed in results.items():
        if not all(s in per_seed for s in seeds):
            raise ValueError(f"uis_floor: {benchmark} lacks seeds {seeds}")
        for request in ("full", "partial"):
            known = measured(args, benchmark, request)
            for n in per_seed[seeds[0]][request]:
                def mean(key: str) -> float:
                    return sum(per_seed[s][request][n][key] for s in seeds) / len(seeds)
                cells = [f"{benchmark} / {request}", n,
                         f"{mean('mean'):.2f} [{mean('q05'):.2f}, {mean('q95'):.2f}]"]
                evaluated = all(per_seed[s]["evaluation_forget_size"] == int(n) for s in seeds)
                if known is None or not evaluated:
                    cells += ["-"] * 5
                else:
                    cells += [f"{known['target']:.2f}", f"{known['method']:.2f}",
                              f"{known['best_baseline']:.2f} ({known['best_name']})",
                              f"{known['retrained']:.2f}", f"{known['original']:.2f}"]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cells.add_cell_arguments(parser)
    parser.add_argument("--sizes", default="",
                        help="forget-set sizes n (default: the evaluation's forget set)")
    parser.add_argument("--pool", type=int, default=1000, help="unseen instances per seed")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--table-from", default=None,
                        help="print the table of a --json file written before (no computing)")
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        for key in ("benchmarks", "size", "recipe", "seeds", "sizes", "pool", "draws"):
            setattr(args, key, saved["args"][key])
        args.eval_dir = args.eval_dir or cells.evaluation_dir(args.recipe)
        floors = {b: {int(seed): v for seed, v in per_seed.items()}
                  for b, per_seed in saved["floors"].items()}
        print(table(floors, args))
        return 0
    cells.parse_cells(parser, args)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    torch.set_num_threads(args.threads)
    results: dict[str, dict[int, Any]] = {}
    for benchmark in args.benchmarks:
        for seed in args.seeds:
            results.setdefault(benchmark, {})[seed] = floors_for_seed(benchmark, seed, args)
            print(f"[uis_floor] {benchmark} seed {seed}: " + ", ".join(
                f"{r} n={n} {v['mean']:.2f}" for r in ("full", "partial")
                for n, v in results[benchmark][seed][r].items()), flush=True)
    text = table(results, args)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(
            {"args": {k: v for k, v in vars(args).items()}, "floors": results, "table": text},
            indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
