"""The ops under PyTorch's transforms: autograd (the list ops' derivatives, a clear error where an
op has none, in-place writes refused while autograd would need them) and ``torch.vmap`` (batch
rules instead of torch's per-sample fallback loop; the NaN/Inf check inside vmap)."""

from __future__ import annotations

import re

import pytest
import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops import _reference as ref
from mtunlearn_ext.ops._batching import LEADING_BATCH_OPS
from mtunlearn_ext.ops._registration import NOT_DIFFERENTIABLE

F64 = torch.float64
LIST_OPS = ("gram_list", "inner_list", "gram_list_stacked")

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _rand(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def _stacks(rows: int, dtype: torch.dtype = F64, seed: int = 0,
            strided: bool = False) -> list[torch.Tensor]:
    """Per-parameter stacks ``[rows, *shape_p]`` of odd shapes; ``strided``: the same values
    read through column-sliced and transposed views."""
    shapes = [(4,), (2, 5), (1,), (3, 3)]
    xs = [_rand(rows, *s, dtype=dtype, seed=seed + p) for p, s in enumerate(shapes)]
    if strided:
        for p in (0, 1):
            wide = torch.zeros(*xs[p].shape[:-1], 2 * xs[p].shape[-1], dtype=dtype)
            wide[..., ::2] = xs[p]
            xs[p] = wide[..., ::2]
        xs[3] = xs[3].transpose(1, 2).contiguous().transpose(1, 2)
        assert not any(xs[p].is_contiguous() for p in (0, 1, 3))
    return xs


def _call(name: str, a: list[torch.Tensor], b: list[torch.Tensor], per_tensor: bool
          ) -> torch.Tensor:
    if name == "gram_list":
        return ops.gram_list(a, per_tensor)
    return getattr(ops, name)(a, b, per_tensor)


def _reference(name: str, a: list[torch.Tensor], b: list[torch.Tensor], per_tensor: bool
               ) -> torch.Tensor:
    if name == "gram_list":
        return ref.gram_list(a, per_tensor)
    return getattr(ref, name)(a, b, per_tensor)


# --- autograd: the list ops -------------------------------------------------------------------

@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("name", LIST_OPS)
def test_list_ops_pass_gradcheck_and_gradgradcheck(name: str, per_tensor: bool,
                                                   strided: bool) -> None:
    a = [t.requires_grad_() for t in _stacks(3, seed=1, strided=strided)]
    b = [t.requires_grad_() for t in _stacks(2, seed=11, strided=strided)]
    inputs = a if name == "gram_list" else a + b

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        return _call(name, list(tensors[:len(a)]), list(tensors[len(a):]), per_tensor)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("name", LIST_OPS)
def test_list_op_batched_gradients_match_one_at_a_time(name: str, per_tensor: bool) -> None:
    """Batched gradients (``is_grads_batched``, as ``jacobian(..., vectorize=True)`` and the
    surgery hook take them) ran the list ops' backward under vmap, where its in-place
    ``combine_list_`` has no batching rule: refused, while ``gram``, ``inner`` and
    ``combine`` gave them."""
    a = [t.requires_grad_() for t in _stacks(3, seed=5)]
    b = [t.requires_grad_() for t in _stacks(2, seed=15)]
    inputs = a if name == "gram_list" else a + b
    out = _call(name, a, b, per_tensor)
    directions = _rand(4, *out.shape, seed=25)
    batched = torch.autograd.grad(out, inputs, directions, retain_graph=True,
                                  is_grads_batched=True)
    for i in range(directions.shape[0]):
        one = torch.autograd.grad(out, inputs, directions[i], retain_graph=True)
        for got, expected in zip(batched, one):
            torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("name", LIST_OPS)
def test_list_op_gradients_match_float64_autograd(name: str, per_tensor: bool,
                                                  dtype: torch.dtype) -> None:
    """Lower precisions against autograd of the float64 reference, on the same values; the
    gradient's dtype is the input's."""
    a = _stacks(5, dtype=dtype, seed=2)
    b = _stacks(3, dtype=dtype, seed=12)
    a64 = [t.to(F64).requires_grad_() for t in a]
    b64 = [t.to(F64).requires_grad_() for t in b]
    out64 = _reference(name, a64, b64, per_tensor)
    weight = _rand(*out64.shape, seed=99)
    expected = torch.autograd.grad((out64 * weight).sum(), a64 + b64 if name != "gram_list"
                                   else a64)
    a_in = [t.clone().requires_grad_() for t in a]
    b_in = [t.clone().requires_grad_() for t in b]
    out = _call(name, a_in, b_in, per_tensor)
    got = torch.autograd.grad((out * weight.to(out.dtype)).sum(),
                              a_in + b_in if name != "gram_list" else a_in)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for g, e, t in zip(got, expected, a_in + b_in):
        assert g.dtype == dtype and g.shape == t.shape
        scale = float(e.abs().max()) + 1e-30
        assert float((g.to(F64) - e).abs().max()) <= tol * scale


def test_list_op_gradient_to_one_side_only() -> None:
    """``needs_input_grad``: a list that does not require grad gets no gradient (and costs
    none)."""
    a = [t.requires_grad_() for t in _stacks(2, seed=3)]
    b = _stacks(4, seed=13)
    out = ops.inner_list(a, b)
    out.sum().backward()
    assert all(t.grad is not None for t in a) and all(t.grad is None for t in b)
    expected = ref.inner_list([t.detach().requires_grad_() for t in a], b)
    torch.testing.assert_close(out.detach(), expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LIST_OPS)
def test_list_op_gradient_reaches_the_one_tensor_of_a_list_that_requires_grad(name: str
                                                                              ) -> None:
    """A list is differentiated when *any* of its tensors requires grad (a model with frozen
    parameters): asking that all of them do left the trainable tensors without a gradient."""
    a = _stacks(3, seed=6)
    b = _stacks(2, seed=16)
    a[0].requires_grad_()
    b[-1].requires_grad_()
    out = _call(name, a, b, False)
    weight = _rand(*out.shape, seed=98)
    (out * weight).sum().backward()
    a64 = [t.detach().clone().requires_grad_(t.requires_grad) for t in a]
    b64 = [t.detach().clone().requires_grad_(t.requires_grad) for t in b]
    (_reference(name, a64, b64, False) * weight).sum().backward()
    checked = [(a[0], a64[0])] + ([] if name == "gram_list" else [(b[-1], b64[-1])])
    for got, expected in checked:
        assert got.grad is not None and expected.grad is not None
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=1e-12)
    assert all(t.grad is None for t in a[1:] + b[:-1])


def test_gram_list_stacked_gradient_with_an_empty_side() -> None:
    xs = [t.requires_grad_() for t in _stacks(0, seed=4)]
    ys = [t.requires_grad_() for t in _stacks(3, seed=14)]
    out = ops.gram_list_stacked(xs, ys)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in xs + ys)
    ys_ref = [t.detach().requires_grad_() for t in ys]
    ref.gram_list(ys_ref).sum().backward()
    for got, exp in zip(ys, ys_ref):
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LIST_OPS)
def test_opcheck_list_ops_with_inputs_that_require_grad(name: str) -> None:
    """opcheck's autograd and AOT-dispatch tests run the registered backward."""
    a = [t.float().requires_grad_() for t in _stacks(3, seed=5)]
    b = [t.float().requires_grad_() for t in _stacks(2, seed=15)]
    op = getattr(torch.ops.mtunlearn, name)
    for per_tensor in (False, True):
        args = (a, per_tensor) if name == "gram_list" else (a, b, per_tensor)
        torch.library.opcheck(op, args)


# --- autograd: ops without a derivative --------------------------------------------------------

def _not_differentiable_call(name: str, gm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    g = x[:2] * 1.5
    calls = {
        "ridge_solve": lambda: ops.ridge_solve(gm, x[:, :2] * 1.0, 1e-3),
        "nonconflicting_dual": lambda: ops.nonconflicting_dual(gm, -x[:2, :4]),
        "pcgrad_weights": lambda: ops.pcgrad_weights(gm, 1),
        "project_out": lambda: ops.project_out(g, x),
        "project_nonconflicting": lambda: ops.project_nonconflicting(g, x, -1),
        "pcgrad": lambda: ops.pcgrad(x, 2),
    }
    return calls[name]()


@pytest.mark.parametrize("name", NOT_DIFFERENTIABLE)
def test_a_backward_pass_through_an_op_without_a_derivative_says_so(name: str) -> None:
    """Torch's fallback treated the result as a constant with only a warning (the gradient of
    the Gram or of x silently None); the backward now raises, naming the op."""
    x = _rand(4, 6, seed=6).requires_grad_()
    gm = ops.gram(x)
    out = _not_differentiable_call(name, gm, x)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match=rf"ops\.{name} is not differentiable.*Detach"):
        out.sum().backward()
    # As a constant (detached inputs, or no_grad), it is no part of the graph.
    with torch.no_grad():
        assert not _not_differentiable_call(name, gm, x).requires_grad
    assert not _not_differentiable_call(name, gm.detach(), x.detach()).requires_grad


def test_every_op_has_an_autograd_kernel() -> None:
    """No op falls through to torch's 'autograd kernel was not registered' path (a warning and
    silently wrong gradients); the in-place ones are refused by their wrappers instead."""
    in_place = {"combine_", "combine_list_", "combine_list_from_"}
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("mtunlearn::") or name.split("::")[1] in in_place:
            continue
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"), name


# --- autograd: in-place writes -----------------------------------------------------------------

@pytest.mark.parametrize("argument", ["out", "coeffs", "x"])
def test_combine_with_out_refuses_arguments_that_require_grad(argument: str, op_path: str
                                                              ) -> None:
    """As torch.matmul(..., out=) does: the write is not recorded, so x's gradient was silently
    lost (an `out` computed from a tensor that requires grad kept its old grad_fn)."""
    tensors = {"out": torch.full((2, 5), float("nan"), dtype=F64),
               "coeffs": _rand(2, 3, seed=7), "x": _rand(3, 5, seed=8)}
    tensors[argument].requires_grad_()
    if argument == "out":
        tensors["out"] = tensors["out"] * 1.0  # a non-leaf that requires grad
    before = tensors["out"].detach().clone()
    with pytest.raises(RuntimeError, match=rf"combine: .*`{argument}` requires grad"):
        ops.combine(tensors["coeffs"], tensors["x"], out=tensors["out"])
    torch.testing.assert_close(tensors["out"].detach(), before, equal_nan=True, rtol=0, atol=0)
    with torch.no_grad():
        ops.combine(tensors["coeffs"], tensors["x"], out=tensors["out"])
    torch.testing.assert_close(tensors["out"].detach(),
                               tensors["coeffs"].detach() @ tensors["x"].detach())


@pytest.mark.parametrize("argument", ["out", "coeffs", "x"])
def test_the_registered_combine_refuses_arguments_that_require_grad(argument: str) -> None:
    """C++ review: only the Python wrapper refused; torch.ops.mtunlearn.combine_ (what C++
    callers and torch.compile'd code reach) overwrote a leaf that requires grad, or lost x's
    gradient, without a word, where combine_list_ refuses in its C++ entry."""
    tensors = {"out": torch.full((2, 5), float("nan"), dtype=F64),
               "coeffs": _rand(2, 3, seed=7), "x": _rand(3, 5, seed=8)}
    tensors[argument].requires_grad_()
    with pytest.raises(RuntimeError, match=rf"mtunlearn::combine_: writes into `out` in place, "
                                           rf"which autograd does not record, but `{argument}` "
                                           r"requires grad"):
        torch.ops.mtunlearn.combine_(tensors["out"], tensors["coeffs"], tensors["x"], 0.0)
    assert tensors["out"].detach().isnan().all()
    with torch.no_grad():
        torch.ops.mtunlearn.combine_(tensors["out"], tensors["coeffs"], tensors["x"], 0.0)
    torch.testing.assert_close(tensors["out"].detach(),
                               tensors["coeffs"].detach() @ tensors["x"].detach())


@pytest.mark.parametrize("argument,name", [("outs", "outs[1]"), ("coeffs", "coeffs"),
                                           ("xs", "xs[1]"), ("bases", "bases[1]")])
def test_combine_list_refuses_arguments_that_require_grad(argument: str, name: str,
                                                          op_path: str) -> None:
    xs = [_rand(2, 3, seed=9), _rand(2, 4, seed=10)]
    outs = [torch.full((3,), float("nan"), dtype=F64), torch.full((4,), float("nan"), dtype=F64)]
    bases = [_rand(3, seed=11), _rand(4, seed=12)]
    coeffs = _rand(2, seed=13)
    chosen = {"outs": outs, "xs": xs, "bases": bases}.get(argument)
    if chosen is None:
        coeffs.requires_grad_()
    else:
        chosen[1] = chosen[1].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"combine_list: .*`{re.escape(name)}` requires grad"):
        ops.combine_list(coeffs, xs, outs, 1.0, bases=bases)
    assert all(o.isnan().all() for o in outs)  # nothing written
    with torch.no_grad():
        ops.combine_list(coeffs, xs, outs, 1.0, bases=bases)
    for p in range(2):
        torch.testing.assert_close(outs[p].detach(),
                                   bases[p].detach() + coeffs.detach() @ xs[p].detach())


# --- vmap --------------------------------------------------------------------------------------

def _vmap_cases() -> dict[str, tuple[object, tuple[torch.Tensor, ...], tuple[int | None, ...]]]:
    """op name -> (function of one sample's arguments, batched arguments, in_dims)."""
    x = _rand(5, 3, 7, seed=20)                 # 5 samples of [k=3, n=7]
    gm = torch.stack([ref.gram(t) for t in x])  # [5, 3, 3]
    g = _rand(5, 2, 7, seed=21)
    return {
        "gram": (ops.gram, (x.transpose(0, 1),), (1,)),  # batch dim not in front
        "inner": (ops.inner, (g, _rand(3, 7, seed=22)), (0, None)),  # one side unbatched
        "combine": (ops.combine, (_rand(5, 2, 3, seed=23), x), (0, 0)),
        "ridge_solve": (lambda a, b: ops.ridge_solve(a, b, 1e-3), (gm, _rand(5, 3, 2, seed=24)),
                        (0, 0)),
        "nonconflicting_dual": (ops.nonconflicting_dual, (gm, -_rand(2, 3, seed=25).abs()),
                                (0, None)),
        "pcgrad_weights": (lambda a: ops.pcgrad_weights(a, 7), (gm,), (0,)),
        "project_out": (ops.project_out, (g, x), (0, 0)),
        "project_nonconflicting": (lambda a, b: ops.project_nonconflicting(a, b, -1), (g, x),
                                   (0, 0)),
        "pcgrad": (lambda a: ops.pcgrad(a, 3), (x,), (0,)),
    }


def _sample(t: torch.Tensor, dim: int | None, i: int) -> torch.Tensor:
    return t if dim is None else t.select(dim, i)


@pytest.mark.parametrize("name", LEADING_BATCH_OPS)
def test_vmap_gives_each_sample_what_a_loop_gives_in_one_call(name: str) -> None:
    fn, args, in_dims = _vmap_cases()[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtunlearn::{name}",
                                                          "FuncTorchBatched")
    batched = torch.vmap(fn, in_dims=in_dims)(*args)
    looped = torch.stack([fn(*(_sample(a, d, i) for a, d in zip(args, in_dims)))
                          for i in range(5)])
    assert torch.equal(batched, looped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmap_over_long_rows_gives_each_sample_a_loops_bits(dtype: torch.dtype) -> None:
    """Review at scale: the column ranges a batched call summed separately were sized from
    the whole batch's columns, so past 4096 x 1024 columns in all (three samples of 1.5M) a
    sample's sums were flushed at other columns than alone: 20 of 36 Gram entries and 106,216
    of 8.4M projected values differed from the loop's in the last bits."""
    n = 1_500_000
    x = _rand(3, 3, n, seed=40).to(dtype)
    g = _rand(3, 2, n, seed=41).to(dtype)
    for fn, args in ((ops.gram, (x,)), (ops.inner, (g, x)), (ops.project_out, (g, x))):
        batched = torch.vmap(fn)(*args)
        looped = torch.stack([fn(*(a[i] for a in args)) for i in range(3)])
        assert torch.equal(batched, looped), fn


def test_one_row_against_many_is_the_transpose_of_many_against_one() -> None:
    """Review at scale: `inner` of a few rows against more than 65,536 ran the transposed
    problem unblocked, one thread's buffers holding every row (1.1 GiB for a million rows,
    0.8 s against 0.07 s the other way round); it is cut into output blocks as the problem
    given the other way round is, with the same bits."""
    a, b = _rand(3, 192, seed=42), _rand(70_001, 192, seed=43)
    torch.testing.assert_close(ops.inner(a, b).double(), ref.inner(a.double(), b.double()),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(ops.inner(a, b), ops.inner(b, a).T)


def test_vmap_nested_and_under_autograd() -> None:
    x = _rand(2, 4, 3, 9, seed=30)
    assert torch.equal(torch.vmap(torch.vmap(ops.gram))(x), ops.gram(x))
    leaf = x[0].clone().requires_grad_()
    assert torch.autograd.gradcheck(torch.vmap(ops.gram), (leaf,))


def test_vmap_keeps_the_finite_check() -> None:
    """The default check_finite=True read its result with .item(), which vmap refuses; it now
    reads every sample's values at once and names the argument."""
    x = _rand(4, 3, 6, seed=31)
    torch.vmap(ops.gram)(x)  # finite: fine with the default check
    x[2, 1, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"gram: `x` contains NaN or Inf"):
        torch.vmap(ops.gram)(x)
    assert torch.vmap(lambda t: ops.gram(t, check_finite=False))(x)[2].isnan().any()


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("name", LIST_OPS)
def test_vmap_over_the_list_ops_matches_a_loop(name: str, per_tensor: bool) -> None:
    """Their rule: one batched gram/inner per tensor of the list (torch had no fallback for
    list arguments: "Batching rule not implemented ... could not generate a fallback")."""
    batched = [_rand(5, 3, 4, dtype=torch.float32, seed=40), _rand(3, 5, 2, 2, dtype=torch.float32,
                                                                     seed=41)]
    others = [_rand(5, 2, 4, dtype=torch.float32, seed=42), _rand(2, 2, 2, dtype=torch.float32,
                                                                    seed=43)]
    in_dims = (0, 1, 0, None)  # the second stack batched along dim 1, the last one unbatched
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtunlearn::{name}",
                                                          "FuncTorchBatched")

    def one(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return _call(name, [a, b], [c, d], per_tensor)

    got = torch.vmap(one, in_dims=in_dims)(*batched, *others)
    args = (*batched, *others)
    expected = torch.stack([one(*(_sample(t, d, i) for t, d in zip(args, in_dims)))
                            for i in range(5)])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    reference = torch.stack([_reference(name, [_sample(args[0], 0, i), _sample(args[1], 1, i)],
                                        [_sample(args[2], 0, i), args[3]], per_tensor)
                             for i in range(5)])
    torch.testing.assert_close(got.double(), reference.double(), rtol=1e-5, atol=1e-5)


def test_vmap_over_the_in_place_ops_is_refused_by_name(op_path: str) -> None:
    """Their kernels write through raw pointers; torch's message named a data pointer."""
    coeffs, x = _rand(4, 2, 3, seed=50), _rand(4, 3, 5, seed=51)

    def into_out(c: torch.Tensor, t: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        ops.combine(c, t, out=o)
        return o

    def into_list(c: torch.Tensor, t: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        ops.combine_list(c, [t], [o])
        return o

    with pytest.raises(RuntimeError, match=r"ops\.combine: writes in place, which torch\.vmap"):
        torch.vmap(into_out)(coeffs, x, torch.zeros(4, 2, 5, dtype=F64))
    with pytest.raises(RuntimeError, match=r"combine_list: writes in place, which torch\.vmap"):
        torch.vmap(into_list)(coeffs[:, 0], x, torch.zeros(4, 5, dtype=F64))


@pytest.mark.parametrize("case", ["no rows", "no columns", "empty first side"])
def test_list_op_second_derivatives_and_vmap_with_empty_shapes(case: str) -> None:
    """reshape(..., -1) of an empty tensor has no size to infer: create_graph backward and
    vmap of the list ops failed on k = 0, n = 0 and an empty side."""
    rows, cols = {"no rows": (0, 3), "no columns": (2, 0), "empty first side": (2, 3)}[case]
    m = 0 if case == "empty first side" else rows
    xs = [_rand(m, cols, seed=60).requires_grad_()]
    ys = [_rand(rows, cols, seed=61).requires_grad_()]
    for out in (ops.gram_list(ys), ops.gram_list_stacked(xs, ys)):
        grads = torch.autograd.grad(out.sum(), [*xs, *ys] if out.shape[-1] != rows else ys,
                                    create_graph=True, allow_unused=True)
        assert all(g is None or g.shape in ((m, cols), (rows, cols)) for g in grads)
    batch = _rand(3, rows, cols, seed=62)
    assert torch.vmap(lambda t: ops.gram_list([t]))(batch).shape == (3, rows, rows)
    assert torch.vmap(lambda t: ops.gram_list_stacked([t[:m]], [t]))(batch).shape == (
        3, m + rows, m + rows)


def test_list_op_backward_computes_only_the_gradients_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """needs_input_grad of a list input is a list of bools, always truthy when non-empty: the
    side that needs no gradient was computed anyway."""
    from mtunlearn_ext.ops import _registration

    calls: list[int] = []
    real = _registration.products

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_registration, "products", counted)
    a = _stacks(2, seed=63)
    b = [t.requires_grad_() for t in _stacks(3, seed=64)]
    ops.inner_list(a, b).sum().backward()
    assert len(calls) == 1 and all(t.grad is not None for t in b)
    calls.clear()
    ys = [t.detach().requires_grad_() for t in b]
    ops.gram_list_stacked(a, ys).sum().backward()
    assert len(calls) == 2
