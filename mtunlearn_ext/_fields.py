"""Type checks of configuration dataclasses against their field annotations, so that a
setting of the wrong type (``steps=1.5``, ``coupled="yes"``, ``lr="1e-3"``) is refused with the
field's name instead of being half-used or failing deep inside a run."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import operator
import sys
import types
import typing
from typing import Any, TypeVar

__all__ = ["check_field_types", "choice_of", "integer_value", "unknown_fields"]

#: A closed set of strings, typed as a ``Literal`` (``Literal["sgd", "adam"]``).
C = TypeVar("C", bound=str)


def choice_of(value: object, choices: tuple[C, ...]) -> C | None:
    """The member of ``choices`` equal to ``value`` (a string: from YAML, the command line),
    typed as the choice set, so that a type checker reads it as the ``Literal`` its
    destination wants; ``None`` when there is none (the caller refuses it in its own
    words)."""
    if not isinstance(value, str):
        return None
    return next((choice for choice in choices if choice == value), None)


def integer_value(value: object) -> int | None:
    """``value`` as the Python int it stands for, or ``None`` (the caller refuses it in its own
    words): a Python int, a NumPy integer (``np.int64(3)``, as indexing an array or
    ``np.random.randint`` gives) or a 0-d integer array or tensor, which is what
    ``operator.index`` takes. Arguments are stored as that plain int: records are JSON.

    Refused: a bool of any kind (``True`` would count as 1; torch's ``__index__`` takes a bool
    tensor for 0 or 1), a float even when it is whole (``2.0``: the argument checks have
    always refused it, as the config fields do), and a tensor with dimensions (torch's
    ``__index__`` takes any one-element tensor, ``[[3]]`` too)."""
    if isinstance(value, bool) or getattr(value, "ndim", 0) != 0 or _is_bool_tensor(value):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _is_bool_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")  # no tensor made without torch loaded
    return torch is not None and isinstance(value, torch.Tensor) and value.dtype == torch.bool


def unknown_fields(config_class: type, keys: collections.abc.Iterable[str]
                   ) -> tuple[list[str], list[str]]:
    """(the ``keys`` that are no field of the dataclass ``config_class``, in their order; its
    field names, in declaration order): what a refusal of settings built from a mapping
    names, before ``config_class(**values)`` would say only "unexpected keyword argument"."""
    known = [f.name for f in dataclasses.fields(config_class)]
    return [k for k in keys if k not in known], known


def check_field_types(config: Any) -> None:
    """Raise ``ValueError`` naming the first field of the dataclass instance ``config`` whose
    value does not fit its annotation (``Class: `field` must be an integer, got 1.5``).

    A NumPy scalar (``np.int64(2)``, as indexing an array or a grid gives) is first replaced by
    the Python number it holds, in place (frozen dataclasses too): it is checked as that, and
    the records and reports, written as JSON, hold plain numbers."""
    hints = _annotations(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _is_numpy_scalar(value):
            value = value.item()
            object.__setattr__(config, f.name, value)
        if not _has_type(value, hints.get(f.name, Any)):
            raise ValueError(f"{type(config).__name__}: `{f.name}` must be "
                             f"{_describe_type(hints[f.name])}, got {value!r}"
                             f"{_number_text_hint(value, hints[f.name])}")


def _number_text_hint(value: Any, annotation: Any) -> str:
    """Why a number may have come as text, where a number was wanted: YAML 1.1 (PyYAML) reads
    ``1e-3`` and ``3.0e5`` (an exponent without a dot or without a sign) as strings (user
    review)."""
    if not isinstance(value, str) or not _has_type(1.5, annotation):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number):  # (YAML's are .nan and .inf; such a setting is refused anyway)
        return ""
    if "e" not in value.lower():
        return " (text, not a number: leave out the quotes)"
    return (f" (text, not a number: YAML 1.1 reads an exponent as a number only with a dot "
            f"and a sign, {_yaml_float(value)}; elsewhere leave out the quotes)")


def _yaml_float(text: str) -> str:
    """``1e-3`` -> ``1.0e-3``, ``3e5`` -> ``3.0e+5``: the form YAML 1.1 reads as a float."""
    mantissa, _, exponent = text.strip().lower().partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    if not exponent.startswith(("+", "-")):
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}"


def _is_numpy_scalar(value: Any) -> bool:
    numpy = sys.modules.get("numpy")  # no array made without NumPy loaded: none to convert
    return numpy is not None and isinstance(value, numpy.generic) and isinstance(
        value, (numpy.number, numpy.bool_))


def _annotations(cls: type) -> dict[str, Any]:
    """The resolved field annotations of ``cls``; a field whose annotation names something its
    module imports for type checkers only is left out (not checked)."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        pass
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        namespace = vars(sys.modules[klass.__module__]) if klass.__module__ in sys.modules else {}
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            try:
                hints[name] = (eval(annotation, dict(namespace))  # noqa: S307 (own annotations)
                               if isinstance(annotation, str) else annotation)
            except NameError:
                hints.pop(name, None)
    return hints


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a config field's annotation: ``bool``, ``int`` (not a bool),
    ``float`` (an int or float, not a bool), ``str``, a ``Literal``, a mapping or sequence
    (outer type only), a union of those (``X | None``); anything else is not checked."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        # A choice's own type too: `in` alone took np.array("sgd") or np.array(["sgd"]) (their
        # == is elementwise, one True is truthy) for 'sgd', which the `str` field refused.
        return any(isinstance(value, type(choice))
                   and isinstance(value, bool) == isinstance(choice, bool)
                   and value == choice for choice in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    return True


def _describe_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(arm) for arm in typing.get_args(annotation))
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return (repr(choices[0]) if len(choices) == 1
                else "one of " + ", ".join(repr(a) for a in choices))
    if annotation is type(None):
        return "None"
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return "a list" if origin in (list, tuple, collections.abc.Sequence) else str(annotation)
