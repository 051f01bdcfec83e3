"""Reverse-mode ``torch.func`` transforms over the ops: ``grad``, ``jacrev``, ``vjp``, and so
``hessian`` (``jacfwd`` over ``jacrev``) and ``vmap(grad(f))``; and forward mode, alone or over
a reverse-mode derivative.

torch applies a ``register_autograd`` formula through a generated ``autograd.Function``
without a separate ``setup_context``, which ``torch.func``'s reverse-mode transforms refuse
("must override the setup_context staticmethod"), and whose record keeps no forward-mode
tangent for the derivative. While such a transform is active, or an input both carries a
tangent and requires grad (forward-over-reverse), the public wrappers call the ops with a
derivative through :class:`_Differentiable` instead, an ``autograd.Function`` that
``torch.func`` takes: its forward calls the compiled op (vmap's levels reach the ops' batch
rules); its backward and its tangent rule (``jvp``) are made of the ops again, called through
:func:`call_differentiable`, so that every order is differentiable (``grad(grad(f))``,
``jacfwd(jacrev(f))``) and the compiled kernels do the work at every level.

The ops without a derivative keep torch's path, where the caller refuses them by name.
Outside these transforms the ops are called as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._C._functorch import TransformType

from mtunlearn_ext.ops._forward_mode import _filled, _sum, _symmetrized, forward_mode_open
from mtunlearn_ext.ops._reference import acc_dtype

#: The ops with a derivative, by schema name.
DIFFERENTIABLE = ("gram", "inner", "combine", "gram_list", "inner_list", "gram_list_stacked")

#: ``[C_p @ xs[p]]`` for a list, a list op's input gradient: not an op of its own, but one
#: differentiable step of their derivatives (see :func:`products`).
_PRODUCTS = "products"


@dataclass(frozen=True)
class _Layout:
    """Where each argument of an op lies in the flat tensors ``Function.apply`` takes (it
    tracks only tensors passed directly, not lists of them): ``("tensor", None)``, ``("list",
    n)`` or ``("constant", value)``. A class, not a tuple: torch.func's vmap reads a tuple
    argument as a tree of leaves to batch."""

    places: tuple[tuple[str, Any], ...]


def reverse_transform_active() -> bool:
    """Whether a ``torch.func`` reverse-mode transform (grad, jacrev, vjp) is active: only then
    would torch refuse the ops' formulas. A C call when no transform is active at all."""
    if not torch._C._are_functorch_transforms_active():
        return False
    return any(level.key() == TransformType.Grad
               for level in retrieve_all_functorch_interpreters())


def _flatten(args: Sequence[Any]) -> tuple[_Layout, list[torch.Tensor]]:
    layout: list[tuple[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            layout.append(("tensor", None))
            tensors.append(arg)
        elif isinstance(arg, (list, tuple)):
            layout.append(("list", len(arg)))
            tensors.extend(arg)
        else:
            layout.append(("constant", arg))
    return _Layout(tuple(layout)), tensors


def _unflatten(layout: _Layout, tensors: Sequence[Any]) -> list[Any]:
    args: list[Any] = []
    at = 0
    for kind, value in layout.places:
        if kind == "tensor":
            args.append(tensors[at])
            at += 1
        elif kind == "list":
            args.append(list(tensors[at:at + value]))
            at += value
        else:
            args.append(value)
    return args


def call_differentiable(name: str, *args: Any) -> torch.Tensor:
    """``torch.ops.mtunlearn.<name>(*args)``, through :class:`_Differentiable` where torch's
    own path would lose a derivative: under a reverse-mode transform, and while forward mode is
    open (a derivative's own tangent: ``jacfwd(jacrev(f))``, a ``vjp`` function called under
    ``jvp``, ``gradgradcheck``'s forward-over-reverse check), where the ops' registered formulas
    would drop the tangent. The derivatives' rules call the ops through here."""
    if forward_mode_open() or reverse_transform_active():
        layout, tensors = _flatten(args)
        return _Differentiable.apply(name, layout, *tensors)
    return getattr(torch.ops.mtunlearn, name)(*args)


def _combine(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``coeffs @ x`` in ``x``'s dtype: the kernels take the coefficients in the accumulation
    dtype, contiguous."""
    return call_differentiable("combine", coeffs.to(acc_dtype(x.dtype)).contiguous(), x)


def products(coeffs: torch.Tensor, xs: list[torch.Tensor], per_tensor: bool
             ) -> list[torch.Tensor]:
    """``[C_p @ xs[p]]`` (``C_p = coeffs[p]`` per tensor, else ``coeffs``), each shaped like
    ``xs[p]`` with ``coeffs``' row count in front: the gradient of a list op's input (the
    registered backward formulas' and :class:`_Differentiable`'s). Under a reverse-mode
    transform or while forward mode is open, one differentiable step for the whole list (one
    per tensor cost ~0.4 ms each under the transforms: 75 ms for the backward of a 160-tensor
    ``gram_list``); else :func:`_products_now`."""
    if forward_mode_open() or reverse_transform_active():
        layout, tensors = _flatten((coeffs, xs, per_tensor))
        return list(_Differentiable.apply(_PRODUCTS, layout, *tensors))
    return _products_now(coeffs, xs, per_tensor, batched=_batched(coeffs))


def _batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap batch: torch.func's, or the legacy one that batched gradients
    (``is_grads_batched``) use."""
    functorch = torch._C._functorch
    return bool(functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t))


def _products_now(coeffs: torch.Tensor, xs: list[torch.Tensor], per_tensor: bool,
                  batched: bool) -> list[torch.Tensor]:
    """:func:`products` by the compiled ops. With grad mode on (``create_graph``: the gradient
    has a gradient) or on a vmap batch (``batched``: ``autograd.grad(...,
    is_grads_batched=True)``, ``jacobian(..., vectorize=True)``, a generated vmap rule), one
    differentiable ``combine`` per tensor: ``combine_list_`` writes in place and has no
    batching rule. Otherwise one ``combine_list_`` launch."""
    rows = coeffs.shape[-2]
    if torch.is_grad_enabled() or batched:
        return [torch.ops.mtunlearn.combine(
                    (coeffs[p] if per_tensor else coeffs).to(acc_dtype(x.dtype)).contiguous(),
                    x.reshape(x.shape[0], math.prod(x.shape[1:]))).reshape(rows, *x.shape[1:])
                for p, x in enumerate(xs)]
    outs = [x.new_empty((rows, *x.shape[1:])) for x in xs]
    if xs:
        torch.ops.mtunlearn.combine_list_(
            outs, coeffs.to(acc_dtype(xs[0].dtype)).contiguous(), xs, 0.0, per_tensor)
    return outs


def _products_backward(coeffs: torch.Tensor, xs: list[torch.Tensor], per_tensor: bool,
                       grads: Sequence[torch.Tensor], needed: Sequence[bool]) -> list[Any]:
    """``out_p = C_p x_p``: ``dC = sum_p g_p x_p^T`` (per tensor: each term), ``dx_p =
    C_p^T g_p``."""
    grads = [g.to(x.dtype) for g, x in zip(grads, xs)]
    return [call_differentiable("inner_list", grads, xs, per_tensor).to(coeffs.dtype)
            if needed[0] else None,
            products(coeffs.transpose(-1, -2), grads, per_tensor) if needed[1] else None]


def _products_tangent(primals: list[Any], tangents: list[Any]) -> tuple[torch.Tensor, ...]:
    coeffs, xs, per_tensor = primals
    terms = []
    if tangents[0] is not None:
        terms.append(products(tangents[0], xs, per_tensor))
    if any(t is not None for t in tangents[1]):
        terms.append(products(coeffs, _filled(tangents[1], xs), per_tensor))
    return tuple(terms[0] if len(terms) == 1 else _added(terms[0], terms[1]))


def _added(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x + y for x, y in zip(a, b)]


def _backward(name: str, args: list[Any], grad: torch.Tensor, needed: Sequence[bool]
              ) -> list[Any]:
    """The gradients of ``name``'s arguments (a list's per tensor; None where not needed)."""
    if name == "gram":
        (x,) = args
        return [_combine(_symmetrized(grad), x)]
    if name == "inner":
        a, b = args
        return [_combine(grad, b) if needed[0] else None,
                _combine(grad.transpose(-1, -2), a) if needed[1] else None]
    if name == "combine":
        coeffs, x = args
        grad = grad.to(x.dtype)
        return [call_differentiable("inner", grad, x).to(coeffs.dtype) if needed[0] else None,
                _combine(coeffs.transpose(-1, -2), grad) if needed[1] else None]
    per_tensor = not isinstance(args[-1], list) and bool(args[-1])
    if name == "gram_list":
        return [products(_symmetrized(grad), args[0], per_tensor)]
    first, second = args[0], args[1]
    if name == "inner_list":
        return [products(grad, second, per_tensor) if needed[0] else None,
                products(grad.transpose(-1, -2), first, per_tensor) if needed[1] else None]
    # gram_list_stacked: row i of [X; Y] gets sum_j sym[i, j] [X; Y]_j.
    m = first[0].shape[0]
    sym = _symmetrized(grad)
    return [_added(products(sym[..., :m, :m], first, per_tensor),
                   products(sym[..., :m, m:], second, per_tensor)) if needed[0] else None,
            _added(products(sym[..., m:, :m], first, per_tensor),
                   products(sym[..., m:, m:], second, per_tensor)) if needed[1] else None]


def _tangent(name: str, primals: list[Any], tangents: list[Any]) -> torch.Tensor:
    """The output's tangent (bilinear ops: one term per argument with a tangent)."""
    op = call_differentiable
    if name == "gram":
        return _symmetrized(op("inner", tangents[0], primals[0]))
    if name in ("inner", "combine"):
        return _sum([None if tangents[0] is None else op(name, tangents[0], primals[1]),
                     None if tangents[1] is None else op(name, primals[0], tangents[1])])
    rest = primals[1:] if name == "gram_list" else primals[2:]
    if name == "gram_list":
        xs = primals[0]
        return _symmetrized(op("inner_list", _filled(tangents[0], xs), xs, *rest))
    first, second = primals[0], primals[1]
    if name == "inner_list":
        return _sum([None if all(t is None for t in tangents[0])
                     else op(name, _filled(tangents[0], first), second, *rest),
                     None if all(t is None for t in tangents[1])
                     else op(name, first, _filled(tangents[1], second), *rest)])
    stacks = [torch.cat([x, y]) for x, y in zip(first, second)]
    moved = [torch.cat([dx, dy]) for dx, dy in zip(_filled(tangents[0], first),
                                                     _filled(tangents[1], second))]
    return _symmetrized(op("inner_list", moved, stacks, *rest))


class _Differentiable(torch.autograd.Function):
    """One op with a derivative, in the form ``torch.func`` takes: ``apply(name, layout,
    *tensors)``, ``layout`` rebuilding the op's arguments from the flat tensors."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name: str, layout: _Layout, *tensors: torch.Tensor) -> Any:
        # Every torch.func level below was peeled off by torch before this call, but for the
        # vmap levels of a generated vmap rule, which the ops' batch rules take.
        args = _unflatten(layout, tensors)
        if name == _PRODUCTS:
            coeffs, xs, per_tensor = args
            # A generated vmap rule may batch any of them (xs, not coeffs, under vmap(grad)).
            batched = any(_batched(t) for t in (coeffs, *xs))
            with torch.no_grad():  # this Function records it
                return tuple(_products_now(coeffs, xs, per_tensor, batched))
        return getattr(torch.ops.mtunlearn, name)(*args)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        name, layout, *tensors = inputs
        ctx.name, ctx.layout = name, layout
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx: Any, *output_grads: torch.Tensor) -> tuple[Any, ...]:
        args = _unflatten(ctx.layout, ctx.saved_tensors)
        needed = _unflatten(ctx.layout, ctx.needs_input_grad[2:])
        needed = [any(n) if isinstance(n, list) else bool(n) for n in needed]
        if ctx.name == _PRODUCTS:
            coeffs, xs, per_tensor = args
            grads = _products_backward(coeffs, xs, per_tensor, output_grads, needed)
        else:
            grads = _backward(ctx.name, args, output_grads[0], needed)
        flat: list[Any] = []
        places = ctx.layout.places
        for (kind, value), g in zip(places, grads + [None] * (len(places) - len(grads))):
            if kind == "tensor":
                flat.append(g)
            elif kind == "list":
                flat.extend([None] * value if g is None else g)
        return (None, None, *flat)

    @staticmethod
    def jvp(ctx: Any, _name: None, _layout: None, *tangents: torch.Tensor | None) -> Any:
        primals = _unflatten(ctx.layout, ctx.saved_tensors)
        if ctx.name == _PRODUCTS:
            return _products_tangent(primals, _unflatten(ctx.layout, tangents))
        return _tangent(ctx.name, primals, _unflatten(ctx.layout, tangents))
