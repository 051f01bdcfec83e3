"""Layers with running statistics (BatchNorm and kin) in unlearning.

A BatchNorm layer holds, besides its parameters, running means and variances of its inputs
over the training batches: state that remembers the training data (the forget instances
included) and that no gradient step can edit. It also breaks two things the unlearning steps
need when it runs in training mode: each sample's output depends on the other samples of its
batch (there are no per-sample gradients of a batch-normalised forward), and every forward
pass, the forget batches' included, writes its batch's statistics into the buffers.

So the step loop runs the model in eval mode by default (``StepConfig.train_mode``): a
BatchNorm layer then normalises with its stored statistics and nothing is written, and
dropout is off, so the steps are deterministic. After the steps,
:func:`recalibrate_running_statistics` recomputes the running statistics from the retain data
alone, under the unlearned weights (``StepConfig.recalibrate_norms``), so they no longer carry
the forget instances' contribution. Models without such layers (the project's own use
GroupNorm) compute the same in both modes and have nothing to recalibrate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.inputs import Inputs, inputs_to
from mtunlearn_ext.models.modes import eval_mode

__all__ = [
    "check_samples_independent",
    "recalibrate_running_statistics",
    "running_statistics_modules",
]


def running_statistics_modules(model: nn.Module) -> list[tuple[str, _NormBase]]:
    """``(name, module)`` of every layer that keeps running statistics (BatchNorm, and
    InstanceNorm with ``track_running_stats=True``)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            and m.running_mean is not None]


def check_samples_independent(model: nn.Module, caller: str) -> None:
    """Raise if a layer's training-mode forward makes one sample's output depend on the others
    of its batch or writes running statistics (a ``_BatchNorm`` in training mode, or any norm
    layer updating running statistics): per-sample gradients are then undefined."""
    prefix = getattr(model, "wrapped_prefix", "")
    for wrapped_name, module in model.named_modules():
        name = wrapped_name.removeprefix(prefix)
        if not isinstance(module, _NormBase):
            continue
        if isinstance(module, _BatchNorm) and module.running_mean is None:
            # Without running statistics a BatchNorm uses the batch's in eval mode too.
            raise ValueError(
                f"{caller}: layer {name!r} ({type(module).__name__}) keeps no running "
                "statistics (track_running_stats=False), so it normalises with the batch's "
                "statistics in eval mode too, and a sample's gradient depends on the rest of "
                "its batch: per-sample gradients are undefined for this model.")
        if not module.training:
            continue
        if isinstance(module, _BatchNorm) or module.track_running_stats:
            raise ValueError(
                f"{caller}: layer {name!r} ({type(module).__name__}) is in training mode, where "
                "it normalises with the batch's statistics and writes running statistics, so a "
                "sample's gradient depends on the rest of its batch. Run the steps in eval mode "
                "(the default `train_mode=False`), or put that layer in eval mode.")


@contextmanager
def _collecting(modules: list[_NormBase]) -> Iterator[None]:
    """Those layers in training mode from reset buffers; the modes and momenta are restored
    after (the caller sets each batch's momentum: :func:`_equal_weight_momentum`)."""
    saved = [(m.training, m.momentum) for m in modules]
    try:
        for m in modules:
            m.reset_running_stats()
            m.train()
        yield
    finally:
        for m, (training, momentum) in zip(modules, saved):
            m.momentum = momentum
            m.train(training)


def _equal_weight_momentum(modules: list[_NormBase], batch: int) -> None:
    """Set the momentum that makes batch ``batch`` (0-based) of a pass weigh as much as each
    earlier one: ``1 / (batch + 1)``, a cumulative average. ``momentum=None`` means that only to
    BatchNorm: InstanceNorm reads it as 0 and never updates its running statistics, which the
    recalibration then left at their reset values (mean 0, variance 1)."""
    for m in modules:
        m.momentum = 1.0 / (batch + 1)


@torch.no_grad()
def recalibrate_running_statistics(model: nn.Module, data: MultiTaskDataset, batch_size: int,
                                   device: torch.device | str = "cpu",
                                   generator: torch.Generator | None = None) -> int:
    """Recompute every running mean and variance of ``model`` from ``data`` alone.

    The buffers are reset, then each layer averages (with equal weights) the statistics of
    ``ceil(N / batch_size)`` batches of near-equal size (sizes differing by at most one row, so
    no batch has a single row), drawn without replacement in a random order of the rows, in one
    no-grad forward pass with those layers in training mode and every other module in eval mode
    (no dropout), as BatchNorm's running estimates arise in training (from shuffled batches),
    but from the retained instances only. Every module's mode and momentum are restored.

    The order is random because the average of the batches' variances estimates the data's
    variance only for batches that sample the data alike: a data set stored in order (by scene,
    class or time) cut into consecutive batches gives each batch a narrow slice of it, and the
    recomputed variance then misses the spread between batches (a feature sorted over 256 rows
    came out 0.049 instead of 3.04 in batches of 32, and the layer scaled it up 8-fold).

    Args:
        generator: draws the order (default: a new CPU generator seeded with 0, so the result
            depends on the arguments alone, never on the global random state).

    Returns:
        The rows used: ``len(data)``, or 0 when the model has no such layer or ``data`` has fewer
        than two rows (then nothing changes: one row has no variance).
    """
    modules = [m for _, m in running_statistics_modules(model)]
    rows = len(data)
    if not modules or rows < 2:
        return 0
    if batch_size < 1:
        raise ValueError(f"recalibrate_running_statistics: `batch_size` must be >= 1, got "
                         f"{batch_size}")
    # At most rows // 2 batches: none of them a single row (no variance; BatchNorm refuses it).
    batches = max(1, min(-(-rows // batch_size), rows // 2))
    bounds = [rows * i // batches for i in range(batches + 1)]
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    order = torch.randperm(rows, generator=generator)
    with eval_mode(model), _collecting(modules):
        for batch, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            _equal_weight_momentum(modules, batch)
            inputs: Inputs = data.batch(order[start:stop])["input"]  # type: ignore[assignment]
            model(inputs_to(inputs, device))
    return rows
