"""Weightings: a Gram matrix of ``k`` task gradients in, ``k`` combination weights out.

Every aggregator of this package is ``update = w @ J`` with ``w`` a function of ``G = J J^T``
only. That is what lets one implementation serve a ``[k, n]`` matrix, a list of per-parameter
stacks (``G`` from :func:`mtunlearn_ext.ops.gram_list`, the update written by
:func:`mtunlearn_ext.ops.combine_list`), a per-layer batch of problems (``G``: ``[L, k, k]``,
``w``: ``[L, k]``) and parameter shards on several processes (``G`` summed over shards).

The classes mirror TorchJD's ``Weighting`` [``PSDMatrix``] interface: ``nn.Module``\\ s called as
``weighting(gram)``, so forward hooks (e.g. to log the weights) work as they do there. Weights
are computed without autograd (the solvers are not differentiable) and returned in the Gram's
dtype. All weightings are positively homogeneous of degree 0 in ``G`` (scaling every gradient
by ``s > 0`` leaves the weights unchanged), which is what makes them correct under a loss
scaler: scaled gradients give the scaled update.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtunlearn_ext import ops
from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.ops._checks import check_bool, check_int, check_number
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.ops.solvers import MAX_SOLVER_K
from mtunlearn_ext.surgery.min_norm import min_norm_simplex


class Weighting(nn.Module, ABC):
    """Base class: ``forward(gram [..., k, k]) -> weights [..., k]``.

    ``needs_gram = False`` marks weightings that look only at ``k`` (Mean, Sum), so callers on
    huge gradient lists may skip the Gram pass and hand in any ``[..., k, k]`` placeholder.
    ``max_tasks`` is the largest ``k`` it solves for (``None``: any): the solver-based ones
    (PCGrad, UPGrad, MGDA) stop at the solvers' limit, 256, which a call past it is refused
    with (and :class:`~mtunlearn_ext.surgery.GradientSurgery` checks before its ``k``
    backward passes).
    """

    needs_gram: bool = True
    max_tasks: int | None = None

    def __init__(self) -> None:
        # Declared so that help() and type checkers show that Mean/Sum weightings take no
        # argument (nn.Module's own is ``*args, **kwargs``, which let MeanWeighting(3) through
        # a user's type check).
        super().__init__()

    @abstractmethod
    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        """Weights ``[..., k]`` from the Gram matrix ``[..., k, k]``."""

    def __call__(self, gram: torch.Tensor, /) -> torch.Tensor:
        """``weighting(G)``: :meth:`forward` on a checked ``[..., k, k]`` floating Gram matrix,
        without autograd (typed here: ``nn.Module.__call__`` returns ``Any``)."""
        if not isinstance(gram, torch.Tensor) or gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
            shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
            raise ValueError(f"{type(self).__name__}: `gram` must be a [..., k, k] tensor, got "
                             f"{shape}")
        if self.max_tasks is not None and gram.shape[-1] > self.max_tasks:
            raise ValueError(f"{type(self).__name__}: `gram` is for {gram.shape[-1]} tasks, "
                             f"past the {self.max_tasks} it solves for (the solvers' limit); "
                             "MeanWeighting and SumWeighting take any number")
        if not gram.is_floating_point():
            # Weights in an integer dtype are truncated: Mean and MGDA gave [0, 0] for k = 2.
            raise TypeError(f"{type(self).__name__}: `gram` must have a floating-point dtype, "
                            f"got {gram.dtype}")
        with torch.no_grad():
            weights: torch.Tensor = super().__call__(gram)
        return weights


class MeanWeighting(Weighting):
    """``w = 1/k`` for every task: the plain average of the task gradients."""

    needs_gram = False

    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        k = gram.shape[-1]
        # k = 0: no task, no weight (an empty tensor, as Sum and PCGrad give).
        return torch.full(gram.shape[:-1], 1.0 / k if k else 0.0, dtype=gram.dtype,
                          device=gram.device)


class SumWeighting(Weighting):
    """``w = 1`` for every task: the sum of the task gradients (what ``sum(losses).backward()``
    gives)."""

    needs_gram = False

    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        return torch.ones(gram.shape[:-1], dtype=gram.dtype, device=gram.device)


# One lock for every PCGradWeighting: a lock attribute would not pickle or deepcopy with the
# module, and a count is bumped in nanoseconds.
_CALL_COUNT_LOCK = threading.Lock()


class PCGradWeighting(Weighting):
    """PCGrad (Yu et al., 2020) in coefficient space, via :func:`mtunlearn_ext.ops.pcgrad_weights`.

    For each task ``i`` the vector ``v_i`` starts at ``g_i`` and, for every other task ``j`` in
    a shuffled order, loses its component along ``g_j`` when ``<v_i, g_j> < 0``; the update is
    ``sum_i v_i``. Every ``v_i`` stays in the span of the ``g_j``, so the whole loop runs on the
    Gram matrix and returns the weights of that sum.

    Args:
        seed: seed of the task orders (:func:`mtunlearn_ext.ops.pcgrad_order`); ``None`` keeps
            the natural order ``0..k-1``.
        reshuffle: draw new orders at every call (order seed ``seed + number of previous calls``,
            modulo ``2**63``), as the PCGrad paper does per step. The orders come from a call
            counter, not from a random generator, so that every process of a distributed job,
            calling once per step, uses the same orders and so the same weights; TorchJD's
            PCGrad draws them from ``torch.randperm`` instead. The counter is part of
            ``state_dict()`` (as extra state), so a run resumed from a checkpoint that saved it
            draws the orders the uninterrupted run would have. Threads sharing the module
            draw distinct counts, in the order they happen to call.
    """

    max_tasks = MAX_SOLVER_K

    def __init__(self, seed: int | None = 0, reshuffle: bool = True) -> None:
        super().__init__()
        if seed is not None:
            # NumPy's integers are integers (np.int64(3) was refused); bools and fractions not.
            value = integer_value(seed)
            if value is None or value < 0:
                raise ValueError(f"PCGradWeighting: `seed` must be an integer >= 0 or None, got "
                                 f"{seed!r:.40}")
            if value >= 2 ** 63:  # the order seed goes to the kernels as an int64
                raise ValueError(f"PCGradWeighting: `seed` must be below 2**63, got {value}")
            seed = value
        self.seed = seed
        self.reshuffle = check_bool("PCGradWeighting", "reshuffle", reshuffle)
        self.calls = 0
        self._register_load_state_dict_pre_hook(_default_call_count)

    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        if self.seed is None:
            order_seed = -1
        else:
            # Counted only where it picks the order: torch.compile takes a module's int
            # attributes for constants, so a count that changed every call recompiled every
            # call (and failed at dynamo's 9th under fullgraph=True) with the order fixed.
            calls = self._count_call() if self.reshuffle else 0
            # Modulo 2**63 (the kernels' int64): a seed near the top wrapped past it and
            # failed at a later call.
            order_seed = (self.seed + calls) % 2 ** 63
        return ops.pcgrad_weights(gram, seed=order_seed)

    def _count_call(self) -> int:
        """The number of earlier calls, and this one counted. Read and bumped under a lock: two
        threads calling one module both read the count before either stored its increment
        (nn.Module's __setattr__ is Python, a point where threads switch), so both drew the
        same orders and the count lost a call."""
        with _CALL_COUNT_LOCK:
            calls = self.calls
            self.calls = calls + 1
        return calls

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: Any) -> None:
        calls = state.get("calls") if isinstance(state, dict) else None
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"PCGradWeighting.load_state_dict: expected extra state "
                             f"{{'calls': <int >= 0>}}, got {state!r}")
        self.calls = calls

    def extra_repr(self) -> str:
        return f"seed={self.seed}, reshuffle={self.reshuffle}"


def _default_call_count(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A state saved before the call counter was part of it (no ``_extra_state`` key) loads
    with ``strict=True`` as a fresh counter, which is what those runs used."""
    state_dict.setdefault(prefix + "_extra_state", {"calls": 0})


class UPGradWeighting(Weighting):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024).

    Each task gradient, weighted by its preference ``u_i`` (default ``1/k``), is projected onto
    the dual cone ``{d : <d, g_j> >= 0 for all j}`` and the projections are summed. For
    ``x = J^T v`` the projection of ``J^T u`` is ``J^T v*`` with
    ``v* = argmin_{v >= u} v^T G v``; writing ``v = u + w`` this is
    ``min_{w >= 0} 1/2 w^T G w + (G u)^T w``, exactly :func:`mtunlearn_ext.ops.nonconflicting_dual`
    with right-hand side ``G u``. Weights: ``sum_i v*_i = pref + sum_i w_i``.

    Args:
        pref_vector: ``[k]`` preferences (TorchJD's ``pref_vector``); ``None`` for ``1/k``.
        reg_eps: if ``> 0``, solve on ``G / tr(G) + reg_eps I`` as TorchJD's default
            ``QuadprogProjector`` does (``reg_eps=1e-4`` there). ``0`` (default) projects on the
            exact cone; the dual solver is stable on semi-definite ``G``.
    """

    max_tasks = MAX_SOLVER_K

    def __init__(self, pref_vector: torch.Tensor | Sequence[float] | None = None,
                 reg_eps: float = 0.0) -> None:
        super().__init__()
        if pref_vector is not None:
            pref_vector = torch.as_tensor(pref_vector)  # a list or array is fine too
            if pref_vector.dim() != 1:
                raise ValueError(f"UPGradWeighting: `pref_vector` must be 1-D, got shape "
                                 f"{sizes(pref_vector.shape)}")
            if not pref_vector.is_floating_point():
                pref_vector = pref_vector.double()
            if not bool(torch.isfinite(pref_vector).all()):
                raise ValueError(f"UPGradWeighting: `pref_vector` must be finite, got "
                                 f"{pref_vector.tolist()}")
        # An infinite reg_eps gave NaN weights.
        reg_eps = check_number("UPGradWeighting", "reg_eps", reg_eps, at_least=0.0)
        self.pref_vector = pref_vector
        self.reg_eps = reg_eps

    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        k = gram.shape[-1]
        if self.pref_vector is None:
            # k = 0: empty weights, as Sum and PCGrad give (1 / k was a ZeroDivisionError).
            pref = torch.full((k,), 1.0 / k if k else 0.0, dtype=gram.dtype, device=gram.device)
        else:
            if self.pref_vector.shape[0] != k:
                raise ValueError(f"UPGradWeighting: `pref_vector` has {self.pref_vector.shape[0]} "
                                 f"entries but the Gram matrix is for k={k} tasks")
            pref = self.pref_vector.to(dtype=gram.dtype, device=gram.device)
        g = gram
        if self.reg_eps > 0.0:
            # G / tr(G) as (G / m) / tr(G / m), m the largest diagonal entry: tr(G / m) lies in
            # [1, k]. The plain trace overflowed where every entry was finite (float32 Grams
            # of gradients scaled by 2**64 under a growing GradScaler), G / inf was 0 and
            # the weights fell to exactly 1/k, without an error.
            largest = torch.diagonal(g, dim1=-2, dim2=-1).amax(-1)[..., None, None]
            positive = largest > 0
            g = torch.where(positive, g / torch.where(positive, largest, 1.0), 0.0)
            trace = torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)[..., None, None]
            g = torch.where(positive, g / torch.where(positive, trace, 1.0), 0.0)
            g = g + self.reg_eps * torch.eye(k, dtype=g.dtype, device=g.device)
        # Row i of the right-hand side is G u_i with u_i = pref_i e_i.
        rhs = pref.unsqueeze(-1) * g
        dual = ops.nonconflicting_dual(g, rhs)
        return pref + dual.sum(-2)

    def extra_repr(self) -> str:
        return f"pref_vector={self.pref_vector}, reg_eps={self.reg_eps}"


class MGDAWeighting(Weighting):
    """MGDA (Desideri, 2012; Sener & Koltun, 2018): the min-norm point of the convex hull of the
    task gradients, ``w = argmin_{w in simplex} w^T G w`` (see :func:`min_norm_simplex`).

    Args:
        iterations: fixed budget of projected-gradient steps before the exact polish.
    """

    max_tasks = MAX_SOLVER_K

    def __init__(self, iterations: int = 200) -> None:
        super().__init__()
        # NaN passed `iterations < 1` and reached range() only on the paths that iterate.
        self.iterations = check_int("MGDAWeighting", "iterations", iterations, at_least=1)

    def forward(self, gram: torch.Tensor, /) -> torch.Tensor:
        return min_norm_simplex(gram, self.iterations)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}"
