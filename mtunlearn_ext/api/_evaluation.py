"""Metrics on the model and data as :func:`~mtunlearn_ext.unlearn` takes them:
:func:`evaluate` and :func:`uis_floor` (the UIS of the untouched model with unseen instances as
the forget set: how low a UIS can meaningfully go)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union, cast

import torch
from torch import nn

from mtunlearn_ext._text import listed_first
from mtunlearn_ext.api._data_forms import as_dataset, check_data_like, read_in
from mtunlearn_ext.api._instance_matching import rows_of_instances_in
from mtunlearn_ext.api._model_split import SplitModel, has_own_split
from mtunlearn_ext.api._task_specs import classes_predicted_by, task_specs, tasks_from_data
from mtunlearn_ext.api._types import DataLike, InMemoryData, TasksSpec
from mtunlearn_ext.api._unlearn import non_finite_parameters
from mtunlearn_ext.data.base import MultiTaskDataset, TASK_KINDS, TaskKind, TaskSpec
from mtunlearn_ext.data.inputs import describe, inputs_to, num_rows, take_rows
from mtunlearn_ext.metrics.evaluate import check_positive_int, device_of
from mtunlearn_ext.metrics.evaluate import evaluate as evaluate_metrics
from mtunlearn_ext.metrics.scores import Scores
from mtunlearn_ext.metrics.uis_floor import (
    UISFloor,
    WHAT_EACH_SPLIT_IS,
    shared_instances_error,
    uis_floor as _measure_uis_floor,
)
from mtunlearn_ext.models.base import MultiTaskModel, check_takes_task_names
from mtunlearn_ext.models.modes import measuring
from mtunlearn_ext.unlearning.base import ModelOutputError


def evaluate(model: nn.Module, data: DataLike, *,
             tasks: TasksSpec = None, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Task name -> metric name -> value of ``model`` on ``data``, over its supervised pairs
    (:func:`mtunlearn_ext.metrics.evaluate`'s metrics), with the model and data as
    :func:`unlearn` takes them: any module returning a mapping task -> output (called as
    ``unlearn`` calls it, several inputs unpacked), or a
    :class:`~mtunlearn_ext.models.MultiTaskModel`; data as a data set, a tuple ``(inputs,
    targets[, supervision])`` or a torch ``Dataset`` / ``DataLoader``. ``tasks`` as for
    ``unlearn`` (default: a data set's own, which its task names also stand for). The model
    is evaluated in eval mode without gradients and left as it was (its modules' modes and its
    buffers' values too, which a forward may write in eval mode); ``batch_size`` rows per
    forward pass. E.g. the forget rows
    before and after a request:
    ``evaluate(model, (x[ids], {t: y[t][ids] for t in y}), tasks=tasks)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"evaluate: `model` must be an nn.Module returning task -> output, got "
                        f"{type(model).__name__}")
    batch_size = check_positive_int(batch_size, "batch_size", "evaluate")
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise ValueError(f"evaluate: `model` has {len(on_meta)} tensor(s) on the meta device "
                         f"(first: {on_meta[0]}), which hold no values; load the trained "
                         "weights first")
    diverged = non_finite_parameters(model)
    if diverged:  # its outputs are NaN or Inf, and metrics of them read as plausible numbers
        raise ValueError(f"evaluate: `model` has NaN/Inf in {len(diverged)} parameter(s) "
                         f"(first: {diverged[0]}); its metrics would mean nothing")
    given_tasks = tasks_from_data(tasks, [data], "evaluate")
    data = cast(InMemoryData, read_in(data, given_tasks, "data", "evaluate"))
    check_data_like(data, "data", "evaluate")  # before the specs, which read its targets
    try:
        rows = num_rows(data.inputs if isinstance(data, MultiTaskDataset) else data[0])
    except (AttributeError, IndexError, TypeError):
        rows = None  # malformed inputs: refused, with their reason, by as_dataset
    if rows == 0:
        raise ValueError("evaluate: `data` has no rows: there is nothing to measure")
    own_split = has_own_split(model, None, None)
    specs = task_specs(given_tasks, [data],
                       classes_predicted_by(model, not own_split, data, given_tasks), ["data"],
                       op="evaluate")
    dataset = as_dataset(data, specs, "data", op="evaluate")
    dataset.check_values("evaluate: `data`")
    dataset.warn_of_negative_depths("evaluate: `data`")
    measured = cast(MultiTaskModel, model if own_split else SplitModel(model, (), {}))
    _probe(measured, dataset, batch_size)
    return evaluate_metrics(measured, dataset, batch_size=batch_size)


def _probe(model: MultiTaskModel, dataset: MultiTaskDataset, batch_size: int) -> None:
    """The metrics' first model call made alone (the same rows, tasks and device), so that a
    model that cannot take the data's inputs (another dtype, another shape) is named as such,
    not by torch's error alone from inside the metrics. Nothing else is asked of the model
    than the metrics ask."""
    check_takes_task_names(model, "evaluate")  # its own message, first
    names = dataset.task_names
    for start in range(0, len(dataset), batch_size):
        positions = torch.arange(start, min(start + batch_size, len(dataset)))
        supervised = dataset.supervision[positions].any(dim=0)
        wanted = [name for name, any_ in zip(names, supervised.tolist()) if any_]
        if wanted:
            break
    else:
        return  # nothing supervised: the metrics call nothing either
    inputs = take_rows(dataset.inputs, positions)
    try:
        with measuring(model):
            model(inputs_to(inputs, device_of(model)), wanted)
    except ModelOutputError as error:  # it ran: its output has the wrong type
        keys = ", ".join(f"{t!r}: ..." for t in wanted)
        raise ValueError(f"evaluate: `model` must return a mapping task -> prediction, got "
                         f"{error.type_name}: return a dict from its forward, {{{keys}}} (a "
                         "tuple or a list does not say which output is which task's)"
                         ) from error
    except torch.OutOfMemoryError:
        raise  # not the inputs' fault: a smaller batch_size may do
    except Exception as error:  # noqa: BLE001 - re-raised, named, with the cause kept
        raise ValueError(f"evaluate: `model` fails on the inputs of `data` (a batch of "
                         f"{describe(inputs)}): {type(error).__name__}: {error}") from error


#: What ``uis_floor``'s ``tasks`` may be: names (or specs) of the tasks UIS averages over, or, as
#: for :func:`unlearn`, a mapping task -> kind (or spec), which tuple data needs.
UISTasks = Union[Sequence[Union[TaskSpec, str]], Mapping[str, Union[TaskKind, TaskSpec]]]


_DATA_FORMS = ("a MultiTaskDataset or (inputs, targets[, supervision]) as mtunlearn_ext.unlearn "
               "takes them")


def _uis_floor_specs(model: nn.Module, tasks: UISTasks | None,
                     data: Sequence[tuple[str, Any]]) -> list[TaskSpec]:
    """The specs of ``tasks`` when some of the data come as tuples, which carry no task kinds:
    a mapping task -> kind (or spec) counts classes as :func:`unlearn` does; specs are taken as
    given; names are looked up in a split given as a :class:`MultiTaskDataset`."""
    datasets = [d for _, d in data if isinstance(d, MultiTaskDataset)]
    if isinstance(tasks, Mapping):
        first_tuple = next(d for _, d in data if not isinstance(d, MultiTaskDataset))
        unpack = not has_own_split(model, None, None)
        # Classes are counted on the tuples and on a data set holding every task (one that
        # lacks some is refused by name afterwards).
        counted = [(label, d) for label, d in data
                   if not isinstance(d, MultiTaskDataset) or set(tasks) <= set(d.task_names)]
        return task_specs(tasks, [d for _, d in counted],
                           classes_predicted_by(model, unpack, first_tuple, tasks),
                           [label for label, _ in counted], op="uis_floor")
    if tasks is not None and all(isinstance(t, TaskSpec) for t in tasks):
        return [cast(TaskSpec, t) for t in tasks]
    if not datasets:
        tuples = [label for label, _ in data]
        names = [t if isinstance(t, str) else t.name for t in tasks or []] or ["task"]
        example = ", ".join(f"{name!r}: 'classification'" for name in names)
        raise TypeError(f"uis_floor: {' and '.join(f'`{t}`' for t in tuples)} given as "
                        f"(inputs, targets) carry no task kinds, so `tasks` must give them: a "
                        f"mapping task -> kind (e.g. {{{example}}}; kinds: "
                        f"{', '.join(TASK_KINDS)}) or TaskSpecs, as for unlearn(); got {tasks!r}")
    known = datasets[0]  # `reference` when it is a data set (the order of `data`)
    names = (known.task_names if tasks is None
             else [t if isinstance(t, str) else t.name for t in tasks])
    unknown = [t for t in names if t not in known.task_names]
    if unknown:
        raise ValueError(f"uis_floor: unknown task(s) {unknown} (the tasks of the data set "
                         f"given: {known.task_names})")
    return [known.tasks[known.task_index(t)] for t in names]


def _uis_floor_check_kinds(data: Sequence[tuple[str, Any]],
                           tasks: Mapping[str, str | TaskSpec] | Sequence[TaskSpec]) -> None:
    """Refuse a split given as a data set that describes a task otherwise than ``tasks`` (a
    kind, or a whole TaskSpec), as :func:`unlearn` refuses it: the metric would read the
    data set's own description and score another kind of task than the one asked for."""
    given = tasks.items() if isinstance(tasks, Mapping) else [(s.name, s) for s in tasks]
    for label, value in data:
        if not isinstance(value, MultiTaskDataset):
            continue
        for name, want in given:
            if name not in value.task_names:
                raise ValueError(f"uis_floor: `{label}` has no task {name!r} (its tasks: "
                                 f"{value.task_names})")
            own = value.tasks[value.task_index(name)]
            if (own != want) if isinstance(want, TaskSpec) else (own.kind != want):
                raise ValueError(f"uis_floor: `{label}` describes task {name!r} as {own}, but "
                                 f"`tasks` as {want!r}; they must agree")


def uis_floor(model: nn.Module, reference: InMemoryData, unseen: InMemoryData,
              forget_size: int, *, tasks: UISTasks | None = None, draws: int = 200, seed: int = 0,
              batch_size: int = 64, original_test: Scores | None = None) -> UISFloor:
    """:func:`mtunlearn_ext.metrics.uis_floor` on the model and data as :func:`unlearn` takes
    them: the UIS of ``model`` left untouched, with random sets of ``forget_size`` unseen
    instances as the forget set (how low a UIS can meaningfully go).

    Args:
        model: the original model (evaluated, never modified): a
            :class:`~mtunlearn_ext.models.MultiTaskModel`, or any module returning a mapping
            task -> output, called as :func:`unlearn` calls it.
        reference: the split UIS compares with (the test split).
        unseen: instances ``model`` never trained on, from the forget set's distribution (a
            validation split, instances held back from training); never ``reference`` nor
            any of its instances (data sets compared by id, tuples by inputs and labels).
            Both: a :class:`~mtunlearn_ext.data.MultiTaskDataset` or ``(inputs, targets[,
            supervision])`` (:data:`InMemoryData`; a supervision mask's columns follow ``tasks``;
            targets of other tasks are left out).
        tasks: the tasks UIS averages over (the request's target tasks): names or TaskSpecs,
            or a mapping task -> kind as for :func:`unlearn`. Default: every task of
            ``reference`` when it is a data set, else of ``unseen`` (two tuples need
            ``tasks``). Tuples carry no kinds: then each task's kind comes from this mapping,
            from TaskSpecs, or from the other split when that is a data set; a split given as
            a data set must describe each task as ``tasks`` does.
        draws, seed, batch_size, original_test: as for
            :func:`mtunlearn_ext.metrics.uis_floor`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"uis_floor: `model` must be an nn.Module returning task -> output, got "
                        f"{type(model).__name__}")
    if isinstance(tasks, str):
        raise TypeError(f"uis_floor: `tasks` must be a list of task names, TaskSpecs or a "
                        f"mapping task -> kind, got the string {tasks!r} (write [{tasks!r}])")
    if tasks is not None and not len(tasks):
        raise ValueError("uis_floor: `tasks` is empty")
    data = [("reference", reference), ("unseen", unseen)]
    for label, value in data:
        if value is None:
            raise TypeError(f"uis_floor: `{label}` is None; expected {_DATA_FORMS}: "
                            f"{WHAT_EACH_SPLIT_IS[label]}")
    # Called model(inputs, tasks), as the metrics call a MultiTaskModel.
    measured = cast(MultiTaskModel, model if has_own_split(model, None, None)
                    else SplitModel(model, (), {}))
    if tasks is not None and (isinstance(tasks, Mapping)
                              or all(isinstance(t, TaskSpec) for t in tasks)):
        _uis_floor_check_kinds(data, cast(Union[Mapping[str, Union[str, TaskSpec]],
                                                Sequence[TaskSpec]], tasks))
    if all(isinstance(value, MultiTaskDataset) for _, value in data):
        return _measure_uis_floor(measured, cast(MultiTaskDataset, reference),
                                  cast(MultiTaskDataset, unseen), forget_size,
                                  tasks=None if tasks is None else list(tasks), draws=draws,
                                  seed=seed, batch_size=batch_size, original_test=original_test)
    for label, value in data:
        check_data_like(value, label, "uis_floor", reads_torch_data=False)
    specs = _uis_floor_specs(model, tasks, data)
    names = [spec.name for spec in specs]
    converted: list[MultiTaskDataset] = []
    for label, value in data:
        if not isinstance(value, MultiTaskDataset):
            # Only the measured tasks' targets: the data may carry every task of the model (as
            # for unlearn), and UIS averages over some of them. Ids past the other split's:
            # made-up ids name no instance, and the metric compares the splits' ids.
            own = cast(tuple, value)
            kept = {t: v for t, v in own[1].items() if t in names}
            other = unseen if label == "reference" else converted[0]
            past = (int(other.ids.max()) + 1 if isinstance(other, MultiTaskDataset)
                    and len(other) else 0)
            value = as_dataset(cast(InMemoryData, (own[0], kept, *own[2:])), specs, label,
                               id_offset=past, op="uis_floor")
        converted.append(value)
    _check_disjoint_rows(converted[0], converted[1], unseen is reference)
    return _measure_uis_floor(measured, converted[0], converted[1], forget_size, tasks=names,
                              draws=draws, seed=seed, batch_size=batch_size,
                              original_test=original_test)


def _check_disjoint_rows(reference: MultiTaskDataset, unseen: MultiTaskDataset,
                         same_object: bool) -> None:
    """Refuse ``unseen`` rows that are instances of ``reference``, where one of them came as
    a tuple: its ids were made here and name no instance, so rows are compared by content, as
    :func:`unlearn` compares such held-out data with the training data (equal inputs with
    equal labels are the same instance as far as the model can tell; equal inputs labelled
    otherwise are another one). One pass over each split's inputs, cheaper than the forward
    pass over ``unseen`` that the floor makes anyway."""
    equal = rows_of_instances_in(unseen, reference)
    if equal:
        raise shared_instances_error(
            len(equal), f"`unseen` rows [{listed_first([row for row, _ in equal], 5)}] have "
            f"the inputs and labels of `reference` rows "
            f"[{listed_first([row for _, row in equal], 5)}]; "
            "a split given as (inputs, targets) carries no ids, so rows are compared by "
            "content", same_object)
