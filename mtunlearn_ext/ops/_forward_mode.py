"""Forward-mode AD over the ops: ``torch.func.jvp`` / ``jacfwd`` and
``torch.autograd.forward_ad``.

The compiled ops register reverse-mode formulas (``torch.library.register_autograd``), which
torch applies only to inputs that require grad; inputs carrying a forward-mode tangent went to
the kernel without it, and the outputs came back with none: ``jvp`` and ``jacfwd`` returned
zeros, silently (drop-in review). While a forward-mode level is open the public wrappers call
the ops with a derivative through ``_func_transforms`` (an ``autograd.Function`` whose tangent
rules are made of the same compiled ops: ``d(X X^T) = dX X^T + (dX X^T)^T``,
``d(A B^T) = dA B^T + A dB^T``, ``d(C X) = dC X + C dX``, the list forms term by term), which
also keeps the tangent of a reverse-mode derivative (forward-over-reverse). Here: whether
forward mode is open, and the refusals: the projections and solvers, which have no derivative
in reverse mode either, and the in-place writes, refuse a tangent naming the op.

Only while a forward-mode level is open are the inputs looked at (one read of a module
global otherwise), so the ops' cost outside forward mode is unchanged. The raw
``torch.ops.mtunlearn`` ops keep torch's behaviour (no tangent); use these wrappers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.autograd import forward_ad


def forward_mode_open() -> bool:
    """Whether a forward-mode level is open (``forward_ad.dual_level``, which ``torch.func.jvp``
    and ``jacfwd`` open too): only then can an input carry a tangent."""
    return forward_ad._current_level >= 0


def _tangent(t: torch.Tensor) -> torch.Tensor | None:
    return forward_ad.unpack_dual(t).tangent


def _refusal(name: str) -> RuntimeError:
    return RuntimeError(
        f"mtunlearn_ext.ops.{name} is not differentiable: forward-mode AD (torch.func.jvp / "
        "jacfwd, torch.autograd.forward_ad) reached it through an input with a tangent. Detach "
        "its inputs to use its result as a constant; gram, inner and combine (without `out`) "
        "and their list forms have derivatives")


def refuse_op_tangents(op: Any, args: Sequence[Any]) -> None:
    """Refuse an argument with a tangent in ``op``, an op without a derivative."""
    for arg in args:
        tensors = arg if isinstance(arg, (list, tuple)) else [arg]
        if any(isinstance(t, torch.Tensor) and _tangent(t) is not None for t in tensors):
            raise _refusal(op._qualified_op_name.split("::")[-1])


def refuse_tangents(op: str, named: Iterable[tuple[str, Any]]) -> None:
    """Refuse inputs with a forward-mode tangent in an op that writes in place (its tangent
    would be lost, as autograd's record is for inputs that require grad)."""
    if not forward_mode_open():
        return
    for name, arg in named:
        tensors = arg if isinstance(arg, (list, tuple)) else [arg]
        if any(isinstance(t, torch.Tensor) and _tangent(t) is not None for t in tensors):
            raise RuntimeError(
                f"{op}: writes into its outputs in place, which forward-mode AD does not "
                f"follow, but `{name}` carries a tangent; use `combine` without `out` (it has "
                "a derivative) or detach the inputs")
