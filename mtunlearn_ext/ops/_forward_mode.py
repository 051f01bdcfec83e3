"""Forward-mode derivatives of the ops: ``torch.func.jvp`` / ``jacfwd`` and
``torch.autograd.forward_ad``.

The compiled ops register reverse-mode formulas (``torch.library.register_autograd``), which
torch applies only to inputs that require grad; inputs carrying a forward-mode tangent went to
the kernel without it, and the outputs came back with none: ``jvp`` and ``jacfwd`` returned
zeros, silently (drop-in review). The public wrappers now send such inputs here:

- the bilinear ops get their exact tangents from the same compiled ops:
  ``d(X X^T) = dX X^T + (dX X^T)^T``, ``d(A B^T) = dA B^T + A dB^T``,
  ``d(C X) = dC X + C dX``, and the list forms term by term (a stacked pair ``[X; Y]`` as one
  stack);
- the projections and solvers, which have no derivative in reverse mode either, and the
  in-place writes, refuse naming the op.

An input that also requires grad (forward-over-reverse: ``gradgradcheck``'s
``check_fwd_over_rev``) or a ``torch.func`` reverse-mode transform around takes
``_func_transforms`` instead: here the op's reverse-mode record would hold the primals only,
and its derivative would lose their tangents. The rules here cost one op call per term, which
that ``autograd.Function`` (~0.4 ms a call under the transforms) would multiply.

Only while a forward-mode level is open are the inputs looked at (one read of a module
global otherwise), so the ops' cost outside forward mode is unchanged. The raw
``torch.ops.mtunlearn`` ops keep torch's behaviour (no tangent); use these wrappers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.autograd import forward_ad

_Rule = Callable[[list[Any], list[Any]], torch.Tensor]


def forward_mode_open() -> bool:
    """Whether a forward-mode level is open (``forward_ad.dual_level``, which ``torch.func.jvp``
    and ``jacfwd`` open too): only then can an input carry a tangent."""
    return forward_ad._current_level >= 0


def _tangent(t: torch.Tensor) -> torch.Tensor | None:
    return forward_ad.unpack_dual(t).tangent


def _split(arg: Any) -> tuple[Any, Any]:
    """``arg``'s primal and tangent: a tensor's (tangent None without one), a list's element
    by element (None where no element has one), anything else as it is (tangent None)."""
    if isinstance(arg, torch.Tensor):
        primal, tangent = forward_ad.unpack_dual(arg)
        return primal, tangent
    if isinstance(arg, (list, tuple)) and arg and all(isinstance(t, torch.Tensor) for t in arg):
        pairs = [forward_ad.unpack_dual(t) for t in arg]
        tangents = [p.tangent for p in pairs]
        return [p.primal for p in pairs], (tangents if any(t is not None for t in tangents)
                                           else None)
    return arg, None


def _filled(tangents: Sequence[torch.Tensor | None] | None, primals: Sequence[torch.Tensor]
            ) -> list[torch.Tensor]:
    """A list's tangents, zeros where an element has none."""
    if tangents is None:
        return [torch.zeros_like(p) for p in primals]
    return [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]


def _symmetrized(d: torch.Tensor) -> torch.Tensor:
    return d + d.transpose(-1, -2)


def _sum(terms: Iterable[torch.Tensor | None]) -> torch.Tensor:
    present = [t for t in terms if t is not None]
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def _gram(p: list[Any], t: list[Any]) -> torch.Tensor:
    return _symmetrized(torch.ops.mtunlearn.inner(t[0], p[0]))


def _inner(p: list[Any], t: list[Any]) -> torch.Tensor:
    inner = torch.ops.mtunlearn.inner
    return _sum([None if t[0] is None else inner(t[0], p[1]),
                 None if t[1] is None else inner(p[0], t[1])])


def _combine(p: list[Any], t: list[Any]) -> torch.Tensor:
    combine = torch.ops.mtunlearn.combine
    return _sum([None if t[0] is None else combine(t[0], p[1]),
                 None if t[1] is None else combine(p[0], t[1])])


def _gram_list(p: list[Any], t: list[Any]) -> torch.Tensor:
    xs, per_tensor = p
    return _symmetrized(torch.ops.mtunlearn.inner_list(_filled(t[0], xs), xs, per_tensor))


def _inner_list(p: list[Any], t: list[Any]) -> torch.Tensor:
    as_, bs, per_tensor = p
    inner_list = torch.ops.mtunlearn.inner_list
    return _sum([None if t[0] is None else inner_list(_filled(t[0], as_), bs, per_tensor),
                 None if t[1] is None else inner_list(as_, _filled(t[1], bs), per_tensor)])


def _gram_list_stacked(p: list[Any], t: list[Any]) -> torch.Tensor:
    xs, ys, per_tensor = p
    stacks = [torch.cat([x, y]) for x, y in zip(xs, ys)]
    moved = [torch.cat([dx, dy]) for dx, dy in zip(_filled(t[0], xs), _filled(t[1], ys))]
    return _symmetrized(torch.ops.mtunlearn.inner_list(moved, stacks, per_tensor))


#: The ops with a derivative, by schema name: their output's tangent from the inputs' primals
#: and tangents (None for an argument without one).
_RULES: dict[str, _Rule] = {
    "gram": _gram, "inner": _inner, "combine": _combine, "gram_list": _gram_list,
    "inner_list": _inner_list, "gram_list_stacked": _gram_list_stacked,
}


def _refusal(name: str) -> RuntimeError:
    return RuntimeError(
        f"mtunlearn_ext.ops.{name} is not differentiable: forward-mode AD (torch.func.jvp / "
        "jacfwd, torch.autograd.forward_ad) reached it through an input with a tangent. Detach "
        "its inputs to use its result as a constant; gram, inner and combine (without `out`) "
        "and their list forms have derivatives")


def call_with_tangents(op: Any, args: Sequence[Any]) -> Any:
    """``op(*args)`` with its output's tangent where an argument carries one (None where none
    does: the caller calls the op as usual). Refuses an op without a derivative."""
    split = [_split(a) for a in args]
    tangents = [t for _, t in split]
    if all(t is None for t in tangents):
        return None
    name = op._qualified_op_name.split("::")[-1]
    rule = _RULES.get(name)
    if rule is None:
        raise _refusal(name)
    primals = [p for p, _ in split]
    return forward_ad.make_dual(op(*primals), rule(primals, tangents))


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
