"""Every compiled op against a float64 reference on fresh random inputs: dtypes, shapes (empty,
tiny, odd, large), strides, batching; plus opcheck, torch.compile, autograd, determinism and
argument errors. Outputs are NaN-poisoned (see conftest.poisoned_outputs)."""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops import _reference as ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Relative error of a Gram entry, scaled by |x_i| |x_j|: fp32 accumulation for every dtype
# below fp64 (the inputs themselves are exact, the reference sees the same values).
GRAM_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
SHAPES = [(1, 1), (1, 0), (0, 5), (2, 3), (3, 7), (5, 33), (8, 1000), (16, 4099), (17, 515),
          (37, 130), (64, 200), (128, 67)]

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _rand(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
          seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _gram_error(result: torch.Tensor, expected: torch.Tensor, rows_a: torch.Tensor,
                rows_b: torch.Tensor) -> float:
    na = rows_a.double().norm(dim=-1)
    nb = rows_b.double().norm(dim=-1)
    scale = na.unsqueeze(-1) * nb.unsqueeze(-2) + 1e-300
    return float(((result.double() - expected) / scale).abs().max()) if result.numel() else 0.0


def _variants(x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The same values in other memory layouts: column-sliced, transposed storage, offset."""
    k, n = x.shape[-2:]
    out = [("contiguous", x)]
    wide = torch.zeros(*x.shape[:-1], 2 * n + 1, dtype=x.dtype, device=x.device)
    wide[..., 1:2 * n + 1:2] = x
    out.append(("strided_cols", wide[..., 1:2 * n + 1:2]))
    out.append(("transposed_storage", x.transpose(-1, -2).contiguous().transpose(-1, -2)))
    padded = torch.zeros(*x.shape[:-1], n + 3, dtype=x.dtype, device=x.device)
    padded[..., 3:] = x
    out.append(("row_offset", padded[..., 3:]))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_gram_matches_float64_reference(device: str, dtype: torch.dtype, k: int, n: int) -> None:
    x = _rand(k, n, dtype=dtype, device=device, seed=k * 1000 + n)
    expected = ref.gram(x.double())
    for name, variant in _variants(x):
        result = ops.gram(variant)
        assert result.dtype == ref.acc_dtype(dtype), name
        assert result.shape == (k, k), name
        assert not torch.isnan(result).any(), f"{name}: unwritten output"
        assert _gram_error(result, expected, x, x) <= GRAM_TOL[dtype], name
        assert torch.equal(result, result.transpose(0, 1)), f"{name}: not exactly symmetric"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gram_batched_and_large(device: str, dtype: torch.dtype) -> None:
    x = _rand(2, 3, 5, 301, dtype=dtype, device=device, seed=1)
    result = ops.gram(x)
    assert result.shape == (2, 3, 5, 5)
    assert _gram_error(result, ref.gram(x.double()), x, x) <= GRAM_TOL[dtype]
    big = _rand(8, 2_000_003, dtype=dtype, device=device, seed=2)
    assert _gram_error(ops.gram(big), ref.gram(big.double()), big, big) <= 4 * GRAM_TOL[dtype]


def test_fp32_rounding_does_not_grow_with_the_column_count_on_the_blocked_path() -> None:
    """Mutation review: the CPU kernels move their fp32 partial sums into double every 2048
    columns, so a product's error stays at a few roundings of short sums at any length (about
    1e-7 of |a||b| here, with every ISA). Problems past 256 x 256 outputs run as blocks, each one
    column item over all columns; the tests gave them 517 columns, where a kernel that kept fp32
    sums over every column (no flush) passed, off 1.6e-6 at 65536 columns and growing with n.
    Positive entries, so the rounding errors of long sums add up instead of cancelling."""
    g = torch.Generator().manual_seed(11)
    x = torch.rand(257, 65536, generator=g) + 0.5
    y = torch.rand(300, 65536, generator=g) + 0.5
    assert _gram_error(ops.gram(x), ref.gram(x.double()), x, x) <= 4e-7
    assert _gram_error(ops.inner(y, x), ref.inner(y.double(), x.double()), y, x) <= 4e-7


@pytest.mark.parametrize("device", DEVICES)
def test_gram_is_psd_and_deterministic(device: str) -> None:
    x = _rand(24, 70_001, device=device, seed=3)
    first = ops.gram(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.gram(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single), "result depends on the thread count"
    assert torch.equal(first, ops.gram(x))
    eig = torch.linalg.eigvalsh(first.double())
    assert eig.min() >= -1e-6 * eig.max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_outputs_are_cut_into_blocks_and_match_float64(dtype: torch.dtype) -> None:
    """Kernel review: the CPU kernels split a problem only into column items, at most
    2^22 / (m k) of them, so a Gram of 1024 rows ran on 4 threads and one of 2048 rows on one,
    with buffers growing with m k. Past 256 x 256 output entries the output is now cut into
    256 x 256 blocks (a Gram's on or above the diagonal, mirrored), one thread each. Ragged
    blocks, every layout, a batch, an inner product and a list; exactly symmetric, every entry
    written (outputs are poisoned), and the same bits on 1 and 2 threads."""
    x = _rand(300, 517, dtype=dtype, seed=5)
    expected = ref.gram(x.double())
    for name, variant in _variants(x):
        result = ops.gram(variant)
        assert not torch.isnan(result).any(), f"{name}: unwritten output"
        assert _gram_error(result, expected, x, x) <= GRAM_TOL[dtype], name
        assert torch.equal(result, result.transpose(0, 1)), f"{name}: not exactly symmetric"
    batch = _rand(2, 290, 101, dtype=dtype, seed=6)
    assert _gram_error(ops.gram(batch), ref.gram(batch.double()), batch, batch) \
        <= GRAM_TOL[dtype]
    a, b = _rand(270, 333, dtype=dtype, seed=7), _rand(600, 333, dtype=dtype, seed=8)
    assert _gram_error(ops.inner(a, b), ref.inner(a.double(), b.double()), a, b) \
        <= GRAM_TOL[dtype]
    stacks = [x[:, :200], x[:, 200:].reshape(300, 317, 1)]
    assert _gram_error(ops.gram_list(stacks), expected, x, x) <= GRAM_TOL[dtype]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gram(x), ops.inner(a, b)
        torch.set_num_threads(2)
        two = ops.gram(x), ops.inner(a, b)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(one, two))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (0, 3, 5), (2, 0, 5), (3, 4, 0), (3, 5, 17),
                                   (8, 8, 1029), (9, 2, 333), (40, 33, 130),
                                   # many rows against a few (the CPU sweep), and the reverse
                                   (20, 3, 2500), (193, 1, 300), (1, 17, 1029), (4, 40, 4100)])
def test_inner_matches_float64_reference(device: str, dtype: torch.dtype, m: int, k: int,
                                         n: int) -> None:
    a = _rand(m, n, dtype=dtype, device=device, seed=m + 10 * k + n)
    b = _rand(k, n, dtype=dtype, device=device, seed=7 + m + k + n)
    expected = ref.inner(a.double(), b.double())
    for (name_a, va), (name_b, vb) in zip(_variants(a), reversed(_variants(b))):
        result = ops.inner(va, vb)
        assert result.shape == (m, k)
        assert not torch.isnan(result).any(), f"{name_a}/{name_b}: unwritten output"
        assert _gram_error(result, expected, a, b) <= GRAM_TOL[dtype], (name_a, name_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(20, 3, 2500), (193, 1, 300), (24, 4, 4100), (64, 2, 77)])
def test_inner_is_the_same_bits_in_either_orientation(dtype: torch.dtype, m: int, k: int,
                                                      n: int) -> None:
    """On CPU many rows against a few are streamed row group by row group, and a few against
    many run as that transposed problem, with the tile width of their own orientation (a
    flush every 2048 columns of tiles of that width). For these shapes both orientations have
    the same tile width, so every product meets the same columns, vectors and flushes with its
    factors swapped: inner(a, b) and inner(b, a).T must agree bit for bit, also for strided
    and converted inputs."""
    a = _rand(m, n, dtype=dtype, device="cpu", seed=m + n)
    b = _rand(k, n, dtype=dtype, device="cpu", seed=k + 3 * n)
    for (name_a, va), (name_b, vb) in zip(_variants(a), _variants(b)):
        assert torch.equal(ops.inner(va, vb), ops.inner(vb, va).T), (name_a, name_b)


# Error of a combination relative to sum_j |c_ij| |x_j|, beyond the final rounding to dtype.
COMBINE_TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 1e-3,
               torch.bfloat16: 8e-3}


def _combine_error(result: torch.Tensor, expected: torch.Tensor, coeffs: torch.Tensor,
                   x: torch.Tensor) -> float:
    bound = coeffs.double().abs() @ x.double().abs() + 1e-300
    return float(((result.double() - expected) / bound).abs().max()) if result.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 0, 4), (0, 3, 5), (1, 8, 1003), (3, 5, 17),
                                   (4, 16, 4097), (2, 64, 300), (5, 130, 33)])
def test_combine_matches_float64_reference(device: str, dtype: torch.dtype, m: int, k: int,
                                           n: int) -> None:
    x = _rand(k, n, dtype=dtype, device=device, seed=m + k + n)
    coeffs = _rand(m, k, dtype=torch.float64, device=device, seed=99 + k)
    expected = ref.combine(coeffs, x.double())
    for name, variant in _variants(x):
        result = ops.combine(coeffs, variant)
        assert result.dtype == dtype and result.shape == (m, n)
        assert not torch.isnan(result).any(), f"{name}: unwritten output"
        assert _combine_error(result, expected, coeffs, x) <= COMBINE_TOL[dtype], name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_in_place_beta(device: str, dtype: torch.dtype) -> None:
    x = _rand(2, 6, 999, dtype=dtype, device=device, seed=5)
    coeffs = _rand(2, 3, 6, dtype=torch.float32, device=device, seed=6)
    out = torch.full((2, 3, 999), float("nan"), dtype=dtype, device=device)
    ops.combine(coeffs, x, out=out)  # beta=0 ignores the NaN already there
    expected = ref.combine(coeffs, x.double())
    assert _combine_error(out, expected, coeffs, x) <= COMBINE_TOL[dtype]
    before = out.double().clone()
    ops.combine(coeffs, x, out=out, beta=-0.5)
    expected2 = -0.5 * before + expected
    bound = coeffs.double().abs() @ x.double().abs() + before.abs()
    assert float(((out.double() - expected2) / bound).abs().max()) <= 2 * COMBINE_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coeff_rows", [0, 2])
def test_gram_list_and_combine_list(device: str, dtype: torch.dtype, coeff_rows: int) -> None:
    k = 6
    shapes = [(), (1,), (7,), (3, 5), (64, 3, 3, 3), (1001,), (0, 4)]
    xs = [_rand(k, *s, dtype=dtype, device=device, seed=i) if 0 not in s else
          torch.zeros(k, *s, dtype=dtype, device=device) for i, s in enumerate(shapes)]
    xs[3] = xs[3].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous parameter
    flat = torch.cat([x.reshape(k, -1).double() for x in xs], dim=1)
    total = ops.gram_list(xs)
    assert total.shape == (k, k)
    assert _gram_error(total, flat @ flat.T, flat, flat) <= GRAM_TOL[dtype]
    per = ops.gram_list(xs, per_tensor=True)
    assert per.shape == (len(xs), k, k)
    for p, x in enumerate(xs):
        f = x.reshape(k, -1).double()
        assert _gram_error(per[p], f @ f.T, f, f) <= GRAM_TOL[dtype]
    # The order of parameters in the list changes nothing but the order of per-tensor Grams.
    assert torch.allclose(ops.gram_list(list(reversed(xs))).double(), total.double(),
                          rtol=1e-5, atol=1e-5 * float(total.abs().max()))

    coeffs = _rand(*((coeff_rows,) if coeff_rows else ()), k, dtype=torch.float32,
                   device=device, seed=11)
    lead = (coeff_rows,) if coeff_rows else ()
    outs = [torch.full((*lead, *x.shape[1:]), float("nan"), dtype=dtype, device=device)
            for x in xs]
    ops.combine_list(coeffs, xs, outs)
    c2 = coeffs.reshape(-1, k)
    for x, o in zip(xs, outs):
        expected = ref.combine(c2, x.reshape(k, -1).double()).reshape(o.shape)
        assert _combine_error(o.reshape(c2.shape[0], -1), expected.reshape(c2.shape[0], -1), c2,
                              x.reshape(k, -1)) <= COMBINE_TOL[dtype]
    # Accumulating mode: beta=1 adds to what is there (gradient accumulation).
    snapshot = [o.double().clone() for o in outs]
    ops.combine_list(coeffs, xs, outs, beta=1.0)
    for o, s in zip(outs, snapshot):
        scale = float(s.abs().max()) + 1 if s.numel() else 1.0
        assert torch.allclose(o.double(), 2 * s, rtol=4 * COMBINE_TOL[dtype],
                              atol=4 * COMBINE_TOL[dtype] * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inner_list_and_per_tensor_combine_list(device: str, dtype: torch.dtype) -> None:
    m, k = 2, 5
    shapes = [(), (9,), (3, 4), (2, 3, 3, 3), (1000,)]
    as_ = [_rand(m, *s, dtype=dtype, device=device, seed=10 + i) for i, s in enumerate(shapes)]
    bs = [_rand(k, *s, dtype=dtype, device=device, seed=20 + i) for i, s in enumerate(shapes)]
    fa = torch.cat([a.reshape(m, -1).double() for a in as_], 1)
    fb = torch.cat([b.reshape(k, -1).double() for b in bs], 1)
    total = ops.inner_list(as_, bs)
    assert total.shape == (m, k)
    assert _gram_error(total, fa @ fb.T, fa, fb) <= GRAM_TOL[dtype]
    per = ops.inner_list(as_, bs, per_tensor=True)
    assert per.shape == (len(shapes), m, k)
    for p, (a, b) in enumerate(zip(as_, bs)):
        ea = a.reshape(m, -1).double()
        eb = b.reshape(k, -1).double()
        assert _gram_error(per[p], ea @ eb.T, ea, eb) <= GRAM_TOL[dtype]
    # One coefficient block per tensor (per-layer projections in one launch).
    coeffs = _rand(len(shapes), m, k, dtype=torch.float32, device=device, seed=3)
    outs = [torch.full((m, *b.shape[1:]), float("nan"), dtype=dtype, device=device) for b in bs]
    ops.combine_list(coeffs, bs, outs, per_tensor=True)
    for p, (b, o) in enumerate(zip(bs, outs)):
        expected = ref.combine(coeffs[p], b.reshape(k, -1).double())
        assert _combine_error(o.reshape(m, -1), expected, coeffs[p], b.reshape(k, -1)) <= \
            COMBINE_TOL[dtype]
    with pytest.raises(ValueError, match="one block per tensor"):
        ops.combine_list(coeffs[:2], bs, outs, per_tensor=True)


def _stacks_in_every_layout(k: int, dtype: torch.dtype, device: str, seed: int
                            ) -> list[torch.Tensor]:
    """``[k, *shape]`` stacks whose memory the list ops read in place (dense trailing dims,
    any row stride) or must copy (trailing dims not dense)."""
    def r(*shape: int, salt: int) -> torch.Tensor:
        return _rand(*shape, dtype=dtype, device=device, seed=seed + salt)

    return [
        r(k, 3, 4, salt=0),                                  # contiguous
        r(2 * k, 3, 4, salt=1)[::2],                         # rows two apart, dense rows
        r(k, 6, salt=2)[:, 1:4],                             # row stride 6, 3 dense elements
        r(3, 4, k, salt=3).permute(2, 0, 1),                 # row stride 1: elements k apart
        r(k, 5, 4, salt=4).transpose(1, 2),                  # trailing dims transposed
        r(k, 1, salt=5).expand(k, 7),                        # stride 0 along the row
        r(k, 4, salt=6).unsqueeze(1).transpose(1, 2),        # a size-1 dim with an odd stride
        r(1, 5, salt=7).expand(k, 5),                        # every row the same memory
        r(k, 4, 5, salt=8)[..., :3],                         # rows with gaps
        r(k, salt=9),                                        # a bias-like [k]
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_list_ops_read_every_layout(device: str, dtype: torch.dtype) -> None:
    m, k = 3, 5
    xs = _stacks_in_every_layout(m, dtype, device, seed=40)
    ys = _stacks_in_every_layout(k, dtype, device, seed=60)
    fx = torch.cat([x.reshape(m, -1).double() for x in xs], 1)
    fy = torch.cat([y.reshape(k, -1).double() for y in ys], 1)
    assert _gram_error(ops.gram_list(ys), fy @ fy.T, fy, fy) <= GRAM_TOL[dtype]
    assert _gram_error(ops.inner_list(xs, ys), fx @ fy.T, fx, fy) <= GRAM_TOL[dtype]
    both = torch.cat([fx, fy])
    assert _gram_error(ops.gram_list_stacked(xs, ys), both @ both.T, both, both) <= \
        GRAM_TOL[dtype]
    per = ops.gram_list(ys, per_tensor=True)
    for p, y in enumerate(ys):
        f = y.reshape(k, -1).double()
        assert _gram_error(per[p], f @ f.T, f, f) <= GRAM_TOL[dtype]
    coeffs = _rand(m, k, device=device, seed=7)
    outs = [torch.full((m, *y.shape[1:]), float("nan"), dtype=dtype, device=device) for y in ys]
    ops.combine_list(coeffs, ys, outs)
    for y, o in zip(ys, outs):
        expected = ref.combine(coeffs.double(), y.reshape(k, -1).double())
        assert _combine_error(o.reshape(m, -1), expected, coeffs, y.reshape(k, -1)) <= \
            COMBINE_TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# (300, 457): past 256^2 entries the output is cut into blocks, and at the split (review: a
# stack of 2048 rows ran unblocked, on one thread, with 224 MiB of buffers).
@pytest.mark.parametrize("m,k", [(1, 6), (3, 16), (0, 4), (2, 0), (8, 17), (300, 457)])
def test_gram_list_stacked(device: str, dtype: torch.dtype, m: int, k: int) -> None:
    shapes = [(), (9,), (3, 4), (2, 3, 3, 3), (1001,), (0, 2)]
    xs = [_rand(m, *s, dtype=dtype, device=device, seed=30 + i) for i, s in enumerate(shapes)]
    ys = [_rand(k, *s, dtype=dtype, device=device, seed=40 + i) for i, s in enumerate(shapes)]
    ys[2] = ys[2].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous parameter
    stacked = [torch.cat([x.reshape(m, math.prod(x.shape[1:])),
                          y.reshape(k, math.prod(y.shape[1:]))]).double() for x, y in zip(xs, ys)]
    flat = torch.cat(stacked, dim=1)
    total = ops.gram_list_stacked(xs, ys)
    assert total.shape == (m + k, m + k)
    assert _gram_error(total, flat @ flat.T, flat, flat) <= GRAM_TOL[dtype]
    assert torch.equal(total, total.T)
    per = ops.gram_list_stacked(xs, ys, per_tensor=True)
    assert per.shape == (len(shapes), m + k, m + k)
    for p, f in enumerate(stacked):
        assert _gram_error(per[p], f @ f.T, f, f) <= GRAM_TOL[dtype]
    # The blocks are what gram_list(ys) and inner_list(xs, ys) compute, read in one pass.
    if m and k:
        assert _gram_error(total[m:, m:], ops.gram_list(ys).double(), flat[m:], flat[m:]) <= \
            2 * GRAM_TOL[dtype]
        assert _gram_error(total[:m, m:], ops.inner_list(xs, ys).double(), flat[:m], flat[m:]) <= \
            2 * GRAM_TOL[dtype]


def test_a_list_of_many_tensors_sums_in_waves_of_bounded_memory() -> None:
    """Review: every tensor of a list got its own m x k block of partial sums at once, so
    gram_list over 1000 tensors at k = 256 took 500 MiB for a 0.25 MiB result (the buffer was
    meant to stay within 32 MiB). The blocks now run in waves (64 at a time at k = 256),
    reduced in the same order: correct across wave boundaries, and the memory bounded (peak
    RSS measured in a fresh process, where nothing else has raised it)."""
    import subprocess
    import sys

    xs = [_rand(256, 3 + i % 5, seed=i) for i in range(150)]  # three waves of 64 at k = 256
    flat = torch.cat(xs, dim=1).double()
    assert _gram_error(ops.gram_list(xs), flat @ flat.T, flat, flat) <= GRAM_TOL[torch.float32]
    ys = [_rand(200, 3 + i % 5, seed=500 + i) for i in range(150)]
    other = torch.cat(ys, dim=1).double()
    assert _gram_error(ops.inner_list(xs, ys), flat @ other.T, flat, other) <= \
        GRAM_TOL[torch.float32]
    script = ("import resource, torch; from mtunlearn_ext import ops; torch.set_num_threads(1); "
              "xs = [torch.randn(256, 4) for _ in range(1000)]; "
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; ops.gram_list(xs); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    grown_kib = int(subprocess.run([sys.executable, "-c", script], capture_output=True,
                                   text=True, check=True).stdout)
    assert grown_kib < 128 * 1024, f"gram_list's peak memory grew by {grown_kib // 1024} MiB"


def test_list_ops_with_an_empty_side() -> None:
    """m = 0 rows on one side and k > 0 on the other: shapes follow, nothing is read wrongly."""
    b = [torch.randn(3, 5), torch.randn(3, 2, 2)]
    a = [torch.zeros(0, 5), torch.zeros(0, 2, 2)]
    assert ops.inner_list(a, b).shape == (0, 3)
    assert ops.inner_list(b, a, per_tensor=True).shape == (2, 3, 0)
    flat = torch.cat([t.reshape(3, -1) for t in b], 1).double()
    torch.testing.assert_close(ops.gram_list_stacked(a, b).double(), flat @ flat.T, rtol=1e-5,
                               atol=1e-5)


def test_gram_list_stacked_errors_name_the_argument() -> None:
    x, y = torch.randn(2, 5), torch.randn(3, 5)
    with pytest.raises(ValueError, match="same length"):
        ops.gram_list_stacked([x], [y, y])
    with pytest.raises(ValueError, match=r"xs\[0\] and ys\[0\] must share"):
        ops.gram_list_stacked([x], [torch.randn(3, 4)])
    with pytest.raises(TypeError, match="dtype"):
        ops.gram_list_stacked([x], [y.double()])
    with pytest.raises(FloatingPointError, match="ys"):
        ops.gram_list_stacked([x], [torch.full((3, 5), float("inf"))])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("coeff_rows", [0, 3])
def test_combine_list_from_separate_bases(device: str, dtype: torch.dtype, coeff_rows: int
                                          ) -> None:
    """``outs = beta * bases + C @ xs`` with bases in every layout, apart from the outputs."""
    k = 4
    lead = (coeff_rows,) if coeff_rows else ()
    xs = _stacks_in_every_layout(k, dtype, device, seed=80)
    rows = coeff_rows or 1
    bases = [b[0] if not coeff_rows else b for b in
             _stacks_in_every_layout(rows, dtype, device, seed=90)]
    bases = [b.reshape(*lead, *x.shape[1:]) if b.shape != (*lead, *x.shape[1:]) else b
             for b, x in zip(bases, xs)]
    coeffs = _rand(*lead, k, device=device, seed=5)
    c2 = coeffs.reshape(-1, k).double()
    for beta in (1.0, -0.5):
        outs = [torch.full(b.shape, float("nan"), dtype=dtype, device=device) for b in bases]
        ops.combine_list(coeffs, xs, outs, beta=beta, bases=bases)
        for x, b, o in zip(xs, bases, outs):
            b2, x2 = b.reshape(rows, -1).double(), x.reshape(k, -1).double()
            expected = beta * b2 + c2 @ x2
            # Each element against its own terms' size, as COMBINE_TOL is (an absolute bound
            # on the largest base let 0.2-0.5 through in bfloat16 on values of 1-3; review).
            bound = abs(beta) * b2.abs() + c2.abs() @ x2.abs() + 1e-300
            error = ((o.reshape(rows, -1).double() - expected) / bound).abs()
            assert error.numel() == 0 or float(error.max()) <= COMBINE_TOL[dtype]
    # beta = 0 ignores the bases, NaN included.
    nan_bases = [torch.full_like(b, float("nan")) for b in bases]
    outs = [torch.empty(b.shape, dtype=dtype, device=device) for b in bases]
    ops.combine_list(coeffs, xs, outs, beta=0.0, bases=nan_bases)
    assert all(bool(torch.isfinite(o).all()) for o in outs)


def test_combine_list_from_bases_that_are_the_outputs() -> None:
    """A base may be its output (an in-place update); a shifted view of it may not."""
    xs = [torch.randn(3, 8), torch.randn(3, 2, 2)]
    outs = [torch.randn(8), torch.randn(2, 2)]
    before = [o.clone() for o in outs]
    coeffs = torch.randn(3)
    ops.combine_list(coeffs, xs, outs, beta=1.0, bases=outs)
    for x, o, b in zip(xs, outs, before):
        torch.testing.assert_close(o, b + (coeffs @ x.reshape(3, -1)).reshape(o.shape))
    storage = torch.randn(9)
    with pytest.raises(ValueError, match=r"bases\[0\] overlaps outs\[0\]"):
        ops.combine_list(coeffs, xs[:1], [storage[:8]], beta=1.0, bases=[storage[1:]])
    with pytest.raises(ValueError, match=r"bases\[1\] must have the shape of outs\[1\]"):
        ops.combine_list(coeffs, xs, outs, beta=1.0, bases=[outs[0], torch.zeros(4)])
    with pytest.raises(ValueError, match="`bases` must have one tensor per output"):
        ops.combine_list(coeffs, xs, outs, beta=1.0, bases=[outs[0]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("write", ["combine", "combine_list", "combine_list_from", "raw"])
def test_writes_bump_the_version_counter_so_autograd_refuses_a_stale_graph(
        device: str, write: str) -> None:
    """Review: the in-place ops wrote without bumping the written tensors' version counters,
    so a backward through a graph that had saved a tensor they overwrote ran and gave wrong
    gradients (torch's own in-place ops make it fail). Every written tensor of a list counts;
    inference tensors have no counter and are written as before."""
    x = torch.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
    h = torch.ones(3, device=device)
    other = torch.ones(2, device=device)
    y = (x * h).sum()  # saves h
    versions = (h._version, other._version)
    coeffs, xs = torch.ones(1, 1, device=device), torch.full((1, 3), 10.0, device=device)
    with torch.no_grad():
        if write == "combine":
            ops.combine(coeffs, xs, out=h.view(1, 3))
        elif write == "combine_list":
            ops.combine_list(torch.ones(1, device=device), [xs[0].unsqueeze(0),
                             torch.ones(1, 2, device=device)], [h, other])
        elif write == "combine_list_from":
            ops.combine_list(torch.ones(1, device=device), [xs[0].unsqueeze(0),
                             torch.ones(1, 2, device=device)], [h, other], beta=1.0,
                             bases=[h, other])
        else:
            torch.ops.mtunlearn.combine_(h.view(1, 3), coeffs, xs, 0.0)
    assert h._version > versions[0]
    if write in ("combine_list", "combine_list_from"):
        assert other._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    with torch.inference_mode():
        frozen = torch.zeros(1, 3, device=device)
    ops.combine(coeffs, xs, out=frozen)
    assert frozen.tolist() == [[10.0, 10.0, 10.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_combine_in_place_over_its_own_coefficients(device: str) -> None:
    """``out`` may be ``coeffs`` (n == k) or share its memory: the kernels read a private copy of
    the coefficients (they read them while writing ``out``; the result was A @ X computed from
    coefficients already overwritten)."""
    kw = {"dtype": torch.float32, "device": device}
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], **kw)
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0]], **kw)
    expected = a @ x
    assert ops.combine(a, x, out=a) is a
    torch.testing.assert_close(a, expected, rtol=0, atol=0)
    # Batched, float64 (no dtype conversion, so no copy happened by the way either).
    c = _rand(3, 5, 5, dtype=torch.float64, device=device, seed=1)
    xs = _rand(3, 5, 5, dtype=torch.float64, device=device, seed=2)
    expected = c @ xs
    ops.combine(c, xs, out=c)
    torch.testing.assert_close(c, expected, rtol=1e-12, atol=1e-12)
    # The same memory under another storage (torch.from_dlpack): storage identity cannot tell
    # that `out` is the coefficients (the result was off by 3e4 when only it was checked).
    c = _rand(16, 256, dtype=torch.float32, device=device, seed=3)
    x = _rand(256, 256, dtype=torch.float32, device=device, seed=4)
    expected = c.double() @ x.double()
    alias = torch.from_dlpack(c)
    assert alias.data_ptr() == c.data_ptr()
    ops.combine(c, x, out=alias)
    torch.testing.assert_close(c.double(), expected, rtol=1e-4, atol=1e-3)
    c = _rand(16, 256, dtype=torch.float32, device=device, seed=3)
    ops.combine_list(c, [x], [torch.from_dlpack(c)])
    torch.testing.assert_close(c.double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_reads_coefficients_in_any_layout(device: str, dtype: torch.dtype) -> None:
    """Coefficients that already have the accumulation dtype are read in place unless an output
    shares their memory, so a transposed (non-contiguous) block must still be made dense first:
    ``Tensor.to(memory_format=contiguous)`` returns a transposed matrix as it is."""
    x = _rand(5, 300, dtype=dtype, device=device, seed=3)
    square = _rand(5, 3, dtype=torch.float64, device=device, seed=4)
    for coeffs in (square.T.to(dtype), square.T, square.to(dtype).T.contiguous()[:, ::1]):
        before = coeffs.clone()
        expected = coeffs.to(torch.float64) @ x.to(torch.float64)
        out = ops.combine(coeffs, x)
        torch.testing.assert_close(out.to(torch.float64), expected, rtol=1e-5, atol=1e-5)
        outs = [torch.full((3, 300), float("nan"), dtype=dtype, device=device)]
        ops.combine_list(coeffs, [x], outs)
        torch.testing.assert_close(outs[0].to(torch.float64), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(coeffs, before)
    # Per-tensor blocks given transposed ([P, m, k] from [P, k, m]).
    blocks = _rand(2, 5, 3, dtype=dtype, device=device, seed=5).transpose(1, 2)
    outs = [torch.full((3, 300), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    ops.combine_list(blocks, [x, x], outs, per_tensor=True)
    for p in range(2):
        torch.testing.assert_close(outs[p], blocks[p] @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_list_outputs_over_the_coefficients(device: str, op_path: str) -> None:
    c = torch.tensor([1.0, 2.0], device=device)
    ops.combine_list(c, [torch.ones(2, 2, device=device)], [c])
    assert c.tolist() == [3.0, 3.0]  # was [3.0, 5.0]: c[1] read after c[0] was written
    # One block per tensor: outs[1] is block 0, written while block 1 is read for outs[0] (and
    # the reverse); each output must come from the coefficients as they were.
    blocks = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
    xs = [torch.ones(2, 2, device=device), torch.ones(2, 2, device=device)]
    for order in ([blocks[1], blocks[0]], [blocks[0], blocks[1]]):
        blocks.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        ops.combine_list(blocks, xs, order, per_tensor=True)
        assert order[0].tolist() == [3.0, 3.0] and order[1].tolist() == [7.0, 7.0]


def test_combine_list_refuses_outputs_that_share_memory_across_the_list() -> None:
    """outs[p] against every xs[q], bases[q] and outs[q] (q != p): the kernels write every output
    while they read every input and base, on any thread. outs[0] being a view of xs[1] gave
    results that depended on the thread count."""
    n = 1 << 16
    x0, x1 = torch.ones(1, n), torch.full((1, n), 2.0)
    with pytest.raises(ValueError, match=r"combine_list: outs\[0\] overlaps xs\[1\]; an output "
                                         r"must not share memory"):
        ops.combine_list(torch.tensor([1.0]), [x0, x1], [x1[0], torch.zeros(n)])
    assert bool((x1 == 2.0).all())  # refused before anything was written
    buf = torch.zeros(10)
    with pytest.raises(ValueError, match=r"outs\[0\] overlaps outs\[1\]"):
        ops.combine_list(torch.ones(1), [torch.ones(1, 6), torch.ones(1, 6)], [buf[:6], buf[4:]])
    with pytest.raises(ValueError, match=r"outs\[1\] overlaps xs\[1\]"):  # was a RuntimeError
        ops.combine_list(torch.ones(1), [torch.ones(1, 4), buf.view(1, 10)], [buf[:4] * 0, buf])
    outs = [torch.zeros(5), torch.zeros(5)]
    with pytest.raises(ValueError, match=r"outs\[1\] overlaps bases\[0\]"):
        ops.combine_list(torch.ones(1), [torch.ones(1, 5)] * 2, outs, beta=1.0,
                         bases=[outs[1], outs[1].clone()])
    # What the kernels do not share is accepted: bases[p] = outs[p] itself; bases ignored by
    # beta = 0; an input that is not dense (read from a private copy, made before any write);
    # rows of one buffer that interleave with an output without touching it.
    ops.combine_list(torch.ones(1), [torch.ones(1, 5)] * 2, outs, beta=1.0, bases=outs)
    assert outs[0].tolist() == [1.0] * 5 and outs[1].tolist() == [1.0] * 5
    ops.combine_list(torch.ones(1), [torch.ones(1, 5)] * 2, outs, beta=0.0, bases=outs[::-1])
    grid = torch.arange(24.0).reshape(4, 6)
    transposed = grid.view(4, 2, 3).transpose(1, 2)  # [k=4, 3, 2], trailing dims not dense
    expected = transposed.sum(0).clone()
    out = grid[0, :6].view(3, 2)  # the memory of xs[0]'s first row
    with pytest.raises(ValueError, match=r"outs\[0\] overlaps xs\[0\]"):
        ops.combine_list(torch.ones(4), [grid.view(4, 3, 2)], [out])
    ops.combine_list(torch.ones(4), [transposed], [out])
    torch.testing.assert_close(out, expected)
    rows = torch.zeros(4, 5)
    ops.combine_list(torch.ones(2), [rows[::2], rows[::2]], [rows[1], rows[3]])  # rows 0, 2 read


@pytest.mark.parametrize("threads", [1, 2])
def test_combine_list_refuses_an_output_over_another_slots_input_at_any_thread_count(
        threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 1 << 20
        x0, x1 = torch.ones(1, n), torch.full((1, n), 2.0)
        with pytest.raises(ValueError, match=r"outs\[0\] overlaps xs\[1\]"):
            ops.combine_list(torch.tensor([1.0]), [x0, x1], [x1[0], torch.zeros(n)])
    finally:
        torch.set_num_threads(previous)
    import mtunlearn_ext.ops._checks as checks

    monkeypatch.setattr(checks, "has_extension", lambda: False)  # the reference path refuses too
    with pytest.raises(ValueError, match=r"outs\[0\] overlaps xs\[1\]"):
        ops.combine_list(torch.tensor([1.0]), [torch.ones(1, 8), x1[:, :8]], [x1[0, :8],
                                                                            torch.zeros(8)])


def _bad_list_calls() -> dict[str, object]:
    """Calls of the list ops with one thing wrong each (the compiled path checks them in C++)."""
    x, y = torch.randn(3, 4), torch.randn(2, 4)
    meta = torch.randn(3, 4, device="meta")
    ints = torch.ones(3, 4, dtype=torch.int64)
    ones = torch.ones(3)
    shared = torch.zeros(8)
    return {
        "gram_list empty": lambda: ops.gram_list([]),
        "gram_list not a tensor": lambda: ops.gram_list([x, 5]),
        "gram_list integer": lambda: ops.gram_list([x, ints]),
        "gram_list 0-d": lambda: ops.gram_list([x, torch.tensor(1.0)]),
        "gram_list k differs": lambda: ops.gram_list([x, y]),
        "gram_list dtype differs": lambda: ops.gram_list([x, x.double()]),
        "gram_list device differs": lambda: ops.gram_list([x, meta]),
        "inner_list lengths": lambda: ops.inner_list([y], [x, x]),
        "inner_list empty": lambda: ops.inner_list([], []),
        "inner_list trailing": lambda: ops.inner_list([y], [torch.randn(3, 5)]),
        "inner_list m differs": lambda: ops.inner_list([y, x], [x, x]),
        "inner_list k differs": lambda: ops.inner_list([y, y], [x, y]),
        "inner_list dtype": lambda: ops.inner_list([y], [x.half()]),
        "inner_list device": lambda: ops.inner_list([y], [meta]),
        "inner_list integer": lambda: ops.inner_list([y], [ints]),
        "inner_list not a tensor": lambda: ops.inner_list([y], [[1.0]]),
        "stacked trailing": lambda: ops.gram_list_stacked([y], [torch.randn(3, 2, 2)]),
        "stacked device": lambda: ops.gram_list_stacked([y, y], [x, meta]),
        # Review: a string reached the schema, whose pybind11 cast error named no argument.
        "gram_list per_tensor not a bool": lambda: ops.gram_list(
            [x], per_tensor="no"),  # type: ignore[arg-type]
        "inner_list per_tensor not a bool": lambda: ops.inner_list(
            [y], [x], per_tensor="no"),  # type: ignore[arg-type]
        "stacked per_tensor not a bool": lambda: ops.gram_list_stacked(
            [y], [x], per_tensor=[1]),  # type: ignore[arg-type]
        "combine per_tensor not a bool": lambda: ops.combine_list(
            torch.ones(1, 3), [x], [torch.ones(4)], per_tensor="no"),  # type: ignore[arg-type]
        "combine coeffs 0-d": lambda: ops.combine_list(torch.tensor(1.0), [x], [ones]),
        "combine coeffs 3-d": lambda: ops.combine_list(torch.ones(1, 1, 3), [x], [ones]),
        "combine coeffs integer": lambda: ops.combine_list(torch.ones(3, dtype=torch.int64), [x],
                                                           [torch.ones(4)]),
        "combine lengths": lambda: ops.combine_list(ones, [x, x], [torch.ones(4)]),
        "combine per-tensor count": lambda: ops.combine_list(torch.ones(2, 3), [x],
                                                             [torch.ones(4)], per_tensor=True),
        "combine k": lambda: ops.combine_list(ones, [y], [torch.ones(4)]),
        "combine out shape, same size": lambda: ops.combine_list(ones, [torch.randn(3, 2, 2)],
                                                                 [torch.ones(4)]),
        "combine out rows": lambda: ops.combine_list(torch.ones(2, 3), [x], [torch.ones(4)]),
        "combine out strided": lambda: ops.combine_list(
            torch.ones(2, 3), [x], [torch.ones(4, 2).T]),
        "combine out dtype": lambda: ops.combine_list(ones, [x], [torch.ones(4).double()]),
        "combine xs dtype": lambda: ops.combine_list(ones, [x, x.double()],
                                                     [torch.ones(4), torch.ones(4).double()]),
        "combine out device": lambda: ops.combine_list(ones, [x],
                                                       [torch.ones(4, device="meta")]),
        "combine out not a tensor": lambda: ops.combine_list(ones, [x], [None]),
        "combine bases length": lambda: ops.combine_list(ones, [x], [torch.ones(4)], beta=1.0,
                                                         bases=[]),
        "combine bases shape": lambda: ops.combine_list(ones, [x], [torch.ones(4)], beta=1.0,
                                                        bases=[torch.ones(2, 2)]),
        "combine bases dtype": lambda: ops.combine_list(ones, [x], [torch.ones(4)], beta=1.0,
                                                        bases=[torch.ones(4).double()]),
        "combine bases device": lambda: ops.combine_list(ones, [x], [torch.ones(4)], beta=1.0,
                                                         bases=[torch.ones(4, device="meta")]),
        "combine out over another input": lambda: ops.combine_list(
            ones, [torch.randn(3, 4), x], [x[1], torch.zeros(4)]),
        "combine out over its own input": lambda: ops.combine_list(ones, [x], [x[1]]),
        "combine outs overlap": lambda: ops.combine_list(ones, [x, x], [shared[:4], shared[2:6]]),
        "combine out over another base": lambda: ops.combine_list(
            ones, [x, x], [shared[:4], shared[4:]], beta=1.0, bases=[shared[4:], shared[4:]]),
    }


@pytest.mark.parametrize("case", sorted(_bad_list_calls()))
def test_list_op_errors_match_the_reference_path(case: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The list ops skip their Python checks when the compiled op accepts its arguments (they
    cost more than the op on a parameter list), so the C++ entries must reject everything the
    Python checks reject, and the error must then be the reference path's, word for word."""
    call = _bad_list_calls()[case]
    with pytest.raises((TypeError, ValueError)) as compiled:
        call()
    import mtunlearn_ext.ops._checks as checks

    monkeypatch.setattr(checks, "has_extension", lambda: False)
    with pytest.raises((TypeError, ValueError)) as reference:
        call()
    assert type(compiled.value) is type(reference.value)
    assert str(compiled.value) == str(reference.value)
    assert "mtunlearn_ext.ops." in str(compiled.value)
    # Alone: not the last of a chain ("During handling of the above exception, another
    # exception occurred") through the compiled op's own error and every op on the way.
    assert compiled.value.__context__ is None and compiled.value.__cause__ is None


def test_a_list_projection_error_is_told_once_in_the_callers_words() -> None:
    """Review: a bad basis to `project_out_list` printed four chained tracebacks, the middle
    ones naming `gram_list_stacked`'s `xs` / `ys`, which the caller never called."""
    from mtunlearn_ext.surgery import project_out_list

    with pytest.raises(ValueError, match=r"^mtunlearn_ext\.surgery\.project_out_list: every "
                                         r"`basis_list\[p\]` must be a stack") as raised:
        project_out_list([torch.randn(2, 4, 5), torch.randn(2, 7)],
                         [torch.randn(3, 4, 5), torch.randn(2, 7)])
    assert raised.value.__context__ is None and raised.value.__cause__ is None


def test_list_ops_reject_mixed_devices_in_the_fake_kernels() -> None:
    """Called directly, a list mixing meta and CPU tensors dispatches to the fake kernel (Meta
    outranks CPU); it must refuse rather than return an uninitialised CPU tensor."""
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`xs\[1\]` is on meta"):
        torch.ops.mtunlearn.gram_list([x, x.to("meta")], False)
    with pytest.raises(ValueError, match=r"`outs\[0\]` is on meta"):
        torch.ops.mtunlearn.combine_list_([torch.ones(4, device="meta")], torch.ones(3), [x],
                                          0.0, False)


def test_list_ops_called_directly_with_empty_lists_name_the_argument() -> None:
    """Review: with no tensor there is no dispatch key, and the raw ops failed with the
    dispatcher's NotImplementedError ("no fallback function is registered"), naming no
    argument; the Python wrappers named it."""
    T = torch.ops.mtunlearn
    calls = {"gram_list: `xs`": lambda: T.gram_list([], False),
             "inner_list: `a_list`": lambda: T.inner_list([], [], False),
             "gram_list_stacked: `xs`": lambda: T.gram_list_stacked([], [], True)}
    for message, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(f"mtunlearn::{message} must hold at "
                                                       "least one tensor, got an empty list")):
            call()


def test_single_tensor_ops_reject_mixed_devices_in_the_fake_kernels() -> None:
    """Review: the list ops' fake kernels refused a meta/CPU mix, the others did not, so a
    direct call returned a CPU tensor of uninitialised memory (inner, combine, ridge_solve,
    nonconflicting_dual, project_out, project_nonconflicting) or did nothing (combine_)."""
    T = torch.ops.mtunlearn
    cpu, meta = torch.randn(3, 8), torch.empty(4, 8, device="meta")
    calls = {
        "inner: `b` is on meta but `a` is on cpu": lambda: T.inner(cpu, meta),
        "combine: `x` is on cpu but `coeffs` is on meta":
            lambda: T.combine(torch.empty(2, 3, device="meta"), cpu),
        "combine_: `coeffs` is on cpu but `out` is on meta":
            lambda: T.combine_(torch.empty(2, 8, device="meta"), torch.ones(2, 3), cpu, 0.0),
        "ridge_solve: `rhs` is on cpu but `gram` is on meta":
            lambda: T.ridge_solve(torch.empty(3, 3, device="meta"), torch.ones(3, 2), 0.0),
        "nonconflicting_dual: `rhs` is on cpu but `gram` is on meta":
            lambda: T.nonconflicting_dual(torch.empty(3, 3, device="meta"), torch.ones(2, 3)),
        "project_out: `basis` is on meta but `g` is on cpu":
            lambda: T.project_out(cpu, torch.empty(2, 8, device="meta"), 0.0),
        "project_nonconflicting: `r` is on meta but `g` is on cpu":
            lambda: T.project_nonconflicting(cpu, torch.empty(2, 8, device="meta"), 1),
    }
    for message, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(f"mtunlearn::{message}")):
            call()


def test_fake_kernels_refuse_what_the_compiled_kernels_refuse() -> None:
    """Kernel review: the fake kernels checked devices only, so under torch.compile a call the
    kernels refuse (an inner of two n, a solver past k = 256, a combine of mismatched k) traced
    into a graph with made-up shapes and failed only when it ran, or raised an IndexError of
    the fake's own. Each bad call now raises the same exception on meta tensors (the fake
    kernel) as on the CPU (the C++), naming the op and the argument."""
    T = torch.ops.mtunlearn

    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.ones(shape, dtype=dtype)

    calls: dict[str, tuple[type[Exception], str, Callable[[Callable[..., torch.Tensor]], object]]]
    calls = {
        "gram of a vector": (ValueError, "gram: `x`", lambda d: T.gram(d(5))),
        "gram of ints": (TypeError, "gram: `x`", lambda d: T.gram(d(2, 5, dtype=torch.int64))),
        "inner of two n": (ValueError, "inner: `a`", lambda d: T.inner(d(2, 5), d(3, 6))),
        "inner of two leads": (ValueError, "inner: `a`",
                               lambda d: T.inner(d(4, 2, 5), d(3, 3, 5))),
        "inner of two dtypes": (TypeError, "inner: `b`",
                                lambda d: T.inner(d(2, 5), d(3, 5, dtype=torch.float64))),
        "combine of two k": (ValueError, "combine: `coeffs`",
                             lambda d: T.combine(d(2, 3), d(4, 5))),
        "combine of two ranks": (ValueError, "combine: `coeffs`",
                                 lambda d: T.combine(d(2, 2, 3), d(3, 5))),
        "combine_ into a wrong shape": (ValueError, "combine_: `out`",
                                        lambda d: T.combine_(d(3, 5), d(2, 3), d(3, 5), 0.0)),
        "ridge_solve past k = 256": (ValueError, "ridge_solve: `gram`",
                                     lambda d: T.ridge_solve(d(300, 300), d(300, 1), 0.0)),
        "ridge_solve of a non-square gram": (ValueError, "ridge_solve: `gram`",
                                             lambda d: T.ridge_solve(d(3, 4), d(3, 1), 0.0)),
        "ridge_solve of a wrong rhs": (ValueError, "ridge_solve: `rhs`",
                                       lambda d: T.ridge_solve(d(3, 3), d(4, 2), 0.0)),
        "nonconflicting_dual of a wrong rhs": (ValueError, "nonconflicting_dual: `rhs`",
                                               lambda d: T.nonconflicting_dual(d(3, 3), d(2, 4))),
        # Mutation review: without the leading-dims check the CPU kernels read and wrote past
        # a smaller rhs batch (glibc aborted: "free(): invalid size").
        "ridge_solve of another rhs batch": (
            ValueError, "ridge_solve: `rhs` must be [..., k, m] with k=3 and the Gram's leading",
            lambda d: T.ridge_solve(d(4, 3, 3), d(1, 3, 2), 0.0)),
        "ridge_solve of another rhs rank": (
            ValueError, "ridge_solve: `rhs` must be [..., k, m] with k=3 and the Gram's leading",
            lambda d: T.ridge_solve(d(2, 3, 3), d(3, 2), 0.0)),
        "nonconflicting_dual of another rhs batch": (
            ValueError, "nonconflicting_dual: `rhs` must be [..., m, k] with k=3 and the Gram's",
            lambda d: T.nonconflicting_dual(d(4, 3, 3), d(1, 2, 3))),
        "nonconflicting_dual of another rhs rank": (
            ValueError, "nonconflicting_dual: `rhs` must be [..., m, k] with k=3 and the Gram's",
            lambda d: T.nonconflicting_dual(d(2, 3, 3), d(2, 3))),
        "pcgrad_weights of a non-square gram": (ValueError, "pcgrad_weights: `gram`",
                                                lambda d: T.pcgrad_weights(d(3, 4), 0)),
        "project_out of two n": (ValueError, "project_out: `g`",
                                 lambda d: T.project_out(d(2, 5), d(3, 6), 0.0)),
        "project_out past k = 256": (ValueError, "project_out: `basis`",
                                     lambda d: T.project_out(d(2, 5), d(300, 5), 0.0)),
        "project_nonconflicting of two dtypes": (
            TypeError, "project_nonconflicting: `r`",
            lambda d: T.project_nonconflicting(d(2, 5), d(3, 5, dtype=torch.float64), 1)),
        "pcgrad past k = 256": (ValueError, "pcgrad: `x`", lambda d: T.pcgrad(d(300, 5), 0)),
        "gram_list of two k": (ValueError, "gram_list: every tensor in `xs`",
                               lambda d: T.gram_list([d(3, 4), d(2, 4)], False)),
        "gram_list of a 0-d tensor": (ValueError, "gram_list: xs[1] must be a stack [k, ...], "
                                                  "got shape []",
                                      lambda d: T.gram_list([d(3, 4), d()], False)),
        # Ops review: a 0-d first tensor was "[k, ...] with the same k=-1".
        "gram_list of a 0-d first tensor": (ValueError, "gram_list: xs[0] must be a stack "
                                                        "[k, ...], got shape []",
                                            lambda d: T.gram_list([d(), d(3, 4)], False)),
        "inner_list of a 0-d first tensor": (ValueError, "inner_list: a_list[0] must be a stack "
                                                         "[m, ...], got shape []",
                                             lambda d: T.inner_list([d()], [d(3)], False)),
        "inner_list of a 0-d second list's tensor": (
            ValueError, "inner_list: b_list[0] must be a stack [k, ...], got shape []",
            lambda d: T.inner_list([d(2, 3)], [d()], False)),
        "inner_list of two trailing shapes": (ValueError, "inner_list: a_list[0] and b_list[0]",
                                              lambda d: T.inner_list([d(2, 4)], [d(3, 5)], False)),
        "inner_list of two lengths": (ValueError, "inner_list: `a_list` and `b_list`",
                                      lambda d: T.inner_list([d(2, 4)], [d(3, 4), d(3, 4)],
                                                             False)),
        "gram_list_stacked of two m": (ValueError, "gram_list_stacked: xs[1]",
                                       lambda d: T.gram_list_stacked([d(2, 4), d(3, 4)],
                                                                     [d(3, 4), d(3, 4)], False)),
        "combine_list_ into a wrong shape": (ValueError, "combine_list_: outs[0]",
                                             lambda d: T.combine_list_([d(4)], d(3), [d(3, 5)],
                                                                       0.0, False)),
        "combine_list_ of a 3-d block": (ValueError, "combine_list_: `coeffs`",
                                         lambda d: T.combine_list_([d(2, 5)], d(1, 2, 3),
                                                                   [d(3, 5)], 0.0, False)),
        "combine_list_from_ without a base each": (
            ValueError, "combine_list_from_: `bases`",
            lambda d: T.combine_list_from_([d(5)], [], d(3), [d(3, 5)], 1.0, False)),
        "combine_list_ into a strided out": (
            ValueError, "combine_list_: outs[0] must be contiguous",
            lambda d: T.combine_list_([d(5, 2).T], d(2, 3), [d(3, 5)], 0.0, False)),
        "combine_list_from_ of a base of another shape": (
            ValueError, "combine_list_from_: bases[0]",
            lambda d: T.combine_list_from_([d(5)], [d(6)], d(3), [d(3, 5)], 1.0, False)),
        "ridge_solve with a NaN ridge": (ValueError, "ridge_solve: `ridge`",
                                         lambda d: T.ridge_solve(d(3, 3), d(3, 1), math.nan)),
        "project_out with a negative ridge": (ValueError, "project_out: `ridge`",
                                              lambda d: T.project_out(d(2, 5), d(3, 5), -1.0)),
        "project_nonconflicting with sign 2": (
            ValueError, "project_nonconflicting: `sign`",
            lambda d: T.project_nonconflicting(d(2, 5), d(3, 5), 2)),
    }
    for case, (error, named, call) in calls.items():
        for device in ("cpu", "meta"):
            def make(*shape: int, dtype: torch.dtype = torch.float32,
                     device: str = device) -> torch.Tensor:
                return t(*shape, dtype=dtype).to(device)

            with pytest.raises(error, match=re.escape(f"mtunlearn::{named}")) as raised:
                call(make)
            assert "IndexError" not in type(raised.value).__name__, (case, device)
    # What the kernels accept, the fakes accept: a base of another shape is never read at
    # beta = 0, and a float32 coefficient block goes with half-precision stacks.
    for device in ("cpu", "meta"):
        T.combine_list_from_([torch.ones(5, device=device)], [torch.ones(6, device=device)],
                             torch.ones(3, device=device), [torch.ones(3, 5, device=device)],
                             0.0, False)
        T.combine(torch.ones(2, 3, device=device), torch.ones(3, 5, dtype=torch.float16,
                                                                device=device))


def test_fake_kernels_refuse_the_rest_of_what_the_compiled_kernels_refuse() -> None:
    """Mutation audit: the checks the first table leaves out (dtype agreement of lists and
    in-place outputs, a strided combine_ output, a list's second row count, per_tensor's block
    count, a non-float coefficient block), each raised on meta (the fake kernel) as on the CPU
    (the C++), naming the op and the argument."""
    T = torch.ops.mtunlearn
    f64 = torch.float64

    calls: dict[str, tuple[type[Exception], str, Callable[[Callable[..., torch.Tensor]], object]]]
    calls = {
        "combine_ into a strided out": (
            ValueError, "combine_: `out` must be contiguous",
            lambda d: T.combine_(d(5, 2).T, d(2, 3), d(3, 5), 0.0)),
        "combine_ into an out of another dtype": (
            TypeError, "combine_: `out`",
            lambda d: T.combine_(d(2, 5, dtype=f64), d(2, 3), d(3, 5), 0.0)),
        "combine of an integer x": (
            TypeError, "combine: `x`", lambda d: T.combine(d(2, 3), d(3, 5, dtype=torch.int64))),
        "gram_list of two dtypes": (
            TypeError, "gram_list: `xs[1]`",
            lambda d: T.gram_list([d(3, 4), d(3, 4, dtype=f64)], False)),
        "inner_list of two k": (
            ValueError, "inner_list: b_list[1]",
            lambda d: T.inner_list([d(2, 4), d(2, 4)], [d(3, 4), d(2, 4)], False)),
        "combine_list_ with per_tensor and too many blocks": (
            ValueError, "combine_list_: with per_tensor=True",
            lambda d: T.combine_list_([d(5)], d(2, 3), [d(3, 5)], 0.0, True)),
        "combine_list_ of integer coeffs": (
            TypeError, "combine_list_: `coeffs`",
            lambda d: T.combine_list_([d(5)], d(3, dtype=torch.int64), [d(3, 5)], 0.0, False)),
        "combine_list_ into an out of another dtype": (
            TypeError, "combine_list_: `outs[0]`",
            lambda d: T.combine_list_([d(5, dtype=f64)], d(3), [d(3, 5)], 0.0, False)),
        "combine_list_from_ of a base of another dtype": (
            TypeError, "combine_list_from_: `bases[0]`",
            lambda d: T.combine_list_from_([d(5)], [d(5, dtype=f64)], d(3), [d(3, 5)], 1.0,
                                           False)),
        "ridge_solve at k = 257": (ValueError, "ridge_solve: `gram` has k=257",
                                   lambda d: T.ridge_solve(d(257, 257), d(257, 1), 0.0)),
        "project_out at k = 257": (ValueError, "project_out: `basis` has k=257",
                                   lambda d: T.project_out(d(2, 5), d(257, 5), 0.0)),
        "pcgrad at k = 257": (ValueError, "pcgrad: `x` has k=257",
                              lambda d: T.pcgrad(d(257, 5), 0)),
    }
    for case, (error, named, call) in calls.items():
        for device in ("cpu", "meta"):
            def make(*shape: int, dtype: torch.dtype = torch.float32,
                     device: str = device) -> torch.Tensor:
                return torch.ones(shape, dtype=dtype, device=device)

            with pytest.raises(error, match=re.escape(f"mtunlearn::{named}")):
                call(make)
    # The solvers' bound itself (k = 256) is accepted by both, with the ridge 0 and sign -1
    # they also accept.
    for device in ("cpu", "meta"):
        def ones(*shape: int, device: str = device) -> torch.Tensor:
            return torch.ones(shape, device=device)

        T.ridge_solve(ones(256, 256), ones(256, 1), 0.0)
        T.project_out(ones(2, 5), ones(256, 5), 0.0)
        T.project_nonconflicting(ones(2, 5), ones(256, 5), -1)
        T.pcgrad(ones(256, 5), 0)
        T.nonconflicting_dual(ones(3, 3), ones(5, 3))  # rhs [m, k], m != k


def test_wrappers_propagate_shapes_of_meta_and_fake_tensors_with_the_finite_check_on() -> None:
    """Shape propagation (meta tensors, FakeTensorMode) through the checked wrappers with their
    default ``check_finite=True``: there are no values to check, so the check steps aside
    instead of failing on ``.item()``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def shapes(device: str | None) -> list[tuple[int, ...]]:
        kw = {} if device is None else {"device": device}
        basis, g = torch.randn(4, 10, **kw), torch.randn(2, 10, **kw)
        xs = [torch.randn(4, 5, **kw), torch.randn(4, 3, 2, **kw)]
        results = [ops.gram(basis), ops.inner(g, basis), ops.gram_list(xs),
                   ops.project_out(g, basis), ops.project_nonconflicting(g, basis),
                   ops.pcgrad(basis), ops.combine(torch.ones(2, 4, **kw), basis)]
        return [tuple(r.shape) for r in results]

    expected = [(4, 4), (2, 4), (4, 4), (2, 10), (2, 10), (10,), (2, 10)]
    assert shapes("meta") == expected
    with FakeTensorMode():
        assert shapes(None) == expected
    with pytest.raises(FloatingPointError, match="`x` contains NaN or Inf"):
        ops.gram(torch.full((2, 3), float("nan")))  # real tensors are still checked


def test_fake_kernels_give_the_projections_coefficients_of_m_rows_by_k() -> None:
    """Under meta tensors and FakeTensorMode the coefficients come from the fake kernels: ``a^T``
    of project_out and ``w`` of project_nonconflicting are ``[..., m, k]`` (m rows of g, k of
    the basis), pcgrad's ``w`` is ``[..., k]``. With m != k a ``[..., m, m]`` shape shows, and
    would mislead torch.compile's shape propagation."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def shapes(device: str | None) -> list[tuple[tuple[int, ...], torch.dtype]]:
        kw = {} if device is None else {"device": device}
        g, basis = torch.randn(3, 2, 10, **kw), torch.randn(3, 5, 10, **kw)
        half = torch.randn(3, 5, 10, dtype=torch.float16, **kw)
        results = [ops.project_out(g, basis, return_coeffs=True)[1],
                   ops.project_out(basis, g, return_coeffs=True)[1],
                   ops.project_nonconflicting(g, basis, return_coeffs=True)[1],
                   ops.project_nonconflicting(basis, g, -1, return_coeffs=True)[1],
                   ops.project_out(half[:, :2], half, return_coeffs=True)[1],
                   ops.pcgrad(basis, return_coeffs=True)[1]]
        return [(tuple(r.shape), r.dtype) for r in results]

    f32 = torch.float32
    expected = [((3, 2, 5), f32), ((3, 5, 2), f32), ((3, 2, 5), f32), ((3, 5, 2), f32),
                ((3, 2, 5), f32), ((3, 5), f32)]
    assert shapes(None) == expected  # the real kernels, the contract
    assert shapes("meta") == expected
    with FakeTensorMode():
        assert shapes(None) == expected
    g, basis = _rand(2, 9, seed=1), _rand(5, 9, seed=2)
    torch.library.opcheck(torch.ops.mtunlearn.project_out, (g, basis, 1e-6))
    torch.library.opcheck(torch.ops.mtunlearn.project_nonconflicting, (g, basis, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_ridge_solve_matches_linalg(device: str) -> None:
    for k, m in [(1, 1), (5, 3), (16, 1), (64, 4), (256, 2)]:
        a = _rand(3, k, 3 * k + 5, dtype=torch.float64, device=device, seed=k)  # well-conditioned
        g = a @ a.transpose(-1, -2)
        rhs = _rand(3, k, m, dtype=torch.float64, device=device, seed=k + 1)
        result = ops.ridge_solve(g, rhs, ridge=1e-9)
        # numpy, not torch.linalg.solve: after torch.set_num_threads(1) -> (2) (an earlier test),
        # torch 2.14's batched float64 solve at k=256 returned garbage (1e26) on this machine.
        lam = ref.ridge_lambda(g, 1e-9).cpu().numpy()
        system = g.cpu().numpy() + lam[:, None, None] * np.eye(k)
        expected = torch.from_numpy(np.linalg.solve(system, rhs.cpu().numpy())).to(device)
        assert torch.allclose(result, expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))


def test_ridge_solve_refuses_more_rhs_entries_than_its_32_bit_index() -> None:
    """One problem's k x m right-hand sides are indexed with 32-bit ints; past 2**31 - 1 the
    index wrapped. A stride-0 rhs gives the size without the memory."""
    rhs = torch.zeros(2, 1, dtype=torch.float64).expand(2, 2**30 + 1)
    with pytest.raises(ValueError, match=r"`rhs` must have at most 2\*\*31 - 1 entries per "
                                         r"problem \(k x m\), got k=2, m=1073741825"):
        ops.ridge_solve(torch.eye(2, dtype=torch.float64), rhs, ridge=0.0)


def _pinv_projection(g: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    b = basis.double()
    return g.double() - (g.double() @ torch.linalg.pinv(b)) @ b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# m > k, and m = k past 16, take a Gram of the basis and its inner products with g in two
# passes (csrc/ops/surgery, gram_and_cross); the others one stacked pass.
@pytest.mark.parametrize("m,k,n", [(1, 1, 10), (1, 4, 1000), (3, 8, 5001), (2, 32, 700),
                                   (6, 2, 333), (20, 20, 400), (40, 17, 257)])
def test_project_out_matches_pseudo_inverse(device: str, dtype: torch.dtype, m: int, k: int,
                                            n: int, op_path: str) -> None:
    """Through the kernels and through the fallback (``op_path``: test review, the fallback's
    values were checked nowhere), against pinv; the coefficients are the ones the output is
    made of, ``out = g - a @ basis`` (they were checked for their shape only)."""
    g = _rand(m, n, dtype=dtype, device=device, seed=n)
    basis = _rand(k, n, dtype=dtype, device=device, seed=n + 1)
    out, coeffs = ops.project_out(g, basis, ridge=1e-10 if dtype == torch.float64 else 1e-7,
                                  return_coeffs=True)
    assert out.dtype == dtype and out.shape == (m, n) and coeffs.shape == (m, k)
    expected = _pinv_projection(g, basis)
    tol = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    bound = tol[dtype] * float(g.double().abs().max())
    assert float((out.double() - expected).abs().max()) <= bound
    rebuilt = g.double() - coeffs.double() @ basis.double()
    assert float((out.double() - rebuilt).abs().max()) <= bound
    # Orthogonal to every basis row, relative to |g| |b| (relative to |out|, a cosine, the
    # bound could not fail: a cosine is at most 1). Measured: 1.3e-10 / 1.8e-7 / 1.2e-4 /
    # 4.9e-4 for fp64 / fp32 / fp16 / bf16; the output's own rounding sets the last two.
    orthogonality = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3,
                     torch.bfloat16: 4e-3}
    residual = ref.inner(out.double(), basis.double()) / (
        g.double().norm(dim=-1, keepdim=True) * basis.double().norm(dim=-1))
    assert float(residual.abs().max()) <= orthogonality[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_project_out_rank_deficient_and_idempotent(device: str) -> None:
    base = _rand(3, 4000, device=device, seed=21)
    # 8 rows spanning only 3 directions: duplicates and combinations.
    mix = _rand(8, 3, device=device, seed=22)
    basis = mix @ base
    g = _rand(2, 4000, device=device, seed=23)
    once = ops.project_out(g, basis)
    expected = _pinv_projection(g, base)
    assert float((once.double() - expected).abs().max()) <= 1e-4 * float(g.abs().max())
    twice = ops.project_out(once, basis)
    assert float((twice - once).abs().max()) <= 1e-5 * float(once.abs().max())
    # Projecting a basis row leaves ~nothing.
    assert float(ops.project_out(basis[:1], basis).abs().max()) <= 1e-3 * float(basis[0].norm() / 60)
    # An all-zero basis leaves g unchanged.
    assert torch.equal(ops.project_out(g, torch.zeros_like(basis)), g)


def _nnls_projection(g: np.ndarray, r: np.ndarray, sign: int) -> np.ndarray:
    """Independent oracle: the dual min_{w>=0} |sign r^T w + g|^2 is an NNLS problem whose
    residual is the projection."""
    w, _ = scipy.optimize.nnls(sign * r.T, -g, maxiter=50 * r.shape[0])
    return g + sign * r.T @ w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("m,k,n", [(1, 1, 5), (1, 3, 50), (2, 8, 400), (3, 16, 1000),
                                   (1, 64, 3000), (2, 200, 2500), (5, 3, 200), (20, 20, 500),
                                   (33, 8, 300)])
def test_project_nonconflicting_matches_nnls(device: str, dtype: torch.dtype, sign: int, m: int,
                                             k: int, n: int, op_path: str) -> None:
    r = _rand(k, n, dtype=dtype, device=device, seed=k + n)
    g = _rand(m, n, dtype=dtype, device=device, seed=k * n) - 0.3 * sign * r.double().mean(
        0, keepdim=True).to(dtype)  # make conflicts likely
    d, w = ops.project_nonconflicting(g, r, sign=sign, return_coeffs=True)
    assert d.shape == (m, n) and w.shape == (m, k) and bool((w >= 0).all())
    gd, rd = g.double().cpu().numpy(), r.double().cpu().numpy()
    tol = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    # The multipliers are the ones d is made of: d = g + sign * w @ r.
    rebuilt = g.double() + sign * w.double() @ r.double()
    assert float((d.double() - rebuilt).abs().max()) <= tol * float(g.double().abs().max())
    for i in range(m):
        expected = _nnls_projection(gd[i], rd, sign)
        scale = np.abs(gd[i]).max()
        assert np.abs(d[i].double().cpu().numpy() - expected).max() <= tol * scale
    # Feasible: no conflict with any r_j, up to rounding.
    inner = sign * (d.double() @ r.double().T)
    bound = d.double().norm(dim=-1, keepdim=True) * r.double().norm(dim=-1)
    assert float((inner / bound).min()) >= -tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(40))
def test_project_nonconflicting_is_exact_with_more_rows_than_dimensions(device: str,
                                                                        seed: int) -> None:
    """k > n: G is singular, the coordinate descent can run out of sweeps and the exact polish
    does not apply to dependent rows; 18 of 300 such UPGrad problems were off by up to 5% of the
    largest row norm. The exact active-set fallback now finishes them (vs SciPy's NNLS)."""
    gen = torch.Generator().manual_seed(seed)
    k = 3 + seed % 14
    n = 1 + seed % max(1, k - 1)
    r = (torch.randn(k, n, generator=gen, dtype=torch.float64)
         * torch.rand(k, 1, generator=gen, dtype=torch.float64).add(0.1)).to(device)
    d = ops.project_nonconflicting(r, r, sign=1)  # every row against all of them (UPGrad)
    rd = r.cpu().numpy()
    expected = np.stack([_nnls_projection(rd[i], rd, 1) for i in range(k)])
    scale = float(np.abs(rd).max())
    assert np.abs(d.cpu().numpy() - expected).max() <= 1e-9 * scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,n,duplicated", [(48, 40, 0), (40, 60, 2), (33, 20, 6)])
def test_project_nonconflicting_is_exact_on_singular_grams_of_high_rank(
        device: str, k: int, n: int, duplicated: int) -> None:
    """Singular Grams whose rank is more than half their rows (a few more tasks than dimensions,
    or duplicated tasks among independent ones): the descent stops at its rank check and the
    active set, whose factor grows a row at a time, finishes every row's dual (UPGrad's
    problems). Before, only Grams of rank <= k / 2 were handed over and the rest ran the
    descent's whole budget (185 s for one UPGrad of a [256, 130] matrix)."""
    gen = torch.Generator().manual_seed(k + n)
    r = torch.randn(k, n, generator=gen, dtype=torch.float64)
    r[k - duplicated:] = r[:duplicated] * 2.0  # same directions, other lengths
    rank = int(torch.linalg.matrix_rank(r))
    assert k / 2 < rank < k
    r = r.to(device)
    d = ops.project_nonconflicting(r, r, sign=1)
    rd = r.cpu().numpy()
    expected = np.stack([_nnls_projection(rd[i], rd, 1) for i in range(k)])
    scale = float(np.abs(rd).max())
    assert np.abs(d.cpu().numpy() - expected).max() <= 1e-9 * scale
    assert float((d @ r.T).min()) >= -1e-9 * scale**2


def _rows_near_one_direction(rng: np.random.Generator, k: int, n: int, noise: float
                             ) -> np.ndarray:
    """``k`` rows ``a_i u + noise`` (``cond(R) ~ 1 / noise``): with ``k > n`` a singular,
    ill-conditioned Gram, where the dual's descent runs out of sweeps, its polish meets dependent
    rows and the exact active-set fallback must finish."""
    return (rng.standard_normal((k, 1)) @ rng.standard_normal((1, n))
            + noise * rng.standard_normal((k, n)))


def _nnls_error_and_violation(d: torch.Tensor, g: np.ndarray, r: np.ndarray
                              ) -> tuple[float, float]:
    """``|d - d_nnls| / |g|`` and the largest constraint violation ``-<d, r_j> / (|r_j| |g|)``
    (``sign=1``), in float64 on the values the op saw."""
    dd = d.double().cpu().numpy()[0]
    scale = float(np.linalg.norm(g))
    error = float(np.linalg.norm(dd - _nnls_projection(g[0], r, 1))) / scale
    violation = float(-(r @ dd / np.linalg.norm(r, axis=1)).min()) / scale
    return error, violation


@pytest.mark.parametrize("device", DEVICES)
def test_project_nonconflicting_finishes_the_reviewed_k_gt_n_case(device: str) -> None:
    """k = 12 rows in n = 6 dimensions near one direction (float64, cond(R) = 6e3): the active-set
    fallback re-added a row whose Cholesky pivot it had dropped as dependent until its budget ran
    out, and the op returned the unconverged descent iterate, 0.75 |g| from SciPy's NNLS with a
    constraint violated by 7e-3 |g|."""
    rng = np.random.default_rng(2)
    for _ in range(12):  # the 12th draw of this stream
        r, g = _rows_near_one_direction(rng, 12, 6, 1e-3), rng.standard_normal((1, 6))
    assert 5e3 < np.linalg.cond(r) < 7e3
    d, w = ops.project_nonconflicting(torch.tensor(g, device=device),
                                      torch.tensor(r, device=device), return_coeffs=True)
    error, violation = _nnls_error_and_violation(d, g, r)
    assert error <= 1e-7 and violation <= 1e-10 and bool((w >= 0).all())
    # The dual objective 1/2 |R^T w + g|^2 is NNLS's minimum.
    expected = _nnls_projection(g[0], r, 1)
    objective = 0.5 * float(np.sum((w.cpu().numpy()[0] @ r + g[0]) ** 2))
    assert objective <= 0.5 * float(np.sum(expected**2)) * (1 + 1e-9)


# (noises, tolerance on |d - d_nnls| / |g|, on the violation, and on the violation per
# cond(R)^2). cond(R) ~ 1 / noise; past 1e-3 (cond 1e5) the Gram form cannot resolve the rows'
# independent parts any more (pivots ~ cond^-2 reach its rounding level). The float64 Gram's own
# rounding moves the answer by ~eps cond(G) = eps cond(R)^2: the CUDA Gram sums in another order,
# and on the H200 one problem at cond(R) = 1.6e4 came out violated by 1.7e-8 |g| where the CPU
# gives 2.6e-11; relative perturbations of 4e-16 of that Gram on the CPU give up to 5.2e-8 (eps
# cond^2 = 5.7e-8). A float32 Gram's rounding (1e-7 of its largest entry) already blurs them at
# noise 0.3 (some 0.25 |g| off): float32 is checked where it is determined.
_NEAR_ONE_DIRECTION = {
    torch.float64: ([1.0, 0.3, 0.1, 1e-2, 1e-3], 1e-6, 1e-8, 4 * np.finfo(np.float64).eps),
    torch.float32: ([1.0], 1e-3, 1e-4, 0.0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,n", [(5, 3), (12, 6), (40, 20), (256, 50)])
def test_project_nonconflicting_with_more_rows_near_one_direction_matches_nnls(
        device: str, dtype: torch.dtype, k: int, n: int) -> None:
    """k > n rows near one common direction, down to cond(R) = 1e4 in float64: the projection is
    SciPy's NNLS (the descent, the polish or the active set, whichever finishes) and feasible.
    Before the active set excluded the rows its Cholesky drops as dependent, up to 0.99 |g| off
    in float64 (noise 1e-3) and 0.13 |g| in float32 (noise 1)."""
    noises, tol, feasibility, per_cond_squared = _NEAR_ONE_DIRECTION[dtype]
    rng = np.random.default_rng(1000 + k)
    for noise in noises:
        for trial in range(20 if k < 100 else 4):
            rows = _rows_near_one_direction(rng, k, n, noise)
            r = torch.tensor(rows, dtype=dtype, device=device)
            g = torch.tensor(rng.standard_normal((1, n)), dtype=dtype, device=device)
            d = ops.project_nonconflicting(g, r)
            error, violation = _nnls_error_and_violation(d, g.double().cpu().numpy(),
                                                         r.double().cpu().numpy())
            allowed = feasibility + per_cond_squared * np.linalg.cond(rows) ** 2
            assert error <= tol and violation <= allowed, (noise, trial, error, violation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_singular_grams_stay_finite_and_feasible(device: str, dtype: torch.dtype) -> None:
    # More rows than dimensions: every Gram is singular. Found by the property tests.
    for k, n in [(6, 1), (9, 2), (40, 7)]:
        r = _rand(k, n, dtype=dtype, device=device, seed=k)
        g = _rand(2, n, dtype=dtype, device=device, seed=n)
        out = ops.project_out(g, r, ridge=0.0)
        assert torch.isfinite(out).all()
        # r spans R^n, so nothing is left (up to the Gram's rounding level).
        assert float(out.abs().max()) <= (1e-5 if dtype == torch.float64 else 2e-3) * float(g.abs().max())
        for sign in (1, -1):
            d = ops.project_nonconflicting(g, r, sign=sign)
            expected = np.stack([_nnls_projection(gi, r.double().cpu().numpy(), sign)
                                 for gi in g.double().cpu().numpy()])
            assert np.abs(d.double().cpu().numpy() - expected).max() <= 1e-4 * float(g.abs().max())
            worst = float((sign * (d.double() @ r.double().T)).min())
            assert worst >= -1e-4 * float(g.double().norm()) * float(r.double().norm(dim=1).max())


@pytest.mark.parametrize("device", DEVICES)
def test_project_nonconflicting_keeps_nonconflicting_rows(device: str) -> None:
    r = _rand(5, 300, dtype=torch.float64, device=device, seed=1)
    g = (r.sum(0, keepdim=True) * 3 + 0.01 * _rand(1, 300, dtype=torch.float64,
                                                   device=device, seed=2))
    if bool(((g @ r.T) >= 0).all()):
        assert torch.equal(ops.project_nonconflicting(g, r), g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [-1, 0, 1, 12345])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 17])
def test_pcgrad_equals_textbook_loop(device: str, seed: int, k: int, op_path: str) -> None:
    from test_solver_references import _pcgrad_reference

    x = _rand(k, 501, dtype=torch.float64, device=device, seed=k + seed)
    x[1:] -= 0.5 * x[:1]  # conflicts
    result, weights = ops.pcgrad(x, seed=seed, return_coeffs=True)
    expected = ref.pcgrad_textbook(x.cpu(), seed)
    assert result.shape == (501,) and weights.shape == (k,)
    # The weights, against the loop's own (NumPy, independent of the library; test review:
    # only their shape was checked).
    _, expected_weights = _pcgrad_reference(x.cpu().numpy(), seed)
    np.testing.assert_allclose(weights.cpu().numpy(), expected_weights, rtol=1e-10, atol=1e-10)
    assert torch.allclose(result.cpu(), expected, rtol=1e-10, atol=1e-10)
    for i in range(k):
        order = ops.pcgrad_order(k, i, seed)
        assert sorted(order) == [j for j in range(k) if j != i]
    lowp = ops.pcgrad(x.float(), seed=seed)
    assert torch.allclose(lowp.double().cpu(), expected, rtol=1e-4,
                          atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_pcgrad_batched(device: str) -> None:
    x = _rand(3, 4, 200, device=device, seed=4)
    result = ops.pcgrad(x, seed=7)
    for b in range(3):
        assert torch.allclose(result[b].double().cpu(), ref.pcgrad_textbook(x[b].double().cpu(), 7),
                              rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device: str, op_path: str) -> None:
    assert ops.gram(torch.empty(3, 0, device=device)).eq(0).all()
    assert ops.gram(torch.empty(0, 7, device=device)).shape == (0, 0)
    assert ops.gram(torch.empty(0, 4, 7, device=device)).shape == (0, 4, 4)
    assert ops.inner(torch.empty(2, 0, device=device), torch.empty(3, 0, device=device)).eq(0).all()
    assert ops.combine(torch.ones(2, 3, device=device), torch.empty(3, 0, device=device)).shape == (2, 0)
    assert ops.combine(torch.ones(2, 0, device=device), torch.empty(0, 5, device=device)).eq(0).all()
    assert ops.project_out(torch.ones(1, 4, device=device), torch.empty(0, 4, device=device)).eq(1).all()
    assert ops.pcgrad(torch.empty(3, 0, device=device)).shape == (0,)
    ops.combine_list(torch.ones(2, device=device), [], [])
    # No rows: PCGrad's sum is zeros; no dimensions: every coefficient is 0 (test review:
    # neither was checked). Outputs and coefficients are fresh tensors, so a value left
    # unwritten would show as garbage.
    assert ops.pcgrad(torch.empty(0, 5, device=device)).eq(0).all()
    for project in (ops.project_out, ops.project_nonconflicting):
        out, coeffs = project(torch.empty(2, 0, device=device), torch.empty(3, 0, device=device),
                              return_coeffs=True)
        assert out.shape == (2, 0) and coeffs.shape == (2, 3) and coeffs.eq(0).all()


def _opcheck_samples(device: str) -> list[tuple[object, tuple[object, ...]]]:
    x = _rand(4, 37, device=device, seed=1)
    g = _rand(2, 37, device=device, seed=2)
    gm = ops.gram(x)
    xs = [_rand(4, 3, 5, device=device, seed=3), _rand(4, 7, device=device, seed=4)]
    outs = [torch.zeros(3, 5, device=device), torch.zeros(7, device=device)]
    m = torch.ops.mtunlearn
    return [
        (m.gram, (x,)),
        (m.gram, (_rand(2, 3, 4, 9, dtype=torch.float64, device=device),)),
        (m.gram_list, (xs, False)),
        (m.gram_list, (xs, True)),
        (m.inner, (g, x)),
        (m.inner_list, ([xs[0][:2], xs[1][:2]], xs, True)),
        (m.gram_list_stacked, ([xs[0][:2], xs[1][:2]], xs, False)),
        (m.gram_list_stacked, ([xs[0][:1], xs[1][:1]], xs, True)),
        (m.combine, (_rand(2, 4, device=device), x)),
        (m.combine_, (torch.zeros(2, 37, device=device), _rand(2, 4, device=device), x, 0.5)),
        (m.combine_list_, (outs, _rand(4, device=device), xs, 1.0)),
        (m.combine_list_, (outs, _rand(2, 4, device=device), xs, 0.0, True)),
        (m.combine_list_from_, (outs, [torch.ones_like(o) for o in outs],
                                _rand(4, device=device), xs, 1.0)),
        (m.combine_list_from_, ([torch.zeros(2, *x.shape[1:], device=device) for x in xs],
                                [_rand(2, *x.shape[1:], device=device, seed=9) for x in xs],
                                _rand(2, 2, 4, device=device), xs, -0.5, True)),
        (m.ridge_solve, (gm, _rand(4, 2, device=device), 1e-6)),
        (m.nonconflicting_dual, (gm, _rand(2, 4, device=device))),
        (m.pcgrad_weights, (gm, 3)),
        (m.project_out, (g, x, 1e-6)),
        (m.project_nonconflicting, (g, x, -1)),
        (m.pcgrad, (x, 5)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device: str) -> None:
    samples = _opcheck_samples(device)
    checked = {str(op) for op, _ in samples}
    # Every op the library registered, read from the dispatcher: a new op without a sample fails.
    registered = {name.replace("::", ".") + ".default" for name in
                  torch._C._dispatch_get_all_op_names() if name.startswith("mtunlearn::")}
    assert len(registered) >= 15
    assert registered <= {str(op.default) for op, _ in samples} | checked
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_solver_fake_kernels_give_contiguous_results_for_a_transposed_rhs() -> None:
    """The real ridge_solve and nonconflicting_dual return contiguous tensors whatever rhs's
    strides; their fake kernels kept rhs's strides (empty_like), so opcheck failed and inductor's
    stride assert stopped torch.compile(fullgraph=True) on ``ridge_solve(G, rhs_t.mT)``."""
    b = _rand(3, 8, dtype=torch.float64, seed=1)
    gm = ops.gram(b)
    rhs_t = _rand(4, 3, dtype=torch.float64, seed=2)  # rhs_t.mT: [k=3, m=4], strides (1, 3)
    torch.library.opcheck(torch.ops.mtunlearn.ridge_solve.default, (gm, rhs_t.mT, 1e-6))
    torch.library.opcheck(torch.ops.mtunlearn.nonconflicting_dual.default,
                          (gm, _rand(3, 4, dtype=torch.float64, seed=3).mT))

    def solve(gram_matrix: torch.Tensor, rhs_rows: torch.Tensor) -> torch.Tensor:
        a = ops.ridge_solve(gram_matrix, rhs_rows.mT, 1e-6)
        w = ops.nonconflicting_dual(gram_matrix, (-a).mT.contiguous().mT.mT)
        return a * 2.0 + w.mT

    with torch._inductor.config.patch(force_disable_caches=True):  # type: ignore[attr-defined]
        compiled = torch.compile(solve, backend="inductor", fullgraph=True)
        torch.testing.assert_close(compiled(gm, rhs_t), solve(gm, rhs_t), rtol=0, atol=0)


def test_autograd_formulas() -> None:
    x = _rand(3, 11, dtype=torch.float64, seed=1).requires_grad_()
    a = _rand(2, 11, dtype=torch.float64, seed=2).requires_grad_()
    c = _rand(2, 3, dtype=torch.float64, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(torch.ops.mtunlearn.gram, (x,))
    assert torch.autograd.gradcheck(torch.ops.mtunlearn.inner, (a, x))
    assert torch.autograd.gradcheck(torch.ops.mtunlearn.combine, (c, x))


def test_torch_compile_traces_the_ops() -> None:
    def surgery(grads: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
        g = ops.gram(grads, check_finite=False)
        w = ops.pcgrad_weights(g, 3)
        update = ops.combine(w.unsqueeze(0), grads, check_finite=False)
        out = torch.empty_like(forget)
        ops.combine(torch.ones(1, 1), forget.unsqueeze(0), out=out.unsqueeze(0), check_finite=False)
        projected = ops.project_out(forget.unsqueeze(0), grads, check_finite=False)
        return update.squeeze(0) + projected.squeeze(0) + out

    compiled = torch.compile(surgery, backend="aot_eager", fullgraph=True)
    grads = _rand(4, 300, seed=5)
    forget = _rand(300, seed=6)
    assert torch.allclose(compiled(grads, forget), surgery(grads, forget), rtol=1e-5, atol=1e-5)


def test_torch_compile_keeps_the_default_finite_check_as_a_device_assert() -> None:
    """With the default ``check_finite=True`` the wrappers trace under ``fullgraph=True`` on the
    CPU (the host-side check would need a sync: inside a graph it is an assert), give the eager
    results, and a NaN still fails the call."""
    from mtunlearn_ext.surgery import project_out_list

    def surgery(grads: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
        update = ops.combine(ops.pcgrad_weights(ops.gram(grads), 3).unsqueeze(0), grads)
        projected = project_out_list([forget.unsqueeze(0)], [grads])[0]
        return update.squeeze(0) + projected.squeeze(0) + ops.inner(grads, grads).sum()

    compiled = torch.compile(surgery, backend="aot_eager", fullgraph=True)
    grads, forget = _rand(4, 300, seed=7), _rand(300, seed=8)
    assert torch.allclose(compiled(grads, forget), surgery(grads, forget), rtol=1e-5, atol=1e-5)
    poisoned = grads.clone()
    poisoned[1, 7] = float("nan")
    with pytest.raises(RuntimeError, match=r"mtunlearn_ext.ops.gram: NaN or Inf in the inputs"):
        compiled(poisoned, forget)


@pytest.mark.parametrize("dynamic", [None, True])
def test_torch_compile_takes_scalar_arguments_that_vary(dynamic: bool | None) -> None:
    """Ops review: a `ridge`, `beta` or `sign` passed into a compiled function worked for its
    first value only: the second one (traced as symbolic, to save recompiles) failed the
    wrappers' checks under `fullgraph=True` ("torch.* op returned non-Tensor" at
    math.isfinite, "Unsupported hasattr call"), and `dynamic=True` failed at once. Bad values
    are still refused."""
    g, b = _rand(2, 10, seed=11), _rand(3, 10, seed=12)

    def surgery(g: torch.Tensor, b: torch.Tensor, ridge: float, beta: float, sign: int
                ) -> torch.Tensor:
        projected = ops.project_out(g, b, ridge)
        kept, _ = ops.project_nonconflicting(g, b, sign)
        out = torch.ones_like(g)
        ops.combine(ops.inner(g, b), b, out=out, beta=beta)
        solved = ops.ridge_solve(ops.gram(b), ops.inner(b, g), ridge)
        return projected + kept + out + solved.sum()

    torch._dynamo.reset()
    compiled = torch.compile(surgery, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for ridge, beta, sign in ((1e-6, 0.5, 1), (1e-3, 0.9, -1), (0.0, 0.0, 1)):
        torch.testing.assert_close(compiled(g, b, ridge, beta, sign),
                                   surgery(g, b, ridge, beta, sign))
    for bad in ((-1.0, 0.5, 1), (float("nan"), 0.5, 1), (1e-6, float("inf"), 1),
                (1e-6, 0.5, 2)):
        # Dynamo's own exception types, naming the argument as the eager call does.
        with pytest.raises(Exception, match=r"mtunlearn_ext\.ops\.\w+: `(ridge|beta|sign)` "
                                            r"must be (a finite number|1 or -1)"):
            compiled(g, b, *bad)
    # Unchecked, a non-finite beta goes through as in eager mode (a GradScaler's overflowing
    # step must reach the outputs as Inf); the review found it refused once compiled.

    def unchecked(g: torch.Tensor, b: torch.Tensor, beta: float) -> torch.Tensor:
        out = torch.ones_like(g)
        ops.combine(ops.inner(g, b, check_finite=False), b, out=out, beta=beta,
                    check_finite=False)
        return out

    torch._dynamo.reset()
    compiled = torch.compile(unchecked, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for beta in (0.5, float("inf"), 0.25):
        torch.testing.assert_close(compiled(g, b, beta), unchecked(g, b, beta))
    torch._dynamo.reset()


def test_errors_name_the_argument(op_path: str) -> None:
    """Over both paths: the wrappers' own checks (not only the kernels', which the compiled
    path reaches after them) refuse each bad argument, by name and under the wrapper's name."""
    x = torch.randn(3, 10)
    with pytest.raises(TypeError, match="`x` must have dtype"):
        ops.gram(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="`x` must have at least 2 dims"):
        ops.gram(torch.ones(4))
    with pytest.raises(ValueError, match="`b` is on meta"):
        ops.inner(x, torch.randn(2, 10, device="meta"))
    with pytest.raises(TypeError, match="`b` has dtype torch.float64"):
        ops.inner(x, torch.randn(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="must share leading dims and n"):
        ops.inner(x, torch.randn(2, 11))
    with pytest.raises(ValueError, match="xs\\[1\\]"):
        ops.gram_list([torch.randn(3, 4), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="outs\\[0\\] must have shape"):
        ops.combine_list(torch.ones(3), [torch.randn(3, 4)], [torch.zeros(5)])
    # True == 1, but a flag is not a sign (safety audit); NumPy's and torch's bools neither
    for sign in (0, 2, -2, True, np.bool_(True), torch.tensor(True)):
        with pytest.raises(ValueError, match=r"^mtunlearn_ext\.ops\.project_nonconflicting: "
                                             rf"`sign` must be 1 or -1, got {re.escape(repr(sign))}$"):
            ops.project_nonconflicting(x[:1], x, sign=sign)
    with pytest.raises(ValueError, match="at most 256"):
        ops.pcgrad(torch.randn(257, 3))
    with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0"):
        ops.project_out(x[:1], x, ridge=-1.0)
    # Review: an infinite ridge made every coefficient 0 silently; a seed of 1.5 ran as 1, True
    # as 1, and 2**64 got the schema's "expected int, found int".
    for ridge in (math.inf, math.nan, "1e-3", True):
        with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0"):
            ops.project_out(x[:1], x, ridge=ridge)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0"):
            ops.ridge_solve(ops.gram(x), ops.inner(x, x[:1]), ridge=ridge)  # type: ignore[arg-type]
    # Review: the registered ops (what torch.compile and C++ callers reach) took ridge=inf.
    for ridge in (math.inf, -math.inf, math.nan, -1.0):
        with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0"):
            torch.ops.mtunlearn.ridge_solve(ops.gram(x), ops.inner(x, x[:1]), ridge)
        with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0"):
            torch.ops.mtunlearn.project_out(x[:1], x, ridge)
    for seed, error, said in ((1.5, TypeError, "must be an integer, got float"),
                              (True, TypeError, "must be an integer, got the bool True"),
                              (2 ** 64, ValueError, r"must lie in \[-2\*\*63, 2\*\*63 - 1\]"),
                              # The first integers outside int64, on either side.
                              (2 ** 63, ValueError, r"must lie in \[-2\*\*63, 2\*\*63 - 1\]"),
                              (-(2 ** 63) - 1, ValueError, r"must lie in \[-2\*\*63, "
                                                          r"2\*\*63 - 1\]")):
        with pytest.raises(error, match=f"`seed` {said}"):
            ops.pcgrad(x, seed)  # type: ignore[arg-type]
        with pytest.raises(error, match=f"`seed` {said}"):
            ops.pcgrad_weights(ops.gram(x), seed)  # type: ignore[arg-type]
        with pytest.raises(error, match=f"`seed` {said}"):
            ops.pcgrad_order(4, 0, seed)  # type: ignore[arg-type]
    # Integers of other types are integers (NumPy, 0-d tensors); the extremes of int64 run.
    assert torch.equal(ops.pcgrad(x, np.int64(3)), ops.pcgrad(x, 3))
    assert torch.equal(ops.pcgrad(x, torch.tensor(3)), ops.pcgrad(x, 3))  # type: ignore[arg-type]
    ops.pcgrad(x, 2 ** 63 - 1)
    ops.pcgrad(x, -(2 ** 63))
    # The registered ops check too (for callers that bypass the wrappers).
    with pytest.raises(ValueError, match="mtunlearn::inner: `a`"):
        torch.ops.mtunlearn.inner(x, torch.randn(2, 11))


def test_list_arguments_refuse_a_single_tensor(op_path: str) -> None:
    """Review: a tensor where a list of per-parameter tensors is expected was iterated into its
    rows: `gram_list(x)` with x [5, 3] returned a 5 x 5 Gram (k = 5), as if given five
    parameters. Every list argument refuses one tensor, naming itself, and writes nothing."""
    x, y = torch.randn(5, 3), torch.randn(2, 3)
    out = torch.full((3,), 7.0)
    ones = torch.ones(5)
    calls = {
        "xs": [lambda: ops.gram_list(x), lambda: ops.gram_list_stacked(x, [y]),
               lambda: ops.combine_list(ones, x, [out])],
        "as_": [lambda: ops.inner_list(y, [x])],
        "bs": [lambda: ops.inner_list([y], x)],
        "ys": [lambda: ops.gram_list_stacked([y], x)],
        "outs": [lambda: ops.combine_list(ones, [x], out.unsqueeze(0))],
        "bases": [lambda: ops.combine_list(ones, [x], [out], beta=1.0, bases=out.unsqueeze(0))],
    }
    for name, named_calls in calls.items():
        for call in named_calls:
            with pytest.raises(TypeError, match=rf"^mtunlearn_ext\.ops\.\w+: `{name}` must be a "
                                                r"list of tensors \(one per parameter\), got a "
                                                r"torch\.Tensor of shape .*pass a list, e\.g\. "
                                                r"`\[x\]`"):
                call()
    assert bool((out == 7.0).all())
    # As lists, the same tensors are one parameter each.
    assert ops.gram_list([x]).shape == (5, 5) and ops.gram_list([y.T]).shape == (3, 3)
    assert ops.inner_list([y], [x]).shape == (2, 5)


def test_combine_refuses_a_non_finite_beta_while_checking(op_path: str) -> None:
    """Review: `combine(..., out=o, beta=nan)` wrote NaN into every element of `o` with
    check_finite=True, which checked the coefficients only. With the check on, a NaN or
    infinite `beta` is refused by name and nothing is written; with it off it propagates."""
    coeffs, x = torch.ones(1, 2), torch.ones(2, 3)
    for beta in (math.nan, math.inf, -math.inf):
        out = torch.full((1, 3), 7.0)
        with pytest.raises(ValueError, match=r"^mtunlearn_ext\.ops\.combine: `beta` must be a "
                                             r"finite number, got"):
            ops.combine(coeffs, x, out=out, beta=beta)
        assert bool((out == 7.0).all())
        outs = [torch.full((3,), 7.0)]
        with pytest.raises(ValueError, match=r"^mtunlearn_ext\.ops\.combine_list: `beta` must "
                                             r"be a finite number, got"):
            ops.combine_list(torch.ones(2), [x], outs, beta=beta)
        assert bool((outs[0] == 7.0).all())
    out = torch.full((1, 3), 7.0)
    ops.combine(coeffs, x, out=out, beta=math.nan, check_finite=False)
    assert bool(out.isnan().all())
    for beta in ("0.5", True):
        with pytest.raises(ValueError, match="`beta` must be a"):
            ops.combine(coeffs, x, out=torch.zeros(1, 3), beta=beta)  # type: ignore[arg-type]
    # Finite betas of any number type run as before.
    out = torch.full((1, 3), 7.0)
    ops.combine(coeffs, x, out=out, beta=np.float32(0.5))  # type: ignore[arg-type]
    assert torch.equal(out, torch.full((1, 3), 5.5))


def test_combine_names_an_out_that_is_not_a_float_tensor() -> None:
    """Review: an ndarray `out` got "`out` is on cpu but `x` is on cpu", a list an
    AttributeError on `.shape`."""
    coeffs, x = torch.ones(1, 2), torch.ones(2, 3)
    for out, said in ((np.zeros((1, 3), np.float32), "must be a torch.Tensor, got ndarray"),
                      ([[0.0, 0.0, 0.0]], "must be a torch.Tensor, got list"),
                      (torch.zeros(1, 3, dtype=torch.int64), "must have dtype float64")):
        with pytest.raises(TypeError, match=rf"^mtunlearn_ext\.ops\.combine: `out` {said}"):
            ops.combine(coeffs, x, out=out)  # type: ignore[arg-type]


def test_list_ops_take_every_flag_the_schema_takes(op_path: str) -> None:
    """The `per_tensor` check refuses only what the registered ops' bool refuses: NumPy's bools
    and numbers ran before it and still do, on both paths."""
    x = torch.randn(3, 4)
    for flag in (np.True_, 1, np.int64(1)):
        assert ops.gram_list([x], per_tensor=flag).shape == (1, 3, 3)  # type: ignore[arg-type]
    assert ops.gram_list([x], per_tensor=np.False_).shape == (3, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^mtunlearn_ext\.ops\.gram_list: `per_tensor` must be "
                                        r"a bool, got str 'no'$"):
        ops.gram_list([x], per_tensor="no")  # type: ignore[arg-type]


def test_pcgrad_order_refuses_a_task_or_k_out_of_range() -> None:
    """Review: `pcgrad_order(3, task=5, seed=0)` returned an order of all three tasks and
    `pcgrad_order(-2, 0, 0)` an empty one."""
    with pytest.raises(ValueError, match=r"^mtunlearn_ext\.ops\.pcgrad_order: `task` must be an "
                                         r"integer in \[0, 2\], got 5$"):
        ops.pcgrad_order(3, 5, 0)
    with pytest.raises(ValueError, match=r"`task` must be an integer in \[0, 2\], got -1$"):
        ops.pcgrad_order(3, -1, 0)
    for k in (0, -2):
        with pytest.raises(ValueError, match=rf"`k` must be an integer >= 1, got {k}$"):
            ops.pcgrad_order(k, 0, 0)
    with pytest.raises(TypeError, match=r"`k` must be an integer, got float 3\.0"):
        ops.pcgrad_order(3.0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`task` must be an integer, got the bool True"):
        ops.pcgrad_order(3, True, 0)
    numpy_k, numpy_task = np.int64(3), np.int64(1)
    assert ops.pcgrad_order(numpy_k, numpy_task, 0) == ops.pcgrad_order(3, 1, 0)  # type: ignore[arg-type]
    assert ops.pcgrad_order(1, 0, 5) == [] and ops.pcgrad_order(3, 1, -1) == [0, 2]


def test_readme_ops_table_gives_the_wrappers_signatures() -> None:
    """Review: the README's row gave `combine_list(coeffs, xs, outs, beta=0, bases=None)`,
    without `per_tensor` and with the keyword-only `bases` as if positional. Each row written
    with the wrappers' own parameter names must list them in order, with their defaults and a
    `*` before the keyword-only ones; only trailing keyword-only options (`check_finite`) may
    be left out. Rows in the math's notation (`G` for the Gram matrix) are not compared."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)\(([^)]*)\)` \|", text, flags=re.MULTILINE)
    compared = []
    for name, args in rows:
        real = list(inspect.signature(getattr(ops, name)).parameters.values())
        listed = [a.strip() for a in args.split(",")]
        if not all(a == "*" or a.split("=")[0] in {p.name for p in real} for a in listed):
            continue
        written = []
        keyword_only = False
        for a in listed:
            if a == "*":
                keyword_only = True
                continue
            arg, _, default = a.partition("=")
            written.append((arg, keyword_only, ast.literal_eval(default) if default else None))
        shown = [(p.name, p.kind is inspect.Parameter.KEYWORD_ONLY,
                  None if p.default is inspect.Parameter.empty else p.default)
                 for p in real[:len(written)]]
        assert written == shown, (name, written, shown)
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in real[len(written):]), name
        compared.append(name)
    assert {"combine_list", "combine", "gram_list", "project_out"} <= set(compared), compared


def test_nonconflicting_dual_docstring_states_the_kernels_tolerance() -> None:
    """Review: the docstring gave a relative tolerance of 1e-12; the kernels stop the descent
    at ``dual_tolerance(scale)``, 1e-13 times the problem's scale (as the README says)."""
    header = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "mtunlearn"
              / "small_solvers.h").read_text(encoding="utf-8")
    found = re.search(r"double dual_tolerance\(double scale\) \{ return ([0-9.e+-]+) \* scale; \}",
                      header)
    assert found is not None
    doc = " ".join((ops.nonconflicting_dual.__doc__ or "").split())
    assert f"``{found.group(1)} * scale``" in doc, doc


@pytest.mark.parametrize("device", DEVICES)
def test_pcgrad_surfaces_non_finite_input_for_any_k(device: str, op_path: str) -> None:
    """k = 1 reads no Gram entry in the projection steps, and a +Inf inner product is no
    conflict: the weights stayed finite and ``check_finite`` let NaN/Inf through. A non-finite
    Gram now gives all-NaN weights, as in ridge_solve and nonconflicting_dual."""
    for k in (1, 2, 40):  # 40: the CUDA kernels' larger launch, the same per-task check
        x = _rand(k, 10, device=device, seed=k)
        x[0, 3] = float("nan")
        with pytest.raises(FloatingPointError, match="`x` contains NaN or Inf"):
            ops.pcgrad(x)
        assert bool(torch.isnan(ops.pcgrad(x, check_finite=False)).all())
    inf = float("inf")
    for gram_matrix in ([[float("nan")]], [[inf]], [[1.0, inf], [inf, 1.0]],
                        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -inf]]):
        g = torch.tensor(gram_matrix, dtype=torch.float64, device=device)
        assert bool(torch.isnan(ops.pcgrad_weights(g)).all()), gram_matrix
        assert bool(torch.isnan(ops.pcgrad_weights(g.float(), seed=-1)).all()), gram_matrix
    # Finite Grams keep their bits (the check only reads).
    g = ops.gram(_rand(5, 30, dtype=torch.float64, device=device, seed=4))
    assert torch.equal(ops.pcgrad_weights(g, 3), ops.pcgrad_weights(g.clone(), 3))


@pytest.mark.parametrize("device", DEVICES)
def test_projections_on_an_empty_basis_surface_non_finite_g(device: str, op_path: str) -> None:
    """With k = 0 rows to project on there are no coefficients for NaN to reach, and the
    default check_finite read only those: a NaN in g came back unchanged, without the error it
    gives at k = 1. The output (g's copy) is read instead."""
    g = _rand(2, 7, device=device, seed=1)
    g[1, 4] = float("nan")
    empty = torch.empty(0, 7, device=device)
    with pytest.raises(FloatingPointError, match="project_out: `g` contains NaN or Inf"):
        ops.project_out(g, empty)
    for sign in (1, -1):
        with pytest.raises(FloatingPointError,
                           match="project_nonconflicting: `g` contains NaN or Inf"):
            ops.project_nonconflicting(g, empty, sign)
    out = ops.project_out(g, empty, check_finite=False)
    assert torch.equal(out.isnan(), g.isnan()) and torch.equal(out.nan_to_num(), g.nan_to_num())
    good = _rand(2, 7, device=device, seed=2)
    assert torch.equal(ops.project_out(good, empty), good)
    assert torch.equal(ops.project_nonconflicting(good, empty), good)
    assert ops.project_out(torch.empty(0, 7, device=device), empty).shape == (0, 7)


def test_non_finite_policy() -> None:
    x = torch.randn(4, 100)
    bad = x.clone()
    bad[2, 17] = float("nan")
    with pytest.raises(FloatingPointError, match="`x` contains NaN or Inf"):
        ops.gram(bad)
    inf = x.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="`basis` contains NaN or Inf"):
        ops.project_out(x[:1], inf)
    with pytest.raises(FloatingPointError, match="`g` contains NaN or Inf"):
        ops.project_nonconflicting(bad[2:3], x)
    with pytest.raises(FloatingPointError, match="overflowed"):
        ops.gram(torch.full((2, 10), 1e30))
    # Opting out lets NaN propagate instead (no host sync).
    assert torch.isnan(ops.gram(bad, check_finite=False)[2, 2])
    assert torch.isnan(ops.pcgrad(bad, check_finite=False)).any()
    with pytest.raises(FloatingPointError, match="`coeffs` contains NaN"):
        ops.combine(torch.tensor([[float("nan"), 1.0, 0.0, 0.0]]), x)


@pytest.mark.parametrize("device", DEVICES)
def test_a_finite_result_whose_sum_overflows_passes_the_finite_check(device: str,
                                                                     op_path: str) -> None:
    """The check's fast path sums the result; a sum that overflows float32 (four entries of
    1.96e38) is no non-finite result, and the element-wise look that follows lets it pass.
    Without that look the check called finite inputs and a finite Gram an overflow."""
    x = torch.full((2, 1), 1.4e19, device=device)
    expected = torch.full((2, 2), 1.4e19 ** 2, dtype=torch.float64)
    assert not math.isfinite(float(expected.float().sum()))  # the case: the float32 sum is inf
    result = ops.gram(x)
    assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())
    torch.testing.assert_close(result.cpu().double(), expected, rtol=1e-6, atol=0.0)
    # Through the list form and a second orientation too: the same check of the same result.
    torch.testing.assert_close(ops.gram_list([x]).cpu().double(), expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ops.inner(x, x).cpu().double(), expected, rtol=1e-6, atol=0.0)


# -- wrapper checks a mutation review found unpinned ---------------------------------------------


def test_combine_without_out_refuses_a_beta() -> None:
    """``beta`` scales ``out``: with no ``out`` it has nothing to scale and was dropped."""
    coeffs, x = torch.randn(2, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`beta` must be 0 when `out` is not given, got 1.0"):
        ops.combine(coeffs, x, beta=1.0)
    torch.testing.assert_close(ops.combine(coeffs, x, beta=0.0), coeffs @ x)


def test_pcgrad_order_refuses_a_task_equal_to_k() -> None:
    assert sorted(ops.pcgrad_order(3, 2, 0)) == [0, 1]
    with pytest.raises(ValueError, match=r"`task` must be an integer in \[0, 2\], got 3"):
        ops.pcgrad_order(3, 3, 0)


def test_solver_limits_hold_on_the_reference_path_too(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without the compiled extension (the pure-PyTorch fallback) the wrappers' own checks are
    all there is: k over the solvers' limit and a right-hand side of another k are refused
    there as well, not solved."""
    from mtunlearn_ext.ops import solvers

    monkeypatch.setattr(solvers, "has_extension", lambda: False)
    with pytest.raises(ValueError, match=r"k=257 exceeds the solver limit of 256"):
        ops.ridge_solve(torch.eye(257), torch.ones(257, 1))
    with pytest.raises(ValueError, match=r"`rhs` must be \[\.\.\., k=3, m\]"):
        ops.ridge_solve(torch.eye(3), torch.ones(4, 1))
    torch.testing.assert_close(ops.ridge_solve(torch.eye(3) * 2, torch.ones(3, 1), 0.0),
                               torch.full((3, 1), 0.5))


def test_reference_solver_drops_dependent_rows(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The fallback without the extension solved ``(G + lambda I) a = rhs`` with
    ``torch.linalg.solve``, so ``project_out`` of a rank-deficient basis with ``ridge=0`` (five
    rows of rank two), which its docstring calls correct, raised a singular-matrix error there
    while the compiled op gave the exact projection. Both now drop the dependent rows alike."""
    from mtunlearn_ext.ops import projections, solvers

    gen = torch.Generator().manual_seed(11)
    basis = torch.randn(5, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 9, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    exact = g - g @ torch.from_numpy(np.linalg.pinv(basis.numpy()) @ basis.numpy())
    compiled = ops.project_out(g, basis, 0.0)
    monkeypatch.setattr(projections, "has_extension", lambda: False)
    monkeypatch.setattr(solvers, "has_extension", lambda: False)
    fallback = ops.project_out(g, basis, 0.0)
    torch.testing.assert_close(compiled, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(fallback, exact, rtol=0, atol=1e-12)
    # The documented example: the dependent second row gets coefficient 0.
    ones = torch.ones(2, 2, dtype=torch.float64)
    torch.testing.assert_close(ops.ridge_solve(ones, torch.tensor([[1.0], [-1.0]],
                                                                  dtype=torch.float64), 0.0),
                               torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    for dtype in (torch.float32, torch.float64):
        rows = torch.randn(4, 3, 6, generator=gen, dtype=dtype)
        rows = torch.cat([rows, rows[:, :2] * 3.0, torch.zeros(4, 1, 6, dtype=dtype)], dim=1)
        gram = rows @ rows.transpose(-1, -2)
        rhs = gram @ torch.randn(4, 6, 2, generator=gen, dtype=dtype)
        rhs[3, 1, 0] = math.nan
        for ridge in (0.0, 1e-6, 0.1):
            got = ops.ridge_solve(gram, rhs, ridge)
            want = torch.ops.mtunlearn.ridge_solve(gram, rhs, ridge)
            assert got.dtype == dtype and torch.isnan(got[3]).all()
            assert not torch.isnan(got[:3]).any()
            tol = 1e-9 if dtype == torch.float64 else 2e-3
            torch.testing.assert_close(got[:3], want[:3], rtol=tol, atol=tol * float(
                want[:3].abs().max()))
            if ridge == 0.0:  # the dependent and the zero rows are dropped
                assert (got[:3, 3:] == 0).all()


def _check_finite_calls() -> dict[str, Callable[..., object]]:
    """Every public entry point taking ``check_finite``, called on small finite inputs."""
    from mtunlearn_ext import surgery

    x, g, r = torch.randn(3, 5), torch.randn(2, 5), torch.randn(3, 5)
    xs, gs = [torch.randn(3, 4), torch.randn(3, 2)], [torch.randn(2, 4), torch.randn(2, 2)]
    return {
        "ops.gram": lambda c: ops.gram(x, check_finite=c),
        "ops.gram_list": lambda c: ops.gram_list(xs, check_finite=c),
        "ops.inner": lambda c: ops.inner(g, r, check_finite=c),
        "ops.inner_list": lambda c: ops.inner_list(gs, xs, check_finite=c),
        "ops.gram_list_stacked": lambda c: ops.gram_list_stacked(gs, xs, check_finite=c),
        "ops.project_out": lambda c: ops.project_out(g, r, check_finite=c),
        "ops.project_nonconflicting": lambda c: ops.project_nonconflicting(g, r, check_finite=c),
        "ops.pcgrad": lambda c: ops.pcgrad(x, check_finite=c),
        "ops.combine": lambda c: ops.combine(torch.randn(2, 3), x, check_finite=c),
        "ops.combine_list": lambda c: ops.combine_list(
            torch.randn(2, 3), xs, [torch.empty(2, 4), torch.empty(2, 2)], check_finite=c),
        "surgery.gram_list_stats": lambda c: surgery.gram_list_stats(xs, check_finite=c),
        "surgery.inner_list_stats": lambda c: surgery.inner_list_stats(gs, xs, check_finite=c),
        "surgery.project_out_list": lambda c: surgery.project_out_list(
            gs, xs, check_finite=c),
        "surgery.project_nonconflicting_list": lambda c: surgery.project_nonconflicting_list(
            gs, xs, check_finite=c),
        "surgery.aggregate_list": lambda c: surgery.aggregate_list(
            surgery.UPGrad(), xs, [torch.empty(4), torch.empty(2)], check_finite=c),
    }


@pytest.mark.parametrize("name", sorted(_check_finite_calls()))
def test_check_finite_must_be_a_bool(name: str) -> None:
    """User review: ``check_finite="no"`` was taken for its truth value (the check ran), None
    skipped it; a setting read from a config as a string did the opposite of what it said.
    Refused now, naming the argument, as the aggregators and GradientSurgery refuse it; a
    NumPy bool passes."""
    call = _check_finite_calls()[name]
    for value in ("no", None, 0, [True]):
        with pytest.raises(TypeError, match=r"`check_finite` must be a bool, got "):
            call(value)
    call(True)
    call(np.bool_(False))


def _conditioned_basis(dtype: torch.dtype, condition: float
                       ) -> tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """A 6-row basis in 4000 dimensions with singular values from 1 down to 1/``condition``
    (seed 50), its left singular vectors (float64) and the generator, to draw more from."""
    gen = torch.Generator().manual_seed(50)
    n, k = 4000, 6
    left = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64)).Q
    singular = torch.logspace(0, -math.log10(condition), k, dtype=torch.float64)
    return gen, left, ((left * singular) @ right.T).T.contiguous().to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2 ** -10), (torch.float16, 2 ** -12)])
def test_combine_reads_coefficients_in_float32_for_16_bit_inputs(device: str, dtype: torch.dtype,
                                                                 eps: float, op_path: str) -> None:
    """README: low precision is read as is and accumulated in float32, the coefficients as
    given (float32 here), not rounded to the inputs' dtype. An exact
    cancellation shows it where the relative tolerance cannot (test review: coefficients
    rounded to the inputs' dtype passed every combine test): (1 + eps) x - x with x = 1 is eps
    exactly, and 0 with the coefficient rounded to 16 bits."""
    coeffs = torch.tensor([[1.0 + eps, -1.0]], device=device)
    x = torch.ones(2, 37, dtype=dtype, device=device)
    out = ops.combine(coeffs, x)
    assert out.dtype == dtype and bool((out == eps).all()), out[0, :4]


@pytest.mark.parametrize("dtype, condition, error_bound", [
    (torch.float32, 1e2, 1e-6), (torch.float32, 1e4, 3e-2),
    (torch.float64, 1e6, 1e-5), (torch.float64, 1e9, 1e-1)])
def test_project_out_on_an_ill_conditioned_basis_stays_orthogonal_to_it(
        dtype: torch.dtype, condition: float, error_bound: float) -> None:
    """What the README states of conditioning: working from the Gram squares cond(B), so the
    projection's error grows with it (fp32: 2e-7 at 1e2, 7e-3 at 1e4; fp64: 7e-7 at 1e6, 2e-2
    at 1e9, measured), but it lies along the basis' weakest directions: the output stays
    orthogonal to every basis row to the dtype's rounding."""
    gen, left, basis = _conditioned_basis(dtype, condition)
    g = torch.randn(2, left.shape[0], generator=gen, dtype=torch.float64).to(dtype)
    got = ops.project_out(g, basis, 0.0).double()
    q = torch.linalg.qr(basis.double().T).Q
    expected = g.double() - (g.double() @ q) @ q.T
    assert float((got - expected).norm() / expected.norm()) < error_bound
    b64 = basis.double()
    cosines = (b64 @ got.T) / (b64.norm(dim=1)[:, None] * got.norm(dim=1))
    assert float(cosines.abs().max()) < (1e-5 if dtype == torch.float32 else 1e-8)


@pytest.mark.parametrize("ridge", [1e-4, 1e-6])
@pytest.mark.parametrize("short", [1e-1, 1e-2, 1e-3])
def test_the_ridge_is_relative_to_the_mean_row_so_a_short_row_keeps_a_share(
        ridge: float, short: float) -> None:
    """What the README states of the ridge (numerical audit): lambda = ridge * trace(G) / k is
    not per row, so g's part along a row short against the others keeps a share of about
    lambda / (G_jj + lambda) (two rows, lengths 1 and ``short``: 0.34 of it at short 1e-2 and
    ridge 1e-4, 5e-3 at ridge 1e-6); ridge 0 projects it fully."""
    basis = torch.zeros(2, 5, dtype=torch.float64)
    basis[0, 0], basis[1, 1] = 1.0, short
    g = torch.zeros(1, 5, dtype=torch.float64)
    g[0, 1] = 1.0  # along the short row: the exact projection is 0
    lam = ridge * (1.0 + short ** 2) / 2
    kept = float(ops.project_out(g, basis, ridge).norm())
    assert kept == pytest.approx(lam / (short ** 2 + lam), rel=1e-9)
    assert float(ops.project_out(g, basis, 0.0).norm()) < 1e-15


@pytest.mark.parametrize("dtype, condition, left_over", [
    (torch.float32, 1e3, (1e-3, 3e-2)), (torch.float32, 1e4, (0.2, 0.7)),
    (torch.float64, 1e6, (1e-5, 1e-4)), (torch.float64, 1e9, (0.9, 1.0 + 1e-6))])
def test_a_g_along_the_weakest_direction_is_the_worst_case_of_conditioning(
        dtype: torch.dtype, condition: float, left_over: tuple[float, float]) -> None:
    """The README's worst case (numerical audit): g inside the span, along the basis' weakest
    direction, should be projected to 0; what is left of it grows to all of it (fp32 0.008 at
    cond 1e3, 0.45 at 1e4; fp64 3e-5 at 1e6, 1.0 at 1e9), while the output's cosines with
    the basis rows stay at 3e-3 or below, so orthogonality to the rows does not show it."""
    _, left, basis = _conditioned_basis(dtype, condition)
    g = left[:, -1:].T.contiguous().to(dtype)
    got = ops.project_out(g, basis, 0.0).double()
    low, high = left_over
    assert low < float(got.norm() / g.double().norm()) < high
    b64 = basis.double()
    cosines = (b64 @ got.T) / (b64.norm(dim=1)[:, None] * got.norm(dim=1))
    assert float(cosines.abs().max()) < 5e-3
