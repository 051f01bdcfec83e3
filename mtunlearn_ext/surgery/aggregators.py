"""Aggregators called like TorchJD's ``Aggregator``, on the compiled ops.

``agg(matrix)`` takes the ``[k, n]`` matrix of task gradients (a Jacobian) and returns the
``[n]`` update ``w @ J`` with ``w = agg.weighting(J J^T)``: one Gram pass
(:func:`mtunlearn_ext.ops.gram`), a ``k x k`` solve on device, one combination pass
(:func:`mtunlearn_ext.ops.combine`). They are ``nn.Module``\\ s called like TorchJD's, but not
subclasses of TorchJD's classes (TorchJD is not a dependency). So ``torchjd.autojac.jac_to_grad``
(after TorchJD's ``backward`` / ``mtl_backward`` have filled ``.jac``) writes their update into
``.grad``, but returns ``None`` instead of the weights and refuses
``optimize_gramian_computation=True``: it recognises weighted aggregators by TorchJD's own
classes. ``GradientSurgery(params, agg).apply([p.jac for p in params])`` does what that option
does (Gram summed per tensor, no concatenated Jacobian) and returns the weights. Their
``weighting`` (TorchJD's ``gramian_weighting``) maps a Gram matrix to weights, e.g. one from
TorchJD's autogram engine, or serves :func:`mtunlearn_ext.surgery.aggregate_list` on
per-parameter gradient lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtunlearn_ext import ops
from mtunlearn_ext.ops._checks import check_bool, check_finite_result
from mtunlearn_ext.surgery._tensor_lists import (
    guard_nonfinite,
    poison_nonfinite,
    solvable_gram,
    stats_dtype,
)
from mtunlearn_ext.surgery.weightings import (
    MeanWeighting,
    MGDAWeighting,
    PCGradWeighting,
    SumWeighting,
    UPGradWeighting,
    Weighting,
)


class Aggregator(nn.Module):
    """``[k, n]`` task-gradient matrix -> ``[n]`` update ``weighting(J J^T) @ J``.

    The weights are constants for autograd (as in TorchJD's non-differentiable aggregators); the
    combination is differentiable with respect to the matrix. Low-precision matrices are
    combined with float32 accumulation and returned in their own dtype.

    ``check_finite`` (keyword, default ``True``): a matrix holding NaN or Inf, or one whose Gram
    matrix overflows, raises :class:`FloatingPointError` naming the aggregator and ``matrix``.
    The check reads the ``k x k`` Gram matrix only (one tiny device-to-host read on CUDA), so
    ``Mean`` and ``Sum``, which compute none, never raise. ``False`` lets the step through as
    NaN instead: the weights of a non-finite problem are NaN without running a solver on it, so
    the whole update is NaN, which is what a ``GradScaler`` (``torchjd.autojac.jac_to_grad``
    writing the update into ``.grad``) needs to see to skip an overflowing step; on CUDA
    without a device-to-host read (on the CPU the Gram is still read, for tiny gradients).
    It applies where the aggregator is called on a matrix (``agg(J)``, ``jac_to_grad``) and
    in a :class:`~mtunlearn_ext.surgery.GradientSurgery` built without a ``check_finite`` of
    its own; :func:`~mtunlearn_ext.surgery.aggregate_list` uses only the ``weighting`` and
    takes its own ``check_finite``.
    """

    def __init__(self, weighting: Weighting, *, check_finite: bool = True) -> None:
        super().__init__()
        self.weighting = weighting
        self.check_finite = check_bool(type(self).__name__, "check_finite", check_finite)

    @property
    def gramian_weighting(self) -> Weighting:
        """TorchJD's name for the Gram-matrix weighting (``GramianWeightedAggregator``)."""
        return self.weighting

    def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
        """The update ``weighting(J J^T) @ J`` (``[n]``, ``matrix``'s dtype) of the ``[k, n]``
        task-gradient matrix ``J`` (one row per task; checked by the call: a non-empty 2-D
        floating matrix, else ``ValueError`` / ``TypeError`` naming ``matrix``)."""
        k = matrix.shape[0]
        if self.weighting.needs_gram:
            gram, weights_dtype = self._gram(matrix)
        else:
            # Mean / Sum look only at k: no pass over the matrix.
            gram = matrix.new_zeros((k, k), dtype=stats_dtype([matrix]))
            weights_dtype = gram.dtype
        finite = None
        if not self.check_finite and self.weighting.needs_gram:
            gram, finite = guard_nonfinite(gram, k)
        weights = self.weighting(gram)
        if finite is not None:
            weights = poison_nonfinite(weights, finite)
        if weights.dtype != weights_dtype:  # solved on a rescued float64 Gram
            weights = weights.to(weights_dtype)
        return ops.combine(weights.unsqueeze(0), matrix,
                           check_finite=self.check_finite).squeeze(0)

    def _gram(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        """``matrix @ matrix.T`` from :func:`mtunlearn_ext.ops.gram` as the weighting needs it
        (:func:`~mtunlearn_ext.surgery._tensor_lists.solvable_gram`: rows of tiny gradients
        that float32 underflow lost are recomputed), and the dtype of the weights. NaN/Inf
        errors are told in the aggregator's words: the op names its own argument (`x`) and
        suggests its own ``check_finite=False``, neither of which the caller of
        ``agg(matrix)`` can see."""
        with torch.no_grad():
            detached = matrix.detach()
            local = ops.gram(detached, check_finite=False)
            try:
                return solvable_gram(
                    local, [detached], None, 1, None, check_finite=self.check_finite,
                    check=lambda g: check_finite_result("mtunlearn_ext.ops.gram", g,
                                                        [("x", detached)]),
                    op=f"mtunlearn_ext.surgery.{type(self).__name__}")
            except FloatingPointError as error:
                raise FloatingPointError(self._non_finite_message(matrix)) from error

    def _non_finite_message(self, matrix: torch.Tensor) -> str:
        name = type(self).__name__
        advice = (f"build the aggregator with check_finite=False ({name}(..., "
                  "check_finite=False)) to let the step through as a NaN update, e.g. for a "
                  "GradScaler to skip it")
        if not bool(torch.isfinite(matrix.detach()).all()):
            return (f"{name}: `matrix` contains NaN or Inf; pass finite task gradients, or "
                    f"{advice}")
        return (f"{name}: `matrix` is finite but its Gram matrix overflowed "
                f"{stats_dtype([matrix])} (task gradients too large; rescale them), or "
                f"{advice}")

    def __call__(self, matrix: torch.Tensor, /) -> torch.Tensor:
        """``agg(J)``: :meth:`forward` on a checked ``[k, n]`` matrix (float64, float32,
        float16 or bfloat16, at least one row). Typed here: ``nn.Module.__call__`` returns
        ``Any``, which made ``UPGrad()(J)`` untyped in the caller's code."""
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            got = (tuple(matrix.shape) if isinstance(matrix, torch.Tensor)
                   else type(matrix).__name__)
            raise ValueError(f"{type(self).__name__}: `matrix` must be a [k, n] tensor, got {got}")
        if matrix.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: `matrix` must have at least one row")
        limit = self.weighting.max_tasks
        if limit is not None and matrix.shape[0] > limit:
            raise ValueError(f"{type(self).__name__}: `matrix` has {matrix.shape[0]} rows "
                             f"(tasks), past the {limit} it solves for (the solvers' limit); "
                             "Mean and Sum take any number")
        if matrix.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{type(self).__name__}: `matrix` must have dtype float64, float32, "
                            f"float16 or bfloat16, got {matrix.dtype}")
        update: torch.Tensor = super().__call__(matrix)
        return update

    def __repr__(self) -> str:
        arguments = [self.weighting.extra_repr(), "" if self.check_finite else "check_finite=False"]
        return f"{type(self).__name__}({', '.join(a for a in arguments if a)})"


class Mean(Aggregator):
    """Average of the rows (TorchJD ``Mean``)."""

    def __init__(self, *, check_finite: bool = True) -> None:
        super().__init__(MeanWeighting(), check_finite=check_finite)


class Sum(Aggregator):
    """Sum of the rows (TorchJD ``Sum``)."""

    def __init__(self, *, check_finite: bool = True) -> None:
        super().__init__(SumWeighting(), check_finite=check_finite)


class PCGrad(Aggregator):
    """PCGrad, summed (TorchJD ``PCGrad``): each row loses its component along every other row
    it conflicts with (negative inner product), in a shuffled order; the update is the sum.

    Args:
        seed: seed of the task orders; ``None`` keeps the order ``0..k-1``.
        reshuffle: new orders at every call (order seed ``seed + calls``; the same in every
            process of a distributed job; see :class:`PCGradWeighting`).
        check_finite: see :class:`Aggregator`.
    """

    def __init__(self, seed: int | None = 0, reshuffle: bool = True, *,
                 check_finite: bool = True) -> None:
        super().__init__(PCGradWeighting(seed=seed, reshuffle=reshuffle),
                         check_finite=check_finite)


class UPGrad(Aggregator):
    """Each row, weighted by its preference, projected onto the dual cone of all rows
    ``{d : <d, g_j> >= 0 for all j}``, and the projections summed (TorchJD ``UPGrad``): an
    update that conflicts with no task's gradient (the math: :class:`UPGradWeighting`).

    Args:
        pref_vector: ``[k]`` preferences; ``None`` for ``1/k`` each.
        reg_eps: ``> 0`` solves on ``G / tr(G) + reg_eps I`` as TorchJD's default projector
            does (``1e-4`` there); ``0`` (default) projects on the exact cone.
        check_finite: see :class:`Aggregator`.
    """

    def __init__(self, pref_vector: torch.Tensor | Sequence[float] | None = None,
                 reg_eps: float = 0.0, *, check_finite: bool = True) -> None:
        super().__init__(UPGradWeighting(pref_vector=pref_vector, reg_eps=reg_eps),
                         check_finite=check_finite)


class MGDA(Aggregator):
    """Min-norm point of the convex hull of the rows (TorchJD ``MGDA``, solved to optimality on
    device instead of by a fixed-tolerance Frank-Wolfe loop; see :class:`MGDAWeighting`).

    Args:
        iterations: projected-gradient steps before the exact polish.
        check_finite: see :class:`Aggregator`.
    """

    def __init__(self, iterations: int = 200, *, check_finite: bool = True) -> None:
        super().__init__(MGDAWeighting(iterations=iterations), check_finite=check_finite)
