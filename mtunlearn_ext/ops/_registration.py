"""Fake (meta) kernels, so that ``torch.compile`` and ``torch.export`` trace the ops, and the
ops' autograd: formulas for the bilinear ones (``gram``, ``inner``, ``combine`` and the list
forms ``gram_list``, ``inner_list``, ``gram_list_stacked``), and a clear error for a backward
pass through the others (solvers, projections, PCGrad), whose results torch would otherwise
treat as constants with only a warning (wrong gradients, silently)."""

from __future__ import annotations

import torch

from mtunlearn_ext.ops import _fake_checks as check
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.ops._func_transforms import call_differentiable, products
from mtunlearn_ext.ops._reference import acc_dtype

#: The ops with no derivative: their backward raises (see ``_no_derivative``).
NOT_DIFFERENTIABLE = ("ridge_solve", "nonconflicting_dual", "pcgrad_weights", "project_out",
                      "project_nonconflicting", "pcgrad")


def _check_one_device(op: str, *named_lists: tuple[str, list[torch.Tensor]]) -> None:
    """Raise if the tensors of a list op's lists are not all on one device.

    The dispatcher sends a call with any meta tensor here, even when the others are on the CPU
    (Meta outranks the CPU key), so the fake kernel is the only place that sees such a mix."""
    first_name, first_list = named_lists[0]
    device = first_list[0].device
    for name, tensors in named_lists:
        for p, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"mtunlearn::{op}: `{name}[{p}]` is on {t.device} but "
                                 f"`{first_name}[0]` is on {device}; all tensors must be on one "
                                 "device")


def _check_same_device(op: str, **tensors: torch.Tensor) -> None:
    """:func:`_check_one_device` for an op's single tensors: a CPU tensor beside a meta one
    reached this fake kernel, which returned an empty CPU tensor (uninitialised values) from a
    call the real kernels would have refused."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"mtunlearn::{op}: `{name}` is on {t.device} but `{first_name}` is "
                             f"on {first.device}; all tensors must be on one device")


def _combine_checks(op: str, coeffs: torch.Tensor, x: torch.Tensor) -> None:
    """``check_combine_args`` in csrc: ``coeffs [..., m, k]`` against ``x [..., k, n]``."""
    check.min_dim(op, "coeffs", coeffs, 2)
    check.min_dim(op, "x", x, 2)
    check.floating(op, "coeffs", coeffs)
    check.floating(op, "x", x)
    _check_same_device(op, coeffs=coeffs, x=x)
    check.pair(op, "coeffs", coeffs, "x", x, "`coeffs` [..., m, k] and `x` [..., k, n] must "
               "share leading dims and k", shared_last=False)


def _projection_checks(op: str, g: torch.Tensor, g_name: str, r: torch.Tensor, r_name: str
                       ) -> None:
    """``check_pair`` in csrc (csrc/ops/surgery): ``g [..., m, n]`` against ``r [..., k, n]``,
    one dtype, ``k`` within the solvers' reach."""
    check.min_dim(op, g_name, g, 2)
    check.min_dim(op, r_name, r, 2)
    check.floating(op, g_name, g)
    _check_same_device(op, **{g_name: g, r_name: r})
    check.same_dtype(op, (g_name, g), (r_name, r))
    check.pair(op, g_name, g, r_name, r, f"`{g_name}` [..., m, n] and `{r_name}` [..., k, n] "
               "must share leading dims and n", shared_last=True)
    check.solver_k(op, r_name, r.shape[-2])


def _register() -> None:
    lib = "mtunlearn::"

    @torch.library.register_fake(lib + "gram")
    def _gram_fake(x: torch.Tensor) -> torch.Tensor:
        check.min_dim("gram", "x", x, 2)
        check.floating("gram", "x", x)
        k = x.shape[-2]
        return x.new_empty((*x.shape[:-2], k, k), dtype=acc_dtype(x.dtype))

    @torch.library.register_fake(lib + "gram_list")
    def _gram_list_fake(xs: list[torch.Tensor], per_tensor: bool = False) -> torch.Tensor:
        check.stacks("gram_list", "xs", xs)
        _check_one_device("gram_list", ("xs", xs))
        k = xs[0].shape[0]
        shape = (len(xs), k, k) if per_tensor else (k, k)
        return xs[0].new_empty(shape, dtype=acc_dtype(xs[0].dtype))

    @torch.library.register_fake(lib + "inner")
    def _inner_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        check.min_dim("inner", "a", a, 2)
        check.min_dim("inner", "b", b, 2)
        check.floating("inner", "a", a)
        _check_same_device("inner", a=a, b=b)
        check.same_dtype("inner", ("a", a), ("b", b))
        check.pair("inner", "a", a, "b", b, "`a` [..., m, n] and `b` [..., k, n] must share "
                   "leading dims and n", shared_last=True)
        return a.new_empty((*a.shape[:-1], b.shape[-2]), dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(lib + "inner_list")
    def _inner_list_fake(as_: list[torch.Tensor], bs: list[torch.Tensor],
                         per_tensor: bool = False) -> torch.Tensor:
        check.paired_stacks("inner_list", "a_list", as_, "b_list", bs)
        _check_one_device("inner_list", ("a_list", as_), ("b_list", bs))
        m, k = as_[0].shape[0], bs[0].shape[0]
        shape = (len(as_), m, k) if per_tensor else (m, k)
        return as_[0].new_empty(shape, dtype=acc_dtype(as_[0].dtype))

    @torch.library.register_fake(lib + "gram_list_stacked")
    def _gram_list_stacked_fake(xs: list[torch.Tensor], ys: list[torch.Tensor],
                                per_tensor: bool = False) -> torch.Tensor:
        check.paired_stacks("gram_list_stacked", "xs", xs, "ys", ys)
        _check_one_device("gram_list_stacked", ("xs", xs), ("ys", ys))
        s = xs[0].shape[0] + ys[0].shape[0]
        shape = (len(xs), s, s) if per_tensor else (s, s)
        return xs[0].new_empty(shape, dtype=acc_dtype(xs[0].dtype))

    @torch.library.register_fake(lib + "combine")
    def _combine_fake(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _combine_checks("combine", coeffs, x)
        return x.new_empty((*x.shape[:-2], coeffs.shape[-2], x.shape[-1]))

    @torch.library.register_fake(lib + "combine_")
    def _combine_inplace_fake(out: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor,
                              beta: float = 0.0) -> None:
        _combine_checks("combine_", coeffs, x)
        _check_same_device("combine_", out=out, coeffs=coeffs, x=x)
        check.same_dtype("combine_", ("x", x), ("out", out))
        shape = (*x.shape[:-2], coeffs.shape[-2], x.shape[-1])
        check.require(tuple(out.shape) == shape, f"mtunlearn::combine_: `out` must have shape "
                                                 f"{shape}, got {sizes(out.shape)}")
        check.require(out.is_contiguous(), "mtunlearn::combine_: `out` must be contiguous (it is "
                                           "written in place)")
        return None

    @torch.library.register_fake(lib + "combine_list_")
    def _combine_list_fake(outs: list[torch.Tensor], coeffs: torch.Tensor,
                           xs: list[torch.Tensor], beta: float = 0.0,
                           per_tensor: bool = False) -> None:
        check.combine_lists("combine_list_", outs, None, coeffs, xs, per_tensor, beta)
        if xs:
            _check_one_device("combine_list_", ("xs", xs), ("outs", outs), ("coeffs", [coeffs]))
        return None

    @torch.library.register_fake(lib + "combine_list_from_")
    def _combine_list_from_fake(outs: list[torch.Tensor], bases: list[torch.Tensor],
                                coeffs: torch.Tensor, xs: list[torch.Tensor], beta: float = 1.0,
                                per_tensor: bool = False) -> None:
        check.combine_lists("combine_list_from_", outs, bases, coeffs, xs, per_tensor,
                            beta)
        if xs:
            _check_one_device("combine_list_from_", ("xs", xs), ("outs", outs),
                              ("bases", bases), ("coeffs", [coeffs]))
        return None

    @torch.library.register_fake(lib + "ridge_solve")
    def _ridge_solve_fake(gram: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-6
                          ) -> torch.Tensor:
        check.square_gram("ridge_solve", gram)
        check.solver_rhs("ridge_solve", gram, rhs, rows_are_k=True)
        check.finite_ridge("ridge_solve", ridge)
        _check_same_device("ridge_solve", gram=gram, rhs=rhs)
        return rhs.new_empty(rhs.shape, dtype=gram.dtype)  # contiguous, as the kernel

    @torch.library.register_fake(lib + "nonconflicting_dual")
    def _dual_fake(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        check.square_gram("nonconflicting_dual", gram)
        check.solver_rhs("nonconflicting_dual", gram, rhs, rows_are_k=False)
        _check_same_device("nonconflicting_dual", gram=gram, rhs=rhs)
        return rhs.new_empty(rhs.shape, dtype=gram.dtype)  # contiguous, as the kernel

    @torch.library.register_fake(lib + "pcgrad_weights")
    def _pcgrad_weights_fake(gram: torch.Tensor, seed: int = 0) -> torch.Tensor:
        check.square_gram("pcgrad_weights", gram)
        return gram.new_empty(gram.shape[:-1])

    @torch.library.register_fake(lib + "project_out")
    def _project_out_fake(g: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-6
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        _projection_checks("project_out", g, "g", basis, "basis")
        check.finite_ridge("project_out", ridge)
        coeffs = g.new_empty((*g.shape[:-1], basis.shape[-2]), dtype=acc_dtype(g.dtype))
        return torch.empty_like(g, memory_format=torch.contiguous_format), coeffs

    @torch.library.register_fake(lib + "project_nonconflicting")
    def _project_nc_fake(g: torch.Tensor, r: torch.Tensor, sign: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        _projection_checks("project_nonconflicting", g, "g", r, "r")
        check.unit_sign("project_nonconflicting", sign)
        coeffs = g.new_empty((*g.shape[:-1], r.shape[-2]), dtype=acc_dtype(g.dtype))
        return torch.empty_like(g, memory_format=torch.contiguous_format), coeffs

    @torch.library.register_fake(lib + "pcgrad")
    def _pcgrad_fake(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        check.min_dim("pcgrad", "x", x, 2)
        check.floating("pcgrad", "x", x)
        check.solver_k("pcgrad", "x", x.shape[-2])
        out = x.new_empty((*x.shape[:-2], x.shape[-1]))
        return out, x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))

    # Autograd: d<x_i, x_j> gives dx = (dG + dG^T) x; the rest are bilinear. The formulas
    # call the ops through call_differentiable, so that their own derivatives keep a
    # forward-mode tangent (forward-over-reverse) where the ops' registered path would drop it.
    def _gram_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    def _gram_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        sym = (grad + grad.transpose(-1, -2)).contiguous()
        return call_differentiable("combine", sym, x)

    torch.library.register_autograd(lib + "gram", _gram_backward, setup_context=_gram_setup)

    def _inner_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])

    def _inner_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = call_differentiable("combine", grad, b) if ctx.needs_input_grad[0] else None
        grad_b = (call_differentiable("combine", grad.transpose(-1, -2).contiguous(), a)
                  if ctx.needs_input_grad[1] else None)
        return grad_a, grad_b

    torch.library.register_autograd(lib + "inner", _inner_backward, setup_context=_inner_setup)

    def _combine_setup(ctx, inputs, output) -> None:
        ctx.coeffs_dtype = inputs[0].dtype
        ctx.save_for_backward(inputs[0], inputs[1])

    def _combine_backward(ctx, grad):
        coeffs, x = ctx.saved_tensors
        grad_coeffs = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_coeffs = call_differentiable("inner", grad.to(x.dtype), x).to(ctx.coeffs_dtype)
        if ctx.needs_input_grad[1]:
            grad_x = call_differentiable(
                "combine", coeffs.transpose(-1, -2).contiguous().to(acc_dtype(x.dtype)),
                grad.to(x.dtype))
        return grad_coeffs, grad_x

    torch.library.register_autograd(lib + "combine", _combine_backward,
                                    setup_context=_combine_setup)

    # The list forms: the same formulas, one tensor of the list at a time. The backward
    # returns one entry per entry of needs_input_grad: per_tensor has one only when it was
    # given other than its default (torch 2.13 refuses an extra None; 2.14 ignores it).
    def _list_setup(num_lists: int):
        def setup(ctx, inputs, output) -> None:
            lists = inputs[:num_lists]
            ctx.per_tensor = bool(inputs[num_lists]) if len(inputs) > num_lists else False
            ctx.split = len(lists[0])
            ctx.save_for_backward(*(t for tensors in lists for t in tensors))

        return setup

    def _rest(ctx, num_lists: int) -> tuple[None, ...]:
        return (None,) * (len(ctx.needs_input_grad) - num_lists)

    def _gram_list_backward(ctx, grad):
        xs = list(ctx.saved_tensors)
        sym = grad + grad.transpose(-1, -2)
        return (products(sym, xs, ctx.per_tensor), *_rest(ctx, 1))

    torch.library.register_autograd(lib + "gram_list", _gram_list_backward,
                                    setup_context=_list_setup(1))

    def _inner_list_backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        as_, bs = saved[:ctx.split], saved[ctx.split:]
        grad_as = (products(grad, bs, ctx.per_tensor) if _needed(ctx.needs_input_grad[0])
                   else [None] * len(as_))
        grad_bs = (products(grad.transpose(-1, -2), as_, ctx.per_tensor)
                   if _needed(ctx.needs_input_grad[1]) else [None] * len(bs))
        return (grad_as, grad_bs, *_rest(ctx, 2))

    torch.library.register_autograd(lib + "inner_list", _inner_list_backward,
                                    setup_context=_list_setup(2))

    def _gram_list_stacked_backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        xs, ys = saved[:ctx.split], saved[ctx.split:]
        m = xs[0].shape[0]
        sym = grad + grad.transpose(-1, -2)
        # Row i of [X; Y] gets sum_j sym[i, j] [X; Y]_j: the X rows' and the Y rows' parts.
        grad_xs: list[torch.Tensor | None] = [None] * len(xs)
        grad_ys: list[torch.Tensor | None] = [None] * len(ys)
        if _needed(ctx.needs_input_grad[0]):
            grad_xs = _sum_lists(products(sym[..., :m, :m], xs, ctx.per_tensor),
                                 products(sym[..., :m, m:], ys, ctx.per_tensor))
        if _needed(ctx.needs_input_grad[1]):
            grad_ys = _sum_lists(products(sym[..., m:, :m], xs, ctx.per_tensor),
                                 products(sym[..., m:, m:], ys, ctx.per_tensor))
        return (grad_xs, grad_ys, *_rest(ctx, 2))

    torch.library.register_autograd(lib + "gram_list_stacked", _gram_list_stacked_backward,
                                    setup_context=_list_setup(2))

    for name in NOT_DIFFERENTIABLE:
        torch.library.register_autograd(lib + name, _no_derivative(name),
                                        setup_context=_nothing_saved)


def _needed(flag: object) -> bool:
    """``needs_input_grad`` of a list input: one bool per tensor (a non-empty list is truthy
    whatever it holds), or one bool (torch 2.13)."""
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _sum_lists(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x + y for x, y in zip(a, b)]


def _nothing_saved(ctx, inputs, output) -> None:
    return None


def _no_derivative(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"mtunlearn_ext.ops.{name} is not differentiable: a backward pass reached it through "
            "an input that requires grad. Detach its inputs (or call it under torch.no_grad()) "
            "to use its result as a constant; gram, inner and combine (without `out`) and their "
            "list forms have derivatives")

    return backward


_register()
