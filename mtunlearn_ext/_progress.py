"""How far a long call has got, for a caller that shows it somewhere of its own (the demo's
stage bar, fed from its worker processes).

Work that loops reports the fraction it has done with :func:`report`; a caller that wants it
installs a callback with :func:`reporting_to`, and a caller that runs several pieces of work in
a row gives each a slice of its own range with :func:`within`. Nested calls compose: a training
run inside the third of five methods reports 0 to 1 and the callback sees 0.4 to 0.6. With no
callback installed (every call outside the demo) :func:`report` costs one context-variable
read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["report", "reporting_to", "within"]

#: The callback and the part [begin, end] of its range that the current work fills.
_SCOPE: ContextVar[tuple[Callable[[float], None], float, float] | None] = ContextVar(
    "mtunlearn_progress", default=None)


def report(fraction: float) -> None:
    """Say that the current work is ``fraction`` (0 to 1, clamped) done."""
    scope = _SCOPE.get()
    if scope is not None:
        callback, begin, end = scope
        callback(begin + (end - begin) * min(max(fraction, 0.0), 1.0))


@contextmanager
def reporting_to(callback: Callable[[float], None]) -> Iterator[None]:
    """Send the fractions reported inside the block to ``callback`` (a number from 0 to 1)."""
    token = _SCOPE.set((callback, 0.0, 1.0))
    try:
        yield
    finally:
        _SCOPE.reset(token)


@contextmanager
def within(begin: float, end: float) -> Iterator[None]:
    """Map the block's fractions 0..1 onto ``begin``..``end`` of the enclosing work's, and
    report ``end`` when the block finishes (work that reports nothing still moves the bar)."""
    scope = _SCOPE.get()
    if scope is None:
        yield
        return
    callback, outer_begin, outer_end = scope
    width = outer_end - outer_begin
    token = _SCOPE.set((callback, outer_begin + width * begin, outer_begin + width * end))
    try:
        yield
    finally:
        _SCOPE.reset(token)
    report(end)
