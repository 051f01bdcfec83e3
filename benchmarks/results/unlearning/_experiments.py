"""What the experiment scripts beside the tuning record share (``unseen_constraints.py``,
``held_out_anchor.py``): each registers a variant of the interference-aware method that uses
the problem's held-out instances, then runs ``benchmarks/unlearning_eval.py`` with its own
arguments. Importing this module makes the repository and ``benchmarks/`` importable."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from mtunlearn_ext.data.base import MultiTaskDataset  # noqa: E402
from mtunlearn_ext.unlearning.batches import BatchStream, child_generator  # noqa: E402

__all__ = ["ROOT", "held_out_of", "held_out_stream", "run_evaluation", "score_odd_validation_rows"]


def held_out_of(ctx: Any, method: str) -> MultiTaskDataset:
    """The problem's held-out instances; ``method`` refuses a problem without them."""
    if ctx.problem.held_out is None:
        raise ValueError(f"{method} needs a problem with held-out instances")
    return ctx.problem.held_out


def held_out_stream(ctx: Any, method: str, rows: int,
                    data: MultiTaskDataset | None = None) -> BatchStream:
    """A seeded stream of ``rows``-row batches of ``data`` (default: the problem's held-out
    instances), drawn from the method's generator."""
    return BatchStream(held_out_of(ctx, method) if data is None else data, rows,
                       child_generator(ctx.generator), ctx.problem.device)


def score_odd_validation_rows() -> None:
    """From now on the tuning scores the validation split on its odd positions only.

    A variant that uses held-out instances at even positions (``held_out_anchor.py`` with
    ``anchor_split = 2``) would otherwise be scored partly on instances it used; with this, the
    variant and its control (the same script at weight 0) are both scored on the other half.
    It wraps :func:`mtunlearn_ext.metrics.evaluate`, which the tuning imports when it runs, and
    recognises the validation split by identity with the benchmark's."""
    import torch

    import mtunlearn_ext.metrics as metrics
    from mtunlearn_ext.experiment import PreparedExperiment

    odd_rows: dict[int, Any] = {}  # id(the benchmark's validation split) -> its odd rows
    make_problem = PreparedExperiment.problem
    evaluate = metrics.evaluate

    def problem(self: PreparedExperiment, config: Any) -> Any:
        made = make_problem(self, config)
        held_out = made.held_out
        if held_out is not None:
            odd_rows.clear()
            odd_rows[id(held_out)] = (held_out,
                                      held_out.subset(torch.arange(1, len(held_out), 2)))
        return made

    def evaluate_odd(model: Any, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        entry = odd_rows.get(id(dataset))
        if entry is not None and entry[0] is dataset:
            dataset = entry[1]
        return evaluate(model, dataset, *args, **kwargs)

    PreparedExperiment.problem = problem  # type: ignore[method-assign]
    metrics.evaluate = evaluate_odd  # type: ignore[assignment]


def run_evaluation() -> None:
    """``benchmarks/unlearning_eval.py`` with this process's arguments (the script's variant
    is registered by then). ``--validation-rows odd`` (taken out before the script sees the
    arguments) scores the validation split on its odd positions only
    (:func:`score_odd_validation_rows`)."""
    import unlearning_eval

    argv = sys.argv[1:]
    if "--validation-rows" in argv:
        at = argv.index("--validation-rows")
        rows = argv[at + 1] if at + 1 < len(argv) else ""
        if rows not in ("all", "odd"):
            raise SystemExit(f"--validation-rows must be 'all' or 'odd', got {rows!r}")
        del argv[at:at + 2]
        if rows == "odd":
            score_odd_validation_rows()
    raise SystemExit(unlearning_eval.main(argv))
