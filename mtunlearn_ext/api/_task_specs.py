"""Task specs from ``tasks`` given by kind: the number of classes counted on the
supervised labels, checked against what the model predicts (dimension 1 of its output). The
task forms themselves are the data layer's (:mod:`mtunlearn_ext.data.task_forms`, which
:func:`~mtunlearn_ext.data.gather` reads too); this module asks the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.inputs import call_with, inputs_to, num_rows, take_rows
from mtunlearn_ext.data.task_forms import keyed_spec, reading_specs, task_specs, tasks_from_data
from mtunlearn_ext.models.modes import ignoring_compile, measuring

__all__ = ["classes_predicted_by", "keyed_spec", "reading_specs", "task_specs",
           "tasks_from_data"]


@torch.no_grad()
def classes_predicted_by(model: nn.Module, unpack: bool, data: Any,
                       tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec]
                       ) -> dict[str, int]:
    """Task -> the size of dimension 1 of the model's prediction (its number of classes), for
    each classification or segmentation task given by kind only, from one eval-mode forward of
    the first two rows of ``data``. Empty when the forward fails: the problem's validation
    then reports that failure with the whole context."""
    if not isinstance(tasks, Mapping):
        return {}
    wanted = [name for name, kind in tasks.items()
              if kind in ("classification", "segmentation")]
    if not wanted or data is None:
        return {}
    try:
        inputs = data.inputs if isinstance(data, MultiTaskDataset) else data[0]
        rows = take_rows(inputs, torch.arange(min(2, num_rows(inputs))))
        param = next(model.parameters(), None)
        if param is not None:
            rows = inputs_to(rows, param.device)
    except Exception:  # malformed inputs: refused with a clear message further on
        return {}
    try:
        with measuring(model), ignoring_compile():  # a probe: its compile would be thrown away
            out = call_with(model, rows) if unpack else model(rows)
    except Exception:
        return {}
    if not isinstance(out, Mapping):
        return {}
    return {name: int(out[name].shape[1]) for name in wanted
            if isinstance(out.get(name), torch.Tensor) and out[name].dim() >= 2}
