"""Eval mode for a block of work, with every module's own mode back afterwards, and the
buffers' values kept across forwards made only to measure or check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import torch
from torch import nn

__all__ = ["BuffersKept", "eval_mode", "measuring"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, then each module's previous mode: a model whose modules
    were in mixed modes (a frozen BatchNorm in eval inside a training model) comes back as it
    was, which ``model.train(was_training)`` would not do. Forward passes made only to measure
    or check (no dropout draw, no running-statistics update) run inside it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class BuffersKept:
    """The values of a module tree's buffers when made; :meth:`restore` (or leaving a ``with``
    block) puts them back, in the same tensors (a buffer replaced by another tensor is put back
    too; one resized in place is replaced by its saved copy). A forward that writes buffers
    even in eval mode (a quantisation observer's min/max, a call counter) would otherwise
    change a model that was only measured."""

    def __init__(self, model: object) -> None:
        modules = model.modules() if isinstance(model, nn.Module) else ()  # refused later
        self._saved = [(module, name, buffer, buffer.detach().clone())
                       for module in modules
                       for name, buffer in module._buffers.items() if buffer is not None]

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, buffer, value in self._saved:
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    module._buffers[name] = value  # resized in place: the saved copy instead
                    continue
                if module._buffers.get(name) is not buffer:
                    module._buffers[name] = buffer
                if not torch.equal(buffer, value):
                    buffer.copy_(value)

    def __enter__(self) -> BuffersKept:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.restore()


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Forwards made only to measure or check: eval mode (:func:`eval_mode`), no gradients,
    and every buffer's value back afterwards (:class:`BuffersKept`)."""
    with BuffersKept(model), eval_mode(model), torch.no_grad():
        yield
