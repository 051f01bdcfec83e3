"""The ops under forward-mode AD (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``).

Drop-in review: the custom ops' reverse-mode formulas apply to inputs that require grad only,
so a tangent went into the kernels unseen and every op (and aggregator) returned a zero
derivative, silently. The bilinear ops now give their exact tangents, checked here against
float64 plain-torch references; the ops without a derivative and the in-place writes refuse,
naming the op."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.autograd import forward_ad

from mtunlearn_ext import ops, surgery
from mtunlearn_ext.ops._registration import NOT_DIFFERENTIABLE

F64 = torch.float64

pytestmark = [pytest.mark.usefixtures("poisoned_outputs"),
              # torch's forward-mode transforms script a helper (a FutureWarning or, torch 2.13, a
              # DeprecationWarning per call)
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]


def _rand(*shape: int, dtype: torch.dtype = F64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def _flat(stacks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.flatten(1) for s in stacks], dim=1)


def _stacks(rows: int, seed: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    return [_rand(rows, *shape, dtype=dtype, seed=seed + p)
            for p, shape in enumerate([(4, 5), (7,), (1,), (2, 3)])]


def _per_layer(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x.flatten(1) @ y.flatten(1).T for x, y in zip(a, b)])


def _list_reference(name: str, per_tensor: bool, a: list[torch.Tensor],
                    b: list[torch.Tensor]) -> torch.Tensor:
    """The list op in plain float64 torch: ``a``, ``b`` are the two lists of ``inner_list`` (for
    ``gram_list`` the same list twice; for ``gram_list_stacked`` its xs and ys)."""
    if name == "gram_list_stacked":
        a = b = [torch.cat([x, y]) for x, y in zip(a, b)]
    if per_tensor:
        return _per_layer(a, b)
    return _flat(a) @ _flat(b).T


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_jvp_of_the_single_tensor_ops_matches_their_product_rule(dtype: torch.dtype) -> None:
    x, dx = _rand(2, 3, 9, dtype=dtype, seed=1), _rand(2, 3, 9, dtype=dtype, seed=2)
    y, dy = _rand(2, 4, 9, dtype=dtype, seed=3), _rand(2, 4, 9, dtype=dtype, seed=4)
    c, dc = _rand(2, 5, 3, dtype=dtype, seed=5), _rand(2, 5, 3, dtype=dtype, seed=6)
    d = [t.double() for t in (x, dx, y, dy, c, dc)]
    tolerance = {"rtol": 0, "atol": 1e-12 if dtype == F64 else 1e-4}
    cases: list[tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...],
                      tuple[torch.Tensor, ...], torch.Tensor]] = [
        (ops.gram, (x,), (dx,), d[1] @ d[0].mT + d[0] @ d[1].mT),
        (ops.inner, (x, y), (dx, dy), d[1] @ d[2].mT + d[0] @ d[3].mT),
        (ops.combine, (c, x), (dc, dx), d[5] @ d[0] + d[4] @ d[1]),
        # A tangent on one argument only: the other is a constant.
        (lambda a: ops.inner(a, y), (x,), (dx,), d[1] @ d[2].mT),
        (lambda w: ops.combine(w, x), (c,), (dc,), d[5] @ d[0]),
    ]
    for call, primals, tangents, expected in cases:
        value, tangent = torch.func.jvp(call, primals, tangents)
        assert torch.equal(value, call(*primals))
        assert tangent.dtype == value.dtype
        torch.testing.assert_close(tangent.double(), expected, **tolerance)
        with forward_ad.dual_level():
            dual = call(*(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)))
            torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent.double(), expected,
                                       **tolerance)


def test_jacfwd_of_the_single_tensor_ops_is_plain_torchs() -> None:
    x, y, c = _rand(3, 5, seed=7), _rand(4, 5, seed=8), _rand(2, 3, seed=9)
    for ours, theirs, args in [(ops.gram, lambda a: a @ a.T, (x,)),
                               (ops.inner, lambda a, b: a @ b.T, (x, y)),
                               (ops.combine, lambda w, a: w @ a, (c, x))]:
        for argnum in range(len(args)):
            torch.testing.assert_close(torch.func.jacfwd(ours, argnums=argnum)(*args),
                                       torch.func.jacfwd(theirs, argnums=argnum)(*args),
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["gram_list", "inner_list", "gram_list_stacked"])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_jvp_of_the_list_ops_matches_float64(name: str, per_tensor: bool) -> None:
    a, da = _stacks(3, seed=10), _stacks(3, seed=20)
    b, db = _stacks(2 if name == "gram_list_stacked" else 4, seed=30), _stacks(
        2 if name == "gram_list_stacked" else 4, seed=40)
    n = len(a)

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        first, second = list(tensors[:n]), list(tensors[n:])
        if name == "gram_list":
            return ops.gram_list(first, per_tensor)
        return getattr(ops, name)(first, second, per_tensor)

    def reference(first: list[torch.Tensor], second: list[torch.Tensor]) -> torch.Tensor:
        if name == "gram_list":
            return _list_reference(name, per_tensor, first, first)
        return _list_reference(name, per_tensor, first, second)

    primals = (*a, *(a if name == "gram_list" else b))
    # Every tensor with a tangent; then the first tensor of the first list only (the others
    # are constants: their tangents are zero).
    for tangents in [(*da, *(da if name == "gram_list" else db)),
                     (da[0], *(torch.zeros_like(t) for t in primals[1:]))]:
        value, tangent = torch.func.jvp(call, primals, tangents)
        expected = torch.func.jvp(lambda *t: reference(list(t[:n]), list(t[n:])), primals,
                                  tangents)[1]
        torch.testing.assert_close(value, reference(list(primals[:n]), list(primals[n:])),
                                   rtol=0, atol=1e-12)
        torch.testing.assert_close(tangent, expected, rtol=0, atol=1e-12)
    one = [da[0], *(torch.zeros_like(t) for t in primals[1:])]
    expected = torch.func.jvp(lambda *t: reference(list(t[:n]), list(t[n:])), primals,
                              tuple(one))[1]
    with forward_ad.dual_level():  # a tangent on one tensor of the list, none on the rest
        dual = call(forward_ad.make_dual(primals[0], da[0]), *primals[1:])
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, expected, rtol=0,
                                   atol=1e-12)


def _not_differentiable(name: str) -> Callable[[torch.Tensor], object]:
    basis = _rand(2, 6, seed=50)
    calls: dict[str, Callable[[torch.Tensor], object]] = {
        "ridge_solve": lambda x: ops.ridge_solve(ops.gram(x), ops.inner(x, basis)),
        "nonconflicting_dual": lambda x: ops.nonconflicting_dual(ops.gram(x), ops.inner(basis, x)),
        "pcgrad_weights": lambda x: ops.pcgrad_weights(ops.gram(x), 1),
        "project_out": lambda x: ops.project_out(x, basis),
        "project_nonconflicting": lambda x: ops.project_nonconflicting(basis, x),
        "pcgrad": lambda x: ops.pcgrad(x, 2),
    }
    return calls[name]


@pytest.mark.parametrize("name", NOT_DIFFERENTIABLE)
def test_an_op_without_a_derivative_refuses_a_tangent_by_name(name: str) -> None:
    x, dx = _rand(4, 6, seed=51), _rand(4, 6, seed=52)
    call = _not_differentiable(name)
    with pytest.raises(RuntimeError, match=rf"ops\.{name} is not differentiable: forward-mode"):
        torch.func.jvp(call, (x,), (dx,))
    with pytest.raises(RuntimeError, match=rf"ops\.{name} is not differentiable: forward-mode"):
        torch.func.jacfwd(call)(x)
    # Inside a forward-mode level, inputs without a tangent are constants as ever.
    with forward_ad.dual_level():
        forward_ad.make_dual(x, dx)
        result = call(x)
        first = result[0] if isinstance(result, tuple) else result
        assert forward_ad.unpack_dual(first).tangent is None


def test_in_place_writes_refuse_a_tangent_naming_the_argument() -> None:
    coeffs, x = _rand(2, 3, seed=60), _rand(3, 7, seed=61)
    with pytest.raises(RuntimeError, match=r"ops\.combine: writes into its outputs in place, "
                                           r"which forward-mode AD does not follow, but `x`"):
        torch.func.jvp(lambda t: ops.combine(coeffs, t, out=torch.zeros(2, 7, dtype=F64)), (x,),
                       (x,))
    outs = [torch.zeros(7, dtype=F64)]
    with pytest.raises(RuntimeError, match=r"ops\.combine_list: writes into its outputs in "
                                           r"place, which forward-mode AD does not follow, "
                                           r"but `coeffs`"):
        torch.func.jvp(lambda w: ops.combine_list(w, [x], outs), (coeffs[0],), (coeffs[0],))


@pytest.mark.parametrize("make", [surgery.UPGrad, surgery.MGDA, surgery.Mean,
                                  lambda: surgery.PCGrad(reshuffle=False)])
def test_aggregator_jvp_is_its_reverse_mode_jacobian_times_the_tangent(
        make: Callable[[], torch.nn.Module]) -> None:
    """The weights are constants in reverse mode (documented); forward mode agrees: the
    tangent of the aggregate is the weights times the matrix's tangent. Before, zero."""
    matrix, tangent = _rand(3, 6, seed=70), _rand(3, 6, seed=71)
    aggregator = make()
    jacobian = torch.autograd.functional.jacobian(aggregator, matrix)
    _, jvp = torch.func.jvp(aggregator, (matrix,), (tangent,))
    expected = torch.einsum("oij,ij->o", jacobian, tangent)
    assert float(expected.abs().max()) > 0.1
    torch.testing.assert_close(jvp, expected, rtol=0, atol=1e-12)


def test_reverse_mode_function_transforms_give_autograds_derivatives() -> None:
    """Drop-in review: torch.func.grad / jacrev over the ops failed with torch's "In order to
    use an autograd.Function with functorch transforms ... must override the setup_context
    staticmethod", then with the ops' own refusal; they now give torch.autograd's derivatives
    (tests/test_ops_func_transforms.py checks every op and transform), an aggregator's too."""
    x = _rand(3, 5, seed=80)
    for call in [lambda t: ops.gram(t).sum(), lambda t: ops.gram_list([t, t]).sum(),
                 lambda t: surgery.UPGrad()(t).sum()]:
        leaf = x.clone().requires_grad_()
        (expected,) = torch.autograd.grad(call(leaf), leaf)
        assert float(expected.abs().max()) > 0.1
        torch.testing.assert_close(torch.func.grad(call)(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.func.jacrev(call)(x), expected, rtol=0, atol=1e-12)
    # Forward mode gives the same Jacobian.
    torch.testing.assert_close(torch.func.jacfwd(ops.gram)(x),
                               torch.autograd.functional.jacobian(ops.gram, x), rtol=0,
                               atol=1e-12)
