"""Eval mode for a block of work, with every module's own mode back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


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
