"""Compiled gradient-surgery ops against the memory floor, plain ``torch.mm`` code, TorchJD and a
LibMTL-style PCGrad loop, in one process and one run.

For every case each contender is timed interleaved with the others and with the *memory floor*:
the time to read the case's inputs once, measured on the same tensors as the fastest of a few
plain reductions (``sum(dim=-1, dtype=float32)``, ``view(int).amax(dim=-1)``, ``sum()``,
``amax()``; see ``benchmarks/_bench_common.py`` for why several). Every timed contender of a case
gets the same number of samples in the same rounds (``--repeats``, or ``--cheap-samples`` when
every call of the case is cheap; the floor at least as many). Every time is reported with its
ratio to that floor (best / best floor); every baseline also with how many times faster our op
is, from the best samples and from the medians. The summary's and the targets' speed-ups are
ratios of **medians** (robust on this shared machine; the case tables give best/best too).

Agreement: before a case is timed, every baseline and the op it is paired with run once and
their results are compared (relative difference ``||ours - base|| / ||base||`` in float64,
``_bench_common.check_agreement``); a difference above the pair's tolerance (1e-3 for float32,
3e-2 for 16-bit dtypes, plus 1e-9 per value of the row length for the baselines' float32
``torch.mm`` rounding; looser only where the baseline is an approximate solver, with the reason
in the table) stops the run: a pair is only timed if both sides compute the same quantity.
PCGrad's result depends on the order in which each task visits the others, so for the check the
LibMTL-style loop and TorchJD's PCGrad are run in our op's order (seed 0); timed, they draw their
own orders as usual.

Cases (``--cases``):

- ``gram``: ``ops.gram(x)`` vs ``x @ x.T`` on ``x: [k, n]``.
- ``step``: whole surgery steps on ``x: [k, n]``, each against baselines of the same quantity:
  ``ops.pcgrad(x)`` against TorchJD's ``PCGrad`` and a LibMTL-style PCGrad loop;
  ``surgery.UPGrad()(x)`` against TorchJD's ``UPGrad`` (both: each of the ``k`` rows projected
  onto the dual cone, ``k`` QPs, summed); ``surgery.MGDA()(x)`` against TorchJD's ``MGDA``;
  ``ops.project_out(x[:1], x[1:])`` against ``torch.mm`` + ``torch.linalg.solve`` and a QR of
  the basis (OrthoGrad); ``ops.project_nonconflicting(x[:1], x[1:])`` (one row, one QP) against
  ``torch.mm`` + quadprog (the same non-conflicting dual). TorchJD's ``UPGrad`` computes ``k``
  projections, not ``project_nonconflicting``'s one, so the two are never paired.
- ``dtype``: the same ops on the same values in float32 and bfloat16, interleaved (bf16 target).
- ``gram_list``: ``ops.gram_list`` over a real backbone's parameter stacks (``--models``:
  ResNet-50, ViT-B/16) vs ``torch.cat`` + ``torch.mm`` and a per-parameter ``mm`` loop.
- ``combine_list``: ``ops.combine_list`` into ``.grad``-like buffers vs ``torch.cat`` + ``mm`` +
  split-copy and a per-parameter ``mv`` loop (the floor is the read of the stacks; writing the
  outputs adds ``1/k`` of it).
- ``step_list``: an end-to-end step on a parameter list (``gram_list`` -> solve ->
  ``combine_list`` into ``.grad``) vs ``torch.cat`` + TorchJD / LibMTL + split-copy.
- ``breakdown``: sub-steps (Gram pass, solve, combine pass, wrapper vs raw op) for profiling.

Peak memory (``--memory``): each selected case runs again in a fresh subprocess that measures,
per contender, the peak resident memory one call adds (``VmHWM`` reset through
``/proc/self/clear_refs``, glibc told to return freed blocks at once; see
``_bench_common.peak_extra_bytes``), reported as a fraction of the input size. A calibration row
(``x.clone()``) must read ~1.00x.

Usage (from the repository root)::

    .venv/bin/python benchmarks/compare.py --quick --json q.json --markdown q.md  # a few minutes
    .venv/bin/python benchmarks/compare.py --json full.json --markdown full.md        # default grid
    .venv/bin/python benchmarks/compare.py --k 8 16 --n 1e6 1e7 5e7 --dtype fp32 --cases gram

The default grid is ``--k 2 4 8 16 64 256 --n 1e5 1e6 1e7 --dtype fp32 bf16`` for the matrix
cases (``n = 5e7`` is opt-in); inputs larger than ``--max-input-gib`` are skipped, and so is a
contender whose estimated call time exceeds ``--budget`` seconds or whose extra memory would
exceed ``--max-extra-gib``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _bench_common as bc
import numpy as np
import torch

import mtunlearn_ext
from mtunlearn_ext import ops, surgery

CASE_KINDS = ("gram", "step", "directions", "dtype", "gram_list", "combine_list", "step_list",
              "breakdown")
RIDGE = 1e-6


@dataclass(frozen=True)
class CaseSpec:
    """One table row group: a case kind at one size and dtype."""

    kind: str
    dtype: str
    k: int
    n: int = 0
    model: str = ""

    def label(self) -> str:
        size = f"model={self.model}" if self.model else f"n={self.n:.0e}"
        return f"{self.kind} {self.dtype} k={self.k} {size}"


@dataclass
class Case:
    """The inputs of a case (read by the floor) and its contenders."""

    spec: CaseSpec
    inputs: list[torch.Tensor]
    contenders: list[bc.Contender]

    @property
    def input_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inputs)


# -- baselines on a flat [k, n] matrix -------------------------------------------------------------


def mm_project_out(g: torch.Tensor, basis: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """``g - a^T B`` with ``(B B^T + lambda I) a = B g^T``, written with ``torch.mm`` and
    ``torch.linalg.solve`` (float32 solve: torch has no bfloat16 solver)."""
    gram = (basis @ basis.T).float()
    rhs = (basis @ g.T).float()
    k = gram.shape[0]
    lam = ridge * gram.diagonal().sum() / k
    a = torch.linalg.solve(gram + lam * torch.eye(k), rhs)
    return g - a.T.to(basis.dtype) @ basis


def qr_project_out(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """OrthoGrad's projection: an orthonormal basis from a reduced QR of ``B^T`` (``[n, k]``),
    then ``g - (g Q) Q^T`` (float32 QR for low precision: torch has no bfloat16 QR)."""
    b = basis if basis.dtype in (torch.float32, torch.float64) else basis.float()
    q, _ = torch.linalg.qr(b.T)
    gq = g.to(q.dtype)
    return (gq - (gq @ q) @ q.T).to(g.dtype)


def mm_quadprog_nonconflicting(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``d = g + w R`` with ``w = argmin_{w >= 0} w^T G w / 2 + c^T w`` (``G = R R^T``,
    ``c = R g``): Gram matrices with ``torch.mm``, the dual with quadprog (GEM's recipe)."""
    import quadprog

    gram = (r @ r.T).double().numpy()
    c = (r @ g.T).double().numpy()[:, 0]
    k = gram.shape[0]
    gram = gram + 1e-9 * np.trace(gram) / k * np.eye(k)  # quadprog needs positive definite
    w = quadprog.solve_qp(gram, -c, np.eye(k), np.zeros(k))[0]
    return g + torch.from_numpy(w).to(r.dtype)[None] @ r


def _row_read_s(x: torch.Tensor) -> float:
    """Seconds to read one row of ``x`` (one quick sample, for cost estimates only)."""
    start = time.perf_counter()
    x.view(bc._INT_VIEW[x.element_size()]).amax(dim=-1)
    return (time.perf_counter() - start) / x.shape[0]


def _libmtl_est_s(k: int, row_s: float) -> float:
    # k (k - 1) dot products (2 rows each) and ~half of them an axpy with its norm (~6 rows).
    return k * (k - 1) * (2 + 0.5 * 6) * row_s


# -- case builders ---------------------------------------------------------------------------------


def _pcgrad_orders(k: int, seed: int = 0) -> list[list[int]]:
    """Our ops' PCGrad task orders for a seed (what the baselines are aligned to for the
    agreement check)."""
    return [ops.pcgrad_order(k, i, seed) for i in range(k)]


def _aligned_torchjd_pcgrad(aggregate: Callable[[], object], k: int) -> Callable[[], object]:
    """Run a TorchJD PCGrad call in our op's task orders (seed 0), for the agreement check."""
    def run() -> object:
        with bc.randperm_orders(_pcgrad_orders(k)):
            return aggregate()
    return run


MGDA_TOL = 5e-2
MGDA_NOTE = ("TorchJD's MGDA stops its Frank-Wolfe loop at a 1e-3 gap or 100 iterations; ours "
             "solves to optimality")
UPGRAD_NOTE = "TorchJD regularises the Gram (reg_eps 1e-4); ours projects on the exact cone"


def build_gram(spec: CaseSpec) -> Case:
    x = bc.task_gradients(spec.k, spec.n, bc.DTYPES[spec.dtype])
    return Case(spec, [x], [
        bc.Contender("ops.gram", lambda: ops.gram(x)),
        bc.Contender("torch.mm(x, x.T)", lambda: torch.mm(x, x.T), role="baseline",
                     vs="ops.gram"),
    ])


def build_step(spec: CaseSpec) -> Case:
    from torchjd import aggregation as tjd

    k = spec.k
    x = bc.task_gradients(k, spec.n, bc.DTYPES[spec.dtype])
    g, r = x[:1], x[1:]
    nbytes = x.numel() * x.element_size()
    row_s = _row_read_s(x)
    ours_upgrad, ours_pcgrad, ours_mgda = surgery.UPGrad(), surgery.PCGrad(), surgery.MGDA()
    tjd_upgrad, tjd_pcgrad, tjd_mgda = tjd.UPGrad(), tjd.PCGrad(), tjd.MGDA()
    return Case(spec, [x], [
        bc.Contender("ops.pcgrad", lambda: ops.pcgrad(x)),
        bc.Contender("ops.project_nonconflicting", lambda: ops.project_nonconflicting(g, r)),
        bc.Contender("ops.project_out", lambda: ops.project_out(g, r, RIDGE)),
        bc.Contender("surgery.UPGrad()(x)", lambda: ours_upgrad(x)),
        bc.Contender("surgery.PCGrad()(x)", lambda: ours_pcgrad(x)),
        bc.Contender("surgery.MGDA()(x)", lambda: ours_mgda(x)),
        bc.Contender("TorchJD PCGrad", lambda: tjd_pcgrad(x), role="baseline", vs="ops.pcgrad",
                     result=_aligned_torchjd_pcgrad(lambda: tjd.PCGrad()(x), k)),
        bc.Contender("TorchJD UPGrad", lambda: tjd_upgrad(x), role="baseline",
                     vs="surgery.UPGrad()(x)", est_s=None if k <= 64 else 2e-4 * k * k,
                     agree_note=UPGRAD_NOTE),
        bc.Contender("TorchJD MGDA", lambda: tjd_mgda(x), role="baseline",
                     vs="surgery.MGDA()(x)", agree_tol=MGDA_TOL, agree_note=MGDA_NOTE),
        bc.Contender("LibMTL-style PCGrad loop", lambda: bc.libmtl_style_pcgrad(x),
                     role="baseline", vs="ops.pcgrad", extra_bytes=nbytes,
                     est_s=_libmtl_est_s(k, row_s),
                     result=lambda: bc.libmtl_style_pcgrad(x, orders=_pcgrad_orders(k))),
        bc.Contender("mm + linalg.solve (project_out)", lambda: mm_project_out(g, r),
                     role="baseline", vs="ops.project_out"),
        bc.Contender("QR of basis, OrthoGrad (project_out)", lambda: qr_project_out(g, r),
                     role="baseline", vs="ops.project_out", extra_bytes=2 * nbytes),
        bc.Contender("mm + quadprog (project_nonconflicting)",
                     lambda: mm_quadprog_nonconflicting(g, r), role="baseline",
                     vs="ops.project_nonconflicting"),
    ])


#: Rows of the subspace the directions case projects off.
DIRECTIONS_BASIS_ROWS = 4


def build_directions(spec: CaseSpec) -> Case:
    """Many directions against a few rows: ``spec.k`` rows of g (per-sample gradients, say)
    projected off or made non-conflicting with 4 task gradients. The ops take a Gram of r and
    r g^T here, not the stacked [g; r] Gram, whose g g^T block nothing reads."""
    rows = DIRECTIONS_BASIS_ROWS
    x = bc.task_gradients(spec.k + rows, spec.n, bc.DTYPES[spec.dtype])
    g, r = x[:spec.k], x[spec.k:]
    return Case(spec, [x], [
        bc.Contender("ops.project_out", lambda: ops.project_out(g, r, RIDGE)),
        bc.Contender("ops.project_nonconflicting", lambda: ops.project_nonconflicting(g, r)),
        bc.Contender("mm + linalg.solve (project_out)", lambda: mm_project_out(g, r),
                     role="baseline", vs="ops.project_out"),
    ])


def build_dtype(spec: CaseSpec) -> Case:
    """float32 and bfloat16 copies of the same values; the floor is the float32 read."""
    x32 = bc.task_gradients(spec.k, spec.n, torch.float32)
    x16 = x32.to(torch.bfloat16)
    contenders = [
        bc.Contender("[bf16] read: view(int16).amax(dim=-1)",
                     lambda: x16.view(torch.int16).amax(dim=-1), role="reference"),
        bc.Contender("[bf16] read: sum(dim=-1, fp32)",
                     lambda: x16.sum(dim=-1, dtype=torch.float32), role="reference"),
    ]
    for tag, x in (("fp32", x32), ("bf16", x16)):
        g, r = x[:1], x[1:]
        contenders += [
            bc.Contender(f"[{tag}] ops.gram", lambda x=x: ops.gram(x)),
            bc.Contender(f"[{tag}] ops.pcgrad", lambda x=x: ops.pcgrad(x)),
            bc.Contender(f"[{tag}] ops.project_nonconflicting",
                         lambda g=g, r=r: ops.project_nonconflicting(g, r)),
            bc.Contender(f"[{tag}] ops.project_out", lambda g=g, r=r: ops.project_out(g, r)),
        ]
    return Case(spec, [x32], contenders)


def _list_inputs(spec: CaseSpec) -> list[torch.Tensor]:
    shapes = bc.MODEL_SHAPES[spec.model]()
    return bc.task_gradient_stacks(shapes, spec.k, bc.DTYPES[spec.dtype])


def build_gram_list(spec: CaseSpec) -> Case:
    xs = _list_inputs(spec)
    k = spec.k
    nbytes = sum(t.numel() * t.element_size() for t in xs)
    flat = [t.reshape(k, -1) for t in xs]

    def per_param_mm() -> torch.Tensor:
        total = torch.zeros(k, k, dtype=xs[0].dtype)
        for f in flat:
            total += f @ f.T
        return total

    def cat_mm() -> torch.Tensor:
        j = bc.flat_cat(xs)
        return j @ j.T

    return Case(spec, xs, [
        bc.Contender("ops.gram_list", lambda: ops.gram_list(xs)),
        bc.Contender("ops.gram_list(per_tensor=True)",
                     lambda: ops.gram_list(xs, per_tensor=True)),
        bc.Contender("torch.cat + torch.mm", cat_mm, role="baseline", vs="ops.gram_list",
                     extra_bytes=nbytes),
        bc.Contender("per-parameter mm loop", per_param_mm, role="baseline", vs="ops.gram_list"),
    ])


def build_combine_list(spec: CaseSpec) -> Case:
    xs = _list_inputs(spec)
    k = spec.k
    nbytes = sum(t.numel() * t.element_size() for t in xs)
    outs = [torch.empty(t.shape[1:], dtype=t.dtype) for t in xs]
    for o in outs:
        o.zero_()  # touch the pages once, as a .grad that exists
    weights = torch.linspace(0.5, 1.5, k)
    weights_x = weights.to(xs[0].dtype)
    flat = [t.reshape(k, -1) for t in xs]
    flat_outs = [o.view(-1) for o in outs]

    def cat_mm_split() -> None:
        j = bc.flat_cat(xs)
        bc.split_copy_(weights_x @ j, outs)

    def per_param_mv() -> None:
        for f, o in zip(flat, flat_outs):
            torch.mv(f.T, weights_x, out=o)

    def ours() -> None:
        ops.combine_list(weights, xs, outs)

    return Case(spec, xs, [
        bc.Contender("ops.combine_list -> .grad", ours, result=bc.returning(outs, ours)),
        bc.Contender("torch.cat + mm + split-copy", cat_mm_split, role="baseline",
                     vs="ops.combine_list -> .grad", extra_bytes=nbytes,
                     result=bc.returning(outs, cat_mm_split)),
        bc.Contender("per-parameter mv loop", per_param_mv, role="baseline",
                     vs="ops.combine_list -> .grad", result=bc.returning(outs, per_param_mv)),
    ])


def build_step_list(spec: CaseSpec) -> Case:
    from torchjd import aggregation as tjd

    xs = _list_inputs(spec)
    k = spec.k
    nbytes = sum(t.numel() * t.element_size() for t in xs)
    outs = [torch.zeros(t.shape[1:], dtype=t.dtype) for t in xs]
    row_s = _row_read_s(xs[max(range(len(xs)), key=lambda p: xs[p].numel())]) * (
        nbytes / max(t.numel() * t.element_size() for t in xs))
    ours_upgrad, ours_pcgrad = surgery.UPGrad(), surgery.PCGrad()
    tjd_upgrad, tjd_pcgrad = tjd.UPGrad(), tjd.PCGrad()

    def ops_chain_pcgrad() -> None:
        gram = ops.gram_list(xs)
        ops.combine_list(ops.pcgrad_weights(gram), xs, outs)

    def via_flat(aggregate: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            bc.split_copy_(aggregate(bc.flat_cat(xs)), outs)
        return run

    # For the agreement check: PCGrad in the orders of seed 0 on both sides (ours reshuffles
    # at every call, so the check uses a fresh aggregator that does not).
    orders = _pcgrad_orders(k)
    check_pcgrad = surgery.PCGrad(seed=0, reshuffle=False)
    tjd_pcgrad_aligned = _aligned_torchjd_pcgrad(via_flat(tjd.PCGrad()), k)
    return Case(spec, xs, [
        bc.Contender("gram_list + pcgrad_weights + combine_list", ops_chain_pcgrad),
        bc.Contender("surgery.aggregate_list(UPGrad)",
                     lambda: surgery.aggregate_list(ours_upgrad, xs, outs),
                     result=bc.returning(
                         outs, lambda: surgery.aggregate_list(ours_upgrad, xs, outs))),
        bc.Contender("surgery.aggregate_list(PCGrad)",
                     lambda: surgery.aggregate_list(ours_pcgrad, xs, outs),
                     result=bc.returning(
                         outs, lambda: surgery.aggregate_list(check_pcgrad, xs, outs))),
        bc.Contender("cat + TorchJD UPGrad + split-copy", via_flat(tjd_upgrad), role="baseline",
                     vs="surgery.aggregate_list(UPGrad)", extra_bytes=nbytes,
                     result=bc.returning(outs, via_flat(tjd_upgrad)), agree_note=UPGRAD_NOTE),
        bc.Contender("cat + TorchJD PCGrad + split-copy", via_flat(tjd_pcgrad), role="baseline",
                     vs="surgery.aggregate_list(PCGrad)", extra_bytes=nbytes,
                     result=bc.returning(outs, tjd_pcgrad_aligned)),
        bc.Contender("cat + LibMTL-style PCGrad + split-copy",
                     via_flat(bc.libmtl_style_pcgrad), role="baseline",
                     vs="surgery.aggregate_list(PCGrad)", extra_bytes=2 * nbytes,
                     est_s=_libmtl_est_s(k, row_s), result=bc.returning(outs, via_flat(
                         lambda j: bc.libmtl_style_pcgrad(j, orders=orders)))),
    ])


def build_breakdown(spec: CaseSpec) -> Case:
    """Sub-steps of the whole-step ops, and the Python wrappers against the raw registered ops,
    so that a slow step can be attributed (Gram pass, solve, combine pass, wrapper)."""
    x = bc.task_gradients(spec.k, spec.n, bc.DTYPES[spec.dtype])
    g, r = x[:1], x[1:]
    mt = torch.ops.mtunlearn
    gram = ops.gram(x)
    gram_r = ops.gram(r)
    cross = ops.inner(g, r)
    weights = ops.pcgrad_weights(gram)
    upgrad_w = surgery.UPGradWeighting()
    out_existing = torch.zeros(1, spec.n, dtype=x.dtype)
    return Case(spec, [x], [
        bc.Contender("gram pass: ops.gram(x)", lambda: ops.gram(x)),
        bc.Contender("gram pass: raw torch.ops.mtunlearn.gram(x)", lambda: mt.gram(x)),
        bc.Contender("gram pass: ops.gram(x[1:]) + ops.inner(x[:1], x[1:])",
                     lambda: (ops.gram(r), ops.inner(g, r))),
        bc.Contender("solve: ops.pcgrad_weights(G)", lambda: ops.pcgrad_weights(gram)),
        bc.Contender("solve: ops.nonconflicting_dual(G, c)",
                     lambda: ops.nonconflicting_dual(gram_r, cross)),
        bc.Contender("solve: ops.ridge_solve(G, c^T)",
                     lambda: ops.ridge_solve(gram_r, cross.T.contiguous(), RIDGE)),
        bc.Contender("solve: surgery.UPGradWeighting()(G)", lambda: upgrad_w(gram)),
        bc.Contender("combine pass: ops.combine(w, x)", lambda: ops.combine(weights[None], x)),
        bc.Contender("combine pass: raw torch.ops.mtunlearn.combine", lambda: mt.combine(
            weights[None], x)),
        bc.Contender("combine pass: ops.combine(w, x, out=existing)",
                     lambda: ops.combine(weights[None], x, out=out_existing)),
        bc.Contender("page faults: torch.empty(n).fill_(0) (a fresh [n] output)",
                     lambda: torch.empty(spec.n, dtype=x.dtype).fill_(0), role="reference"),
        bc.Contender("no page faults: existing[n].fill_(0)", lambda: out_existing.fill_(0),
                     role="reference"),
        bc.Contender("combine pass: ops.combine(a, r, out=g.clone(), beta=1)",
                     lambda: ops.combine(cross, r, out=g.clone(), beta=1.0)),
        bc.Contender("whole: ops.pcgrad(x)", lambda: ops.pcgrad(x)),
        bc.Contender("whole: raw torch.ops.mtunlearn.pcgrad(x, 0)", lambda: mt.pcgrad(x, 0)),
        bc.Contender("whole: raw project_out", lambda: mt.project_out(g, r, RIDGE)),
        bc.Contender("whole: raw project_nonconflicting",
                     lambda: mt.project_nonconflicting(g, r, 1)),
        bc.Contender("whole, unfused: gram + pcgrad_weights + combine",
                     lambda: ops.combine(ops.pcgrad_weights(ops.gram(x))[None], x)),
        bc.Contender("whole, unfused, into existing out: gram + pcgrad_weights + combine(out=)",
                     lambda: ops.combine(ops.pcgrad_weights(ops.gram(x))[None], x,
                                         out=out_existing)),
        bc.Contender("1 thread: read floor (view(int).amax(dim=-1))",
                     _one_thread(lambda: x.view(bc._INT_VIEW[x.element_size()]).amax(dim=-1)),
                     role="reference"),
        bc.Contender("1 thread: ops.gram(x)", _one_thread(lambda: ops.gram(x))),
        bc.Contender("1 thread: ops.pcgrad(x)", _one_thread(lambda: ops.pcgrad(x))),
        bc.Contender("1 thread: ops.project_out", _one_thread(lambda: ops.project_out(g, r))),
    ])


def _one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run with one intra-op thread: no parallel region, so no wait for a second thread
    that the scheduler has not run (on a loaded machine that wait is a whole time slice)."""
    def run() -> object:
        with bc.threads(1):
            return fn()
    return run


BUILDERS: dict[str, Callable[[CaseSpec], Case]] = {
    "gram": build_gram, "step": build_step, "directions": build_directions,
    "dtype": build_dtype, "gram_list": build_gram_list,
    "combine_list": build_combine_list, "step_list": build_step_list,
    "breakdown": build_breakdown,
}


# -- running ---------------------------------------------------------------------------------------


def input_bytes_of(spec: CaseSpec) -> int:
    """Input size of a case before building it (to skip what does not fit)."""
    size = torch.empty((), dtype=bc.DTYPES[spec.dtype]).element_size()
    if spec.model:
        n = sum(math.prod(s) for s in bc.MODEL_SHAPES[spec.model]())
    else:
        n = spec.n
    factor = 1.5 if spec.kind == "dtype" else 1.0
    rows = spec.k + (DIRECTIONS_BASIS_ROWS if spec.kind == "directions" else 0)
    return int(rows * n * size * factor)


def run_case(spec: CaseSpec, args: argparse.Namespace, flop_rate: float) -> dict[str, Any]:
    load_before = [round(v, 2) for v in os.getloadavg()]
    started = time.time()
    case = BUILDERS[spec.kind](spec)
    contenders = bc.floor_contenders(case.inputs) + case.contenders
    # Skipped contenders (size or time caps) are left out of the check as they are of the timing.
    checked = [c for c in case.contenders
               if c.extra_bytes <= args.max_extra_gib * 2**30
               and (c.est_s is None or c.est_s <= args.budget)]
    row_length = (sum(math.prod(shape) for shape in bc.MODEL_SHAPES[spec.model]()) if spec.model
                  else spec.n)
    # Raises on disagreement (see the module docstring).
    agreement = bc.check_agreement(checked, bc.DTYPES[spec.dtype], row_length)
    timings = bc.measure(contenders, repeats=args.repeats, min_sample_s=args.min_sample,
                         budget_s=args.budget, max_extra_bytes=args.max_extra_gib * 2**30,
                         cheap_samples=args.cheap_samples)
    floor = bc.floor_of(timings)
    rows = []
    best = {t.name: t.best for t in timings}
    median = {t.name: t.median for t in timings}
    for t in timings:
        row = t.as_dict()
        row["x_floor"] = t.best / floor.best
        row["x_floor_median"] = t.median / floor.median
        row["ours_faster_by"] = (t.best / best[t.vs]) if t.vs in best else math.nan  # best/best
        row["ours_faster_by_median"] = (t.median / median[t.vs]) if t.vs in best else math.nan
        row["agreement"] = agreement.get(t.name)
        rows.append(row)
    result = {**asdict(spec), "input_bytes": case.input_bytes, "loadavg_before": load_before,
              "loadavg_after": [round(v, 2) for v in os.getloadavg()],
              "elapsed_s": round(time.time() - started, 1),
              "floor": {"name": floor.name, "best_s": floor.best, "median_s": floor.median},
              "timings": rows}
    if spec.kind not in ("combine_list",):
        result["gram_flops"] = gram_flops(spec)
        result["flop_rate"] = flop_rate
        result["gram_compute_bound_s"] = gram_flops(spec) / flop_rate
    del case, contenders, timings
    return result


def case_table(result: dict[str, Any]) -> str:
    spec = CaseSpec(result["kind"], result["dtype"], result["k"], result["n"], result["model"])
    floor = result["floor"]
    head = (f"**{spec.label()}** — input {bc.human_bytes(result['input_bytes'])}, floor "
            f"{bc.fmt_ms(floor['best_s'])} ms ({floor['name'].removeprefix('floor: ')}), "
            f"load {result['loadavg_before'][0]:.1f}->{result['loadavg_after'][0]:.1f}, "
            f"{result.get('elapsed_s', 0):.0f} s")
    if result.get("gram_compute_bound_s"):
        head += (f"; compute bound of one Gram pass {bc.fmt_ms(result['gram_compute_bound_s'])} "
                 f"ms ({result['gram_flops'] / 1e9:.2f} GFLOP at {result['flop_rate'] / 1e9:.0f} "
                 "GFLOP/s)")
    rows = []
    for t in result["timings"]:
        if t["role"] == "floor" and t["name"] != floor["name"]:
            continue
        status = t["error"] or t["skipped"] or t.get("note_sampling") or ""
        samples = f"{len(t['samples'])}x{t['calls_per_sample']}" if t["samples"] else "-"
        median_ratio = t.get("ours_faster_by_median", math.nan)
        agree = t.get("agreement")
        if agree is None:
            agree_cell = "-"
        elif "error" in agree:
            agree_cell = "not run"
        else:
            agree_cell = f"{agree['rel_diff']:.1e} (tol {agree['tol']:.1e})"
            if agree.get("note"):
                status = "; ".join(x for x in (status, agree["note"]) if x)
        rows.append([
            t["name"] if t["role"] != "floor" else f"{t['name']} (memory floor)",
            bc.fmt_ms(t["best_s"]), bc.fmt_ms(t["median_s"]), bc.fmt_ratio(t["x_floor"]),
            bc.fmt_ratio(t["ours_faster_by"]),
            bc.fmt_ratio(median_ratio) + (f" ({t['vs']})" if t["vs"] and math.isfinite(
                median_ratio) else ""),
            agree_cell, samples, status,
        ])
    table = bc.markdown_table(["contender", "best ms", "median ms", "x floor (best)",
                               "ours faster (best/best)", "ours faster (median/median)",
                               "agreement: rel. diff", "samples", "note"], rows)
    memory = result.get("memory")
    if memory:
        mem_rows = [[name, bc.human_bytes(v), f"{v / result['input_bytes']:.3f}"]
                    for name, v in memory.items()]
        table += "\n\nPeak extra resident memory of one call (result included):\n\n" + \
            bc.markdown_table(["contender", "peak extra", "/ input"], mem_rows)
    return head + "\n\n" + table


# -- memory subprocess -----------------------------------------------------------------------------


def memory_worker(spec_json: str, budget_s: float) -> None:
    """Run in a fresh process: peak extra memory of every contender of one case (JSON out)."""
    bc.prepare_memory_measurement()
    spec = CaseSpec(**json.loads(spec_json))
    # One-time allocations (OpenMP team, MKL and quadprog buffers, lazy imports) happen on a
    # small instance first, so that each measured call below is a first call on its inputs
    # whose growth is its own temporaries and result.
    for warm in (BUILDERS["step"](CaseSpec("step", spec.dtype, 4, 4096)),
                 BUILDERS["gram"](CaseSpec("gram", spec.dtype, 4, 4096))):
        for c in warm.contenders:
            try:
                c.fn()
            except Exception:  # the failure is reported by the real call below
                pass
    case = BUILDERS[spec.kind](spec)
    x = case.inputs
    calib = bc.Contender("calibration: clone of the inputs",
                         lambda: [t.clone() for t in x], role="reference")
    out: dict[str, int] = {}
    for c in [calib] + case.contenders:
        if c.est_s is not None and c.est_s > budget_s:
            continue
        try:
            out[c.name] = bc.peak_extra_bytes(c.fn)
        except Exception as exc:  # report what failed, keep the rest
            print(f"[memory] {c.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print("MEMORY_JSON " + json.dumps(out))


def measure_memory(spec: CaseSpec, budget_s: float, threads: int | None) -> dict[str, int] | None:
    command = [sys.executable, __file__, "--memory-worker", json.dumps(asdict(spec)),
               "--budget", str(budget_s)]
    if threads:
        command += ["--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_JSON "):
            return json.loads(line.removeprefix("MEMORY_JSON "))
    print(f"[memory] {spec.label()} failed: {proc.stderr[-800:]}", file=sys.stderr)
    return None


# -- targets ---------------------------------------------------------------------------------------


def _find(results: Sequence[dict[str, Any]], kind: str, dtype: str = "fp32", k: int | None = None,
          n: int | None = None, model: str | None = None) -> list[dict[str, Any]]:
    return [r for r in results if r["kind"] == kind and r["dtype"] == dtype
            and (k is None or r["k"] == k) and (n is None or r["n"] == n)
            and (model is None or r["model"] == model)]


def _t(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    for t in result["timings"]:
        if t["name"] == name and t["samples"]:
            return t
    return None


def _speedup(r: dict[str, Any], base: str, ours: str) -> float | None:
    """How many times faster ``ours`` is than ``base`` in a case: ratio of medians (both
    sampled equally, interleaved)."""
    tb, to = _t(r, base), _t(r, ours)
    return tb["median_s"] / to["median_s"] if tb and to else None


def evaluate_targets(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's CPU targets (fp32, from this run): ratios to the floor from best samples
    (the floor sampled at least as often as each op), speed-ups as ratios of medians (every
    contender of a case sampled equally)."""
    verdicts: list[dict[str, Any]] = []

    def not_measured(target: str) -> None:
        verdicts.append({"target": target, "verdict": "not measured", "measured": ""})

    def add(target: str, measured: list[tuple[str, float]], ok: Callable[[float], bool],
            worst: Callable[[Sequence[float]], float]) -> None:
        if not measured:
            not_measured(target)
            return
        w = worst([v for _, v in measured])
        text = "; ".join(f"{label}: {v:.2f}" for label, v in measured)
        verdicts.append({"target": target, "verdict": "met" if ok(w) else "NOT met",
                         "worst": w, "measured": text})

    vals = []
    for r in _find(results, "gram"):
        t = _t(r, "ops.gram")
        if r["k"] <= 16 and r["n"] >= 1e6 and t:
            vals.append((f"gram k={r['k']} n={r['n']:.0e}", t["x_floor"]))
    for r in _find(results, "gram_list"):
        t = _t(r, "ops.gram_list")
        if r["k"] <= 16 and t:
            vals.append((f"gram_list {r['model']} k={r['k']}", t["x_floor"]))
    add("gram / gram_list <= 1.3x floor (k <= 16, n >= 1e6)", vals, lambda w: w <= 1.3, max)

    def speedups(rs: Sequence[dict[str, Any]], base: str, ours: str,
                 label: Callable[[dict[str, Any]], str]) -> list[tuple[str, float]]:
        out = []
        for r in rs:
            v = _speedup(r, base, ours)
            if v is not None:
                out.append((label(r), v))
        return out

    vals = speedups(_find(results, "gram", k=8, n=10**7), "torch.mm(x, x.T)", "ops.gram",
                    lambda r: "k=8 n=1e7: mm/gram (median)")
    add("gram >= 3x faster than torch.mm (k=8, n=1e7)", vals, lambda w: w >= 3, min)

    vals = speedups(_find(results, "gram_list", model="resnet50"), "torch.cat + torch.mm",
                    "ops.gram_list", lambda r: f"k={r['k']}: cat+mm/gram_list (median)")
    add("gram_list over ResNet-50 shapes >= 4x faster than cat+mm", vals, lambda w: w >= 4, min)

    vals = speedups([r for r in _find(results, "gram") if 64 <= r["k"] <= 256],
                    "torch.mm(x, x.T)", "ops.gram",
                    lambda r: f"k={r['k']} n={r['n']:.0e}: mm/gram (median)")
    add("gram at k in 64..256 at least as fast as torch.mm", vals, lambda w: w >= 1, min)

    steps = ("ops.pcgrad", "ops.project_nonconflicting", "ops.project_out")
    step_targets = ("whole step (pcgrad, project_nonconflicting, project_out) <= 2.5x floor "
                    "(k=8, n=1e7)", ">= 3x faster than TorchJD UPGrad / PCGrad (k=8, n=1e7)",
                    ">= 30x faster than LibMTL PCGrad (k=8, n=1e7)")
    step_cases = _find(results, "step", k=8, n=10**7)
    if not step_cases:  # listed as the other targets are, not left out of the table
        for target in step_targets:
            not_measured(target)
    for r in step_cases:
        vals = [(f"{name} (best)", _t(r, name)["x_floor"]) for name in steps if _t(r, name)]
        add(step_targets[0], vals, lambda w: w <= 2.5, max)
        # Same quantity on both sides only: TorchJD's UPGrad (k projections, summed) against
        # our UPGrad aggregator, never against project_nonconflicting (one projection).
        pairs = [("TorchJD PCGrad", "ops.pcgrad"), ("TorchJD UPGrad", "surgery.UPGrad()(x)")]
        vals = []
        for base, ours in pairs:
            v = _speedup(r, base, ours)
            if v is not None:
                vals.append((f"{base}/{ours} (median)", v))
        add(step_targets[1], vals, lambda w: w >= 3, min)
        v = _speedup(r, "LibMTL-style PCGrad loop", "ops.pcgrad")
        vals = [("LibMTL/ops.pcgrad (median)", v)] if v is not None else []
        add(step_targets[2], vals, lambda w: w >= 30, min)

    vals = []
    for r in _find(results, "dtype"):
        for op in ("ops.gram",) + steps:
            t16, t32 = _t(r, f"[bf16] {op}"), _t(r, f"[fp32] {op}")
            if t16 and t32:
                vals.append((f"{op} k={r['k']} n={r['n']:.0e} (best)",
                             t16["best_s"] / t32["best_s"]))
    add("bf16 <= 0.6x the time of fp32", vals, lambda w: w <= 0.6, max)

    small_steps = _find(results, "step", k=16, n=10**5)
    if not small_steps:
        not_measured("n=1e5, k=16 whole step within 5x floor")
    for r in small_steps:
        vals = [(f"{name} (best)", _t(r, name)["x_floor"]) for name in steps if _t(r, name)]
        add("n=1e5, k=16 whole step within 5x floor", vals, lambda w: w <= 5, max)
    return verdicts


def targets_markdown(verdicts: Sequence[dict[str, Any]]) -> str:
    rows = [[v["target"], v["verdict"], v["measured"]] for v in verdicts]
    return bc.markdown_table(["target (CPU, fp32)", "verdict", "measured (ratio)"], rows)


#: Summary columns per case kind: (header, our contender, baseline or None). With a baseline the
#: cell is how many times faster ours is, as the ratio of the two medians (every contender of a
#: case has the same number of samples, interleaved); without, our best time as a multiple of
#: the best floor. Only pairs computing the same quantity (checked by the agreement check).
SUMMARY_COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "gram": [("gram", "ops.gram", None), ("mm", "torch.mm(x, x.T)", None),
             ("mm / gram", "ops.gram", "torch.mm(x, x.T)")],
    "step": [("pcgrad", "ops.pcgrad", None),
             ("proj_noncfl", "ops.project_nonconflicting", None),
             ("proj_out", "ops.project_out", None), ("UPGrad", "surgery.UPGrad()(x)", None),
             ("TJD PCGrad / pcgrad", "ops.pcgrad", "TorchJD PCGrad"),
             ("TJD UPGrad / UPGrad", "surgery.UPGrad()(x)", "TorchJD UPGrad"),
             ("TJD MGDA / MGDA", "surgery.MGDA()(x)", "TorchJD MGDA"),
             ("LibMTL / pcgrad", "ops.pcgrad", "LibMTL-style PCGrad loop"),
             ("quadprog / proj_noncfl", "ops.project_nonconflicting",
              "mm + quadprog (project_nonconflicting)"),
             ("QR / proj_out", "ops.project_out", "QR of basis, OrthoGrad (project_out)")],
    "directions": [("proj_out", "ops.project_out", None),
                   ("proj_noncfl", "ops.project_nonconflicting", None),
                   ("mm+solve / proj_out", "ops.project_out",
                    "mm + linalg.solve (project_out)")],
    "gram_list": [("gram_list", "ops.gram_list", None),
                  ("cat+mm / gram_list", "ops.gram_list", "torch.cat + torch.mm"),
                  ("mm loop / gram_list", "ops.gram_list", "per-parameter mm loop")],
    "combine_list": [("combine_list", "ops.combine_list -> .grad", None),
                     ("cat+mm+split / ours", "ops.combine_list -> .grad",
                      "torch.cat + mm + split-copy"),
                     ("mv loop / ours", "ops.combine_list -> .grad", "per-parameter mv loop")],
    "step_list": [("UPGrad list", "surgery.aggregate_list(UPGrad)", None),
                  ("PCGrad list", "surgery.aggregate_list(PCGrad)", None),
                  ("cat+TJD UPGrad / ours", "surgery.aggregate_list(UPGrad)",
                   "cat + TorchJD UPGrad + split-copy"),
                  ("cat+TJD PCGrad / ours", "surgery.aggregate_list(PCGrad)",
                   "cat + TorchJD PCGrad + split-copy"),
                  ("cat+LibMTL / ours", "surgery.aggregate_list(PCGrad)",
                   "cat + LibMTL-style PCGrad + split-copy")],
}


def summary_markdown(results: Sequence[dict[str, Any]]) -> str:
    """One compact table per case kind: our best times as multiples of the best floor ("x") and
    how many times faster than each baseline ours is ("/", ratio of medians), one row per size
    and dtype."""
    parts = []
    for kind, columns in SUMMARY_COLUMNS.items():
        rows = []
        for r in results:
            if r["kind"] != kind:
                continue
            size = r["model"] if r["model"] else f"{r['n']:.0e}"
            row = [r["dtype"], str(r["k"]), size, bc.fmt_ms(r["floor"]["best_s"])]
            for _, ours, base in columns:
                to, tb = _t(r, ours), (_t(r, base) if base else None)
                if base is None:
                    row.append(bc.fmt_ratio(to["x_floor"]) if to else "-")
                elif to and tb:
                    row.append(bc.fmt_ratio(tb["median_s"] / to["median_s"]))
                else:
                    skipped = next((t for t in r["timings"] if t["name"] == base), None)
                    row.append("skip" if skipped and skipped["skipped"] else
                               "err" if skipped and skipped["error"] else "-")
            rows.append(row)
        if rows:
            header = ["dtype", "k", "n / model", "floor ms"] + [c[0] for c in columns]
            parts.append(f"**{kind}** (ours: best time / best floor; `a / b`: times faster than "
                         "a, ratio of medians, every contender sampled equally)\n\n"
                         + bc.markdown_table(header, rows))
    return "\n\n".join(parts)


# -- grid ------------------------------------------------------------------------------------------


def plan_cases(args: argparse.Namespace) -> list[CaseSpec]:
    if args.quick:
        specs = [CaseSpec("gram", "fp32", k, n) for k, n in
                 ((8, 10**7), (16, 10**6), (64, 10**6), (256, 10**5))]
        specs += [CaseSpec("step", "fp32", 8, 10**7), CaseSpec("step", "fp32", 16, 10**5)]
        specs += [CaseSpec("directions", "fp32", 64, 10**6)]
        specs += [CaseSpec("dtype", "fp32", 8, 10**7)]
        specs += [CaseSpec("gram_list", "fp32", 8, model="resnet50"),
                  CaseSpec("combine_list", "fp32", 4, model="resnet50"),
                  CaseSpec("step_list", "fp32", 4, model="resnet50"),
                  CaseSpec("breakdown", "fp32", 8, 10**7), CaseSpec("breakdown", "fp32", 16, 10**5)]
        return [s for s in specs if s.kind in args.cases]
    specs = []
    for kind in args.cases:
        if kind in ("gram", "step"):
            specs += [CaseSpec(kind, d, k, int(n)) for d in args.dtype for n in args.n
                      for k in args.k if not (kind == "step" and k < 2)]
        elif kind == "directions":  # k directions, past the 4 rows they are projected off
            specs += [CaseSpec(kind, d, k, int(n)) for d in args.dtype for n in args.n
                      for k in args.k if k > DIRECTIONS_BASIS_ROWS]
        elif kind == "dtype":
            specs += [CaseSpec(kind, "fp32", k, int(n)) for n in args.n for k in args.k
                      if k in (8, 16) and n >= 1e6]
        elif kind in ("gram_list", "combine_list", "step_list"):
            specs += [CaseSpec(kind, d, k, model=m) for d in args.dtype for m in args.models
                      for k in args.list_k]
        elif kind == "breakdown":
            specs += [CaseSpec(kind, d, k, n) for d in args.dtype for k, n in
                      ((8, 10**7), (16, 10**5), (64, 10**6))]
    return specs


def memory_specs(specs: Sequence[CaseSpec], quick: bool) -> list[CaseSpec]:
    """Cases whose peak memory is measured: each kind once, at its largest k <= 8 (fp32); in
    the quick preset only the whole step on a matrix and the Gram pass on a parameter list."""
    chosen: dict[str, CaseSpec] = {}
    for s in specs:
        if quick and s.kind not in ("step", "gram_list"):
            continue
        if s.kind in ("breakdown", "dtype") or s.dtype != "fp32" or s.k > 8:
            continue
        best = chosen.get(s.kind)
        if best is None or (s.k, s.n) > (best.k, best.n):
            chosen[s.kind] = s
    return list(chosen.values())


def gram_flops(spec: CaseSpec) -> float:
    """Floating-point operations of one Gram pass of the case (``k (k + 1) / 2`` dot products
    of length ``n``, 2 flops per multiply-add): with the machine's FLOP rate, the compute bound
    that joins the memory floor (a Gram pass at large ``k`` cannot be memory-bound)."""
    n = sum(math.prod(s) for s in bc.MODEL_SHAPES[spec.model]()) if spec.model else spec.n
    return spec.k * (spec.k + 1) * float(n)


def peak_flops() -> float:
    """The machine's fp32 FLOP rate now: best of a few 1536^3 ``torch.mm`` (MKL, all threads)."""
    a = torch.randn(1536, 1536)
    b = torch.randn(1536, 1536)
    torch.mm(a, b)
    best = min(bc._call_time(lambda: torch.mm(a, b), 1) for _ in range(7))
    return 2 * 1536**3 / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16, 64, 256])
    parser.add_argument("--n", type=float, nargs="+", default=[1e5, 1e6, 1e7],
                        help="vector lengths of the matrix cases (5e7 is opt-in)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(bc.DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--cases", nargs="+", choices=CASE_KINDS, default=list(CASE_KINDS))
    parser.add_argument("--models", nargs="+", choices=sorted(bc.MODEL_SHAPES),
                        default=["resnet50", "vitb16"])
    parser.add_argument("--list-k", type=int, nargs="+", default=[2, 4, 8],
                        help="k of the parameter-list cases")
    parser.add_argument("--quick", action="store_true", help="a preset of a few minutes covering "
                        "the targets (overrides the grid, keeps --cases)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="samples per contender, the same for every contender of a case "
                             "(the floor candidates at least as many)")
    parser.add_argument("--min-sample", type=float, default=0.001,
                        help="seconds; shorter calls are repeated within one sample")
    parser.add_argument("--cheap-samples", type=int, default=60,
                        help="samples per contender when every contender of the case takes "
                             "under 50 ms a call")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds per contender and case (fewer samples, or skipped)")
    parser.add_argument("--max-input-gib", type=float, default=3.0)
    parser.add_argument("--max-extra-gib", type=float, default=6.0)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="peak memory per contender, in subprocesses (one case per kind)")
    parser.add_argument("--json", type=Path, help="write every sample and the verdicts here")
    parser.add_argument("--markdown", type=Path, help="write the tables here")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's, here "
                        "the number of cores)")
    parser.add_argument("--from-json", type=Path,
                        help="re-render --markdown (and the targets) from an earlier --json")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar over the cases on stderr when it is a terminal "
                             "(`mtunlearn benchmark --quiet` passes --no-progress)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        args.json = None
        verdicts = write_outputs(args, data["meta"], data["results"], data.get("skipped", []))
        print(targets_markdown(verdicts))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.budget)
        return 0
    if args.quick:
        args.repeats = min(args.repeats, 9)
        args.cheap_samples = min(args.cheap_samples, 40)
        args.budget = min(args.budget, 8.0)
    if not mtunlearn_ext.has_extension():
        parser.error("the compiled extension is not built (run ./test.sh once)")

    from tqdm import tqdm

    meta = bc.machine_info()
    meta["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    meta["THP_MEM_ALLOC_ENABLE"] = os.environ.get("THP_MEM_ALLOC_ENABLE")
    print(f"# compare.py {meta['date']}: {meta['host_cpus']} CPUs ({meta['cpu']}), load "
          f"{meta['loadavg']}, torch {meta['torch']} ({meta['torch_threads']} threads), "
          f"git {meta['git']['head']}, extension {meta.get('extension_so', {}).get('sha256')}",
          flush=True)
    specs = plan_cases(args)
    flop_rate = peak_flops()
    meta["flop_rate_start"] = flop_rate
    print(f"fp32 FLOP rate (best 1536^3 torch.mm): {flop_rate / 1e9:.0f} GFLOP/s", flush=True)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    started = time.time()
    mem_specs = set(memory_specs(specs, args.quick)) if args.memory else set()
    for spec in tqdm(specs, desc="cases", file=sys.stderr,
                     disable=not (args.progress and sys.stderr.isatty())):
        if input_bytes_of(spec) > args.max_input_gib * 2**30:
            skipped.append(f"{spec.label()}: input {bc.human_bytes(input_bytes_of(spec))} > "
                           f"--max-input-gib {args.max_input_gib}")
            continue
        result = run_case(spec, args, flop_rate)
        if spec in mem_specs:
            started_memory = time.time()
            result["memory"] = measure_memory(spec, args.budget, args.threads)
            result["memory_elapsed_s"] = round(time.time() - started_memory, 1)
        results.append(result)
        print("\n" + case_table(result), flush=True)
        meta["elapsed_s"] = round(time.time() - started, 1)
        meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        write_outputs(args, meta, results, skipped)
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["flop_rate_end"] = peak_flops()
    meta["elapsed_s"] = round(time.time() - started, 1)
    verdicts = write_outputs(args, meta, results, skipped)
    print("\n## Targets\n\n" + targets_markdown(verdicts))
    if skipped:
        print("\nSkipped (size caps): " + "; ".join(skipped))
    print(f"\n[compare] {meta['elapsed_s']:.0f} s, load at end {meta['loadavg_end']}")
    return 0


def write_outputs(args: argparse.Namespace, meta: dict[str, Any],
                  results: list[dict[str, Any]], skipped: list[str]) -> list[dict[str, Any]]:
    """Write the JSON and Markdown files (after every case too, so that an interrupted long run
    keeps what it measured); returns the target verdicts."""
    verdicts = evaluate_targets(results)
    summary = targets_markdown(verdicts)
    meta.setdefault("loadavg_end", [round(v, 2) for v in os.getloadavg()])
    meta.setdefault("elapsed_s", 0.0)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "targets": verdicts,
                                         "skipped": skipped}, indent=1, default=str))
    if args.markdown:
        parts = [f"# compare.py results ({meta['date']})", "",
                 f"Command: `{meta['command']}`  ", f"Machine: {meta['host_cpus']} CPUs "
                 f"({meta['cpu']}), torch {meta['torch']} with {meta['torch_threads']} threads, "
                 f"load average {meta['loadavg']} at start, {meta['loadavg_end']} at end; git "
                 f"{meta['git']['head']}, extension sha256 "
                 f"{meta.get('extension_so', {}).get('sha256')}; {meta['elapsed_s']:.0f} s. "
                 f"fp32 FLOP rate (1536^3 torch.mm) {meta['flop_rate_start'] / 1e9:.0f} GFLOP/s "
                 f"at start; THP_MEM_ALLOC_ENABLE={meta['THP_MEM_ALLOC_ENABLE']}.", "",
                 "## Targets", "", summary, "", "## Summary", "", summary_markdown(results), "",
                 "## Cases", ""]
        parts += [case_table(r) + "\n" for r in results]
        if skipped:
            parts += ["Skipped (size caps): " + "; ".join(skipped), ""]
        args.markdown.write_text("\n".join(parts))
    return verdicts


if __name__ == "__main__":
    raise SystemExit(main())
