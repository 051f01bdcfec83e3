"""Projections and aggregations on parameter lists: one implementation for the whole project.

Vectors over all parameters are never materialised. A set of ``k`` such vectors is a list of
per-parameter stacks ``xs[p]``: ``[k, *shape_p]``; the ``i``-th vector is (virtually)
``cat_p(xs[p][i].flatten())``. Each function here is three steps:

1. coefficient-space statistics, one pass over the stacks: Gram matrices
   (:func:`mtunlearn_ext.ops.gram_list`) and inner products (summed per parameter);
2. a tiny solve on them (:func:`mtunlearn_ext.ops.ridge_solve`,
   :func:`mtunlearn_ext.ops.nonconflicting_dual`, a :class:`~mtunlearn_ext.surgery.Weighting`);
3. one combination pass writing the outputs (:func:`mtunlearn_ext.ops.combine_list`), for
   example straight into each parameter's ``.grad``.

Per-layer problems (``per_layer``): the statistics of each layer are kept apart (``[L, k, k]``
Gram matrices, from one ``gram_list(per_tensor=True)`` pass) and each layer is solved on its
own, as the task-aware projection needs (one protected subspace per layer).

Distributed (``reduce``): every statistic is a sum over parameter coordinates, so when the
stacks are shards of longer vectors the global statistics are the SUM over processes of the
local ones. ``reduce`` is applied once, to all statistics packed in one small tensor (one
collective per call), before the solve; every process then solves the same problem and writes
its own shards. With ``check_finite`` the NaN/Inf check reads the reduced statistics, so that
a non-finite shard on one process makes every process raise (not the one holding it alone,
which would leave the others waiting in the collective). See
:mod:`mtunlearn_ext.surgery.distributed`.

The projections and :func:`aggregate_list` write in place and run under ``torch.no_grad()``,
as an optimizer step does: stacks that require grad are read as values, and nothing is
recorded (the ops' autograd layer is skipped, which matters on these hot paths).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal, overload

import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops._checks import (
    check_beta,
    check_bool,
    check_finite_result,
    check_on_failure,
    check_ridge,
    check_sign,
    check_tensor_list,
    named_pairs,
)
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.surgery._tensor_lists import (
    StatsReduce,
    check_paired,
    check_reduced,
    check_same_length,
    check_stacks,
    combine_into,
    gram_stats,
    guard_nonfinite,
    in_callers_words,
    inner_stats,
    layer_index,
    poison_nonfinite,
    reduced_stats,
    rescued_local_gram,
    solvable_gram,
    stacked_stats,
    stats_dtype,
)
from mtunlearn_ext.surgery.aggregators import Aggregator
from mtunlearn_ext.surgery.weightings import Weighting


def _prepare_outs(op: str, g_list: Sequence[torch.Tensor], outs: Sequence[torch.Tensor] | None
                  ) -> list[torch.Tensor]:
    """Where the projections write ``g - ...``: new contiguous stacks, or the caller's ``outs``
    (one per parameter, ``g``'s shape and dtype, contiguous: checked by the combine pass, and by
    :func:`_check_outs` when it fails).

    ``g`` is not copied there: the combine pass reads it as its base (``outs[p]`` may be
    ``g_list[p]`` itself, an in-place update).
    """
    if outs is None:
        return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in g_list]
    outs = list(outs)
    if len(outs) != len(g_list):
        raise ValueError(f"{op}: `outs` must have one tensor per parameter ({len(g_list)}), got "
                         f"{len(outs)}")
    return outs


def _check_outs(op: str, g_list: Sequence[torch.Tensor], outs: Sequence[torch.Tensor] | None
                ) -> None:
    if outs is None:
        return
    for p, (o, g) in enumerate(zip(outs, g_list)):
        if not isinstance(o, torch.Tensor) or o.shape != g.shape or o.dtype != g.dtype:
            got = (f"{sizes(o.shape)} {o.dtype}" if isinstance(o, torch.Tensor)
                   else type(o).__name__)
            raise ValueError(f"{op}: `outs[{p}]` must have shape {sizes(g.shape)} and dtype "
                             f"{g.dtype}, got {got}")
        if not o.is_contiguous():
            raise ValueError(f"{op}: `outs[{p}]` must be contiguous (it is written in place)")


def _check_projection_args(op: str, g_name: str, g_list: list[torch.Tensor], b_name: str,
                           b_list: list[torch.Tensor], outs: Sequence[torch.Tensor] | None
                           ) -> None:
    """Every per-tensor condition of the list projections, with errors naming their arguments."""
    check_stacks(op, g_name, g_list)
    check_stacks(op, b_name, b_list)
    check_paired(op, g_name, g_list, b_name, b_list)
    _check_outs(op, g_list, outs)


def _basis_stats(op: str, g_list: list[torch.Tensor], basis_list: list[torch.Tensor],
                 layers: list[int] | None, num_layers: int, reduce: StatsReduce | None,
                 check_finite: bool, basis_gram: torch.Tensor | None,
                 transposed: bool = False, basis_name: str = "basis_list",
                 row_scaled_basis: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``B B^T`` (``[..., k, k]``) and ``B g^T`` (``[..., k, m]``), or with ``transposed``
    ``g B^T`` (``[..., m, k]``, the dual's layout), reduced across processes in one collective:
    from one pass over ``[g; B]``, or, with a kept (already reduced) ``basis_gram``, only the
    cross products. Two blocks, possibly views, not one matrix: the solvers take them apart
    anyway, and joining them cost a ``torch.cat`` per call (:func:`_joined` where one is
    needed).

    The third value is ``None``, or, where float32 underflow lost rows of tiny vectors (one
    process, no ``basis_gram``), the factors that take the coefficients solved on the
    returned (rescaled) blocks back to those of the inputs (:func:`_rescaled_blocks`, which
    ``row_scaled_basis`` is passed to)."""
    m, k = g_list[0].shape[0], basis_list[0].shape[0]
    if basis_gram is None:
        # One pass over the basis and g: [g; B] [g; B]^T holds B B^T and B g^T.
        full = stacked_stats(g_list, basis_list, layers, num_layers,
                             check_finite=check_finite and reduce is None and k == 0,
                             caller=(op, ("g_list", basis_name)))
        if reduce is None and check_finite and k > 0:
            # The rows the solve reads (B B^T, B g^T): g g^T, unused, overflows where they do
            # not (|g|^2 beyond float32's range), and an error there refused a projection the
            # single-tensor ops make. A NaN/Inf in g still reaches B g^T.
            check_finite_result(op, full[..., m:, :],
                                named_pairs("g_list", g_list, basis_name, basis_list))
        if reduce is None:
            rescued = rescued_local_gram(
                full, lambda: [torch.cat((g, b)) for g, b in zip(g_list, basis_list)],
                layers, num_layers, check_finite=check_finite, op=op)
            if rescued.dtype != full.dtype:
                return _rescaled_blocks(rescued, m, full.dtype, transposed,
                                        row_scaled_basis)
        gram = full[..., m:, m:]
        cross = full[..., :m, m:] if transposed else full[..., m:, :m]
        if reduce is None:
            return gram, cross, None
        stats = reduced_stats(op, _joined(gram, cross, transposed), reduce,
                              [("g_list", g_list), (basis_name, basis_list)],
                              check_finite=check_finite)
        return *_split(stats, k, transposed), None
    pair = (g_list, basis_list) if transposed else (basis_list, g_list)
    names = ("g_list", basis_name) if transposed else (basis_name, "g_list")
    cross = inner_stats(*pair, layers, num_layers, check_finite=check_finite and reduce is None,
                        caller=(op, names))
    expected = (k, k) if layers is None else (num_layers, k, k)
    if tuple(basis_gram.shape) != expected or basis_gram.device != cross.device:
        raise ValueError(f"{op}: `basis_gram` must be {list(expected)} on {cross.device}, got "
                         f"{list(sizes(basis_gram.shape))} on {basis_gram.device}")
    if check_finite:  # else the solver's coefficients were blamed, an argument never passed
        check_finite_result(op, basis_gram, [("basis_gram", basis_gram)])
    if reduce is not None:
        cross = reduced_stats(op, cross, reduce, [(names[0], pair[0]), (names[1], pair[1])],
                              check_finite=check_finite)
    return basis_gram.to(cross.dtype), cross, None


def _rescaled_blocks(full: torch.Tensor, m: int, dtype: torch.dtype, transposed: bool,
                     row_scaled_basis: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_basis_stats`' blocks, in ``dtype``, of the problem with each ``g_i`` scaled by
    ``d_i`` and the basis by ``c`` (one factor), or with ``row_scaled_basis`` each basis row
    ``j`` by its own ``c_j``: powers of two that bring the squared norms near 1 (exact), read
    off ``full``, the float64 Gram of ``[g; B]`` (``[..., m + k, m + k]``) whose rows float32
    underflow lost were recomputed. The coefficients for the scaled problem are ``d_i / c_j``
    times those for ``(g, B)``: a projection scales with ``g_i``; the cone of the
    nonconflicting projection and the span of an unridged one do not depend on the rows'
    norms (nor do the solvers' pivot decisions, relative to each row's own diagonal), and the
    relative ridge needs one ``c`` for the whole basis. So the third value, ``c_j / d_i``
    (``[..., m, k]``, float64), takes the coefficients solved on these blocks back. Solved in
    ``dtype`` and not in float64, the rescued problem keeps the float32 pivot floor that the
    Gram's float32 products need at any scale (a float64 floor keeps pivots of rounding
    noise); scaling each row keeps a basis row 1e-30 times another's (a squared norm below
    float32's range beside the other's) in the problem."""
    diagonal = torch.diagonal(full, dim1=-2, dim2=-1)
    basis_norms = diagonal[..., m:]
    if not row_scaled_basis and basis_norms.shape[-1] > 0:
        basis_norms = basis_norms.amax(-1, keepdim=True).expand_as(basis_norms)
    # 2**-e with 2**e just above the norm: scaled entries are at most 1 in magnitude (a zero
    # row keeps the factor 1).
    g_scale = torch.ldexp(torch.ones_like(diagonal[..., :m]),
                          -torch.frexp(diagonal[..., :m].sqrt()).exponent)
    basis_scale = torch.ldexp(torch.ones_like(basis_norms),
                              -torch.frexp(basis_norms.sqrt()).exponent)
    gram = full[..., m:, m:] * basis_scale.unsqueeze(-1) * basis_scale.unsqueeze(-2)
    cross = full[..., :m, m:] * g_scale.unsqueeze(-1) * basis_scale.unsqueeze(-2)
    unscale = basis_scale.unsqueeze(-2) / g_scale.unsqueeze(-1)
    cross = cross.to(dtype)
    return gram.to(dtype), cross if transposed else cross.transpose(-1, -2), unscale


def _joined(gram: torch.Tensor, cross: torch.Tensor, transposed: bool) -> torch.Tensor:
    """:func:`_basis_stats`' two blocks as one matrix, ``[B B^T | B g^T]`` (``[..., k, k + m]``)
    or with ``transposed`` ``[B B^T; g B^T]`` (``[..., k + m, k]``): what one collective
    reduces, and what :func:`guard_nonfinite` guards per problem."""
    return torch.cat([gram, cross], dim=-2 if transposed else -1)


def _split(stats: torch.Tensor, k: int, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_joined`'s matrix as its two blocks again (views)."""
    if transposed:
        return stats[..., :k, :], stats[..., k:, :]
    return stats[..., :k], stats[..., k:]


def _guarded(gram: torch.Tensor, cross: torch.Tensor, k: int, transposed: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`guard_nonfinite` on the two blocks together (a problem is solved on the
    identity where either holds NaN/Inf): the blocks, and the finite flag per problem."""
    stats, finite = guard_nonfinite(_joined(gram, cross, transposed), k)
    return *_split(stats, k, transposed), finite


def gram_list_stats(basis_list: Sequence[torch.Tensor], *, per_layer: bool | Sequence[int] = False,
                    num_layers: int | None = None, check_finite: bool = True) -> torch.Tensor:
    """The Gram matrix of ``k`` vectors given as per-parameter stacks ``[k, *shape_p]``:
    ``[k, k]``, or ``[L, k, k]`` per layer, in the dtype the list projections solve in (one
    ``ops.gram_list`` pass per dtype). Keep it to pass as ``basis_gram`` to
    :func:`project_out_list` while the basis does not change."""
    op = "mtunlearn_ext.surgery.gram_list_stats"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, "basis_list", basis_list, required=True)
    basis_list = list(basis_list)
    check_stacks(op, "basis_list", basis_list)
    layers, num_layers = layer_index(per_layer, len(basis_list), op, num_layers)
    return gram_stats(basis_list, layers, num_layers, check_finite=check_finite,
                      caller=(op, ("basis_list",)))


def inner_list_stats(a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor], *,
                     per_layer: bool | Sequence[int] = False, num_layers: int | None = None,
                     check_finite: bool = True) -> torch.Tensor:
    """Inner products ``C[i, j] = <a_i, b_j>`` of ``m`` vectors with ``k`` others, both given
    as per-parameter stacks (``[m, *shape_p]`` and ``[k, *shape_p]``): ``[m, k]``, or
    ``[L, m, k]`` per layer, in the dtype the list projections solve in. With it a caller that
    grows a basis by a few rows updates a kept ``basis_gram`` (new rows against all) instead of
    recomputing it."""
    op = "mtunlearn_ext.surgery.inner_list_stats"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, "a_list", a_list, required=True)
    check_tensor_list(op, "b_list", b_list, required=True)
    a_list, b_list = list(a_list), list(b_list)
    check_stacks(op, "a_list", a_list)
    check_stacks(op, "b_list", b_list)
    check_paired(op, "a_list", a_list, "b_list", b_list)
    layers, num_layers = layer_index(per_layer, len(a_list), op, num_layers)
    return inner_stats(a_list, b_list, layers, num_layers, check_finite=check_finite,
                       caller=(op, ("a_list", "b_list")))


@overload
def project_out_list(g_list: Sequence[torch.Tensor], basis_list: Sequence[torch.Tensor],
                     ridge: float = ..., *, outs: Sequence[torch.Tensor] | None = ...,
                     per_layer: bool | Sequence[int] = ..., num_layers: int | None = ...,
                     reduce: StatsReduce | None = ..., check_finite: bool = ...,
                     return_coeffs: Literal[False] = ..., basis_gram: torch.Tensor | None = ...
                     ) -> list[torch.Tensor]: ...
@overload
def project_out_list(g_list: Sequence[torch.Tensor], basis_list: Sequence[torch.Tensor],
                     ridge: float = ..., *, outs: Sequence[torch.Tensor] | None = ...,
                     per_layer: bool | Sequence[int] = ..., num_layers: int | None = ...,
                     reduce: StatsReduce | None = ..., check_finite: bool = ...,
                     return_coeffs: Literal[True], basis_gram: torch.Tensor | None = ...
                     ) -> tuple[list[torch.Tensor], torch.Tensor]: ...
@overload
def project_out_list(g_list: Sequence[torch.Tensor], basis_list: Sequence[torch.Tensor],
                     ridge: float = ..., *, outs: Sequence[torch.Tensor] | None = ...,
                     per_layer: bool | Sequence[int] = ..., num_layers: int | None = ...,
                     reduce: StatsReduce | None = ..., check_finite: bool = ...,
                     return_coeffs: bool, basis_gram: torch.Tensor | None = ...
                     ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]: ...


@torch.no_grad()
def project_out_list(g_list: Sequence[torch.Tensor], basis_list: Sequence[torch.Tensor],
                     ridge: float = 1e-6, *, outs: Sequence[torch.Tensor] | None = None,
                     per_layer: bool | Sequence[int] = False, num_layers: int | None = None,
                     reduce: StatsReduce | None = None, check_finite: bool = True,
                     return_coeffs: bool = False, basis_gram: torch.Tensor | None = None
                     ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
    """Remove from ``m`` vectors their least-squares projection on the span of ``k`` others.

    ``out_i = g_i - sum_j a_ji b_j`` with ``(B B^T + lambda I) a = B g^T``,
    ``lambda = ridge * tr(B B^T) / k`` (:func:`mtunlearn_ext.ops.ridge_solve`): the projection
    ``(I - B^T (B B^T)^+ B) g`` up to the ridge, from the ``k x k`` Gram matrix of the basis.
    With ``per_layer``, each layer ``l`` is projected off its own basis rows:
    ``f_l <- f_l - B_l^T (B_l B_l^T + lambda_l I)^-1 B_l f_l`` (the task-aware projection).

    Args:
        g_list: ``[m, *shape_p]`` per parameter (use ``t.unsqueeze(0)`` for one vector).
        basis_list: ``[k, *shape_p]`` per parameter, same dtypes as ``g_list``.
        ridge: relative Tikhonov term (rank-deficient bases are fine).
        outs: where to write (``[m, *shape_p]``, contiguous); may be ``g_list`` itself for an
            in-place update. Default: new tensors.
        per_layer: ``False``, ``True`` (one layer per tensor) or a layer id per tensor.
        num_layers: the number of layers ``L`` when ``per_layer`` ids come from a partial list
            (one rank's shards may miss whole layers; every rank must reduce ``[L, ...]``).
        reduce: cross-process SUM of the statistics, for sharded stacks.
        check_finite: raise on NaN/Inf in the inputs (read from the small statistics). With
            ``False`` they propagate to the outputs as NaN instead.
        return_coeffs: also return ``a^T`` (``[m, k]``, or ``[L, m, k]`` per layer).
        basis_gram: the basis' Gram matrix ``B B^T`` (``[k, k]``, or ``[L, k, k]`` per layer;
            already reduced across processes), when the caller keeps it between calls with the
            same basis: the pass over the ``k`` basis rows is skipped and only the ``k x m``
            cross products are computed (a protected subspace that is refreshed every few steps
            reads its snapshots once per step instead of twice).

    Returns:
        The projected stacks (``outs``), and the coefficients if asked.

    Float32 inputs whose Gram entries underflow (vectors of norm below ~1e-19, or a basis row
    ~1e-20 times the others') are rescued as in the aggregators (docs/dropin.md, "Tiny
    gradients"): a squared norm below ``2**-60`` in the ``[g; B]`` Gram marks rows that are
    recomputed from power-of-two scaled copies, and the problem is solved scaled into
    float32's range (the relative ridge scales the basis as a whole; without a ridge each row
    is scaled), its coefficients scaled back. Not with ``reduce`` or ``basis_gram``, nor where
    :func:`~mtunlearn_ext.surgery._tensor_lists.solvable_gram` cannot read the Gram (CUDA
    without ``check_finite``, ``torch.compile``): there scale such inputs up by a power of two
    first.
    """
    op = "mtunlearn_ext.surgery.project_out_list"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, "g_list", g_list, required=True)
    check_tensor_list(op, "basis_list", basis_list, required=True)
    check_tensor_list(op, "outs", outs)
    g_list, basis_list = list(g_list), list(basis_list)
    check_same_length(op, "g_list", g_list, "basis_list", basis_list)
    # Checked here so that an error names this function, not the ridge_solve it calls.
    ridge = check_ridge(op, ridge)

    def project() -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        k = basis_list[0].shape[0]
        layers, layer_count = layer_index(per_layer, len(g_list), op, num_layers)
        gram, cross, unscale = _basis_stats(op, g_list, basis_list, layers, layer_count,
                                            reduce, check_finite, basis_gram,
                                            row_scaled_basis=ridge == 0)
        finite = None
        if not check_finite:
            gram, cross, finite = _guarded(gram, cross, k, transposed=False)
        coeffs = ops.ridge_solve(gram.contiguous(), cross.contiguous(), ridge).transpose(-1, -2)
        if unscale is not None:
            coeffs = (coeffs * unscale).to(coeffs.dtype)
        if finite is not None:
            coeffs = poison_nonfinite(coeffs, finite)
        targets = _prepare_outs(op, g_list, outs)
        combine_into(-coeffs, basis_list, targets, [1.0] * len(targets), layers, bases=g_list,
                     check_finite=check_finite, caller=(op, ("basis_list", "outs", "g_list")))
        return (targets, coeffs) if return_coeffs else targets

    return check_on_failure(project, lambda: _check_projection_args(
        op, "g_list", g_list, "basis_list", basis_list, outs))


@overload
def project_nonconflicting_list(g_list: Sequence[torch.Tensor], r_list: Sequence[torch.Tensor],
                                sign: int = ..., *, outs: Sequence[torch.Tensor] | None = ...,
                                per_layer: bool | Sequence[int] = ...,
                                num_layers: int | None = ...,
                                reduce: StatsReduce | None = ..., check_finite: bool = ...,
                                return_coeffs: Literal[False] = ...,
                                basis_gram: torch.Tensor | None = ...
                                ) -> list[torch.Tensor]: ...
@overload
def project_nonconflicting_list(g_list: Sequence[torch.Tensor], r_list: Sequence[torch.Tensor],
                                sign: int = ..., *, outs: Sequence[torch.Tensor] | None = ...,
                                per_layer: bool | Sequence[int] = ...,
                                num_layers: int | None = ...,
                                reduce: StatsReduce | None = ..., check_finite: bool = ...,
                                return_coeffs: Literal[True],
                                basis_gram: torch.Tensor | None = ...
                                ) -> tuple[list[torch.Tensor], torch.Tensor]: ...
@overload
def project_nonconflicting_list(g_list: Sequence[torch.Tensor], r_list: Sequence[torch.Tensor],
                                sign: int = ..., *, outs: Sequence[torch.Tensor] | None = ...,
                                per_layer: bool | Sequence[int] = ...,
                                num_layers: int | None = ...,
                                reduce: StatsReduce | None = ..., check_finite: bool = ...,
                                return_coeffs: bool, basis_gram: torch.Tensor | None = ...
                                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
    ...


@torch.no_grad()
def project_nonconflicting_list(g_list: Sequence[torch.Tensor], r_list: Sequence[torch.Tensor],
                                sign: int = 1, *, outs: Sequence[torch.Tensor] | None = None,
                                per_layer: bool | Sequence[int] = False,
                                num_layers: int | None = None,
                                reduce: StatsReduce | None = None, check_finite: bool = True,
                                return_coeffs: bool = False,
                                basis_gram: torch.Tensor | None = None
                                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
    """For each of ``m`` vectors ``g_i``, the closest ``d`` with ``sign * <d, r_j> >= 0`` for all
    ``k`` vectors ``r_j`` (GEM / UPGrad's cone projection, on parameter lists).

    In the dual: ``d = g + sign * w @ R`` with ``w >= 0`` minimising
    ``1/2 w^T (R R^T) w + sign * (R g)^T w`` (:func:`mtunlearn_ext.ops.nonconflicting_dual`).
    ``sign=1``: stepping along ``-d`` raises no ``r_j``-loss to first order; ``sign=-1``:
    ``<d, r_j> <= 0``, stepping along ``+d`` raises none (the sign-aware instance-level
    orthogonalisation of the forget direction against per-sample retain gradients).

    Args:
        g_list: ``[m, *shape_p]`` per parameter; r_list: ``[k, *shape_p]``, same dtypes.
        sign: ``1`` or ``-1``.
        outs, per_layer, num_layers, reduce, check_finite: as in :func:`project_out_list`.
        return_coeffs: also return ``w`` (``[m, k]`` or ``[L, m, k]``).
        basis_gram: ``R R^T`` when the caller keeps it (as in :func:`project_out_list`): only
            the ``k x m`` cross products are then computed.

    Tiny float32 inputs are rescued as in :func:`project_out_list`, each row of ``r`` scaled on
    its own (the cone does not depend on the rows' norms).
    """
    op = "mtunlearn_ext.surgery.project_nonconflicting_list"
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor_list(op, "g_list", g_list, required=True)
    check_tensor_list(op, "r_list", r_list, required=True)
    check_tensor_list(op, "outs", outs)
    g_list, r_list = list(g_list), list(r_list)
    check_same_length(op, "g_list", g_list, "r_list", r_list)
    sign = check_sign(op, sign)

    def project() -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        k = r_list[0].shape[0]
        layers, layer_count = layer_index(per_layer, len(g_list), op, num_layers)
        gram, cross, unscale = _basis_stats(op, g_list, r_list, layers, layer_count, reduce,
                                            check_finite, basis_gram, transposed=True,
                                            basis_name="r_list")
        finite = None
        if not check_finite:
            gram, cross, finite = _guarded(gram, cross, k, transposed=True)
        coeffs = ops.nonconflicting_dual(gram.contiguous(), float(sign) * cross)
        if unscale is not None:
            coeffs = (coeffs * unscale).to(coeffs.dtype)
        if finite is not None:
            coeffs = poison_nonfinite(coeffs, finite)
        targets = _prepare_outs(op, g_list, outs)
        combine_into(float(sign) * coeffs, r_list, targets, [1.0] * len(targets), layers,
                     bases=g_list, check_finite=check_finite,
                     caller=(op, ("r_list", "outs", "g_list")))
        return (targets, coeffs) if return_coeffs else targets

    return check_on_failure(project, lambda: _check_projection_args(
        op, "g_list", g_list, "r_list", r_list, outs))


def _check_gram(op: str, gram: torch.Tensor, grads_list: list[torch.Tensor],
                reduced: bool) -> None:
    """Raise if ``gram`` (of ``grads_list``, summed over the processes if ``reduced``) holds
    NaN/Inf, naming ``grads_list[p]`` as the list ops name their argument."""
    if reduced:
        check_reduced(op, gram, [("grads_list", grads_list)])
        return
    try:
        check_finite_result("mtunlearn_ext.ops.gram_list", gram,
                            ((f"xs[{p}]", x) for p, x in enumerate(grads_list)))
    except FloatingPointError as error:
        raise in_callers_words(error, ("xs",), (op, ("grads_list",))) from error


@torch.no_grad()
def aggregate_list(aggregator: Aggregator | Weighting, grads_list: Sequence[torch.Tensor],
                   outs: Sequence[torch.Tensor], beta: float | Sequence[float] = 0.0, *,
                   per_layer: bool | Sequence[int] = False, num_layers: int | None = None,
                   reduce: StatsReduce | None = None, check_finite: bool = True) -> torch.Tensor:
    """Aggregate ``k`` task gradients given as per-parameter stacks into per-parameter outputs.

    ``outs[p] = beta_p * outs[p] + sum_i w_i grads_list[p][i]`` with ``w = weighting(G)`` and
    ``G = sum_p grads_list[p] grads_list[p]^T``: exactly ``aggregator(J)`` for the (never built)
    matrix ``J = [cat_p grads_list[p][i].flatten()]_i``. With ``per_layer``, each layer gets its
    own weights from its own Gram matrix.

    Args:
        aggregator: an :class:`Aggregator` or directly a :class:`Weighting`.
        grads_list: ``[k, *shape_p]`` per parameter (any float dtypes; mixed dtypes across
            parameters are handled, the Gram is accumulated in float32 / float64).
        outs: ``shape_p`` per parameter, contiguous, the dtype of ``grads_list[p]`` (e.g. the
            ``.grad`` of each parameter, or its local shard).
        beta: scale of the previous contents of ``outs`` (``1`` accumulates, ``0`` overwrites,
            ignoring NaN there); one value, or one per parameter; finite with
            ``check_finite``.
        per_layer: ``False``, ``True`` (one layer per tensor) or a layer id per tensor.
        num_layers: ``L`` for a partial list (see :func:`project_out_list`).
        reduce: cross-process SUM of the Gram matrices, for sharded stacks.
        check_finite: raise on NaN/Inf gradients, read from the Gram matrix (so not for the
            weightings that need no Gram, ``Mean`` and ``Sum``: there NaN reaches ``outs`` as
            it would in a plain sum). ``False`` lets them reach ``outs`` as NaN (what a
            ``GradScaler`` needs to detect and skip an overflowing step).

    Returns:
        The weights, ``[k]`` (or ``[L, k]`` per layer), in the Gram's accumulation dtype
        (float32; float64 for float64 stacks). Float32 Gram rows that underflowed (task
        gradients of norm below ~1e-19) are recomputed and solved in float64 first (see
        :func:`~mtunlearn_ext.surgery._tensor_lists.solvable_gram`).
    """
    op = "mtunlearn_ext.surgery.aggregate_list"
    check_finite = check_bool(op, "check_finite", check_finite)
    weighting = aggregator.weighting if isinstance(aggregator, Aggregator) else aggregator
    if not isinstance(weighting, Weighting):
        raise TypeError(f"{op}: `aggregator` must be a mtunlearn_ext.surgery Aggregator or "
                        f"Weighting, got {type(aggregator).__name__}")
    check_tensor_list(op, "grads_list", grads_list, required=True)
    check_tensor_list(op, "outs", outs)
    grads_list, outs = list(grads_list), list(outs)
    if len(outs) != len(grads_list):
        raise ValueError(f"{op}: `outs` must have one tensor per parameter ({len(grads_list)}), "
                         f"got {len(outs)}")
    if isinstance(beta, (float, numbers.Number)) or getattr(beta, "ndim", None) == 0:
        betas = [check_beta(op, beta, check_finite)] * len(outs)
    else:
        betas = list(beta)
        # The hook passes one Python float per parameter at every step: builtins only then.
        if not (all(type(b) is float for b in betas)
                and (not check_finite or all(map(math.isfinite, betas)))):
            betas = [check_beta(op, b, check_finite, name=f"beta[{p}]")
                     for p, b in enumerate(betas)]
    if len(betas) != len(outs):
        raise ValueError(f"{op}: `beta` must be a number or one per parameter, got {len(betas)}")

    def aggregate() -> torch.Tensor:
        k = grads_list[0].shape[0]
        if k == 0:
            raise ValueError(f"{op}: `grads_list` must hold at least one task's gradient "
                             f"(k >= 1), got stacks of shape {sizes(grads_list[0].shape)}")
        layers, layer_count = layer_index(per_layer, len(grads_list), op, num_layers)
        if weighting.needs_gram:
            local = gram_stats(grads_list, layers, layer_count, check_finite=False,
                               caller=(op, ("grads_list",)))
            gram, weights_dtype = solvable_gram(
                local, grads_list, layers, layer_count, reduce, check_finite=check_finite,
                check=lambda g: _check_gram(op, g, grads_list, reduce is not None), op=op)
        else:
            # Mean / Sum look only at k: skip the pass over the gradients and the collective.
            shape = (k, k) if layers is None else (layer_count, k, k)
            gram = torch.zeros(shape, dtype=stats_dtype(grads_list),
                               device=grads_list[0].device)
            weights_dtype = gram.dtype
        finite = None
        if not check_finite:
            gram, finite = guard_nonfinite(gram, k)
        weights = weighting(gram)
        if finite is not None:
            weights = poison_nonfinite(weights, finite)
        if weights.dtype != weights_dtype:  # solved on a rescued float64 Gram
            weights = weights.to(weights_dtype)
        combine_into(weights, grads_list, outs, betas, layers, check_finite=check_finite,
                     caller=(op, ("grads_list", "outs", "outs")))
        return weights

    return check_on_failure(aggregate, lambda: check_stacks(op, "grads_list", grads_list))
