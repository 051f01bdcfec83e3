"""Memory shared between the tensors of one ``combine`` / ``combine_list`` call, decided by the
bytes the kernels touch, not by torch storages: two storages can hold one buffer
(``torch.from_numpy`` twice on one array, ``torch.from_dlpack``), and a strided base or input can
interleave with an output without touching it. Refused calls raise ``ValueError`` naming both
tensors and write nothing; accepted ones match a float64 reference. Each path: the compiled
kernels (the wrapper and the registered ``torch.ops.mtunlearn`` op) and the pure-PyTorch
references ``import mtunlearn_ext`` falls back to without a built extension."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mtunlearn_ext import ops

# The outputs the ops allocate are NaN-filled: a value left unwritten shows (test review).
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


def _numpy_pair(buffer: np.ndarray, a: slice, b: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors over one numpy buffer, each with a storage of its own."""
    return torch.from_numpy(buffer[a]), torch.from_numpy(buffer[b])


# ---- combine_list: a base against its own output ----------------------------------------------

@pytest.mark.parametrize("shift", [1, 3, 17, 100, -1, -100])
def test_combine_list_refuses_a_shifted_base_under_another_numpy_storage(
        shift: int, op_path: str) -> None:
    """outs[0] and bases[0] are shifted windows of one array, each from its own
    ``torch.from_numpy``: accepted before (storages differ) and off by up to 3920."""
    n = 4096
    buffer = np.arange(1.0, n + abs(shift) + 1)
    if shift > 0:
        out, base = torch.from_numpy(buffer[shift:shift + n]), torch.from_numpy(buffer[:n])
    else:
        out, base = torch.from_numpy(buffer[:n]), torch.from_numpy(buffer[-shift:-shift + n])
    before = buffer.copy()
    x, coeffs = torch.ones(2, n, dtype=F64), torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match=r"combine_list: bases\[0\] overlaps outs\[0\] without "
                                         r"being the same tensor"):
        ops.combine_list(coeffs, [x], [out], 1.0, bases=[base])
    assert np.array_equal(buffer, before)  # refused before anything was written
    if op_path == "compiled":
        with pytest.raises(ValueError, match=r"mtunlearn::combine_list_from_: bases\[0\] overlaps "
                                             r"outs\[0\]"):
            torch.ops.mtunlearn.combine_list_from_([out], [base], coeffs, [x], 1.0, False)
        assert np.array_equal(buffer, before)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_list_refuses_a_base_over_its_output_through_dlpack(device: str,
                                                                    op_path: str) -> None:
    n = 300
    buffer = torch.randn(n + 5, dtype=F64, device=device)
    alias = torch.from_dlpack(buffer)  # the same bytes, another storage object
    out, base = buffer[5:], alias[:n]
    before = buffer.clone()
    with pytest.raises(ValueError, match=r"bases\[0\] overlaps outs\[0\]"):
        ops.combine_list(torch.ones(3, dtype=F64, device=device),
                         [torch.ones(3, n, dtype=F64, device=device)], [out], 1.0, bases=[base])
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_list_accepts_the_same_bytes_as_its_base_under_another_storage(
        device: str, op_path: str) -> None:
    """bases[0] is outs[0]'s memory through from_dlpack / from_numpy (an in-place update):
    accepted, equal to the float64 reference; the same for disjoint windows of one buffer."""
    n, k = 257, 3
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(k, n, generator=gen, dtype=F64).to(device)
    coeffs = torch.randn(k, generator=gen, dtype=F64).to(device)
    buffer = torch.randn(2 * n, generator=gen, dtype=F64).to(device)
    out = buffer[:n]
    expected = 0.5 * out.clone() + coeffs @ x
    ops.combine_list(coeffs, [x], [out], 0.5, bases=[torch.from_dlpack(buffer)[:n]])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # Disjoint windows of one numpy array, two storages: accepted and exact.
    array = np.random.default_rng(1).standard_normal(2 * n)
    out_np, base_np = _numpy_pair(array, slice(0, n), slice(n, 2 * n))
    expected = 0.5 * base_np.clone() + coeffs.cpu() @ x.cpu()
    ops.combine_list(coeffs.cpu(), [x.cpu()], [out_np], 0.5, bases=[base_np])
    torch.testing.assert_close(out_np, expected, rtol=1e-12, atol=1e-12)


def test_combine_list_accepts_a_strided_base_that_misses_its_output(op_path: str) -> None:
    """The reviewer's case: outputs are elements 0..7 of a buffer, the base rows 500..503 and
    510..513 of it (not dense as a whole). Refused before ("overlaps ... without being the same
    tensor": torch's overlap test gives up on non-dense tensors)."""
    gen = torch.Generator().manual_seed(2)
    storage = torch.randn(1000, generator=gen, dtype=F64)
    m, k, n = 2, 3, 4
    out = storage[0:m * n].view(m, n)
    base = storage[500:500 + m * 10].view(m, 10)[:, :n]
    x = torch.randn(k, n, generator=gen, dtype=F64)
    coeffs = torch.randn(m, k, generator=gen, dtype=F64)
    expected = coeffs @ x + base.clone()
    ops.combine_list(coeffs, [x], [out], 1.0, bases=[base])
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    # Rows that interleave with the output without touching it: base rows 0 and 2 of a
    # [3, n] block, output row 1; and the registered op, directly.
    block = torch.randn(3, n, generator=gen, dtype=F64)
    out, base = block[1], block[::2]
    expected = coeffs @ x + base.clone()
    out2 = torch.empty(m, n, dtype=F64)
    ops.combine_list(coeffs, [x], [out2], 1.0, bases=[base])
    torch.testing.assert_close(out2, expected, rtol=1e-13, atol=1e-13)
    if op_path == "compiled":
        storage2 = storage.clone()
        out = storage2[0:m * n].view(m, n)
        base = storage2[500:500 + m * 10].view(m, 10)[:, :n]
        expected = coeffs @ x + base.clone()
        torch.ops.mtunlearn.combine_list_from_([out], [base], coeffs, [x], 1.0, False)
        torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    # A base row that does touch the output is refused, with the base named.
    buf = torch.zeros(30, dtype=F64)
    with pytest.raises(ValueError, match=r"bases\[0\] overlaps outs\[0\]"):
        ops.combine_list(coeffs, [x], [buf[0:m * n].view(m, n)], 1.0,
                         bases=[buf[6:6 + m * 10].view(m, 10)[:, :n]])


def test_combine_list_reads_a_base_that_is_not_dense_from_a_copy(op_path: str) -> None:
    """A base whose trailing dims are not dense is read from a private copy made before any
    write, like such an input: sharing its output's bytes is harmless and accepted."""
    grid = torch.arange(1.0, 13.0, dtype=F64).reshape(2, 6)
    base = grid.view(2, 3, 2).transpose(1, 2)[0]  # [2, 3] over grid[0], not dense
    out = grid[0].view(2, 3)
    x = torch.ones(2, 6, dtype=F64).view(2, 2, 3)
    coeffs = torch.tensor([1.0, 2.0], dtype=F64)
    expected = base.clone() + 3.0
    ops.combine_list(coeffs, [x], [out], 1.0, bases=[base])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_combine_list_outputs_against_inputs_through_another_storage(op_path: str) -> None:
    n = 64
    array = np.arange(1.0, 2 * n + 2)
    x = torch.from_numpy(array[0:2 * n]).view(2, n)
    out = torch.from_numpy(array[1:n + 1])
    before = array.copy()
    with pytest.raises(ValueError, match=r"outs\[0\] overlaps xs\[0\]"):
        ops.combine_list(torch.ones(2, dtype=F64), [x], [out])
    assert np.array_equal(array, before)


def test_reference_path_writes_after_reading_everything(op_path: str) -> None:
    """An input that is not dense is read from a copy, so it may share an earlier output's
    memory: both paths give the float64 result from the inputs as they were (the reference
    wrote outs[0] before it read xs[1])."""
    grid = torch.arange(24.0, dtype=F64).reshape(4, 6)
    x1 = grid.view(4, 3, 2).transpose(1, 2)  # [4, 2, 3], not dense, over all of grid
    x0 = torch.ones(4, 6, dtype=F64)
    outs = [grid[0], torch.empty(2, 3, dtype=F64)]
    expected = [x0.sum(0), x1.clone().sum(0)]
    ops.combine_list(torch.ones(4, dtype=F64), [x0, x1], outs)
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


# ---- combine(out=): out against x --------------------------------------------------------------

def test_combine_refuses_out_over_a_row_strided_x(op_path: str) -> None:
    """x's rows are at 0 and 2n of a buffer, out covers half of row 0 and half of the gap:
    accepted before and off by 1.27."""
    k, n = 2, 64
    buf = torch.arange(2 * k * n + n, dtype=F64) / 100
    x = buf[:k * 2 * n].view(k, 2 * n)[:, :n]
    out = buf[n // 2:n // 2 + n].view(1, n)
    before = buf.clone()
    coeffs = torch.ones(1, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"mtunlearn_ext.ops.combine: `out` overlaps `x`"):
        ops.combine(coeffs, x, out=out)
    assert torch.equal(buf, before)
    if op_path == "compiled":
        with pytest.raises(ValueError, match=r"mtunlearn::combine_: `out` overlaps `x`"):
            torch.ops.mtunlearn.combine_(out, coeffs, x, 0.0)
        assert torch.equal(buf, before)
    # out in the gap between the rows (touching neither): accepted, float64 exact.
    out = buf[n:2 * n].view(1, n)
    expected = coeffs @ x.clone()
    assert ops.combine(coeffs, x, out=out) is out
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_combine_refuses_out_over_x_with_a_value_error(op_path: str) -> None:
    """out a row of x, or x itself: refused naming `out` and `x` (torch's generic
    RuntimeError before)."""
    gen = torch.Generator().manual_seed(3)
    buf = torch.randn(3, 16, generator=gen, dtype=F64)
    coeffs = torch.ones(1, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"`out` overlaps `x`"):
        ops.combine(coeffs, buf[:2], out=buf[1:2])
    x = torch.randn(2, 16, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"`out` overlaps `x`"):
        ops.combine(torch.eye(2, dtype=F64), x, out=x)
    # Batched: out is batch 1 of x's memory.
    flat = torch.randn(48, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"`out` overlaps `x`"):
        ops.combine(torch.ones(2, 1, 2, dtype=F64), flat[:32].view(2, 2, 8),
                    out=flat[24:40].view(2, 1, 8))
    # out may still be the coefficients (read from a private copy).
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    xs = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=F64)
    expected = a @ xs
    ops.combine(a, xs, out=a)
    torch.testing.assert_close(a, expected, rtol=0, atol=0)


@pytest.mark.parametrize("alias", ["numpy", "dlpack"])
def test_combine_refuses_out_over_x_through_another_storage(alias: str, op_path: str) -> None:
    """x and out over one buffer with two storages: accepted before and off by 2.4e5."""
    n = 4096
    array = np.arange(1.0, 2 * n + 101)
    if alias == "numpy":
        x = torch.from_numpy(array[0:2 * n]).view(2, n)
        out = torch.from_numpy(array[100:100 + n]).view(1, n)
    else:
        whole = torch.from_numpy(array)
        x = whole[0:2 * n].view(2, n)
        out = torch.from_dlpack(whole)[100:100 + n].view(1, n)
    before = array.copy()
    with pytest.raises(ValueError, match=r"`out` overlaps `x`"):
        ops.combine(torch.ones(1, 2, dtype=F64), x, out=out)
    assert np.array_equal(array, before)
    # Windows of the same array that do not meet: accepted, float64 exact.
    x = torch.from_numpy(array[0:2 * n]).view(2, n)
    out = torch.from_numpy(array[2 * n:2 * n + 100])[:100].view(1, 100)
    x_small = x[:, :100]
    expected = torch.ones(1, 2, dtype=F64) @ x_small.clone()
    ops.combine(torch.ones(1, 2, dtype=F64), x_small, out=out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ---- Fuzz: the decision against an element-level oracle -----------------------------------------

_N = 200


def _elements(t: torch.Tensor, base_ptr: int) -> set[int]:
    if t.numel() == 0:
        return set()
    offset = (t.data_ptr() - base_ptr) // t.element_size()
    return set(torch.as_strided(torch.arange(_N), t.shape, t.stride(), offset).flatten().tolist())


def _dense_trailing(t: torch.Tensor, row_dims: int) -> bool:
    n = 1
    for d in range(t.dim() - 1, row_dims - 1, -1):
        if t.shape[d] != 1 and t.stride(d) != n:
            return False
        n *= t.shape[d]
    return True


def _random_view(rng: random.Random, s: torch.Tensor, shape: tuple[int, ...],
                 contiguous: bool) -> torch.Tensor | None:
    numel = int(np.prod(shape))
    if contiguous or len(shape) < 2:
        offset = rng.randrange(0, _N - numel + 1)
        return s[offset:offset + numel].view(shape)
    rows, rest = shape[0], shape[1:]
    row_len = numel // rows
    kind = rng.choice(["gap", "stride0", "transposed"])
    rest_strides = torch.empty(rest).stride()
    if kind == "stride0":
        offset = rng.randrange(0, _N - row_len + 1)
        return torch.as_strided(s, shape, (0, *rest_strides), offset)
    if kind == "gap" or len(rest) != 2:
        stride = row_len + rng.randrange(0, 6)
        span = (rows - 1) * stride + row_len
        offset = rng.randrange(0, _N - span + 1)
        return torch.as_strided(s, shape, (stride, *rest_strides), offset)
    offset = rng.randrange(0, _N - numel + 1)
    return torch.as_strided(s, shape, (row_len, 1, rest[0]), offset)


def _accepted_as_the_oracle_says(call: Callable[[], object], shares: bool,
                                 buffer: torch.Tensor) -> bool:
    """Run ``call``: a refusal (ValueError) must come exactly where the oracle says memory is
    shared, and leave ``buffer`` as it was; returns whether the call was accepted."""
    before = buffer.clone()
    try:
        call()
    except ValueError as error:
        assert shares, f"false refusal: {error}"
        assert torch.equal(buffer, before)
        return False
    assert not shares, "an overlap was accepted"
    return True


def test_combine_list_overlap_decisions_match_an_element_oracle(op_path: str) -> None:
    """Random views of one buffer: refused exactly when an output shares an element with
    another output, an input, another output's base, or its own base (unless the base is the
    output itself) — counting inputs and bases whose trailing dims are not dense as copies;
    accepted calls equal the float64 reference."""
    rng = random.Random(7)
    refused = accepted = 0
    for _ in range(300):
        s = torch.randn(_N, dtype=F64, generator=torch.Generator().manual_seed(rng.randrange(9999)))
        count, k = rng.randint(1, 3), rng.randint(1, 3)
        m = rng.randint(1, 2) if rng.random() < 0.5 else None
        lead = () if m is None else (m,)
        xs, outs, bases = [], [], []
        for _p in range(count):
            shape = rng.choice([(5,), (3, 4), (2, 3)])
            x = _random_view(rng, s, (k, *shape), rng.random() < 0.5)
            assert x is not None
            xs.append(x)
            outs.append(_random_view(rng, s, (*lead, *shape), True))
            if rng.random() < 0.3:
                bases.append(outs[-1])
            else:
                b = _random_view(rng, s, (*lead, *shape), m is None or rng.random() < 0.5)
                bases.append(outs[-1] if b is None else b)
        use_bases = rng.random() < 0.5
        beta = rng.choice([0.0, 1.0, 0.5])
        coeffs = torch.randn((m, k) if m else (k,), dtype=F64)
        ptr = s.data_ptr()
        out_sets = [_elements(o, ptr) for o in outs]
        x_sets = [_elements(x, ptr) if _dense_trailing(x, 1) else set() for x in xs]
        read_bases = use_bases and beta != 0.0
        base_sets = [_elements(b, ptr) if _dense_trailing(b, 1 if m else 0) else set()
                     for b in bases] if read_bases else []
        shares = False
        for p in range(count):
            for q in range(count):
                shares |= q != p and bool(out_sets[p] & out_sets[q])
                shares |= bool(out_sets[p] & x_sets[q])
                shares |= read_bases and q != p and bool(out_sets[p] & base_sets[q])
            if read_bases and out_sets[p] & base_sets[p]:
                same = (bases[p].data_ptr() == outs[p].data_ptr() and all(
                    n <= 1 or a == b
                    for n, a, b in zip(outs[p].shape, outs[p].stride(), bases[p].stride())))
                shares |= not same
        c2 = coeffs.reshape(-1, k)
        old_bases = [b.clone() for b in (bases if use_bases else outs)]
        expected = [(c2 @ x.clone().reshape(k, -1)).reshape(o.shape)
                    + (beta * old_bases[p] if beta else 0.0)
                    for p, (x, o) in enumerate(zip(xs, outs))]
        if not _accepted_as_the_oracle_says(
                lambda: ops.combine_list(coeffs, xs, outs, beta,
                                         bases=bases if use_bases else None), shares, s):
            refused += 1
            continue
        for o, e in zip(outs, expected):
            torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
        accepted += 1
    assert refused > 30 and accepted > 30


def test_combine_out_overlap_decisions_match_an_element_oracle(op_path: str) -> None:
    """combine(out=) over random (batched, row-strided, column-strided) views of x's buffer:
    refused exactly when out shares an element with x as the kernels read it (in place when
    its rows are unit-stride and its leading dims merge, else a copy)."""
    rng = random.Random(11)
    refused = accepted = 0
    for _ in range(300):
        s = torch.randn(_N, dtype=F64)
        batch = rng.choice([(), (2,), (2, 2)])
        k, n, m = rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 2)
        shape = (*batch, k, n)
        strides = [0] * len(shape)
        kind = rng.choice(["dense", "row_gap", "col_stride"])
        step = 1 if kind != "col_stride" else 2
        strides[-1] = step
        acc = n * step + (rng.randrange(0, 4) if kind == "row_gap" else 0)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = acc
            acc *= shape[d]
            if kind == "row_gap":
                acc += rng.randrange(0, 3)
        span = sum((sz - 1) * st for sz, st in zip(shape, strides)) + 1
        if span > _N:
            continue
        x = torch.as_strided(s, shape, strides, rng.randrange(0, _N - span + 1))
        numel = int(np.prod((*batch, m, n)))
        offset = rng.randrange(0, _N - numel + 1)
        out = s[offset:offset + numel].view(*batch, m, n)
        coeffs = torch.randn(*batch, m, k, dtype=F64)
        read_in_place = n == 1 or x.stride(-1) == 1
        if read_in_place:
            try:
                x.view(-1, k, n)
            except RuntimeError:
                read_in_place = False
        ptr = s.data_ptr()
        shares = read_in_place and bool(_elements(out, ptr) & _elements(x, ptr))
        expected = coeffs @ x.clone()
        if not _accepted_as_the_oracle_says(lambda: ops.combine(coeffs, x, out=out), shares, s):
            refused += 1
            continue
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        accepted += 1
    assert refused > 10 and accepted > 100


# ---- The overlap search against the quadratic scan it replaced -------------------------------

_WIDE = 400


def _first_shared(outs: list[set[int]], xs: list[set[int]], bases: list[set[int]] | None
                  ) -> tuple[int, str, int] | None:
    """The scan every pair in order made before (outs[p] against outs[q], xs[q], bases[q] for
    q in order, p in order), on element sets: the first output that shares memory and what."""
    for p, out in enumerate(outs):
        for q in range(len(outs)):
            if q != p and out & outs[q]:
                return p, "outs", q
            if out & xs[q]:
                return p, "xs", q
            if bases is not None and q != p and out & bases[q]:
                return p, "bases", q
    return None


def _straddling_layout(rng: random.Random, s: torch.Tensor, count: int, k: int,
                       m: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                               list[torch.Tensor]]:
    """Outputs of 0 to 3 columns (zero-size ones too) at random places of ``s`` or packed end
    to end; inputs of ``k`` rows whose stride spans many outputs (the rows in between them or
    on them), broadcast rows (stride 0), transposed (read from a copy) or of their own; bases
    the output itself, the same elements under another view, two rows far apart, or random
    views."""
    lead = () if m is None else (m,)
    xs, outs, bases = [], [], []
    packed = rng.random() < 0.5
    end = rng.randrange(0, 40)
    for _ in range(count):
        cols = rng.choice([0, 1, 1, 2, 3])
        numel = cols * (m or 1)
        offset = end if packed else rng.randrange(0, _WIDE - numel + 1)
        end = offset + numel + (0 if rng.random() < 0.7 else rng.randrange(1, 4))
        outs.append(torch.as_strided(s, (*lead, cols), (cols, 1) if m else (1,), offset))
        kind = rng.choice(["straddle", "straddle", "stride0", "transposed", "own"])
        if kind == "own" or cols == 0:
            xs.append(torch.randn(k, cols, dtype=F64))
        elif kind == "transposed" and cols > 1:
            offset = rng.randrange(0, _WIDE - k * cols + 1)
            xs.append(torch.as_strided(s, (k, cols), (1, k), offset))
        else:
            stride = 0 if kind == "stride0" else rng.randrange(1, _WIDE // k)
            offset = rng.randrange(0, _WIDE - (k - 1) * stride - cols + 1)
            xs.append(torch.as_strided(s, (k, cols), (stride, 1), offset))
        choice = rng.random()
        if choice < 0.3:
            bases.append(outs[-1])
        elif choice < 0.45:
            bases.append(torch.as_strided(s, outs[-1].shape, outs[-1].stride(),
                                          outs[-1].storage_offset()))
        elif choice < 0.7 and m == 2:  # rows far apart: outputs (its own too) in between
            offset = outs[-1].storage_offset()
            if rng.random() < 0.5 or offset > _WIDE - 2 * cols:
                offset = rng.randrange(0, _WIDE - 2 * cols + 1)
            stride = rng.randrange(cols, _WIDE - offset - cols + 1)
            bases.append(torch.as_strided(s, (2, cols), (stride, 1), offset))
        elif choice < 0.8 and outs[-1].storage_offset() + numel + 2 <= _WIDE:  # over its own
            offset = outs[-1].storage_offset() + rng.choice([0, 1])
            bases.append(torch.as_strided(s, outs[-1].shape, (cols + 1, 1) if m else (1,),
                                          offset))
        else:
            offset = rng.randrange(0, _WIDE - numel + 1)
            bases.append(torch.as_strided(s, outs[-1].shape, outs[-1].stride(), offset))
    return xs, outs, bases


def test_combine_list_overlap_search_names_what_the_quadratic_scan_named(op_path: str) -> None:
    """Review: the search for a shared byte walked, for each input or base, every output its
    extent covered, O(P^2) when every input straddles every output (1.1 s at 16,000 tensors in
    C++; a refusal, named in Python by scanning every pair, took minutes). The search is now
    by rows and bisection; on random layouts of up to 12 tensors over one buffer it refuses
    exactly the calls the scan of every pair refuses, naming the same two tensors (a base over
    its own output is checked first), on every path: the wrapper, the compiled op itself, and
    the check across several calls (with the inputs and bases it must copy first)."""
    from mtunlearn_ext.ops.combine import check_across_calls

    rng = random.Random(5)
    seen = {"accepted": 0, "refused": 0}
    for _ in range(600):
        s = torch.randn(_WIDE, dtype=F64)
        count, k = rng.randint(1, 12), rng.randint(1, 6)
        m = rng.choice([None, None, 1, 2])
        xs, outs, bases = _straddling_layout(rng, s, count, k, m)
        use_bases = rng.random() < 0.5
        coeffs = torch.randn((m, k) if m else (k,), dtype=F64)

        def elements(t: torch.Tensor) -> set[int]:
            if t.numel() == 0 or t.untyped_storage().data_ptr() != s.data_ptr():
                return set()  # empty, or memory of its own
            every = torch.as_strided(torch.arange(_WIDE), t.shape, t.stride(),
                                     t.storage_offset())
            return set(every.flatten().tolist())

        def read(t: torch.Tensor, row_dims: int) -> set[int]:
            return elements(t) if _dense_trailing(t, row_dims) else set()  # else a copy

        out_sets, x_sets = [elements(o) for o in outs], [read(x, 1) for x in xs]
        reads = bases if use_bases else outs  # what each output reads as its base
        read_sets = [read(b, 1 if m else 0) for b in reads]
        first = _first_shared(out_sets, x_sets, read_sets if use_bases else None)
        expected = None if first is None else (rf"outs\[{first[0]}\] overlaps {first[1]}\["
                                               rf"{first[2]}\]; an output must not share")
        for p in range(count) if use_bases else ():
            same = bases[p].storage_offset() == outs[p].storage_offset() and all(
                n <= 1 or a == b for n, a, b in zip(outs[p].shape, outs[p].stride(),
                                                    bases[p].stride()))
            if out_sets[p] & read_sets[p] and not same:
                expected = rf"bases\[{p}\] overlaps outs\[{p}\] without being the same"
                break
        seen["accepted" if expected is None else "refused"] += 1
        given = bases if use_bases else None
        calls: list[Callable[[], object]] = [
            lambda: ops.combine_list(coeffs, xs, outs, 1.0, bases=given)]
        if op_path == "compiled":
            calls.append(
                (lambda: torch.ops.mtunlearn.combine_list_(outs, coeffs, xs, 1.0, False))
                if given is None else
                (lambda: torch.ops.mtunlearn.combine_list_from_(outs, given, coeffs, xs, 1.0,
                                                                False)))
        for call in calls:
            if expected is None:
                call()
            else:
                with pytest.raises(ValueError, match=expected):
                    call()
        # Across calls: only the search (no base against its own output), every base read.
        across = _first_shared(out_sets, x_sets, read_sets)
        try:
            copies = check_across_calls("op", coeffs, xs, outs, reads, False)
        except ValueError as error:
            assert across is not None and f"outs[{across[0]}] overlaps {across[1]}" \
                f"[{across[2]}];" in str(error), (across, error)
            continue
        assert across is None
        spans = [(min(o), max(o)) for o in out_sets if o]

        def under(t: torch.Tensor, row_dims: int) -> bool:
            if t.numel() == 0 or _dense_trailing(t, row_dims) or not elements(t):
                return False
            lo, hi = min(elements(t)), max(elements(t))
            return any(a <= hi and lo <= b for a, b in spans)

        assert copies == ([p for p, x in enumerate(xs) if under(x, 1)],
                          [p for p, b in enumerate(reads) if b is not outs[p] and under(
                              b, 1 if m else 0)])
    assert seen["accepted"] > 100 and seen["refused"] > 100, seen


def _counting_rows_meet(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    """The Python wrapper's module (not the op of its name) with its row-pair test counted:
    ``calls[0]``, the pairs of rows the overlap search compared."""
    import importlib

    combine = importlib.import_module("mtunlearn_ext.ops.combine")
    calls = [0]
    rows_meet = combine._rows_meet

    def counted(*args: object) -> bool:
        calls[0] += 1
        return rows_meet(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(combine, "_rows_meet", counted)
    return combine, calls


def test_combine_list_overlap_search_is_not_quadratic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every input straddles every output (row 0 before them all, row 1 after): the search
    tests a row against the outputs (a bisection) instead of each output against the rows,
    accepted or refused (here at the last output, which a scan in order reaches last)."""
    combine, calls = _counting_rows_meet(monkeypatch)
    n = 2000
    s = torch.zeros(3 * n)
    xs = [s.as_strided((2, 1), (2 * n, 1), q) for q in range(n)]
    outs = [s.as_strided((1,), (1,), n + p) for p in range(n)]
    coeffs = torch.ones(2)
    combine.check_combine_list("op", coeffs, xs, outs, False, None, 0.0)
    assert calls[0] == 0  # was n * n
    xs[-1] = s.as_strided((2, 1), (n, 1), n - 1)  # its row 1 on outs[n - 1]
    with pytest.raises(ValueError, match=rf"outs\[{n - 1}\] overlaps xs\[{n - 1}\]"):
        combine.check_combine_list("op", coeffs, xs, outs, False, None, 0.0)
    assert calls[0] <= 3 * n  # the named output's scan; was 3 * n * n


@pytest.mark.parametrize("row_one", ["past every output", "in the next gap"])
def test_a_base_over_its_own_output_is_no_conflict_for_the_search(
        row_one: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Across calls each output reads a base (``check_across_calls``), which may lie on its own
    output: that is no conflict, also where the base's two rows are far apart (its extent
    covering many outputs: each row looked up, the own output skipped) or cover its own and
    the next output (each output tested). Taken for one, it sent the search to the scan of
    every pair, which found nothing: accepted all the same, in O(P^2) (the calls counted)."""
    combine, calls = _counting_rows_meet(monkeypatch)
    n = 1000
    s = torch.zeros(6 * n + 8)
    outs = [s.as_strided((2, 1), (1, 1), 3 * p) for p in range(n)]  # a gap after each
    stride = 3 * n if row_one == "past every output" else 5
    bases = [s.as_strided((2, 1), (stride, 1), 3 * p) for p in range(n)]  # row 0 on its own
    xs = [torch.zeros(1, 1) for _ in range(n)]
    assert combine.check_across_calls("op", torch.ones(2, 1), xs, outs, bases, False) == ([], [])
    assert calls[0] <= n  # each base's run of two outputs tested; was the scan's 3 * n * n

