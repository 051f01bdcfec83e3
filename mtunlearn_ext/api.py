"""``mtunlearn_ext.unlearn``: unlearn a request on your own multi-task model and data.

One call wraps everything the registry's methods need: the split of the model's parameters into
a shared trunk and per-task heads, the forget / retain data in the project's data contract
(:class:`~mtunlearn_ext.data.MultiTaskDataset` with a supervision mask), the problem, and the
method (the interference-aware unlearner by default, or any registered baseline). The input
model is never modified; a new one is returned with a report.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union, cast

import torch
from torch import nn

from mtunlearn_ext._io import atomic_torch_save, sha256_of_file
from mtunlearn_ext.data.base import TASK_KINDS, MultiTaskDataset, TaskSpec, labelled_rows
from mtunlearn_ext.data.gathering import _gather
from mtunlearn_ext.data.inputs import (
    Inputs,
    call_with,
    check_inputs,
    inputs_to,
    map_leaves,
    named_leaves,
    num_rows,
    take_rows,
)
from mtunlearn_ext.data.request import ForgetRequest
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.metrics.evaluate import check_positive_int
from mtunlearn_ext.metrics.evaluate import evaluate as evaluate_metrics
from mtunlearn_ext.metrics.membership import membership_attack
from mtunlearn_ext.metrics.scores import Scores
from mtunlearn_ext.metrics.uis_floor import WHAT_EACH_SPLIT_IS, UISFloor
from mtunlearn_ext.metrics.uis_floor import uis_floor as _measure_uis_floor
from mtunlearn_ext.models.base import MultiTaskModel, ParameterSplit
from mtunlearn_ext.models.modes import eval_mode
from mtunlearn_ext.records import code_version, run_environment, utc_now
from mtunlearn_ext.training import TrainConfig, state_dict_sha256
from mtunlearn_ext.unlearning import (
    GradientUnlearner,
    Unlearner,
    UnlearnerConfig,
    UnlearningProblem,
    UnlearningReport,
    get_unlearner,
)
from mtunlearn_ext.unlearning.base import ModelOutputError

__all__ = ["API_RECORD_SCHEMA", "DataLike", "SavedCheck", "build_problem", "evaluate",
           "save_unlearned", "state_dict_sha256", "uis_floor", "unlearn", "verify_saved"]

#: A data set: a :class:`MultiTaskDataset`, or ``(inputs, targets)`` / ``(inputs, targets,
#: supervision)`` with ``targets`` task -> ``[N, ...]`` and ``supervision`` ``[N, T]`` bool in
#: the order of ``tasks`` (default: every pair whose task has a target tensor and whose row
#: carries a label is supervised: a class label other than the task's ``ignore_index``, -1, a
#: dense map with a labelled pixel, any regression row; ``data.base.labelled_rows``).
#: ``inputs`` is ``[N, ...]``, or for a model with several inputs a tuple / list of ``[N, ...]``
#: tensors (the model is called ``model(*inputs)``) or a dict name -> ``[N, ...]``
#: (``model(**inputs)``): the first element is the inputs whatever its type, so
#: ``((ids, mask), targets)`` is unambiguous. :func:`unlearn` also reads a torch ``Dataset`` or
#: ``DataLoader`` of instances, through :func:`~mtunlearn_ext.data.gather` (named by the
#: ``"id"`` they carry, else by position).
DataLike = Union[MultiTaskDataset, tuple[Inputs, Mapping[str, torch.Tensor]],
                 tuple[Inputs, Mapping[str, torch.Tensor], torch.Tensor]]

#: Which parameters are the shared trunk: names, the parameters themselves, or a predicate on
#: the parameter's name.
#: Parameters named, given, or held by modules: a head's or the trunk's parameters.
ParameterSpec = Union[nn.Module, Iterable[Union[str, nn.Parameter, nn.Module]]]
SharedSpec = Union[ParameterSpec, Callable[[str], bool]]


class _SplitModel(nn.Module):
    """A user's module with an explicit shared/heads split (what the unlearners read), whose
    forward returns a plain ``dict`` of task outputs. The user's module is held as ``module``,
    so the unlearned module is ``wrapper.module``. The library passes a batch's inputs along
    as one object; here, at the user's module, several inputs are unpacked (``module(*x)``
    for a tuple, ``module(**x)`` for a dict).

    The wrapper has no mode of its own: its ``training`` is the user's module's (setting it
    sets that module's flag, as ``train()`` / ``eval()`` do on every module below), so code
    that saves and restores ``wrapper.training`` restores what the user's module had."""

    #: What the wrapper puts before the user's names; messages drop it (the user's module has
    #: no `module.` in its names).
    wrapped_prefix = "module."

    def __init__(self, module: nn.Module, shared: Sequence[str],
                 heads: Mapping[str, Sequence[str]]) -> None:
        super().__init__()
        self.module = module
        self._split = ParameterSplit(tuple(f"module.{n}" for n in shared),
                                     {t: tuple(f"module.{n}" for n in names)
                                      for t, names in heads.items()})

    @property
    def training(self) -> bool:
        module = self.__dict__.get("_modules", {}).get("module")
        if module is None:  # inside nn.Module.__init__, before the user's module is held
            return bool(self.__dict__.get("_training", True))
        return bool(module.training)

    @training.setter
    def training(self, mode: bool) -> None:
        module = self.__dict__.get("_modules", {}).get("module")
        if module is None:
            self.__dict__["_training"] = mode
        else:
            module.training = mode

    def forward(self, x: Inputs, tasks: Sequence[str] | None = None
                ) -> dict[str, torch.Tensor]:
        # ``tasks`` (the evaluation's task subset) is a hint a plain module cannot take: every
        # output is returned and callers pick theirs.
        out = call_with(self.module, x)
        if not isinstance(out, Mapping):
            raise ModelOutputError(type(out).__name__)
        return dict(out)

    def parameter_split(self) -> ParameterSplit:
        return self._split

    def __getattr__(self, name: str) -> Any:
        # A method's code sees this wrapper as ``ctx.model``: what it reaches for on the
        # user's module (``model.heads[t]``, ``model.trunk``) is that module's own attribute.
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__"):
                raise
            try:
                return getattr(module, name)
            except AttributeError:
                raise AttributeError(
                    f"neither the unlearning wrapper nor the wrapped {type(module).__name__} "
                    f"has an attribute {name!r}; a method reads the parameter split from "
                    "`ctx.groups` (`shared`, `heads[task]`: (name, parameter) pairs) or "
                    "`model.parameter_split()` (names)") from None


def _owners(model: nn.Module) -> dict[str, list[list[str]]]:
    """Each parameter's name in ``named_parameters()`` (the first it is reachable under) -> the
    modules that hold it, each as every name it is reachable under through that module. One
    module held in two places (a head also listed in a ``ModuleList``) is one owner with two
    names; a weight tied between two modules (``head.weight = embed.weight``) has two owners."""
    first = {id(p): n for n, p in model.named_parameters()}
    owners: dict[str, dict[int, list[str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                full = f"{module_name}.{name}" if module_name else name
                owners.setdefault(first[id(p)], {}).setdefault(id(module), []).append(full)
    return {n: list(by_module.values()) for n, by_module in owners.items()}


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name -> every name it is reachable under (:func:`_owners`)."""
    return {n: [alias for names in owners for alias in names]
            for n, owners in _owners(model).items()}


def _names_of(model: nn.Module, items: ParameterSpec, what: str) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    canonical = {alias: n for n, names in _aliases(model).items() for alias in names}
    names: list[str] = []  # in the order given, each once (a list may name one twice)
    if isinstance(items, nn.Module):
        items = [items]
    for item in items:
        if isinstance(item, nn.Module):  # a submodule stands for every parameter it holds
            outside = [n for n, p in item.named_parameters() if id(p) not in by_id]
            if outside:
                raise KeyError(f"unlearn: a module in `{what}` ({type(item).__name__}) holds "
                               f"parameters that are not the model's: {outside[:3]}; pass a "
                               f"submodule of the model")
            names.extend(by_id[id(p)] for p in item.parameters())
        elif isinstance(item, str):
            if item not in canonical:
                raise KeyError(f"unlearn: `{what}` names {item!r}, which is not a parameter of "
                               f"the model")
            names.append(canonical[item])
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise KeyError(f"unlearn: a tensor in `{what}` is not a parameter of the model")
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"unlearn: `{what}` must hold names, parameters or modules, got "
                            f"{type(item).__name__}")
    return list(dict.fromkeys(names))


def _has_own_split(model: nn.Module, shared: SharedSpec | None,
                   heads: Mapping[str, ParameterSpec] | None) -> bool:
    """The model is used as it is (no :class:`_SplitModel` around it, so it receives a
    batch's inputs as one object): it has ``parameter_split()`` and no split is given."""
    return shared is None and heads is None and callable(getattr(model, "parameter_split", None))


def _split_model(model: nn.Module, task_names: Sequence[str], shared: SharedSpec | None,
                 heads: Mapping[str, ParameterSpec] | None) -> nn.Module:
    """The model itself when it already exposes ``parameter_split()`` and no split is given,
    else a :class:`_SplitModel` around it."""
    if _has_own_split(model, shared, heads):
        return model
    if shared is None and heads is None:
        raise ValueError("unlearn: say which parameters are shared: pass `shared_parameters` "
                         "(names, parameters, modules, or a predicate on names), or use a model "
                         "with `parameter_split()` (a mtunlearn_ext MultiTaskModel)")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(shared, nn.Module):  # callable, but its parameters are meant, not a predicate
        shared = [shared]
    if shared is not None and not callable(shared) and (
            isinstance(shared, (str, bytes)) or not isinstance(shared, Iterable)):
        raise TypeError(f"unlearn: `shared_parameters` must be names, parameters, modules or a "
                        f"predicate on names, got {type(shared).__name__}")
    owners = _owners(model)
    aliases = {n: [a for names in held for a in names] for n, held in owners.items()}
    if shared is None:
        shared_names: list[str] = []
    elif callable(shared):
        # A weight that the trunk and a head both hold (two modules, tied) is shared when the
        # predicate takes either module's name: every task reaches it through the trunk. A
        # module merely held in two places is judged by its first name, as before.
        shared_names = [n for n in trainable if any(shared(names[0]) for names in owners[n])]
    else:
        shared_names = _names_of(model, shared, "shared_parameters")
    if heads is not None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"unlearn: `head_parameters` must be a mapping task -> names or "
                            f"parameters, got {type(heads).__name__}")
        unknown = [t for t in heads if t not in task_names]
        if unknown:
            raise ValueError(f"unlearn: `head_parameters` has key(s) {unknown} that are not "
                             f"tasks; its keys must be tasks of `tasks`: {list(task_names)}")
        head_names = {t: _names_of(model, heads[t], f"head_parameters[{t!r}]")
                      for t in task_names if t in heads}
    else:
        head_names = _heads_by_name(model, task_names, trainable, shared_names)
    assigned = set(shared_names) | {n for names in head_names.values() for n in names}
    stray = [n for n in trainable if n not in assigned]
    if stray:
        raise ValueError(f"unlearn: parameters neither shared nor in a head: {stray}; pass "
                         f"`head_parameters` (task -> names) or widen `shared_parameters`")
    overlap = set(shared_names) & {n for names in head_names.values() for n in names}
    if overlap:
        tied = {n: aliases[n] for n in sorted(overlap) if len(aliases[n]) > 1}
        raise ValueError(f"unlearn: parameters both shared and in a head: {sorted(overlap)}"
                         + (f" (tied: one parameter under the names {tied}; a parameter the "
                            "trunk uses is shared, so leave it out of `head_parameters`)"
                            if tied else ""))
    missing = [t for t in task_names if t not in head_names]
    for t in missing:
        head_names[t] = []
    # Frozen parameters belong to no group (they never move); the split lists trainable ones.
    return _SplitModel(model, shared_names, head_names)


def _tasks_named_in(name: str, task_names: Sequence[str]) -> list[str]:
    """The tasks whose name is a component of the parameter name ``name``: of its modules'
    path first, its own attribute name only where no module is named after a task. A task
    called ``weight`` or ``bias`` would otherwise also claim ``heads.age.weight``, which then
    sat in two heads and in none."""
    *path, own = name.split(".")
    return ([t for t in task_names if t in path]
            or [t for t in task_names if t == own])


def _heads_by_name(model: nn.Module, task_names: Sequence[str], trainable: Sequence[str],
                   shared_names: Sequence[str]) -> dict[str, list[str]]:
    """The default split's heads: a parameter belongs to the head of task t when one component
    of its dotted name is t (``heads.depth.0.weight``, ``depth.weight``).

    A parameter reachable under several names (a module held in two places, a tied weight)
    counts under every name: one in the heads of two tasks is refused unless it is shared (in
    a single head, the other task's forget gradient would never reach it and nothing would
    protect it as shared), and so is one also reachable outside every head (a head's weight
    tied to the trunk's embedding: every task uses it, so it is shared)."""
    held_by = _owners(model)
    shared = set(shared_names)
    head_names: dict[str, list[str]] = {t: [] for t in task_names}
    for n in trainable:
        if n in shared:
            continue
        owners: dict[str, str] = {}  # task -> the first name placing the parameter in its head
        outside: list[str] = []  # the first name of each holding module outside every head
        for names in held_by.get(n, [[n]]):
            in_head = False
            for alias in names:
                found = _tasks_named_in(alias, task_names)
                if len(found) == 1:
                    owners.setdefault(found[0], alias)
                in_head = in_head or bool(found)
            if not in_head:
                outside.append(names[0])
        if len(owners) > 1:
            (task, name), (other, other_name) = list(owners.items())[:2]
            raise ValueError(
                f"unlearn: parameter {n!r} is in the heads of both {task!r} (as {name!r}) and "
                f"{other!r} (as {other_name!r}): one module serves both heads, so both tasks use "
                f"it; a parameter several tasks use is shared: list it in `shared_parameters`")
        if owners and outside:
            (task, name), = owners.items()
            raise ValueError(
                f"unlearn: parameter {n!r} is tied between the head of {task!r} (as {name!r}) "
                f"and {outside[0]!r}, outside every head: every task that uses {outside[0]!r} "
                f"reaches it, so it is shared: list {outside[0]!r} in `shared_parameters`")
        if owners:
            head_names[next(iter(owners))].append(n)
    return head_names


@torch.no_grad()
def _predicted_classes(model: nn.Module, unpack: bool, data: Any,
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
        with eval_mode(model):
            out = call_with(model, rows) if unpack else model(rows)
    except Exception:
        return {}
    if not isinstance(out, Mapping):
        return {}
    return {name: int(out[name].shape[1]) for name in wanted
            if isinstance(out.get(name), torch.Tensor) and out[name].dim() >= 2}


def _task_specs(tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec],
                datasets: Sequence[Any], predicted_classes: Mapping[str, int],
                data_names: Sequence[str] | None = None, *, op: str = "unlearn"
                ) -> list[TaskSpec]:
    if not isinstance(tasks, Mapping):
        specs = list(tasks)
        if not all(isinstance(s, TaskSpec) for s in specs):
            raise TypeError(f"{op}: `tasks` must be TaskSpecs or a mapping task -> kind")
        return specs
    specs = []
    for name, kind in tasks.items():
        if isinstance(kind, TaskSpec):
            specs.append(kind)
            continue
        if kind not in TASK_KINDS:
            raise ValueError(f"{op}: task {name!r} has unknown kind {kind!r}; kinds: "
                             f"{TASK_KINDS}")
        num_classes = None
        if kind in ("classification", "segmentation"):
            # The number of classes, when not given as a TaskSpec: the model's (a class that no
            # supervised pair has is still one of them), else one past the largest label of a
            # supervised pair (an unsupervised pair's target may hold anything).
            labels = [_supervised_labels(d, name, len(tasks), list(tasks).index(name))
                      for d in datasets if d is not None and (
                          isinstance(d, MultiTaskDataset) or name in d[1])]
            labels = [t for t in labels if t.numel()]
            given = [d for d in datasets if d is not None and not isinstance(d, MultiTaskDataset)]
            if not labels and given and all(name not in d[1] for d in given):
                raise ValueError(f"{op}: task {name!r} of `tasks` has no targets in the data "
                                 f"(whose targets are for {sorted(given[0][1])}); the names of "
                                 "`tasks` must be the targets' keys")
            if not labels:
                raise ValueError(f"{op}: task {name!r} ({kind}) has no supervised label to "
                                 "count its classes from; pass a TaskSpec with num_classes")
            num_classes = int(max(int(t.max()) for t in labels)) + 1
            predicted = predicted_classes.get(name)
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
        specs.append(TaskSpec(name, kind, num_classes=num_classes))  # type: ignore[arg-type]
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


def _read_in(data: object, tasks: object, what: str, op: str = "unlearn", *,
             keep_ids: bool = False) -> object:
    """A torch ``Dataset`` or ``DataLoader`` given as ``what``, read into memory by
    :func:`~mtunlearn_ext.data.gather`; other data as it is. Instances that carry no ``"id"``
    are named by position, ``0..N-1`` (a map-style dataset's indices), as a tuple's rows are,
    and come back as a tuple. With ``keep_ids``, instances (or a loader's batches) that carry
    an ``"id"`` come back as a :class:`MultiTaskDataset` with those ids, so that they name the
    instances as a data set's own ids do (its tasks are placeholders when ``tasks`` gives
    kinds: :func:`_with_tasks` puts the real ones in); without, the ids are dropped (a caller
    that names no instance, such as :func:`evaluate`). A loader's rows are put in the order of
    their ids: a shuffling loader reads them in a random order, which would otherwise change
    the run (minibatches are drawn by row) with the global random state."""
    if isinstance(data, MultiTaskDataset) or not isinstance(
            data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return data
    if isinstance(tasks, Mapping):
        # Reading labels needs only each task's kind and "no label" value; a task given by
        # kind has the default one, and its classes are counted on the tuple afterwards, as
        # for any tuple. The count here is a placeholder no label can exceed.
        specs = [kind if isinstance(kind, TaskSpec) else TaskSpec(
            str(name), kind, num_classes=None if kind not in ("classification", "segmentation")
            else 2**62) for name, kind in tasks.items()]
    else:
        specs = list(cast(Iterable[TaskSpec], tasks))
    try:
        read, own_ids = _gather(data, specs)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{op}: `{what}`: {error}") from None
    if not (keep_ids and own_ids):
        return (read.inputs, read.targets, read.supervision)
    if isinstance(data, torch.utils.data.DataLoader):
        order = torch.argsort(read.ids)
        read = MultiTaskDataset(take_rows(read.inputs, order),
                                {t: v[order] for t, v in read.targets.items()}, read.tasks,
                                read.ids[order], read.supervision[order])
    return read


def _with_tasks(data: object, specs: Sequence[TaskSpec]) -> object:
    """A data set :func:`_read_in` made (with the ids its instances carry) with the task specs
    the problem uses, in place of the placeholders it was read with; ``data`` as it is
    otherwise (a tuple). Never for the caller's own data set: its specs must agree with
    ``tasks``, and are checked against them."""
    if not isinstance(data, MultiTaskDataset) or data.tasks == list(specs):
        return data
    return MultiTaskDataset(data.inputs, data.targets, specs, data.ids, data.supervision)


def _names_instances(what: str, given: object, own_ids: bool, count: int) -> str:
    """How the caller's ``what`` (``given``, as passed; ``own_ids``: read with ids of the
    caller's) names its ``count`` instances, for messages: by a data set's ``ids``, by the
    ``"id"`` a torch dataset's instances (a loader's batches) carry, else by row."""
    if isinstance(given, MultiTaskDataset):
        return f"`{what}` (a MultiTaskDataset) names its {count} instances by its `ids`"
    if not isinstance(given, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return f"`{what}`, given as (inputs, targets), names its {count} instances by row"
    items = "batches" if isinstance(given, torch.utils.data.DataLoader) else "instances"
    if own_ids:
        return (f"`{what}` (a {type(given).__name__} whose {items} carry an 'id') names its "
                f"{count} instances by those ids")
    return (f"`{what}` (a {type(given).__name__} whose {items} carry no 'id') names its "
            f"{count} instances by position")


def _check_data_like(data: object, what: str, op: str = "unlearn") -> None:
    """Refuse, naming ``what``, a ``data`` that is neither a :class:`MultiTaskDataset` nor
    ``(inputs, targets[, supervision])`` with ``targets`` a mapping: ``(ids, mask, targets)``,
    several inputs not grouped into one tuple, would otherwise read ``mask`` as the targets."""
    if isinstance(data, MultiTaskDataset):
        return
    if not isinstance(data, tuple) or len(data) not in (2, 3):
        hint = ""
        if isinstance(data, list) and len(data) in (2, 3):
            hint = f"; got a list: pass it as a tuple, `tuple({what})`"
        elif isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
            hint = (f"; got a {type(data).__name__}: read it into memory first, "
                    f"mtunlearn_ext.data.gather({what}, tasks=[TaskSpec(...), ...])")
        raise TypeError(f"{op}: `{what}` must be a MultiTaskDataset or (inputs, targets"
                        f"[, supervision]){hint}")
    if not isinstance(data[1], Mapping):
        raise TypeError(f"{op}: `{what}`[1] must be the targets, a mapping task -> "
                        f"[N, ...] tensor, got {type(data[1]).__name__}; several inputs go "
                        f"in one tuple or dict: ((ids, mask), targets)")
    for name, value in data[1].items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            got = type(value).__name__ if not isinstance(value, torch.Tensor) else "a 0-d tensor"
            raise TypeError(f"{op}: `{what}` targets of task {name!r} must be a tensor "
                            f"[N, ...] (one row per instance), got {got}")
    if len(data) == 3:
        mask = data[2]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
            got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise TypeError(f"{op}: `{what}`[2], the supervision mask, must be a bool tensor "
                            f"[N, T] (one column per task, in the order of `tasks`), got {got}")


def _as_dataset(data: DataLike, specs: Sequence[TaskSpec], what: str,
                like: MultiTaskDataset | None = None, id_offset: int = 0, *,
                op: str = "unlearn") -> MultiTaskDataset:
    """``data`` in the data contract. Tasks without a target tensor get an all-unsupervised
    placeholder column shaped like ``like``'s (for a forget set listing only target tasks)."""
    if isinstance(data, MultiTaskDataset):
        if data.task_names != [s.name for s in specs]:
            raise ValueError(f"{op}: `{what}` has tasks {data.task_names}, expected "
                             f"{[s.name for s in specs]}")
        for own, spec in zip(data.tasks, specs):
            # The losses follow `tasks`, the targets and their checks the data set's specs.
            if own != spec:
                raise ValueError(f"{op}: `{what}` describes task {spec.name!r} as {own}, but "
                                 f"`tasks` as {spec}; they must agree")
        return data
    _check_data_like(data, what, op)
    inputs, targets = data[0], dict(data[1])
    n = check_inputs(inputs, f"{op}: the inputs of `{what}`")
    names = [s.name for s in specs]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise KeyError(f"{op}: `{what}` has targets for unknown tasks {unknown}; the tasks "
                       f"are {names}")
    supervision = data[2] if len(data) == 3 else None
    given_order = [t for t in targets if t in names]
    if supervision is not None and given_order != [t for t in names if t in targets]:
        # The mask's columns follow `tasks`; targets written in another order leave it unclear
        # which order the mask was built in, and a mask built in the targets' order would
        # silently supervise the wrong pairs.
        raise ValueError(f"{op}: `{what}` has targets in the order {given_order} but `tasks` "
                         f"in the order {[t for t in names if t in targets]}; its supervision "
                         f"mask's columns follow `tasks`: write the targets (and the mask's "
                         f"columns) in the order of `tasks`")
    full_targets: dict[str, torch.Tensor] = {}
    columns = []
    for spec in specs:
        if spec.name in targets:
            full_targets[spec.name] = targets[spec.name]
            columns.append(True)
        elif like is not None:
            ref = like.targets[spec.name]
            full_targets[spec.name] = torch.zeros((n, *ref.shape[1:]), dtype=ref.dtype)
            columns.append(False)
        else:
            raise KeyError(f"{op}: `{what}` has no targets for task {spec.name!r}")
    if supervision is not None and isinstance(supervision, torch.Tensor) \
            and supervision.dim() == 2 and supervision.shape[1] == len(specs):
        # A placeholder column has no labels to supervise: marked supervised, it would invent
        # zeros as labels.
        invented = [spec.name for spec, given in zip(specs, columns)
                    if not given and bool(supervision[:, names.index(spec.name)].any())]
        if invented:
            raise ValueError(f"{op}: `{what}`'s supervision marks pairs of {invented} "
                             "supervised, but it has no targets for them")
    if supervision is None:
        # A row written as "no label" (a -1 class, a map without a labelled pixel) is no pair.
        supervision = torch.stack(
            [labelled_rows(spec, full_targets[spec.name]).cpu()
             if given and full_targets[spec.name].shape[0] == n  # else refused just below
             else torch.full((n,), given, dtype=torch.bool) for spec, given in zip(specs, columns)],
            dim=1) if specs else torch.ones(n, 0, dtype=torch.bool)
    ids = torch.arange(id_offset, id_offset + n)
    return MultiTaskDataset(inputs, full_targets, specs, ids, supervision)


_PRINT_CHUNK_BYTES = 1 << 26


def _row_fingerprints(x: torch.Tensor) -> list[tuple[float, ...]]:
    """One print per row of ``x``: the sum of its values' float64 bit patterns (as integers,
    modulo 2**64) and its first and last values. Equal rows have equal prints, in any dtype
    (every value is read as float64, which holds the other float dtypes and integers up to
    2**53 exactly); rows with equal prints are then compared exactly.

    Integer sums are exact, so a row's print does not depend on how many rows ``x`` has, its
    layout, the thread count or the device: a float sum did (two threads split a long row's
    reduction otherwise when it is alone, so a held-out row equal to a training row of 300k
    values could get another print and pass unnoticed). ``-0.0`` is counted as ``0.0``, which
    it equals. The rows are read in chunks of at most 64 MiB of float64 (a non-contiguous input
    is copied a chunk at a time, not whole)."""
    n = len(x)
    width = x[:1].numel()
    if width == 0:
        return [()] * n
    step = max(1, _PRINT_CHUNK_BYTES // (width * 8))
    prints: list[tuple[float, ...]] = []
    for start in range(0, n, step):
        # float64 + 0.0: one dtype for every input, -0.0 as +0.0, a new contiguous tensor.
        chunk = x[start:start + step].reshape(-1, width).to(torch.float64) + 0.0
        prints.extend(zip(chunk.view(torch.int64).sum(1, dtype=torch.int64).tolist(),
                          chunk[:, 0].tolist(), chunk[:, -1].tolist()))
    return prints


def _row_prints(tensors: list[torch.Tensor]) -> list[tuple[float, ...]]:
    """One input: its rows' prints; several: their prints joined, so that a print matches only
    where every input does."""
    per_leaf = [_row_fingerprints(leaf) for leaf in tensors]
    return [tuple(v for part in row for v in part) for row in zip(*per_leaf)]


def _equal_input_rows(inputs: Inputs, reference: Inputs, reference_rows: torch.Tensor,
                      also: Callable[[int, int], bool] | None = None
                      ) -> list[tuple[int, int]]:
    """``(row, reference row)`` for every row of ``inputs`` whose inputs equal those of one of
    ``reference``'s ``reference_rows`` (the first such for which ``also(row, reference row)``
    holds, when given), by row prints and then an exact comparison: one pass over each side,
    not every pair. Several inputs are matched by name (a dict's keys, a tuple's positions) and
    must all be equal; inputs named or shaped differently never are."""
    named, ref_named = dict(named_leaves(inputs)), dict(named_leaves(reference))
    if named.keys() != ref_named.keys():
        return []
    names = sorted(named)
    own, ref = [named[k] for k in names], [ref_named[k] for k in names]
    if any(a.shape[1:] != b.shape[1:] for a, b in zip(own, ref)):
        return []
    if not len(own[0]) or not reference_rows.numel():
        return []
    ref_prints = _row_prints(ref)
    by_print: dict[tuple[float, ...], list[int]] = {}
    for row in reference_rows.tolist():
        by_print.setdefault(ref_prints[row], []).append(row)
    found = []
    for row, key in enumerate(_row_prints(own)):
        for ref_row in by_print.get(key, []):
            if (all(torch.equal(a[row], b[ref_row].to(a.device)) for a, b in zip(own, ref))
                    and (also is None or also(row, ref_row))):
                found.append((row, ref_row))
                break
    return found


def _same_labels(data: MultiTaskDataset, row: int, other: MultiTaskDataset, other_row: int
                 ) -> bool:
    """Whether two rows supervise a task in common and agree on every task they both
    supervise: with equal inputs, the same (input, label) pairs, so the same instance as far as
    the model can tell."""
    common = 0
    for task in data.task_names:
        if task not in other.task_names:
            continue
        if not (bool(data.supervision[row, data.task_index(task)])
                and bool(other.supervision[other_row, other.task_index(task)])):
            continue
        common += 1
        mine, theirs = data.targets[task][row], other.targets[task][other_row]
        if not torch.equal(mine, theirs.to(mine.device)):
            return False
    return common > 0


@dataclass(frozen=True)
class _Trained:
    """Training rows as the caller gave them, for the checks that held-out and audit data are
    unseen: ``label`` is the argument (``train_data``, ``forget_data``, ``retain_data``),
    ``data`` its data set (its row positions are the argument's rows), ``rows`` the positions
    the model trained on (a row of ``train_data`` with no supervised pair is in neither set),
    ``own_ids`` whether the ids are the caller's (a data set's) or made by :func:`unlearn`
    (``0..N-1`` for a tuple, which name no instance of the caller's)."""

    label: str
    data: MultiTaskDataset
    rows: torch.Tensor
    own_ids: bool


@dataclass(frozen=True)
class _Naming:
    """How the caller names the request's instances, for the report: ``named_by`` (its
    ``ids_named_by``), ``ids`` the ids its ``ids_sha256`` hashes (``None``: the request's own,
    which are already the caller's), and ``own_held_out`` whether the problem's held-out ids
    are the caller's (not made by :func:`unlearn`), which decides how audit data is compared
    with them; ``earlier`` the requests removed before this one (``earlier_requests``) and
    ``excluded_pairs`` how many pairs of ``train_data`` they took out of the retain set."""

    named_by: str
    ids: list[int] | None
    own_held_out: bool = False
    earlier: tuple[ForgetRequest, ...] = ()
    excluded_pairs: int = 0
    lineage: _Lineage | None = None


def _ids_named_by(what: str, given: object, own_ids: bool) -> str:
    """The report's ``ids_named_by`` for the request's ids coming from ``what`` (``given``, as
    passed; ``own_ids``: read with ids of the caller's)."""
    if isinstance(given, MultiTaskDataset):
        return f"the ids of `{what}`"
    if own_ids:
        return f"the 'id' each instance of `{what}` carries"
    return f"row positions in `{what}`"


def _check_unseen(data: MultiTaskDataset, what: str, own_ids: bool,
                  trained: Sequence[_Trained], *, against: str = "the training set",
                  must: str = "hold instances the model was never trained on") -> None:
    """Refuse ``data`` (``held_out_data`` or ``audit_data``, named ``what``) when it holds a
    training instance. Two data sets with ids of their caller's are compared by id; where
    either side's ids were made by :func:`unlearn` (data given as a tuple) ids say nothing, so
    rows are compared by their inputs and labels: equal inputs with equal labels on every task
    both rows supervise are a training pair as far as the model can tell; equal inputs labelled
    otherwise (duplicate images, categorical features) are another instance and pass."""
    if own_ids:
        known: set[int] = set()
        for part in trained:
            if part.own_ids:
                known.update(part.data.ids[part.rows].tolist())
        shared = sorted(known.intersection(data.ids.tolist()))
        if shared:
            raise ValueError(f"unlearn: `{what}` shares {len(shared)} instance ids with "
                             f"{against} (first: {shared[:5]}); it must {must}")
    for part in trained:
        if own_ids and part.own_ids:
            continue
        def same_pairs(row: int, train_row: int, part: _Trained = part) -> bool:
            return _same_labels(data, row, part.data, train_row)

        equal = _equal_input_rows(data.inputs, part.data.inputs, part.rows, same_pairs)
        if equal:
            row, train_row = equal[0]
            made = (f" (ids are not compared: `{part.label}`, given as (inputs, targets), got "
                    f"ids {int(part.data.ids.min())}..{int(part.data.ids.max())} from unlearn, "
                    f"which name none of your instances)" if own_ids and not part.own_ids
                    else "")
            raise ValueError(
                f"unlearn: `{what}` row {row} has the same inputs as `{part.label}` row "
                f"{train_row}, and the same labels ({len(equal)} row{'s' if len(equal) != 1 else ''} "
                f"of `{what}` equal {'training ' if against == 'the training set' else ''}"
                f"pairs){made}; it must {must}")


def _check_rows_given_once(forget: MultiTaskDataset, what: str) -> None:
    """Refuse a ``forget_data`` tuple (``what``) that holds one forget row twice: equal inputs
    and the same target pairs with equal labels. Its rows have no ids of the caller's, so a
    repeat would count as another instance (``num_forget_instances`` twice as large, the
    instance's forget pairs weighted twice), where :class:`ForgetRequest` refuses an id named
    twice. Equal inputs with other labels, or other target pairs, are another instance (as for
    held-out data): duplicate images, categorical features."""
    if len(forget) < 2:
        return

    def same_pairs(row: int, earlier: int) -> bool:
        if earlier >= row or not torch.equal(forget.supervision[row],
                                             forget.supervision[earlier]):
            return False
        tasks = [forget.task_names[c] for c in forget.supervision[row].nonzero().flatten()]
        return bool(tasks) and all(
            torch.equal(forget.targets[t][row], forget.targets[t][earlier]) for t in tasks)

    repeats = _equal_input_rows(forget.inputs, forget.inputs, torch.arange(len(forget)),
                                same_pairs)
    if repeats:
        row, earlier = repeats[0]
        raise ValueError(f"unlearn: `{what}` row {row} repeats row {earlier} (the same inputs "
                         f"and the same labels of the target tasks; {len(repeats)} "
                         f"row{'s' if len(repeats) != 1 else ''} repeat an earlier one): give "
                         f"each forget instance once, or it is counted and forgotten as "
                         f"several")


def _linked_to_retained_copies(forget: MultiTaskDataset, retain: MultiTaskDataset, *,
                               link: bool) -> MultiTaskDataset:
    """``forget_data`` and ``retain_data`` come without shared ids, so an instance given in both
    shows only as equal inputs (every one of them, for a multi-input model).

    A forget pair whose input is also a retain row that supervises the same task is refused (the
    retain term would teach the label back). With ``link`` (a partial request), a forget row
    whose input is a retain row supervising other tasks only is that instance: it takes the
    retain row's id, so that the method sees the row's pairs as the forget instance's retained
    pairs (and protects them, ``coupled``), as with ``train_data`` and a ``ForgetRequest``. Each
    retain row links one forget row at most. Returns ``forget`` with the linked ids."""
    if not len(forget) or not len(retain):
        return forget

    # Several inputs are matched by name (a dict's keys, a tuple's positions), so that the
    # order of a dict's keys does not matter; inputs named differently are never equal.
    f_inputs, r_inputs = dict(named_leaves(forget.inputs)), dict(named_leaves(retain.inputs))
    if f_inputs.keys() != r_inputs.keys():
        return forget
    names = sorted(f_inputs)
    f_leaves, r_leaves = [f_inputs[k] for k in names], [r_inputs[k] for k in names]

    def same_row(f_row: int, r_row: int) -> bool:
        return all(f.shape[1:] == r.shape[1:] and torch.equal(f[f_row], r[r_row])
                   for f, r in zip(f_leaves, r_leaves))

    by_print: dict[tuple[float, ...], list[int]] = {}
    for row, key in enumerate(_row_prints(r_leaves)):
        by_print.setdefault(key, []).append(row)
    ids = forget.ids.clone()
    taken: set[int] = set()
    for f_row, key in enumerate(_row_prints(f_leaves)):
        for r_row in by_print.get(key, []):
            if not same_row(f_row, r_row):
                continue
            clash = forget.supervision[f_row] & retain.supervision[r_row]
            if bool(clash.any()):
                task = forget.task_names[int(clash.nonzero()[0])]
                raise ValueError(
                    f"unlearn: `forget_data` row {f_row} is also `retain_data` row {r_row} "
                    f"(same input), which still supervises task {task!r}; take the pairs to "
                    "forget out of `retain_data` (or pass `train_data` and a `forget_request`)")
            if (link and r_row not in taken and bool(retain.supervision[r_row].any())
                    and int(ids[f_row]) == int(forget.ids[f_row])):
                ids[f_row] = retain.ids[r_row]
                taken.add(r_row)
    if torch.equal(ids, forget.ids):
        return forget
    return MultiTaskDataset(forget.inputs, forget.targets, forget.tasks, ids, forget.supervision)


def _progress_bar(unlearner: Unlearner) -> Any:
    """A tqdm bar advanced by a step callback of a step-based method (``None`` for others)."""
    if not isinstance(unlearner, GradientUnlearner):
        return None
    from tqdm.auto import tqdm

    steps = getattr(unlearner.config, "steps", None)
    if steps is not None:
        steps += getattr(unlearner.config, "head_refit_steps", 0)
    bar = tqdm(total=steps, desc=unlearner.name, unit="step")

    def advance(step: int, model: nn.Module) -> None:
        bar.update(step - bar.n)

    unlearner.step_callbacks.append(advance)
    return bar


def _audit(model: nn.Module, problem: UnlearningProblem, unseen: MultiTaskDataset,
           seed: int, max_members: int = 2000) -> dict[str, float]:
    """Membership-inference AUCs of the forget set and of held-back members, both against half
    of ``unseen`` (see :func:`unlearn`'s ``audit_data``)."""
    members = problem.retain
    if len(members) > max_members:
        generator = torch.Generator().manual_seed(seed)
        members = members.subset(torch.randperm(len(members), generator=generator)[:max_members])
    result = membership_attack(model, members, unseen, problem.forget,  # type: ignore[arg-type]
                               problem.target_tasks, max_members=max_members, seed=seed)
    return {"forget_mia_auc": result.auc, "member_mia_auc": result.member_auc}


@torch.no_grad()
def _mean_losses(model: nn.Module, data: MultiTaskDataset, limit: int = 256,
                 batch_size: int = 64) -> dict[str, float]:
    """Mean task loss over the supervised pairs of the first ``limit`` rows (for the report).
    In eval mode, then every module's own mode back (``model`` may be the caller's model,
    whose modules may be in mixed modes: ``model.train(was_training)`` would flip them all)."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    device = next(model.parameters()).device
    rows = min(limit, len(data))
    with eval_mode(model):
        for start in range(0, rows, batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, rows)))
            out = model(inputs_to(batch["input"], device))  # type: ignore[arg-type]
            for c, spec in enumerate(data.tasks):
                mask = batch["supervision"][:, c].to(device)  # type: ignore[index]
                if not bool(mask.any()):
                    continue
                values = task_loss(spec, out[spec.name], batch["targets"][spec.name].to(device))  # type: ignore[index]
                totals[spec.name] = totals.get(spec.name, 0.0) + float(values[mask].sum())
                counts[spec.name] = counts.get(spec.name, 0) + int(mask.sum())
    return {t: totals[t] / counts[t] for t in totals}


def _fresh_split_model(fresh_model: Callable[[], nn.Module], wrapped: nn.Module,
                       names: Sequence[str]) -> Callable[[], nn.Module]:
    """A factory of fresh models split like ``wrapped`` (by parameter name: the split may have
    been given as the original model's parameter objects)."""
    split = wrapped.parameter_split() if isinstance(wrapped, _SplitModel) else None

    def make() -> nn.Module:
        fresh = fresh_model()
        if not isinstance(fresh, nn.Module):
            raise TypeError(f"unlearn: `fresh_model` must return an nn.Module, got "
                            f"{type(fresh).__name__}")
        if split is None:  # the model splits itself (parameter_split())
            return _split_model(fresh, names, None, None)
        strip = len("module.")
        return _split_model(fresh, names, [n[strip:] for n in split.shared],
                            {t: [n[strip:] for n in ns] for t, ns in split.heads.items()})

    return make


def build_problem(model: nn.Module, *,
                  tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec],
                  train_data: DataLike | None = None,
                  forget_request: ForgetRequest | None = None,
                  forget_data: DataLike | None = None,
                  retain_data: DataLike | None = None,
                  target_tasks: Sequence[str] | str | None = None,
                  held_out_data: DataLike | None = None,
                  shared_parameters: SharedSpec | None = None,
                  head_parameters: Mapping[str, ParameterSpec] | None = None,
                  device: torch.device | str = "cpu",
                  seed: int = 0,
                  fresh_model: Callable[[], nn.Module] | None = None,
                  train_config: TrainConfig | Mapping[str, Any] | None = None,
                  earlier_requests: Sequence[ForgetRequest] | None = None
                  ) -> UnlearningProblem:
    """The validated :class:`~mtunlearn_ext.unlearning.UnlearningProblem` that :func:`unlearn`
    runs, from the same arguments (see there): for the layers below it, such as
    :func:`~mtunlearn_ext.unlearning.interference.interference_matrix` (forget/retain gradient
    cosines before and after the projections) or several methods on one request
    (``get_unlearner(name, settings).unlearn(problem)``). The problem's model wraps ``model``
    (its parameters, not a copy) with the shared/head split; methods never modify it. A
    method's result model is such a wrapper too (its forward takes ``(inputs, task_names)``):
    your module is its ``.module`` (what :func:`unlearn` returns), unless ``model`` was a
    :class:`~mtunlearn_ext.models.MultiTaskModel`, which is used as it is. Data
    given as tuples may hold several inputs per instance (see :data:`DataLike`): the problem's
    data sets keep them as a tuple or dict, and its model unpacks them into ``model``.

    ``fresh_model`` (a function returning a newly initialised model of the same architecture,
    the same initialisation seed as the original) and ``train_config`` (the recipe:
    :class:`~mtunlearn_ext.training.TrainConfig` or its fields) let ``method="retrain"`` train
    the gold-standard model on the retain pairs, with the library's trainer (the masked
    multi-task loss of :func:`~mtunlearn_ext.losses.masked_multitask_loss`).
    """
    return _build_problem(
        model, tasks=tasks, train_data=train_data, forget_request=forget_request,
        forget_data=forget_data, retain_data=retain_data, target_tasks=target_tasks,
        held_out_data=held_out_data, shared_parameters=shared_parameters,
        head_parameters=head_parameters, device=device, seed=seed, fresh_model=fresh_model,
        train_config=train_config, earlier_requests=earlier_requests)[0]


def _target_task_names(target_tasks: object) -> list[str] | None:
    """``target_tasks`` as a list of names (``None``: not given). One name may be a plain
    string, as in :meth:`ForgetRequest.create`: iterated, it would be one task per
    character."""
    if target_tasks is None:
        return None
    if isinstance(target_tasks, str):
        return [target_tasks]
    if isinstance(target_tasks, Mapping) or not isinstance(target_tasks, Iterable):
        raise TypeError(f"unlearn: `target_tasks` must be a task name or a list of task names, "
                        f"got {type(target_tasks).__name__}")
    names = list(target_tasks)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"unlearn: `target_tasks` must be a task name or a list of task "
                            f"names (strings), got {name!r:.80} in it")
    return names


def _check_values_of(data: MultiTaskDataset, what: str, own_ids: bool,
                     rows: torch.Tensor | None = None) -> None:
    """:meth:`MultiTaskDataset.check_values` naming the argument ``what`` and its row. ``rows``:
    the rows the problem reads (default: all; a row of ``train_data`` with no supervised pair
    is in neither set, so its inputs may hold anything). A tuple's ids (``own_ids`` false),
    made by :func:`unlearn` and possibly offset past another set's, are shown as its rows.
    Clean data costs the one check; the rest runs only to word a failure."""
    try:
        data.check_values(f"unlearn: `{what}`")
        return
    except ValueError:
        partial = rows is not None and rows.numel() != len(data)
        if own_ids and not partial:
            raise
    inputs = data.inputs
    if rows is not None and rows.numel() != len(data):
        read = torch.zeros(len(data), dtype=torch.bool)
        read[rows] = True

        def blank(x: torch.Tensor) -> torch.Tensor:
            keep = read.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
            return x.masked_fill(~keep, 0)

        inputs = map_leaves(blank, inputs)
    # Ids 0..N-1 (the rows) for a tuple, the caller's own otherwise.
    MultiTaskDataset(inputs, data.targets, data.tasks, data.ids if own_ids else None,
                     data.supervision).check_values(f"unlearn: `{what}`")


def _check_request_ids(request: ForgetRequest, full: MultiTaskDataset, given: object,
                       own_ids: bool, what: str = "`forget_request`") -> None:
    """Refuse, naming ``what`` (the argument) and the ids ``train_data`` (``given``, as passed;
    ``own_ids``: read with ids of the caller's) has, a request for ids that are not in
    ``train_data``."""
    if not isinstance(request, ForgetRequest):
        raise TypeError(f"unlearn: {what} must be a ForgetRequest (ForgetRequest.create"
                        f"(ids, target_tasks)), got {type(request).__name__}")
    known = set(full.ids.tolist())
    unknown = [i for i in request.instance_ids if i not in known]
    if not unknown:
        return
    shown = f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''} ({len(unknown)} in all)"
    valid = _names_instances("train_data", given, own_ids, len(full))
    if own_ids:
        low, high = int(full.ids.min()), int(full.ids.max())
        valid += f", from {low} to {high}" + ("" if high - low + 1 == len(full)
                                              else ", not every id between")
    else:
        valid += f": ids 0 to {len(full) - 1}"
    raise KeyError(f"unlearn: {what} names instance ids that are not in `train_data`: "
                   f"{shown}; {valid}")


@dataclass(frozen=True)
class _Lineage:
    """What :func:`unlearn` removed from a model it returned, kept on that module (an
    attribute, so that ``copy.deepcopy`` and pickling keep it too; ``state_dict`` does not).

    ``requests`` name instances by the ids of the ``train_data`` they were made on:
    ``own_ids`` whether those are the data set's own ids (else row positions, which name the
    same instances only in data of the same ``num_rows``). ``complete`` is False once a run
    given ``forget_data`` removed pairs that no ``train_data`` id names."""

    requests: tuple[ForgetRequest, ...]
    complete: bool = True
    own_ids: bool = True
    num_rows: int = 0


#: The attribute of a returned module that holds its :class:`_Lineage`.
_LINEAGE = "_mtunlearn_lineage"


def _carried_lineage(model: nn.Module) -> _Lineage | None:
    carried = model.__dict__.get(_LINEAGE)
    return carried if isinstance(carried, _Lineage) else None


def _checked_requests(given: object, forget_data_given: bool) -> tuple[ForgetRequest, ...]:
    """``earlier_requests`` as given, checked."""
    if isinstance(given, ForgetRequest) or not isinstance(given, Sequence):
        raise TypeError(f"unlearn: `earlier_requests` must be a list of ForgetRequests "
                        f"(the requests already removed from `model`), got "
                        f"{type(given).__name__}")
    for i, request in enumerate(given):
        if not isinstance(request, ForgetRequest):
            raise TypeError(f"unlearn: `earlier_requests[{i}]` must be a ForgetRequest, "
                            f"got {type(request).__name__}")
    if given and forget_data_given:
        raise ValueError("unlearn: `earlier_requests` names instances of `train_data`; with "
                         "`forget_data` and `retain_data` the retain set is what you give: "
                         "leave the pairs removed earlier out of `retain_data`")
    return tuple(given)


def _request_key(request: ForgetRequest) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
    tasks = None if request.target_tasks is None else tuple(sorted(request.target_tasks))
    return tuple(sorted(request.instance_ids)), tasks


def _earlier_requests(model: nn.Module, given: Sequence[ForgetRequest] | None,
                      forget_data_given: bool) -> tuple[tuple[ForgetRequest, ...], bool]:
    """The requests already removed from ``model``, and whether they came from ``model``
    itself (:class:`_Lineage`) rather than ``earlier_requests``. Given, the list replaces what
    the model carries (a warning names the carried requests it leaves out)."""
    carried = _carried_lineage(model)
    if given is not None:
        requests = _checked_requests(given, forget_data_given)
        if carried is not None:
            named = {_request_key(r) for r in requests}
            dropped = [r for r in carried.requests if _request_key(r) not in named]
            if dropped:
                warnings.warn(f"unlearn: `earlier_requests` replaces the {len(carried.requests)} "
                              f"request(s) `model` carries from the unlearn() that returned it; "
                              f"{len(dropped)} of them are not in it, so their pairs are in the "
                              f"retain set again", UserWarning, stacklevel=4)
        return requests, False
    if carried is None:
        return (), False
    if not carried.complete and not forget_data_given:
        warnings.warn("unlearn: `model` comes from an unlearn() given `forget_data`, whose "
                      "instances `train_data` cannot name: the pairs that run removed are in "
                      "`train_data`'s retain set again unless you pass them as "
                      "`earlier_requests`" + (f" (the {len(carried.requests)} request(s) on "
                                              "`train_data` before it are kept out)"
                                              if carried.requests else ""),
                      UserWarning, stacklevel=4)
    if carried.requests and forget_data_given:
        warnings.warn(f"unlearn: `model` was returned by unlearn() after "
                      f"{len(carried.requests)} request(s) on `train_data`; with `forget_data` "
                      f"and `retain_data` they cannot be checked: leave the pairs they removed "
                      f"out of `retain_data`", UserWarning, stacklevel=4)
    return carried.requests, True


def _check_carried_fits(carried: _Lineage | None, full: MultiTaskDataset, own_ids: bool) -> None:
    """Refuse a ``train_data`` in which the requests ``model`` carries name other instances:
    row positions of data with another number of rows (rows dropped or added since), or the
    other kind of ids."""
    if carried is None or not carried.requests:
        return
    if carried.own_ids != own_ids or (not own_ids and carried.num_rows != len(full)):
        made = ("the ids of a data set" if carried.own_ids
                else f"row positions of a `train_data` of {carried.num_rows} rows")
        now = "ids of its own" if own_ids else f"{len(full)} rows named by position"
        raise ValueError(f"unlearn: `model` carries {len(carried.requests)} earlier request(s) "
                         f"naming instances by {made}, and this `train_data` has {now}: the "
                         f"same numbers would name other instances; pass the earlier requests "
                         f"in this data's terms as `earlier_requests` (or give the data the "
                         f"ids it had: a MultiTaskDataset keeps its ids when rows are dropped)")


def _without_earlier_removals(full: MultiTaskDataset, earlier: Sequence[ForgetRequest],
                              given: object, own_ids: bool, carried: bool
                              ) -> tuple[MultiTaskDataset, int]:
    """``full`` with the pairs ``earlier`` removed marked unsupervised (never trained on
    again, nor forgotten twice), and how many pairs that took out. A data set's own ids that
    it no longer holds are instances dropped since (their data erased): nothing of them is
    left to keep out. Row positions must all exist (:func:`_check_carried_fits`)."""
    removed = torch.zeros_like(full.supervision)
    present = set(full.ids.tolist())
    for i, request in enumerate(earlier):
        where = (f"the requests `model` carries (from the unlearn() that returned it), request "
                 f"{i}" if carried else f"`earlier_requests[{i}]`")
        if own_ids:
            kept = [j for j in request.instance_ids if j in present]
            if not kept:
                continue
            request = ForgetRequest(tuple(kept), request.target_tasks)
        else:
            _check_request_ids(request, full, given, own_ids, where)
        try:
            removed |= request.forget_mask(full)
        except (KeyError, ValueError) as error:
            detail = error.args[0] if error.args else error  # a KeyError's str() is quoted
            raise type(error)(f"unlearn: {where}: {detail}") from None
    return full.with_supervision(full.supervision & ~removed), int(removed.sum())


def _build_problem(model: nn.Module, *,
                   tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec],
                   train_data: DataLike | None, forget_request: ForgetRequest | None,
                   forget_data: DataLike | None, retain_data: DataLike | None,
                   target_tasks: Sequence[str] | str | None, held_out_data: DataLike | None,
                   shared_parameters: SharedSpec | None,
                   head_parameters: Mapping[str, ParameterSpec] | None,
                   device: torch.device | str, seed: int,
                   fresh_model: Callable[[], nn.Module] | None,
                   train_config: TrainConfig | Mapping[str, Any] | None,
                   earlier_requests: Sequence[ForgetRequest] | None = None
                   ) -> tuple[UnlearningProblem, list[_Trained], _Naming]:
    """:func:`build_problem`, the training rows as given (for the checks that held-out
    and audit data are unseen), and how the caller's data names the request's instances."""
    # A torch.compile'd model is unlearned through its eager module: per-sample gradients
    # (torch.func) and parameter names ("trunk.0.weight", not "_orig_mod.trunk.0.weight") are
    # those of the user's own module; the returned model is that module's unlearned copy.
    # Likewise a (Distributed)DataParallel wrapper: the request runs in this one process.
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
                orig := getattr(model, "_orig_mod", None), nn.Module):
            model = orig
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    earlier, carried = _earlier_requests(model, earlier_requests, forget_data is not None)
    lineage = _carried_lineage(model)
    if (train_data is None) == (forget_data is None):
        raise ValueError("unlearn: give either `train_data` and `forget_request`, or "
                         "`forget_data` and `retain_data`")
    as_passed = (train_data, forget_data, retain_data, held_out_data)
    given_train, given_forget = train_data, forget_data
    # Instances that carry an "id" come back as a data set with those ids and take the data
    # set's path from here on: its ids name them in the request, the split and the checks.
    train_data, forget_data, retain_data, held_out_data = (
        cast(Any, _read_in(data, tasks, what, keep_ids=True)) for what, data in zip(
            ("train_data", "forget_data", "retain_data", "held_out_data"), as_passed))
    for what, data in (("train_data", train_data), ("forget_data", forget_data),
                       ("retain_data", retain_data), ("held_out_data", held_out_data)):
        if data is not None:
            _check_data_like(data, what)
    try:
        meta = torch.device(device).type == "meta"
    except (RuntimeError, TypeError):
        meta = False  # refused, with its reason, by the problem's validation
    if meta:
        raise ValueError("unlearn: `device` 'meta' holds no values; unlearning computes on "
                         "'cpu' or 'cuda'")
    specs = _task_specs(tasks, [train_data, forget_data, retain_data], _predicted_classes(
        model, not _has_own_split(model, shared_parameters, head_parameters),
        train_data if train_data is not None else retain_data, tasks),
        ["train_data", "forget_data", "retain_data"])
    train_data, forget_data, retain_data, held_out_data = (
        data if data is as_given else cast(Any, _with_tasks(data, specs)) for data, as_given
        in zip((train_data, forget_data, retain_data, held_out_data), as_passed))
    names = [s.name for s in specs]
    if train_data is not None:
        if forget_request is None:
            raise ValueError("unlearn: `train_data` needs a `forget_request`")
        if target_tasks is not None:
            raise ValueError("unlearn: with `forget_request`, the target tasks are the request's")
        if retain_data is not None:
            raise ValueError("unlearn: `retain_data` goes with `forget_data`; with `train_data` "
                             "and a `forget_request` the retain set is the rest of `train_data`")
        full = _as_dataset(train_data, specs, "train_data")
        own = isinstance(train_data, MultiTaskDataset)
        read = full.supervision.any(dim=1).nonzero().flatten()  # the rows in forget or retain
        _check_values_of(full, "train_data", own, read)
        request = forget_request
        _check_request_ids(request, full, given_train, own)
        request.validate(full)
        trained = [_Trained("train_data", full, read, own)]
        # Pairs an earlier request removed are neither retained (the model would learn them
        # again) nor forgotten a second time.
        if carried:
            _check_carried_fits(lineage, full, own)
        remaining, excluded = _without_earlier_removals(full, earlier, given_train, own, carried)
        forget, retain = request.split(remaining)
        naming = _Naming(_ids_named_by("train_data", given_train, own), None, earlier=earlier,
                         excluded_pairs=excluded,
                         lineage=_Lineage((*earlier, request),
                                          not carried or lineage is None or lineage.complete,
                                          own, len(full)))
        targets = request.resolved_tasks(full)
        if not len(forget):  # said here, where the request and its data are known by name
            count = len(request.instance_ids)
            if bool(request.forget_mask(full).any()):
                by = ("the requests `model` carries (from the unlearn() that returned it)"
                      if carried else "`earlier_requests`")
                raise ValueError(f"unlearn: every pair `forget_request` names ({count} instance"
                                 f"{'s' if count != 1 else ''}, target tasks {targets}) was "
                                 f"removed already by {by}: there is nothing left to forget")
            raise ValueError(f"unlearn: `forget_request` names {count} instance"
                             f"{'s' if count != 1 else ''}, none with a supervised pair of the "
                             f"target task{'s' if len(targets) != 1 else ''} {targets} in "
                             "`train_data` (its supervision mask marks those pairs unlabelled): "
                             "there is nothing to forget")
        if not len(retain):
            raise ValueError("unlearn: `forget_request` and `earlier_requests` together take "
                             "every pair of `train_data`: nothing would be left to retain")
    else:
        if retain_data is None:
            raise ValueError("unlearn: `forget_data` needs `retain_data`")
        if forget_request is not None:
            raise ValueError("unlearn: a `forget_request` names instances of `train_data`; with "
                             "`forget_data` the forget set is that data itself (its target tasks "
                             "in `target_tasks`)")
        # Tuple data gets ids 0..N-1; a MultiTaskDataset keeps its own. A tuple retain set
        # beside a forget data set starts past the forget set's ids, so that the two never
        # name different instances by one id.
        retain_offset = (int(forget_data.ids.max()) + 1
                         if isinstance(forget_data, MultiTaskDataset) and len(forget_data) else 0)
        retain = _as_dataset(retain_data, specs, "retain_data", id_offset=retain_offset)
        if isinstance(forget_data, MultiTaskDataset):
            given = [t for t in names if bool(forget_data.supervision[:, forget_data.task_index(t)]
                                              .any())]
        else:
            assert forget_data is not None
            given = [t for t in names if t in forget_data[1]]
        named = _target_task_names(target_tasks)
        targets = named if named is not None else given
        if len(set(targets)) != len(targets):
            raise ValueError(f"unlearn: `target_tasks` {targets} names a task twice")
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ValueError(f"unlearn: target tasks {targets} must be a non-empty subset of "
                             f"{names}")
        forget = _as_dataset(forget_data, specs, "forget_data", like=retain,
                             id_offset=int(retain.ids.max()) + 1 if len(retain) else 0)
        # Only the target tasks' pairs are forgotten; anything else given is not a forget pair.
        columns = torch.tensor([t in targets for t in names])
        forget = forget.with_supervision(forget.supervision & columns)
        own_forget = isinstance(forget_data, MultiTaskDataset)
        own_retain = isinstance(retain_data, MultiTaskDataset)
        _check_values_of(retain, "retain_data", own_retain)
        _check_values_of(forget, "forget_data", own_forget)
        if not own_forget:  # a data set's ids name its instances: each is there once
            _check_rows_given_once(forget, "forget_data")
        partial = set(targets) != set(names)
        forget = _linked_to_retained_copies(forget, retain, link=partial)
        request = ForgetRequest.create(forget.ids, targets if partial else None)
        trained = [_Trained("forget_data", forget, torch.arange(len(forget)), own_forget),
                   _Trained("retain_data", retain, torch.arange(len(retain)), own_retain)]
        # Given as a tuple, the problem names the forget rows by ids made for them (past the
        # retain rows', or a linked retain row's): the record hashes their positions in
        # `forget_data`, 0..n-1, which the caller can name; a data set's ids are its own
        # (before a row took the id of the retain row it is linked to).
        naming = _Naming(_ids_named_by("forget_data", given_forget, own_forget),
                         cast(MultiTaskDataset, forget_data).ids.tolist() if own_forget
                         else list(range(len(forget))))
    held_out = None
    if held_out_data is not None:
        # Tuple data gets ids past every training id; a MultiTaskDataset keeps its own, and
        # one that shares ids with a training data set is refused. Against ids made for a
        # tuple (which name no instance of the caller's) rows are compared by their inputs.
        top = max([int(d.ids.max()) + 1 for d in (forget, retain) if len(d)] or [0])
        held_out = _as_dataset(held_out_data, specs, "held_out_data", like=retain, id_offset=top)
        own_held_out = isinstance(held_out_data, MultiTaskDataset)
        _check_values_of(held_out, "held_out_data", own_held_out)
        _check_unseen(held_out, "held_out_data", own_held_out, trained)
        if own_held_out and len(held_out) and not set(held_out.ids.tolist()).isdisjoint(
                forget.ids.tolist() + retain.ids.tolist()):
            # Its ids met only ids made for a tuple (the check above): new ones past them, so
            # that no id names two instances (the problem's own check compares ids).
            held_out = MultiTaskDataset(held_out.inputs, held_out.targets, held_out.tasks,
                                        torch.arange(top, top + len(held_out)),
                                        held_out.supervision)
        else:
            naming = replace(naming, own_held_out=own_held_out)
    wrapped = _split_model(model, names, shared_parameters, head_parameters)
    if (fresh_model is None) != (train_config is None):
        raise ValueError("unlearn: `fresh_model` and `train_config` go together (retraining "
                         "needs both the architecture and the recipe)")
    factory: Callable[[], nn.Module] | None = None
    recipe = None
    if fresh_model is not None:
        recipe = (train_config if isinstance(train_config, TrainConfig)
                  else TrainConfig(**dict(train_config or {})))
        factory = _fresh_split_model(fresh_model, wrapped, names)
    problem = UnlearningProblem(model=wrapped, tasks=specs, forget=forget, retain=retain,
                                request=request, target_tasks=list(targets), device=device,
                                seed=seed, held_out=held_out, train_config=recipe,
                                model_factory=factory)
    problem.validate()
    return problem, trained, naming


def unlearn(model: nn.Module, *,
            tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec],
            train_data: DataLike | None = None,
            forget_request: ForgetRequest | None = None,
            forget_data: DataLike | None = None,
            retain_data: DataLike | None = None,
            target_tasks: Sequence[str] | str | None = None,
            held_out_data: DataLike | None = None,
            audit_data: DataLike | None = None,
            shared_parameters: SharedSpec | None = None,
            head_parameters: Mapping[str, ParameterSpec] | None = None,
            method: str = "interference_aware",
            config: Mapping[str, Any] | UnlearnerConfig | None = None,
            device: torch.device | str = "cpu",
            seed: int = 0,
            progress: bool = False,
            fresh_model: Callable[[], nn.Module] | None = None,
            train_config: TrainConfig | Mapping[str, Any] | None = None,
            earlier_requests: Sequence[ForgetRequest] | None = None
            ) -> tuple[nn.Module, UnlearningReport]:
    """Remove the supervision of ``target_tasks`` for some instances from a multi-task model.

    The model maps an input batch (one tensor, or several inputs: see below) to
    ``{task: prediction}``; its parameters split into a shared trunk ``theta_s`` and one head
    ``theta_t`` per task. A request removes the pairs
    ``F x S`` (forget instances ``F``, target tasks ``S``); everything else is retained, including,
    in a *partial* request (``S`` a proper subset of the tasks), the other tasks' labels of ``F``.
    The default method (:class:`~mtunlearn_ext.unlearning.interference_aware.InterferenceAware`)
    moves ``theta_s`` by retain descent plus ``alpha`` times the forget direction after

    - a per-layer projection off the recent retain gradients of the tasks to protect,
      ``f_l <- f_l - M_l^T (M_l M_l^T + lambda I)^-1 M_l f_l`` (task-level interference), and
    - a sign-aware projection against per-sample retain gradients ``r_j``, so that
      ``<d, r_j> <= 0``: the step raises no retained instance's loss to first order
      (instance-level interference).

    Give the data one of two ways:

    - ``train_data`` (the full training set) and ``forget_request``
      (:class:`~mtunlearn_ext.data.ForgetRequest`: instance ids, target tasks; ``None`` tasks =
      full request). Preferred for partial requests: the method then knows which retained pairs
      belong to the forget instances and protects them explicitly.
    - ``forget_data`` (the forget instances with targets for the target tasks) and
      ``retain_data`` (every retained pair), plus ``target_tasks`` (a task name or a list of
      them; default: the tasks with targets in ``forget_data``). In a partial request, a forget row whose input equals a
      ``retain_data`` row's is taken to be that instance, so that its retained pairs are known
      (and protected) as with ``train_data``; one that would still supervise a target pair there
      is refused. As a request names an id once, a ``forget_data`` tuple gives each instance
      once: a row repeating an earlier one (equal inputs, equal labels of the same target
      tasks) is refused; equal inputs labelled otherwise are another instance.

    Each is a :class:`~mtunlearn_ext.data.MultiTaskDataset` or ``(inputs, targets[,
    supervision])`` (:data:`DataLike`): ``targets`` task -> ``[N, ...]``; ``inputs`` one
    ``[N, ...]`` tensor (``model(x)``), or a model's several inputs as a tuple
    (``((ids, mask), targets)``: ``model(ids, mask)``) or a dict (``({"ids": ids, "mask":
    mask}, targets)``: ``model(ids=ids, mask=mask)``) of tensors of any dtypes whose first
    dimension is the instance (``N`` rows each). A torch ``Dataset`` or ``DataLoader`` of
    instances ``(input, {task: label})`` is read into memory first
    (:func:`~mtunlearn_ext.data.gather`: a missing or ``None`` label is an unsupervised pair).
    Instances that carry an ``"id"`` (a loader's batches: one per row) are then a data set
    with those ids: the ids name them in ``forget_request``, the split, the report and the
    checks of held-out and audit data (a loader's rows taken in id order, so that a shuffling
    loader's order does not change the run); others are taken as a tuple, named by position,
    a map-style dataset's indices.

    Args:
        model: any ``nn.Module`` returning a mapping task -> output (a ``torch.compile``'d
            one, or a ``DataParallel`` / ``DistributedDataParallel`` wrapper, is unlearned
            through the module it wraps, which is what comes back); never modified (weights,
            buffers, and each module's train/eval mode). Layers
            with running statistics (BatchNorm) and dropout are fine: the steps run in eval
            mode and the statistics are recomputed from the retain data after them (the
            settings ``train_mode`` and ``recalibrate_norms``).
        tasks: task specs, or a mapping task -> kind (``"classification"``, ``"regression"``,
            ``"segmentation"``, ``"depth"``, ``"normals"``), which picks the task's loss
            (:func:`mtunlearn_ext.losses.task_loss`) and forgetting objective. Given as a
            kind, a classification or segmentation task has as many classes as the model
            predicts (dimension 1 of its output), and every label must be one of them.
        held_out_data: optional instances the model was never trained on (a validation
            split, never the data you evaluate on), same layout as ``retain_data``. A retrained
            model fits the forget instances about as well as unseen data, so the default
            method can stop raising a forget pair's loss where such data's loss lies: with
            ``config={"cap_reference": "held_out"}`` (or ``"auto"``) its forget caps come
            from this data. Its defaults (``cap_reference="retain"``) and the other methods do
            not read it: the run is then the same as without it, and a ``UserWarning`` names
            the setting to change.
        audit_data: optional instances the model was never trained on, distinct from
            ``held_out_data`` (which the method may use), at least 8 rows with the target tasks'
            labels. Held-out and audit data are refused when they hold a training instance:
            by id where both are data sets, else (data given as tuples, whose ids ``unlearn``
            makes up) by equal inputs and labels. The report's summary then holds a loss-based
            membership-inference audit of the forget set before and after
            (:func:`~mtunlearn_ext.metrics.membership_attack`, fitted on up to 2000 retain rows
            against half of ``audit_data``, scored against the other half):
            ``forget_mia_auc_*`` near 0.5 means the forget instances look like unseen data to
            the attack; ``member_mia_auc_*`` (held-back retain rows against the same unseen
            half) shows that the attack itself still separates members.
        shared_parameters: the trunk: names, parameters, modules (``model.backbone``: all
            its parameters), or a predicate on names. Not needed for a model with
            ``parameter_split()``.
        head_parameters: task -> its head's names, parameters or module(s) (default: a
            parameter whose dotted name contains the task's name as a component, e.g.
            ``heads.depth.weight``; the modules' names are looked at before the parameter's
            own, so a task named ``weight`` does not claim every ``....weight``).
        method: registry name (see :func:`mtunlearn_ext.unlearning.available_unlearners`).
        config: the method's settings (a mapping or its config object); defaults otherwise.
        device: where to compute; seed: seeds every random choice (same seed, same result).
        progress: show a progress bar over the steps of a step-based method (tqdm, stderr).
        fresh_model, train_config: what ``method="retrain"`` (the gold standard: training from
            scratch on the retain pairs) needs; see :func:`build_problem`.
        earlier_requests: the requests already removed from ``model`` (a chain of removals),
            with ``train_data``: their pairs are left out of the retain set, which would
            otherwise train the model on them again, and a request naming only such pairs is
            refused. A model that :func:`unlearn` returned carries its own (an attribute,
            kept by ``copy.deepcopy`` and pickling, not by ``state_dict``): a second request
            on it keeps the first removed without this argument. Pass them for a model loaded
            from a ``state_dict`` (the record keeps only the ids' hashes;
            ``report.request["earlier_requests"]`` lists them); given, the list replaces what
            the model carries (a warning names carried requests it leaves out). Ids of a
            ``MultiTaskDataset`` no longer in ``train_data`` (rows dropped, their data erased)
            are skipped; requests named by row positions need ``train_data`` of the same
            number of rows (else refused: the positions would name other instances). With
            ``forget_data`` / ``retain_data``, leave removed pairs out of ``retain_data``.

    Returns:
        ``(unlearned_model, report)``: a new module of the same class as ``model`` (in eval
        mode, its parameters without ``.grad``), and an :class:`~mtunlearn_ext.unlearning.UnlearningReport` whose
        ``extra["summary"]`` holds the mean task losses on forget and retain pairs before and
        after (``forget_loss_before``, ``forget_loss_after``, ...; first 256 rows of each set)
        and ``extra["weights_changed"]``: ``False`` (with a ``UserWarning``) when the run left
        every weight and buffer exactly as it was (``steps: 0``), which unlearned nothing.

    Example::

        import torch
        from torch import nn
        import mtunlearn_ext

        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
                self.heads = nn.ModuleDict({"kind": nn.Linear(32, 3), "size": nn.Linear(32, 1)})
            def forward(self, x):
                z = self.trunk(x)
                return {t: h(z) for t, h in self.heads.items()}

        x = torch.randn(200, 8)
        y = {"kind": torch.randint(0, 3, (200,)), "size": torch.randn(200, 1)}
        model = TwoHeads()  # ... trained on (x, y) ...
        new_model, report = mtunlearn_ext.unlearn(
            model, tasks={"kind": "classification", "size": "regression"},
            train_data=(x, y),
            forget_request=mtunlearn_ext.ForgetRequest.create(range(10), ["kind"]),  # partial
            shared_parameters=lambda name: name.startswith("trunk."),
            config={"steps": 30, "lr": 1e-2})
        print(report.extra["summary"])
    """
    if not isinstance(progress, bool):  # a string such as "no" would be taken as true
        raise TypeError(f"unlearn: `progress` must be True or False, got {progress!r}")
    problem, trained, naming = _build_problem(
        model, tasks=tasks, train_data=train_data, forget_request=forget_request,
        forget_data=forget_data, retain_data=retain_data, target_tasks=target_tasks,
        held_out_data=held_out_data, shared_parameters=shared_parameters,
        head_parameters=head_parameters, device=device, seed=seed, fresh_model=fresh_model,
        train_config=train_config, earlier_requests=earlier_requests)
    wrapped, forget, retain = problem.model, problem.forget, problem.retain
    audit = None
    if audit_data is not None:
        audit_data = cast(Any, _read_in(audit_data, problem.tasks, "audit_data",
                                        keep_ids=True))
        audit = _as_dataset(audit_data, problem.tasks, "audit_data", like=retain)
        audit.check_values("unlearn: `audit_data`")
        problem.check_model_on(audit, "`audit_data`")
        # A data set's ids against the training data sets' ids; tuple data (ids of its own,
        # 0..N-1) and training data given as tuples: by equal inputs and labels.
        own_audit = isinstance(audit_data, MultiTaskDataset)
        _check_unseen(audit, "audit_data", own_audit, trained)
        if problem.held_out is not None and len(problem.held_out):
            # The forget caps are measured on the held-out instances: an audit on them would
            # compare the forget set with the very losses it was steered to.
            _check_unseen(audit, "audit_data", own_audit,
                          [_Trained("held_out_data", problem.held_out,
                                    torch.arange(len(problem.held_out)), naming.own_held_out)],
                          against="`held_out_data`",
                          must="be distinct from `held_out_data` (the instances the forget "
                               "caps may be measured on)")
        target_columns = [audit.task_index(t) for t in problem.target_tasks]
        labelled = int(audit.supervision[:, target_columns].all(dim=1).sum())
        if labelled < 8:
            raise ValueError(f"unlearn: `audit_data` needs at least 8 instances with labels of "
                             f"the target tasks {problem.target_tasks}, got {labelled}")
    unlearner = get_unlearner(method, config)
    if isinstance(unlearner, GradientUnlearner) and not any(
            p.requires_grad for p in wrapped.parameters()):
        count = sum(1 for _ in wrapped.parameters())
        raise ValueError(f"unlearn: no parameter of `model` requires grad (requires_grad is "
                         f"False for all {count}), so method {unlearner.name!r} has nothing to "
                         f"update; unfreeze the parameters it may change (at least the shared "
                         f"trunk's: `p.requires_grad_(True)`)")
    before_f = _mean_losses(wrapped, forget)
    before_r = _mean_losses(wrapped, retain)
    audit_before = _audit(wrapped, problem, audit, seed) if audit is not None else {}
    bar = _progress_bar(unlearner) if progress else None
    try:
        result = unlearner.unlearn(problem)
    finally:
        if bar is not None:
            bar.close()
    after_f = _mean_losses(result.model, forget)
    after_r = _mean_losses(result.model, retain)
    result.report.extra["summary"] = {
        "forget_loss_before": before_f, "forget_loss_after": after_f,
        "retain_loss_before": before_r, "retain_loss_after": after_r,
    }
    if audit is not None:
        audit_after = _audit(result.model, problem, audit, seed)
        for key in audit_before:
            result.report.extra["summary"][f"{key}_before"] = audit_before[key]
            result.report.extra["summary"][f"{key}_after"] = audit_after[key]
    result.report.request["ids_named_by"] = naming.named_by
    if naming.ids is not None:
        result.report.request["ids_sha256"] = ForgetRequest.create(naming.ids).ids_hash()
    if train_data is not None:
        # The chain of removals, by the ids' hashes as the request's own: a record shows that
        # the retain set left the earlier requests' pairs out.
        result.report.request["earlier_requests"] = [
            {"ids_sha256": r.ids_hash(), "num_instances": len(r.instance_ids),
             "target_tasks": None if r.target_tasks is None else list(r.target_tasks)}
            for r in naming.earlier]
        result.report.request["earlier_pairs_excluded"] = naming.excluded_pairs
    if held_out_data is not None:
        unused = _held_out_unused(unlearner, result.report)
        if unused is not None:
            warnings.warn(f"unlearn: `held_out_data` was not used: {unused}", UserWarning,
                          stacklevel=2)
    out = result.model.module if isinstance(result.model, _SplitModel) else result.model
    source = wrapped.module if isinstance(wrapped, _SplitModel) else wrapped
    # The input is never modified, so it still holds the weights the run started from; the
    # hashes tell apart what save_unlearned's and the CLI's tell apart.
    changed = state_dict_sha256(out) != state_dict_sha256(source)
    result.report.extra["weights_changed"] = changed
    if not changed:
        # As `mtunlearn unlearn` says it (steps 0, a learning rate of 0): save_unlearned keeps
        # it in the record (weights_changed: false) and verify_saved does not pass it.
        warnings.warn(f"unlearn: {unlearner.name} left the weights exactly as they were "
                      f"({result.report.steps} steps): the returned model is the input model, "
                      f"nothing was unlearned; save_unlearned's record says so (weights_changed:"
                      f" false) and verify_saved will not pass it", UserWarning, stacklevel=2)
    if naming.lineage is not None:
        lineage = naming.lineage
    else:  # forget_data: what it removed no later train_data id names
        before = _carried_lineage(source)
        lineage = (_Lineage((), False) if before is None
                   else replace(before, complete=False))
    if out is not source:  # the input is never modified
        out.__dict__[_LINEAGE] = lineage
    diverged = _non_finite_parameters(out)
    if diverged:
        warnings.warn(f"unlearn: the run diverged: the returned model has NaN/Inf in "
                      f"{len(diverged)} parameter(s) (first: {diverged[0]}); lower the learning "
                      f"rate or the step count (`config`), or keep gradient clipping on; "
                      f"save_unlearned refuses such a model", UserWarning, stacklevel=2)
    return out, result.report


def _non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that hold NaN/Inf (buffers may hold Inf on purpose: an
    additive attention mask of -inf)."""
    return [name for name, p in model.named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())]


def _held_out_unused(unlearner: Unlearner, report: UnlearningReport) -> str | None:
    """Why a run of one of the library's methods did not read the problem's held-out data, and
    the setting that would make it; ``None`` when it did, or for a method defined outside the
    library (which may read ``problem.held_out`` itself). Among the library's methods only the
    interference-aware one (and its ablations) reads it, for the forget caps; it says in its
    report which set its caps came from."""
    from mtunlearn_ext.unlearning.interference_aware import InterferenceAware

    if not type(unlearner).__module__.startswith("mtunlearn_ext."):
        return None
    if not isinstance(unlearner, InterferenceAware):
        return (f"method {unlearner.name!r} does not read held-out data (of the library's "
                f"methods only 'interference_aware' and its ablations do, for their forget caps "
                f"with cap_reference='held_out' or 'auto'); leave it out, or run "
                f"method='interference_aware' with config={{'cap_reference': 'held_out'}}")
    extra = report.extra.get("interference_aware", {})
    if "forget_caps_from" not in extra:  # not said: not known
        return None
    source = extra["forget_caps_from"]
    if source == "held_out":
        return None
    cfg = unlearner.config
    if cfg.cap_quantile is None:
        return ("the forget caps are the objectives' own (cap_quantile=None), so no set is "
                "measured for them; set config={'cap_quantile': 0.9 (or 'rank'), "
                "'cap_reference': 'held_out'} to raise forget losses to the held-out level")
    if source is None:  # no capped objective: no caps measured on any set
        return (f"no target task has a capped forget objective (forget objectives "
                f"{report.extra.get('forget_objectives')}), so there are no caps to take from "
                f"it; use a capped objective ('capped_ascent', the default) in "
                f"`forget_objective`")
    return ("the forget caps come from the retain set (cap_reference='retain', the "
            "default); pass config={'cap_reference': 'held_out'} (or 'auto') to take them "
            "from `held_out_data`, the level a retrained model reaches on unseen data")


API_RECORD_SCHEMA = "mtunlearn_ext.api-record/1"


def save_unlearned(model: nn.Module, report: UnlearningReport, path: str | os.PathLike[str], *,
                   original: nn.Module | None = None) -> dict[str, Any]:
    """Save an unlearned model and the record of its request, for an audit trail.

    Writes ``path`` (the model's ``state_dict``) and then ``<path>.record.json`` (schema
    ``mtunlearn_ext.api-record/1``), both as new files, atomically (temporary file, fsync,
    link): an existing file is never replaced, a reader never sees a partial one, and the
    record, written last, marks a complete save (if it cannot be written the checkpoint is
    removed again). The record holds the request as :func:`unlearn` reported it (pair counts,
    target tasks, the SHA-256 of the sorted instance ids, not the ids themselves, and
    ``ids_named_by``: the ids of ``train_data`` / ``forget_data`` when it is a data set, the
    ``"id"`` its instances carry when it is a torch dataset of such instances, else row
    positions in it; in a chain of removals, ``earlier_requests``: each earlier request's
    ids hash, instance count and target tasks), the method
    and its settings, the run's ``seed`` and ``device``, its ``environment`` (torch and Python
    versions, the intra-op thread count during the run, whether the compiled ops ran:
    :func:`~mtunlearn_ext.records.run_environment`), the summary (losses before and after; the membership-inference audit
    when ``audit_data`` was given), steps and wall time, the code version, the checkpoint
    file's SHA-256, and :func:`state_dict_sha256` of the unlearned model and, when
    ``original`` is given, of the model it came from, and ``weights_changed``: whether the
    model's weights differ from ``original``'s, or, without it, from those of the model
    :func:`unlearn` started from (as its report says; absent from a report of another
    source). A run that changed nothing (``steps: 0``) is written all the same, with a
    ``UserWarning`` and ``weights_changed: false``, which :func:`verify_saved` fails, as
    ``mtunlearn unlearn`` and ``mtunlearn verify`` treat such a run. A value JSON cannot hold,
    NaN or an infinity (a diverged run's loss), is written as ``null``, as
    :meth:`UnlearningReport.to_dict` writes it.

    Returns:
        The record (a plain JSON-able dict).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_unlearned: `model` must be the unlearned nn.Module, got "
                        f"{type(model).__name__}")
    if not isinstance(report, UnlearningReport):
        raise TypeError(f"save_unlearned: `report` must be the UnlearningReport that unlearn() "
                        f"returned with the model, got {type(report).__name__}")
    if original is not None and not isinstance(original, nn.Module):
        raise TypeError(f"save_unlearned: `original` must be the nn.Module the model was "
                        f"unlearned from (or None), got {type(original).__name__}")
    diverged = _non_finite_parameters(model)
    if diverged:
        raise ValueError(f"save_unlearned: `model` has NaN/Inf in {len(diverged)} parameter(s) "
                         f"(first: {diverged[0]}); a diverged run is no unlearned model: nothing "
                         "was written")
    target = Path(path)
    record_path = target.with_name(target.name + ".record.json")
    for p in (target, record_path):
        if p.exists():
            raise FileExistsError(f"save_unlearned: {p} exists; refusing to overwrite it")
    model_sha = state_dict_sha256(model)
    original_sha = None if original is None else state_dict_sha256(original)
    claimed = report.extra.get("weights_changed")
    weights_changed = (model_sha != original_sha if original_sha is not None
                       else claimed if isinstance(claimed, bool) else None)
    if weights_changed is False:
        # Written all the same, as `mtunlearn unlearn` writes such a run: the record says what
        # happened, and verification fails it.
        warnings.warn("save_unlearned: `model` has exactly the weights of the model it was "
                      "unlearned from: nothing was unlearned; the record says so "
                      "(weights_changed: false) and verify_saved will not pass it", UserWarning,
                      stacklevel=2)
    record: dict[str, Any] = {
        "schema": API_RECORD_SCHEMA,
        "written_at": utc_now(),
        "code": code_version(),
        # What the weights depend on besides the code and the settings, for a rerun.
        "seed": report.seed, "device": report.device,
        "environment": run_environment(report.threads),
        "request": _finite_or_none(dict(report.request)),
        "method": {"name": report.method, "settings": _finite_or_none(dict(report.config))},
        "summary": _finite_or_none(report.extra.get("summary", {})),
        "steps": report.steps,
        "wall_time_s": report.wall_time_s,
        "model_state_sha256": model_sha,
        "original_state_sha256": original_sha,
    }
    if weights_changed is not None:
        record["weights_changed"] = weights_changed
    from mtunlearn_ext.workflow import write_json_new  # the CLI's writer of new JSON files

    record["checkpoint"] = {"path": str(target),
                            "sha256": atomic_torch_save(model.state_dict(), target)}
    try:
        write_json_new(record_path, json.loads(json.dumps(record, allow_nan=False)))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return record


def _weights_changed_check(payload: Mapping[str, Any], weights: str | None,
                           original_sha: str | None, mismatches: list[str]) -> str:
    """The ``weights_changed`` check of :func:`verify_saved`
    (:func:`~mtunlearn_ext.records.judge_weights_changed`): the checkpoint's weights against
    the recorded ``original_state_sha256`` and the ``original`` given (``original_sha``), and
    the record's ``weights_changed``. An older record has no ``weights_changed``: it is judged
    by the hashes alone, or not checked without any."""
    from mtunlearn_ext.records import judge_weights_changed

    references = [h for h in (payload.get("original_state_sha256"), original_sha)
                  if isinstance(h, str)]
    return judge_weights_changed(
        weights, references, payload.get("weights_changed"), mismatches,
        weights="the checkpoint's weights", reference="the original model's", hash_name="state",
        not_checked="not checked (an older record, saved without `original`: no "
                    "weights_changed, no original state hash)")


@dataclass
class SavedCheck:
    """Outcome of :func:`verify_saved`: ``ok``, the mismatches found (as messages) and the
    outcome of each check (``"ok"``, ``"MISMATCH"`` or why it was not made)."""

    ok: bool
    checkpoint: str
    checks: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)


def verify_saved(record: str | os.PathLike[str], *,
                 checkpoint: str | os.PathLike[str] | None = None,
                 model: nn.Module | None = None, original: nn.Module | None = None,
                 forget_ids: Iterable[int] | None = None) -> SavedCheck:
    """Check a :func:`save_unlearned` record against what it describes.

    Re-hashes the checkpoint file (``checkpoint``, default the record's: found as recorded,
    else beside the record) against ``checkpoint.sha256``, hashes its weights against ``model_state_sha256``, and, when given, the unlearned
    ``model`` in memory against the same hash, the ``original`` model against
    ``original_state_sha256`` and ``forget_ids`` against the request's ``ids_sha256`` (the
    record keeps the ids' hash, not the ids; the request's ``ids_named_by`` says which ids).
    It fails a run that left the weights unchanged (check ``weights_changed``:
    :data:`~mtunlearn_ext.records.WEIGHTS_UNCHANGED` when the checkpoint's weights are the
    recorded or given original's, or the record says ``weights_changed: false``; a record
    of an older version, without the field, is judged by the hashes it has).
    The model and data are the caller's, so no metric is re-measured: :func:`evaluate` gives
    them for any model and data as :func:`unlearn` takes them. Raises ``ValueError`` for a file that is not such
    a record and ``FileNotFoundError`` for a missing checkpoint; mismatches are returned."""
    from mtunlearn_ext.records import recorded_path

    record_path = Path(record)
    try:
        payload = json.loads(record_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"verify_saved: {record_path} is not a JSON record: {error}") from error
    if not isinstance(payload, dict) or payload.get("schema") != API_RECORD_SCHEMA:
        found = payload.get("schema") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"verify_saved: {record_path} is not a save_unlearned record (schema "
                         f"{API_RECORD_SCHEMA!r}), got {found!r}")
    saved = payload.get("checkpoint")
    if not isinstance(saved, dict) or not isinstance(saved.get("path"), str):
        raise ValueError(f"verify_saved: {record_path} has no `checkpoint` object with a "
                         f"`path` (got {saved!r}): not a record save_unlearned wrote, or edited")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"verify_saved: `checkpoint` {str(path)!r} is not a file")
    else:
        path = recorded_path(saved["path"], record_path)
        if not path.is_file():
            raise FileNotFoundError(f"verify_saved: the record's checkpoint "
                                    f"{saved.get('path')!r} is not a file (as recorded, nor "
                                    f"beside {record_path})")
    result = SavedCheck(True, str(path))

    def check(name: str, found: str | None, expected: object, what: str) -> None:
        if found == expected:
            result.checks[name] = "ok"
            return
        result.checks[name] = "MISMATCH"
        result.mismatches.append(f"{what} {found} differs from the record's {expected}")

    check("sha256", sha256_of_file(path), saved.get("sha256"), "checkpoint SHA-256")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weights: str | None = state_dict_sha256(state)
    except Exception as error:  # noqa: BLE001 (any unreadable file is the same finding)
        weights = f"(unreadable: {error})"
    check("weights", weights, payload.get("model_state_sha256"), "checkpoint weights' hash")
    if model is not None:
        check("model", state_dict_sha256(model), payload.get("model_state_sha256"),
              "`model`'s state hash")
    original_sha = None if original is None else state_dict_sha256(original)
    if original is not None and payload.get("original_state_sha256") is None:
        result.checks["original"] = "not recorded (saved without `original`)"
    elif original is not None:
        check("original", original_sha, payload.get("original_state_sha256"),
              "`original`'s state hash")
    result.checks["weights_changed"] = _weights_changed_check(payload, weights, original_sha,
                                                              result.mismatches)
    if forget_ids is not None:
        if isinstance(forget_ids, (str, bytes)):
            raise TypeError(f"verify_saved: `forget_ids` must be integer ids, got "
                            f"{type(forget_ids).__name__} {forget_ids!r}")
        # The request's own rules (no fractions, bools or strings): int() would read 1.9 as 1
        # and report a match for other ids.
        try:
            ids_hash = ForgetRequest.create(list(forget_ids)).ids_hash()
        except (TypeError, ValueError) as error:
            raise type(error)(f"verify_saved: `forget_ids`: {error}") from None
        request = payload.get("request")
        check("forget_ids", ids_hash,
              request.get("ids_sha256") if isinstance(request, dict) else None,
              "`forget_ids`' hash")
    result.ok = not result.mismatches
    return result


def evaluate(model: nn.Module, data: DataLike, *,
             tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec] | None = None,
             batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Task name -> metric name -> value of ``model`` on ``data``, over its supervised pairs
    (:func:`mtunlearn_ext.metrics.evaluate`'s metrics), with the model and data as
    :func:`unlearn` takes them: any module returning a mapping task -> output (called as
    ``unlearn`` calls it, several inputs unpacked), or a
    :class:`~mtunlearn_ext.models.MultiTaskModel`; data as a data set, a tuple ``(inputs,
    targets[, supervision])`` or a torch ``Dataset`` / ``DataLoader``. ``tasks`` as for
    ``unlearn`` (default: a data set's own). The model is evaluated in eval mode without
    gradients and left as it was. E.g. the forget rows before and after a request:
    ``evaluate(model, (x[ids], {t: y[t][ids] for t in y}), tasks=tasks)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"evaluate: `model` must be an nn.Module returning task -> output, got "
                        f"{type(model).__name__}")
    check_positive_int(batch_size, "batch_size", "evaluate")
    if tasks is None:
        if not isinstance(data, MultiTaskDataset):
            raise TypeError("evaluate: `tasks` is needed for data given as a tuple or torch "
                            "dataset (a mapping task -> kind, or TaskSpecs, as for unlearn)")
        tasks = data.tasks
    data = cast(DataLike, _read_in(data, tasks, "data", "evaluate"))
    own_split = _has_own_split(model, None, None)
    specs = _task_specs(tasks, [data], _predicted_classes(model, not own_split, data, tasks),
                        ["data"], op="evaluate")
    dataset = _as_dataset(data, specs, "data", op="evaluate")
    dataset.check_values("evaluate: `data`")
    measured = cast(MultiTaskModel, model if own_split else _SplitModel(model, (), {}))
    return evaluate_metrics(measured, dataset, batch_size=batch_size)


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists and tuples) replaced
    by ``None``, JSON's ``null``; everything else as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_finite_or_none(v) for v in value)
    return value


# -- the UIS floor on unlearn()'s forms of model and data ----------------------------------------

#: What ``uis_floor``'s ``tasks`` may be: names (or specs) of the tasks UIS averages over, or, as
#: for :func:`unlearn`, a mapping task -> kind (or spec), which tuple data needs.
UISTasks = Union[Sequence[Union[TaskSpec, str]], Mapping[str, Union[str, TaskSpec]]]

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
        unpack = not _has_own_split(model, None, None)
        # Classes are counted on the tuples and on a data set holding every task (one that
        # lacks some is refused by name afterwards).
        counted = [(label, d) for label, d in data
                   if not isinstance(d, MultiTaskDataset) or set(tasks) <= set(d.task_names)]
        return _task_specs(tasks, [d for _, d in counted],
                           _predicted_classes(model, unpack, first_tuple, tasks),
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


def uis_floor(model: nn.Module, reference: DataLike, unseen: DataLike, forget_size: int, *,
              tasks: UISTasks | None = None, draws: int = 200, seed: int = 0,
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
            validation split, instances held back from training); never ``reference``.
            Both: a :class:`~mtunlearn_ext.data.MultiTaskDataset` or ``(inputs, targets[,
            supervision])`` (:data:`DataLike`; a supervision mask's columns follow ``tasks``;
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
    measured = cast(MultiTaskModel, model if _has_own_split(model, None, None)
                    else _SplitModel(model, (), {}))
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
        _check_data_like(value, label, "uis_floor")
    specs = _uis_floor_specs(model, tasks, data)
    names = [spec.name for spec in specs]
    converted = []
    for label, value in data:
        if not isinstance(value, MultiTaskDataset):
            # Only the measured tasks' targets: the data may carry every task of the model (as
            # for unlearn), and UIS averages over some of them.
            own = cast(tuple, value)
            kept = {t: v for t, v in own[1].items() if t in names}
            value = _as_dataset(cast(DataLike, (own[0], kept, *own[2:])), specs, label,
                                op="uis_floor")
        converted.append(value)
    return _measure_uis_floor(measured, converted[0], converted[1], forget_size, tasks=names,
                              draws=draws, seed=seed, batch_size=batch_size,
                              original_test=original_test)
