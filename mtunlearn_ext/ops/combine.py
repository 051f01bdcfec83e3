"""Linear combinations of ``k`` vectors over a huge dimension, written once."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from mtunlearn_ext._extension import has_extension
from mtunlearn_ext.ops import _reference
from mtunlearn_ext.ops._checks import (
    call_op,
    _has_no_values,
    check_beta,
    check_bool,
    check_finite_result,
    check_flag,
    check_float_tensor,
    check_no_autograd_through_out,
    check_not_transformed,
    check_same_device,
    check_on_failure,
    check_same_dtype,
    check_tensor_list,
    checked_list_call,
)
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.ops._forward_mode import refuse_tangents


def combine(coeffs: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
            beta: float = 0.0, *, check_finite: bool = True) -> torch.Tensor:
    """``out = beta * out + coeffs @ x``, batched over leading dims.

    Args:
        coeffs: ``[..., m, k]``, any float dtype (used in float32, float64 for float64 ``x``).
        x: ``[..., k, n]``, any strides.
        out: optional ``[..., m, n]`` tensor of ``x``'s dtype, written in place (must be
            contiguous); when omitted a new tensor is returned and ``beta`` must be 0. ``out``
            is written while every row of ``x`` is read, so an ``out`` that shares any byte
            with ``x`` as the kernels read it is refused (``ValueError`` naming ``out`` and
            ``x``, nothing written), ``out=x`` included; the bytes decide, not the storage, so
            two tensors over one buffer (``torch.from_numpy`` twice, ``torch.from_dlpack``) are
            caught too. An ``x`` whose last dim is not unit-stride, or whose leading dims do
            not merge into one, is read from a private copy and never conflicts. ``out`` may
            share memory with ``coeffs`` (``combine(A, X, out=A)``): the kernels then read a
            private copy of the coefficients.
        beta: scale of the previous ``out`` (``0`` ignores its contents, NaN included).
        check_finite: raise if ``coeffs`` holds NaN/Inf, and refuse a NaN or infinite ``beta``
            (``ValueError``) (``x`` is not scanned: NaN/Inf in ``x`` propagate to the result,
            which is what a gradient combination should do).

    Returns:
        ``[..., m, n]`` in ``x``'s dtype (``out`` itself when given). Accumulation in float32
        (float64 for float64).

    Autograd: without ``out``, differentiable in ``coeffs`` and ``x`` (twice: the backward
    is made of ``combine`` and ``inner``; forward mode and ``torch.func``'s ``grad``,
    ``jacrev``, ``vjp``, ``hessian`` too). With ``out`` the write is in place and not recorded,
    so while grad mode is on, an ``out``, ``coeffs`` or ``x`` that requires grad is refused
    (``RuntimeError``), as ``torch.matmul(..., out=)`` refuses it: call it under
    ``torch.no_grad()`` or on detached tensors.
    """
    op = "mtunlearn_ext.ops.combine"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_float_tensor(op, "coeffs", coeffs, min_dim=2)
    check_float_tensor(op, "x", x, min_dim=2)
    check_same_device(op, [("coeffs", coeffs), ("x", x)])
    if coeffs.shape[:-2] != x.shape[:-2] or coeffs.shape[-1] != x.shape[-2]:
        raise ValueError(
            f"{op}: `coeffs` [..., m, k] and `x` [..., k, n] must share leading dims and k; got "
            f"{sizes(coeffs.shape)} and {sizes(x.shape)}"
        )
    if check_finite:
        check_finite_result(op, coeffs, [("coeffs", coeffs)])
    if out is None:
        if beta != 0.0:
            raise ValueError(f"{op}: `beta` must be 0 when `out` is not given, got {beta}")
        if has_extension():
            return call_op(torch.ops.mtunlearn.combine, coeffs, x)
        return _reference.combine(coeffs, x)
    check_float_tensor(op, "out", out)
    beta = check_beta(op, beta, check_finite)
    check_no_autograd_through_out(op, [("out", out), ("coeffs", coeffs), ("x", x)])
    refuse_tangents(op, [("out", out), ("coeffs", coeffs), ("x", x)])
    expected = (*x.shape[:-2], coeffs.shape[-2], x.shape[-1])
    if tuple(out.shape) != expected:
        raise ValueError(f"{op}: `out` must have shape {expected}, got {sizes(out.shape)}")
    check_same_device(op, [("x", x), ("out", out)])
    check_same_dtype(op, [("x", x), ("out", out)])
    if not out.is_contiguous():
        raise ValueError(f"{op}: `out` must be contiguous (it is written in place)")
    if has_extension():
        check_on_failure(lambda: torch.ops.mtunlearn.combine_(out, coeffs, x, float(beta)),
                         lambda: _check_out_apart_from_x(op, out, x))
    else:
        _check_out_apart_from_x(op, out, x)
        out.copy_(_reference.combine(coeffs, x, base=out, beta=beta))
    return out


def _check_out_apart_from_x(op: str, out: torch.Tensor, x: torch.Tensor) -> None:
    """Refuse an ``out`` that shares bytes with ``x`` as the kernels read it: the same decision
    as combine.cpp's ``combine_into`` (byte ranges, not storages, which two tensors over one
    buffer need not share). ``x`` is read in place when its rows are unit-stride, whatever its
    leading dims; meeting ``out``, it is refused when those dims merge into one (a view
    ``[B, k, n]``), else read from a private copy, as such an ``x`` always was."""
    check_not_transformed(op, (out, x))
    if torch.compiler.is_compiling() or _has_no_values(x) or out.numel() == 0 or x.numel() == 0:
        return
    k, n = x.shape[-2], x.shape[-1]
    if n > 1 and x.stride(-1) != 1:
        return  # read from a copy
    try:
        batched = x.view(-1, k, n)
    except RuntimeError:
        return  # read from a copy
    lo = out.data_ptr()
    if _batched_rows_meet(batched, lo, lo + out.numel() * out.element_size()):
        raise ValueError(f"{op}: `out` overlaps `x`; `out` must not share memory with `x`, which "
                         "is read while `out` is written (clone() one of them first)")


def _batched_rows_meet(x: torch.Tensor, lo: int, hi: int) -> bool:
    """Whether a row of ``x`` (``[B, r, n]``, unit-stride rows) meets the byte range
    ``[lo, hi)``: the extent first, then one :func:`_rows_meet` per index of the shorter of
    ``B`` and ``r`` (as combine.cpp's ``batched_rows_meet``)."""
    size = x.element_size()
    b, r, n = x.shape
    start = x.data_ptr()
    end = start + ((b - 1) * x.stride(0) + (r - 1) * x.stride(1) + n) * size
    if end <= lo or hi <= start:
        return False
    outer, inner, outer_stride, inner_stride = ((b, r, x.stride(0), x.stride(1)) if b <= r
                                                else (r, b, x.stride(1), x.stride(0)))
    return any(_rows_meet((start + i * outer_stride * size, inner_stride * size, inner, n * size),
                          lo, hi) for i in range(outer))


def combine_list(coeffs: torch.Tensor, xs: Sequence[torch.Tensor],
                 outs: Sequence[torch.Tensor], beta: float = 0.0, *, per_tensor: bool = False,
                 bases: Sequence[torch.Tensor] | None = None, check_finite: bool = True) -> None:
    """In place, for every parameter ``p``: ``outs[p] = beta * bases[p] + C_p @ xs[p]``.

    ``xs[p]`` is ``[k, *shape_p]``, any strides. ``C_p`` is ``coeffs`` itself, or with
    ``per_tensor=True`` ``coeffs[p]`` (one coefficient block per parameter, e.g. per-layer
    projections in one launch). A block of shape ``[k]`` gives ``outs[p]`` of shape ``shape_p``
    (for example each parameter's ``.grad``); ``[m, k]`` gives ``[m, *shape_p]``. Every
    ``outs[p]`` must be contiguous in the default (row-major) layout, ``is_contiguous()``: a
    ``channels_last`` or otherwise strided output is refused (``ValueError``; write into a
    contiguous tensor, then copy it into the strided one). No flat copy is made; on
    CUDA the whole list is one kernel launch. ``bases`` defaults to ``outs`` (``beta=1``
    accumulates into them); given, ``bases[p]`` has the shape and dtype of ``outs[p]``, any
    strides, and is either ``outs[p]`` itself (each element at the same address) or memory
    apart from it: the projections write ``g - C @ B`` into new outputs this way without first
    copying ``g`` there, one launch per parameter fewer. ``beta=0`` ignores the bases (their
    contents, NaN included).

    Every output is written while every input and base is read, so an output that shares a
    byte with any input, another output, another output's base, or its own base other than as
    the same tensor, is refused (``ValueError`` naming both; nothing is written). The bytes the
    kernels read decide, not storages: two tensors over one buffer (``torch.from_numpy`` twice,
    ``torch.from_dlpack``) are caught, and a strided base or input whose rows interleave with an
    output without touching it is accepted. An input whose dims after the first are not dense
    together, or a base that is not dense (after its first dim, with ``[m, k]`` blocks), is read
    from a private copy made before any write, so it may share memory with anything.
    ``coeffs`` may be an output (the kernels read a private copy of it). The checks cost
    O((P + R) log P) for P tensors of R rows in all, however the tensors lie in memory, and
    no pass over the data.

    ``check_finite`` raises if ``coeffs`` holds NaN/Inf and refuses a NaN or infinite ``beta``
    (``ValueError``) (``xs`` and ``bases`` are not scanned: their NaN/Inf propagate to the
    outputs).

    Not differentiable: the writes are in place and not recorded by autograd, so while grad
    mode is on, any of ``outs``, ``coeffs``, ``xs`` or ``bases`` that requires grad is refused
    (``RuntimeError`` naming it, nothing written); call it under ``torch.no_grad()`` or on
    detached tensors, as on ``.grad``.
    """
    op = "mtunlearn_ext.ops.combine_list"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, "xs", xs, required=True)
    check_tensor_list(op, "outs", outs, required=True)
    check_tensor_list(op, "bases", bases)
    xs, outs = list(xs), list(outs)
    base_list = None if bases is None else list(bases)
    beta = check_beta(op, beta, check_finite)
    refuse_tangents(op, [("coeffs", coeffs), ("xs", xs), ("outs", outs),
                         ("bases", base_list or [])])
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
    check_flag(op, "per_tensor", per_tensor)
    check_not_transformed(op, [coeffs, *xs, *outs, *(bases or [])])
    # The compiled entry refuses these too (cheaply, in C++); named here in the caller's words.
    check_no_autograd_through_out(op, [("outs", outs), ("coeffs", coeffs), ("xs", xs),
                                       ("bases", bases or [])])
    lead_dims = 1 if per_tensor else 0
    check_float_tensor(op, "coeffs", coeffs, min_dim=1 + lead_dims)
    if coeffs.dim() > 2 + lead_dims:
        expected = "[P, k] or [P, m, k]" if per_tensor else "[k] or [m, k]"
        raise ValueError(f"{op}: `coeffs` must be {expected}, got {sizes(coeffs.shape)}")
    if len(xs) != len(outs):
        raise ValueError(f"{op}: `xs` and `outs` must have the same length, got {len(xs)} and "
                         f"{len(outs)}")
    if bases is not None and len(bases) != len(outs):
        raise ValueError(f"{op}: `bases` must have one tensor per output ({len(outs)}), got "
                         f"{len(bases)}")
    if per_tensor and coeffs.shape[0] != len(xs):
        raise ValueError(f"{op}: with per_tensor=True `coeffs` needs one block per tensor "
                         f"({len(xs)}), got shape {sizes(coeffs.shape)}")
    if len(xs) == 0:
        return
    k = coeffs.shape[-1]
    lead = () if coeffs.dim() == 1 + lead_dims else (coeffs.shape[-2],)
    for p, (x, o) in enumerate(zip(xs, outs)):
        check_float_tensor(op, f"xs[{p}]", x, min_dim=1)
        check_float_tensor(op, f"outs[{p}]", o)
        if x.shape[0] != k:
            raise ValueError(f"{op}: xs[{p}] must have leading size k={k} (from `coeffs`), got "
                             f"shape {sizes(x.shape)}")
        if tuple(o.shape) != (*lead, *x.shape[1:]):
            raise ValueError(f"{op}: outs[{p}] must have shape {(*lead, *x.shape[1:])}, got "
                             f"{sizes(o.shape)}")
        if not o.is_contiguous():
            raise ValueError(f"{op}: outs[{p}] must be contiguous (it is written in place)")
    named = [(f"xs[{p}]", x) for p, x in enumerate(xs)] + [(f"outs[{p}]", o)
                                                           for p, o in enumerate(outs)]
    check_same_device(op, [("coeffs", coeffs)] + named)
    check_same_dtype(op, named)
    read_bases = None if bases is None or beta == 0.0 else bases  # beta = 0 ignores them
    if read_bases is not None:
        _check_bases(op, read_bases, outs, has_rows=bool(lead))
    if not (torch.compiler.is_compiling() or _has_no_values(xs[0])):
        _check_no_cross_overlap(op, coeffs, xs, outs, read_bases, has_rows=bool(lead))


def check_across_calls(op: str, coeffs: torch.Tensor, xs: list[torch.Tensor],
                       outs: list[torch.Tensor], bases: list[torch.Tensor] | None,
                       per_tensor: bool) -> tuple[list[int], list[int]]:
    """The overlap check of :func:`check_combine_list` over whole lists that several
    ``combine_list`` calls write (one per dtype or ``beta``): each call checks only its own
    tensors, so an output of one call under another call's input was accepted, and the later
    call read what the earlier one had written. ``coeffs`` is the whole lists' (``[k]``,
    ``[m, k]``, or per tensor ``[P, k]``, ``[P, m, k]``); ``bases[p]`` is what output ``p``
    reads as its base (``outs[p]`` itself where it reads none).

    Returns the inputs and bases (indices into ``xs``, ``bases``) whose trailing dims are not
    dense and whose bytes some output may share: one call reads such a tensor from a copy made
    before it writes (the check lets them through), so the caller must copy them before the
    first of several calls."""
    if torch.compiler.is_compiling() or not xs or _has_no_values(xs[0]):
        return [], []
    has_rows = coeffs.dim() == (3 if per_tensor else 2)
    _check_no_cross_overlap(op, coeffs, xs, outs, bases, has_rows)
    # Disjoint now (the check above): sorted by start, sorted by end too.
    spans = sorted(_byte_span(o) for o in outs if o.numel())
    starts, ends = [a for a, _ in spans], [b for _, b in spans]

    def under_an_output(t: torch.Tensor, row_dims: int) -> bool:
        if t.numel() == 0 or _rows_read(t, row_dims) is not None:
            return False  # empty, or dense rows: the overlap check has decided on it
        lo, hi = _byte_span(t)
        first = bisect.bisect_right(ends, lo)  # the first output that ends past lo
        return first < len(spans) and starts[first] < hi

    x_copies = [p for p, x in enumerate(xs) if under_an_output(x, 1)]
    base_copies = [] if bases is None else [
        p for p, b in enumerate(bases) if b is not outs[p] and under_an_output(
            b, 1 if has_rows else 0)]
    return x_copies, base_copies


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[lo, hi)`` from a tensor's first element to the end of its last (torch's
    strides are never negative)."""
    if t.numel() == 0:
        return 0, 0
    size = t.element_size()
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * size


def _check_bases(op: str, bases: list[torch.Tensor], outs: list[torch.Tensor],
                 has_rows: bool) -> None:
    for p, (b, o) in enumerate(zip(bases, outs)):
        check_float_tensor(op, f"bases[{p}]", b)
        check_same_device(op, [(f"outs[{p}]", o), (f"bases[{p}]", b)])
        check_same_dtype(op, [(f"outs[{p}]", o), (f"bases[{p}]", b)])
        if b.shape != o.shape:
            raise ValueError(f"{op}: bases[{p}] must have the shape of outs[{p}], "
                             f"{sizes(o.shape)}, got {sizes(b.shape)}")
        if torch.compiler.is_compiling():
            continue  # no data pointers while tracing: the compiled op checks the overlap
        # The base may be its output itself (each element reads its own base element first),
        # but not other bytes of it, under any storage; a base whose trailing dims are not dense
        # is read from a copy (combine.cpp's combine_list_impl decides the same).
        if _has_no_values(o) or _same_elements(b, o):
            continue
        lo = o.data_ptr()
        if _rows_meet(_rows_read(b, 1 if has_rows else 0), lo, lo + o.numel() * o.element_size()):
            raise ValueError(f"{op}: bases[{p}] overlaps outs[{p}] without being the same tensor")


def _same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape put every element at the same address."""
    return a.data_ptr() == b.data_ptr() and all(
        size <= 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))


# The memory the kernels touch, as rows (start, stride, rows, length) in bytes: the same
# decisions as combine.cpp's check_no_cross_overlap (see there), so that both paths refuse the
# same calls with the same message. An input or base whose trailing dims are not dense is read
# from a private copy (stack_rows): None.
_Rows = tuple[int, int, int, int]


def _rows_read(t: torch.Tensor, row_dims: int) -> _Rows | None:
    n, dense = 1, True
    for d in range(t.dim() - 1, row_dims - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != n:
            dense = False
        n *= t.shape[d]
    no_rows = row_dims == 0 or t.dim() == 0
    rows = 1 if no_rows else t.shape[0]
    if t.numel() == 0 or not dense:
        return None
    size = t.element_size()
    return t.data_ptr(), (n if no_rows else t.stride(0)) * size, rows, n * size


def _rows_meet(r: _Rows | None, lo: int, hi: int) -> bool:
    if r is None or hi <= lo:
        return False
    start, stride, rows, length = r
    a, b = lo - start, hi - start
    if stride == 0:
        return 0 < b and length > a
    return max(0, (a - length) // stride + 1) <= min(rows - 1, (b - 1) // stride)


def _check_no_cross_overlap(op: str, coeffs: torch.Tensor, xs: list[torch.Tensor],
                            outs: list[torch.Tensor], bases: list[torch.Tensor] | None,
                            has_rows: bool) -> None:
    """Refuse outputs that share memory with another tensor of the call: every output is
    written while every input and base is read (``bases[p]`` may be ``outs[p]`` itself)."""
    if has_rows and coeffs.shape[-2] == 0:
        return  # m = 0: nothing is written
    k = coeffs.shape[-1]
    out_rows = [_rows_read(o, 0) for o in outs]  # contiguous: one range each
    x_rows = [_rows_read(x, 1) if k else None for x in xs]
    base_rows = [] if bases is None else [_rows_read(b, 1 if has_rows else 0) for b in bases]
    spans = sorted((r[0], r[0] + r[3], p) for p, r in enumerate(out_rows) if r is not None)
    reads = [(r, -1) for r in x_rows if r is not None] + [
        (r, q) for q, r in enumerate(base_rows) if r is not None]
    if not _any_meeting(spans, reads):
        return
    # The error names the first output, by index, that shares memory: the smallest p whose
    # outputs 0..p meet anything (a test that only turns true as p grows), the outputs after
    # p taken as ranges read. A bisection: the pairs scanned in order took minutes at 16,000.
    lo, hi = 0, len(outs) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        after = [((a, 0, 1, b - a), -1) for a, b, p in spans if p > mid]
        if _any_meeting([span for span in spans if span[2] <= mid], reads + after):
            hi = mid
        else:
            lo = mid + 1
    # After lo, a safeguard only (outs[lo] meets something): the scan in order that named it.
    for p in [lo, *range(len(outs))]:
        o = out_rows[p]
        if o is None:
            continue
        start, stop = o[0], o[0] + o[3]
        for q in range(len(outs)):
            hit = (("outs" if q != p and _rows_meet(out_rows[q], start, stop) else None)
                   or ("xs" if _rows_meet(x_rows[q], start, stop) else None)
                   or ("bases" if q != p and base_rows and _rows_meet(base_rows[q], start, stop)
                       else None))
            if hit:
                raise ValueError(
                    f"{op}: outs[{p}] overlaps {hit}[{q}]; an output must not share memory with "
                    "any input, another output or another output's base (clone() one of them "
                    "first)")


def _any_meeting(spans: list[tuple[int, int, int]], reads: list[tuple[_Rows, int]]) -> bool:
    """Whether an output of ``spans`` (``(start, end, p)`` byte ranges, sorted) meets another,
    or a row of a read ``(rows, own)`` meets an output other than ``outs[own]``.

    O((P + R) log P) for P outputs and R reads of few rows: the outputs a read's extent
    covers are a run of them (once they are disjoint, sorted by start is sorted by end), each
    tested against its rows (``_rows_meet``), or, where the run is longer than the read has
    rows, each row looked up among the outputs instead: walking the run cost O(P) per read,
    O(P^2) in all when every input straddles every output (1.1 s at 16,000 in C++)."""
    starts = [start for start, _, _ in spans]
    ends = [end for _, end, _ in spans]
    if any(starts[i] < ends[i - 1] for i in range(1, len(spans))):
        return True
    for r, own in reads:
        start, stride, rows, length = r
        first = bisect.bisect_right(ends, start)
        last = bisect.bisect_left(starts, start + (rows - 1) * stride + length, first)
        if first == last:
            continue
        if rows == 1 or stride <= length:  # the rows make one range: all of the run meet it
            if last - first > 1 or spans[first][2] != own:
                return True
        elif last - first <= rows:
            if any(spans[j][2] != own and _rows_meet(r, starts[j], ends[j])
                   for j in range(first, last)):
                return True
        else:
            for row in range(start, start + rows * stride, stride):
                j = bisect.bisect_right(ends, row, first, last)  # the first output past row
                if j < last and starts[j] < row + length and spans[j][2] == own:
                    j += 1  # the one after it is the next candidate
                if j < last and starts[j] < row + length:
                    return True
    return False


def _reference_combine_list(coeffs: torch.Tensor, xs: list[torch.Tensor],
                            outs: list[torch.Tensor], beta: float, per_tensor: bool,
                            bases: list[torch.Tensor] | None = None) -> None:
    if len(xs) == 0:
        return
    # An output may be the coefficients themselves: read a private copy, as the kernels do.
    coeffs = coeffs.clone()
    k = coeffs.shape[-1]
    results = []
    for p, (x, o) in enumerate(zip(xs, outs)):
        block = coeffs[p] if per_tensor else coeffs
        c2 = block.reshape(-1, k)
        base = o if bases is None else bases[p]
        res = _reference.combine(c2, x.reshape(k, -1), base=base.reshape(c2.shape[0], -1),
                                 beta=beta)
        results.append(res.reshape(o.shape))
    # Written only once everything is read, as the kernels (which read an input or base that
    # is not dense from a copy made before any write): an accepted call gives the same result.
    for o, res in zip(outs, results):
        o.copy_(res)
