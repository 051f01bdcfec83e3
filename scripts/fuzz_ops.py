"""Fuzz the ops: random shapes (incl. empty), strides, dtypes and NaN/Inf injections.

Each case must give either a correct result (against a float64 reference) or a clear error
(``TypeError`` / ``ValueError`` / ``FloatingPointError`` naming an argument); anything else --
a crash, another exception, or a wrong answer without an error -- is counted as a failure.

Usage: ``python scripts/fuzz_ops.py [--cases 3000] [--seed 0] [--device cuda]``. Inputs are drawn
on the CPU (the same cases for every device) and moved to ``--device``; references stay float64 on
the CPU. benchmarks/gpu_check.py runs it on CUDA, also under compute-sanitizer.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import torch

from mtunlearn_ext import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _tensor(rng: random.Random, k: int, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _cpu_tensor(rng, k, n, dtype).to(device)


def _cpu_tensor(rng: random.Random, k: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    layout = rng.choice(["contiguous", "slice", "transpose"])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if layout == "slice":
        x = torch.randn(k, 2 * n + 1, generator=g, dtype=torch.float64)[:, ::2][:, :n]
        return x.to(dtype)
    if layout == "transpose":
        return torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype).t()
    return torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype)


def one_case(rng: random.Random, device: str = "cpu") -> str:
    """Run one random case; return its outcome label (``ok``, ``error:<type>``) or raise."""
    op = rng.choice(["gram", "inner", "project_out", "project_nonconflicting", "gram_list"])
    k, n, m = rng.randint(0, 6), rng.choice([0, 1, 3, 17, 100]), rng.randint(1, 3)
    if rng.random() < 0.1:  # past the register paths (k > 16) and into the block solvers (k >= 32)
        k = rng.randint(17, 40)
    dtype = rng.choice(DTYPES)
    other = rng.choice(DTYPES) if rng.random() < 0.1 else dtype
    x = _tensor(rng, k, n, dtype, device)
    y = _tensor(rng, m, n, other, device)
    inject = rng.random() < 0.15 and x.numel() > 0
    if inject:
        x = x.clone()
        x[rng.randrange(k), rng.randrange(n)] = rng.choice([float("nan"), float("inf")])
    try:
        if op == "gram":
            out, ref = ops.gram(x), x.double().cpu() @ x.double().cpu().T
        elif op == "gram_list":
            out = ops.gram_list([x, _tensor(rng, k, 4, other, device)]) if k else ops.gram(x)
            ref = None
        elif op == "inner":
            out, ref = ops.inner(y, x), y.double().cpu() @ x.double().cpu().T
        elif op == "project_out":
            if k == 0:
                return "skipped"
            out, ref = ops.project_out(y, x), None
        else:
            if k == 0:
                return "skipped"
            out, ref = ops.project_nonconflicting(y, x), None
    except (TypeError, ValueError, FloatingPointError) as error:
        expected = inject or other != dtype or (op in ("project_out", "project_nonconflicting")
                                                and dtype != other)
        label = f"error:{type(error).__name__}"
        if not expected and not (op.startswith("project") and dtype in (torch.float16,
                                                                         torch.bfloat16)):
            raise AssertionError(f"{op} {dtype}/{other} k={k} n={n}: unexpected {error}")
        return label
    if inject and x.numel() and out.numel():
        raise AssertionError(f"{op}: NaN/Inf input gave a result without an error")
    if not bool(torch.isfinite(out).all()):
        raise AssertionError(f"{op}: non-finite result from finite inputs")
    if ref is not None:
        scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0) * max(1, n)
        if not torch.allclose(out.double().cpu(), ref, atol=TOL[dtype] * scale, rtol=0):
            raise AssertionError(f"{op} {dtype} k={k} n={n}: wrong result")
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    for _ in range(args.cases):
        try:
            outcomes[one_case(rng, args.device)] += 1
        except Exception as error:  # every other outcome is a failure, listed below
            outcomes["FAIL"] += 1
            failures.append(f"{type(error).__name__}: {error}")
    print(dict(outcomes))
    for f in failures[:20]:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
