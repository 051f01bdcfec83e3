"""The argument types of the API: data as the caller gives it, and how parameters are
named for the shared/heads split."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch
from torch import nn

from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.inputs import Inputs
# The tasks (specs, names, or a mapping task -> kind): the data layer's, which gather reads too.
from mtunlearn_ext.data.task_forms import TasksSpec as TasksSpec


#: A data set: a :class:`MultiTaskDataset`, or ``(inputs, targets)`` / ``(inputs, targets,
#: supervision)`` with ``targets`` task -> ``[N, ...]`` and ``supervision`` ``[N, T]`` bool in
#: the order of ``tasks`` (default: every pair whose task has a target tensor and whose row
#: carries a label is supervised: a class label other than the task's ``ignore_index``, -1, a
#: dense map with a labelled pixel, any regression row; ``data.base.labelled_rows``).
#: ``inputs`` is ``[N, ...]``, or for a model with several inputs a tuple / list of ``[N, ...]``
#: tensors (the model is called ``model(*inputs)``) or a dict name -> ``[N, ...]``
#: (``model(**inputs)``): the first element is the inputs whatever its type, so
#: ``((ids, mask), targets)`` is unambiguous. These forms are :data:`InMemoryData`;
#: :func:`unlearn`, :func:`evaluate` and :func:`build_problem` also read a torch ``Dataset`` or
#: ``DataLoader`` of instances, through :func:`~mtunlearn_ext.data.gather` (named by the
#: ``"id"`` they carry, else by position).
InMemoryData = Union[MultiTaskDataset, tuple[Inputs, Mapping[str, torch.Tensor]],
                     tuple[Inputs, Mapping[str, torch.Tensor], torch.Tensor]]
DataLike = Union[InMemoryData, "torch.utils.data.Dataset[Any]",
                 "torch.utils.data.DataLoader[Any]"]


#: Parameters named, given, or held by modules: a head's or the trunk's parameters (also as
#: the ``(name, parameter)`` pairs of ``named_parameters()``); one module or one parameter
#: alone stands for itself.
ParameterSpec = Union[nn.Module, nn.Parameter, Iterable[Union[str, nn.Parameter, nn.Module,
                                                tuple[str, nn.Parameter]]]]
#: Which parameters are the shared trunk: names, the parameters themselves, modules, or a
#: predicate on the parameter's name.
SharedSpec = Union[ParameterSpec, Callable[[str], bool]]
