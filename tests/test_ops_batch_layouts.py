"""The batched ops (``[..., k, n]`` inputs) read every matrix of a batch where it lies, whatever
the strides of the leading dims: the entries merged those dims into one with ``reshape``, which
copied the whole input whenever they could not merge (a permuted or sliced batch), though the
kernels read each matrix through its own pointer and row stride."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from unlearning_helpers import peak_allocated_bytes

from mtunlearn_ext import ops

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _unmergeable(rows: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``[4, 3, rows, n]`` with unit-stride rows whose two leading dims do not merge."""
    x = _rand(3, 4, rows, n, dtype=dtype, seed=seed).transpose(0, 1)
    with pytest.raises(RuntimeError):
        x.view(-1, rows, n)
    return x


def _bitwise_equal(a: object, b: object) -> bool:
    if isinstance(a, tuple):
        return all(_bitwise_equal(p, q) for p, q in zip(a, b))  # type: ignore[arg-type]
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batched_ops_read_an_unmergeable_batch_in_place(dtype: torch.dtype) -> None:
    """The same bits as on a contiguous copy, with no copy of the big input: the most the
    allocator holds during a call is the outputs (here at most an eighth of the input: the
    projections' is g's size; a copy of the input, as before, is all of it)."""
    n = 4099
    x = _unmergeable(8, n, dtype, seed=1)
    g = _unmergeable(1, n, dtype, seed=2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coeffs = _rand(4, 3, 1, 8, dtype=acc, seed=3)
    calls: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
        "gram": lambda x, g: ops.gram(x),
        "inner": lambda x, g: ops.inner(g, x),
        "combine": lambda x, g: ops.combine(coeffs, x),
        "project_out": lambda x, g: ops.project_out(g, x),
        "project_nonconflicting": lambda x, g: ops.project_nonconflicting(g, x),
    }
    for name, call in calls.items():
        expected = call(x.contiguous(), g.contiguous())
        assert _bitwise_equal(call(x, g), expected), name
        peak = peak_allocated_bytes(lambda: call(x, g))
        assert peak < x.nbytes // 4, f"{name}: {peak} bytes allocated, x has {x.nbytes}"


def test_combine_reads_an_unmergeable_x_that_meets_out_from_a_copy() -> None:
    """Such an ``x`` was always copied (the merge copied it), so ``out`` could share its memory:
    reading it in place must not turn those calls into refusals, nor into wrong results."""
    buffer = _rand(3 * 4 * 2 * 64, dtype=torch.float32, seed=4)
    x = buffer.view(3, 4, 2, 64).transpose(0, 1)  # [4, 3, 2, 64]: dims 0 and 1 do not merge
    out = buffer[: 4 * 3 * 2 * 64].view(4, 3, 2, 64)  # the same bytes, contiguous
    coeffs = _rand(4, 3, 2, 2, dtype=torch.float32, seed=5)
    expected = ops.combine(coeffs, x.clone())
    ops.combine(coeffs, x, out=out)
    assert torch.equal(out, expected)
    # Leading dims that merge, meeting `out`, are refused as before.
    merged = buffer.view(4, 3, 2, 64)
    with pytest.raises(ValueError, match="`out` overlaps `x`"):
        ops.combine(coeffs, merged, out=buffer.view(4, 3, 2, 64))
