"""The public function whose checks are running, for their messages: :func:`build_problem`
runs :func:`unlearn`'s checks, and its errors and warnings name ``build_problem``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ENTRY: ContextVar[str] = ContextVar("mtunlearn_ext_api_entry", default="unlearn")


def entry() -> str:
    """The name the running checks' messages start with (``unlearn`` unless entered)."""
    return _ENTRY.get()


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Messages of the checks run inside start with ``name``."""
    token = _ENTRY.set(name)
    try:
        yield
    finally:
        _ENTRY.reset(token)
