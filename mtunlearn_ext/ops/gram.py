"""Gram matrices and inner products over a huge dimension: one pass over the inputs.

Inputs are read in their own dtype and accumulated in float32 (float64 for float64 inputs);
the result has that accumulation dtype, because Gram entries feed small solves where half
precision would lose them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtunlearn_ext._extension import has_extension
from mtunlearn_ext.ops import _reference
from mtunlearn_ext.ops._checks import (
    check_finite_result,
    check_float_tensor,
    check_same_device,
    check_same_dtype,
)


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
    check_float_tensor(op, "x", x, min_dim=2)
    result = torch.ops.mtunlearn.gram(x) if has_extension() else _reference.gram(x)
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
    """
    op = "mtunlearn_ext.ops.gram_list"
    xs = list(xs)
    if len(xs) == 0:
        raise ValueError(f"{op}: `xs` must hold at least one tensor, got an empty list")
    for p, x in enumerate(xs):
        check_float_tensor(op, f"xs[{p}]", x, min_dim=1)
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"{op}: every tensor in `xs` must have the same leading size k; xs[0] has "
                f"{xs[0].shape[0]} but xs[{p}] has shape {tuple(x.shape)}"
            )
    named = [(f"xs[{p}]", x) for p, x in enumerate(xs)]
    check_same_device(op, named)
    check_same_dtype(op, named)
    if has_extension():
        result = torch.ops.mtunlearn.gram_list(xs, per_tensor)
    else:
        result = _reference.gram_list(xs, per_tensor)
    if check_finite:
        check_finite_result(op, result, named)
    return result


def inner(a: torch.Tensor, b: torch.Tensor, *, check_finite: bool = True) -> torch.Tensor:
    """Batched inner products ``C[..., i, j] = <a[..., i, :], b[..., j, :]>``.

    Args:
        a: ``[..., m, n]``; b: ``[..., k, n]`` with the same leading dims, dtype and device.

    Returns:
        ``[..., m, k]`` in the accumulation dtype (float32, or float64 for float64 inputs).
    """
    op = "mtunlearn_ext.ops.inner"
    check_float_tensor(op, "a", a, min_dim=2)
    check_float_tensor(op, "b", b, min_dim=2)
    check_same_device(op, [("a", a), ("b", b)])
    check_same_dtype(op, [("a", a), ("b", b)])
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{op}: `a` [..., m, n] and `b` [..., k, n] must share leading dims and n; got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    result = torch.ops.mtunlearn.inner(a, b) if has_extension() else _reference.inner(a, b)
    if check_finite:
        check_finite_result(op, result, [("a", a), ("b", b)])
    return result


def inner_list(as_: Sequence[torch.Tensor], bs: Sequence[torch.Tensor], per_tensor: bool = False,
               *, check_finite: bool = True) -> torch.Tensor:
    """Inner products of ``m`` vectors with ``k`` vectors, both stored as per-parameter stacks.

    ``as_[p]`` is ``[m, *shape_p]`` and ``bs[p]`` is ``[k, *shape_p]``; the result is
    ``C[i, j] = sum_p <as_[p][i], bs[p][j]>`` (``[m, k]``) or, with ``per_tensor=True``, the
    per-parameter terms (``[len(as_), m, k]``). No flat copy; one pass (one CUDA launch).
    """
    op = "mtunlearn_ext.ops.inner_list"
    as_, bs = list(as_), list(bs)
    if len(as_) == 0 or len(as_) != len(bs):
        raise ValueError(f"{op}: `as_` and `bs` must be non-empty lists of the same length, got "
                         f"{len(as_)} and {len(bs)}")
    for p, (a, b) in enumerate(zip(as_, bs)):
        check_float_tensor(op, f"as_[{p}]", a, min_dim=1)
        check_float_tensor(op, f"bs[{p}]", b, min_dim=1)
        if a.shape[0] != as_[0].shape[0] or b.shape[0] != bs[0].shape[0]:
            raise ValueError(f"{op}: the leading sizes m and k must be the same for every tensor; "
                             f"as_[{p}] is {tuple(a.shape)}, bs[{p}] is {tuple(b.shape)}")
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"{op}: as_[{p}] and bs[{p}] must share their trailing shape, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
    named = [(f"as_[{p}]", a) for p, a in enumerate(as_)] + [(f"bs[{p}]", b)
                                                             for p, b in enumerate(bs)]
    check_same_device(op, named)
    check_same_dtype(op, named)
    if has_extension():
        result = torch.ops.mtunlearn.inner_list(as_, bs, per_tensor)
    else:
        result = _reference.inner_list(as_, bs, per_tensor)
    if check_finite:
        check_finite_result(op, result, named)
    return result


def gram_list_stacked(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
                      per_tensor: bool = False, *, check_finite: bool = True) -> torch.Tensor:
    """Gram matrix of ``m + k`` vectors: the ``m`` stored as the stacks ``xs`` above the ``k``
    stored as ``ys``, in one pass over both and without stacking them.

    ``xs[p]`` is ``[m, *shape_p]`` and ``ys[p]`` is ``[k, *shape_p]``. The result ``S``
    (``[m + k, m + k]``, or ``[len(xs), m + k, m + k]`` per tensor) holds ``<x_i, x_j>`` in
    ``S[:m, :m]``, ``<y_i, y_j>`` in ``S[m:, m:]`` and ``<x_i, y_j>`` in ``S[:m, m:]``: a projection
    of ``m`` vectors on the span of ``k`` others needs the last two, which ``gram_list(ys)`` and
    ``inner_list(xs, ys)`` would get by reading ``ys`` twice.
    """
    op = "mtunlearn_ext.ops.gram_list_stacked"
    xs, ys = list(xs), list(ys)
    if len(xs) == 0 or len(xs) != len(ys):
        raise ValueError(f"{op}: `xs` and `ys` must be non-empty lists of the same length, got "
                         f"{len(xs)} and {len(ys)}")
    for p, (x, y) in enumerate(zip(xs, ys)):
        check_float_tensor(op, f"xs[{p}]", x, min_dim=1)
        check_float_tensor(op, f"ys[{p}]", y, min_dim=1)
        if x.shape[0] != xs[0].shape[0] or y.shape[0] != ys[0].shape[0]:
            raise ValueError(f"{op}: the leading sizes m and k must be the same for every tensor; "
                             f"xs[{p}] is {tuple(x.shape)}, ys[{p}] is {tuple(y.shape)}")
        if x.shape[1:] != y.shape[1:]:
            raise ValueError(f"{op}: xs[{p}] and ys[{p}] must share their trailing shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
    named = [(f"xs[{p}]", x) for p, x in enumerate(xs)] + [(f"ys[{p}]", y)
                                                           for p, y in enumerate(ys)]
    check_same_device(op, named)
    check_same_dtype(op, named)
    if has_extension():
        result = torch.ops.mtunlearn.gram_list_stacked(xs, ys, per_tensor)
    else:
        result = _reference.gram_list_stacked(xs, ys, per_tensor)
    if check_finite:
        check_finite_result(op, result, named)
    return result
