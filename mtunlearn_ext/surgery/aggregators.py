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
from typing import Any

import torch
from torch import nn

from mtunlearn_ext import ops
from mtunlearn_ext.surgery._tensor_lists import stats_dtype
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
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.weighting = weighting

    @property
    def gramian_weighting(self) -> Weighting:
        """TorchJD's name for the Gram-matrix weighting (``GramianWeightedAggregator``)."""
        return self.weighting

    def forward(self, matrix: torch.Tensor, /) -> torch.Tensor:
        k = matrix.shape[0]
        if self.weighting.needs_gram:
            with torch.no_grad():
                gram = ops.gram(matrix.detach())
        else:
            # Mean / Sum look only at k: no pass over the matrix.
            gram = matrix.new_zeros((k, k), dtype=stats_dtype([matrix]))
        weights = self.weighting(gram)
        return ops.combine(weights.unsqueeze(0), matrix).squeeze(0)

    def __call__(self, matrix: torch.Tensor, /) -> Any:
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            got = (tuple(matrix.shape) if isinstance(matrix, torch.Tensor)
                   else type(matrix).__name__)
            raise ValueError(f"{type(self).__name__}: `matrix` must be a [k, n] tensor, got {got}")
        if matrix.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: `matrix` must have at least one row")
        return super().__call__(matrix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weighting.extra_repr()})"


class Mean(Aggregator):
    """Average of the rows (TorchJD ``Mean``)."""

    def __init__(self) -> None:
        super().__init__(MeanWeighting())


class Sum(Aggregator):
    """Sum of the rows (TorchJD ``Sum``)."""

    def __init__(self) -> None:
        super().__init__(SumWeighting())


class PCGrad(Aggregator):
    """PCGrad, summed (TorchJD ``PCGrad``; see :class:`PCGradWeighting` for the task orders)."""

    def __init__(self, seed: int | None = 0, reshuffle: bool = True) -> None:
        super().__init__(PCGradWeighting(seed=seed, reshuffle=reshuffle))


class UPGrad(Aggregator):
    """Each row projected onto the dual cone of all rows, then combined with the preferences
    (TorchJD ``UPGrad``; see :class:`UPGradWeighting`)."""

    def __init__(self, pref_vector: torch.Tensor | Sequence[float] | None = None,
                 reg_eps: float = 0.0) -> None:
        super().__init__(UPGradWeighting(pref_vector=pref_vector, reg_eps=reg_eps))


class MGDA(Aggregator):
    """Min-norm point of the convex hull of the rows (TorchJD ``MGDA``, solved to optimality on
    device instead of by a fixed-tolerance Frank-Wolfe loop; see :class:`MGDAWeighting`)."""

    def __init__(self, iterations: int = 200) -> None:
        super().__init__(MGDAWeighting(iterations=iterations))
