"""Argument checks shared by the op wrappers: each error names the op, the argument, what was
expected and what was received."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake

from mtunlearn_ext._extension import has_extension
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.ops._forward_mode import call_with_tangents, forward_mode_open
from mtunlearn_ext.ops._func_transforms import (
    DIFFERENTIABLE,
    call_differentiable,
    reverse_transform_active,
)

_Result = TypeVar("_Result")

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(op: str, name: str, t: object, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: `{name}` must have dtype float64, float32, float16 or bfloat16, got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(
            f"{op}: `{name}` must have at least {min_dim} dims, got shape {sizes(t.shape)}"
        )
    return t


def _as_int(op: str, name: str, number: object) -> int:
    """``number`` as a Python int (NumPy's and 0-d tensors' integers too). A bool or a
    fraction is refused: ``int()`` would take True as 1 and truncate 2.5 to 2."""
    if isinstance(number, bool):
        raise TypeError(f"{op}: `{name}` must be an integer, got the bool {number}")
    try:
        return operator.index(number)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{op}: `{name}` must be an integer, got {type(number).__name__} "
                        f"{number!r:.40}") from None


def _message_of(message: str) -> Callable[[], str]:
    """The message callable of a check traced by ``torch.compile``: made where the check is
    traced, the text as a default argument, not a closure. torch 2.11's Dynamo takes no other
    (a closure or an outer function stops the trace: "Can't extract message from
    torch._check()"), nor a message for ``torch._check_value`` at all; ``torch._check`` raises
    a RuntimeError where the eager check raises a ValueError, with the same text."""
    def text(message: str = message) -> str:
        return message

    return text


def check_sign(op: str, sign: object) -> int:
    """1 or -1 as a Python int, from a number equal to one of them (``-1.0``, NumPy's and 0-d
    tensors' numbers too). A bool is refused though True == 1 (a flag meant as something else),
    NumPy's and torch's included, and so is an array or tensor that is not 0-d (``tensor([1])``
    passed the old ``in (1, -1)`` test element by element)."""
    if torch.compiler.is_compiling() and isinstance(sign, int) and not isinstance(sign, bool):
        # Dynamo may trace an int argument as a symbolic one, whose attributes it cannot look
        # up: checked when the graph runs (here when constant).
        message = f"{op}: `sign` must be 1 or -1"
        torch._check((sign == 1) | (sign == -1), _message_of(message))
        return sign
    dtype = getattr(sign, "dtype", None)
    is_bool = isinstance(sign, bool) or (
        dtype is not None and (dtype == torch.bool if isinstance(dtype, torch.dtype)
                               else dtype == bool))
    value: int | None = None
    if not is_bool and getattr(sign, "ndim", 0) == 0:
        try:
            if sign in (1, -1):
                value = int(sign)
        except (TypeError, ValueError, RuntimeError):  # a meta tensor has no value to compare
            pass
    if value is None:
        raise ValueError(f"{op}: `sign` must be 1 or -1, got {sign!r}")
    return value


def check_seed(op: str, seed: object) -> int:
    """``seed`` as a Python int in the signed 64-bit range the kernels take (the schema's own
    message for a value outside it was "expected int, found int")."""
    value = _as_int(op, "seed", seed)
    if not -(2 ** 63) <= value < 2 ** 63:
        raise ValueError(f"{op}: `seed` must lie in [-2**63, 2**63 - 1] (the kernels' int64), "
                         f"got {value}")
    return value


def check_int(op: str, name: str, number: object, *, at_least: int | None = None,
              below: int | None = None) -> int:
    """``number`` as a Python int (:func:`_as_int`) within ``[at_least, below)``."""
    value = _as_int(op, name, number)
    if (at_least is not None and value < at_least) or (below is not None and value >= below):
        bound = (f" >= {at_least}" if below is None else f" < {below}" if at_least is None
                 else f" in [{at_least}, {below - 1}]")
        raise ValueError(f"{op}: `{name}` must be an integer{bound}, got {value}")
    return value


def check_number(op: str, name: str, number: object, *,
                 at_least: float | None = None) -> float:
    """``number`` as a finite float (``>= at_least`` where given). A bool or a string is
    refused: ``float()`` would take True as 1 and "1e-3" as a number. A symbolic number (a
    float argument ``torch.compile`` traces as dynamic) is passed on, its bound checked when
    the graph runs."""
    if torch.compiler.is_compiling() and isinstance(number, (int, float)) and not isinstance(
            number, bool):
        # Dynamo may trace a float argument as a symbolic one (a second value recompiles so),
        # which math.isfinite cannot take: checked when the graph runs (here when constant).
        finite = (number == number) & (number != math.inf) & (number != -math.inf)
        message = (f"{op}: `{name}` must be a finite number"
                   f"{'' if at_least is None else f' >= {at_least:g}'}")
        torch._check(finite if at_least is None else finite & (number >= at_least),
                     _message_of(message))
        return number
    value = math.nan
    if not isinstance(number, (bool, str, bytes)):
        try:
            value = float(number)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            pass
    if not (math.isfinite(value) and (at_least is None or value >= at_least)):
        bound = "" if at_least is None else f" >= {at_least:g}"
        raise ValueError(f"{op}: `{name}` must be a finite number{bound}, got {number!r:.40}")
    return value


def check_ridge(op: str, ridge: object) -> float:
    """``ridge`` as a finite float >= 0 (an infinite one made every coefficient 0 silently)."""
    return check_number(op, "ridge", ridge, at_least=0.0)


def check_beta(op: str, beta: object, check_finite: bool, name: str = "beta") -> float:
    """``beta`` (the scale of an output's previous contents) as a float; with ``check_finite``
    a finite one: NaN or Inf times the old contents is NaN/Inf in every output element, which
    the finite check (it reads the coefficients only) would let through."""
    if check_finite:
        return check_number(op, name, beta)
    if isinstance(beta, (bool, str, bytes)):
        raise ValueError(f"{op}: `{name}` must be a number, got {beta!r:.40}")
    if torch.compiler.is_compiling() and isinstance(beta, (int, float)):
        return beta  # maybe symbolic (see check_number), which float() cannot take
    try:
        return float(beta)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{op}: `{name}` must be a number, got {type(beta).__name__} "
                         f"{beta!r:.40}") from None


def check_tensor_list(op: str, name: str, tensors: object, *, required: bool = False) -> None:
    """Refuse one tensor where a list of tensors (one per parameter) is expected: iterated, a
    tensor gives its rows, so ``gram_list(x)`` with ``x`` of shape ``[5, 3]`` ran as a list of
    five stacks of 3 (k = 5) without a word. With ``required``, ``None`` is refused too (it
    failed as "'NoneType' object is not iterable", naming no argument)."""
    if required and tensors is None:
        raise TypeError(f"{op}: `{name}` must be a list of tensors (one per parameter), got None")
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a list of tensors (one per parameter), got a "
                        f"torch.Tensor of shape {sizes(tensors.shape)} (iterating it would take "
                        "its rows for the list); pass a list, e.g. `[x]` for a single tensor")


def check_bool(op: str, name: str, flag: object) -> bool:
    """``flag`` as a bool (NumPy's too). Anything else is refused: its truth value would
    decide silently (the string "no" is true)."""
    if isinstance(flag, bool) or (type(flag).__module__ == "numpy"
                                  and type(flag).__name__ in ("bool", "bool_")):
        return bool(flag)
    raise TypeError(f"{op}: `{name}` must be a bool, got {type(flag).__name__} {flag!r:.40}")


def check_flag(op: str, name: str, flag: object) -> None:
    """Refuse a ``flag`` the compiled ops' ``bool`` arguments refuse (a string, a list: torch's
    own message is a pybind11 cast error naming the op's schema). What the schema takes (a
    bool, a number, NumPy's scalars, a one-element tensor, None) passes, so that both paths
    accept the same calls."""
    if flag is None or isinstance(flag, numbers.Number):
        return
    if isinstance(flag, torch.Tensor) and flag.numel() == 1:
        return
    if type(flag).__module__ == "numpy" and getattr(flag, "size", None) == 1:
        return
    raise TypeError(f"{op}: `{name}` must be a bool, got {type(flag).__name__} {flag!r:.40}")


def check_same_device(op: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: `{name}` is on {t.device} but `{first_name}` is on {first.device}; "
                "all tensors must be on one device"
            )


def check_same_dtype(op: str, named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: `{name}` has dtype {t.dtype} but `{first_name}` has {first.dtype}; "
                "they must match"
            )


def check_no_autograd_through_out(
        op: str, named: Sequence[tuple[str, torch.Tensor | Sequence[torch.Tensor]]]) -> None:
    """Refuse an in-place write into outputs while autograd would need to record it, as
    ``torch.matmul(..., out=)`` does: the kernels' writes are not recorded, so an output that
    requires grad (or one computed from inputs that do) would carry silently wrong gradients.
    One C++ pass over the lists when grad mode is on; nothing otherwise."""
    if not torch.is_grad_enabled():
        return
    # Dynamo cannot trace the C++ helper; while tracing, the loop below is folded away.
    if not torch.compiler.is_compiling() and not torch._C._any_requires_grad(
            *(arg for _, arg in named)):
        return
    name = next((name if isinstance(arg, torch.Tensor) else f"{name}[{p}]"
                 for name, arg in named
                 for p, t in enumerate([arg] if isinstance(arg, torch.Tensor) else arg)
                 if t.requires_grad), None)
    if name is None:
        return
    raise RuntimeError(
        f"{op}: writes into its outputs in place, which autograd does not record, but `{name}` "
        "requires grad; call it under torch.no_grad() or on detached tensors (`combine` without "
        "`out` is differentiable)")


def check_not_transformed(op: str, tensors: Iterable[torch.Tensor]) -> None:
    """Refuse tensors of ``torch.func`` transforms (vmap, grad) in an in-place op: its kernels
    write through raw pointers, which such tensors do not have (torch's own message was
    "Cannot access data pointer of Tensor that doesn't have storage")."""
    if torch.compiler.is_compiling():  # traced tensors: dynamo cannot call the C++ helper
        return
    if any(isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t)
           for t in tensors):
        raise RuntimeError(f"{op}: writes in place, which torch.vmap and torch.func transforms "
                           "do not support; inside them use `combine` without `out` (it has a "
                           "vmap rule and a derivative)")


def _has_no_values(t: torch.Tensor) -> bool:
    """A tensor with a shape but no data: on the meta device, or a FakeTensor outside
    ``torch.compile`` (while tracing, the check below becomes a device-side assert)."""
    if type(t) is torch.Tensor:  # a FakeTensor is a subclass: is_fake's 4 us spared per call
        return t.device.type == "meta" and not torch.compiler.is_compiling()
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "meta" or is_fake(t)


def plain_values(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor behind ``torch.func``'s wrappers (vmap's batched tensors, grad's
    tracking tensors; nested ones too): every sample's values, readable with ``.item()``."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def named_pairs(a_name: str, a_list: Sequence[torch.Tensor], b_name: str,
                b_list: Sequence[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of both lists with their names (``a_list[0]``, ...), lazily: only a failing
    check reads them."""
    yield from ((f"{a_name}[{p}]", a) for p, a in enumerate(a_list))
    yield from ((f"{b_name}[{p}]", b) for p, b in enumerate(b_list))


def check_finite_result(op: str, result: torch.Tensor, named: Iterable[tuple[str, torch.Tensor]]
                        ) -> None:
    """Raise if ``result`` (a small coefficient-space tensor) holds NaN/Inf.

    Non-finite values in any input always reach the small Gram / inner-product results (NaN
    propagates, ``Inf * 0`` is NaN), so checking them costs ``O(k^2)`` instead of a pass over the
    inputs. Only on this rare failing path are the inputs scanned, to name the culprit
    (``named`` may be a generator: it is consumed only then).
    """
    if _has_no_values(result):  # meta or fake tensors (shape propagation): nothing to read
        return
    if torch.compiler.is_compiling() and result.device.type == "cpu":
        # Inside a graph, on the CPU, an assert in the graph fails the same call (a
        # RuntimeError, without the input's name, which needs a second look at the values). Not
        # on CUDA: a device-side assert there leaves the CUDA context unusable, so the host
        # check below runs instead (a graph break, as before).
        torch._assert_async(torch.isfinite(result).all(),
                            f"{op}: NaN or Inf in the inputs, or an overflowing accumulation "
                            "(check_finite=False lets them propagate)")
        return
    if torch.compiler.is_exporting():
        # The host check below cannot be traced (export has no graph break to fall back on):
        # its error was torch's GuardOnDataDependentSymNode, which names no argument of ours.
        raise RuntimeError(
            f"{op}: check_finite=True on {result.device.type} tensors reads the result on the "
            "host, which torch.export cannot trace (on the CPU the check is an assert in the "
            "graph; on CUDA a device-side assert would leave the context unusable): pass "
            "check_finite=False in the exported code and check its inputs outside it")
    # Under torch.func transforms (vmap, grad) the values behind the wrappers are read at once:
    # `.item()` has no per-sample meaning inside vmap, and one NaN sample fails the whole call,
    # as it would in a loop.
    result = plain_values(result)
    # One reduction on the fast path: the sum of finite values is finite unless it overflows,
    # and only then (or with a real NaN/Inf) is the element-wise check needed.
    if math.isfinite(result.sum().item()) or bool(torch.isfinite(result).all()):
        return
    for name, t in named:
        if not bool(torch.isfinite(plain_values(t)).all()):
            raise FloatingPointError(
                f"{op}: `{name}` contains NaN or Inf; pass finite values "
                "(or check_finite=False to let them propagate)"
            )
    raise FloatingPointError(
        f"{op}: the inputs are finite but the result is not: the Gram/inner-product accumulation "
        "overflowed (inputs too large for the accumulation dtype; rescale them)"
    )


def call_op(op: Callable[..., _Result], *args: object) -> _Result:
    """Call the compiled ``op``; with grad mode off, below its autograd layer: since the ops
    register autograd formulas (or a refusal) from Python, that layer is a Python call (15-20
    us on a list of 160 tensors, measured) which records nothing there anyway. (With grad mode
    on the layer stays: telling whether an argument requires grad would need a look at every
    tensor, also through torch.func's wrappers, which report requires_grad=False.) Inputs
    with a forward-mode tangent get their output's tangent, or a refusal (_forward_mode). Under
    a torch.func reverse-mode transform, or with inputs that both carry a tangent and require
    grad, the ops with a derivative go through an autograd.Function that the transforms take
    and that keeps tangents (_func_transforms); the others are refused by name."""
    forward = forward_mode_open()
    if (torch._C._are_functorch_transforms_active() and reverse_transform_active()) or (
            forward and torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        # A transform torch would refuse, or a reverse-mode record that would drop the inputs'
        # tangents: the ops with a derivative go through an autograd.Function that keeps both.
        name = _schema_name(op)
        if name in DIFFERENTIABLE:
            return call_differentiable(name, *args)  # type: ignore[return-value]
    if forward:  # an argument may carry a tangent, which torch would drop
        dual = call_with_tangents(op, args)
        if dual is not None:
            return dual
    if torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled():
        try:
            return op(*args)
        except RuntimeError as error:
            if "must override the setup_context staticmethod" not in str(error):
                raise
            # torch.func.grad / jacrev / vjp reached an op without a derivative: torch's
            # message points at an autograd.Function the caller never wrote.
            raise RuntimeError(
                f"mtunlearn_ext.ops.{_schema_name(op)} is not differentiable: torch.func.grad "
                "/ jacrev / vjp reached it through an input they track. Detach its inputs to "
                "use its result as a constant; gram, inner and combine (without `out`) and "
                "their list forms have derivatives") from error
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _schema_name(op: object) -> str:
    return str(getattr(op, "_qualified_op_name", op)).split("::")[-1]


def check_on_failure(body: Callable[[], _Result], check: Callable[[], object]) -> _Result:
    """Run ``body``; only if it raises, run ``check`` (which raises an error naming the wrong
    argument in the caller's words) before re-raising.

    The compiled list ops check every tensor of their lists in C++ (type, shape, dtype, device),
    so per-tensor checks in Python on every call (~1 us per tensor, hundreds of tensors per
    step) are paid only when something is wrong. Under tracing (``torch.compile``) ``check``
    runs first: it costs nothing at run time there.
    """
    if torch.compiler.is_compiling():
        check()
        return body()
    try:
        return body()
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        failure = error
    # Outside the ``except``: the check's error is the one the caller reads, not the last of a
    # chain ("During handling of the above exception...") through every op the call went via.
    check()
    raise failure


def checked_list_call(compiled: Callable[[], _Result], reference: Callable[[], _Result],
                      check: Callable[[], object]) -> _Result:
    """Run a list op: the compiled one through :func:`check_on_failure`, or, without the
    extension, the reference after ``check`` (the references do not check their arguments)."""
    if not has_extension():
        check()
        return reference()
    return check_on_failure(compiled, check)
