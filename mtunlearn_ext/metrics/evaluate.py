"""Evaluation of a multi-task model on the supervised pairs of a data set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.inputs import inputs_to, take_rows
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.metrics.task_metrics import make_accumulator
from mtunlearn_ext.models.base import MultiTaskModel, check_takes_task_names, device_of
from mtunlearn_ext.models.modes import measuring

__all__ = ["evaluate", "evaluate_splits", "per_sample_task_losses"]


def _resolve(dataset: MultiTaskDataset, tasks: Sequence[TaskSpec | str] | None
             ) -> list[tuple[int, TaskSpec]]:
    """``(supervision column, spec)`` of each requested task."""
    names = dataset.task_names if tasks is None else [t if isinstance(t, str) else t.name
                                                      for t in tasks]
    return [(dataset.task_index(n), dataset.tasks[dataset.task_index(n)]) for n in names]


def check_positive_int(value: object, name: str, caller: str) -> int:
    """``value`` as a Python int >= 1 (NumPy's integers too); ``ValueError`` (``caller: `name`
    must be an integer >= 1, got ...``) for anything else, a bool or ``2.0`` included."""
    number = integer_value(value)
    if number is None or number < 1:
        raise ValueError(f"{caller}: `{name}` must be an integer >= 1, got {value!r}")
    return number


def evaluate(model: MultiTaskModel, dataset: MultiTaskDataset,
             tasks: Sequence[TaskSpec | str] | None = None, batch_size: int = 64
             ) -> dict[str, dict[str, float]]:
    """Task name -> metric name -> value, over the *supervised* pairs of ``dataset`` only.

    Each task's metrics pool the rows whose supervision bit for that task is set (see
    :mod:`mtunlearn_ext.metrics.task_metrics` for the formulas); a task with no supervised row is
    left out of the result (a partial-task forget set, for instance, has only target tasks). The
    model runs in eval mode without gradients and is put back in its previous mode, its
    buffers' values too (:func:`~mtunlearn_ext.models.modes.measuring`).
    """
    batch_size = check_positive_int(batch_size, "batch_size", "evaluate")
    check_takes_task_names(model, "evaluate")
    resolved = _resolve(dataset, tasks)
    accumulators = {spec.name: make_accumulator(spec) for _, spec in resolved}
    device = device_of(model)
    with measuring(model):
        for start in range(0, len(dataset), batch_size):
            positions = torch.arange(start, min(start + batch_size, len(dataset)))
            sup = dataset.supervision[positions]
            wanted = [(c, s) for c, s in resolved if bool(sup[:, c].any())]
            if not wanted:
                continue
            out = model(inputs_to(take_rows(dataset.inputs, positions), device),
                        [s.name for _, s in wanted])
            for column, spec in wanted:
                rows = sup[:, column].to(device)
                target = dataset.targets[spec.name][positions].to(device)
                accumulators[spec.name].update(out[spec.name][rows], target[rows])
    return {name: acc.compute() for name, acc in accumulators.items() if acc.count > 0}


def evaluate_splits(model: MultiTaskModel, splits: Mapping[str, MultiTaskDataset],
                    tasks: Sequence[TaskSpec | str] | None = None, batch_size: int = 64
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """Split name -> :func:`evaluate` of that split (e.g. ``{"forget", "retain", "test"}``)."""
    return {name: evaluate(model, ds, tasks, batch_size) for name, ds in splits.items()}


def per_sample_task_losses(model: MultiTaskModel, dataset: MultiTaskDataset,
                           tasks: Sequence[TaskSpec | str] | None = None, batch_size: int = 64
                           ) -> torch.Tensor:
    """``[N, T]`` float64: :func:`~mtunlearn_ext.losses.task_loss` of every row and task, NaN
    where the pair is not supervised (columns follow ``tasks``, default the data set's)."""
    batch_size = check_positive_int(batch_size, "batch_size", "per_sample_task_losses")
    resolved = _resolve(dataset, tasks)
    losses = torch.full((len(dataset), len(resolved)), float("nan"), dtype=torch.double)
    device = device_of(model)
    with measuring(model):
        for start in range(0, len(dataset), batch_size):
            positions = torch.arange(start, min(start + batch_size, len(dataset)))
            rows = dataset.batch(positions)  # neutral targets on unsupervised pairs
            out = model(inputs_to(take_rows(dataset.inputs, positions), device),
                        [s.name for _, s in resolved])
            for k, (column, spec) in enumerate(resolved):
                target = rows["targets"][spec.name].to(device)  # type: ignore[index]
                # Half-precision outputs in float32 first: losses rounded to 3 digits would tie
                # (the membership attack ranks them).
                pred = out[spec.name]
                pred = pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred
                value = task_loss(spec, pred, target).double().cpu()
                sup = dataset.supervision[positions, column]
                losses[positions, k] = torch.where(sup, value, torch.tensor(float("nan"),
                                                                             dtype=torch.double))
    return losses
