"""The task forms a caller may give (``tasks`` of :func:`~mtunlearn_ext.unlearn`,
:func:`~mtunlearn_ext.data.gather` and the other entry points) and the task specs they stand for:
specs, task names (looked up in a :class:`MultiTaskDataset` given as data), or a mapping task ->
kind, whose class counts are read from the supervised labels, or given by what a model
predicts (``predicted_classes``: the API measures it; this layer knows no model)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union, cast

import torch

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext._fields import choice_of
from mtunlearn_ext.data.base import TASK_KINDS, MultiTaskDataset, TaskKind, TaskSpec

__all__ = ["TasksSpec", "keyed_spec", "reading_specs", "task_specs", "tasks_from_data"]

#: The tasks: specs, or a mapping task -> kind (``"classification"``, ...); left out
#: (``None``), or as task names, they are read from the :class:`MultiTaskDataset` given as
#: data, which carries its tasks' specs.
TasksSpec = Union[Sequence[Union[TaskSpec, str]], Mapping[str, Union[TaskKind, TaskSpec]], str,
                  None]


def tasks_from_data(tasks: object, datasets: Sequence[Any], op: str
                    ) -> Sequence[TaskSpec] | Mapping[str, str | TaskSpec]:
    """``tasks`` as specs or a mapping task -> kind. Left out (``None``) or given as task
    names, they are read from the first :class:`MultiTaskDataset` among ``datasets``, which
    carries its tasks' specs (names must list every task of the data set, once each, in any
    order; the data set's order is kept, and a TaskSpec given replaces its task's); data given
    as tuples or torch data sets carry no task kinds, so there ``tasks`` must give them."""
    if isinstance(tasks, Mapping):
        return tasks
    if isinstance(tasks, TaskSpec):
        return [tasks]
    if tasks is not None and not isinstance(tasks, str) and (
            isinstance(tasks, bytes) or not isinstance(tasks, Iterable)):
        raise TypeError(f"{op}: `tasks` must be TaskSpecs or a mapping task -> kind, got "
                        f"{type(tasks).__name__}")
    given = None if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    if given is not None and all(isinstance(t, TaskSpec) for t in given):
        return cast(list[TaskSpec], given)
    if given is not None and not all(isinstance(t, (str, TaskSpec)) for t in given):
        odd = next(t for t in given if not isinstance(t, (str, TaskSpec)))
        raise TypeError(f"{op}: `tasks` must be TaskSpecs, task names or a mapping task -> "
                        f"kind, got an element of type {type(odd).__name__}")
    carrier = next((d for d in datasets if isinstance(d, MultiTaskDataset)), None)
    if carrier is None:
        what = "`tasks` is needed" if given is None else "task names alone are not enough"
        raise TypeError(f"{op}: {what} for data given as tuples or torch data sets, which carry "
                        "no task kinds: pass a mapping task -> kind ({'label': "
                        "'classification', ...}) or TaskSpecs (names alone need a "
                        "MultiTaskDataset, whose specs they pick)")
    if given is None:
        return list(carrier.tasks)
    names = [t if isinstance(t, str) else t.name for t in given]
    unknown = [n for n in names if n not in carrier.task_names]
    if unknown:
        raise ValueError(f"{op}: `tasks` names {unknown}, not tasks of the data (its tasks: "
                         f"{carrier.task_names})")
    left_out = [n for n in carrier.task_names if n not in names]
    if left_out or len(names) != len(set(names)):
        raise ValueError(f"{op}: `tasks` names {names}; given as names, they must be the data "
                         f"set's tasks, each once: {carrier.task_names} (its supervision has "
                         "a column for each; the target tasks of a request are its own)")
    by_name = {t.name: t for t in given if isinstance(t, TaskSpec)}
    return [by_name.get(n, spec) for n, spec in zip(carrier.task_names, carrier.tasks)]


def keyed_spec(name: object, spec: TaskSpec, op: str) -> TaskSpec:
    """``spec``, given in a ``tasks`` mapping under ``name``: refused unless that is its name
    (the key names the targets, the spec the task: the two would disagree silently)."""
    if spec.name != name:
        raise ValueError(f"{op}: `tasks` maps {name!r} to a TaskSpec named {spec.name!r}; a "
                         "TaskSpec's name must be its key")
    return spec


def reading_specs(tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec], op: str
                  ) -> list[TaskSpec]:
    """Specs to read labels with (:func:`~mtunlearn_ext.data.gathering._gather`), before the
    classes of a task given by kind are counted (:func:`task_specs`, on what was read). Reading
    needs only each task's kind and "no label" value; a task given by kind has the default
    one, and its class count here is a placeholder no label can exceed."""
    if not isinstance(tasks, Mapping):
        return list(cast(Iterable[TaskSpec], tasks))
    specs = []
    for name, kind in tasks.items():
        task_kind = _spec_or_kind(name, kind, op)
        if isinstance(task_kind, TaskSpec):
            specs.append(task_kind)
            continue
        counted = task_kind in ("classification", "segmentation")
        specs.append(TaskSpec(str(name), task_kind, num_classes=2**62 if counted else None))
    return specs


def _spec_or_kind(name: str, kind: str | TaskSpec, op: str) -> TaskSpec | TaskKind:
    """A mapping's entry for task ``name``: its spec (keyed by ``name``), or its kind, checked
    against :data:`TASK_KINDS`."""
    if isinstance(kind, TaskSpec):
        return keyed_spec(name, kind, op)
    task_kind = choice_of(kind, TASK_KINDS)
    if task_kind is None:
        raise ValueError(f"{op}: task {name!r} has unknown kind {kind!r}; kinds: {TASK_KINDS}")
    return task_kind


def task_specs(tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec],
               datasets: Sequence[Any], predicted_classes: Mapping[str, int] | None,
               data_names: Sequence[str] | None = None, *, op: str) -> list[TaskSpec]:
    """The specs of ``tasks`` (as :func:`tasks_from_data` gives them) over ``datasets`` (data
    sets or tuples; ``None`` entries skipped): specs as they are; a task given by kind gets
    a spec of that kind, a classification or segmentation task's number of classes being
    ``predicted_classes``' (task -> the size of the model's dimension 1; ``None``: no model
    to ask, as for :func:`~mtunlearn_ext.data.gather`) or else one past its largest supervised
    label. ``data_names`` name ``datasets`` in errors; ``op``, the caller's function."""
    if not isinstance(tasks, Mapping):
        specs = list(tasks)
        if not all(isinstance(s, TaskSpec) for s in specs):
            raise TypeError(f"{op}: `tasks` must be TaskSpecs or a mapping task -> kind")
        return specs
    specs = []
    for name, kind in tasks.items():
        task_kind = _spec_or_kind(name, kind, op)
        if isinstance(task_kind, TaskSpec):
            specs.append(task_kind)
            continue
        num_classes = None
        if task_kind in ("classification", "segmentation"):
            # The number of classes, when not given as a TaskSpec: the model's (a class that no
            # supervised pair has is still one of them), else one past the largest label of a
            # supervised pair (an unsupervised pair's target may hold anything).
            labels = [_supervised_labels(d, name, len(tasks), list(tasks).index(name))
                      for d in datasets if d is not None and (
                          isinstance(d, MultiTaskDataset) or name in d[1])]
            labels = [t for t in labels if t.numel()]
            given = [d for d in datasets if d is not None and not isinstance(d, MultiTaskDataset)]
            if not labels and given and all(name not in d[1] for d in given):
                raise UnknownNameError(
                    f"{op}: task {name!r} of `tasks` has no targets in the data (whose targets "
                    f"are for {sorted(given[0][1])}); the names of `tasks` must be the targets' "
                    "keys")
            predicted = None if predicted_classes is None else predicted_classes.get(name)
            if not labels and predicted is None:
                model = ("" if predicted_classes is None else ", and the model's output gave no "
                         "count (dimension 1 of its prediction)")
                raise ValueError(f"{op}: task {name!r} ({kind}) has no supervised label to "
                                 f"count its classes from{model}; pass a TaskSpec with "
                                 "num_classes")
            num_classes = int(max(int(t.max()) for t in labels)) + 1 if labels else 0
            if predicted is not None:
                if num_classes > predicted:
                    first = _first_label_from(datasets, data_names, name, len(tasks),
                                              list(tasks).index(name), predicted)
                    raise ValueError(f"{op}: task {name!r} ({kind}) has class labels up to "
                                     f"{num_classes - 1} ({first}), but the model predicts "
                                     f"{predicted} "
                                     f"classes for it (dimension 1 of its output); labels must "
                                     f"lie in [0, {predicted}), or -1 where unlabelled (another "
                                     f"value for that: TaskSpec({name!r}, {kind!r}, "
                                     f"num_classes={predicted}, ignore_index=...))")
                num_classes = predicted
        specs.append(TaskSpec(name, task_kind, num_classes=num_classes))
    return specs


def _first_label_from(datasets: Sequence[Any], data_names: Sequence[str] | None, name: str,
                      num_tasks: int, column: int, limit: int) -> str:
    """How many supervised labels of task ``name`` are at or above ``limit`` over ``datasets``,
    and where the first is, in the words of the problem's row checks: "first: `train_data` row
    17" (the data set's id too)."""
    count, first = 0, ""
    for position, data in enumerate(datasets):
        if data is None or not (isinstance(data, MultiTaskDataset) or name in data[1]):
            continue
        labels, supervised = _labels_and_supervision(data, name, num_tasks, column)
        if not len(labels):
            continue
        bad = supervised & (labels.reshape(len(labels), -1) >= limit).any(dim=1)
        count += int(bad.sum())
        if not first and bool(bad.any()):
            row = int(bad.nonzero()[0])
            what = f"`{data_names[position]}`" if data_names else "the data"
            ids = f", id {int(data.ids[row])}" if isinstance(data, MultiTaskDataset) else ""
            first = f"first: {what} row {row}{ids}"
    if not count:
        return "no supervised row found"
    return f"{count} supervised {'row' if count == 1 else 'rows'}, {first}"


def _labels_and_supervision(data: Any, name: str, num_tasks: int, column: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``name``'s labels in ``data`` (a data set, or a tuple whose optional third element
    is the ``[N, T]`` supervision mask) and which rows are supervised (``[N]`` bool)."""
    if isinstance(data, MultiTaskDataset):
        return data.targets[name], data.supervision[:, data.task_index(name)].to(torch.bool)
    labels = data[1][name]
    if len(data) == 3 and data[2].shape[1] == num_tasks:
        return labels, data[2][:, column].to(torch.bool)
    return labels, torch.ones(len(labels), dtype=torch.bool, device=labels.device)


def _supervised_labels(data: Any, name: str, num_tasks: int, column: int) -> torch.Tensor:
    """The labels of task ``name`` on the supervised pairs of ``data``."""
    labels, supervised = _labels_and_supervision(data, name, num_tasks, column)
    return labels[supervised]
