"""Whole gradient-surgery steps: one Gram pass, a tiny solve, one combine pass.

Each returns the projected vectors and, with ``return_coeffs=True``, the coefficients of the
small problem as well. The NaN/Inf check reads those coefficients, which are non-finite whenever
an input is, so it costs no pass over the inputs.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from mtunlearn_ext._extension import has_extension
from mtunlearn_ext.ops import _reference
from mtunlearn_ext.ops._checks import (
    call_op,
    check_bool,
    check_finite_result,
    check_float_tensor,
    check_ridge,
    check_same_device,
    check_same_dtype,
    check_seed,
    check_sign,
)
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.ops.solvers import MAX_SOLVER_K


def _check_pair(op: str, g_name: str, g: torch.Tensor, r_name: str, r: torch.Tensor) -> None:
    check_float_tensor(op, g_name, g, min_dim=2)
    check_float_tensor(op, r_name, r, min_dim=2)
    check_same_device(op, [(g_name, g), (r_name, r)])
    check_same_dtype(op, [(g_name, g), (r_name, r)])
    if g.shape[:-2] != r.shape[:-2] or g.shape[-1] != r.shape[-1]:
        raise ValueError(
            f"{op}: `{g_name}` [..., m, n] and `{r_name}` [..., k, n] must share leading dims and "
            f"n; got {sizes(g.shape)} and {sizes(r.shape)}"
        )
    if r.shape[-2] > MAX_SOLVER_K:
        raise ValueError(f"{op}: `{r_name}` has k={r.shape[-2]} rows; at most {MAX_SOLVER_K}")


@overload
def project_out(g: torch.Tensor, basis: torch.Tensor, ridge: float = ..., *,
                check_finite: bool = ..., return_coeffs: Literal[False] = ...) -> torch.Tensor: ...
@overload
def project_out(g: torch.Tensor, basis: torch.Tensor, ridge: float = ..., *,
                check_finite: bool = ..., return_coeffs: Literal[True]
                ) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def project_out(g: torch.Tensor, basis: torch.Tensor, ridge: float = ..., *,
                check_finite: bool = ..., return_coeffs: bool
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def project_out(g: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-6, *,
                check_finite: bool = True, return_coeffs: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Remove from each row of ``g`` its least-squares projection on the span of ``basis``' rows.

    ``out = g - a^T basis`` with ``(B B^T + lambda I) a = B g^T``, ``lambda = ridge * tr(B B^T)/k``:
    the orthogonal-complement projection ``(I - B^T (B B^T)^+ B) g`` up to the ridge, computed from
    the ``k x k`` Gram matrix instead of a QR factorisation over the huge dimension. Correct for
    rank-deficient bases (see :func:`ridge_solve`).

    Args:
        g: ``[..., m, n]``; basis: ``[..., k, n]`` (same leading dims, dtype, device).
        ridge: relative Tikhonov term (:func:`ridge_solve`).
        check_finite: raise :class:`FloatingPointError` naming ``g`` or ``basis`` if one holds
            NaN/Inf, read from the coefficients; pass ``False`` inside CUDA graphs and compiled
            regions (no device-to-host read), NaN then propagates.

    Returns:
        ``[..., m, n]`` in ``g``'s dtype; with ``return_coeffs``, also ``a^T`` (``[..., m, k]``).
    """
    op = "mtunlearn_ext.ops.project_out"
    check_finite = check_bool(op, "check_finite", check_finite)
    _check_pair(op, "g", g, "basis", basis)
    ridge = check_ridge(op, ridge)
    if has_extension():
        out, coeffs = call_op(torch.ops.mtunlearn.project_out, g, basis, float(ridge))
    else:
        gm = _reference.gram(basis)
        coeffs = _reference.ridge_solve(gm, _reference.inner(basis, g), ridge).transpose(-1, -2)
        out = _reference.combine(-coeffs, basis, base=g, beta=1.0)
    if check_finite:
        # With an empty basis (k = 0) there are no coefficients for NaN to reach: the output,
        # a copy of g, is read instead (the op's whole work is that copy).
        check_finite_result(op, coeffs if basis.shape[-2] else out,
                            [("g", g), ("basis", basis)])
    return (out, coeffs) if return_coeffs else out


@overload
def project_nonconflicting(g: torch.Tensor, r: torch.Tensor, sign: int = ..., *,
                           check_finite: bool = ..., return_coeffs: Literal[False] = ...
                           ) -> torch.Tensor: ...
@overload
def project_nonconflicting(g: torch.Tensor, r: torch.Tensor, sign: int = ..., *,
                           check_finite: bool = ..., return_coeffs: Literal[True]
                           ) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def project_nonconflicting(g: torch.Tensor, r: torch.Tensor, sign: int = ..., *,
                           check_finite: bool = ..., return_coeffs: bool
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def project_nonconflicting(g: torch.Tensor, r: torch.Tensor, sign: int = 1, *,
                           check_finite: bool = True, return_coeffs: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """For each row ``g_i``, the closest ``d`` with ``sign * <d, r_j> >= 0`` for every row ``r_j``.

    ``sign=1``: no conflict with any ``r_j`` (stepping along ``-d`` raises no ``r_j``-loss to first
    order; the UPGrad/GEM convention). ``sign=-1``: ``<d, r_j> <= 0`` (stepping along ``+d``
    raises none). Solved in the dual, ``d = g + sign * w @ r`` with ``w >= 0`` from
    :func:`nonconflicting_dual` on ``G = r r^T``, ``c = sign * r g``.

    Args:
        g: ``[..., m, n]``; r: ``[..., k, n]`` (same leading dims, dtype, device).
        sign: ``1`` or ``-1``, as above.
        check_finite: raise :class:`FloatingPointError` naming ``g`` or ``r`` if one holds NaN/Inf,
            read from the coefficients; pass ``False`` inside CUDA graphs and compiled regions (no
            device-to-host read), NaN then propagates.

    Returns:
        ``[..., m, n]`` in ``g``'s dtype; with ``return_coeffs``, also ``w`` (``[..., m, k]``).
    """
    op = "mtunlearn_ext.ops.project_nonconflicting"
    check_finite = check_bool(op, "check_finite", check_finite)
    _check_pair(op, "g", g, "r", r)
    sign = check_sign(op, sign)
    if has_extension():
        out, coeffs = call_op(torch.ops.mtunlearn.project_nonconflicting, g, r, sign)
    else:
        coeffs = _reference.nonconflicting_dual(_reference.gram(r), sign * _reference.inner(g, r))
        out = _reference.combine(sign * coeffs, r, base=g, beta=1.0)
    if check_finite:
        check_finite_result(op, coeffs if r.shape[-2] else out, [("g", g), ("r", r)])
    return (out, coeffs) if return_coeffs else out


@overload
def pcgrad(x: torch.Tensor, seed: int = ..., *, check_finite: bool = ...,
           return_coeffs: Literal[False] = ...) -> torch.Tensor: ...
@overload
def pcgrad(x: torch.Tensor, seed: int = ..., *, check_finite: bool = ...,
           return_coeffs: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...
@overload
def pcgrad(x: torch.Tensor, seed: int = ..., *, check_finite: bool = ...,
           return_coeffs: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def pcgrad(x: torch.Tensor, seed: int = 0, *, check_finite: bool = True,
           return_coeffs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PCGrad over the ``k`` rows of ``x`` (``[..., k, n]``), summed: ``[..., n]``.

    Equal, to rounding, to the sequential textbook loop (each task's gradient projected off the
    normal plane of every task it conflicts with, in the order of :func:`pcgrad_order`), but
    computed as ``w @ x`` with ``w`` from :func:`pcgrad_weights` on the Gram matrix: two passes
    over ``x`` whatever ``k``. With ``return_coeffs``, also ``w`` (``[..., k]``).

    Args:
        x: ``[..., k, n]``, one row per task.
        seed: the projection orders: ``seed >= 0`` shuffles, for each task, the order of the others
            it is projected against (splitmix64: one order per seed on every device and backend); a
            negative seed keeps the natural order, every other task in increasing index
            (:func:`pcgrad_order`).
        check_finite: raise :class:`FloatingPointError` if ``x`` holds NaN/Inf, read from the
            weights; pass ``False`` inside CUDA graphs and compiled regions (no device-to-host
            read), NaN then propagates.
    """
    op = "mtunlearn_ext.ops.pcgrad"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_float_tensor(op, "x", x, min_dim=2)
    if x.shape[-2] > MAX_SOLVER_K:
        raise ValueError(f"{op}: `x` has k={x.shape[-2]} rows; at most {MAX_SOLVER_K}")
    if has_extension():
        out, coeffs = call_op(torch.ops.mtunlearn.pcgrad, x, check_seed(op, seed))
    else:
        coeffs = _reference.pcgrad_weights(_reference.gram(x), check_seed(op, seed))
        out = _reference.combine(coeffs.unsqueeze(-2), x).squeeze(-2)
    if check_finite:
        check_finite_result(op, coeffs, [("x", x)])
    return (out, coeffs) if return_coeffs else out
