"""Linear combinations of ``k`` vectors over a huge dimension, written once."""

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
    checked_list_call,
)


def combine(coeffs: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
            beta: float = 0.0, *, check_finite: bool = True) -> torch.Tensor:
    """``out = beta * out + coeffs @ x``, batched over leading dims.

    Args:
        coeffs: ``[..., m, k]``, any float dtype (used in float32, float64 for float64 ``x``).
        x: ``[..., k, n]``.
        out: optional ``[..., m, n]`` tensor of ``x``'s dtype, written in place (must be
            contiguous); when omitted a new tensor is returned and ``beta`` must be 0.
        beta: scale of the previous ``out`` (``0`` ignores its contents, NaN included).
        check_finite: raise if ``coeffs`` holds NaN/Inf (``x`` is not scanned: NaN/Inf in ``x``
            propagate to the result, which is what a gradient combination should do).

    Returns:
        ``[..., m, n]`` in ``x``'s dtype (``out`` itself when given). Accumulation in float32
        (float64 for float64).
    """
    op = "mtunlearn_ext.ops.combine"
    check_float_tensor(op, "coeffs", coeffs, min_dim=2)
    check_float_tensor(op, "x", x, min_dim=2)
    check_same_device(op, [("coeffs", coeffs), ("x", x)])
    if coeffs.shape[:-2] != x.shape[:-2] or coeffs.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{op}: `coeffs` [..., m, k] and `x` [..., k, n] must share leading dims and k; got "
            f"{tuple(coeffs.shape)} and {tuple(x.shape)}"
        )
    if check_finite:
        check_finite_result(op, coeffs, [("coeffs", coeffs)])
    if out is None:
        if beta != 0.0:
            raise ValueError(f"{op}: `beta` must be 0 when `out` is not given, got {beta}")
        if has_extension():
            return torch.ops.mtunlearn.combine(coeffs, x)
        return _reference.combine(coeffs, x)
    expected = (*x.shape[:-2], coeffs.shape[-2], x.shape[-1])
    if tuple(out.shape) != expected:
        raise ValueError(f"{op}: `out` must have shape {expected}, got {tuple(out.shape)}")
    check_same_device(op, [("x", x), ("out", out)])
    check_same_dtype(op, [("x", x), ("out", out)])
    if not out.is_contiguous():
        raise ValueError(f"{op}: `out` must be contiguous (it is written in place)")
    if has_extension():
        torch.ops.mtunlearn.combine_(out, coeffs, x, float(beta))
    else:
        out.copy_(_reference.combine(coeffs, x, base=out, beta=beta))
    return out


def combine_list(coeffs: torch.Tensor, xs: Sequence[torch.Tensor],
                 outs: Sequence[torch.Tensor], beta: float = 0.0, *, per_tensor: bool = False,
                 bases: Sequence[torch.Tensor] | None = None, check_finite: bool = True) -> None:
    """In place, for every parameter ``p``: ``outs[p] = beta * bases[p] + C_p @ xs[p]``.

    ``xs[p]`` is ``[k, *shape_p]``. ``C_p`` is ``coeffs`` itself, or with ``per_tensor=True``
    ``coeffs[p]`` (one coefficient block per parameter, e.g. per-layer projections in one
    launch). A block of shape ``[k]`` gives ``outs[p]`` of shape ``shape_p`` (for example each
    parameter's ``.grad``); ``[m, k]`` gives ``[m, *shape_p]``. No flat copy is made; on CUDA the
    whole list is one kernel launch. ``bases`` defaults to ``outs`` (``beta=1`` accumulates into
    them); given, ``bases[p]`` has the shape and dtype of ``outs[p]``, any strides, and is either
    ``outs[p]`` itself or memory apart from it: the projections write ``g - C @ B`` into new
    outputs this way without first copying ``g`` there, one launch per parameter fewer.
    ``beta=0`` ignores the bases (their contents, NaN included).
    """
    op = "mtunlearn_ext.ops.combine_list"
    xs, outs = list(xs), list(outs)
    base_list = None if bases is None else list(bases)
    if check_finite:
        check_float_tensor(op, "coeffs", coeffs)
        check_finite_result(op, coeffs, [("coeffs", coeffs)])

    def compiled() -> None:
        if base_list is None:
            torch.ops.mtunlearn.combine_list_(outs, coeffs, xs, float(beta), per_tensor)
        else:
            torch.ops.mtunlearn.combine_list_from_(outs, base_list, coeffs, xs, float(beta),
                                                   per_tensor)

    checked_list_call(
        compiled,
        lambda: _reference_combine_list(coeffs, xs, outs, beta, per_tensor, base_list),
        lambda: check_combine_list(op, coeffs, xs, outs, per_tensor, base_list, beta))


def check_combine_list(op: str, coeffs: torch.Tensor, xs: list[torch.Tensor],
                        outs: list[torch.Tensor], per_tensor: bool,
                        bases: list[torch.Tensor] | None, beta: float) -> None:
    lead_dims = 1 if per_tensor else 0
    check_float_tensor(op, "coeffs", coeffs, min_dim=1 + lead_dims)
    if coeffs.dim() > 2 + lead_dims:
        expected = "[P, k] or [P, m, k]" if per_tensor else "[k] or [m, k]"
        raise ValueError(f"{op}: `coeffs` must be {expected}, got {tuple(coeffs.shape)}")
    if len(xs) != len(outs):
        raise ValueError(f"{op}: `xs` and `outs` must have the same length, got {len(xs)} and "
                         f"{len(outs)}")
    if bases is not None and len(bases) != len(outs):
        raise ValueError(f"{op}: `bases` must have one tensor per output ({len(outs)}), got "
                         f"{len(bases)}")
    if per_tensor and coeffs.shape[0] != len(xs):
        raise ValueError(f"{op}: with per_tensor=True `coeffs` needs one block per tensor "
                         f"({len(xs)}), got shape {tuple(coeffs.shape)}")
    if len(xs) == 0:
        return
    k = coeffs.shape[-1]
    lead = () if coeffs.dim() == 1 + lead_dims else (coeffs.shape[-2],)
    for p, (x, o) in enumerate(zip(xs, outs)):
        check_float_tensor(op, f"xs[{p}]", x, min_dim=1)
        check_float_tensor(op, f"outs[{p}]", o)
        if x.shape[0] != k:
            raise ValueError(f"{op}: xs[{p}] must have leading size k={k} (from `coeffs`), got "
                             f"shape {tuple(x.shape)}")
        if tuple(o.shape) != (*lead, *x.shape[1:]):
            raise ValueError(f"{op}: outs[{p}] must have shape {(*lead, *x.shape[1:])}, got "
                             f"{tuple(o.shape)}")
        if not o.is_contiguous():
            raise ValueError(f"{op}: outs[{p}] must be contiguous (it is written in place)")
    named = [(f"xs[{p}]", x) for p, x in enumerate(xs)] + [(f"outs[{p}]", o)
                                                           for p, o in enumerate(outs)]
    check_same_device(op, [("coeffs", coeffs)] + named)
    check_same_dtype(op, named)
    if bases is None or beta == 0.0:
        return
    for p, (b, o) in enumerate(zip(bases, outs)):
        check_float_tensor(op, f"bases[{p}]", b)
        check_same_device(op, [(f"outs[{p}]", o), (f"bases[{p}]", b)])
        check_same_dtype(op, [(f"outs[{p}]", o), (f"bases[{p}]", b)])
        if b.shape != o.shape:
            raise ValueError(f"{op}: bases[{p}] must have the shape of outs[{p}], "
                             f"{tuple(o.shape)}, got {tuple(b.shape)}")
        if torch.compiler.is_compiling():
            continue  # no data pointers while tracing: the compiled op checks the overlap
        same = b.data_ptr() == o.data_ptr() and b.stride() == o.stride()
        if not same and _shares_memory(b, o):
            raise ValueError(f"{op}: bases[{p}] overlaps outs[{p}] without being the same tensor")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges of two tensors of one storage intersect (a conservative test)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: torch.Tensor) -> tuple[int, int]:
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _reference_combine_list(coeffs: torch.Tensor, xs: list[torch.Tensor],
                            outs: list[torch.Tensor], beta: float, per_tensor: bool,
                            bases: list[torch.Tensor] | None = None) -> None:
    if len(xs) == 0:
        return
    k = coeffs.shape[-1]
    for p, (x, o) in enumerate(zip(xs, outs)):
        block = coeffs[p] if per_tensor else coeffs
        c2 = block.reshape(-1, k)
        base = o if bases is None else bases[p]
        res = _reference.combine(c2, x.reshape(k, -1), base=base.reshape(c2.shape[0], -1),
                                 beta=beta)
        o.copy_(res.reshape(o.shape))
