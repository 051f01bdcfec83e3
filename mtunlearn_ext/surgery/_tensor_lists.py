"""Plumbing for lists of per-parameter stacks: local shards, dtype classes, per-layer statistics.

Every function here works on a list whose element ``p`` is a stack ``[k, *shape_p]`` (``k``
vectors, cut along the parameters) and never concatenates the elements into one flat copy. The
ops accept a list only when all its tensors share one dtype, so a model with mixed parameter
dtypes (bf16 weights beside fp32 norms) is split into dtype classes: one ``gram_list`` /
``combine_list`` call per class, the small statistics summed.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeGuard

import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.ops.combine import check_across_calls, check_combine_list

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

#: A reduction of coefficient-space statistics across processes (identity when single-process):
#: Gram matrices and inner products are sums over parameter coordinates, so shards reduce by SUM.
StatsReduce = Callable[[torch.Tensor], torch.Tensor]

_DTensor: type[DTensor] | None
try:  # DTensor (FSDP2 parameters and gradients) exists only where torch.distributed is built.
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` held by this process: ``t.to_local()`` for a DTensor (an FSDP2 shard,
    sharing storage, so writing into it writes the DTensor), else ``t`` itself."""
    if _DTensor is not None and isinstance(t, _DTensor):
        return t.to_local()
    return t


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (a parameter or gradient sharded by FSDP2 / tensor parallel)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def new_grad_like(param: torch.Tensor, *, like_autograd: bool = False) -> torch.Tensor:
    """An uninitialised gradient for ``param`` of its (local) shape and dtype, wrapped as a
    DTensor with the parameter's mesh and placements when the parameter is one (an FSDP2
    shard's ``.grad`` must be a DTensor like the parameter). Contiguous, or with
    ``like_autograd`` laid out as autograd's ``AccumulateGrad`` lays out a new gradient: with
    the parameter's strides where it is dense (channels_last, a transposed weight), else
    contiguous."""
    source = local_tensor(param)
    local = None
    if like_autograd and not source.is_contiguous():
        local = torch.empty_like(source)  # a dense tensor's own strides
        if local.stride() != source.stride():  # not dense: autograd's gradient is contiguous
            local = None
    if local is None:
        local = torch.empty(source.shape, dtype=param.dtype, device=source.device)
    if is_dtensor(param):
        assert _DTensor is not None
        return _DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())
    return local


def stats_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """Dtype of Gram / inner-product results for a list: float64 if any input is float64, else
    float32 (half precision is always accumulated and returned in float32 by the ops)."""
    return torch.float64 if torch.float64 in {t.dtype for t in tensors} else torch.float32


def integer_layer_ids(op: str, per_layer: object) -> list[int]:
    """A ``per_layer`` sequence of layer ids (a list, tuple, range, NumPy array or integer
    tensor) as Python ints; anything else is refused naming ``op`` (``int()`` of each took 0.9
    as layer 0, True as 1, and the string "0011" as four ids)."""
    if isinstance(per_layer, (str, bytes)) or not isinstance(per_layer, Iterable):
        raise TypeError(f"{op}: `per_layer` must be a bool or a sequence of layer ids (one per "
                        f"tensor), got {type(per_layer).__name__}")
    given = list(per_layer)
    try:
        if any(isinstance(i, bool) or getattr(i, "dtype", None) == torch.bool for i in given):
            raise TypeError  # a bool tensor's elements pass operator.index as 0 and 1
        return [operator.index(i) for i in given]
    except TypeError:
        raise TypeError(f"{op}: `per_layer` ids must be integers, got {given!r:.80}") from None


def layer_index(per_layer: bool | Sequence[int], count: int, op: str,
                num_layers: int | None = None) -> tuple[list[int] | None, int]:
    """Decode a ``per_layer`` argument into (layer id of each tensor, number of layers).

    ``False``: one global problem (``None, 1``); ``True``: one layer per tensor; a sequence: the
    layer id of each tensor, e.g. ``[0, 0, 1, 1]`` for two layers of weight + bias. Without
    ``num_layers`` the ids must cover ``0..L-1``; with it (needed when the list is one rank's
    shards, which may miss whole layers, while every rank must reduce ``[L, k, k]`` of one
    shape) any ids below ``num_layers`` are allowed.
    """
    if per_layer is False:
        return None, 1
    ids = list(range(count)) if per_layer is True else integer_layer_ids(op, per_layer)
    if len(ids) != count:
        raise ValueError(f"{op}: `per_layer` must give one layer id per tensor ({count}), got "
                         f"{len(ids)}")
    if num_layers is None:
        num_layers = max(ids) + 1 if ids else 0
        if ids and (min(ids) < 0 or sorted(set(ids)) != list(range(num_layers))):
            raise ValueError(f"{op}: `per_layer` ids must cover 0..L-1 with no gap, got "
                             f"{sorted(set(ids))} (pass `num_layers` for a partial list)")
    elif ids and (min(ids) < 0 or max(ids) >= num_layers):
        raise ValueError(f"{op}: `per_layer` ids must lie in 0..{num_layers - 1}, got "
                         f"{sorted(set(ids))}")
    return ids, num_layers


def dtype_classes(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype, in first-seen order (one op call per group)."""
    dtypes = [t.dtype for t in tensors]
    if dtypes.count(dtypes[0]) == len(dtypes):  # the usual case, without a dict over the list
        return [list(range(len(dtypes)))]
    groups: dict[torch.dtype, list[int]] = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    return list(groups.values())


def check_stacks(op: str, name: str, stacks: Sequence[torch.Tensor], k: int | None = None) -> int:
    """Check a list of stacks ``[k, *shape_p]`` with one ``k``; return ``k``."""
    if len(stacks) == 0:
        raise ValueError(f"{op}: `{name}` must hold at least one tensor, got an empty list")
    # One pass of builtins over the list when all is well (parameter lists hold hundreds of
    # tensors); the loop below runs only to name what is wrong.
    if all(isinstance(s, torch.Tensor) and s.dim() >= 1 for s in stacks):
        leading = [s.shape[0] for s in stacks]
        expected = leading[0] if k is None else k
        if leading.count(expected) == len(leading):
            return expected
    for p, s in enumerate(stacks):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{op}: `{name}[{p}]` must be a torch.Tensor, got {type(s).__name__}")
        if s.dim() < 1:
            raise ValueError(f"{op}: `{name}[{p}]` must be a stack [k, *shape], got a 0-d tensor")
        if k is None:
            k = s.shape[0]
        if s.shape[0] != k:
            first = stacks[0]
            source = (f" (that of `{name}[0]`, shape {sizes(first.shape)})"
                      if p > 0 and first.dim() >= 1 and first.shape[0] == k else "")
            hint = ("; a single vector per parameter still needs its leading stack dimension "
                    "(`t.unsqueeze(0)`)" if stacks[0].dim() == 1 or s.dim() == 1 else "")
            raise ValueError(f"{op}: every `{name}[p]` must be a stack [k, *shape_p] with leading "
                             f"size k={k}{source}; `{name}[{p}]` has shape {sizes(s.shape)}{hint}")
    assert k is not None
    return k


def check_same_length(op: str, a_name: str, a: Sequence[object], b_name: str,
                      b: Sequence[object]) -> None:
    """Two lists that cut the same parameters. Checked up front even where the per-tensor checks
    wait for a failure: the list plumbing indexes one list by the other's positions."""
    if len(a) != len(b):
        raise ValueError(f"{op}: `{a_name}` and `{b_name}` must have the same length, got "
                         f"{len(a)} and {len(b)}")


def check_paired(op: str, a_name: str, a: Sequence[torch.Tensor], b_name: str,
                 b: Sequence[torch.Tensor]) -> None:
    """``a[p]`` and ``b[p]`` cut the same parameter: same trailing shape and dtype."""
    check_same_length(op, a_name, a, b_name, b)
    if all(x.shape[1:] == y.shape[1:] and x.dtype == y.dtype for x, y in zip(a, b)):
        return
    for p, (x, y) in enumerate(zip(a, b)):
        if x.shape[1:] != y.shape[1:]:
            raise ValueError(f"{op}: `{a_name}[{p}]` {sizes(x.shape)} and `{b_name}[{p}]` "
                             f"{sizes(y.shape)} must share the parameter shape after dim 0")
        if x.dtype != y.dtype:
            raise TypeError(f"{op}: `{a_name}[{p}]` is {x.dtype} but `{b_name}[{p}]` is {y.dtype}; "
                            "they must match")


#: Who called a statistics helper, for its errors: the caller's name and its list arguments in
#: the order the helper takes them (``("mtunlearn_ext.surgery.aggregate_list",
#: ("grads_list",))``).
Caller = tuple[str, Sequence[str]]


def _summed_by_class(op: Callable[..., torch.Tensor], op_lists: Sequence[str],
                     lists: Sequence[Sequence[torch.Tensor]], size: tuple[int, ...],
                     layers: list[int] | None, num_layers: int, *, check_finite: bool,
                     caller: Caller | None) -> torch.Tensor:
    """``op`` (a list op of ``mtunlearn_ext.ops`` taking one list per entry of ``lists``, named
    ``op_lists`` there, whose output is ``size``) summed over the parameters, or per layer
    (``[L, *size]``): one call per dtype class of ``lists[0]``, accumulated in
    :func:`stats_dtype`. Its errors name the caller and the caller's lists (:data:`Caller`)."""
    try:
        return _summed_by_class_unnamed(op, lists, size, layers, num_layers,
                                        check_finite=check_finite)
    except (FloatingPointError, TypeError, ValueError) as error:
        if caller is None:
            raise
        raise in_callers_words(error, op_lists, caller) from error


def _summed_by_class_unnamed(op: Callable[..., torch.Tensor],
                             lists: Sequence[Sequence[torch.Tensor]], size: tuple[int, ...],
                             layers: list[int] | None, num_layers: int, *,
                             check_finite: bool) -> torch.Tensor:
    first = lists[0]
    classes = dtype_classes(first)
    if len(classes) == 1:
        # One dtype, the usual case: one call on the lists as given (the op refuses a second
        # dtype in any of them, so its result is already in the accumulation dtype).
        if layers is None:
            return op(*lists, check_finite=check_finite)
        per_tensor = op(*lists, per_tensor=True, check_finite=check_finite)
        if num_layers == len(first) and layers == list(range(num_layers)):
            return per_tensor
        total = per_tensor.new_zeros((num_layers, *size))
        ids = torch.tensor(layers, device=per_tensor.device)
        return total.index_add_(0, ids, per_tensor)
    out_dtype = stats_dtype([t for tensors in lists for t in tensors])
    device = first[0].device
    total = torch.zeros(size if layers is None else (num_layers, *size), dtype=out_dtype,
                        device=device)
    for cls in classes:
        members = [[tensors[i] for i in cls] for tensors in lists]
        try:
            if layers is None:
                total += op(*members, check_finite=check_finite).to(out_dtype)
            else:
                per_tensor = op(*members, per_tensor=True, check_finite=check_finite)
                ids = torch.tensor([layers[i] for i in cls], device=device)
                total.index_add_(0, ids, per_tensor.to(out_dtype))
        except (FloatingPointError, TypeError, ValueError) as error:
            raise _in_whole_list(error, cls) from error
    return total


def _in_whole_list(error: Exception, members: Sequence[int]) -> Exception:
    """``error`` of a call on one group of a list (one dtype class), with each tensor it names
    (``xs[1]``) renamed by its place in the whole list."""
    def whole(match: re.Match[str]) -> str:
        place = int(match.group(2))
        return (f"{match.group(1)}[{members[place]}]" if place < len(members)
                else match.group(0))

    return _reworded(error, re.sub(r"\b([A-Za-z_]\w*)\[(\d+)\]", whole, str(error)))


def in_callers_words(error: Exception, op_lists: Sequence[str], caller: Caller) -> Exception:
    """``error`` of an op of :mod:`mtunlearn_ext.ops` as the caller would say it: its name for
    the op's (``mtunlearn_ext.ops.gram_list: `xs[2]` ...`` from ``aggregate_list`` becomes
    ``mtunlearn_ext.surgery.aggregate_list: `grads_list[2]` ...``)."""
    name, caller_lists = caller
    message = re.sub(r"^mtunlearn_ext\.ops\.\w+:", f"{name}:", str(error))
    for op_list, caller_list in zip(op_lists, caller_lists):
        message = re.sub(rf"(?<![\w.]){re.escape(op_list)}\[", f"{caller_list}[", message)
    return _reworded(error, message)


def _reworded(error: Exception, message: str) -> Exception:
    try:
        return type(error)(message)
    except Exception:  # an exception type built otherwise: keep it as it is
        return error


def gram_stats(xs: Sequence[torch.Tensor], layers: list[int] | None, num_layers: int, *,
               check_finite: bool, caller: Caller | None = None) -> torch.Tensor:
    """``G[i, j] = sum_p <xs[p][i], xs[p][j]>`` (``[k, k]``), or per layer (``[L, k, k]``)."""
    k = xs[0].shape[0]
    return _summed_by_class(ops.gram_list, ("xs",), [xs], (k, k), layers, num_layers,
                            check_finite=check_finite, caller=caller)


def inner_stats(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], layers: list[int] | None,
                num_layers: int, *, check_finite: bool, caller: Caller | None = None
                ) -> torch.Tensor:
    """``C[i, j] = sum_p <a[p][i], b[p][j]>`` (``[m, k]``), or per layer (``[L, m, k]``): one
    ``ops.inner_list`` pass per dtype class, no concatenation."""
    m, k = a[0].shape[0], b[0].shape[0]
    return _summed_by_class(ops.inner_list, ("as_", "bs"), [a, b], (m, k), layers, num_layers,
                            check_finite=check_finite, caller=caller)


def stacked_stats(g: Sequence[torch.Tensor], r: Sequence[torch.Tensor],
                  layers: list[int] | None, num_layers: int, *,
                  check_finite: bool, caller: Caller | None = None) -> torch.Tensor:
    """The Gram matrix of the ``m`` vectors ``g`` stacked above the ``k`` vectors ``r``
    (``[m + k, m + k]``, or ``[L, m + k, m + k]`` per layer): ``r``'s Gram and the cross products
    with ``g`` from one ``ops.gram_list_stacked`` pass per dtype class, reading ``r`` once."""
    s = g[0].shape[0] + r[0].shape[0]
    return _summed_by_class(ops.gram_list_stacked, ("xs", "ys"), [g, r], (s, s), layers,
                            num_layers, check_finite=check_finite, caller=caller)


def call_reduce(op: str, reduce: StatsReduce, stats: torch.Tensor) -> torch.Tensor:
    """``reduce(stats)``, refused unless it is a tensor of ``stats``' shape: an in-place
    collective such as ``dist.all_reduce`` returns ``None``, and its result was then read as
    the sum (an ``AttributeError`` on ``None`` naming no argument)."""
    total = reduce(stats)
    if not isinstance(total, torch.Tensor) or total.shape != stats.shape:
        got = (f"a tensor of shape {list(sizes(total.shape))}" if isinstance(total, torch.Tensor)
               else type(total).__name__)
        raise TypeError(f"{op}: `reduce` must return the summed statistics, a tensor of shape "
                        f"{list(sizes(stats.shape))} like its argument, got {got} (for "
                        f"torch.distributed: `lambda t: (dist.all_reduce(t), t)[1]`)")
    return total


def reduced_stats(op: str, stats: torch.Tensor, reduce: StatsReduce,
                  named: Sequence[tuple[str, Sequence[torch.Tensor]]], *,
                  check_finite: bool) -> torch.Tensor:
    """``reduce(stats)`` (the statistics summed over the processes), checked for NaN/Inf after
    the collective when ``check_finite`` (:func:`check_reduced`); the local statistics must
    have been computed without the check."""
    total = call_reduce(op, reduce, stats)
    if check_finite:
        check_reduced(op, total, named)
    return total


def check_reduced(op: str, total: torch.Tensor,
                  named: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> None:
    """Raise if the statistics summed over the processes hold NaN/Inf. A NaN or Inf in one
    process's shards reaches every process's sum, so every process raises alike: checked
    before the collective, the process holding it raised alone and left the others waiting in
    the all-reduce. ``named``: the caller's lists, scanned only once the check has failed, to
    say whether this process's shards hold the culprit."""
    if math.isfinite(total.sum().item()) or bool(torch.isfinite(total).all()):
        return
    for name, tensors in named:
        for p, t in enumerate(tensors):
            if not bool(torch.isfinite(t).all()):
                raise FloatingPointError(
                    f"{op}: `{name}[{p}]` contains NaN or Inf on this process (rank-local "
                    "shards; every process raises this step); pass finite values (or "
                    "check_finite=False to let them propagate)")
    raise FloatingPointError(
        f"{op}: the statistics summed over the processes hold NaN or Inf, and this process's "
        "shards are finite: another process's shards contain NaN or Inf, or the sum "
        "overflowed (every process raises this step; check_finite=False lets them propagate)")


def _blocks_of(coeffs: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """``coeffs[ids]``, or ``coeffs`` itself when ``ids`` are ``0..L-1`` (``per_layer=True``,
    a layer per tensor: gathering them all in order cost a host-built index and a copy, 48 us
    of a 450 us projection of 200 small tensors; performance review)."""
    if len(ids) == coeffs.shape[0] and ids == list(range(len(ids))):
        return coeffs
    return coeffs.index_select(0, torch.tensor(ids, device=coeffs.device))


def combine_into(coeffs: torch.Tensor, xs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor],
                 betas: Sequence[float], layers: list[int] | None, *,
                 bases: Sequence[torch.Tensor] | None = None, check_finite: bool,
                 caller: Caller | None = None) -> None:
    """``outs[p] = betas[p] * bases[p] + coeffs_(layer of p) @ xs[p]`` in place (``bases``
    defaults to ``outs``); errors in the caller's words with ``caller``'s names for ``xs``,
    ``outs`` and ``bases``.

    ``coeffs`` is ``[k]`` or ``[m, k]`` (one problem), or ``[L, k]`` / ``[L, m, k]`` per layer.
    Tensors are grouped by (dtype, beta), each group one ``combine_list`` call (per layer, the
    coefficient blocks are gathered per tensor): usually a single call for the whole list.
    """
    dtypes = [x.dtype for x in xs]
    if dtypes.count(dtypes[0]) == len(dtypes) and betas.count(betas[0]) == len(betas):
        groups = {(dtypes[0], float(betas[0])): list(range(len(xs)))}  # the usual case: one call
    else:
        groups = {}
        for p, key in enumerate(zip(dtypes, map(float, betas))):
            groups.setdefault(key, []).append(p)
    calls = []
    for (_, beta), members in groups.items():
        if len(members) == len(xs):
            member_xs, member_outs, member_bases = xs, outs, bases
        else:
            member_xs, member_outs = [xs[p] for p in members], [outs[p] for p in members]
            member_bases = None if bases is None else [bases[p] for p in members]
        block = coeffs if layers is None else _blocks_of(coeffs, [layers[p] for p in members])
        calls.append((block, list(member_xs), list(member_outs),
                      None if member_bases is None else list(member_bases), beta, members))
    op_lists = ("xs", "outs", "bases")

    def named(error: Exception, members: Sequence[int]) -> Exception:
        error = _in_whole_list(error, members) if len(calls) > 1 else error
        return error if caller is None else in_callers_words(error, op_lists, caller)

    if len(calls) > 1:
        # Several calls: a wrong tensor in a later one would be refused after the earlier ones
        # had written, so every call's arguments are checked first (named in the whole list).
        for block, member_xs, member_outs, member_bases, beta, members in calls:
            try:
                check_combine_list("mtunlearn_ext.ops.combine_list", block, member_xs,
                                   member_outs, layers is not None, member_bases, beta)
            except (TypeError, ValueError) as error:
                raise named(error, members) from error
        read = [o if beta == 0.0 or bases is None else b
                for o, b, beta in zip(outs, bases or outs, map(float, betas))]
        try:
            x_copies, base_copies = check_across_calls(
                "mtunlearn_ext.ops.combine_list", coeffs, list(xs), list(outs), read,
                layers is not None)
        except ValueError as error:
            raise named(error, range(len(xs))) from error
        if x_copies or base_copies:
            # What one call would read from its own copies, copied before any call writes.
            copied_xs, copied_bases = list(xs), None if bases is None else list(bases)
            for p in x_copies:
                copied_xs[p] = xs[p].contiguous()
            for p in base_copies:
                assert copied_bases is not None  # only bases that are read are copied
                copied_bases[p] = copied_bases[p].contiguous()
            calls = [(block, [copied_xs[p] for p in members], member_outs,
                      None if copied_bases is None else [copied_bases[p] for p in members],
                      beta, members)
                     for block, _, member_outs, _, beta, members in calls]
    for block, member_xs, member_outs, member_bases, beta, members in calls:
        try:
            ops.combine_list(block, member_xs, member_outs, beta=beta,
                             per_tensor=layers is not None, bases=member_bases,
                             check_finite=check_finite)
        except (FloatingPointError, TypeError, ValueError) as error:
            raise named(error, members) from error


def guard_nonfinite(stats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a non-finite statistics block by a harmless one, without a host sync.

    Used when ``check_finite=False`` (e.g. under a GradScaler, whose overflowing fp16 steps must
    reach ``.grad`` as Inf/NaN so that the scaler skips them). Solving on NaN would make the
    iterative dual solvers run their full iteration budget; instead each problem whose block
    holds NaN/Inf is solved on the identity Gram (zeros elsewhere) and its coefficients are then
    poisoned with NaN by :func:`poison_nonfinite`. Returns (safe stats, finite flag per problem).
    """
    batch = stats.shape[:-2]
    finite = torch.isfinite(stats).flatten(start_dim=len(batch)).all(-1)
    safe = torch.zeros_like(stats)
    eye = torch.eye(k, dtype=stats.dtype, device=stats.device)
    safe[..., :k, :k] = eye
    safe = torch.where(finite[..., None, None], stats, safe)
    return safe, finite


def poison_nonfinite(coeffs: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """NaN coefficients for every problem whose statistics were not finite."""
    extra = coeffs.dim() - finite.dim()
    mask = finite.reshape(*finite.shape, *([1] * extra))
    return torch.where(mask, coeffs, torch.full_like(coeffs, float("nan")))


# ----------------------------------------------------------------- float32 underflow rescue

#: Smallest diagonal entry (a squared gradient norm) of a float32-accumulated Gram matrix taken
#: as computed. The kernels multiply in float32 (float64 only sums the tiles), and a product
#: below 2**-126 is subnormal or flushed: each of the ``n`` coordinates may lose up to 2**-126
#: of it, products and partial sums together at most ``n * 2**-125``. Above this floor that is
#: under float32's own rounding (2**-24 of the entry) for any ``n <= 2**41``. Below it, a task
#: gradient of norm 3e-23 had a zero diagonal entry and UPGrad's update conflicted with it
#: (cosine -0.96). Training gradients sit far above it (norm >= 1e-9).
UNDERFLOW_FLOOR = 2.0 ** -60

#: Checks a (reduced) Gram matrix for NaN/Inf, raising the caller's error.
GramCheck = Callable[[torch.Tensor], None]


def solvable_gram(local: torch.Tensor, xs: Sequence[torch.Tensor], layers: list[int] | None,
                  num_layers: int, reduce: StatsReduce | None, *, check_finite: bool,
                  check: GramCheck, op: str) -> tuple[torch.Tensor, torch.dtype]:
    """The Gram matrix a weighting solves on, and the dtype its weights are used in.

    ``local`` is ``G`` of the stacks ``xs`` (``[k, k]``, or ``[L, k, k]`` per layer), computed
    without the NaN/Inf check; it is summed over the processes by ``reduce`` and, with
    ``check_finite``, checked by ``check``. A float32 ``G`` whose smallest diagonal entry is
    below :data:`UNDERFLOW_FLOOR` has lost the rows of tiny gradients to float32 underflow
    inside the kernels, which no float64 output could give back: those rows are recomputed
    from copies scaled by powers of two (:func:`_rescaled_rows`) and the result is a float64
    ``G`` (the weights go back to float32, the dtype they always have here).

    Telling needs the matrix on the host: the NaN/Inf check's own read, on the CPU also
    without it. On CUDA without the check (no host read allowed), inside ``torch.compile``
    and under ``torch.func`` transforms the float32 ``G`` is used as it is, as before.
    """
    gram = local if reduce is None else call_reduce(op, reduce, local)
    if not _readable(gram, check_finite):
        if check_finite:
            check(gram)
        return gram, gram.dtype
    total, smallest = _sum_and_smallest_diagonal(gram)
    if not math.isfinite(total):
        if check_finite:
            check(gram)  # raises, unless only the sum of finite entries overflowed
        return gram, gram.dtype
    if not smallest < UNDERFLOW_FLOOR:
        return gram, gram.dtype
    return _rescued_gram(gram, xs, layers, num_layers, reduce, op), gram.dtype


def rescued_local_gram(gram: torch.Tensor, stacks: Callable[[], Sequence[torch.Tensor]],
                       layers: list[int] | None, num_layers: int, *, check_finite: bool,
                       op: str) -> torch.Tensor:
    """:func:`solvable_gram`'s rescue for a Gram matrix of one process (no reduction) whose
    NaN/Inf check, if any, has already run: ``gram`` as it is, or as float64 with the rows
    that float32 underflow lost recomputed. ``stacks()`` gives the per-parameter stacks whose
    Gram ``gram`` is; it is called only when a row needs recomputing (the list projections
    join their two lists there, a copy no normal-range call makes)."""
    if not _readable(gram, check_finite):
        return gram
    total, smallest = _sum_and_smallest_diagonal(gram)
    if not (math.isfinite(total) and smallest < UNDERFLOW_FLOOR):
        return gram
    return _rescued_gram(gram, stacks(), layers, num_layers, None, op)


def _readable(gram: torch.Tensor, check_finite: bool) -> bool:
    """Whether :func:`solvable_gram` may read ``gram`` on the host to look for underflow: a
    float32 Gram (float64 ones have 2**-1022 to spare) of plain values, on the CPU or where
    the NaN/Inf check reads it anyway, outside ``torch.compile`` (a graph break). A FakeTensor
    is a subclass, a torch.func wrapper is not plain either."""
    return (gram.dtype == torch.float32 and type(gram) is torch.Tensor
            and (check_finite or gram.device.type == "cpu") and gram.device.type != "meta"
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(gram)
            and gram.numel() > 0)


def _sum_and_smallest_diagonal(gram: torch.Tensor) -> tuple[float, float]:
    """The sum of ``gram``'s entries (finite iff they are, unless it overflows: what the
    NaN/Inf check reads) and its smallest diagonal entry, in one host read. A single ``k x k``
    matrix of a few tasks is read whole: cheaper than the reductions, on the CPU as on CUDA."""
    k = gram.shape[-1]
    if gram.dim() == 2 and k <= 16:
        values = gram.tolist()
        return sum(map(sum, values)), min(values[i][i] for i in range(k))
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    if gram.device.type == "cpu":  # two reads cost less than stacking the two results
        return gram.sum().item(), diagonal.amin().item()
    total, smallest = torch.stack((gram.sum(), diagonal.amin())).tolist()
    return total, smallest


def _rescued_gram(gram: torch.Tensor, xs: Sequence[torch.Tensor], layers: list[int] | None,
                  num_layers: int, reduce: StatsReduce | None, op: str) -> torch.Tensor:
    """``gram`` (float32), or as float64 with its suspect rows (diagonal entry below the floor,
    per problem) recomputed from power-of-two rescaled copies of those rows.

    A suspect row whose whole row of ``gram`` is zero, in a problem that has a row above the
    floor, is taken for what it nearly always is, a task without a gradient (no labels in the
    batch, a constant loss), at no cost: a tiny gradient on the coordinates the other tasks
    use has float32 products with them, so its row is not zero; one on coordinates none of
    them uses is orthogonal to them, and every weighting here treats such a task alike whether
    its diagonal entry is tiny or zero (to a relative ``|g_i|**2 / |g_j|**2``). Only a gradient
    whose products with the others' values all stay below 2**-150, where they round to zero
    (1e-23 beside 1e-22 on the same coordinates), falls between the two. The other suspect
    rows of each tensor are scaled by
    ``2**-e``, ``2**e`` bounding their largest magnitude (exact: a power of two only moves the
    exponent), so that their products are normal numbers, and the scale is divided out in
    float64 (:func:`_rescaled_rows`); rows found all zero then need nothing, and when all of
    them are, ``gram`` is exact and comes back as it is. Under ``reduce`` all of this is read
    off the summed ``gram``, the same on every process, and every process takes part in one
    more reduction, of its float64 share of the recomputed rows (zeros where it holds none)."""
    k = gram.shape[-1]
    if gram.dim() == 2 and k <= 16 and _only_tasks_without_gradient(gram.tolist()):
        return gram  # the usual way here, tested on the host without a dispatch
    problems = gram.reshape(-1, k, k)
    suspect = torch.diagonal(problems, dim1=-2, dim2=-1) < UNDERFLOW_FLOOR
    without_gradient = (problems == 0).all(-1) & (~suspect).any(-1, keepdim=True)
    suspect &= ~without_gradient
    rows = suspect.any(0).nonzero().flatten().tolist()
    if not rows:
        return gram
    in_suspect_layer = suspect.any(1).tolist()
    # (A layer may have no tensor here: one that no loss reached, or none of this process's.)
    members = [p for p in range(len(xs)) if in_suspect_layer[0 if layers is None else layers[p]]]
    chosen: list[int] = []
    if members:
        peaks = _row_peaks([xs[p][i] for p in members for i in rows]).reshape(len(members), -1)
        chosen = [j for j, nonzero in enumerate((peaks > 0).any(1).tolist()) if nonzero]
    if chosen:
        fresh = _rescaled_rows([members[j] for j in chosen], peaks[chosen], rows, xs, layers,
                               num_layers)
    elif reduce is None:
        return gram  # the suspect rows are zero here: their float32 entries are exact zeros
    else:  # zero here, maybe not on the other processes: this one adds zeros
        fresh = torch.zeros((suspect.shape[0], len(rows), k), dtype=torch.float64,
                            device=gram.device)
    if reduce is not None:
        fresh = call_reduce(op, reduce, fresh)
    rescued = gram.to(torch.float64)
    flat = rescued.view(-1, k, k)
    for a, i in enumerate(rows):
        flat[suspect[:, i], i, :] = fresh[suspect[:, i], a, :]
        flat[suspect[:, i], :, i] = fresh[suspect[:, i], a, :]
    return rescued


def _only_tasks_without_gradient(values: list[list[float]]) -> bool:
    """For one small Gram matrix (as lists): whether every row below the floor is all zero
    while some row is above it (the test of :func:`_rescued_gram`)."""
    suspect = [row for i, row in enumerate(values) if row[i] < UNDERFLOW_FLOOR]
    return len(suspect) < len(values) and not any(map(any, suspect))


def _row_peaks(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``max |row|`` of each row, in float64 (``[len(rows)]``; 0 for an empty one). From
    ``aminmax``: torch's ``ord=inf`` norms took ~10x a pass over the data on the CPU."""
    device = rows[0].device
    extremes = [torch.aminmax(r.reshape(-1)) for r in rows if r.numel() > 0]
    peaks = torch.zeros(len(rows), dtype=torch.float64, device=device)
    if extremes:
        low = torch.stack([e.min for e in extremes]).to(torch.float64)
        high = torch.stack([e.max for e in extremes]).to(torch.float64)
        filled = torch.tensor([r.numel() > 0 for r in rows], device=device)
        peaks[filled] = torch.maximum(high, -low)
    return peaks


def _rescaled_rows(members: list[int], peaks: torch.Tensor, rows: list[int],
                   xs: Sequence[torch.Tensor], layers: list[int] | None,
                   num_layers: int) -> torch.Tensor:
    """``F[l, a, j] = sum_(p in layer l) <xs[p][rows[a]], xs[p][j]>`` in float64
    (``[L, len(rows), k]``, ``L = 1`` for one problem) over the ``members``, whose largest
    magnitudes in ``rows`` are ``peaks`` (``[len(members), len(rows)]``).

    ``gram_list_stacked`` passes read each member once beside scaled copies of its ``rows``
    (``2**-e`` with ``e`` the exponent of the row's peak, capped so that the scale stays
    finite in the tensor's dtype): the products of a scaled row with an unscaled one give
    ``F`` where ``j`` is not one of ``rows``, those of two scaled rows where it is. The copies
    are written into one reused buffer, a chunk of members at a time: a fresh copy of each
    member cost more in page faults on the CPU than its arithmetic (100 tensors of 40k floats,
    k = 3: a step of 25 ms, 15.7 ms with the buffer, 6 ms without a tiny row)."""
    k, m = xs[0].shape[0], len(rows)
    device = peaks.device
    index = torch.tensor(rows, device=device)
    exponent = torch.frexp(peaks).exponent  # peak = f * 2**e, 0.5 <= f < 1 (0 for a zero row)
    total = torch.zeros((1 if layers is None else num_layers, m, k), dtype=torch.float64,
                        device=device)
    for cls in dtype_classes([xs[p] for p in members]):
        dtype = xs[members[cls[0]]].dtype
        largest = math.frexp(torch.finfo(dtype).max)[1]  # 128 for float32 and bfloat16
        scales = torch.ldexp(torch.ones_like(peaks[cls]),
                             (-exponent[cls]).clamp_max(largest - 2))  # [len(cls), m], float64
        blocks = _scaled_row_blocks([xs[members[c]] for c in cls], rows,
                                    scales.to(dtype).tolist())
        cross = blocks[:, :m, m:] / scales[:, :, None]  # <s_a x_a, x_j> / s_a
        cross[:, :, index] = blocks[:, :m, :m] / (scales[:, :, None] * scales[:, None, :])
        ids = torch.tensor([0 if layers is None else layers[members[c]] for c in cls],
                           device=device)
        total.index_add_(0, ids, cross)
    return total


#: Elements of scaled row copies alive at once in :func:`_scaled_row_blocks` (4 MiB of float32).
_COPY_CHUNK = 1 << 20


def _scaled_row_blocks(stacks: list[torch.Tensor], rows: list[int],
                       scales: list[list[float]]) -> torch.Tensor:
    """``gram_list_stacked(copies, stacks, per_tensor=True)`` in float64, ``copies[p]`` the
    ``rows`` of ``stacks[p]`` times ``scales[p]`` (powers of two, exact), all of one dtype."""
    m = len(rows)
    sizes = [m * s[0].numel() for s in stacks]
    buffer = torch.empty(max(_COPY_CHUNK, *sizes), dtype=stacks[0].dtype, device=stacks[0].device)
    blocks = []
    start = 0
    while start < len(stacks):
        stop, used, copies = start, 0, []
        while stop < len(stacks) and (stop == start or used + sizes[stop] <= buffer.numel()):
            copy = buffer[used:used + sizes[stop]].view(m, *stacks[stop].shape[1:])
            for a, i in enumerate(rows):
                torch.mul(stacks[stop][i], scales[stop][a], out=copy[a])
            copies.append(copy)
            used += sizes[stop]
            stop += 1
        blocks.append(ops.gram_list_stacked(copies, stacks[start:stop], per_tensor=True,
                                            check_finite=False).to(torch.float64))
        start = stop
    return torch.cat(blocks)
