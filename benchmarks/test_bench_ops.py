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

Each benchmark also checks its result against the float64 / plain-PyTorch value, so a fast but
wrong op fails. Sizes: ``k = 8`` vectors of ``n = 2^18`` (1 MiB per fp32 row), a 24-tensor
parameter list, ResNet-50's 159 parameters at four values each (the host work of a list
projection), solvers at ``k = 8`` and ``k = 64``. For the comparison tables at realistic sizes
(memory floor, TorchJD, LibMTL) see ``benchmarks/compare.py``.
"""

from __future__ import annotations

import math

import _bench_common as bc  # noqa: F401  (sets up sys.path and requires the extension)
import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from mtunlearn_ext import ops

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
    x = bc.task_gradients(k + 1, 4096, torch.float32, seed=3)
    return ops.gram(x[1:]), ops.inner(x[:1], x[1:])


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
    expected = ops.project_out(bc.flat_cat(g).double(), bc.flat_cat(basis).double())
    _close(bc.flat_cat(outs), expected, torch.float32)


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
    expected = ops.project_out(bc.flat_cat(g).double(), bc.flat_cat(basis).double())
    _close(bc.flat_cat(outs), expected, torch.float32, baseline=True)


# -- solvers (k x k, independent of n) -------------------------------------------------------------


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="ridge_solve")
def test_ridge_solve(benchmark: BenchmarkFixture, k: int) -> None:
    gram, cross = _solver_problem(k)
    rhs = cross.T.contiguous()
    a = benchmark(ops.ridge_solve, gram, rhs, 1e-6)
    lam = 1e-6 * gram.diagonal().sum().double() / k
    expected = torch.linalg.solve(gram.double() + lam * torch.eye(k, dtype=torch.float64),
                                  rhs.double())
    _close(a, expected, torch.float32)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="ridge_solve")
def test_ridge_solve_torch_linalg(benchmark: BenchmarkFixture, k: int) -> None:
    gram, cross = _solver_problem(k)
    rhs = cross.T.contiguous()
    eye = torch.eye(k)

    def solve() -> torch.Tensor:
        return torch.linalg.solve(gram + 1e-6 * gram.diagonal().sum() / k * eye, rhs)

    benchmark(solve)


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="nonconflicting_dual")
def test_nonconflicting_dual(benchmark: BenchmarkFixture, k: int) -> None:
    gram, cross = _solver_problem(k)
    w = benchmark(ops.nonconflicting_dual, gram, cross)
    assert bool((w >= 0).all())
    # KKT: the projected vector has no conflict left: G w + c >= 0 (to solver tolerance).
    slack = gram.double() @ w[0].double() + cross[0].double()
    assert slack.min().item() >= -1e-5 * gram.diagonal().max().item()


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="nonconflicting_dual")
def test_nonconflicting_dual_quadprog(benchmark: BenchmarkFixture, k: int) -> None:
    import numpy as np
    import quadprog

    gram, cross = _solver_problem(k)
    g = gram.double().numpy() + 1e-9 * float(gram.diagonal().mean()) * np.eye(k)
    c = cross[0].double().numpy()
    benchmark(lambda: quadprog.solve_qp(g, -c, np.eye(k), np.zeros(k))[0])


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="pcgrad_weights")
def test_pcgrad_weights(benchmark: BenchmarkFixture, k: int) -> None:
    gram, _ = _solver_problem(k)
    w = benchmark(ops.pcgrad_weights, gram, 0)
    assert w.shape == (k,) and bool(torch.isfinite(w).all())


@pytest.mark.parametrize("k", [8, 64])
@pytest.mark.benchmark(group="pcgrad_weights")
def test_pcgrad_weights_torchjd(benchmark: BenchmarkFixture, k: int) -> None:
    from torchjd.aggregation import PCGradWeighting

    gram, _ = _solver_problem(k)
    weighting = PCGradWeighting()
    benchmark(weighting, gram)


# -- whole surgery steps ---------------------------------------------------------------------------


@pytest.mark.benchmark(group="project_out")
def test_project_out(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    g, basis = x[:1], x[1:]
    out = benchmark(ops.project_out, g, basis, 1e-6)
    residual = out.double() @ basis.double().T
    assert residual.abs().max().item() <= (2e-3 if x.dtype == torch.float32 else 5e-2) * (
        g.double().norm() * basis.double().norm(dim=1).max()).item()


@pytest.mark.benchmark(group="project_out")
def test_project_out_torch_qr(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    from compare import qr_project_out

    benchmark(qr_project_out, x[:1], x[1:])


@pytest.mark.benchmark(group="project_nonconflicting")
def test_project_nonconflicting(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    g, r = x[:1], x[1:]
    d = benchmark(ops.project_nonconflicting, g, r)
    inner = (d.double() @ r.double().T).min().item()
    assert inner >= -1e-3 * (g.double().norm() * r.double().norm(dim=1).max()).item()


@pytest.mark.benchmark(group="project_nonconflicting")
def test_project_nonconflicting_torchjd_upgrad(benchmark: BenchmarkFixture,
                                               x: torch.Tensor) -> None:
    from torchjd.aggregation import UPGrad

    if x.dtype == torch.bfloat16:
        pytest.skip("TorchJD's UPGrad hands bfloat16 to NumPy, which has no bfloat16")
    benchmark(UPGrad(), x)


@pytest.mark.benchmark(group="pcgrad")
def test_pcgrad(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    out = benchmark(ops.pcgrad, x, 0)
    weights = ops.pcgrad_weights(_gram64(x).float(), 0).double()
    _close(out, weights @ x.double(), x.dtype)


@pytest.mark.benchmark(group="pcgrad")
def test_pcgrad_torchjd(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    from torchjd.aggregation import PCGrad

    benchmark(PCGrad(), x)


@pytest.mark.benchmark(group="pcgrad")
def test_pcgrad_libmtl_style_loop(benchmark: BenchmarkFixture, x: torch.Tensor) -> None:
    out = benchmark(bc.libmtl_style_pcgrad, x, 0)
    assert out.shape == (N,) and math.isfinite(out.float().norm().item())
