"""pytest-benchmark suites for every op of ``mtunlearn_ext.ops``, each beside the plain-PyTorch
code it replaces (same ``group``), at small sizes: the whole suite runs in well under 2 minutes.

They are not part of the test suite: ``./test.sh`` runs ``pytest tests`` and never collects this
directory, and a bare ``pytest`` that does collect it skips every benchmark unless the marker is
selected. Commands (repository root)::

    # timed, grouped by op (min / median / rounds per contender); add --benchmark-autosave to
    # keep the numbers in .benchmarks/ and --benchmark-compare to diff against the last save
    .venv/bin/python -m pytest benchmarks/test_bench_ops.py -m benchmark \\
        --benchmark-group-by=group --benchmark-columns=min,median,rounds

    # smoke run: every benchmark body once, untimed (checks that each contender still runs)
    .venv/bin/python -m pytest benchmarks/test_bench_ops.py -m benchmark --benchmark-disable

Each benchmark, ours and baselines alike, also checks its result against a float64 reference
written independently in this file (float64 products, ``numpy.linalg`` solves and least squares,
an exhaustive active-set solve of the small QPs, the KKT conditions of the non-conflicting dual,
and for PCGrad an order-aware textbook loop run in the task orders of the implementation under
test), so a fast but wrong op, or a baseline that computes something else, fails. A group only
holds contenders of the same quantity: TorchJD's ``UPGrad`` (``k`` projections, summed) is in
the ``upgrad`` group with our ``surgery.UPGrad``, not beside ``project_nonconflicting`` (one
projection), whose baseline is ``torch.mm`` + quadprog. Sizes: ``k = 8`` vectors of
``n = 2^18`` (1 MiB per fp32 row), a 24-tensor parameter list, ResNet-50's 159 parameters at four
values each (the host work of a list projection), solvers at ``k = 8`` and ``k = 64``. For the
comparison tables at realistic sizes (memory floor, TorchJD, LibMTL) see
``benchmarks/compare.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import _bench_common as bc  # noqa: F401  (sets up sys.path and requires the extension)
import numpy as np
import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from mtunlearn_ext import ops, surgery

K = 8
N = 1 << 18
LIST_SHAPES = [(256, 128, 3, 3), (256,), (256,), (512, 256), (512,), (64, 64, 3, 3)] * 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SETTINGS = {"max_time": 0.5, "min_rounds": 5, "warmup": True, "warmup_iterations": 1}

pytestmark = pytest.mark.benchmark(**SETTINGS)


@pytest.fixture(autouse=True)
def _only_when_selected(request: pytest.FixtureRequest) -> None:
    """Benchmarks run only when asked for with ``-m benchmark``."""
    if "benchmark" not in (request.config.option.markexpr or ""):
        pytest.skip("benchmarks run only with `-m benchmark` (see the module docstring)")


@pytest.fixture(scope="module", params=list(DTYPES))
def x(request: pytest.FixtureRequest) -> torch.Tensor:
    """``[K, N]`` task gradients with conflicts, fp32 or bf16."""
    return bc.task_gradients(K, N, DTYPES[request.param], seed=1)


@pytest.fixture(scope="module", params=list(DTYPES))
def stacks(request: pytest.FixtureRequest) -> list[torch.Tensor]:
    """Per-parameter stacks ``[K, *shape_p]`` of a small conv/linear parameter list."""
    return bc.task_gradient_stacks(LIST_SHAPES, K, DTYPES[request.param], seed=2)


def _gram64(x: torch.Tensor) -> torch.Tensor:
    x64 = x.reshape(x.shape[0], -1).double()
    return x64 @ x64.T


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
           baseline: bool = False) -> None:
    """Relative agreement (to the largest entry), looser for bf16 inputs (their values are
    exact, sums are fp32) and for the plain-PyTorch baselines (fp32 MKL products over a long
    dimension lose about 1e-4; bf16 ones accumulate in bf16 in places)."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if baseline:
        tol *= 10
    scale = expected.abs().max().item() or 1.0
    err = (actual.double() - expected.double()).abs().max().item() / scale
    assert err <= tol, f"relative error {err:.2e} > {tol}"


def _solver_problem(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``k x k`` Gram matrix of conflicting gradients and ``c = R g`` for one more gradient."""
    x = _solver_rows(k)
    return ops.gram(x[1:]), ops.inner(x[:1], x[1:])


def _solver_rows(k: int) -> torch.Tensor:
    """The ``k + 1`` gradients behind :func:`_solver_problem` (``g`` first)."""
    return bc.task_gradients(k + 1, 4096, torch.float32, seed=3)


# -- float64 references, written here independently of the code under test ----------------------


def _pcgrad_textbook64(x: torch.Tensor, orders: Sequence[Sequence[int]]) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1) on float64 copies of the rows of ``x``: for each task
    ``i``, ``v <- g_i``; for ``j`` in ``orders[i]``: if ``<v, g_j> < 0``,
    ``v <- v - <v, g_j> / |g_j|^2 g_j``; the update is the sum of the ``v``. PCGrad's result
    depends on the order, so the caller passes the orders of the implementation it checks."""
    rows = x.reshape(x.shape[0], -1).double()
    total = torch.zeros_like(rows[0])
    for i, order in enumerate(orders):
        v = rows[i].clone()
        for j in order:
            dot = torch.dot(v, rows[j])
            if dot < 0:
                v -= dot / torch.dot(rows[j], rows[j]) * rows[j]
        total += v
    return total


def _torchjd_orders(k: int, seed: int) -> list[list[int]]:
    """The orders TorchJD's PCGrad draws after ``torch.manual_seed(seed)``: one
    ``torch.randperm(k)`` per task, in task order, the task itself skipped."""
    torch.manual_seed(seed)
    return [[j for j in torch.randperm(k).tolist() if j != i] for i in range(k)]


def _nonneg_qp64(gram: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} w^T G w / 2 + c^T w`` (``G`` positive definite) by exhaustive active
    sets: for every support ``S`` solve ``G_SS w_S = -c_S``; among the nonnegative solutions the
    one of least objective is the minimiser (the optimum is the solution on its own support).
    ``2^k`` small solves: for ``k <= 12`` only."""
    k = len(c)
    best, best_obj = np.zeros(k), 0.0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            w_s = np.linalg.solve(gram[np.ix_(idx, idx)], -c[idx])
            if (w_s < 0).any():
                continue
            w = np.zeros(k)
            w[idx] = w_s
            obj = 0.5 * w @ gram @ w + c @ w
            if obj < best_obj:
                best, best_obj = w, obj
    return best


def _nonconflicting64(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``g`` projected onto the dual cone of the rows of ``r`` (``{d: <d, r_j> >= 0}``):
    ``d = g + w^T R`` with ``w`` the non-negative dual (:func:`_nonneg_qp64`), in float64."""
    g64, r64 = g.reshape(1, -1).double().numpy(), r.reshape(r.shape[0], -1).double().numpy()
    w = _nonneg_qp64(r64 @ r64.T, (r64 @ g64.T)[:, 0])
    return torch.from_numpy(g64 + w[None] @ r64)


def _upgrad64(x: torch.Tensor) -> torch.Tensor:
    """UPGrad (Quinton & Rey 2024) with preferences ``1/k``, in float64: each ``g_i / k``
    projected onto the dual cone of all rows (:func:`_nonconflicting64`), summed."""
    rows = x.reshape(x.shape[0], -1).double()
    k = rows.shape[0]
    return sum((_nonconflicting64(rows[i:i + 1] / k, rows)[0] for i in range(k)),
               torch.zeros_like(rows[0]))


def _project_out64(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``g`` minus its orthogonal projection onto the span of the rows of ``basis``, in float64
    (``numpy.linalg.lstsq``; exact, no ridge)."""
    g64 = g.reshape(1, -1).double().numpy()
    b64 = basis.reshape(basis.shape[0], -1).double().numpy()
    coeffs = np.linalg.lstsq(b64.T, g64.T, rcond=None)[0]
    return torch.from_numpy(g64 - coeffs.T @ b64)


def _assert_dual_kkt(gram: torch.Tensor, c: torch.Tensor, w: torch.Tensor, rel: float) -> None:
    """KKT conditions of ``min_{w >= 0} w^T G w / 2 + c^T w`` in float64: ``w >= 0``, slack
    ``G w + c >= 0`` and ``w_j (G w + c)_j = 0``, to ``rel`` of the problem's scale."""
    g64, c64, w64 = gram.double(), c.reshape(-1).double(), w.reshape(-1).double()
    slack = g64 @ w64 + c64
    scale = max(g64.diagonal().max().item(), c64.abs().max().item())
    wscale = max(w64.abs().max().item(), 1.0)
    assert w64.min().item() >= -rel * wscale, f"negative weight {w64.min().item():.2e}"
    assert slack.min().item() >= -rel * scale, f"conflict left: slack {slack.min().item():.2e}"
    assert (w64 * slack).abs().max().item() <= rel * scale * wscale, "not complementary"


# -- Gram and inner products -----------------------------------------------------------------------


@pytest.mark.benchmark(group="gram")
def test_gram(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    result = benchmark(ops.gram, x)
    _close(result, _gram64(x), x.dtype)


@pytest.mark.benchmark(group="gram")
def test_gram_torch_mm(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    result = benchmark(lambda: torch.mm(x, x.T))
    _close(result.float(), _gram64(x), x.dtype, baseline=True)


@pytest.mark.benchmark(group="gram_list")
def test_gram_list(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    result = benchmark(ops.gram_list, stacks)
    _close(result, _gram64(bc.flat_cat(stacks)), stacks[0].dtype)


@pytest.mark.benchmark(group="gram_list")
def test_gram_list_per_tensor(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    result = benchmark(lambda: ops.gram_list(stacks, per_tensor=True))
    assert result.shape == (len(stacks), K, K)
    _close(result.sum(0), _gram64(bc.flat_cat(stacks)), stacks[0].dtype)


@pytest.mark.benchmark(group="gram_list")
def test_gram_list_torch_cat_mm(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    def cat_mm() -> torch.Tensor:
        j = bc.flat_cat(stacks)
        return j @ j.T

    result = benchmark(cat_mm)
    _close(result.float(), _gram64(bc.flat_cat(stacks)), stacks[0].dtype, baseline=True)


@pytest.mark.benchmark(group="inner")
def test_inner(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    a, b = x[:2], x[2:]
    result = benchmark(ops.inner, a, b)
    _close(result, a.double() @ b.double().T, x.dtype)


@pytest.mark.benchmark(group="inner")
def test_inner_torch_mm(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    a, b = x[:2], x[2:]
    result = benchmark(lambda: torch.mm(a, b.T))
    _close(result.float(), a.double() @ b.double().T, x.dtype, baseline=True)


@pytest.mark.benchmark(group="inner_list")
def test_inner_list(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    a_list, b_list = [s[:2] for s in stacks], [s[2:] for s in stacks]
    result = benchmark(ops.inner_list, a_list, b_list)
    a, b = bc.flat_cat(a_list).double(), bc.flat_cat(b_list).double()
    _close(result, a @ b.T, stacks[0].dtype)


@pytest.mark.benchmark(group="inner_list")
def test_inner_list_torch_cat_mm(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    a_list, b_list = [s[:2] for s in stacks], [s[2:] for s in stacks]
    result = benchmark(lambda: bc.flat_cat(a_list) @ bc.flat_cat(b_list).T)
    a, b = bc.flat_cat(a_list).double(), bc.flat_cat(b_list).double()
    _close(result.float(), a @ b.T, stacks[0].dtype, baseline=True)


# Many rows (the instance memory's Gram update: 32 new per-sample rows against 192 remembered
# ones, 24 parameters of 4718 values), per CPU kernel variant this machine runs from AVX2 up
# (the AVX-512 grids give the AVX2 bits), beside MKL on flat copies.
MEMORY_ISAS = list(ops.CPU_ISAS[1:ops.CPU_ISAS.index(ops.cpu_isa()["detected"]) + 1])


@pytest.fixture(scope="module")
def memory_rows() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    new = [torch.randn(32, 4718, generator=gen) for _ in range(24)]
    kept = [torch.randn(192, 4718, generator=gen) for _ in range(24)]
    return new, kept


@pytest.mark.benchmark(group="inner_list_many_rows")
@pytest.mark.parametrize("isa", MEMORY_ISAS)
def test_inner_list_many_rows(benchmark: BenchmarkFixture, isa: str,
                              memory_rows: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    new, kept = memory_rows
    with ops.cpu_isa_limit(isa):
        result = benchmark(ops.inner_list, new, kept)
    _close(result, bc.flat_cat(new).double() @ bc.flat_cat(kept).double().T, torch.float32)


@pytest.mark.benchmark(group="inner_list_many_rows")
def test_inner_list_many_rows_torch_cat_mm(
        benchmark: BenchmarkFixture,
        memory_rows: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    new, kept = memory_rows
    result = benchmark(lambda: bc.flat_cat(new) @ bc.flat_cat(kept).T)
    _close(result, bc.flat_cat(new).double() @ bc.flat_cat(kept).double().T, torch.float32,
           baseline=True)


@pytest.mark.benchmark(group="gram_list_stacked")
def test_gram_list_stacked(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    g_list, r_list = [s[:1] for s in stacks], [s[1:] for s in stacks]
    result = benchmark(ops.gram_list_stacked, g_list, r_list)
    flat = bc.flat_cat(stacks).double()
    _close(result, flat @ flat.T, stacks[0].dtype)


@pytest.mark.benchmark(group="gram_list_stacked")
def test_gram_list_stacked_two_passes(benchmark: BenchmarkFixture,
                                      stacks: list[torch.Tensor]) -> None:
    """What it replaces in a projection: ``gram_list(r)`` and ``inner_list(g, r)``."""
    g_list, r_list = [s[:1] for s in stacks], [s[1:] for s in stacks]
    gram, cross = benchmark(lambda: (ops.gram_list(r_list), ops.inner_list(g_list, r_list)))
    flat = bc.flat_cat(stacks).double()
    _close(gram, flat[1:] @ flat[1:].T, stacks[0].dtype)
    _close(cross, flat[:1] @ flat[1:].T, stacks[0].dtype)


# -- combinations ----------------------------------------------------------------------------------


@pytest.mark.benchmark(group="combine")
def test_combine(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    coeffs = torch.linspace(0.5, 1.5, K)[None]
    result = benchmark(ops.combine, coeffs, x)
    _close(result, coeffs.double() @ x.double(), x.dtype)


@pytest.mark.benchmark(group="combine")
def test_combine_inplace_beta(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    coeffs = torch.linspace(0.5, 1.5, K)[None]
    out = torch.zeros(1, N, dtype=x.dtype)
    benchmark(lambda: ops.combine(coeffs, x, out=out, beta=0.0))
    _close(out, coeffs.double() @ x.double(), x.dtype)


@pytest.mark.benchmark(group="combine")
def test_combine_torch_mm(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    coeffs = torch.linspace(0.5, 1.5, K)[None]
    cx = coeffs.to(x.dtype)
    result = benchmark(lambda: torch.mm(cx, x))
    _close(result.float(), coeffs.double() @ x.double(), x.dtype, baseline=True)


@pytest.mark.benchmark(group="combine_list")
def test_combine_list(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    weights = torch.linspace(0.5, 1.5, K)
    outs = [torch.zeros(s.shape[1:], dtype=s.dtype) for s in stacks]
    benchmark(lambda: ops.combine_list(weights, stacks, outs))
    expected = weights.double() @ bc.flat_cat(stacks).double()
    _close(torch.cat([o.reshape(-1) for o in outs]), expected, stacks[0].dtype)


@pytest.mark.benchmark(group="combine_list")
def test_combine_list_per_tensor(benchmark: BenchmarkFixture, stacks: list[torch.Tensor]) -> None:
    coeffs = torch.linspace(0.5, 1.5, K).repeat(len(stacks), 1)
    outs = [torch.zeros(s.shape[1:], dtype=s.dtype) for s in stacks]
    benchmark(lambda: ops.combine_list(coeffs, stacks, outs, per_tensor=True))
    _close(torch.cat([o.reshape(-1) for o in outs]), coeffs[0].double() @ bc.flat_cat(
        stacks).double(), stacks[0].dtype)


@pytest.mark.benchmark(group="combine_list_overlap_check")
def test_combine_list_overlap_check_straddled(benchmark: BenchmarkFixture) -> None:
    """The compiled op's aliasing check where it is hardest: 16,000 one-value outputs packed
    in one buffer, each input's two rows straddling all of them (a read's extent covers every
    output). Every pair scanned in order took 1.0 s here; the sorted search, milliseconds."""
    n = 16_000
    s = torch.zeros(3 * n, dtype=torch.float64)
    xs = [s.as_strided((2, 1), (2 * n, 1), q) for q in range(n)]
    outs = [s.as_strided((1,), (1,), n + p) for p in range(n)]
    coeffs = torch.ones(2, dtype=torch.float64)
    benchmark(lambda: torch.ops.mtunlearn.combine_list_(outs, coeffs, xs, 0.0, False))
    # Every input is zero (s starts zeroed, outputs included): every output stays zero.
    assert not torch.cat(outs).any()


@pytest.mark.benchmark(group="combine_list")
def test_combine_list_torch_cat_mm_split(benchmark: BenchmarkFixture,
                                         stacks: list[torch.Tensor]) -> None:
    weights = torch.linspace(0.5, 1.5, K)
    wx = weights.to(stacks[0].dtype)
    outs = [torch.zeros(s.shape[1:], dtype=s.dtype) for s in stacks]
    benchmark(lambda: bc.split_copy_(wx @ bc.flat_cat(stacks), outs))
    expected = weights.double() @ bc.flat_cat(stacks).double()
    _close(torch.cat([o.reshape(-1) for o in outs]), expected, stacks[0].dtype, baseline=True)


# -- host work per call: a model's parameter count, four values per tensor ------------------------


@pytest.fixture(scope="module")
def tiny_stacks() -> list[torch.Tensor]:
    """ResNet-50's 159 parameters as ``[K, 4]`` stacks: the per-call cost of a list, not its
    arithmetic (``benchmarks/host_overhead.py`` prints the full table)."""
    gen = torch.Generator().manual_seed(4)
    return [torch.randn(K, 4, generator=gen) for _ in bc.MODEL_SHAPES["resnet50"]()]


@pytest.mark.benchmark(group="host_project_out_list")
def test_host_project_out_list(benchmark: BenchmarkFixture, tiny_stacks: list[torch.Tensor]
                               ) -> None:
    from mtunlearn_ext.surgery import project_out_list

    g, basis = [s[:1] for s in tiny_stacks], [s[1:] for s in tiny_stacks]
    outs = [torch.zeros(1, 4) for _ in tiny_stacks]
    benchmark(lambda: project_out_list(g, basis, outs=outs))
    _close(bc.flat_cat(outs), _project_out64(bc.flat_cat(g), bc.flat_cat(basis)), torch.float32)


@pytest.mark.benchmark(group="host_project_out_list")
def test_host_project_out_torch_cat_split(benchmark: BenchmarkFixture,
                                          tiny_stacks: list[torch.Tensor]) -> None:
    g, basis = [s[:1] for s in tiny_stacks], [s[1:] for s in tiny_stacks]
    outs = [torch.zeros(1, 4) for _ in tiny_stacks]
    eye = torch.eye(K - 1)

    def cat_solve_split() -> None:
        gf, bf = bc.flat_cat(g), bc.flat_cat(basis)
        coeffs = torch.linalg.solve(bf @ bf.T + 1e-6 * eye, bf @ gf.T)
        bc.split_copy_((gf - coeffs.T @ bf)[0], outs)

    benchmark(cat_solve_split)
    _close(bc.flat_cat(outs), _project_out64(bc.flat_cat(g), bc.flat_cat(basis)), torch.float32,
           baseline=True)


# -- solvers (k x k, independent of n) -------------------------------------------------------------


def _ridge64(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + lambda I)^{-1} rhs`` with ``lambda = ridge tr(G) / k``, ``numpy.linalg.solve`` in
    float64."""
    g64 = gram.double().numpy()
    k = g64.shape[0]
    lam = ridge * np.trace(g64) / k
    return torch.from_numpy(np.linalg.solve(g64 + lam * np.eye(k), rhs.double().numpy()))


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="ridge_solve")
def test_ridge_solve(benchmark: BenchmarkFixture, k: int) -> None:
    gram, cross = _solver_problem(k)
    rhs = cross.T.contiguous()
    a = benchmark(ops.ridge_solve, gram, rhs, 1e-6)
    _close(a, _ridge64(gram, rhs, 1e-6), torch.float32)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="ridge_solve")
def test_ridge_solve_torch_linalg(benchmark: BenchmarkFixture, k: int) -> None:
    gram, cross = _solver_problem(k)
    rhs = cross.T.contiguous()
    eye = torch.eye(k)

    def solve() -> torch.Tensor:
        return torch.linalg.solve(gram + 1e-6 * gram.diagonal().sum() / k * eye, rhs)

    a = benchmark(solve)
    _close(a, _ridge64(gram, rhs, 1e-6), torch.float32, baseline=True)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="nonconflicting_dual")
def test_nonconflicting_dual(benchmark: BenchmarkFixture, k: int) -> None:
    gram, cross = _solver_problem(k)
    w = benchmark(ops.nonconflicting_dual, gram, cross)
    assert bool((w >= 0).all())
    # KKT: the projected vector has no conflict left: G w + c >= 0 (to solver tolerance).
    _assert_dual_kkt(gram, cross, w, 1e-5)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="nonconflicting_dual")
def test_nonconflicting_dual_quadprog(benchmark: BenchmarkFixture, k: int) -> None:
    import quadprog

    gram, cross = _solver_problem(k)
    g = gram.double().numpy() + 1e-9 * float(gram.diagonal().mean()) * np.eye(k)
    c = cross[0].double().numpy()
    w = benchmark(lambda: quadprog.solve_qp(g, -c, np.eye(k), np.zeros(k))[0])
    _assert_dual_kkt(gram, cross, torch.from_numpy(w), 1e-5)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="pcgrad_weights")
def test_pcgrad_weights(benchmark: BenchmarkFixture, k: int) -> None:
    gram, _ = _solver_problem(k)
    w = benchmark(ops.pcgrad_weights, gram, 0)
    assert w.shape == (k,)
    rows = _solver_rows(k)[1:]
    expected = _pcgrad_textbook64(rows, [ops.pcgrad_order(k, i, 0) for i in range(k)])
    _close(w.double() @ rows.double(), expected, torch.float32)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="pcgrad_weights")
def test_pcgrad_weights_torchjd(benchmark: BenchmarkFixture, k: int) -> None:
    from torchjd.aggregation import PCGradWeighting

    gram, _ = _solver_problem(k)
    weighting = PCGradWeighting()
    benchmark(weighting, gram)
    # The result depends on the orders TorchJD draws: draw them again, from a known seed.
    orders = _torchjd_orders(k, seed=5)
    torch.manual_seed(5)
    w = weighting(gram)
    rows = _solver_rows(k)[1:]
    _close(w.double() @ rows.double(), _pcgrad_textbook64(rows, orders), torch.float32,
           baseline=True)


# -- whole surgery steps ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="project_out")
def test_project_out(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    g, basis = x[:1], x[1:]
    out = benchmark(ops.project_out, g, basis, 1e-6)
    residual = out.double() @ basis.double().T
    assert residual.abs().max().item() <= (2e-3 if x.dtype == torch.float32 else 5e-2) * (
        g.double().norm() * basis.double().norm(dim=1).max()).item()
    _close(out, _project_out64(g, basis), x.dtype)  # the ridge (1e-6) moves it by ~1e-6


@pytest.mark.benchmark(group="project_out")
def test_project_out_torch_qr(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    from compare import qr_project_out

    out = benchmark(qr_project_out, x[:1], x[1:])
    _close(out, _project_out64(x[:1], x[1:]), x.dtype, baseline=True)


@pytest.mark.benchmark(group="project_nonconflicting")
def test_project_nonconflicting(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    g, r = x[:1], x[1:]
    d = benchmark(ops.project_nonconflicting, g, r)
    inner = (d.double() @ r.double().T).min().item()
    assert inner >= -1e-3 * (g.double().norm() * r.double().norm(dim=1).max()).item()
    _close(d, _nonconflicting64(g, r), x.dtype)


@pytest.mark.benchmark(group="project_nonconflicting")
def test_project_nonconflicting_mm_quadprog(benchmark: BenchmarkFixture,
                                            x: torch.Tensor) -> None:
    """The same projection (one row onto the dual cone of the others) written with
    ``torch.mm`` and quadprog, GEM's recipe."""
    from compare import mm_quadprog_nonconflicting

    g, r = x[:1], x[1:]
    d = benchmark(mm_quadprog_nonconflicting, g, r)
    _close(d, _nonconflicting64(g, r), x.dtype, baseline=True)


# -- UPGrad: every row projected onto the dual cone of all rows (k projections), summed ----------


@pytest.mark.benchmark(group="upgrad")
def test_upgrad(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    out = benchmark(surgery.UPGrad(), x)
    _close(out, _upgrad64(x), x.dtype)


@pytest.mark.benchmark(group="upgrad")
def test_upgrad_torchjd(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    from torchjd.aggregation import UPGrad

    if x.dtype == torch.bfloat16:
        pytest.skip("TorchJD's UPGrad hands bfloat16 to NumPy, which has no bfloat16")
    out = benchmark(UPGrad(), x)
    # TorchJD regularises the Gram (reg_eps = 1e-4): ~2e-4 from the exact projection.
    _close(out, _upgrad64(x), x.dtype, baseline=True)


# -- PCGrad: each checked against the textbook loop in its own task orders -----------------------


@pytest.mark.benchmark(group="pcgrad")
def test_pcgrad(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    out = benchmark(ops.pcgrad, x, 0)
    orders = [ops.pcgrad_order(K, i, 0) for i in range(K)]
    _close(out, _pcgrad_textbook64(x, orders), x.dtype)


@pytest.mark.benchmark(group="pcgrad")
def test_pcgrad_torchjd(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    from torchjd.aggregation import PCGrad

    aggregator = PCGrad()
    benchmark(aggregator, x)
    orders = _torchjd_orders(K, seed=7)
    torch.manual_seed(7)
    out = aggregator(x)
    _close(out, _pcgrad_textbook64(x, orders), x.dtype, baseline=True)


@pytest.mark.benchmark(group="pcgrad")
def test_pcgrad_libmtl_style_loop(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    out = benchmark(bc.libmtl_style_pcgrad, x, 0)
    _close(out, _pcgrad_textbook64(x, bc.libmtl_orders(K, 0)), x.dtype, baseline=True)
