"""The caller's data in the project's data contract: tuples ``(inputs, targets[,
supervision])``, torch datasets and loaders, and data sets read into a
:class:`~mtunlearn_ext.data.MultiTaskDataset`, checked with errors that name the argument (and
how it names its instances: ids of a data set, the ``"id"`` instances carry, or row
positions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext.api._entry import entry
from mtunlearn_ext.api._types import InMemoryData
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec, labelled_rows
from mtunlearn_ext.data.gathering import _gather
from mtunlearn_ext.data.inputs import check_inputs, map_leaves, numpy_hint, take_rows
from mtunlearn_ext.data.task_forms import reading_specs
from mtunlearn_ext.data.request import ForgetRequest, task_names


def read_in(data: object, tasks: Sequence[TaskSpec] | Mapping[str, str | TaskSpec], what: str,
            op: str | None = None, *, keep_ids: bool = False) -> object:
    """A torch ``Dataset`` or ``DataLoader`` given as ``what``, read into memory by
    :func:`~mtunlearn_ext.data.gather`; other data as it is. Instances that carry no ``"id"``
    are named by position, ``0..N-1`` (a map-style dataset's indices), as a tuple's rows are,
    and come back as a tuple. With ``keep_ids``, instances (or a loader's batches) that carry
    an ``"id"`` come back as a :class:`MultiTaskDataset` with those ids, so that they name the
    instances as a data set's own ids do (its tasks are placeholders when ``tasks`` gives
    kinds: :func:`with_tasks` puts the real ones in); without, the ids are dropped (a caller
    that names no instance, such as :func:`evaluate`). Rows that carry ids are put in the order
    of their ids: a shuffling loader reads them in a random order, which would otherwise change
    the run (minibatches are drawn by row) with the global random state, and a dataset and a
    loader over it then give the same run."""
    op = entry() if op is None else op
    if isinstance(data, MultiTaskDataset) or not isinstance(
            data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
        return data
    # A task given by kind: its classes are counted on the tuple afterwards, as for any tuple.
    specs = reading_specs(tasks, op)
    try:
        read, own_ids = _gather(data, specs)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{op}: `{what}`: {error}") from None
    if not (keep_ids and own_ids):
        return (read.inputs, read.targets, read.supervision)
    order = torch.argsort(read.ids)
    if not torch.equal(order, torch.arange(len(order))):
        read = MultiTaskDataset(take_rows(read.inputs, order),
                                {t: v[order] for t, v in read.targets.items()}, read.tasks,
                                read.ids[order], read.supervision[order])
    return read


def with_tasks(data: object, specs: Sequence[TaskSpec]) -> object:
    """A data set :func:`read_in` made (with the ids its instances carry) with the task specs
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


def check_data_like(data: object, what: str, op: str | None = None, *,
                    reads_torch_data: bool = True) -> None:
    """Refuse, naming ``what``, a ``data`` that is neither a :class:`MultiTaskDataset` nor
    ``(inputs, targets[, supervision])`` with ``targets`` a mapping: ``(ids, mask, targets)``,
    several inputs not grouped into one tuple, would otherwise read ``mask`` as the targets.
    ``reads_torch_data``: whether ``op`` reads a torch ``Dataset`` / ``DataLoader`` in itself
    (:func:`read_in`, before this check), which the message then offers."""
    op = entry() if op is None else op
    if isinstance(data, MultiTaskDataset):
        return
    if not isinstance(data, tuple) or len(data) not in (2, 3):
        hint = ""
        if isinstance(data, list) and _reads_as_inputs_and_targets(data):
            hint = f"; got a list [inputs, targets]: pass it as a tuple, `tuple({what})`"
        elif isinstance(data, (torch.utils.data.Dataset, torch.utils.data.DataLoader)):
            hint = (f"; got a {type(data).__name__}: read it into memory first, "
                    f"mtunlearn_ext.data.gather({what}, tasks=[TaskSpec(...), ...])")
        elif isinstance(data, (list, tuple)):
            hint = (f"; got a {type(data).__name__} of {len(data)} items: read instances "
                    f"with mtunlearn_ext.data.gather({what}, tasks=[TaskSpec(...), ...]) "
                    "(a MultiTaskDataset)" + (", or put them in a torch Dataset (a class "
                                              "with __len__ and __getitem__)"
                                              if reads_torch_data else ""))
        forms = ("a MultiTaskDataset, (inputs, targets[, supervision]) or a torch Dataset / "
                 "DataLoader of instances" if reads_torch_data else
                 "a MultiTaskDataset or (inputs, targets[, supervision])")
        raise TypeError(f"{op}: `{what}` must be {forms}{hint}")
    if not isinstance(data[1], Mapping):
        raise TypeError(f"{op}: `{what}`[1] must be the targets, a mapping task -> "
                        f"[N, ...] tensor, got {type(data[1]).__name__}; several inputs go "
                        f"in one tuple or dict: ((ids, mask), targets)")
    for name, value in data[1].items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            got = type(value).__name__ if not isinstance(value, torch.Tensor) else "a 0-d tensor"
            raise TypeError(f"{op}: `{what}` targets of task {name!r} must be a tensor "
                            f"[N, ...] (one row per instance), got {got}{numpy_hint(value)}")
    on_meta = _meta_part(data)
    if on_meta is not None:  # the checks and metrics read values (torch: NotImplementedError)
        raise ValueError(f"{op}: `{what}`: {on_meta} on the meta device, which holds no "
                         "values; give the data itself")
    if len(data) == 3:
        mask = data[2]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
            got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise TypeError(f"{op}: `{what}`[2], the supervision mask, must be a bool tensor "
                            f"[N, T] (one column per task, in the order of `tasks`), got {got}"
                            + _mask_hint(mask, list(data[1])))


def _mask_hint(mask: object, target_names: Sequence[str]) -> str:
    """How to write a supervision mask given in another common form: one ``[N]`` column per
    task in a dict (as the targets are), or 0/1 numbers."""
    if isinstance(mask, Mapping):
        columns = ", ".join(f"mask[{t!r}]" for t in target_names)
        return (f": stack the columns in the order of `tasks`, torch.stack([{columns}], "
                f"dim=1).bool()")
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool and mask.dim() == 2:
        return ": mark the supervised pairs True, mask.bool() for 0/1 values"
    return ""


def _reads_as_inputs_and_targets(items: list[Any]) -> bool:
    """Whether a list of 2 or 3 reads as ``[inputs, targets(, mask)]`` rather than as so many
    instances: every tensor of the inputs and the targets has the same leading size, rows (an
    instance's tensors are one row each, of sizes that need not agree)."""
    if len(items) not in (2, 3) or not isinstance(items[1], Mapping):
        return False
    inputs = items[0]
    leaves = ([inputs] if isinstance(inputs, torch.Tensor) else
              list(inputs.values()) if isinstance(inputs, Mapping) else
              list(inputs) if isinstance(inputs, tuple) else [None])
    tensors = [*leaves, *items[1].values()]
    if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tensors):
        return False
    return len({t.shape[0] for t in tensors}) == 1


def _meta_part(data: tuple[Any, ...]) -> str | None:
    """Which part of tuple ``data`` is a meta tensor (the inputs, a task's targets, the mask;
    inputs may be a tensor or a tuple / mapping of them), or None."""
    def meta(value: object) -> bool:
        if isinstance(value, torch.Tensor):
            return value.is_meta
        if isinstance(value, (tuple, list)):
            return any(meta(v) for v in value)
        if isinstance(value, Mapping):
            return any(meta(v) for v in value.values())
        return False

    if meta(data[0]):
        return "inputs"
    for name, value in data[1].items():
        if meta(value):
            return f"targets of task {name!r}"
    return "supervision mask" if len(data) == 3 and meta(data[2]) else None


def as_dataset(data: InMemoryData, specs: Sequence[TaskSpec], what: str,
                like: MultiTaskDataset | None = None, id_offset: int = 0, *,
                op: str | None = None) -> MultiTaskDataset:
    """``data`` in the data contract. Tasks without a target tensor get an all-unsupervised
    placeholder column shaped like ``like``'s (for a forget set listing only target tasks)."""
    op = entry() if op is None else op
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
    check_data_like(data, what, op)
    inputs, targets = data[0], dict(data[1])
    n = check_inputs(inputs, f"{op}: the inputs of `{what}`")
    names = [s.name for s in specs]
    unknown = [t for t in targets if t not in names]
    if unknown:
        subset = all(t in targets for t in names)  # every task given, and others besides
        hint = (f": name them in `tasks` too, or leave their targets out ({{t: y[t] for t in "
                f"{names}}})" if subset else "")
        raise UnknownNameError(f"{op}: `{what}` has targets for unknown tasks {unknown}; the tasks "
                               f"are {names}{hint}")
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
            raise UnknownNameError(f"{op}: `{what}` has no targets for task {spec.name!r}")
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
    try:
        return MultiTaskDataset(inputs, full_targets, specs, ids, supervision)
    except (TypeError, ValueError) as error:  # said of `what`, the data set the caller gave
        reason = str(error).removeprefix("MultiTaskDataset: ")
        raise type(error)(f"{op}: `{what}`: {reason}") from None


def ids_named_by_text(what: str, given: object, own_ids: bool) -> str:
    """The report's ``ids_named_by`` for the request's ids coming from ``what`` (``given``, as
    passed; ``own_ids``: read with ids of the caller's)."""
    if isinstance(given, MultiTaskDataset):
        return f"the ids of `{what}`"
    if own_ids:
        return f"the 'id' each instance of `{what}` carries"
    return f"row positions in `{what}`"


def target_task_names(target_tasks: object) -> list[str] | None:
    """``target_tasks`` as a list of names (``None``: not given), read as
    :class:`ForgetRequest` reads them (:func:`~mtunlearn_ext.data.request.task_names`), its
    errors naming the entry point."""
    names = task_names(target_tasks, entry())
    return None if names is None else list(names)


def check_values_of(data: MultiTaskDataset, what: str, own_ids: bool,
                     rows: torch.Tensor | None = None) -> None:
    """:meth:`MultiTaskDataset.check_values` naming the argument ``what`` and its row. ``rows``:
    the rows the problem reads (default: all; a row of ``train_data`` with no supervised pair
    is in neither set, so its inputs may hold anything). A tuple's ids (``own_ids`` false),
    made by :func:`unlearn` and possibly offset past another set's, are shown as its rows.
    Clean data costs the one check; the rest runs only to word a failure. Negative depth
    targets, which read as unlabelled pixels, are warned of."""
    try:
        data.check_values(f"{entry()}: `{what}`")
        failed = False
    except ValueError:
        partial = rows is not None and rows.numel() != len(data)
        if own_ids and not partial:
            raise
        failed = True
    if failed:  # out of the handler: its error alone, not chained to the first wording
        _check_rows_read(data, what, own_ids, rows)
    data.warn_of_negative_depths(f"{entry()}: `{what}`")


def _check_rows_read(data: MultiTaskDataset, what: str, own_ids: bool,
                     rows: torch.Tensor | None) -> None:
    """:func:`check_values_of`'s second look, after a failure: only the rows read, and the
    rows of a tuple named as such."""
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
                     data.supervision).check_values(f"{entry()}: `{what}`")


def check_request_ids(request: ForgetRequest, full: MultiTaskDataset, given: object,
                       own_ids: bool, what: str = "`forget_request`",
                       removed_before: Sequence[ForgetRequest] = (),
                       removed_by: str = "`earlier_requests`") -> None:
    """Refuse, naming ``what`` (the argument) and the ids ``train_data`` (``given``, as passed;
    ``own_ids``: read with ids of the caller's) has, a request for ids that are not in
    ``train_data``; those that ``removed_before`` (the requests ``removed_by`` names) removed
    are said to be: their rows were dropped once their data were erased."""
    if not isinstance(request, ForgetRequest):
        raise TypeError(f"{entry()}: {what} must be a ForgetRequest (ForgetRequest.create"
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
    # The chain's usual case: an id removed earlier, its rows dropped when its data were erased
    # (as the docs ask); "not in train_data" alone did not say why it had gone.
    removed = {i for r in removed_before for i in r.instance_ids} if own_ids else set()
    gone = [i for i in unknown if i in removed]
    why = (f"; {len(gone)} of them ({gone[:10]}{' ...' if len(gone) > 10 else ''}) were removed "
           f"by {removed_by} and their rows dropped since (their data erased): nothing of them "
           f"is left to forget, leave them out" if gone else "")
    raise UnknownNameError(f"{entry()}: {what} names instance ids that are not in `train_data`: "
                           f"{shown}; {valid}{why}")
