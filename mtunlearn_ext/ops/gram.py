"""Gram matrices and inner products over a huge dimension: one pass over the inputs.

Inputs are read in their own dtype and accumulated in float32 (float64 for float64 inputs);
the result has that accumulation dtype, because Gram entries feed small solves where half
precision would lose them.

Every op here is differentiable, twice (the backward is made of ``combine`` and these ops; the
gradient has its input's dtype), in forward mode and under ``torch.func``'s transforms too
(``grad``, ``jacrev``, ``vjp``, ``hessian``, ``vmap(grad(f))``), and ``gram`` and ``inner``
have ``torch.vmap`` batch rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtunlearn_ext._extension import has_extension
from mtunlearn_ext.ops import _reference
from mtunlearn_ext.ops._checks import (
    call_op,
    check_bool,
    check_finite_result,
    check_flag,
    check_float_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor_list,
    checked_list_call,
    named_pairs,
)
from mtunlearn_ext.ops._fake_checks import sizes


def _check_paired_stacks(op: str, a_name: str, a_list: list[torch.Tensor], b_name: str,
                         b_list: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Two non-empty lists of stacks ``[m, *shape_p]`` / ``[k, *shape_p]`` cutting the same
    parameters (one m and one k for all), same dtype and device; returns them named."""
    if len(a_list) == 0 or len(a_list) != len(b_list):
        raise ValueError(f"{op}: `{a_name}` and `{b_name}` must be non-empty lists of the same "
                         f"length, got {len(a_list)} and {len(b_list)}")
    for p, (a, b) in enumerate(zip(a_list, b_list)):
        check_float_tensor(op, f"{a_name}[{p}]", a, min_dim=1)
        check_float_tensor(op, f"{b_name}[{p}]", b, min_dim=1)
        if a.shape[0] != a_list[0].shape[0] or b.shape[0] != b_list[0].shape[0]:
            raise ValueError(f"{op}: the leading sizes m and k must be the same for every tensor; "
                             f"{a_name}[{p}] is {sizes(a.shape)}, {b_name}[{p}] is "
                             f"{sizes(b.shape)}")
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"{op}: {a_name}[{p}] and {b_name}[{p}] must share their trailing "
                             f"shape, got {sizes(a.shape)} and {sizes(b.shape)}")
    named = list(named_pairs(a_name, a_list, b_name, b_list))
    check_same_device(op, named)
    check_same_dtype(op, named)
    return named


def _paired_list_op(name: str, a_name: str, a: Sequence[torch.Tensor], b_name: str,
                    b: Sequence[torch.Tensor], per_tensor: bool,
                    check_finite: bool) -> torch.Tensor:
    """Validate two paired stack lists and run the list op ``name`` (compiled or reference)."""
    op = f"mtunlearn_ext.ops.{name}"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, a_name, a, required=True)
    check_tensor_list(op, b_name, b, required=True)
    a_list, b_list = list(a), list(b)

    def check() -> None:
        check_flag(op, "per_tensor", per_tensor)
        _check_paired_stacks(op, a_name, a_list, b_name, b_list)

    result = checked_list_call(
        lambda: call_op(getattr(torch.ops.mtunlearn, name), a_list, b_list, per_tensor),
        lambda: getattr(_reference, name)(a_list, b_list, per_tensor), check)
    if check_finite:
        check_finite_result(op, result, named_pairs(a_name, a_list, b_name, b_list))
    return result


def gram(x: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
    """Batched Gram matrix ``G[..., i, j] = <x[..., i, :], x[..., j, :]>``.

    Args:
        x: ``[..., k, n]``, any float dtype, any strides (a non-unit last stride costs a copy).
        check_finite: raise :class:`FloatingPointError` if ``x`` holds NaN/Inf. The check reads
            only the ``k x k`` result (see the NaN/Inf policy in the README); on CUDA it costs one
            tiny device-to-host sync, so pass ``False`` inside CUDA graphs or compiled regions.

    Returns:
        ``[..., k, k]`` symmetric positive semi-definite, float32 (float64 for float64 input).
    """
    op = "mtunlearn_ext.ops.gram"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_float_tensor(op, "x", x, min_dim=2)
    result = call_op(torch.ops.mtunlearn.gram, x) if has_extension() else _reference.gram(x)
    if check_finite:
        check_finite_result(op, result, [("x", x)])
    return result


def gram_list(xs: Sequence[torch.Tensor], per_tensor: bool = False, *,
              check_finite: bool = True) -> torch.Tensor:
    """Gram matrix of ``k`` vectors stored as a list of per-parameter stacks, without a flat copy.

    ``xs[p]`` is ``[k, *shape_p]`` (for example the ``k`` per-task gradients of parameter ``p``).
    The ``k`` vectors are the concatenations ``v_i = cat_p(xs[p][i].flatten())``; the result is
    ``G[i, j] = sum_p <xs[p][i], xs[p][j]>`` (``[k, k]``), or with ``per_tensor=True`` the stack of
    per-parameter terms (``[len(xs), k, k]``, one Gram per layer). On CUDA the whole list is one
    kernel launch.

    ``check_finite``: raise :class:`FloatingPointError` naming the input if one holds NaN/Inf,
    read from the small result as in :func:`gram`; pass ``False`` inside CUDA graphs and compiled
    regions (no device-to-host read), NaN then propagates.
    """
    op = "mtunlearn_ext.ops.gram_list"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, "xs", xs, required=True)
    xs = list(xs)

    def check() -> None:
        check_flag(op, "per_tensor", per_tensor)
        _check_stacks(op, xs)

    result = checked_list_call(lambda: call_op(torch.ops.mtunlearn.gram_list, xs, per_tensor),
                               lambda: _reference.gram_list(xs, per_tensor), check)
    if check_finite:
        check_finite_result(op, result, ((f"xs[{p}]", x) for p, x in enumerate(xs)))
    return result


def _check_stacks(op: str, xs: list[torch.Tensor]) -> None:
    """A non-empty list of stacks ``[k, *shape_p]`` with one k, dtype and device."""
    if len(xs) == 0:
        raise ValueError(f"{op}: `xs` must hold at least one tensor, got an empty list")
    for p, x in enumerate(xs):
        check_float_tensor(op, f"xs[{p}]", x, min_dim=1)
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"{op}: every tensor in `xs` must have the same leading size k; xs[0] has "
                f"{xs[0].shape[0]} but xs[{p}] has shape {sizes(x.shape)}"
            )
    named = [(f"xs[{p}]", x) for p, x in enumerate(xs)]
    check_same_device(op, named)
    check_same_dtype(op, named)


def inner(a: torch.Tensor, b: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
    """Batched inner products ``C[..., i, j] = <a[..., i, :], b[..., j, :]>``.

    Args:
        a: ``[..., m, n]``; b: ``[..., k, n]`` with the same leading dims, dtype and device.
        check_finite: raise :class:`FloatingPointError` naming the input if one holds NaN/Inf, read
            from the small result as in :func:`gram`; pass ``False`` inside CUDA graphs and compiled
            regions (no device-to-host read), NaN then propagates.

    Returns:
        ``[..., m, k]`` in the accumulation dtype (float32, or float64 for float64 inputs).
    """
    op = "mtunlearn_ext.ops.inner"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_float_tensor(op, "a", a, min_dim=2)
    check_float_tensor(op, "b", b, min_dim=2)
    check_same_device(op, [("a", a), ("b", b)])
    check_same_dtype(op, [("a", a), ("b", b)])
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{op}: `a` [..., m, n] and `b` [..., k, n] must share leading dims and n; got "
            f"{sizes(a.shape)} and {sizes(b.shape)}"
        )
    result = call_op(torch.ops.mtunlearn.inner, a, b) if has_extension() else _reference.inner(a, b)
    if check_finite:
        check_finite_result(op, result, [("a", a), ("b", b)])
    return result


def inner_list(as_: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], per_tensor: bool = False,
               *, check_finite: bool = True) -> torch.Tensor:
    """Inner products of ``m`` vectors with ``k`` vectors, both stored as per-parameter stacks.

    ``as_[p]`` is ``[m, *shape_p]`` and ``bs[p]`` is ``[k, *shape_p]``; the result is
    ``C[i, j] = sum_p <as_[p][i], bs[p][j]>`` (``[m, k]``) or, with ``per_tensor=True``, the
    per-parameter terms (``[len(as_), m, k]``). No flat copy; one pass (one CUDA launch).

    ``check_finite``: raise :class:`FloatingPointError` naming the input if one holds NaN/Inf,
    read from the small result as in :func:`gram`; pass ``False`` inside CUDA graphs and compiled
    regions (no device-to-host read), NaN then propagates.
    """
    return _paired_list_op("inner_list", "as_", as_, "bs", bs, per_tensor, check_finite)


def gram_list_stacked(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
                      per_tensor: bool = False, *, check_finite: bool = True) -> torch.Tensor:
    """Gram matrix of ``m + k`` vectors: the ``m`` stored as the stacks ``xs`` above the ``k``
    stored as ``ys``, in one pass over both and without stacking them.

    ``xs[p]`` is ``[m, *shape_p]`` and ``ys[p]`` is ``[k, *shape_p]``. The result ``S``
    (``[m + k, m + k]``, or ``[len(xs), m + k, m + k]`` per tensor) holds ``<x_i, x_j>`` in
    ``S[:m, :m]``, ``<y_i, y_j>`` in ``S[m:, m:]`` and ``<x_i, y_j>`` in ``S[:m, m:]``: a projection
    of ``m`` vectors on the span of ``k`` others needs the last two, which ``gram_list(ys)`` and
    ``inner_list(xs, ys)`` would get by reading ``ys`` twice.

    ``check_finite``: raise :class:`FloatingPointError` naming the input if one holds NaN/Inf,
    read from the small result as in :func:`gram`; pass ``False`` inside CUDA graphs and compiled
    regions (no device-to-host read), NaN then propagates.
    """
    return _paired_list_op("gram_list_stacked", "xs", xs, "ys", ys, per_tensor, check_finite)
