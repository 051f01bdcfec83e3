"""How far a second retrained model lands from the gold one: the run-to-run noise of retraining.

    python benchmarks/retrain_noise.py --recipe memorising --seeds 0,1,2,3,4,5,6 --jobs 2

For every benchmark, request and seed of the evaluation, the gold model is retrained once more
on the same retain pairs from the same initialisation, with another seed for the batch order
(``retrain`` with ``{"seed": offset + seed}``), and scored by the evaluation's own harness:
its retrain gap to the gold model, its UIS, and its attack-AUC distance. A method whose gap is
near that second model's is as close to the gold model as retraining itself lands from run to
run; differences between methods well below it are not resolved by one gold model per seed.

With ``--eval-dir`` (default ``runs/unlearning_eval`` for the default recipe, else
``runs/unlearning_eval_<recipe>``) the table also shows the method's and the best baseline's
gaps over the same seeds. Run files go to ``runs/retrain_noise_<recipe>/`` and a finished one
is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _eval_common as cells  # noqa: E402

from mtunlearn_ext.experiment import ExperimentConfig, run_experiment  # noqa: E402
from mtunlearn_ext.unlearning.presets import RECIPES  # noqa: E402


def run_one(benchmark: str, request: str, seed: int, args: argparse.Namespace) -> Path:
    """The experiment file of one second gold model (kept when it exists)."""
    output = Path(args.output_dir) / f"{benchmark}-{request}-seed{seed}.json"
    if output.is_file():
        return output
    config = ExperimentConfig(
        benchmark=benchmark, size=args.size, request=request, forget_fraction=0.1,
        target_tasks=[cells.PARTIAL_TASK] if request == "partial" else None, methods=["retrain"],
        method_configs={"retrain": {"seed": args.seed_offset + seed}}, seed=seed,
        output=str(output), cache_dir=args.cache_dir,
        train_overrides=dict(RECIPES[args.recipe]), threads=1, progress=False)
    run_experiment(config)
    return output


def _job(job: tuple[str, str, int, argparse.Namespace]) -> str:
    return str(run_one(*job))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary(args: argparse.Namespace) -> str:
    lines = [f"A second gold model (retrained with batch-order seed {args.seed_offset} + seed, "
             f"same initialisation) against the gold model, recipe {args.recipe}, seeds "
             f"{args.seeds}; means over the seeds (min-max over seeds in brackets)", "",
             "| benchmark / request | 2nd gold: gap | 2nd gold: UIS | 2nd gold: AUC distance | "
             "method gap | best baseline gap | gold UIS |", "|---|---|---|---|---|---|---|"]
    for benchmark in args.benchmarks:
        for request in ("full", "partial"):
            gaps, uis_values, distances, gold_uis = [], [], [], []
            method_gaps: list[float] = []
            baseline_gaps: dict[str, list[float]] = {}
            for seed in args.seeds:
                run = json.loads((Path(args.output_dir)
                                  / f"{benchmark}-{request}-seed{seed}.json").read_text())
                models = run["models"]
                gaps.append(models["retrain"]["retrain_gap"])
                uis_values.append(models["retrain"]["uis"])
                distances.append(abs(models["retrain"]["mia_auc"]
                                     - models["retrained"]["mia_auc"]))
                gold_uis.append(models["retrained"]["uis"])
                evaluated = cells.evaluation_run(args, benchmark, request, seed)
                if evaluated.is_file():
                    known = json.loads(evaluated.read_text())["models"]
                    if cells.METHOD in known:
                        method_gaps.append(known[cells.METHOD]["retrain_gap"])
                    for name in cells.STEP_BASELINES:
                        if name in known:
                            baseline_gaps.setdefault(name, []).append(known[name]["retrain_gap"])
            complete = {n: _mean(v) for n, v in baseline_gaps.items() if len(v) == len(args.seeds)}
            best = min(complete, key=complete.__getitem__) if complete else None
            method_cell = (f"{_mean(method_gaps):.2f}" if len(method_gaps) == len(args.seeds)
                           else "-")
            best_cell = f"{complete[best]:.2f} ({best})" if best else "-"
            lines.append(
                f"| {benchmark} / {request} | {_mean(gaps):.2f} [{min(gaps):.2f}, "
                f"{max(gaps):.2f}] | {_mean(uis_values):.2f} | {_mean(distances):.3f} | "
                f"{method_cell} | {best_cell} | {_mean(gold_uis):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cells.add_cell_arguments(parser)
    parser.add_argument("--seed-offset", type=int, default=1000,
                        help="the second gold model's batch-order seed is this plus the seed")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    parser.add_argument("--output-dir", default=None,
                        help="run files (default runs/retrain_noise_<recipe>)")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args(argv)
    cells.parse_cells(parser, args)
    args.output_dir = args.output_dir or f"runs/retrain_noise_{args.recipe}"
    if not args.summarize_only:
        jobs = [(b, r, s, args) for s in args.seeds for b in args.benchmarks
                for r in ("full", "partial")]
        if args.jobs > 1:
            import multiprocessing

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")
                                     ) as pool:
                for path in pool.map(_job, jobs):
                    print(f"[retrain_noise] {path}", flush=True)
        else:
            for job in jobs:
                print(f"[retrain_noise] {_job(job)}", flush=True)
    print(summary(args))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
