"""The compiled kernels' argument checks, repeated for the fake kernels.

Under ``torch.compile`` / ``torch.export`` only the fake kernel runs while a graph is traced:
without these checks a call the real kernel refuses (an ``inner`` of two different ``n``, a
solver's ``k`` past 256) traced into a graph with made-up output shapes and failed only when
the graph ran, or raised an ``IndexError`` from the fake's own indexing. Each check raises what
the C++ raises (``ValueError`` for shapes, ``TypeError`` for dtypes), with its wording. Symbolic
sizes are compared as plain ones: the tracer guards on the outcome, as it does for torch's own
shape checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def sizes(shape: Sequence[int | torch.SymInt]) -> tuple[int | torch.SymInt, ...]:
    """``tuple(shape)`` for an error message, with each symbolic size of a traced call
    (``torch.compile(dynamic=True)``, ``torch.export``) given as the size of the call being
    traced: ``(s72, s75) and (s96, s5)`` said nothing of which sizes disagreed. Plain sizes
    print as ``tuple(shape)`` prints them; a size without a known value stays its symbol."""
    def value(size: int | torch.SymInt) -> int | torch.SymInt:
        if isinstance(size, torch.SymInt):
            hint = getattr(size.node, "hint", None)
            return int(hint) if hint is not None else size
        return size

    return tuple(value(size) for size in shape)


#: What every op computes in (the C++ ``scalar_kind``).
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: The coefficient-space solvers' largest ``k`` (``check_solver_k`` in csrc).
MAX_SOLVER_K = 256


def floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mtunlearn::{op}: `{name}` must have dtype float64, float32, float16 "
                        f"or bfloat16, got {t.dtype}")


def min_dim(op: str, name: str, t: torch.Tensor, dims: int) -> None:
    if t.dim() < dims:
        raise ValueError(f"mtunlearn::{op}: `{name}` must have at least {dims} dims, got shape "
                         f"{sizes(t.shape)}")


def same_dtype(op: str, first: tuple[str, torch.Tensor], other: tuple[str, torch.Tensor]
               ) -> None:
    (a_name, a), (b_name, b) = first, other
    if a.dtype != b.dtype:
        raise TypeError(f"mtunlearn::{op}: `{b_name}` has dtype {b.dtype} but `{a_name}` has "
                        f"{a.dtype}; they must match")


def require(condition: object, message: str) -> None:
    if not condition:
        raise ValueError(message)


def pair(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, what: str,
         shared_last: bool) -> None:
    """Two batched operands with the same leading dims and, for ``shared_last``, the same last
    dim (``inner``'s ``n``, the projections' ``n``), else ``a``'s last = ``b``'s second last
    (``combine``'s ``k``)."""
    min_dim(op, a_name, a, 2)
    min_dim(op, b_name, b, 2)
    require(a.dim() == b.dim() and a.shape[:-2] == b.shape[:-2]
            and a.shape[-1] == (b.shape[-1] if shared_last else b.shape[-2]),
            f"mtunlearn::{op}: {what}; got {sizes(a.shape)} and {sizes(b.shape)}")


def solver_k(op: str, name: str, k: int | torch.SymInt) -> None:
    require(k <= MAX_SOLVER_K, f"mtunlearn::{op}: `{name}` has k={k} rows; the coefficient-space "
                               f"solvers support at most {MAX_SOLVER_K}")


def square_gram(op: str, gram: torch.Tensor) -> None:
    min_dim(op, "gram", gram, 2)
    floating(op, "gram", gram)
    require(gram.shape[-1] == gram.shape[-2], f"mtunlearn::{op}: `gram` must be square "
                                              f"[..., k, k], got {sizes(gram.shape)}")
    solver_k(op, "gram", gram.shape[-1])


def solver_rhs(op: str, gram: torch.Tensor, rhs: torch.Tensor, rows_are_k: bool) -> None:
    min_dim(op, "rhs", rhs, 2)
    floating(op, "rhs", rhs)
    k = gram.shape[-1]
    require(rhs.dim() == gram.dim() and rhs.shape[:-2] == gram.shape[:-2]
            and (rhs.shape[-2] if rows_are_k else rhs.shape[-1]) == k,
            f"mtunlearn::{op}: `rhs` must be {'[..., k, m]' if rows_are_k else '[..., m, k]'} "
            f"with k={k} and the Gram's leading dims {sizes(gram.shape[:-2])}, got "
            f"{sizes(rhs.shape)}")


def stacks(op: str, name: str, tensors: Sequence[torch.Tensor], rows_name: str = "k") -> None:
    """A list of per-parameter stacks ``[rows, ...]``: at least one, one row count, one dtype."""
    require(len(tensors) > 0, f"mtunlearn::{op}: `{name}` must hold at least one tensor")
    first = tensors[0]
    floating(op, f"{name}[0]", first)
    rows = first.shape[0] if first.dim() >= 1 else -1
    for p, t in enumerate(tensors):
        require(t.dim() >= 1, f"mtunlearn::{op}: {name}[{p}] must be a stack [{rows_name}, ...], "
                              f"got shape {list(sizes(t.shape))}")
        require(t.shape[0] == rows,
                f"mtunlearn::{op}: every tensor in `{name}` must be [{rows_name}, ...] with the "
                f"same {rows_name}={rows}; {name}[{p}] has shape {sizes(t.shape)}")
        same_dtype(op, (f"{name}[0]", first), (f"{name}[{p}]", t))


def paired_stacks(op: str, a_name: str, as_: Sequence[torch.Tensor], b_name: str,
                  bs: Sequence[torch.Tensor]) -> None:
    """Two lists cutting the same parameters: ``as_[p]`` is ``[m, *shape_p]``, ``bs[p]`` is
    ``[k, *shape_p]``, one dtype."""
    require(len(as_) > 0 and len(as_) == len(bs),
            f"mtunlearn::{op}: `{a_name}` and `{b_name}` must be non-empty lists of the same "
            f"length, got {len(as_)} and {len(bs)}")
    m = as_[0].shape[0] if as_[0].dim() >= 1 else -1
    k = bs[0].shape[0] if bs[0].dim() >= 1 else -1
    for p, (a, b) in enumerate(zip(as_, bs)):
        require(a.dim() >= 1, f"mtunlearn::{op}: {a_name}[{p}] must be a stack [m, ...], got "
                              f"shape {list(sizes(a.shape))}")
        require(b.dim() >= 1, f"mtunlearn::{op}: {b_name}[{p}] must be a stack [k, ...], got "
                              f"shape {list(sizes(b.shape))}")
        require(a.shape[0] == m, f"mtunlearn::{op}: {a_name}[{p}] must be [m, ...] with m={m}, "
                                 f"got {sizes(a.shape)}")
        require(b.shape[0] == k, f"mtunlearn::{op}: {b_name}[{p}] must be [k, ...] with k={k}, "
                                 f"got {sizes(b.shape)}")
        require(a.shape[1:] == b.shape[1:],
                f"mtunlearn::{op}: {a_name}[{p}] and {b_name}[{p}] must have the same trailing "
                f"shape, got {sizes(a.shape)} and {sizes(b.shape)}")
        same_dtype(op, (f"{a_name}[0]", as_[0]), (f"{a_name}[{p}]", a))
        same_dtype(op, (f"{a_name}[0]", as_[0]), (f"{b_name}[{p}]", b))
    floating(op, f"{a_name}[0]", as_[0])


def combine_lists(op: str, outs: Sequence[torch.Tensor], bases: Sequence[torch.Tensor] | None,
                  coeffs: torch.Tensor, xs: Sequence[torch.Tensor], per_tensor: bool,
                  beta: float) -> None:
    """``outs[p] = beta bases[p] + C_p xs[p]``: lengths, the coefficient block's shape, each
    output's exact shape from its stack and the coefficients, and (read only when ``beta`` is
    not 0) each base's."""
    require(len(outs) == len(xs), f"mtunlearn::{op}: `xs` and `outs` must have the same "
                                  f"length, got {len(xs)} and {len(outs)}")
    require(bases is None or len(bases) == len(outs),
            f"mtunlearn::{op}: `bases` must have one tensor per output ({len(outs)}), got "
            f"{0 if bases is None else len(bases)}")
    lead = 1 if per_tensor else 0
    require(coeffs.dim() in (1 + lead, 2 + lead),
            f"mtunlearn::{op}: `coeffs` must be "
            f"{'[P, k] or [P, m, k]' if per_tensor else '[k] or [m, k]'}, got "
            f"{sizes(coeffs.shape)}")
    require(not per_tensor or coeffs.shape[0] == len(xs),
            f"mtunlearn::{op}: with per_tensor=True `coeffs` must have one block per tensor "
            f"({len(xs)}), got {sizes(coeffs.shape)}")
    floating(op, "coeffs", coeffs)
    if not xs:
        return
    k = coeffs.shape[-1]
    rows = [coeffs.shape[-2]] if coeffs.dim() == 2 + lead else []
    floating(op, "xs[0]", xs[0])
    for p, (x, out) in enumerate(zip(xs, outs)):
        require(x.dim() >= 1 and x.shape[0] == k, f"mtunlearn::{op}: xs[{p}] must have leading "
                                                  f"size k={k} (from `coeffs`), got shape "
                                                  f"{sizes(x.shape)}")
        same_dtype(op, ("xs[0]", xs[0]), (f"xs[{p}]", x))
        same_dtype(op, (f"xs[{p}]", x), (f"outs[{p}]", out))
        expected = (*rows, *x.shape[1:])
        require(tuple(out.shape) == expected,
                f"mtunlearn::{op}: outs[{p}] must have shape {expected} (from xs[{p}] "
                f"{sizes(x.shape)} and `coeffs`), got {sizes(out.shape)}")
        require(out.is_contiguous(), f"mtunlearn::{op}: outs[{p}] must be contiguous (it is "
                                     "written in place)")
        if bases is not None and beta != 0.0:
            base = bases[p]
            same_dtype(op, (f"outs[{p}]", out), (f"bases[{p}]", base))
            require(base.shape == out.shape, f"mtunlearn::{op}: bases[{p}] must have the shape "
                                             f"of outs[{p}], {sizes(out.shape)}, got "
                                             f"{sizes(base.shape)}")


def finite_ridge(op: str, ridge: float) -> None:
    require(math.isfinite(ridge) and ridge >= 0.0,
            f"mtunlearn::{op}: `ridge` must be a finite number >= 0, got {ridge}")


def unit_sign(op: str, sign: int) -> None:
    require(sign in (1, -1), f"mtunlearn::{op}: `sign` must be 1 or -1, got {sign}")
