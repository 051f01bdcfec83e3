"""Fingerprints of what a model was trained on: a data set's tensors and task specs, and what a
task's custom loss computes (its code, arguments, defaults and closure values), so that a cached
model or a checkpoint can tell whether the data and losses it met are the ones at hand.

A custom loss is identified by what it does, not by its name: two ``functools.partial`` of one
function with other arguments, or two lambdas, differ; a loss whose behaviour hangs on state
this does not read (a bound method, an ``nn.Module``, a class defined outside a library) gets
no identity (``None``), and its models are not cached.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mtunlearn_ext._io import json_sha256, tensor_bytes
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.inputs import named_leaves

__all__ = ["dataset_fingerprint", "loss_identity", "loss_problems"]


class _Unidentifiable(Exception):
    """A custom loss whose behaviour :func:`loss_identity` cannot pin down (the reason)."""


#: Packages whose functions and classes a loss identity names (module and qualified name)
#: instead of reading their code: the standard library, this library, and anything installed
#: (site-packages); their behaviour changes with their version, as the kinds' own losses do.
_LIBRARY_ROOTS = frozenset(sys.stdlib_module_names) | {"builtins", "mtunlearn_ext"}


def _is_library(module: str | None) -> bool:
    if not module:
        return False
    root = module.partition(".")[0]
    if root in _LIBRARY_ROOTS:
        return True
    file = getattr(sys.modules.get(root), "__file__", None) or ""
    return "site-packages" in file or "dist-packages" in file


def _code_identity(code: types.CodeType) -> list[Any]:
    """A code object's behaviour: its bytecode, constants (nested code recursively), names
    and signature counts; not its file or line numbers."""
    return ["code", code.co_code.hex(), [_const_identity(c) for c in code.co_consts],
            list(code.co_names), list(code.co_varnames), list(code.co_freevars),
            list(code.co_cellvars), code.co_argcount, code.co_posonlyargcount,
            code.co_kwonlyargcount, code.co_flags]


def _const_identity(value: Any) -> Any:
    if isinstance(value, types.CodeType):
        return _code_identity(value)
    if isinstance(value, (tuple, frozenset)):
        items = [_const_identity(v) for v in value]
        if isinstance(value, frozenset):  # iteration order follows the hash seed
            items.sort(key=repr)
        return [type(value).__name__, items]
    return [type(value).__name__, repr(value)]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _value_identity(value: Any, active: list[int]) -> Any:
    """The identity of a value a loss holds (an argument of a ``partial``, a default, a
    closure cell, a global it reads): plain data and tensors by content, modules by name,
    library functions and classes by name, other functions by :func:`_callable_identity`."""
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return [type(value).__name__, repr(value)]
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise _Unidentifiable(f"it holds a {value.layout} tensor")
        return ["tensor", str(value.dtype), list(value.shape),
                hashlib.sha256(tensor_bytes(value)).hexdigest()]
    if isinstance(value, (torch.dtype, torch.device)):
        return [type(value).__name__, str(value)]
    if type(value) in (list, tuple):
        return [type(value).__name__, [_value_identity(v, active) for v in value]]
    if type(value) in (set, frozenset):
        return [type(value).__name__,
                sorted((_value_identity(v, active) for v in value), key=repr)]
    if type(value) is dict:
        return ["dict", sorted(([_value_identity(k, active), _value_identity(v, active)]
                                for k, v in value.items()), key=repr)]
    if isinstance(value, types.ModuleType):
        return ["module", value.__name__]
    if isinstance(value, type):
        if _is_library(value.__module__):
            return ["class", value.__module__, value.__qualname__]
        raise _Unidentifiable(f"it uses the class {value.__qualname__!r} defined outside a "
                              "library (its methods are not read)")
    if callable(value):
        return _callable_identity(value, active)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        array = numpy.ascontiguousarray(value)
        if array.dtype.hasobject:
            raise _Unidentifiable("it holds a NumPy array of Python objects")
        return ["numpy", str(array.dtype), list(array.shape),
                hashlib.sha256(array.tobytes()).hexdigest()]
    raise _Unidentifiable(f"it holds a {type(value).__module__}.{type(value).__qualname__} "
                          "object, whose state is not read")


def _callable_identity(fn: Any, active: list[int]) -> Any:
    """What a callable does, as plain data, or :class:`_Unidentifiable`.

    ``functools.partial``: its function, arguments and keywords, recursively. A Python
    function: its module and qualified name, its code (:func:`_code_identity`), defaults,
    keyword defaults, closure cells and the globals its code names (by value); functions of
    a library (:func:`_is_library`) and built-ins by module and qualified name. Anything
    else (a bound method, an ``nn.Module`` or other object with ``__call__``) is refused: its
    behaviour hangs on state this does not read."""
    if isinstance(fn, functools.partial):
        return ["partial", _callable_identity(fn.func, active),
                [_value_identity(a, active) for a in fn.args],
                sorted([k, _value_identity(v, active)] for k, v in fn.keywords.items())]
    if isinstance(fn, types.BuiltinFunctionType):  # also C methods (bound: __self__)
        owner = getattr(fn, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            raise _Unidentifiable(f"it is the method {fn.__qualname__!r} bound to a "
                                  f"{type(owner).__qualname__} object")
        return ["builtin", getattr(fn, "__module__", None) or getattr(owner, "__name__", ""),
                fn.__qualname__]
    if isinstance(fn, types.FunctionType):
        if _is_library(fn.__module__):
            return ["function", fn.__module__, fn.__qualname__]
        if id(fn) in active:  # recursion (a function reading itself as a global)
            return ["recursive", fn.__module__, fn.__qualname__]
        active.append(id(fn))
        try:
            code = fn.__code__
            cells = []
            for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
                try:
                    contents = cell.cell_contents
                except ValueError:  # an empty cell
                    cells.append([name, "<empty>"])
                    continue
                cells.append([name, _value_identity(contents, active)])
            globals_ = fn.__globals__
            read = [[name, _value_identity(globals_[name], active)]
                    for name in sorted(_global_names(code)) if name in globals_]
            return ["function", fn.__module__, fn.__qualname__, _code_identity(code),
                    _value_identity(fn.__defaults__, active),
                    _value_identity(fn.__kwdefaults__, active), cells, read]
        finally:
            active.pop()
    if isinstance(fn, types.MethodType):
        raise _Unidentifiable(f"it is the method {fn.__qualname__!r} bound to a "
                              f"{type(fn.__self__).__qualname__} object")
    raise _Unidentifiable(f"it is a {type(fn).__module__}.{type(fn).__qualname__} object, "
                          "whose state is not read")


def loss_identity(loss: Callable[..., Any]) -> str | None:
    """A digest of what a task's custom loss computes, or ``None`` where that cannot be told
    reliably (:func:`_callable_identity`: an object's or a bound method's state, a class
    defined outside a library, ...). Two losses of one qualified name but other arguments,
    defaults, closure values or code (``partial(ls, eps=0.0)`` and ``partial(ls, eps=0.9)``;
    two lambdas) get different digests."""
    try:
        return json_sha256(_callable_identity(loss, []))
    except _Unidentifiable:
        return None
    except RecursionError:
        return None


def loss_problems(tasks: Sequence[TaskSpec]) -> list[str]:
    """Why the custom losses of ``tasks`` cannot be identified (one line per such task)."""
    problems = []
    for task in tasks:
        if task.loss is None:
            continue
        try:
            _callable_identity(task.loss, [])
        except _Unidentifiable as why:
            problems.append(f"task {task.name!r}: {why}")
        except RecursionError:
            problems.append(f"task {task.name!r}: its values nest too deeply")
    return problems


def dataset_fingerprint(dataset: MultiTaskDataset) -> str:
    """SHA-256 over the data set's tensors (inputs, targets, ids, supervision) and task specs.
    Several inputs add each one's path (``[0]``, ``['mask']``) before its tensors, so that
    reordered or renamed inputs print differently; one input tensor adds nothing (the print of
    a tensor-input data set is what it always was). A task's custom loss adds its name and
    :func:`loss_identity` (``None`` for a loss that cannot be identified: the experiment then
    does not cache its models)."""
    digest = hashlib.sha256()
    inputs = named_leaves(dataset.inputs)
    for path, _ in inputs:
        digest.update(path.encode())
    for tensor in ([leaf for _, leaf in inputs] + [dataset.ids, dataset.supervision] +
                   [dataset.targets[n] for n in dataset.task_names]):
        digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    # The four defining fields, as dataclasses.astuple gave them before TaskSpec had a `loss`
    # (so that cached models keep their keys); a custom loss adds its name.
    digest.update(repr([tuple(t.describe().values()) for t in dataset.tasks]).encode())
    losses = [(t.name, loss_identity(t.loss)) for t in dataset.tasks if t.loss is not None]
    if losses:
        digest.update(repr(losses).encode())
    return digest.hexdigest()
