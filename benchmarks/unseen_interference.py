"""Interference of the forget step with unseen data, on the evaluation's cached models.

    python benchmarks/unseen_interference.py                          # memorising, full, seed 0
    python benchmarks/unseen_interference.py --recipe default --request partial --seed 1

For each benchmark, the interference matrix (:func:`mtunlearn_ext.unlearning.interference.
interference_matrix`) of the request with the method's preset settings, on the original model:
the cosine of each target task's forget gradient with each task's retain gradient and with its
loss gradient on the benchmark's validation split (``unseen/<task>``: instances no model trained
on, never scored by the evaluation), before and after the projections. A negative
forget/unseen cosine means that forgetting raises that task's loss on unseen data, the
test-score change that UIS counts. Each displayed gradient is a mean over up to ``--rows`` rows
of its set (one batch's cosines change sign from batch to batch); the instance step here is
one batch's per-sample gradients (``--batch-size``), without the instance memory a run
accumulates. Reads the cached
original and retrained models (trains them if missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mtunlearn_ext.experiment import ExperimentConfig, prepare_experiment  # noqa: E402
from mtunlearn_ext.unlearning.interference import interference_matrix  # noqa: E402
from mtunlearn_ext.unlearning.interference_aware import InterferenceAwareConfig  # noqa: E402
from mtunlearn_ext.unlearning.presets import RECIPES, tuned_settings  # noqa: E402

METHOD = "interference_aware"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", default="indoor,street")
    parser.add_argument("--size", default="small")
    parser.add_argument("--request", choices=["full", "partial"], default="full")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="memorising")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--partial-task", default="segmentation")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=128,
                        help="rows of each set that a displayed gradient averages")
    parser.add_argument("--cache-dir", default=".cache/mtunlearn")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the evaluation's setting
    settings = tuned_settings(args.request, [METHOD], args.recipe)[METHOD]
    for benchmark in args.benchmarks.split(","):
        config = ExperimentConfig(
            benchmark=benchmark, size=args.size, request=args.request, forget_fraction=0.1,
            target_tasks=[args.partial_task] if args.request == "partial" else None,
            methods=[], method_configs={}, seed=args.seed, output="unused.json",
            cache_dir=args.cache_dir, train_overrides=dict(RECIPES[args.recipe]),
            threads=1, progress=False)
        problem = prepare_experiment(config).problem(config)
        matrix = interference_matrix(problem, InterferenceAwareConfig(**settings),
                                     batch_size=args.batch_size, rows=args.rows)
        forget = [i for i, label in enumerate(matrix.labels) if label.startswith("forget/")]
        others = [j for j in range(len(matrix.labels)) if j not in forget]
        print(f"\n{benchmark}/{args.request} seed {args.seed} ({args.recipe}): cosine before "
              f"-> after the projections")
        print("| forget row | " + " | ".join(matrix.labels[j] for j in others) + " |")
        print("|---" * (len(others) + 1) + "|")
        for i in forget:
            cells = [f"{float(matrix.before[i, j]):+.3f} -> {float(matrix.after[i, j]):+.3f}"
                     for j in others]
            print(f"| {matrix.labels[i]} | " + " | ".join(cells) + " |")
        kept = ", ".join(f"{t} {v:.2f}" for t, v in matrix.forget_kept.items())
        print(f"share of each forget gradient kept: {kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
