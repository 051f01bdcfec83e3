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

__all__ = ["ROOT", "held_out_of", "held_out_stream", "run_evaluation"]


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


def run_evaluation() -> None:
    """``benchmarks/unlearning_eval.py`` with this process's arguments (the script's variant
    is registered by then)."""
    import unlearning_eval

    raise SystemExit(unlearning_eval.main(sys.argv[1:]))
