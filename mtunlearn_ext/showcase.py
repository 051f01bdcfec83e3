"""A short showcase of the compiled ops: correctness against float64 and time against the plain
PyTorch code a user would write, on one realistic gradient-surgery problem.

Run: ``python -m mtunlearn_ext.showcase [--k 8] [--n 4000000] [--samples 7]``.

Every row times two implementations of the same quantity: before timing, their results are
compared (the ``agreement`` column) and a pair that disagrees is not timed. Each side then gets
the same number of samples, interleaved (one call of each in turn, the order alternating), and
the speed-up is the ratio of their median times. (``benchmarks/compare.py`` measures more
carefully, against more baselines and the memory floor.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import mtunlearn_ext
from mtunlearn_ext import ops
from mtunlearn_ext.ops import _reference

#: Relative tolerance of the agreement check between an op and its baseline (float32): the same
#: quantity by different code (summation order, a ridge of 1e-6 against an exact
#: pseudo-inverse), plus rounding that grows with the row length (the baselines' float32
#: ``torch.mm`` sums rows of ``n`` values). The rule of ``benchmarks/_bench_common.py``.
AGREEMENT_TOLERANCE = 1e-3
ROUNDING_PER_VALUE = 1e-9


def _interleaved_medians(ours: Callable[[], object], baseline: Callable[[], object],
                         samples: int) -> tuple[float, float]:
    """Median seconds per call of ``ours`` and of ``baseline`` over ``samples`` calls each,
    taken in turn (the order alternating every round), after one untimed warm-up call each:
    a burst of load from elsewhere on the machine hits both alike, and neither side gets more
    chances at a lucky sample than the other."""
    ours()
    baseline()
    times: dict[int, list[float]] = {0: [], 1: []}
    calls = (ours, baseline)
    for round_ in range(samples):
        for side in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            calls[side]()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    a, b = actual.double(), expected.double()
    scale = float(b.norm())
    return float((a - b).norm()) / (scale if scale > 0 else 1.0)


def _pcgrad_loop(x: torch.Tensor, seed: int) -> torch.Tensor:
    """PCGrad as usually written: a Python loop over task pairs on the full vectors."""
    return _reference.pcgrad_textbook(x, seed)


def _pinv_project_out(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal-complement projection ``g - (g B^+) B`` with ``torch.linalg.pinv``."""
    return g - (g @ torch.linalg.pinv(basis)) @ basis


def _mm_scipy_nonconflicting(g: torch.Tensor, r: torch.Tensor, sign: int) -> torch.Tensor:
    """``project_nonconflicting``'s projection written the usual way: the Gram matrices with
    ``torch.mm``, the same dual problem, ``min_{w >= 0} w^T G w / 2 + c^T w`` with ``G = R R^T``
    and ``c = sign R g``, solved by SciPy's non-negative least squares on its Cholesky form
    (``G = L L^T``: ``w = argmin_{w >= 0} ||L^T w + L^-1 c||``), then ``d = g + sign w R``."""
    import numpy as np
    # SciPy ships no type information (mypy.ini lists no override for it).
    from scipy.linalg import cholesky, solve_triangular  # type: ignore[import-untyped]
    from scipy.optimize import nnls  # type: ignore[import-untyped]

    gram = (r @ r.T).double().numpy()
    c = sign * (r @ g.T).double().numpy()[:, 0]
    k = gram.shape[0]
    # A Gram of fewer values than rows is singular: the same relative jitter as GEM's quadprog
    # recipe (benchmarks/compare.py) makes it positive definite.
    gram = gram + 1e-9 * np.trace(gram) / k * np.eye(k)
    lower = cholesky(gram, lower=True)
    w, _ = nnls(lower.T, -solve_triangular(lower, c, lower=True))
    return g + sign * torch.from_numpy(w).to(r.dtype)[None] @ r


@dataclass
class _Row:
    name: str
    ours_s: float
    baseline_s: float
    agreement: float
    tolerance: float
    error: float

    @property
    def agrees(self) -> bool:
        return self.agreement <= self.tolerance  # NaN disagrees


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtunlearn_ext.showcase",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--k", type=int, default=8, help="number of gradient vectors (tasks)")
    parser.add_argument("--n", type=int, default=4_000_000, help="vector length (parameters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=7,
                        help="timed calls of each side of a row (interleaved; the median counts)")
    args = parser.parse_args(argv)
    # --n > --k: with no more values than vectors the retain rows span the whole space, so the
    # projections are zero (no agreement to check against) and the baseline's Gram is singular.
    if not 2 <= args.k <= 256 or args.n <= args.k or args.seed < 0 or args.samples < 1:
        parser.error(f"expected 2 <= --k <= 256 (the solvers' limit), --n > --k, --seed >= 0 and "
                     f"--samples >= 1, got {args.k}, {args.n}, {args.seed} and {args.samples}")

    info = mtunlearn_ext.build_info()
    print("mtunlearn_ext build:", {k: v for k, v in info.items() if k != "parallel_backend"})
    gen = torch.Generator().manual_seed(args.seed)
    k, n = args.k, args.n
    grads = torch.randn(k, n, generator=gen)
    grads[1:] -= 0.4 * grads[:1]  # conflicting tasks
    retain = torch.randn(k, n, generator=gen)
    forget = torch.randn(1, n, generator=gen)
    tolerance = AGREEMENT_TOLERANCE + ROUNDING_PER_VALUE * n

    rows: list[_Row] = []

    def add(name: str, ours: Callable[[], torch.Tensor], baseline: Callable[[], torch.Tensor],
            error: float) -> None:
        # Agreement first: a pair that computes different quantities is not timed.
        row = _Row(name, float("nan"), float("nan"),
                   _relative_difference(ours(), baseline()), tolerance, error)
        if row.agrees:
            row.ours_s, row.baseline_s = _interleaved_medians(ours, baseline, args.samples)
        rows.append(row)

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
    po_ref = _pinv_project_out(forget.double(), r64)
    add("project_out (orthogonal complement)", lambda: ops.project_out(forget, retain),
        lambda: _pinv_project_out(forget, retain),
        float((po.double() - po_ref).abs().max() / po_ref.abs().max()))
    nc = ops.project_nonconflicting(forget, retain, sign=-1)
    worst = float((nc.double() @ r64.T).max() / (nc.double().norm() * r64.norm(dim=1)).max())
    add("project_nonconflicting (GEM/UPGrad dual)",
        lambda: ops.project_nonconflicting(forget, retain, sign=-1),
        lambda: _mm_scipy_nonconflicting(forget, retain, sign=-1), max(worst, 0.0))

    print(f"\nk={k} vectors of n={n:,} fp32 values, {torch.get_num_threads()} threads, "
          f"{args.samples} interleaved samples per side")
    print(f"{'op':42s} {'ours (ms)':>10s} {'baseline (ms)':>14s} {'speed-up':>9s} "
          f"{'agreement':>10s} {'error':>10s}")
    for row in rows:
        if row.agrees:
            timing = (f"{row.ours_s * 1e3:10.2f} {row.baseline_s * 1e3:14.2f} "
                      f"{row.baseline_s / row.ours_s:8.1f}x")
        else:
            timing = f"{'-':>10s} {'-':>14s} {'-':>9s}"
        print(f"{row.name:42s} {timing} {row.agreement:10.2e} {row.error:10.2e}")
    print(f"\nbaselines: x @ x.T; the textbook PCGrad loop; pinv-based projection; torch.mm "
          f"Grams + the same dual QP solved by SciPy's NNLS.\nspeed-up: ratio of the median "
          f"times. agreement: ||ours - baseline|| / ||baseline||, checked before timing (at most "
          f"{tolerance:.1e}: the same quantity up to rounding).\nerror: relative max error "
          f"against float64 (project_nonconflicting: worst normalised <d, r_j>, must be <= 0 up "
          f"to rounding).")
    disagreeing = [row.name.split()[0] for row in rows if not row.agrees]
    if disagreeing:
        print(f"\nnot timed, the results disagree: {', '.join(disagreeing)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
