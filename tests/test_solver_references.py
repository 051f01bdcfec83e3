"""The coefficient-space solvers against float64 references written independently of the
library (numpy / scipy; ``mtunlearn_ext.ops._reference`` is not used as an oracle), and the
compiled reductions' independence of the thread count.

* ``ridge_solve``: ``np.linalg.solve`` of ``(G + lambda I) a = rhs`` with the documented
  ``lambda = ridge * trace(G) / k`` and the documented dropping of a row whose Cholesky pivot
  falls to ``eps * (G_jj + lambda)``, its own diagonal (``eps`` = 1e-12 for a float64 Gram,
  1e-6 below it).
* ``nonconflicting_dual``: ``scipy.optimize.nnls`` on the dual written as a least-squares
  problem through ``G = L L^T``, plus its KKT conditions (feasibility and complementary
  slackness) checked on the op's own answer.
* ``pcgrad_weights``: the textbook PCGrad loop over the vectors themselves, in the order the
  docstring names (``ops.pcgrad_order(k, i, seed)``), keeping the coefficients alongside.

The solvers read the Gram matrix as it is, solve in float64 and round the answer to the Gram's
dtype: the inputs here are exact values of each dtype (the references read the same values in
float64), so an element may be off by the output dtype's rounding plus the float64 solve's own
error. Problems are well-conditioned with ``k <= n`` so that every reference is unambiguous.
Outputs are NaN-poisoned (conftest.poisoned_outputs): an element a kernel forgets to write
shows as NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch
from unlearning_helpers import peak_allocated_bytes

from mtunlearn_ext import ops

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Machine epsilon of the output dtype: rounding a float64 answer to it is off by at most half
# of this, relative (plus the subnormal spacing near zero, see _assert_matches).
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
       torch.bfloat16: 2.0**-7}
# The float64 solves' own error on these well-conditioned problems, relative to the answer's
# largest entry.
SOLVE_TOL = 1e-10
# Relative pivot floor of the ridge solve's Cholesky (documented in ops.ridge_solve).
PIVOT_EPS = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-6,
             torch.bfloat16: 1e-6}
BATCHES: list[tuple[int, ...]] = [(), (3,), (2, 3)]


# -- inputs ----------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gram(batch: tuple[int, ...], k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A well-conditioned ``[*batch, k, k]`` Gram ``R R^T`` (``R``: ``k x (3k + 5)``), rounded
    to ``dtype``; checked positive definite with a small condition number after the rounding."""
    r = torch.randn(*batch, k, 3 * k + 5, generator=_gen(seed), dtype=torch.float64)
    g = (r @ r.mT).to(dtype)
    if k:
        eig = np.linalg.eigvalsh(g.double().numpy())
        assert eig.min() > 0.02 * eig.max(), "test setup: the Gram must be well-conditioned"
    return g


def _layouts(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The same values in other memory layouts. The gaps of the sliced view hold NaN, so an op
    that reads past the view's strides gives NaN."""
    out = [("contiguous", t), ("transposed_storage", t.mT.contiguous().mT)]
    rows, cols = t.shape[-2:]
    wide = torch.full((*t.shape[:-2], 2 * rows + 1, 2 * cols + 1), float("nan"), dtype=t.dtype)
    wide[..., 1::2, 1::2] = t
    out.append(("sliced_nan_gaps", wide[..., 1::2, 1::2]))
    if t.dim() > 2:  # batch dimensions innermost in memory
        lead = t.dim() - 2
        perm = [lead, lead + 1, *range(lead)]
        inverse = [perm.index(i) for i in range(t.dim())]
        out.append(("batch_innermost", t.permute(perm).contiguous().permute(inverse)))
    return out


def _problems(t: torch.Tensor) -> list[np.ndarray]:
    """The ``[..., a, b]`` tensor's matrices as float64 numpy arrays, in flattened batch order."""
    return list(t.double().reshape(-1, *t.shape[-2:]).numpy())


def _assert_matches(result: torch.Tensor, expected: np.ndarray, dtype: torch.dtype,
                    what: str) -> None:
    assert result.dtype == dtype, what
    got = result.double().numpy()
    assert got.shape == expected.shape, what
    assert np.isfinite(got).all(), f"{what}: NaN/Inf (an unwritten or mis-read element)"
    if not expected.size:
        return
    scale = float(np.abs(expected).max())
    bound = (ULP[dtype] * np.abs(expected) + SOLVE_TOL * scale
             + ULP[dtype] * torch.finfo(dtype).tiny)  # subnormal spacing (float16)
    excess = np.abs(got - expected) - bound
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    assert excess.max() <= 0, (f"{what}: at {worst} got {got[worst]!r}, expected "
                               f"{expected[worst]!r} (bound {bound[worst]:.3g})")


# -- ridge_solve -----------------------------------------------------------------------------------


def _ridge_reference(g: np.ndarray, rhs: np.ndarray, ridge: float, eps: float
                     ) -> tuple[np.ndarray, list[int]]:
    """``(G + lambda I) a = rhs`` with ``lambda = ridge * max(trace(G) / k, 0)`` (plus the
    smallest normal double), rows taken in order and dropped (coefficient 0) when their pivot,
    the Schur complement of the rows kept so far, is at most ``eps`` times the row's own
    diagonal ``G_jj + lambda``. Returns the
    solution and the kept rows; refuses a pivot within a factor 100 of the floor (the test's
    case would then be ambiguous)."""
    k = g.shape[0]
    lam = ridge * max(float(np.trace(g)) / k, 0.0) + np.finfo(np.float64).tiny
    system = g + lam * np.eye(k)
    kept: list[int] = []
    for j in range(k):
        floor = eps * max(float(system[j, j]), 0.0) + np.finfo(np.float64).tiny
        pivot = system[j, j]
        if kept:
            pivot -= system[j, kept] @ np.linalg.solve(system[np.ix_(kept, kept)], system[kept, j])
        assert not floor / 100 < pivot < 100 * floor, "test setup: a pivot at the floor"
        if pivot > floor:
            kept.append(j)
    a = np.zeros_like(rhs)
    if kept:
        a[kept] = np.linalg.solve(system[np.ix_(kept, kept)], rhs[kept])
    return a, kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k,m", [(1, 1), (2, 3), (5, 1), (8, 4), (33, 2), (64, 3)])
@pytest.mark.parametrize("ridge", [1e-6, 0.0, 0.1])
def test_ridge_solve_matches_numpy(dtype: torch.dtype, batch: tuple[int, ...], k: int, m: int,
                                   ridge: float, op_path: str) -> None:
    gram = _gram(batch, k, dtype, seed=100 * k + m)
    rhs = torch.randn(*batch, k, m, generator=_gen(k + 7 * m), dtype=torch.float64).to(dtype)
    expected = np.stack([_ridge_reference(g, r, ridge, PIVOT_EPS[dtype])[0]
                         for g, r in zip(_problems(gram), _problems(rhs))]
                        ).reshape(*batch, k, m)
    for g_name, g_view in _layouts(gram):
        for r_name, r_view in _layouts(rhs):
            result = ops.ridge_solve(g_view, r_view, ridge=ridge)
            _assert_matches(result, expected, dtype, f"gram {g_name}, rhs {r_name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_ridge_solve_drops_dependent_rows_by_the_documented_rule(dtype: torch.dtype,
                                                                 ridge: float) -> None:
    """Small-integer rows (an exact Gram in every dtype), one a duplicate and one the sum of two
    others. ``ridge=0``: their pivots are rounding-level, so they are dropped (coefficient 0) and
    the rest is the exact solve on the kept rows. ``ridge=1e-3``: every pivot is at least
    ``lambda``, far above the floor, so nothing is dropped."""
    base = torch.randint(-2, 3, (5, 12), generator=_gen(5), dtype=torch.int64)
    rows = torch.cat([base[:2], base[1:2], base[2:], base[2:3] + base[3:4]]).double()  # k = 7
    gram64 = rows @ rows.T
    gram = gram64.to(dtype)
    assert torch.equal(gram.double(), gram64), "test setup: the Gram must be exact in the dtype"
    rhs = torch.randn(2, 7, 3, generator=_gen(6), dtype=torch.float64).to(dtype)
    gram_b = gram.expand(2, 7, 7)
    expected = []
    for r in _problems(rhs):
        a, kept = _ridge_reference(gram64.numpy(), r, ridge, PIVOT_EPS[dtype])
        assert kept == ([0, 1, 3, 4, 5] if ridge == 0.0 else list(range(7)))
        expected.append(a)
    result = ops.ridge_solve(gram_b, rhs, ridge=ridge)
    _assert_matches(result, np.stack(expected), dtype, f"ridge={ridge}")
    if ridge == 0.0:
        assert bool((result[:, 2] == 0).all()) and bool((result[:, 6] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_rounding_level_pivot_is_dropped_in_each_dtype(dtype: torch.dtype) -> None:
    """Mutation review: the dependence floor (1e-6 of the row's own diagonal in fp32, 1e-12 in
    fp64) was pinned by exact integer Grams only, whose pivots are exactly 0, so any floor
    passed; lowered to 1e-12 in fp32 it kept a row at rounding level and multiplied its noise
    ~1400x into the coefficients. Here row 1 is row 0 / 9 but for the last bits of its
    diagonal (its pivot ~7e-9 of the diagonal in fp32, ~4e-15 in fp64: 100x below the floor
    and 100x above a floor lowered to fp64's): dropped, coefficient exactly 0, and row 0 solved
    alone."""
    ninth = torch.tensor(1.0 / 9.0, dtype=dtype).item()  # 1/9 rounded to the dtype
    if dtype == torch.float64:
        ninth += 2.0 ** -51  # fp64 rounds 1/9 - 1/9 to 0: an exact zero pivot is tested above
    gram64 = np.array([[9.0, 1.0], [1.0, ninth]])
    gram = torch.tensor(gram64, dtype=dtype)
    assert np.array_equal(gram.double().numpy(), gram64), "test setup: exact in the dtype"
    rhs = torch.tensor([[1.5, -2.0], [0.25, 4.0]], dtype=dtype)
    expected, kept = _ridge_reference(gram64, rhs.double().numpy(), 0.0, PIVOT_EPS[dtype])
    assert kept == [0]
    result = ops.ridge_solve(gram, rhs, ridge=0.0)
    _assert_matches(result, expected, dtype, "rounding-level pivot")
    assert bool((result[1] == 0).all()), result


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_small_independent_row_is_projected_not_dropped(dtype: torch.dtype) -> None:
    """Review: the dependence floor was relative to the *largest* diagonal, so an independent
    row merely shorter than another (a task gradient 2000x shorter, in fp32; 2e6x in fp64) was
    dropped as dependent and ``project_out(ridge=0)`` left its direction in full (``[0, 1]``
    instead of ``[0, 0]``). The floor is now the row's own: such a row is kept, and exactly."""
    scale = 2.0 ** -11 if dtype == torch.float32 else 2.0 ** -21
    basis = torch.zeros(2, 6, dtype=dtype)
    basis[0, 0], basis[1, 1] = 1.0, scale
    g = torch.zeros(1, 6, dtype=dtype)
    g[0, :3] = 1.0
    out = ops.project_out(g, basis, ridge=0.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]], dtype=dtype),
                               rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14)
    coeffs = ops.ridge_solve(ops.gram(basis), ops.inner(basis, g), ridge=0.0)
    torch.testing.assert_close(coeffs.double().flatten(), torch.tensor([1.0, 1.0 / scale],
                               dtype=torch.float64), rtol=1e-6, atol=0)


def test_nonconflicting_projection_with_rows_of_very_different_norms_in_fp32() -> None:
    """Review: more rows than dimensions in fp32 with row norms spread over 1e-2..1e2: the
    active set took the short rows (diagonals 1e-8 of the largest) for dependent and the
    projection was off SciPy's NNLS by up to 2.5e-2 |g|, violating their constraints by
    1.1e-2 |g|, while an exact solve of the op's own fp32 Gram was 2.4e-7 off. With the
    dependence floor relative to each row's own diagonal: within 1e-3 |g| (measured 4e-5 at
    most over these problems)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(150):
        k, n = int(rng.integers(8, 30)), int(rng.integers(2, 20))
        rows = rng.standard_normal((k, n)) * np.logspace(-2, 2, k)[:, None]
        g = (-rows.sum(0) / np.linalg.norm(rows, axis=1).sum() * np.linalg.norm(rows, axis=1).mean()
             + 0.3 * rng.standard_normal(n))
        w, _ = scipy.optimize.nnls(rows.T, -g, maxiter=5000)
        expected = g + w @ rows
        r32, g32 = torch.from_numpy(rows).float(), torch.from_numpy(g).float()
        got = ops.project_nonconflicting(g32[None], r32)[0].double().numpy()
        worst = max(worst, float(np.linalg.norm(got - expected) / np.linalg.norm(g)))
    assert worst < 1e-3, worst


# -- nonconflicting_dual ---------------------------------------------------------------------------


def _dual_reference(g: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``min_{w >= 0} 1/2 w^T G w + c^T w`` for each row of ``c`` as the NNLS problem
    ``min_{w >= 0} |L^T w + L^-1 c|^2`` (``G = L L^T``; equal up to a constant), by SciPy."""
    if g.shape[0] == 0:
        return np.zeros_like(c)
    low = np.linalg.cholesky(g)
    targets = -scipy.linalg.solve_triangular(low, c.T, lower=True)  # [k, m]
    return np.stack([scipy.optimize.nnls(low.T, targets[:, i], maxiter=100 * g.shape[0])[0]
                     for i in range(c.shape[0])]) if c.shape[0] else np.zeros_like(c)


def _assert_kkt(w: np.ndarray, g: np.ndarray, c: np.ndarray, dtype: torch.dtype,
                what: str) -> None:
    """KKT conditions of the dual on the op's answer: ``w >= 0``, the gradient ``G w + c`` (the
    projection's inner products ``<d, r_j>``) ``>= 0`` (feasibility) and ``= 0`` wherever
    ``w > 0`` (complementary slackness), up to the rounding of ``w`` to ``dtype``."""
    assert (w >= 0).all(), f"{what}: negative multiplier"
    grad = w @ g + c  # g symmetric: row i is (G w_i + c_i)
    tol = (2 * ULP[dtype] + SOLVE_TOL) * (np.abs(w) @ np.abs(g) + np.abs(c)).max(-1, keepdims=True)
    assert (grad >= -tol).all(), f"{what}: infeasible, min gradient {grad.min()!r}"
    slack = np.where(w > 0, np.abs(grad), 0.0)
    assert (slack <= tol).all(), f"{what}: complementary slackness off by {slack.max()!r}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k,m", [(1, 1), (2, 3), (5, 2), (8, 4), (33, 2), (64, 2)])
def test_nonconflicting_dual_matches_scipy_nnls(dtype: torch.dtype, batch: tuple[int, ...],
                                                k: int, m: int, op_path: str) -> None:
    gram = _gram(batch, k, dtype, seed=200 * k + m)
    # c_j / |r_j| standard normal: about half of the constraints conflict.
    scale = torch.diagonal(gram.double(), dim1=-2, dim2=-1).sqrt().unsqueeze(-2)
    rhs = (torch.randn(*batch, m, k, generator=_gen(3 * k + m), dtype=torch.float64)
           * scale).to(dtype)
    grams, rhss = _problems(gram), _problems(rhs)
    expected = np.stack([_dual_reference(g, c) for g, c in zip(grams, rhss)]).reshape(*batch, m, k)
    # Discriminating: some multipliers positive, some zero (k > 1).
    assert (expected > 0).any() and (k == 1 or (expected == 0).any())
    for g_name, g_view in _layouts(gram):
        for r_name, r_view in _layouts(rhs):
            what = f"gram {g_name}, rhs {r_name}"
            result = ops.nonconflicting_dual(g_view, r_view)
            _assert_matches(result, expected, dtype, what)
            w = result.double().reshape(-1, m, k).numpy()
            for b, (g, c) in enumerate(zip(grams, rhss)):
                _assert_kkt(w[b], g, c, dtype, f"{what}, problem {b}")


@pytest.mark.parametrize("gram_dtype,rhs_dtype", [(torch.float32, torch.float64),
                                                   (torch.float64, torch.float32),
                                                   (torch.bfloat16, torch.float32)])
def test_solvers_take_an_rhs_of_another_dtype(gram_dtype: torch.dtype, rhs_dtype: torch.dtype,
                                              op_path: str) -> None:
    """docs/api.md: the solvers' ``rhs`` may be of another dtype than the Gram; they solve in
    float64 and return the Gram's dtype (test review: only a CUDA test, against the same op on
    the CPU, had mixed dtypes)."""
    k, m = 6, 3
    gram = _gram((2,), k, gram_dtype, seed=77)
    rhs = torch.randn(2, k, m, generator=_gen(78), dtype=torch.float64).to(rhs_dtype)
    expected = np.stack([_ridge_reference(g, r, 1e-6, PIVOT_EPS[gram_dtype])[0]
                         for g, r in zip(_problems(gram), _problems(rhs))]).reshape(2, k, m)
    result = ops.ridge_solve(gram, rhs, ridge=1e-6)
    assert result.dtype == gram_dtype
    _assert_matches(result, expected, gram_dtype, "ridge_solve")
    scale = torch.diagonal(gram.double(), dim1=-2, dim2=-1).sqrt().unsqueeze(-2)
    c = (torch.randn(2, m, k, generator=_gen(79), dtype=torch.float64) * scale).to(rhs_dtype)
    expected = np.stack([_dual_reference(g, x) for g, x in zip(_problems(gram), _problems(c))]
                        ).reshape(2, m, k)
    result = ops.nonconflicting_dual(gram, c)
    assert result.dtype == gram_dtype
    _assert_matches(result, expected, gram_dtype, "nonconflicting_dual")


def test_nonconflicting_dual_leaves_nonconflicting_rows_at_zero() -> None:
    """``c >= 0`` (no conflict with any constraint): ``w = 0`` exactly, so that ``d = g``."""
    gram = _gram((), 6, torch.float64, seed=9)
    rhs = torch.rand(3, 6, generator=_gen(10), dtype=torch.float64)
    assert torch.equal(ops.nonconflicting_dual(gram, rhs), torch.zeros(3, 6, dtype=torch.float64))


# -- pcgrad_weights --------------------------------------------------------------------------------


def _pcgrad_reference(x: np.ndarray, seed: int,
                      order: Callable[[int, int, int], list[int]] = ops.pcgrad_order
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The textbook loop over the vectors ``x`` (``[k, n]``): for each task ``i``, ``g = x_i``
    and, for each ``j`` in ``order(k, i, seed)``, ``g -= <g, x_j> / |x_j|^2 x_j`` if
    ``<g, x_j> < 0``; the update is the sum of the ``g``. Returns the update and the coefficients
    ``w`` (``update = w @ x``) tracked alongside."""
    k = x.shape[0]
    update = np.zeros(x.shape[1])
    weights = np.zeros(k)
    for i in range(k):
        g = x[i].copy()
        coeff = np.zeros(k)
        coeff[i] = 1.0
        for j in order(k, i, seed):
            dot = float(g @ x[j])
            norm2 = float(x[j] @ x[j])
            if dot < 0 and norm2 > 0:
                g -= dot / norm2 * x[j]
                coeff[j] -= dot / norm2
        update += g
        weights += coeff
    return update, weights


def _int_rows(batch: tuple[int, ...], k: int, seed: int, zero_row: bool = False) -> torch.Tensor:
    """``[*batch, k, 3k + 5]`` rows with entries in {-1, 0, 1}: their Gram is exact in every
    dtype (integers of at most 3k + 5 <= 256), so the vectors and the Gram the op reads agree."""
    x = torch.randint(-1, 2, (*batch, k, 3 * k + 5), generator=_gen(seed)).double()
    if zero_row and k > 1:
        x[..., 1, :] = 0  # |x_j| = 0: never projected on
    return x


def _natural(k: int, i: int, seed: int) -> list[int]:
    return [j for j in range(k) if j != i]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 17])
@pytest.mark.parametrize("seed", [-1, 0, 1, 12345, 2**40 + 3])
def test_pcgrad_weights_match_the_textbook_loop(dtype: torch.dtype, batch: tuple[int, ...],
                                                k: int, seed: int, op_path: str) -> None:
    x = _int_rows(batch, k, seed=k + 10 * len(batch) + (seed % 1000), zero_row=k == 5)
    gram64 = x @ x.mT
    gram = gram64.to(dtype)
    assert torch.equal(gram.double(), gram64), "test setup: the Gram must be exact in the dtype"
    refs = [_pcgrad_reference(v, seed) for v in _problems(x)]
    expected = np.stack([w for _, w in refs]).reshape(*batch, k)
    for name, view in _layouts(gram):
        result = ops.pcgrad_weights(view, seed=seed)
        _assert_matches(result, expected, dtype, f"gram {name}")
        if dtype == torch.float64:  # the weights reproduce the textbook update itself
            update = (result.unsqueeze(-2) @ x).squeeze(-2).reshape(-1, x.shape[-1]).numpy()
            for b, (ref_update, _) in enumerate(refs):
                np.testing.assert_allclose(update[b], ref_update, rtol=0,
                                           atol=1e-10 * (1 + np.abs(ref_update).max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pcgrad_weights_follow_the_seeded_order(dtype: torch.dtype) -> None:
    """A case where the order matters: the seeded orders' answer differs from the natural
    order's, and the op gives the seeded one (a seed-blind kernel fails here)."""
    k = 8
    x = _int_rows((2,), k, seed=77)
    x[..., 1:, :] -= x[..., :1, :]  # conflicts with the first task (entries in -2..2)
    gram64 = x @ x.mT
    gram = gram64.to(dtype)
    assert torch.equal(gram.double(), gram64)
    for seed in (0, 1, 99):
        assert any(ops.pcgrad_order(k, i, seed) != _natural(k, i, seed) for i in range(k))
        seeded = np.stack([_pcgrad_reference(v, seed)[1] for v in _problems(x)])
        natural = np.stack([_pcgrad_reference(v, seed, _natural)[1] for v in _problems(x)])
        assert np.abs(seeded - natural).max() > 1e-2 * np.abs(seeded).max(), "not discriminating"
        _assert_matches(ops.pcgrad_weights(gram, seed=seed), seeded, dtype, f"seed {seed}")
        # seed < 0 is the natural order
        _assert_matches(ops.pcgrad_weights(gram, seed=-1 - seed), natural, dtype,
                        f"seed {-1 - seed}")


def test_pcgrad_order_is_a_permutation_of_the_other_tasks() -> None:
    for k in (1, 2, 5, 17):
        for seed in (-5, -1, 0, 3, 2**63 - 1):
            for i in range(k):
                order = ops.pcgrad_order(k, i, seed)
                assert sorted(order) == _natural(k, i, seed)
                if seed < 0:
                    assert order == _natural(k, i, seed)


# -- empty problems --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_solvers_on_empty_problems(dtype: torch.dtype) -> None:
    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype)

    gram3 = _gram((), 3, dtype, seed=1)
    cases: list[tuple[torch.Tensor, tuple[int, ...]]] = [
        # k = 0
        (ops.ridge_solve(empty(0, 0), empty(0, 4)), (0, 4)),
        (ops.ridge_solve(empty(2, 0, 0), empty(2, 0, 4)), (2, 0, 4)),
        (ops.nonconflicting_dual(empty(0, 0), empty(4, 0)), (4, 0)),
        (ops.nonconflicting_dual(empty(2, 0, 0), empty(2, 4, 0)), (2, 4, 0)),
        (ops.pcgrad_weights(empty(0, 0)), (0,)),
        (ops.pcgrad_weights(empty(2, 0, 0)), (2, 0)),
        # m = 0
        (ops.ridge_solve(gram3, empty(3, 0)), (3, 0)),
        (ops.nonconflicting_dual(gram3, empty(0, 3)), (0, 3)),
        # an empty batch
        (ops.ridge_solve(empty(0, 3, 3), empty(0, 3, 2)), (0, 3, 2)),
        (ops.nonconflicting_dual(empty(0, 3, 3), empty(0, 2, 3)), (0, 2, 3)),
        (ops.pcgrad_weights(empty(0, 3, 3)), (0, 3)),
    ]
    for i, (result, shape) in enumerate(cases):
        assert tuple(result.shape) == shape and result.dtype == dtype, i
    # k = 1: a single task is never projected.
    assert ops.pcgrad_weights(gram3[:1, :1]).tolist() == [1.0]


# -- thread count ----------------------------------------------------------------------------------


def _results(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each op on inputs split into several work items: the Gram reductions' items are at least
    4096 columns, up to 1024 of them; the combine's 16384 columns."""
    x = torch.randn(24, 70_001, generator=_gen(1), dtype=torch.float64).to(dtype)
    batched = torch.randn(2, 5, 30_000, generator=_gen(2), dtype=torch.float64).to(dtype)
    parts = [torch.randn(24, 300, 100, generator=_gen(3), dtype=torch.float64).to(dtype),
             torch.randn(24, 40_001, generator=_gen(4), dtype=torch.float64).to(dtype)]
    g = torch.randn(2, 70_001, generator=_gen(5), dtype=torch.float64).to(dtype)
    coeffs = torch.randn(3, 24, generator=_gen(6), dtype=torch.float64).to(dtype)
    out = torch.randn(3, 70_001, generator=_gen(7), dtype=torch.float64).to(dtype)
    projected, coeffs_out = ops.project_out(g, x, return_coeffs=True)
    return {
        "gram": ops.gram(x),
        "gram_batched": ops.gram(batched),
        "gram_list": ops.gram_list(parts),
        "gram_list_per_tensor": ops.gram_list(parts, per_tensor=True),
        "inner": ops.inner(g, x),
        "combine": ops.combine(coeffs, x),
        "combine_beta": ops.combine(coeffs, x, out=out, beta=0.5),
        "project_out": projected,
        "project_out_coeffs": coeffs_out,
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_results_are_the_same_bits_for_any_thread_count(dtype: torch.dtype) -> None:
    """Documented: the work split depends on the problem, never on the thread count, and the
    partial sums are reduced in a fixed order."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if torch.get_num_threads() != 2:
            pytest.skip("this torch build runs one intra-op thread only")
        two = _results(dtype)
        torch.set_num_threads(1)
        one = _results(dtype)
    finally:
        torch.set_num_threads(previous)
    for name in one:
        assert bool(torch.isfinite(one[name]).all()), name
        assert torch.equal(one[name], two[name]), f"{name}: depends on the thread count"


@pytest.mark.parametrize("solver", ["ridge_solve", "nonconflicting_dual", "pcgrad_weights"])
def test_float64_solvers_allocate_only_their_answer(solver: str) -> None:
    """Review: the CPU solvers always solved into a float64 buffer and copied it out, so a
    float64 call held its answer twice (a [64, 6, 5000] ridge_solve: 30,720,000 bytes at
    peak, the answer 15,360,000). A float64 answer is now written in place; other dtypes still
    round from a float64 buffer."""
    generator = torch.Generator().manual_seed(5)
    g = torch.randn(16, 6, 40, dtype=torch.float64, generator=generator)
    gram = g @ g.mT
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "ridge_solve": lambda: ops.ridge_solve(
            gram, torch.randn(16, 6, 4000, dtype=torch.float64, generator=generator)),
        "nonconflicting_dual": lambda: ops.nonconflicting_dual(
            gram, torch.randn(16, 4000, 6, dtype=torch.float64, generator=generator)),
        "pcgrad_weights": lambda: ops.pcgrad_weights(gram),
    }
    call = calls[solver]
    answer = call()
    inputs = answer.nbytes if solver != "pcgrad_weights" else 0  # the rhs, made in the call
    peak = peak_allocated_bytes(call)
    assert peak == inputs + answer.nbytes, f"{peak} bytes at peak, answer {answer.nbytes}"
