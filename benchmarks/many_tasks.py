"""UPGrad and MGDA with many tasks and few gradient entries (``k > n``: ``per_layer=True`` on a
bias smaller than the number of tasks), where the Gram matrix is singular, beside the same ``k``
with ``n = 10 k`` (a regular Gram). One call per row on a seeded random ``[k, n]`` matrix, one CPU
thread; ``min <d, g_j>`` is the worst inner product of the update with a task gradient (UPGrad's
and MGDA's updates conflict with no task: it is ``>= 0`` up to float32 rounding).

The dual solver's descent stops after 50 sweeps on a singular Gram and hands over to its exact
active-set method; before, it ran its whole budget first (12 s at ``[128, 40]`` and 261 s at
``[256, 40]`` for UPGrad on a loaded 2-core VM), and a hand-over at rank <= k / 2 only still
took 185 s at ``[256, 130]`` (``--ks 256 --n 130``; 5.6 s, then 3.4 s once the active set
kept its factor's leading rows when rows leave it). MGDA's CPU path, whose hull holds the
origin there, solves a bounded form of its QP instead of falling back to its iterative and
Python active-set solvers (1.6 s at ``[128, 40]``, 5.2 s at ``[256, 40]`` before).
docs/dropin.md quotes this script's figures.

Run (repository root)::

    .venv/bin/python benchmarks/many_tasks.py [--ks 64,128,256] [--n 40[,130,...]]
"""

from __future__ import annotations

import argparse
import time

import torch

from mtunlearn_ext.surgery import MGDA, UPGrad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="64,128,256")
    parser.add_argument("--n", default="40",
                        help="gradient entries, comma-separated (each beside n = 10 k)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'aggregator':<10} {'k':>4} {'n':>5} {'seconds':>8} {'min <d, g_j>':>13}")
    for k in (int(v) for v in args.ks.split(",")):
        for n in [int(v) for v in args.n.split(",")] + [10 * k]:
            matrix = torch.randn(k, n, generator=torch.Generator().manual_seed(k + n))
            for aggregator in (UPGrad(), MGDA()):
                start = time.perf_counter()
                update = aggregator(matrix)
                seconds = time.perf_counter() - start
                worst = float((matrix @ update).min())
                print(f"{type(aggregator).__name__:<10} {k:>4} {n:>5} {seconds:>8.3f} "
                      f"{worst:>13.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
