"""The layers above the ops on a CUDA device, against the same calls on the CPU.

tests/test_ops.py checks every op on CUDA against float64 references; this file checks what is
built on them: the list projections and aggregators of :mod:`mtunlearn_ext.surgery`, the
training-loop hook, the public ``unlearn`` call and the CLI, each run on CUDA and compared with
the CPU path (itself checked against references elsewhere). CI machines have no GPU, so these
tests skip there; ``benchmarks/gpu_check.py`` runs them on a GPU machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import cli
from mtunlearn_ext.surgery import (
    MGDA,
    GradientSurgery,
    Mean,
    PCGrad,
    Sum,
    UPGrad,
    aggregate_list,
    project_nonconflicting_list,
    project_out_list,
)
from test_ops import _gram_error
from unlearning_helpers import TwoHeads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CI has none; benchmarks/gpu_check.py "
                                       "runs this file on a GPU machine)")

SHAPES = [(3, 5, 7), (11,), (4, 4, 3, 3), (1,), (257,)]
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-2}


def _stacks(rows: int, seed: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, *s, generator=gen, dtype=torch.float64).to(dtype).to(device)
            for s in SHAPES]


def _assert_lists_close(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype
                        ) -> None:
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want, strict=True):
        assert g.device.type == "cuda" and g.dtype == dtype and g.shape == w.shape
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double().cpu(), w.double(), rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_layer", [False, True])
def test_list_projections_match_cpu(dtype: torch.dtype, per_layer: bool) -> None:
    g_cpu, basis_cpu = _stacks(2, 1, dtype, "cpu"), _stacks(4, 2, dtype, "cpu")
    g_gpu, basis_gpu = [t.cuda() for t in g_cpu], [t.cuda() for t in basis_cpu]
    want = project_out_list([t.double() for t in g_cpu], [t.double() for t in basis_cpu],
                            per_layer=per_layer)
    _assert_lists_close(project_out_list(g_gpu, basis_gpu, per_layer=per_layer), want, dtype)
    for sign in (1, -1):
        want = project_nonconflicting_list([t.double() for t in g_cpu],
                                           [t.double() for t in basis_cpu], sign,
                                           per_layer=per_layer)
        got = project_nonconflicting_list(g_gpu, basis_gpu, sign, per_layer=per_layer)
        _assert_lists_close(got, want, dtype)


@pytest.mark.parametrize("make", [Mean, Sum, PCGrad, UPGrad, MGDA])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aggregators_match_cpu(make: Callable[[], object], dtype: torch.dtype) -> None:
    grads_cpu = _stacks(3, 3, dtype, "cpu")
    outs_cpu = [torch.full(t.shape[1:], float("nan"), dtype=dtype) for t in grads_cpu]
    outs_gpu = [o.cuda() for o in outs_cpu]
    want = [o.double() for o in outs_cpu]
    aggregate_list(make(), [t.double() for t in grads_cpu], want)  # type: ignore[arg-type]
    aggregate_list(make(), [t.cuda() for t in grads_cpu], outs_gpu)  # type: ignore[arg-type]
    _assert_lists_close(outs_gpu, want, dtype)
    matrix = torch.cat([t.flatten(1) for t in grads_cpu], dim=1)
    got = make()(matrix.cuda())  # type: ignore[operator]
    torch.testing.assert_close(got.double().cpu(), torch.cat([w.flatten() for w in want]),
                               rtol=0, atol=TOL[dtype] * float(matrix.abs().max()))


def test_min_norm_on_the_gpu_takes_the_cpus_exact_answers() -> None:
    """MGDA's min-norm solve on a device: the QPs' answers, checked as tensors, are taken where
    they pass (after one synchronisation, or in place of the iterative budget's where a problem
    fails or no synchronisation is allowed). Badly scaled tasks (norms 1e3
    apart) and a hull holding the origin, where the budget alone was 0.2 off in norm, get the
    CPU's exact answers (the budget's min-norm point was 1.73 and 0.24 long against 1.53 and
    7e-12).

    Where the hull holds the origin (10 points in 3 dimensions) the weights are not unique: a
    6-dimensional set of them gives the point 0, and the GPU's solver, rounding differently,
    found another one than the CPU's (0.11 apart on the H200); the point is what must agree."""
    from mtunlearn_ext.surgery import min_norm_simplex

    gen = torch.Generator().manual_seed(5)
    j = torch.randn(4, 10, 30, generator=gen, dtype=torch.float64)
    j[:, 0] *= 1e3
    j[3, :, 3:] = 0  # the hull holds the origin
    gram = j @ j.mT
    want = min_norm_simplex(gram)
    got = min_norm_simplex(gram.cuda()).cpu()
    # Positive definite Grams (10 tasks in 30 dimensions): one optimum.
    torch.testing.assert_close(got[:3], want[:3], rtol=0, atol=1e-9)
    assert bool((got >= 0).all()) and torch.allclose(got.sum(-1), torch.ones(4, dtype=got.dtype))
    points = (got.unsqueeze(-2) @ j).squeeze(-2).norm(dim=-1)
    assert float(points[3]) < 1e-9, points


def _problem(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TwoHeads().to(dtype)
    x = torch.randn(200, 6, generator=gen, dtype=dtype)
    y = {"kind": torch.randint(0, 3, (200,), generator=gen),
         "size": torch.randn(200, 1, generator=gen, dtype=dtype)}
    return model, x, y


@pytest.mark.parametrize("per_task", ["autograd", "batched", "backward"])
def test_gradient_surgery_hook_matches_cpu(per_task: str) -> None:
    model, x, y = _problem(torch.float64)
    grads = {}
    for device in ("cpu", "cuda"):
        net = TwoHeads().double().to(device)
        net.load_state_dict(model.state_dict())
        surgery = GradientSurgery(net.trunk.named_parameters(), UPGrad(),
                                  per_task=per_task)  # type: ignore[arg-type]
        out = net(x.to(device))
        losses = [nn.functional.cross_entropy(out["kind"], y["kind"].to(device)),
                  nn.functional.mse_loss(out["size"], y["size"].to(device))]
        surgery.backward(losses)
        grads[device] = {n: p.grad.detach().cpu() for n, p in net.named_parameters()}
    for name, want in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][name], want, rtol=1e-9, atol=1e-12)


def _unlearn(device: str, dtype: torch.dtype, targets: list[str] | None
             ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    model, x, y = _problem(dtype)
    new, report = mtunlearn_ext.unlearn(
        model, tasks={"kind": "classification", "size": "regression"}, train_data=(x, y),
        forget_request=mtunlearn_ext.ForgetRequest.create(range(10), targets),
        shared_parameters=lambda name: name.startswith("trunk."),
        config={"steps": 5, "lr": 1e-2}, device=device, seed=0)
    assert all(p.device.type == torch.device(device).type for p in new.parameters())
    return ({k: v.detach().cpu() for k, v in new.state_dict().items()},
            report.extra["summary"])


@pytest.mark.parametrize("targets", [["kind"], None], ids=["partial", "full"])
def test_unlearn_on_cuda_matches_cpu(targets: list[str] | None) -> None:
    """float64 end to end: the same batches, projections and steps on both devices."""
    want, summary_cpu = _unlearn("cpu", torch.float64, targets)
    got, summary_gpu = _unlearn("cuda", torch.float64, targets)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-7, atol=1e-9)
    for key, per_task in summary_cpu.items():
        for task, value in per_task.items():
            assert summary_gpu[key][task] == pytest.approx(value, rel=1e-7)
    # float32 on the device: the forget loss rises, nothing non-finite.
    params, summary = _unlearn("cuda", torch.float32, targets)
    assert all(torch.isfinite(t).all() for t in params.values())
    assert summary["forget_loss_after"]["kind"] > summary["forget_loss_before"]["kind"]


def test_unlearn_computes_on_a_cuda_models_device_by_default() -> None:
    """User-models review: `device` defaulted to "cpu", so a CUDA model given without it was
    unlearned on the CPU and came back there. The default is now the model's device."""
    model, x, y = _problem(torch.float32)
    model = model.cuda()
    new, report = mtunlearn_ext.unlearn(
        model, tasks={"kind": "classification", "size": "regression"}, train_data=(x, y),
        forget_request=mtunlearn_ext.ForgetRequest.create(range(10), ["kind"]),
        shared_parameters=lambda name: name.startswith("trunk."), config={"steps": 2})
    assert {p.device.type for p in new.parameters()} == {"cuda"}
    assert report.device.startswith("cuda")


def test_cli_train_unlearn_verify_on_cuda(tmp_path: Path) -> None:
    ckpt, out = tmp_path / "trained.pt", tmp_path / "unlearned.pt"
    assert cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--epochs", "2",
                     "--device", "cuda", "--output", str(ckpt), "--quiet"]) == 0
    assert cli.main(["unlearn", "--checkpoint", str(ckpt), "--forget-fraction", "0.1",
                     "--target-tasks", "parity", "--device", "cuda", "--output", str(out),
                     "--method-config", '{"steps": 5}', "--quiet"]) == 0
    record_path = Path(str(out) + ".record.json")
    record = json.loads(record_path.read_text())
    assert record["device"] == "cuda"
    assert record["request"]["target_tasks"] == ["parity"]
    for key in ("before", "after"):
        assert 0.0 <= record[key]["mia_auc"] <= 1.0
    assert cli.main(["verify", "--record", str(record_path), "--tolerance", "1e-3"]) == 0


@pytest.mark.parametrize("k", [8, 31, 32, 100, 256])
def test_dual_of_an_indefinite_gram_is_nan_on_both_solvers(k: int) -> None:
    """The block solver (k >= 32) ran its active-set finish where the one-thread solvers return
    the descent's overflowed iterate (no active row): finite weights against NaN."""
    from mtunlearn_ext import ops

    gram = torch.eye(k, dtype=torch.float64)
    gram[0, 1] = gram[1, 0] = -2.0
    c = -torch.ones(1, k, dtype=torch.float64)
    on_cpu = ops.nonconflicting_dual(gram[None], c[None])
    on_gpu = ops.nonconflicting_dual(gram[None].cuda(), c[None].cuda()).cpu()
    assert torch.equal(torch.isnan(on_gpu), torch.isnan(on_cpu)), (on_gpu, on_cpu)


@pytest.mark.parametrize(("k", "rows"), [(256, 2100), (8, 900_000)])
def test_nonconflicting_dual_walks_more_rows_than_workspace_slots(k: int, rows: int) -> None:
    """A workspace per row (2 k^2 + 4 k doubles: 1 MB at k = 256) ran out of memory for tens
    of thousands of rows; the rows now share at most ~1 GiB of slots (2048 at k = 256, one
    block each; ~818,000 at k = 8, one thread each), walked grid-stride. More rows than slots
    on both kernels, against the CPU."""
    from mtunlearn_ext import ops

    gen = torch.Generator().manual_seed(rows)
    basis = torch.randn(k, 3 * k // 2 + 3, generator=gen, dtype=torch.float64)
    gram = basis @ basis.mT
    c = torch.randn(1, rows, k, generator=gen, dtype=torch.float64)
    want = ops.nonconflicting_dual(gram[None], c)
    got = ops.nonconflicting_dual(gram[None].cuda(), c.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("k", [8, 31, 32, 100, 256])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_solvers_match_cpu(k: int, dtype: torch.dtype) -> None:
    """The solvers on CUDA (one thread per problem below k = 32, one block per problem from 32)
    against the CPU code: the same algorithms, so agreement is to rounding."""
    from mtunlearn_ext import ops

    gen = torch.Generator().manual_seed(k)
    rows = torch.randn(2, k, 3 * k // 2 + 3, generator=gen, dtype=torch.float64)
    gram = (rows @ rows.mT).to(dtype)
    rhs = torch.randn(2, k, 3, generator=gen, dtype=torch.float64).to(dtype)
    for ridge in (1e-6, 0.0):
        want = ops.ridge_solve(gram, rhs, ridge=ridge)
        got = ops.ridge_solve(gram.cuda(), rhs.cuda(), ridge=ridge).cpu()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    # Rows that conflict with some constraints and not others: active and inactive sets mixed.
    c = torch.randn(2, 3, k, generator=gen, dtype=torch.float64).to(dtype)
    want = ops.nonconflicting_dual(gram, c)
    got = ops.nonconflicting_dual(gram.cuda(), c.cuda()).cpu()
    assert bool((want > 0).any()) and bool((want == 0).any())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    # Singular Grams (more constraints than dimensions): w is not unique there, and with a
    # random c some directions are unbounded (|w| ~ 1e16, decided by rounding, which nvcc's
    # fused multiply-adds change), so the problem is a projection's (c = R g, bounded) and the
    # projected vector g + w R, which is unique, is compared.
    flat = torch.randn(k, 5, generator=gen, dtype=torch.float64)
    singular = (flat @ flat.T).to(dtype)[None]
    g = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    c_bounded = (g @ flat.T).to(dtype)[None]
    projected = [g + ops.nonconflicting_dual(s, c_bounded.to(s.device)).cpu()[0].double() @ flat
                 for s in (singular.cuda(), singular)]
    torch.testing.assert_close(projected[0], projected[1], rtol=0,
                               atol=(1e-9 if dtype == torch.float64 else 1e-4) * float(g.norm()))
    # Non-finite input.
    bad = gram.clone()
    bad[0, 0, 1] = float("nan")
    assert torch.isnan(ops.ridge_solve(bad.cuda(), rhs.cuda(), ridge=1e-6)[0]).all()
    assert torch.isnan(ops.nonconflicting_dual(bad.cuda(), c.cuda())[0]).all()
    assert torch.isfinite(ops.nonconflicting_dual(bad.cuda(), c.cuda())[1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_solvers_take_half_precision_grams(dtype: torch.dtype) -> None:
    """The CUDA solver kernels exist for float and double only: a half-precision Gram was read
    as float (out-of-bounds reads and writes). Now it is solved in float and written in its own
    dtype, like the CPU path (which solves in double). A double rhs with a float Gram is solved
    in double on both."""
    from mtunlearn_ext import ops

    k = 40  # the block-per-problem path when it is on, the one-thread path otherwise
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(k, 2 * k, generator=gen, dtype=torch.float64)
    gram = (rows @ rows.T / (2 * k)).to(dtype)
    rhs = torch.randn(k, 3, generator=gen, dtype=torch.float64).to(dtype)
    c = torch.randn(4, k, generator=gen, dtype=torch.float64).to(dtype)
    pairs = [(ops.ridge_solve(gram, rhs, ridge=1e-3),
              ops.ridge_solve(gram.cuda(), rhs.cuda(), ridge=1e-3)),
             (ops.nonconflicting_dual(gram, c), ops.nonconflicting_dual(gram.cuda(), c.cuda())),
             (ops.pcgrad_weights(gram), ops.pcgrad_weights(gram.cuda()))]
    for want, got in pairs:
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        # Both round one solution to the half dtype; they may differ by a unit of it.
        torch.testing.assert_close(got.cpu().double(), want.double(), rtol=2e-2,
                                   atol=2e-2 * float(want.double().abs().max()))
    mixed = ops.ridge_solve(gram.float().cuda(), rhs.double().cuda(), ridge=1e-3)
    torch.testing.assert_close(mixed.cpu(), ops.ridge_solve(gram.float(), rhs.double(), ridge=1e-3),
                               rtol=1e-6, atol=1e-9)


def test_gram_and_inner_past_the_grid_limit_of_output_tiles() -> None:
    """More 32 x 32 output tiles than a grid's y dimension holds (65535): a Gram of 11600 rows
    (66066 tiles on or above the diagonal) and an inner product of 2.1 M rows
    against one. The launch failed with "invalid configuration argument"; the tiles now stride
    over the grid."""
    from mtunlearn_ext import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(11600, 40, device="cuda", generator=gen)
    want = (x.double() @ x.double().T).float()
    torch.testing.assert_close(ops.gram(x), want, rtol=1e-5, atol=1e-4)
    a = torch.randn(32 * 65536 + 7, 24, device="cuda", generator=gen)
    b = torch.randn(1, 24, device="cuda", generator=gen)
    torch.testing.assert_close(ops.inner(a, b), (a.double() @ b.double().T).float(), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_gram_of_many_rows_keeps_float32_accuracy_over_long_column_ranges(
        dtype: torch.dtype) -> None:
    """Kernel review: the tiled kernel (Grams of more than 16 rows) summed each output over its
    work item's whole column range in float32, and a Gram of 4096 rows has one item of all n
    columns: in a replay of the kernel's order on the CPU its diagonal drifts by up to 5.7e-5
    (float16 data) and 8.2e-5 (float32) relative at n = 2**18 (~1e-3 at 2e6 terms), against
    1.4e-6 and 9.9e-8 flushed into double every 2048 columns, as the CPU kernel does and the
    CUDA one now does. The diagonal (squared
    norms, what the solves' pivots read) against float64."""
    from mtunlearn_ext import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(4096, 1 << 18, device="cuda", generator=gen) + 0.5).to(dtype)
    got = torch.diagonal(ops.gram(x)).double()
    want = x.double().pow(2).sum(dim=1)
    relative = ((got - want).abs() / want).max().item()
    assert relative < 1e-5, relative
    corner = ops.gram(x[:40])  # and the off-diagonal entries of a smaller tiled Gram
    torch.testing.assert_close(corner.double(), x[:40].double() @ x[:40].double().T,
                               rtol=1e-5, atol=1e-3)


def test_items_partials_are_summed_without_dropping_small_ones() -> None:
    """CUDA review: stage 2 of the Gram kernels summed the work items' float partials in float,
    so a lane's running sum dropped every later item below half its ulp. A row of 2**25 columns
    is 2048 items of 16384: the first holds ones (partial 2**14), the 2047 others 2**-13 (partial
    2**-12 each, every sum exact); lane 0 lost its 63 small items, 16384.484375, where the CPU
    kernel sums the partials in double and gives the nearest float of 16384.49976, 16384.5. The
    same split in a list whose first parameter dominates the Gram (gram_list)."""
    from mtunlearn_ext import ops

    x = torch.full((1, 1 << 25), 2.0**-13, device="cuda")
    x[0, :16384] = 1.0
    nearest = float(torch.tensor(16384 + 2047 * 2.0**-12, dtype=torch.float32))
    assert nearest == 16384.5
    assert ops.gram(x).item() == nearest
    assert ops.gram_list([x[:, :16384], x[:, 16384:]]).item() == nearest
    assert ops.gram(x.cpu()).item() == nearest  # the CPU kernel's answer on the same row


def _kernels_run(fn: Callable[[], object]) -> set[str]:
    """Names of the CUDA kernels ``fn`` launched (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {event.key for event in prof.key_averages()}


def _scaled_error(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |got - a b^T| over |a_i| |b_j|, against float64 (test_ops' measure)."""
    return _gram_error(got, a.double() @ b.double().mT, a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tensor_core_gram_matches_float64_and_runs_on_tensor_cores(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """MTUNLEARN_CUDA_TENSOR_CORES=1 (opt-in until this has passed on a GPU): 16-bit Grams of
    more than 8 rows, and float32 or 16-bit problems past the register kernel (inner products
    with at least 16 rows a side; float32 split into tf32 parts, three products each), take
    the wmma kernel
    (csrc/ops/gram/cuda/reduce_mma_kernel.cu; its indexing is checked on CPU threads by
    tests/test_mma_gram_emulation.py). Both tile widths, diagonal and off-diagonal tiles,
    unaligned rows, long rows, a ragged list and a stacked Gram, against float64 to the
    tolerance of the other kernels (float32 accuracy, not tf32's); Grams exactly symmetric;
    the kernel is the one that ran, and with the variable unset it is not."""
    from mtunlearn_ext import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    monkeypatch.setenv("MTUNLEARN_CUDA_TENSOR_CORES", "1")
    for k, n, offset in ((9, 1000, 0), (16, 4099, 3), (17, 333, 0), (33, 70001, 1),
                         (64, 200, 0), (130, 5000, 5), (256, 20000, 0)):
        x = torch.randn(k, n + offset, device="cuda", generator=gen).to(dtype)[:, offset:]
        got = ops.gram(x)
        assert got.dtype == torch.float32 and torch.equal(got, got.T), (k, n)
        assert _scaled_error(got, x, x) <= 2e-6, (k, n)
    a = torch.randn(3, 999, device="cuda", generator=gen).to(dtype)
    b = torch.randn(70, 999, device="cuda", generator=gen).to(dtype)
    assert _scaled_error(ops.inner(a, b), a, b) <= 2e-6
    assert _scaled_error(ops.inner(b[:17], b[20:70]), b[:17], b[20:70]) <= 2e-6
    tensors = [torch.randn(40, *shape, device="cuda", generator=gen).to(dtype)
               for shape in ((7, 5), (300,), (1,), (3, 3, 3))]
    flat = torch.cat([t.flatten(1) for t in tensors], dim=1)
    assert _scaled_error(ops.gram_list(tensors), flat, flat) <= 2e-6
    g = [t[:3] for t in tensors]
    stacked = ops.gram_list_stacked(g, tensors)
    both = torch.cat([torch.cat([t.flatten(1) for t in g], 1), flat])
    assert torch.equal(stacked, stacked.T) and _scaled_error(stacked, both, both) <= 2e-6
    x = torch.randn(130, 1000, device="cuda", generator=gen).to(dtype)
    assert any("reduce_mma_kernel" in name for name in _kernels_run(lambda: ops.gram(x)))
    monkeypatch.delenv("MTUNLEARN_CUDA_TENSOR_CORES")
    assert not any("reduce_mma_kernel" in name for name in _kernels_run(lambda: ops.gram(x)))


def test_ops_and_list_aggregation_replay_in_a_cuda_graph() -> None:
    """The docs tell CUDA-graph users to pass check_finite=False (the check's one sync is the
    only thing capture refuses). Each op uploads its launch metadata through a pinned staging
    buffer; PyTorch (>= 2.11) keeps a pinned block used during capture alive for the graph's
    life instead of recycling it. Captured once, replayed on new values written into the same
    inputs, with eager calls in between (their own uploads must not overwrite the graph's):
    every output equals the eager result on those values."""
    from mtunlearn_ext import ops

    gen = torch.Generator(device="cuda").manual_seed(0)
    basis = torch.randn(6, 5000, device="cuda", generator=gen)
    g = torch.randn(2, 5000, device="cuda", generator=gen)
    stacks = [torch.randn(3, *shape, device="cuda", generator=gen) for shape in SHAPES]
    outs = [torch.zeros(shape, device="cuda") for shape in SHAPES]
    # Past the register kernels: the tiled kernel, or with MTUNLEARN_CUDA_TENSOR_CORES=1 (as
    # gpu_check's tensor-core stage runs this file) the tensor-core one, its arch query too.
    rows = torch.randn(40, 3000, device="cuda", generator=gen)
    rows16 = torch.randn(12, 3000, device="cuda", generator=gen).to(torch.bfloat16)

    def run() -> list[torch.Tensor]:
        upgrad = UPGrad(check_finite=False)
        weights = aggregate_list(upgrad, stacks, outs, check_finite=False)
        return [ops.gram(basis, check_finite=False), ops.inner(g, basis, check_finite=False),
                ops.project_out(g, basis, check_finite=False),
                ops.project_nonconflicting(g, basis, check_finite=False),
                ops.pcgrad(basis, check_finite=False),
                ops.gram_list(stacks, check_finite=False), weights, *outs,
                ops.gram(rows, check_finite=False), ops.gram(rows16, check_finite=False)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph asks
        run()
    torch.cuda.current_stream().wait_stream(side)
    # The warm-up's pinned staging blocks done with, so the capture may reuse them rather
    # than allocate (or query events) while capturing.
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for trial in range(3):
        for t in (basis, g, *stacks, rows):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen))
        rows16.copy_(torch.randn(rows16.shape, device="cuda", generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in captured]
        for _ in range(3):  # eager uploads of other metadata between replays
            ops.gram_list([torch.randn(4, 7, device="cuda")], check_finite=False)
        eager = run()
        for i, (got, want) in enumerate(zip(replayed, eager, strict=True)):
            # The same kernels on the same values: the same bits.
            assert torch.equal(got, want), f"output {i}, replay {trial}"


def _unmergeable_unaligned(rows: int, n: int, dtype: torch.dtype,
                           gen: torch.Generator) -> torch.Tensor:
    """``[4, 3, rows, n]`` on CUDA whose leading dims do not merge (dim 1 steps over four
    matrices, dim 0 over one) and whose matrices start at odd elements, so that a matrix's
    rows are 16-byte aligned relative to each other (n a multiple of 8) but its first row
    mostly is not."""
    matrix = rows * n + 1  # odd: consecutive matrices start at other alignments
    flat = torch.randn(12 * matrix + 1, device="cuda", generator=gen).to(dtype)
    return flat.as_strided((4, 3, rows, n), (matrix, 4 * matrix, n, 1), storage_offset=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_gram_inner_combine_read_unmergeable_unaligned_cuda_batches_in_place(
        dtype: torch.dtype) -> None:
    """Since the last GPU run the batched entries (gram.cpp, combine.cpp, shared by both
    backends) build one segment per matrix from the leading dims' strides (matrix_offsets)
    instead of merging them by a copy, so on CUDA the kernels now see matrix starts that are
    not 16-byte aligned while their rows are: the vector loads must fall back per address.
    Every batched op on such an input gives the bits of the same op on a contiguous copy
    (the kernels sum in the same order), and, for combine, of its in-place form whose base
    is out itself. Grams of 12 and 40 rows reach the tiled kernel (and, with
    MTUNLEARN_CUDA_TENSOR_CORES=1, as gpu_check's tensor-core stage runs this test, the wmma
    kernel)."""
    from mtunlearn_ext import ops

    gen = torch.Generator(device="cuda").manual_seed(7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for rows, n in ((3, 1032), (12, 4104), (40, 520)):
        x = _unmergeable_unaligned(rows, n, dtype, gen)
        g = _unmergeable_unaligned(2, n, dtype, gen)
        with pytest.raises(RuntimeError):
            x.view(-1, rows, n)
        coeffs = torch.randn(4, 3, 2, rows, device="cuda", generator=gen).to(acc)
        calls: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
            "gram": lambda x, g: ops.gram(x),
            "inner": lambda x, g: ops.inner(g, x),
            "combine": lambda x, g, c=coeffs: ops.combine(c, x),
            "project_out": lambda x, g: ops.project_out(g, x),
            "project_nonconflicting": lambda x, g: ops.project_nonconflicting(g, x),
        }
        for name, call in calls.items():
            want = call(x.contiguous(), g.contiguous())
            got = call(x, g)
            assert got.shape == want.shape and torch.equal(got, want), (name, rows, dtype)
        # combine with a base read where out is written: g's own bytes, in place, beta = 0.5.
        base = g.contiguous()
        want = ops.combine(coeffs, x.contiguous(), out=base.clone(), beta=0.5)
        out = base.clone()
        ops.combine(coeffs, x, out=out, beta=0.5)
        assert torch.equal(out, want), ("combine with base", rows, dtype)


def test_min_norm_captured_in_a_cuda_graph_gives_the_eager_bits() -> None:
    """Since the last GPU run the device min-norm solve synchronises once to skip its budget
    when every QP answer passes, except while a CUDA graph is captured
    (min_norm._may_synchronise), where a synchronisation is an error: there it runs the
    budget and takes the QPs' answers wherever they pass. Captured, it must not raise, and
    replays on new Grams give the eager (synchronising) path's bits."""
    from mtunlearn_ext.surgery import min_norm_simplex

    gen = torch.Generator(device="cuda").manual_seed(3)
    jac = torch.randn(5, 4, 300, device="cuda", generator=gen, dtype=torch.float64)
    gram = jac @ jac.mT

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph asks
        min_norm_simplex(gram)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = min_norm_simplex(gram)
    for trial in range(2):
        jac = torch.randn(5, 4, 300, device="cuda", generator=gen, dtype=torch.float64)
        gram.copy_(jac @ jac.mT)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, min_norm_simplex(gram)), trial


def test_list_ops_refuse_lists_mixing_cuda_and_cpu() -> None:
    """A mixed list dispatches to the CUDA entry (CUDA outranks CPU), which must refuse it; the
    wrapper then names the tensor as the reference path does (the Python checks run only after
    the C++ entry refused)."""
    from mtunlearn_ext import ops

    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`xs\[1\]` is on cpu"):
        ops.gram_list([x.cuda(), x])
    with pytest.raises(ValueError, match=r"`bs\[0\]` is on cpu"):
        ops.inner_list([x[:1].cuda()], [x])
    outs = [torch.zeros(4, device="cuda")]
    with pytest.raises(ValueError, match=r"`bases\[0\]` is on cpu"):
        ops.combine_list(torch.ones(3, device="cuda"), [x.cuda()], outs, beta=1.0,
                         bases=[torch.zeros(4)])
    assert bool((outs[0] == 0).all())
    # Projections read g as the combine base: new outputs equal the CPU path's.
    g, basis = [torch.randn(1, 6, 5)], [torch.randn(4, 6, 5)]
    cpu = project_out_list(g, basis)
    gpu = project_out_list([t.cuda() for t in g], [t.cuda() for t in basis])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=2e-4, atol=2e-4)


def test_batchnorm_model_unlearns_on_cuda_like_on_cpu() -> None:
    """Eval-mode steps and the retain-only recalibration of running statistics, float64, on
    both devices: the same weights and buffers."""
    from test_norm_statistics import is_trunk, TASKS, NormNet

    torch.manual_seed(0)
    x = torch.randn(48, 3, 6, 6, dtype=torch.float64)
    y = {"kind": torch.randint(0, 3, (48,)), "size": torch.randn(48, 1, dtype=torch.float64)}
    model = NormNet().double()
    states = {}
    for device in ("cpu", "cuda"):
        new, report = mtunlearn_ext.unlearn(
            model, tasks=TASKS, train_data=(x, y),
            forget_request=mtunlearn_ext.ForgetRequest.create(range(8)),
            shared_parameters=is_trunk, config={"steps": 3, "lr": 1e-2}, device=device, seed=0)
        assert report.extra["norm_statistics_rows"] == 40
        states[device] = {k: v.detach().cpu() for k, v in new.state_dict().items()}
    for name, want in states["cpu"].items():
        torch.testing.assert_close(states["cuda"][name], want, rtol=1e-7, atol=1e-9)


def test_several_inputs_and_a_custom_loss_unlearn_on_cuda_like_on_cpu() -> None:
    """Dict inputs (long ids, bool mask) moved to the device with the batches, and a task's own
    loss under the per-sample vmap, float64 on both devices: the same weights and buffers."""
    import torch.nn.functional as F

    from mtunlearn_ext.data.base import TaskSpec
    from test_multi_input import TokensAndMask, _text_data

    def huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(pred, target.to(pred.dtype), reduction="none",
                            delta=0.5).flatten(1).mean(1)

    ids, mask, labels = _text_data()
    labels = {"topic": labels["topic"], "score": labels["score"].double()}
    torch.manual_seed(1)
    model = TokensAndMask().double().eval()
    tasks = {"topic": "classification", "score": TaskSpec("score", "regression", loss=huber)}
    states = {}
    for device in ("cpu", "cuda"):
        new, _ = mtunlearn_ext.unlearn(
            model, tasks=tasks, train_data=({"ids": ids, "mask": mask}, labels),
            forget_request=mtunlearn_ext.ForgetRequest.create(range(6), ["topic"]),
            shared_parameters=lambda n: n.startswith("trunk."),
            config={"steps": 3, "lr": 1e-2}, device=device, seed=0)
        states[device] = {k: v.detach().cpu() for k, v in new.state_dict().items()}
    for name, want in states["cpu"].items():
        torch.testing.assert_close(states["cuda"][name], want, rtol=1e-7, atol=1e-9)


def test_uis_floor_on_cuda_matches_cpu() -> None:
    """The floor's streamed draws with the model and its outputs on the device and the draw
    masks on the host: the same draws, and metrics equal up to float32 rounding (a pixel whose
    argmax or threshold flips moves a pooled metric by ~1e-4).

    With cuDNN's TF32 convolutions off: PyTorch's default lets them round products to 10 bits,
    and this untrained model's UIS (relative changes of scores near 0, such as 1% of normals
    within 11.25 degrees) moved by up to 0.089 of ~5 on the H200; on the CPU, weights perturbed
    by 1e-6 relative move it by 3e-6, by 1e-4 relative 0.05."""
    from mtunlearn_ext.data import load_benchmark, unseen_instances
    from mtunlearn_ext.metrics import uis_floor
    from mtunlearn_ext.models import build_model

    bench = load_benchmark("indoor", size="tiny", seed=0)
    pool = unseen_instances("indoor", 30, seed=0, size="tiny")
    model = build_model(bench, seed=0).eval()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        floors = {device: uis_floor(model.to(device), bench.test, pool, 10, draws=8, seed=2,
                                    batch_size=8)
                  for device in ("cpu", "cuda")}
    torch.testing.assert_close(floors["cuda"].draws, floors["cpu"].draws, rtol=1e-3, atol=1e-3)
    assert floors["cuda"].forget_change.keys() == floors["cpu"].forget_change.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_guard_on_cuda_finds_each_nan_and_inf_the_cpu_finds(dtype: torch.dtype) -> None:
    """The CLI's NaN/Inf guard takes every tensor's largest magnitude in one fused
    `_foreach_norm` on CUDA: its maximum must carry a NaN through (a max that drops NaN would
    pass a diverged run), at random positions of tensors split over many blocks."""
    from mtunlearn_ext.workflow import _FiniteGuard

    gen = torch.Generator().manual_seed(1)
    for trial in range(12):
        model = nn.Sequential(nn.Linear(300, 257), nn.Linear(257, 3)).to(dtype)
        parameters = list(model.parameters())
        for p in parameters:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        target = parameters[trial % len(parameters)]
        tensor = target.grad if trial % 2 else target.data
        assert tensor is not None
        index = int(torch.randint(tensor.numel(), (1,), generator=gen))
        tensor.view(-1)[index] = (float("nan"), float("inf"), -float("inf"))[trial % 3]
        want = [bool(torch.isfinite(t).all()) for p in parameters for t in (p.grad, p)]
        assert want.count(False) == 1
        flags = _FiniteGuard().step_flags(model.cuda())
        assert flags is not None and flags.device.type == "cuda"
        assert flags.tolist() == want, trial
