"""The library's own exception types."""

from __future__ import annotations

__all__ = ["UnknownNameError"]


class UnknownNameError(KeyError, ValueError):
    """A name, id or key that is none of the known ones (a task, a method, an instance id, a
    parameter): a ``KeyError``, the failed lookup it is, and a ``ValueError``, the bad argument
    it is to the caller, so that code catching either catches it. Its text is the message
    itself, where a plain ``KeyError`` shows its message quoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()
