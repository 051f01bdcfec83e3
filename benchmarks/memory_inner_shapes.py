"""``inner_list`` at the shapes of the instance memory's step, beside a BLAS product on flat copies.

    python benchmarks/memory_inner_shapes.py                 # 48 tensors of 4718 values, 1 thread

The interference-aware step with ``instance_memory = 5`` and 32 per-sample rows makes three
``inner_list`` calls (indoor full request, a 227k-parameter model): the memory's Gram update
(32 new rows against up to 192 remembered rows), the forget direction against the remembered
rows (192 x 1) and the conflict count (1 x 32). This prints each shape's time in the registered
op (per-parameter tensors, no copy) and in ``A @ B.T`` on tensors concatenated beforehand (the
concatenation not timed), best of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import mtunlearn_ext  # noqa: F401  (registers the ops)

SHAPES = ((32, 192), (192, 1), (1, 32))


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=48)
    parser.add_argument("--values", type=int, default=4718, help="values per tensor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.tensors} tensors x {args.values} values, {args.threads} thread(s), "
          f"best of {args.repeats}\n")
    print("| rows x rows | inner_list (ms) | flat A @ B.T (ms) | MB read |")
    print("|---|---|---|---|")
    for m, k in SHAPES:
        a = [torch.randn(m, args.values, generator=generator) for _ in range(args.tensors)]
        b = [torch.randn(k, args.values, generator=generator) for _ in range(args.tensors)]
        flat_a, flat_b = torch.cat(a, 1), torch.cat(b, 1)
        ours = best_ms(lambda: torch.ops.mtunlearn.inner_list(a, b, False), args.repeats)
        blas = best_ms(lambda: flat_a @ flat_b.T, args.repeats)
        megabytes = 4 * (m + k) * flat_a.shape[1] / 1e6
        print(f"| {m} x {k} | {ours:.1f} | {blas:.1f} | {megabytes:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
