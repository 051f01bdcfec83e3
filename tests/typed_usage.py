"""A user's code as a type checker reads it: checked by ``scripts/typecheck.sh`` (listed in
mypy.ini's ``files``), never run. The package's top-level names are loaded lazily (module
``__getattr__``, typed ``object``), so without the package's ``TYPE_CHECKING`` imports a
user's checker refused ``mtunlearn_ext.unlearn(...)`` as "object not callable"."""

from __future__ import annotations

from typing import assert_type

import torch

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest, TaskSpec
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.unlearning.base import UnlearningReport


def typed_usage(model: torch.nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]) -> None:
    spec = TaskSpec("kind", "classification", num_classes=3)
    assert_type(spec, TaskSpec)
    request = ForgetRequest.create(range(10), ["kind"])
    assert_type(request, ForgetRequest)
    new_model, report = mtunlearn_ext.unlearn(model, tasks=[spec], train_data=(x, y),
                                              forget_request=request)
    assert_type(new_model, torch.nn.Module)
    assert_type(report, UnlearningReport)
    assert_type(mtunlearn_ext.data.MultiTaskDataset, type[MultiTaskDataset])
    mtunlearn_ext.save_unlearned(new_model, report, "unlearned.pt", original=model)
