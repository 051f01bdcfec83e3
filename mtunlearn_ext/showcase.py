"""A short showcase of the compiled ops: correctness against float64 and time against the plain
PyTorch code a user would write, on one realistic gradient-surgery problem.

Run: ``python -m mtunlearn_ext.showcase [--k 8] [--n 4000000]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import mtunlearn_ext
from mtunlearn_ext import ops
from mtunlearn_ext.ops import _reference


def _best_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _pcgrad_loop(x: torch.Tensor, seed: int) -> torch.Tensor:
    """PCGrad as usually written: a Python loop over task pairs on the full vectors."""
    return _reference.pcgrad_textbook(x, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtunlearn_ext.showcase",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--k", type=int, default=8, help="number of gradient vectors (tasks)")
    parser.add_argument("--n", type=int, default=4_000_000, help="vector length (parameters)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 2 <= args.k <= 256 or args.n < 1 or args.seed < 0:
        parser.error(f"expected 2 <= --k <= 256 (the solvers' limit), --n >= 1 and --seed >= 0, "
                     f"got {args.k}, {args.n} and {args.seed}")

    info = mtunlearn_ext.build_info()
    print("mtunlearn_ext build:", {k: v for k, v in info.items() if k != "parallel_backend"})
    gen = torch.Generator().manual_seed(args.seed)
    k, n = args.k, args.n
    grads = torch.randn(k, n, generator=gen)
    grads[1:] -= 0.4 * grads[:1]  # conflicting tasks
    retain = torch.randn(k, n, generator=gen)
    forget = torch.randn(1, n, generator=gen)

    rows: list[tuple[str, float, float, float]] = []

    def add(name: str, ours: Callable[[], object], plain: Callable[[], object], err: float) -> None:
        rows.append((name, _best_time(ours), _best_time(plain), err))

    g64 = grads.double()
    add("gram  (k x k Gram)", lambda: ops.gram(grads), lambda: grads @ grads.T,
        float((ops.gram(grads).double() - g64 @ g64.T).abs().max() / (g64 @ g64.T).abs().max()))
    pc = ops.pcgrad(grads, seed=args.seed)
    pc_ref = _pcgrad_loop(g64, args.seed)
    add("pcgrad (whole step)", lambda: ops.pcgrad(grads, seed=args.seed),
        lambda: _pcgrad_loop(grads, args.seed),
        float((pc.double() - pc_ref).abs().max() / pc_ref.abs().max()))
    po = ops.project_out(forget, retain)
    r64 = retain.double()
    po_ref = forget.double() - (forget.double() @ torch.linalg.pinv(r64)) @ r64
    add("project_out (orthogonal complement)", lambda: ops.project_out(forget, retain),
        lambda: forget - (forget @ torch.linalg.pinv(retain)) @ retain,
        float((po.double() - po_ref).abs().max() / po_ref.abs().max()))
    nc = ops.project_nonconflicting(forget, retain, sign=-1)
    worst = float((nc.double() @ r64.T).max() / (nc.double().norm() * r64.norm(dim=1)).max())
    add("project_nonconflicting (GEM/UPGrad dual)",
        lambda: ops.project_nonconflicting(forget, retain, sign=-1),
        lambda: forget - (forget @ torch.linalg.pinv(retain)) @ retain, max(worst, 0.0))

    print(f"\nk={k} vectors of n={n:,} fp32 values, {torch.get_num_threads()} threads")
    print(f"{'op':42s} {'ours (ms)':>10s} {'plain torch (ms)':>17s} {'speed-up':>9s} {'error':>10s}")
    for name, ours, plain, err in rows:
        print(f"{name:42s} {ours * 1e3:10.2f} {plain * 1e3:17.2f} {plain / ours:8.1f}x {err:10.2e}")
    print("\nerror: relative max error against float64 (project_nonconflicting: worst normalised "
          "<d, r_j>, must be <= 0 up to rounding).\nplain torch: x @ x.T; the textbook PCGrad loop; "
          "pinv-based projection (also the stand-in for the dual QP).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
