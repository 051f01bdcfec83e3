"""Plumbing for lists of per-parameter stacks: local shards, dtype classes, per-layer statistics.

Every function here works on a list whose element ``p`` is a stack ``[k, *shape_p]`` (``k``
vectors, cut along the parameters) and never concatenates the elements into one flat copy. The
ops accept a list only when all its tensors share one dtype, so a model with mixed parameter
dtypes (bf16 weights beside fp32 norms) is split into dtype classes: one ``gram_list`` /
``combine_list`` call per class, the small statistics summed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeGuard

import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops.combine import check_combine_list

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
    if per_layer is True:
        ids = list(range(count))
    else:
        ids = [int(i) for i in per_layer]
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
            source = (f" (that of `{name}[0]`, shape {tuple(first.shape)})"
                      if p > 0 and first.dim() >= 1 and first.shape[0] == k else "")
            hint = ("; a single vector per parameter still needs its leading stack dimension "
                    "(`t.unsqueeze(0)`)" if stacks[0].dim() == 1 or s.dim() == 1 else "")
            raise ValueError(f"{op}: every `{name}[p]` must be a stack [k, *shape_p] with leading "
                             f"size k={k}{source}; `{name}[{p}]` has shape {tuple(s.shape)}{hint}")
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
            raise ValueError(f"{op}: `{a_name}[{p}]` {tuple(x.shape)} and `{b_name}[{p}]` "
                             f"{tuple(y.shape)} must share the parameter shape after dim 0")
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
        raise _in_callers_words(error, op_lists, caller) from error


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


def _in_callers_words(error: Exception, op_lists: Sequence[str], caller: Caller) -> Exception:
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


def reduced_stats(op: str, stats: torch.Tensor, reduce: StatsReduce,
                  named: Sequence[tuple[str, Sequence[torch.Tensor]]], *,
                  check_finite: bool) -> torch.Tensor:
    """``reduce(stats)`` (the statistics summed over the processes), checked for NaN/Inf after
    the collective when ``check_finite``; the local statistics must have been computed without
    the check. A NaN or Inf in one process's shards reaches every process's sum, so every
    process raises alike: checked before the collective, the process holding it raised alone
    and left the others waiting in the all-reduce. ``named``: the caller's lists, scanned only
    once the check has failed, to say whether this process's shards hold the culprit."""
    total = reduce(stats)
    if not check_finite or math.isfinite(total.sum().item()) or bool(torch.isfinite(total).all()):
        return total
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
        block = coeffs if layers is None else coeffs.index_select(
            0, torch.tensor([layers[p] for p in members], device=coeffs.device))
        calls.append((block, list(member_xs), list(member_outs),
                      None if member_bases is None else list(member_bases), beta, members))
    op_lists = ("xs", "outs", "bases")

    def named(error: Exception, members: Sequence[int]) -> Exception:
        error = _in_whole_list(error, members) if len(calls) > 1 else error
        return error if caller is None else _in_callers_words(error, op_lists, caller)

    if len(calls) > 1:
        # Several calls: a wrong tensor in a later one would be refused after the earlier ones
        # had written, so every call's arguments are checked first (named in the whole list).
        for block, member_xs, member_outs, member_bases, beta, members in calls:
            try:
                check_combine_list("mtunlearn_ext.ops.combine_list", block, member_xs,
                                   member_outs, layers is not None, member_bases, beta)
            except (TypeError, ValueError) as error:
                raise named(error, members) from error
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
