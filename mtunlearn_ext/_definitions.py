"""What the registries (methods, forgetting objectives, benchmarks) take for one definition."""

from __future__ import annotations

import inspect

__all__ = ["defined_name", "same_definition"]


def same_definition(a: object, b: object) -> bool:
    """Whether ``a`` and ``b`` are one object, or the same function or class defined again
    (equal module and qualified name: a reloaded module, a re-run notebook cell, autoreload).
    Other callables (``functools.partial``, instances with ``__call__``) are the same only as
    one object: their module and name say nothing of what they hold."""
    if a is b:
        return True
    definitions = (inspect.isfunction(a) or inspect.isclass(a)) and (
        inspect.isfunction(b) or inspect.isclass(b))
    return definitions and (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


def defined_name(obj: object) -> str:
    """``module.qualname`` of a function or class, else the object's ``repr``."""
    qualname = getattr(obj, "__qualname__", None)
    if qualname is None:
        return repr(obj)
    return f"{getattr(obj, '__module__', '?')}.{qualname}"
