"""Fake (meta) kernels, so that ``torch.compile`` and ``torch.export`` trace the ops, and
autograd formulas for the differentiable ones (``gram``, ``inner``, ``combine``)."""

from __future__ import annotations

import torch

from mtunlearn_ext.ops._reference import acc_dtype


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


def _register() -> None:
    lib = "mtunlearn::"

    @torch.library.register_fake(lib + "gram")
    def _gram_fake(x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-2]
        return x.new_empty((*x.shape[:-2], k, k), dtype=acc_dtype(x.dtype))

    @torch.library.register_fake(lib + "gram_list")
    def _gram_list_fake(xs: list[torch.Tensor], per_tensor: bool = False) -> torch.Tensor:
        _check_one_device("gram_list", ("xs", xs))
        k = xs[0].shape[0]
        shape = (len(xs), k, k) if per_tensor else (k, k)
        return xs[0].new_empty(shape, dtype=acc_dtype(xs[0].dtype))

    @torch.library.register_fake(lib + "inner")
    def _inner_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.new_empty((*a.shape[:-1], b.shape[-2]), dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(lib + "inner_list")
    def _inner_list_fake(as_: list[torch.Tensor], bs: list[torch.Tensor],
                         per_tensor: bool = False) -> torch.Tensor:
        _check_one_device("inner_list", ("as", as_), ("bs", bs))
        m, k = as_[0].shape[0], bs[0].shape[0]
        shape = (len(as_), m, k) if per_tensor else (m, k)
        return as_[0].new_empty(shape, dtype=acc_dtype(as_[0].dtype))

    @torch.library.register_fake(lib + "gram_list_stacked")
    def _gram_list_stacked_fake(xs: list[torch.Tensor], ys: list[torch.Tensor],
                                per_tensor: bool = False) -> torch.Tensor:
        _check_one_device("gram_list_stacked", ("xs", xs), ("ys", ys))
        s = xs[0].shape[0] + ys[0].shape[0]
        shape = (len(xs), s, s) if per_tensor else (s, s)
        return xs[0].new_empty(shape, dtype=acc_dtype(xs[0].dtype))

    @torch.library.register_fake(lib + "combine")
    def _combine_fake(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-2], coeffs.shape[-2], x.shape[-1]))

    @torch.library.register_fake(lib + "combine_")
    def _combine_inplace_fake(out: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor,
                              beta: float = 0.0) -> None:
        return None

    @torch.library.register_fake(lib + "combine_list_")
    def _combine_list_fake(outs: list[torch.Tensor], coeffs: torch.Tensor,
                           xs: list[torch.Tensor], beta: float = 0.0,
                           per_tensor: bool = False) -> None:
        if xs:
            _check_one_device("combine_list_", ("xs", xs), ("outs", outs), ("coeffs", [coeffs]))
        return None

    @torch.library.register_fake(lib + "combine_list_from_")
    def _combine_list_from_fake(outs: list[torch.Tensor], bases: list[torch.Tensor],
                                coeffs: torch.Tensor, xs: list[torch.Tensor], beta: float = 1.0,
                                per_tensor: bool = False) -> None:
        if xs:
            _check_one_device("combine_list_from_", ("xs", xs), ("outs", outs),
                              ("bases", bases), ("coeffs", [coeffs]))
        return None

    @torch.library.register_fake(lib + "ridge_solve")
    def _ridge_solve_fake(gram: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-6
                          ) -> torch.Tensor:
        return rhs.new_empty(rhs.shape, dtype=gram.dtype)  # contiguous, as the kernel

    @torch.library.register_fake(lib + "nonconflicting_dual")
    def _dual_fake(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        return rhs.new_empty(rhs.shape, dtype=gram.dtype)  # contiguous, as the kernel

    @torch.library.register_fake(lib + "pcgrad_weights")
    def _pcgrad_weights_fake(gram: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return gram.new_empty(gram.shape[:-1])

    @torch.library.register_fake(lib + "project_out")
    def _project_out_fake(g: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-6
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        coeffs = g.new_empty((*g.shape[:-1], basis.shape[-2]), dtype=acc_dtype(g.dtype))
        return torch.empty_like(g, memory_format=torch.contiguous_format), coeffs

    @torch.library.register_fake(lib + "project_nonconflicting")
    def _project_nc_fake(g: torch.Tensor, r: torch.Tensor, sign: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        coeffs = g.new_empty((*g.shape[:-1], r.shape[-2]), dtype=acc_dtype(g.dtype))
        return torch.empty_like(g, memory_format=torch.contiguous_format), coeffs

    @torch.library.register_fake(lib + "pcgrad")
    def _pcgrad_fake(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        out = x.new_empty((*x.shape[:-2], x.shape[-1]))
        return out, x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))

    # Autograd: d<x_i, x_j> gives dx = (dG + dG^T) x; the rest are bilinear.
    def _gram_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    def _gram_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        sym = (grad + grad.transpose(-1, -2)).contiguous()
        return torch.ops.mtunlearn.combine(sym, x)

    torch.library.register_autograd(lib + "gram", _gram_backward, setup_context=_gram_setup)

    def _inner_setup(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0], inputs[1])

    def _inner_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.ops.mtunlearn.combine(grad, b) if ctx.needs_input_grad[0] else None
        grad_b = (torch.ops.mtunlearn.combine(grad.transpose(-1, -2).contiguous(), a)
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
            grad_coeffs = torch.ops.mtunlearn.inner(grad.to(x.dtype), x).to(ctx.coeffs_dtype)
        if ctx.needs_input_grad[1]:
            grad_x = torch.ops.mtunlearn.combine(
                coeffs.transpose(-1, -2).contiguous().to(acc_dtype(x.dtype)), grad.to(x.dtype))
        return grad_coeffs, grad_x

    torch.library.register_autograd(lib + "combine", _combine_backward,
                                    setup_context=_combine_setup)


_register()
