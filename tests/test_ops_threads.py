"""Concurrent use: every public op family and the surgery aggregators called from several Python
threads at once (the kernels run with the GIL released, each on its own inputs) give bit for bit
the results of the same calls made one after another, also with torch's intra-op thread count
changed between calls; and one intra-op thread gives the bits of two (the README's claim: the
work split depends on the problem, never on the thread count). A workspace or cache shared
between calls (a static buffer, a module-level dict) would mix one thread's result into
another's here."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable

import pytest
import torch

from mtunlearn_ext import ops, surgery

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CALLER_THREADS = 6
ROUNDS = 3  # every thread makes every call this many times

Call = Callable[[], object]


def _rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _combined(coeffs: torch.Tensor, xs: list[torch.Tensor], per_tensor: bool) -> list[torch.Tensor]:
    outs = [torch.ones((coeffs.shape[-2], *x.shape[1:]), dtype=x.dtype) for x in xs]
    ops.combine_list(coeffs, xs, outs, 0.5, per_tensor=per_tensor)
    return outs


def _aggregated(make: Callable[[], surgery.Aggregator], xs: list[torch.Tensor]) -> object:
    outs = [torch.empty(x.shape[1:], dtype=x.dtype) for x in xs]
    weights = surgery.aggregate_list(make(), xs, outs, per_layer=[0, 1, 0])
    return weights, outs


def _gradients(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    x = _rand(5, 3001, dtype=dtype, seed=seed).requires_grad_()
    y = _rand(4, 3001, dtype=dtype, seed=seed + 1).requires_grad_()
    c = _rand(2, 5, dtype=dtype, seed=seed + 2).requires_grad_()
    xs = [_rand(5, 700, dtype=dtype, seed=seed + 3).requires_grad_(),
          _rand(5, 3, 9, dtype=dtype, seed=seed + 4).requires_grad_()]
    loss = (ops.gram(x).double().sum() + ops.inner(x, y).double().square().sum()
            + ops.combine(c, x).double().square().sum() + ops.gram_list(xs).double().sum()
            + ops.inner_list(xs, xs, True).double().sum()
            + surgery.UPGrad()(x).double().square().sum())
    return torch.autograd.grad(loss, [x, y, c, *xs])


def _calls(inputs_seed: int) -> list[tuple[str, Call]]:
    """Calls on fixed random inputs (drawn from ``inputs_seed``), each its own: shapes that take
    one work item and many (the Gram in output blocks, the transposed few-rows-against-many
    path, several column items)."""
    calls: list[tuple[str, Call]] = []
    for d, dtype in enumerate(DTYPES):
        seed = inputs_seed + 100 * d
        coeff_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for rows, cols in [(7, 33), (16, 4099), (3, 40000), (300, 300)]:
            x = _rand(rows, cols, dtype=dtype, seed=seed + rows)
            y = _rand(rows + 1, cols, dtype=dtype, seed=seed + rows + 1)
            c = _rand(3, rows, dtype=coeff_dtype, seed=seed + rows + 2).to(
                dtype if dtype == torch.float64 else coeff_dtype)
            calls += [(f"gram {rows}x{cols} {dtype}", lambda x=x: ops.gram(x)),
                      (f"inner {rows}x{cols} {dtype}", lambda x=x, y=y: ops.inner(x, y)),
                      (f"combine {rows}x{cols} {dtype}", lambda c=c, x=x: ops.combine(c, x))]
        few, many = _rand(2, 3000, dtype=dtype, seed=seed + 5), _rand(400, 3000, dtype=dtype,
                                                                       seed=seed + 6)
        calls.append((f"inner few x many {dtype}", lambda a=few, b=many: ops.inner(a, b)))
        g, r = _rand(4, 5000, dtype=dtype, seed=seed + 7), _rand(6, 5000, dtype=dtype,
                                                                  seed=seed + 8)
        calls += [
            (f"pcgrad {dtype}", lambda r=r: ops.pcgrad(r, seed=3, return_coeffs=True)),
            (f"project_out {dtype}", lambda g=g, r=r: ops.project_out(g, r, return_coeffs=True)),
            (f"project_nonconflicting {dtype}",
             lambda g=g, r=r: ops.project_nonconflicting(g, r, return_coeffs=True))]
        shapes = [(4, 33), (4, 9000), (4, 17, 5)]
        xs = [_rand(*shape, dtype=dtype, seed=seed + 10 + i) for i, shape in enumerate(shapes)]
        ys = [_rand(*shape, dtype=dtype, seed=seed + 20 + i) for i, shape in enumerate(shapes)]
        gs = [_rand(2, *shape[1:], dtype=dtype, seed=seed + 30 + i)
              for i, shape in enumerate(shapes)]
        coeffs = _rand(3, 4, dtype=coeff_dtype, seed=seed + 40)
        per_tensor_coeffs = _rand(len(xs), 3, 4, dtype=coeff_dtype, seed=seed + 41)
        calls += [
            (f"gram_list {dtype}", lambda xs=xs: ops.gram_list(xs)),
            (f"gram_list per tensor {dtype}", lambda xs=xs: ops.gram_list(xs, per_tensor=True)),
            (f"gram_list_stacked {dtype}", lambda xs=xs, ys=ys: ops.gram_list_stacked(xs, ys)),
            (f"inner_list {dtype}", lambda xs=xs, ys=ys: ops.inner_list(xs, ys, True)),
            (f"combine_list {dtype}", lambda c=coeffs, xs=xs: _combined(c, xs, False)),
            (f"combine_list per tensor {dtype}",
             lambda c=per_tensor_coeffs, xs=xs: _combined(c, xs, True)),
            (f"project_out_list {dtype}",
             lambda g=gs, r=xs: surgery.project_out_list(g, r, return_coeffs=True)),
            (f"project_nonconflicting_list {dtype}",
             lambda g=gs, r=xs: surgery.project_nonconflicting_list(
                 g, r, per_layer=True, return_coeffs=True)),
            (f"backward {dtype}", lambda dtype=dtype, seed=seed: _gradients(dtype, seed + 50))]
        matrix = _rand(6, 5000, dtype=dtype, seed=seed + 60)
        aggregators: list[tuple[str, Callable[[], surgery.Aggregator]]] = [
            ("Mean", surgery.Mean), ("UPGrad", surgery.UPGrad), ("MGDA", surgery.MGDA),
            ("PCGrad", lambda: surgery.PCGrad(seed=5, reshuffle=False))]
        for name, make in aggregators:
            calls += [(f"{name} {dtype}", lambda make=make, j=matrix: make()(j)),
                      (f"aggregate_list {name} {dtype}",
                       lambda make=make, xs=xs: _aggregated(make, xs))]
    for k in (1, 5, 40):
        factors = _rand(3, k, 2 * k + 1, dtype=torch.float64, seed=inputs_seed + k)
        gram = factors @ factors.transpose(-1, -2)
        rhs = _rand(3, k, 2, dtype=torch.float64, seed=inputs_seed + k + 1)
        rows = _rand(3, 7, k, dtype=torch.float64, seed=inputs_seed + k + 2)
        calls += [(f"ridge_solve k={k}", lambda g=gram, b=rhs: ops.ridge_solve(g, b)),
                  (f"nonconflicting_dual k={k}",
                   lambda g=gram, b=rows: ops.nonconflicting_dual(g, b)),
                  (f"pcgrad_weights k={k}", lambda g=gram: ops.pcgrad_weights(g, seed=11)),
                  (f"min_norm_simplex k={k}", lambda g=gram: surgery.min_norm_simplex(g))]
    return calls


def _tensors(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    assert isinstance(result, (list, tuple)), type(result)
    return [t for part in result for t in _tensors(part)]


def _same_bits(result: object, expected: object) -> bool:
    got, want = _tensors(result), _tensors(expected)
    return len(got) == len(want) and all(
        a.dtype == b.dtype and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        for a, b in zip(got, want))


Calls = list[tuple[str, Call]]


@pytest.fixture(scope="module")
def calls_and_serial_results() -> list[tuple[Calls, list[object]]]:
    """For each caller thread its own inputs (the same shapes and dtypes in every thread), and
    the results of its calls made one by one."""
    per_thread = []
    for index in range(CALLER_THREADS):
        calls = _calls(inputs_seed=1000 * index)
        per_thread.append((calls, [call() for _, call in calls]))
    return per_thread


def test_calls_from_several_threads_give_the_serial_results_bit_for_bit(
        calls_and_serial_results: list[tuple[Calls, list[object]]]) -> None:
    wrong: list[str] = []
    failures: list[str] = []
    recording = threading.Lock()
    step_start = threading.Barrier(CALLER_THREADS)

    def caller(index: int) -> None:
        # Step by step, two thirds of the threads make one call together (same op, shapes and
        # dtype, what a cached workspace would be keyed by, on other inputs), the others a
        # call of another op. Each thread changes its intra-op thread count between calls
        # (torch keeps one per thread once set).
        calls, serial = calls_and_serial_results[index]
        other = len(calls) // 2 if index % 3 == 2 else 0
        thread_counts = random.Random(index)
        for step in range(ROUNDS * len(calls)):
            i = (step + other) % len(calls)
            torch.set_num_threads(thread_counts.choice([1, 2, 3]))
            step_start.wait()
            name, call = calls[i]
            try:
                same = _same_bits(call(), serial[i])
            except Exception as error:  # noqa: BLE001 - reported with the call's name below
                with recording:
                    failures.append(f"{name}: {error!r}")
                continue
            if not same:
                with recording:
                    wrong.append(name)

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(CALLER_THREADS)]
    # Threads switched every 5 ms (Python's default) rarely meet between two statements of
    # one call; every 10 us they do, as on a loaded machine.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert not failures, failures[:5]
    assert not wrong, f"{len(wrong)} results differ from the serial call's: {sorted(set(wrong))}"


def test_one_intra_op_thread_gives_the_bits_of_two(
        calls_and_serial_results: list[tuple[Calls, list[object]]]) -> None:
    calls, _ = calls_and_serial_results[0]
    torch.set_num_threads(2)
    two = [call() for _, call in calls]
    torch.set_num_threads(1)
    one = [call() for _, call in calls]
    differing = [name for (name, _), a, b in zip(calls, one, two) if not _same_bits(a, b)]
    assert not differing


def _subnormal_calls() -> Calls:
    """Calls of several work items each whose products, partial sums or inputs are subnormal
    (below 1.2e-38 in float32, 2.2e-308 in float64)."""
    tiny = _rand(3, 100_003, dtype=torch.float32, seed=70) * 1e-20  # products ~1e-40
    coeffs = torch.full((2, 3), 1e-20)
    dense = _rand(8, 8, dtype=torch.float64, seed=71)
    grams = (dense @ dense.T + 8 * torch.eye(8, dtype=torch.float64)).expand(64, 8, 8) * 1e-300
    rhs = _rand(64, 8, 3, dtype=torch.float64, seed=72) * 1e-300
    return [
        ("gram", lambda: ops.gram(tiny)),
        ("inner", lambda: ops.inner(tiny[:1], tiny)),
        ("combine", lambda: ops.combine(coeffs, tiny)),
        ("ridge_solve", lambda: ops.ridge_solve(grams, rhs, ridge=0.0)),
        ("nonconflicting_dual",
         lambda: ops.nonconflicting_dual(grams, -rhs.transpose(-1, -2).contiguous())),
        ("pcgrad_weights", lambda: ops.pcgrad_weights(-grams + 2 * grams.diagonal(
            dim1=-2, dim2=-1).diag_embed())),
    ]


def test_flushing_subnormals_gives_the_bits_of_one_thread_on_two() -> None:
    """Review: torch.set_flush_denormal(True) sets the calling thread's MXCSR only, and the chunks
    that at::parallel_for ran on pool threads kept the subnormals the caller's chunk flushed:
    the Gram of rows whose products are ~1e-40 was 0 on one thread, 9.7e-36 on two. Every chunk
    now runs under the caller's floating-point control state."""
    calls = _subnormal_calls()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        torch.set_num_threads(1)
        one = [call() for _, call in calls]
        torch.set_num_threads(2)
        two = [call() for _, call in calls]
    finally:
        torch.set_flush_denormal(False)
    differing = [name for (name, _), a, b in zip(calls, one, two) if not _same_bits(a, b)]
    assert not differing
    # Unflushed, the same calls agree too (and the subnormals count: a result changes).
    torch.set_num_threads(1)
    kept = [call() for _, call in calls]
    torch.set_num_threads(2)
    assert all(_same_bits(a, call()) for a, (_, call) in zip(kept, calls))
    assert not _same_bits(kept[0], one[0])
