"""The ops under ``torch.func``'s reverse-mode transforms: ``grad``, ``jacrev`` (with
``chunk_size`` too), ``vjp``, second order (``grad(grad(f))``, ``hessian``, which is ``jacfwd``
over ``jacrev``), ``vmap(grad(f))`` and ``gradgradcheck``'s forward-over-reverse check.

Drop-in review: torch refuses custom ops with a ``register_autograd`` formula under these
transforms, and the ops refused them by name; ``gradgradcheck(check_fwd_over_rev=True)``
raised NotImplementedError. Each derivative is checked here against ``torch.autograd`` through
the same ops and against float64 plain-torch references; the ops without a derivative still
refuse, naming the op."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.func import grad, hessian, jacrev, vjp, vmap

from mtunlearn_ext import ops
from mtunlearn_ext.ops import _func_transforms
from mtunlearn_ext.ops import _reference as ref
from mtunlearn_ext.ops._registration import NOT_DIFFERENTIABLE

F64 = torch.float64

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"),
              # torch's forward-mode transforms script a helper (a FutureWarning or, torch 2.13, a
              # DeprecationWarning per call)
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]


def _rand(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


@dataclass(frozen=True)
class Case:
    """One op as a function of flat tensors (a list op's lists cut from them)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    op: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]


def _halves(ts: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    half = len(ts) // 2
    return list(ts[:half]), list(ts[half:])


def _list_case(name: str, per_tensor: bool, rows: tuple[int, int]) -> Case:
    shapes = ((4,), (2, 3), (1,))
    public, reference = getattr(ops, name), getattr(ref, name)
    if name == "gram_list":
        return Case(f"{name}-{per_tensor}", tuple((rows[0], *s) for s in shapes),
                    lambda *ts: public(list(ts), per_tensor),
                    lambda *ts: reference(list(ts), per_tensor))
    return Case(f"{name}-{per_tensor}",
                tuple((rows[0], *s) for s in shapes) + tuple((rows[1], *s) for s in shapes),
                lambda *ts: public(*_halves(ts), per_tensor),
                lambda *ts: reference(*_halves(ts), per_tensor))


CASES = [
    Case("gram", ((3, 5),), ops.gram, ref.gram),
    Case("gram-batched", ((2, 3, 4),), ops.gram, ref.gram),
    Case("inner", ((2, 5), (3, 5)), ops.inner, ref.inner),
    Case("combine", ((2, 3), (3, 5)), ops.combine, ref.combine),
    *(_list_case(name, per_tensor, (2, 3))
      for name in ("gram_list", "inner_list", "gram_list_stacked")
      for per_tensor in (False, True)),
]
IDS = [case.name for case in CASES]


def _inputs(case: Case, dtype: torch.dtype = F64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return tuple(_rand(*shape, dtype=dtype, seed=seed + i) for i, shape in enumerate(case.shapes))


def _loss(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A scalar with a non-zero second derivative in every input."""
    def loss(*ts: torch.Tensor) -> torch.Tensor:
        out = op(*ts)
        return (out * out).sum() + out.sum()

    return loss


def _argnums(case: Case) -> tuple[int, ...]:
    return tuple(range(len(case.shapes)))


def _autograd_grads(f: Callable[..., torch.Tensor], ts: tuple[torch.Tensor, ...],
                    create_graph: bool = False) -> tuple[torch.Tensor, ...]:
    leaves = tuple(t if t.requires_grad else t.detach().requires_grad_() for t in ts)
    return torch.autograd.grad(f(*leaves), leaves, create_graph=create_graph)


def _close(actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...],
           tol: float = 1e-10) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_matches_autograd_and_the_float64_reference(case: Case) -> None:
    ts = _inputs(case)
    got = grad(_loss(case.op), argnums=_argnums(case))(*ts)
    _close(got, _autograd_grads(_loss(case.op), ts))
    _close(got, _autograd_grads(_loss(case.reference), ts))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jacrev_matches_the_reference_jacobian(case: Case, chunk_size: int | None) -> None:
    ts = _inputs(case, seed=10)
    got = jacrev(case.op, argnums=_argnums(case), chunk_size=chunk_size)(*ts)
    expected = torch.autograd.functional.jacobian(case.reference, ts)
    _close(got, expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vjp_matches_autograd_through_the_same_op(case: Case) -> None:
    ts = _inputs(case, seed=20)
    out, vjp_fn = vjp(case.op, *ts)
    cotangent = _rand(*out.shape, dtype=out.dtype, seed=99)
    leaves = tuple(t.detach().requires_grad_() for t in ts)
    expected = torch.autograd.grad(case.op(*leaves), leaves, cotangent)
    torch.testing.assert_close(out, case.op(*ts), rtol=0, atol=0)
    _close(vjp_fn(cotangent), expected)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_of_grad_matches_autograd_second_order(case: Case) -> None:
    ts = _inputs(case, seed=30)
    loss, argnums = _loss(case.op), _argnums(case)

    def first_grads_summed(*xs: torch.Tensor) -> torch.Tensor:
        return sum(g.sum() for g in grad(loss, argnums=argnums)(*xs))  # type: ignore[return-value]

    def first_grads_summed_autograd(*xs: torch.Tensor) -> torch.Tensor:
        return sum(g.sum() for g in _autograd_grads(_loss(case.reference), xs, True)
                   )  # type: ignore[return-value]

    got = grad(first_grads_summed, argnums=argnums)(*ts)
    _close(got, _autograd_grads(first_grads_summed_autograd, ts))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_hessian_matches_the_reference_hessian(case: Case) -> None:
    ts = _inputs(case, seed=40)
    got = hessian(_loss(case.op), argnums=_argnums(case))(*ts)
    expected = torch.autograd.functional.hessian(_loss(case.reference), ts)
    for got_row, expected_row in zip(got, expected):
        _close(got_row, expected_row)
    assert any(float(h.abs().max()) > 0.1 for row in got for h in row)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_of_grad_gives_each_sample_its_gradient(case: Case) -> None:
    per_sample = [_inputs(case, seed=50 + 7 * s) for s in range(3)]
    samples = tuple(torch.stack(column) for column in zip(*per_sample))
    got = vmap(grad(_loss(case.op), argnums=_argnums(case)))(*samples)
    expected = [_autograd_grads(_loss(case.op), tuple(t[s] for t in samples)) for s in range(3)]
    _close(got, tuple(torch.stack(column) for column in zip(*expected)))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradgradcheck_with_forward_over_reverse(case: Case) -> None:
    ts = tuple(t.requires_grad_() for t in _inputs(case, seed=60))
    assert torch.autograd.gradgradcheck(case.op, ts, check_fwd_over_rev=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_in_each_precision_matches_float64(case: Case, dtype: torch.dtype) -> None:
    ts = _inputs(case, dtype=dtype, seed=70)
    got = grad(_loss(case.op), argnums=_argnums(case))(*ts)
    expected = _autograd_grads(_loss(case.reference), tuple(t.to(F64) for t in ts))
    tol = 1e-10 if dtype == F64 else 1e-4
    _close(got, tuple(e.to(dtype) for e in expected), tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_in_half_precision_runs_and_follows_float32(case: Case, dtype: torch.dtype) -> None:
    ts = tuple(t / 2 for t in _inputs(case, dtype=torch.float32, seed=80))
    low = tuple(t.to(dtype) for t in ts)
    got = grad(lambda *xs: case.op(*xs).sum(), argnums=_argnums(case))(*low)
    expected = grad(lambda *xs: case.op(*xs).sum(), argnums=_argnums(case))(
        *(t.float() for t in low))
    assert all(g.dtype == dtype for g in got)
    _close(tuple(g.float() for g in got), expected, 0.1)


def test_non_contiguous_inputs_and_odd_shapes() -> None:
    x = _rand(7, 3, seed=90).t()  # [3, 7], transposed storage
    w = _rand(11, 5, seed=91)[::2]  # [6, 5], every other row
    stacks = [_rand(5, 3, seed=92).t()[:, ::2], _rand(3, 1, 1, seed=93)]  # [3, 3] strided
    assert not x.is_contiguous() and not w.is_contiguous() and not stacks[0].is_contiguous()
    for op, reference, args in [
            (ops.gram, ref.gram, (x,)),
            (ops.inner, ref.inner, (x, _rand(1, 7, seed=94))),
            (ops.combine, ref.combine, (_rand(2, 6, seed=95), w)),
            (lambda *ts: ops.gram_list(list(ts)), lambda *ts: ref.gram_list(list(ts)),
             tuple(stacks))]:
        argnums = tuple(range(len(args)))
        got = grad(_loss(op), argnums=argnums)(*args)
        _close(got, _autograd_grads(_loss(reference), args))


def test_empty_rows() -> None:
    """A side with no rows: its gradient is empty, the other side's is that of the rest."""
    xs, ys = [_rand(2, 4, seed=100), _rand(2, 3, seed=101)], [_rand(0, 4), _rand(0, 3)]
    got = grad(lambda a, b: _loss(ops.gram_list_stacked)(a, b), argnums=(0, 1))(xs, ys)
    expected = _autograd_grads(lambda *ts: _loss(ref.gram_list_stacked)(*_halves(ts)),
                               (*xs, *ys))
    _close(tuple(got[0]) + tuple(got[1]), expected)
    a, b = _rand(0, 5), _rand(3, 5, seed=102)
    got_inner = grad(_loss(ops.inner), argnums=(0, 1))(a, b)
    assert got_inner[0].shape == (0, 5)
    torch.testing.assert_close(got_inner[1], torch.zeros_like(b), rtol=0, atol=0)


@pytest.mark.parametrize("name", NOT_DIFFERENTIABLE)
def test_ops_without_a_derivative_are_still_refused_naming_the_op(name: str) -> None:
    x = _rand(3, 5, seed=110)
    calls = {
        "ridge_solve": lambda t: ops.ridge_solve(ops.gram(t), t[:, :2].contiguous()),
        "nonconflicting_dual": lambda t: ops.nonconflicting_dual(ops.gram(t), ops.gram(t)[:1]),
        "pcgrad_weights": lambda t: ops.pcgrad_weights(ops.gram(t)),
        "project_out": lambda t: ops.project_out(t[:1], t[1:])[0],
        "project_nonconflicting": lambda t: ops.project_nonconflicting(t[:1], t[1:])[0],
        "pcgrad": lambda t: ops.pcgrad(t)[0],
    }
    for transform in (grad, jacrev):
        with pytest.raises(RuntimeError, match=rf"^mtunlearn_ext\.ops\.{name} is not "
                                               r"differentiable: torch\.func\.grad"):
            transform(lambda t: calls[name](t).sum())(x)


def test_the_in_place_combine_is_still_refused_naming_the_op() -> None:
    coeffs, x = _rand(2, 3, seed=120), _rand(3, 5, seed=121)

    def in_place(c: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(2, 5, dtype=F64)
        return ops.combine(c, x, out=out).sum()

    with pytest.raises(RuntimeError, match=r"^mtunlearn_ext\.ops\.combine: writes"):
        grad(in_place)(coeffs)


def test_outside_the_transforms_the_ops_take_their_registered_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The autograd.Function is for the transforms only: a plain call, backward and double
    backward never reach it, and give the raw compiled op's bits."""
    def refuse(*args: object) -> None:
        raise AssertionError("the plain path reached the torch.func autograd.Function")

    monkeypatch.setattr(_func_transforms._Differentiable, "apply", refuse)
    x = _rand(4, 9, seed=130).requires_grad_()
    result = ops.gram(x)
    torch.testing.assert_close(result, torch.ops.mtunlearn.gram(x.detach()), rtol=0, atol=0)
    (first,) = torch.autograd.grad((result ** 2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    _close((first, second), _autograd_grads(lambda t: (ref.gram(t) ** 2).sum(), (x,), True)
           + _autograd_grads(lambda t: _autograd_grads(lambda u: (ref.gram(u) ** 2).sum(),
                                                       (t,), True)[0].sum(), (x,)))
    xs = [_rand(3, 4, dtype=torch.float32, seed=131), _rand(3, 2, 2, dtype=torch.float32)]
    torch.testing.assert_close(ops.gram_list(xs), torch.ops.mtunlearn.gram_list(xs),
                               rtol=0, atol=0)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_grad_over_a_long_list_matches_autograd(per_tensor: bool) -> None:
    """The list ops' input gradients are taken for the whole list at once (one combine_list_
    launch below the transforms): every tensor gets its own."""
    xs = [_rand(4, 1 + p % 5, 2, seed=140 + p) for p in range(40)]

    def loss(ts: list[torch.Tensor]) -> torch.Tensor:
        return (ops.gram_list(ts, per_tensor) ** 2).sum()

    got = grad(loss)(xs)
    _close(tuple(got), _autograd_grads(lambda *ts: loss(list(ts)), tuple(xs)))
    got_vmapped = vmap(grad(loss))([torch.stack([x, 2 * x]) for x in xs])
    _close(tuple(g[1] for g in got_vmapped), tuple(2 ** 3 * g for g in got))


@pytest.mark.parametrize("name", ["UPGrad", "MGDA", "Mean"])
def test_aggregators_under_vmap_of_grad_match_a_loop_of_autograd(name: str) -> None:
    """docs/dropin.md: the aggregators work under the per-sample gradient recipe, their
    weights constants as in reverse mode."""
    from mtunlearn_ext import surgery

    aggregator = getattr(surgery, name)()

    def loss(matrix: torch.Tensor) -> torch.Tensor:
        return (aggregator(matrix) ** 2).sum()

    batch = _rand(4, 3, 6, seed=150)
    got = vmap(grad(loss))(batch)
    expected = torch.stack([_autograd_grads(loss, (m,))[0] for m in batch])
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
