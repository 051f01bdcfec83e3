"""The library's own exception types, here where every layer can raise them without importing
the layer that catches them (the CLI turns :class:`UserInputError` into exit code 2)."""

from __future__ import annotations

__all__ = ["NonFiniteError", "OutputTakenError", "UnknownNameError", "UserInputError"]


class UnknownNameError(KeyError, ValueError):
    """A name, id or key that is none of the known ones (a task, a method, an instance id, a
    parameter): a ``KeyError``, the failed lookup it is, and a ``ValueError``, the bad argument
    it is to the caller, so that code catching either catches it. Its text is the message
    itself, where a plain ``KeyError`` shows its message quoted."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UserInputError(ValueError):
    """A bad user input: the message names the argument, what was expected and what came.

    The CLI turns it into exit code 2 and one line on stderr.
    """

    def __init__(self, argument: str, expected: str, received: object, hint: str = "") -> None:
        self.argument, self.expected, self.received = argument, expected, received
        self.hint = hint
        text = f"{argument}: expected {expected}, got {_short(received)}"
        super().__init__(text + (f"; {hint}" if hint else ""))


class OutputTakenError(UserInputError):
    """An output path that was free when reserved was taken before this run's write (another
    run wrote the same name meanwhile); nothing was written to it. A caller whose path is a
    default name picks the next free one and writes again."""


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss, gradient or parameter during a run; ``step`` is the 0-based step."""

    def __init__(self, step: int | None, where: str) -> None:
        self.step, self.where = step, where
        at = "before the first step" if step is None else f"at step {step}"
        super().__init__(f"non-finite values (NaN/Inf) {at}: {where}; the run was stopped and "
                         "nothing was written")


def _short(value: object, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message names what came, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + " ...'"
