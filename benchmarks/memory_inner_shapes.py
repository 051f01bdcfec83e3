"""``inner_list`` at the shapes of the instance memory's step, beside a BLAS product on flat copies.

    python benchmarks/memory_inner_shapes.py                 # 48 tensors of 4718 values, 1 thread

The interference-aware step with ``instance_memory = 5`` and 32 per-sample rows makes three
``inner_list`` calls (indoor full request, a 227k-parameter model): the memory's Gram update
(32 new rows against up to 192 remembered rows), the forget direction against the remembered
rows (192 x 1) and the conflict count (1 x 32). This prints each shape's time in the registered
op (per-parameter tensors, no copy) and in ``A @ B.T`` on tensors concatenated beforehand (the
concatenation not timed), best of ``--repeats`` calls. With ``--isa`` (default: every
instruction set this CPU runs, see ``mtunlearn_ext.ops.cpu_isa``) one column per variant of the
CPU kernels, alternately in the same run; ``--shapes`` adds Gram and inner-product shapes
(``32x192``, ``gram64``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from mtunlearn_ext import ops  # registers the ops

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
    parser.add_argument("--isa", default=None,
                        help="comma-separated CPU kernel variants to time (default: every one "
                             "this CPU runs, from avx2 up)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shapes: MxK (inner_list) or gramM (gram_list); "
                             "default: the instance memory's 32x192,192x1,1x32")
    args = parser.parse_args(argv)
    runnable = ops.CPU_ISAS[:ops.CPU_ISAS.index(ops.cpu_isa()["detected"]) + 1]
    isas = args.isa.split(",") if args.isa else [i for i in runnable if i != "baseline"] or ["baseline"]
    for isa in isas:
        if isa not in runnable:
            parser.error(f"--isa: {isa!r} is not one this CPU runs ({', '.join(runnable)})")
    shapes: list[tuple[str, int, int]] = []
    for spec in (args.shapes.split(",") if args.shapes else [f"{m}x{k}" for m, k in SHAPES]):
        if spec.startswith("gram"):
            shapes.append(("gram", int(spec[4:]), int(spec[4:])))
        else:
            m, k = (int(v) for v in spec.split("x"))
            shapes.append(("inner", m, k))
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.tensors} tensors x {args.values} values, {args.threads} thread(s), "
          f"best of {args.repeats}\n")
    columns = " | ".join(f"{isa} (ms)" for isa in isas)
    print(f"| op | rows x rows | {columns} | flat BLAS (ms) | MB read |")
    print("|---|---|" + "---|" * len(isas) + "---|---|")
    for kind, m, k in shapes:
        a = [torch.randn(m, args.values, generator=generator) for _ in range(args.tensors)]
        flat_a = torch.cat(a, 1)
        if kind == "gram":
            def call() -> object:
                return torch.ops.mtunlearn.gram_list(a, False)

            def blas() -> object:
                return flat_a @ flat_a.T
            megabytes = 4 * m * flat_a.shape[1] / 1e6
        else:
            b = [torch.randn(k, args.values, generator=generator) for _ in range(args.tensors)]
            flat_b = torch.cat(b, 1)

            def call() -> object:
                return torch.ops.mtunlearn.inner_list(a, b, False)

            def blas() -> object:
                return flat_a @ flat_b.T
            megabytes = 4 * (m + k) * flat_a.shape[1] / 1e6
        best = {isa: float("inf") for isa in isas}
        for _ in range(args.repeats):  # alternate the variants, so that load drifts hit all
            for isa in isas:
                with ops.cpu_isa_limit(isa):
                    best[isa] = min(best[isa], best_ms(call, 1))
        times = " | ".join(f"{best[isa]:.1f}" for isa in isas)
        name = "gram_list" if kind == "gram" else "inner_list"
        print(f"| {name} | {m} x {k} | {times} | {best_ms(blas, args.repeats):.1f} | "
              f"{megabytes:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
