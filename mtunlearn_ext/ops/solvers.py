"""Coefficient-space solvers: the tiny ``k x k`` problems between a Gram pass and a combine pass.

They run on the tensors' device in float64 internally, with no host synchronisation on CUDA.
Their cost grows with ``k`` and, for the non-negative problems, with how many constraints
are active (measured per right-hand side, one CPU core): at ``k = 16`` under 0.2 ms for
every solver; at ``k = 64`` ``ridge_solve`` and ``pcgrad_weights`` ~0.2 ms,
``nonconflicting_dual`` 0.1 ms for random rows and 10 ms for 64 rows clustered around one
direction (most constraints active); at ``k = 256`` ``ridge_solve`` 3-8 ms,
``pcgrad_weights`` ~40 ms and ``nonconflicting_dual`` 0.5-8 ms for random rows but up to
1.3 s for clustered ones (its active-set sweeps; still exact to ~1e-8 against SciPy's NNLS).
A singular ``G`` (more rows than their dimension, ``k > n``, or duplicated rows) is the
descent's slow case: when it has not converged after 50 sweeps and a row of ``G`` depends on
the others, the exact active-set method (whose passive set stays within ``G``'s rank ``r``
and whose Cholesky factor grows a row at a time: ``O(k r^2)``) takes over, about 1 ms per
right-hand side at ``k = 128``, ``n = 40``, 4 ms at ``k = 256`` and about 13 ms at
``k = 256``, ``n = 130`` (it used to run the whole budget, ``200 + 40 k`` sweeps, first:
0.1 s and 1 s; docs/dropin.md).

Inputs are Gram matrices as returned by :func:`mtunlearn_ext.ops.gram`; outputs keep the Gram matrix's dtype, whatever ``rhs``'s (the
accumulation dtype for a Gram from :func:`~mtunlearn_ext.ops.gram`: float32, or float64; a
float16 or bfloat16 Gram gives float16 or bfloat16 outputs, rounded from the float64 solve).

``gram`` must be symmetric, as every Gram matrix is; that is not checked (on CUDA a check
would cost a host synchronisation per call), and the solvers read entries from both triangles,
so a non-symmetric matrix gives an answer to no stated problem: symmetrise one built by other
means, ``0.5 * (g + g.mT)``, if its triangles may differ by more than rounding.

Unlike the Gram, combine and projection wrappers they take no ``check_finite``: NaN or Inf in
``gram`` or ``rhs`` propagate to the outputs (NaN, with no error), which the library's own
callers rely on. Check the inputs or outputs yourself where that matters
(``torch.isfinite(w).all()``).

Not differentiable: with inputs that require grad the outputs report ``requires_grad=True``
(torch cannot know better), and a backward pass that reaches them raises a ``RuntimeError``
naming the op: call them on detached tensors or under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch

from mtunlearn_ext._extension import has_extension
from mtunlearn_ext.ops import _reference
from mtunlearn_ext.ops._checks import (
    call_op,
    check_float_tensor,
    check_int,
    check_ridge,
    check_same_device,
    check_seed,
)
from mtunlearn_ext.ops._fake_checks import sizes

MAX_SOLVER_K = 256


def _check_gram(op: str, gram_matrix: torch.Tensor) -> int:
    check_float_tensor(op, "gram", gram_matrix, min_dim=2)
    k = gram_matrix.shape[-1]
    if gram_matrix.shape[-2] != k:
        raise ValueError(f"{op}: `gram` must be square [..., k, k], got {sizes(gram_matrix.shape)}")
    if k > MAX_SOLVER_K:
        raise ValueError(f"{op}: k={k} exceeds the solver limit of {MAX_SOLVER_K}")
    return k


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Solve ``(G + lambda I) a = rhs`` with ``lambda = ridge * trace(G) / k`` plus float64's
    smallest normal number (2.2e-308: an all-zero ``G`` stays solvable; a float64 Gram whose
    entries are near 1e-300 therefore sees it).

    Args:
        gram: ``[..., k, k]`` symmetric PSD; rhs: ``[..., k, m]``.
        ridge: relative Tikhonov term. A row whose Cholesky pivot falls below
            ``eps * (G_jj + lambda)``, its own diagonal (``eps`` = 1e-6 for a float32 Gram, the rounding level of its
            fp32 accumulation; 1e-12 for float64) depends on the previous rows and is dropped
            (coefficient 0), so a rank-deficient ``G`` (duplicated or dependent rows, more rows
            than dimensions) is solved stably, even with ``ridge=0``. The kept rows' equations
            are solved exactly; the dropped rows' hold when ``rhs`` lies in the range of ``G``,
            as ``rhs = B g^T`` of a projection always does (then ``B^T a`` is the exact
            least-squares projection), and not otherwise (``G = [[1, 1], [1, 1]]``,
            ``rhs = [1, -1]`` gives ``[1, 0]``). A ``lambda`` below the pivot floor does not
            keep a dependent row: it is dropped all the same, so the result is then not
            ``(G + lambda I)^-1 rhs``. An indefinite ``gram`` (not a Gram matrix) is outside
            the contract: its rows with a non-positive pivot are dropped as dependent.

    Returns:
        ``a``: ``[..., k, m]`` in ``gram``'s dtype. NaN/Inf in the inputs propagate (no
        ``check_finite``); not differentiable (see the module docstring).
    """
    op = "mtunlearn_ext.ops.ridge_solve"
    k = _check_gram(op, gram)
    check_float_tensor(op, "rhs", rhs, min_dim=2)
    check_same_device(op, [("gram", gram), ("rhs", rhs)])
    if rhs.shape[:-2] != gram.shape[:-2] or rhs.shape[-2] != k:
        raise ValueError(f"{op}: `rhs` must be [..., k={k}, m] with the Gram's leading dims, got "
                         f"{sizes(rhs.shape)}")
    ridge = check_ridge(op, ridge)
    if has_extension():
        return call_op(torch.ops.mtunlearn.ridge_solve, gram, rhs, float(ridge))
    return _reference.ridge_solve(gram, rhs, ridge)


def nonconflicting_dual(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``min_{w >= 0} 1/2 w^T G w + c^T w`` for every row ``c`` of ``rhs``.

    This is the dual of projecting a vector ``g`` onto the cone ``{d : <d, r_j> >= 0}`` with
    ``G = R R^T`` and ``c = R g``: the projection is ``d = g + w @ R`` (GEM, UPGrad). Solved by
    projected coordinate descent until a sweep's largest step, measured in ``d``-space
    (``|delta w_i| sqrt(G_ii)``), is at most ``1e-13 * scale``, where ``scale`` is the largest
    projection of ``g`` on a row, ``max_i |c_i| / sqrt(G_ii)``; then polished by an exact
    solve on the active set; when neither finishes (dependent rows, e.g. more rows than
    dimensions), by Lawson and Hanson's exact active-set method, which takes a row to depend on
    its active rows when its Cholesky pivot is below ``eps * G_jj``, its own diagonal (``eps`` = 1e-6 for a
    float32 Gram, 1e-14 for float64: the Gram's rounding level).

    The rows of ``rhs`` are meant to be of the projection's form ``c = R g``. For a singular
    ``G`` and any other ``c`` (not in the span of ``G``'s columns) the problem can be unbounded
    below, and the active-set method takes a row that depends on its active rows as satisfied,
    so the answer can miss the optimum: for ``c = -1`` (the min-norm point of a convex hull, as
    MGDA uses it) with 5 rows in 3 dimensions, ``w`` came out at 31 against 2448. Check such
    answers against the KKT conditions, as :func:`mtunlearn_ext.surgery.min_norm_simplex` does.

    Args:
        gram: ``[..., k, k]``; rhs: ``[..., m, k]``.

    Returns:
        ``w >= 0``: ``[..., m, k]`` in ``gram``'s dtype. NaN/Inf in the inputs propagate (no
        ``check_finite``); not differentiable (see the module docstring).
    """
    op = "mtunlearn_ext.ops.nonconflicting_dual"
    k = _check_gram(op, gram)
    check_float_tensor(op, "rhs", rhs, min_dim=2)
    check_same_device(op, [("gram", gram), ("rhs", rhs)])
    if rhs.shape[:-2] != gram.shape[:-2] or rhs.shape[-1] != k:
        raise ValueError(f"{op}: `rhs` must be [..., m, k={k}] with the Gram's leading dims, got "
                         f"{sizes(rhs.shape)}")
    if has_extension():
        return call_op(torch.ops.mtunlearn.nonconflicting_dual, gram, rhs)
    return _reference.nonconflicting_dual(gram, rhs)


def pcgrad_weights(gram: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """PCGrad in coefficient space: weights ``w`` (``[..., k]``) with PCGrad's update ``= w @ x``.

    For each task ``i`` (in order), starting from ``e_i``, and for each other task ``j`` in the
    order :func:`pcgrad_order` gives for ``(k, i, seed)``: if ``<v_i, x_j> < 0`` then
    ``v_i -= <v_i, x_j> / |x_j|^2 x_j``. Inner products come from ``G``; the update is the sum of
    the ``v_i`` (as in the PCGrad paper and LibMTL). ``seed < 0`` keeps the natural order.

    Returns ``w`` in ``gram``'s dtype. NaN/Inf in ``gram`` propagate (no ``check_finite``); not
    differentiable (see the module docstring).
    """
    op = "mtunlearn_ext.ops.pcgrad_weights"
    _check_gram(op, gram)
    if has_extension():
        return call_op(torch.ops.mtunlearn.pcgrad_weights, gram, check_seed(op, seed))
    return _reference.pcgrad_weights(gram, check_seed(op, seed))


def pcgrad_order(k: int, task: int, seed: int) -> list[int]:
    """The order in which PCGrad projects ``task`` against the other ``k - 1`` tasks for a seed
    (identical in the compiled kernels, on every device). ``k >= 1`` and ``0 <= task < k``."""
    op = "mtunlearn_ext.ops.pcgrad_order"
    # Out of range, the shuffle still ran: task=5 of k=3 gave an order of all three tasks, and
    # k=-2 an empty one, as if they were valid.
    k = check_int(op, "k", k, at_least=1)
    task = check_int(op, "task", task, at_least=0, below=k)
    return _reference.pcgrad_order(k, task, check_seed(op, seed))
