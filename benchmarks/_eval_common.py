"""Shared by the scripts that read the unlearning evaluation's cells (benchmark x request x seed):
their command-line arguments, the method / baseline names the evaluation reports, and how a
target's number is printed beside its verdict."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mtunlearn_ext.unlearning import BASELINES
from mtunlearn_ext.unlearning.presets import RECIPES

METHOD = "interference_aware"
#: The baselines an unlearned model is compared with (retraining is the gold standard).
STEP_BASELINES: tuple[str, ...] = tuple(b for b in BASELINES if b != "retrain")
PARTIAL_TASK = "segmentation"


def evaluation_dir(recipe: str) -> str:
    """Where benchmarks/unlearning_eval.py writes a recipe's evaluation unless told otherwise:
    ``runs/unlearning_eval`` for the default recipe, ``runs/unlearning_eval_<recipe>`` for the
    others (``runs/unlearning_eval_default``, read before, is a folder nothing writes)."""
    return "runs/unlearning_eval" if recipe == "default" else f"runs/unlearning_eval_{recipe}"


def add_cell_arguments(parser: argparse.ArgumentParser) -> None:
    """``--benchmarks --size --recipe --seeds --cache-dir --eval-dir``."""
    parser.add_argument("--benchmarks", default="indoor,street")
    parser.add_argument("--size", default="small")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="memorising")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache-dir", default=".cache/mtunlearn")
    parser.add_argument("--eval-dir", default=None,
                        help="the evaluation's output (default: runs/unlearning_eval for "
                             "the default recipe, else runs/unlearning_eval_<recipe>)")


def parse_cells(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn the comma lists of :func:`add_cell_arguments` into ``args.benchmarks`` (names) and
    ``args.seeds`` (ints), and default ``args.eval_dir``."""
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    args.eval_dir = args.eval_dir or evaluation_dir(args.recipe)


def evaluation_run(args: argparse.Namespace, benchmark: str, request: str, seed: int) -> Path:
    """The evaluation's run file of one cell."""
    return Path(args.eval_dir) / "runs" / f"{benchmark}-{request}-seed{seed}.json"


def on_the_verdicts_side(value: float, target: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, or with as many more as it takes for the printed
    number to differ from ``target`` (unless ``value`` is the target) and to fall on the same
    side of it: the verdicts are taken on unrounded numbers, and a ratio of 0.7004 printed
    "0.70 (target <= 0.7): NOT met" read as a contradiction (it now prints 0.7004; 0.6996,
    "0.70 ... met", now 0.6996)."""
    def misleading(shown: float) -> bool:
        return (shown == target != value) or ((shown <= target) != (value <= target))

    shown = f"{value:.{digits}f}"
    while math.isfinite(value) and digits < 15 and misleading(float(shown)):
        digits += 1
        shown = f"{value:.{digits}f}"
    return shown
