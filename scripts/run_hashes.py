"""Digests of unlearned models, to show that a change left the unlearning path's bits alone.

Runs each method on one full and one partial request of a benchmark (its presets for the
recipe, with ``--steps`` optimisation steps to keep it short), seeded, one CPU thread, and prints
the first 8 hex digits of the unlearned model's state-dict SHA-256 per (method, request). Run it
before and after a change to code that should not move the method's numbers (a solver's speed, a
refactor): equal digests mean the same weights, bit for bit, on this machine and torch build.
The original and retrained models are cached in ``--cache-dir``, so only the first run trains.

Run (repository root)::

    .venv/bin/python scripts/run_hashes.py [--benchmark indoor] [--recipe memorising]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Digest this checkout's code, not whichever copy the interpreter has installed (an
    # editable install of another clone would otherwise be what a before/after check compares).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mtunlearn_ext  # noqa: E402
from mtunlearn_ext.api import state_dict_sha256  # noqa: E402
from mtunlearn_ext.experiment import ExperimentConfig, prepare_experiment  # noqa: E402
from mtunlearn_ext.unlearning import get_unlearner  # noqa: E402
from mtunlearn_ext.unlearning.presets import RECIPES, tuned_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="indoor")
    parser.add_argument("--size", default="small")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="memorising")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--methods", default="interference_aware,orthograd")
    parser.add_argument("--requests", default="full,partial")
    parser.add_argument("--cache-dir", default=".cache/mtunlearn")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)
    print(f"# mtunlearn_ext from {Path(mtunlearn_ext.__file__).parent}", flush=True)
    methods = args.methods.split(",")
    for request in args.requests.split(","):
        settings = tuned_settings(request, methods, args.recipe)
        config = ExperimentConfig(benchmark=args.benchmark, size=args.size, request=request,
                                  methods=methods, method_configs=settings, seed=args.seed,
                                  cache_dir=args.cache_dir,
                                  train_overrides=dict(RECIPES[args.recipe]), threads=1)
        prepared = prepare_experiment(config)
        problem = prepared.problem(config)
        for method in methods:
            unlearner = get_unlearner(method, {**settings.get(method, {}), "steps": args.steps})
            model = unlearner.unlearn(problem).model
            print(f"{method:<20} {request:<8} {state_dict_sha256(model)[:8]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
