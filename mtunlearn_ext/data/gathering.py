"""Reading a torch ``Dataset``, a ``DataLoader`` or any iterable of instances into a
:class:`~mtunlearn_ext.data.MultiTaskDataset`.

The unlearning methods draw minibatches of arbitrary rows at every step, and compare forget,
retain and held-out rows by id, so they read data held in tensors. Data usually arrives one
instance at a time instead, with some tasks' labels missing for some instances. :func:`gather`
reads it once, in order, into one ``[N, ...]`` tensor per input and per task, plus the ``[N, T]``
supervision mask that says which (instance, task) pairs carry a label. Each instance is copied
into those tensors as it is read (a ``DataLoader``'s batches too), so a source with a length
(for a loader, its sampler's) is held once in memory; one without fills blocks joined at the
end (twice, briefly). A length that nothing guarantees (a user's sampler, an iterable's
``__len__``) is believed once an eighth of it has been read (an eighth more, briefly): one that
overstates allocates at most eight times the rows it gives (or 1024 rows).

An instance (an item of the source) is either

* ``(input, targets)``: ``targets`` maps a task name to its label; a task absent from the
  mapping, or mapped to ``None``, has no label for this instance; or
* ``{"input": ..., "targets": {...}}``, optionally with ``"supervision"`` (``[T]`` bool, in the
  order of ``tasks``) and ``"id"``: the layout of a ``MultiTaskDataset``'s own items.

``input`` is a tensor, a tuple or list of tensors, or a dict name -> tensor (a model with several
inputs, called ``model(*x)`` / ``model(**x)``); NumPy arrays and numbers are converted with
``torch.as_tensor``, and a tuple or list holding only numbers is one feature vector. Every
instance must have the same shapes (pad variable-length sequences in the dataset, with a mask
input and the task's ``ignore_index``): the error names the first instance that differs.

A ``DataLoader``'s batches are collated instances in the same two layouts (the default collate
function makes them). Its rows are read in its order, so a shuffling loader is refused unless
its batches carry ``"id"``: positions in a random order name no instance.
"""

from __future__ import annotations

import multiprocessing
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._random import forked_generators
from mtunlearn_ext.data.base import (
    MultiTaskDataset,
    TaskSpec,
    labelled_rows,
    neutral_unsupervised,
    task_spec_list,
)
from mtunlearn_ext.data.inputs import Inputs, describe, named_leaves
from mtunlearn_ext.data.task_forms import TasksSpec, reading_specs, task_specs, tasks_from_data

__all__ = ["gather"]


def _id_tensor(value: object, what: str) -> torch.Tensor:
    """:func:`_tensor` for ids, refusing strings with what to carry instead."""
    if isinstance(value, str) or (isinstance(value, (tuple, list))
                                  and any(isinstance(v, str) for v in value)):
        # A user's ids are often strings (user names, file names); a ForgetRequest names
        # integers, so the caller's own mapping must say which integer is which instance.
        raise TypeError(f"gather: {what} must be integer ids (a tensor, a NumPy array, a "
                        f"number or a list of numbers), got the string "
                        f"{_first_string(value)!r}: carry integer ids instead (a dict from your "
                        f"ids to 0..N-1, say) and name those integers in the ForgetRequest")
    return _tensor(value, what)


def _tensor(value: object, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic, numbers.Number)):
        return torch.as_tensor(value)
    if isinstance(value, (tuple, list)):  # numbers, or nested lists of them
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"gather: {what} must be a tensor, a NumPy array, a number or a "
                            f"list of numbers; torch.as_tensor refused it: {error}") from None
    raise TypeError(f"gather: {what} must be a tensor, a NumPy array, a number or a list of "
                    f"numbers, got {type(value).__name__}")


def _first_string(value: str | tuple[object, ...] | list[object]) -> object:
    return value if isinstance(value, str) else next(v for v in value if isinstance(v, str))


def _input_structure(value: object, what: str) -> Inputs:
    """One instance's input as tensors, keeping a tuple / list / dict of several inputs."""
    if isinstance(value, Mapping):
        return {str(k): _tensor(v, f"{what}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(v, numbers.Number) for v in value):
            return torch.as_tensor(value)  # a feature vector, not several scalar inputs
        parts = [_tensor(v, f"{what}[{i}]") for i, v in enumerate(value)]
        return parts if isinstance(value, list) else tuple(parts)
    return _tensor(value, what)


class _Instance:
    """One source row, read into tensors."""

    __slots__ = ("input", "targets", "supervision", "id")

    def __init__(self, input: Inputs, targets: dict[str, torch.Tensor | None],
                 supervision: torch.Tensor | None, id: int | None) -> None:
        self.input = input
        self.targets = targets
        self.supervision = supervision
        self.id = id


def _unpack(item: object, where: str, names: Sequence[str]) -> tuple[object, Mapping[str, Any],
                                                                    object, object]:
    """``(input, targets, supervision or None, id or None)`` of one item or collated batch."""
    if isinstance(item, Mapping):
        if "input" not in item or "targets" not in item:
            raise TypeError(f"gather: {where} is a dict with keys {sorted(map(str, item))}; an "
                            f"instance as a dict needs 'input' and 'targets' (and optionally "
                            f"'supervision', 'id'), or give (input, targets) tuples")
        unknown = set(item) - {"input", "targets", "supervision", "id"}
        if unknown:
            raise ValueError(f"gather: {where} has keys {sorted(map(str, unknown))} besides "
                             f"'input', 'targets', 'supervision' and 'id'")
        raw_input, targets = item["input"], item["targets"]
        supervision, identity = item.get("supervision"), item.get("id")
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        raw_input, targets = item
        supervision = identity = None
    else:
        got = (f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list))
               else type(item).__name__)
        raise TypeError(f"gather: {where} must be (input, {{task: label}}) or a dict with "
                        f"'input' and 'targets', got {got}")
    if not isinstance(targets, Mapping):
        raise TypeError(f"gather: the targets of {where} must be a mapping task -> label, got "
                        f"{type(targets).__name__}")
    unknown_tasks = [str(k) for k in targets if k not in names]
    if unknown_tasks:
        raise ValueError(f"gather: {where} has labels of unknown tasks {unknown_tasks}; `tasks` "
                         f"names {list(names)}")
    return raw_input, targets, supervision, identity


def _instance(item: object, index: int, names: Sequence[str]) -> _Instance:
    where = f"instance {index}"
    raw_input, targets, supervision, identity = _unpack(item, where, names)
    mask = None
    if supervision is not None:
        mask = _tensor(supervision, f"the supervision of {where}")
        if mask.dtype != torch.bool or mask.shape != (len(names),):
            raise ValueError(f"gather: the supervision of {where} must be bool [{len(names)}] "
                             f"(one per task of `tasks`), got {mask.dtype} {tuple(mask.shape)}")
    return _Instance(_input_structure(raw_input, f"the input of {where}"),
                     {name: None if targets.get(name) is None
                      else _tensor(targets[name], f"the {name!r} label of {where}")
                      for name in names},
                     mask, None if identity is None else _integer_id(identity, where))


def _integer_id(value: object, where: str) -> int:
    tensor = _id_tensor(value, f"the id of {where}")
    if tensor.numel() != 1 or tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"gather: the id of {where} must be one integer, got {value!r:.60}")
    return int(tensor.item())


class _Length(NamedTuple):
    """The rows a source says it gives (its ``len``, for a loader its sampler's), and whether
    it gives exactly those: a map-style dataset read at its indices here, or torch's own
    samplers, yield their length; a user's sampler or iterable may say more or less."""

    rows: int
    exact: bool


class _Column:
    """One ``[N, ...]`` tensor, filled as the source gives its rows: each row (or collated
    batch of rows) is copied as it comes into blocks of rows made at need, so a source that
    hands out one buffer rewritten for every instance or batch is read right, and the data is
    held once. With ``N`` known (``length``) there is one block of ``N`` rows, the result
    itself (rows kept and stacked at the end held every array twice: 779 MiB peak for 375 MiB
    of data); otherwise blocks of :data:`_BLOCK_ROWS`, joined at the end. A length that is not
    exact is believed once the rows asked for reach an eighth of it (:data:`_BELIEVED`): the
    blocks so far are copied into its block then. Believed at once, a sampler claiming 10**7
    rows made 307 MiB of zeros for 1000 rows read (10**9: gigabytes); now at most eight times
    the rows given, or :data:`_BLOCK_ROWS`. Rows past ``N`` go into blocks after it. Rows never
    given (an instance without the task's label) are zeros. Rows of other dtypes are promoted
    as ``torch.stack`` promotes them; rows of another shape or device are refused,
    ``mismatch(item, given, first)`` saying so (``item``: the instance's or batch's index;
    ``given`` and ``first``: what it and the first one gave)."""

    def __init__(self, length: _Length | None,
                 mismatch: Callable[[int, torch.Tensor, torch.Tensor], str]) -> None:
        self.length = length
        self.block_rows = _BLOCK_ROWS
        self.mismatch = mismatch
        self.first: torch.Tensor | None = None
        self.row_shape: tuple[int, ...] = ()
        # blocks[0] is the length's block once it is made (``head`` rows; 0 before), the
        # others have block_rows rows each: a row's block is found by a division.
        self.blocks: list[torch.Tensor] = []
        self.head = 0
        self.capacity = 0

    def put(self, index: int, row: torch.Tensor) -> None:
        """Row ``index``: instance ``index`` of the source."""
        self.put_rows(index, row.unsqueeze(0), index, row)

    def put_rows(self, start: int, rows: torch.Tensor, item: int, given: torch.Tensor) -> None:
        """Rows ``start`` to ``start + len(rows) - 1``, given by ``item`` as ``given``."""
        if self.first is None:
            self.first, self.row_shape = given, tuple(rows.shape[1:])
        elif tuple(rows.shape[1:]) != self.row_shape or rows.device != self.first.device:
            raise ValueError(self.mismatch(item, given, self.first))
        if self.blocks and rows.dtype != self.blocks[0].dtype:
            promoted = torch.promote_types(self.blocks[0].dtype, rows.dtype)
            self.blocks = [block.to(promoted) for block in self.blocks]
        end = start + len(rows)
        self._reserve(end, self.blocks[0].dtype if self.blocks else rows.dtype, rows.device)
        with torch.no_grad():
            position = start
            while position < end:  # a batch may straddle two blocks
                block, offset = self._locate(position)
                taken = min(len(self.blocks[block]) - offset, end - position)
                self.blocks[block][offset:offset + taken] = \
                    rows[position - start:position - start + taken]
                position += taken

    def _locate(self, position: int) -> tuple[int, int]:
        if position < self.head:
            return 0, position
        block, offset = divmod(position - self.head, self.block_rows)
        return block + (1 if self.head else 0), offset

    def _reserve(self, end: int, dtype: torch.dtype, device: torch.device) -> None:
        """Blocks for rows up to ``end``."""
        if self.capacity >= end:
            return
        length = self.length
        if not self.head and length is not None and length.rows and (
                length.exact or length.rows <= max(self.block_rows, _BELIEVED * end)):
            whole = torch.zeros((max(length.rows, end), *self.row_shape), dtype=dtype,
                                device=device)
            with torch.no_grad():
                for index, block in enumerate(self.blocks):
                    whole[index * self.block_rows:(index + 1) * self.block_rows] = block
            self.blocks, self.head = [whole], len(whole)
            self.capacity = len(whole)
        while self.capacity < end:
            self.blocks.append(torch.zeros((self.block_rows, *self.row_shape), dtype=dtype,
                                           device=device))
            self.capacity += self.block_rows

    def result(self, rows: int) -> torch.Tensor | None:
        """The ``[rows, ...]`` tensor (``None`` when no row was given)."""
        if self.first is None:
            return None
        # Unlabelled rows after the last label.
        self._reserve(rows, self.blocks[0].dtype, self.blocks[0].device)
        if len(self.blocks) == 1 or rows <= len(self.blocks[0]):
            block = self.blocks[0]
            # A view of a block the source did not fill would keep all of it alive.
            return block if rows == len(block) else block[:rows].clone()
        pieces, left = [], rows
        for block in self.blocks:
            pieces.append(block[:left])
            left -= len(pieces[-1])
            if not left:
                break
        return torch.cat(pieces)


#: Rows per block of a :class:`_Column` whose source does not say its length.
_BLOCK_ROWS = 1024

#: A length that is not exact is believed once the rows asked for reach ``1 / _BELIEVED`` of
#: it: more makes the copy into its block smaller and an overstating length costlier.
_BELIEVED = 8


def _mismatch(what: str, unit: str, first_one: str, advice: str
              ) -> Callable[[int, torch.Tensor, torch.Tensor], str]:
    """The message of a :class:`_Column` refusing ``what`` (an input or a label) of ``unit``
    (an instance or a batch) ``index`` for its device or shape, against ``first_one``."""
    def message(index: int, given: torch.Tensor, first: torch.Tensor) -> str:
        if given.device != first.device:
            return (f"gather: {what} is on {given.device} in {unit} {index} but on "
                    f"{first.device} in {first_one}; every {unit} needs one device")
        return (f"gather: {what} has shape {tuple(given.shape)} in {unit} {index} but "
                f"{tuple(first.shape)} in {first_one}; {advice}")
    return message


def _input_mismatch(path: str) -> Callable[[int, torch.Tensor, torch.Tensor], str]:
    return _mismatch(f"the input{path}", "instance", "instance 0",
                     "every instance needs the same shape (pad sequences to one length, with a "
                     "mask input and the task's ignore_index)")


def _label_mismatch(name: str) -> Callable[[int, torch.Tensor, torch.Tensor], str]:
    return _mismatch(f"the {name!r} label", "instance", "the first labelled instance",
                     "every instance needs the same shape (pad sequences to one length, with "
                     "the task's ignore_index)")


class _InputColumns:
    """One :class:`_Column` per leaf of the inputs (a tensor, or each tensor of a tuple, list
    or dict), in the structure of the first instance or batch (``what``: which of the two)."""

    def __init__(self, length: _Length | None, what: str,
                 mismatch: Callable[[str], Callable[[int, torch.Tensor, torch.Tensor], str]]
                 ) -> None:
        self.length = length
        self.what = what
        self.mismatch = mismatch
        self.structure: Inputs | None = None
        self.paths: list[str] = []
        self.columns: list[_Column] = []

    def leaves(self, index: int, inputs: Inputs) -> list[tuple[_Column, str, torch.Tensor]]:
        """``(column, path, leaf)`` of each leaf of ``inputs``, the ``index``-th given."""
        leaves = named_leaves(inputs)
        if self.structure is None:
            self.structure = inputs
            self.paths = [path for path, _ in leaves]
            self.columns = [_Column(self.length, self.mismatch(path)) for path in self.paths]
        elif [p for p, _ in leaves] != self.paths or type(inputs) is not type(self.structure):
            raise ValueError(f"gather: the input of {self.what} {index} is {describe(inputs)}, "
                             f"{self.what} 0's is {describe(self.structure)}: every "
                             f"{self.what} needs the same structure")
        return [(column, path, leaf) for column, (path, leaf) in zip(self.columns, leaves)]

    def tensors(self, rows: int) -> Inputs:
        """The ``[rows, ...]`` inputs, in the first one's structure."""
        joined: list[torch.Tensor] = []
        for column in self.columns:
            tensor = column.result(rows)
            assert tensor is not None  # every instance or batch gave every input
            joined.append(tensor)
        first = self.structure
        if isinstance(first, torch.Tensor):
            return joined[0]
        if isinstance(first, Mapping):
            return dict(zip(first, joined))
        return joined if isinstance(first, list) else tuple(joined)


class _InstanceRows:
    """The instances read so far, written into one column per input leaf and per task as they
    come (:class:`_Column`): only the small per-row facts (ids, which labels were given, the
    instances' own supervision) are kept per instance."""

    def __init__(self, specs: Sequence[TaskSpec], length: _Length | None) -> None:
        self.specs = specs
        self.rows = 0
        self.inputs = _InputColumns(length, "instance", _input_mismatch)
        self.labels = {spec.name: _Column(length, _label_mismatch(spec.name)) for spec in specs}
        self.given: dict[str, list[bool]] = {spec.name: [] for spec in specs}
        self.masks: list[torch.Tensor | None] = []
        self.ids: list[int | None] = []

    def add(self, index: int, instance: _Instance) -> None:
        for column, _, leaf in self.inputs.leaves(index, instance.input):
            column.put(index, leaf)
        for name, label in instance.targets.items():
            self.given[name].append(label is not None)
            if label is not None:
                self.labels[name].put(index, label)
        self.masks.append(instance.supervision)
        self.ids.append(instance.id)
        self.rows += 1

    def input_tensors(self) -> Inputs:
        return self.inputs.tensors(self.rows)

    def task_column(self, spec: TaskSpec, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's ``[N, ...]`` targets (the kind's "no label" value on unlabelled rows)
        and ``[N]`` bool: rows with a label that the instance's own supervision, if any,
        keeps."""
        target = self.labels[spec.name].result(self.rows)
        if target is None:
            raise ValueError(f"gather: no instance has a label of task {spec.name!r}; a task "
                             f"without labels cannot be read (leave it out of `tasks`)")
        given = torch.tensor(self.given[spec.name], dtype=torch.bool)
        target = neutral_unsupervised(spec, target, given)
        supervised = given & labelled_rows(spec, target).cpu()
        if any(mask is not None for mask in self.masks):
            if any(mask is None for mask in self.masks):
                raise ValueError("gather: some instances carry 'supervision' and others do not")
            supervised &= torch.stack([mask[column] for mask in self.masks
                                       if mask is not None]).cpu()
        return target, supervised


def _known_length(source: object) -> int | None:
    """How many instances ``source`` gives, where it says (``len``), else ``None`` (also for a
    ``__len__`` that raises ``NotImplementedError``, as torch's base ``Sampler`` and
    ``IterableDataset`` may: the rows then fill blocks)."""
    try:
        count = len(source)  # type: ignore[arg-type]
    except (TypeError, NotImplementedError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


#: Samplers that yield exactly their ``len`` (a subclass may not: it is not taken for one).
_EXACT_SAMPLERS = (SequentialSampler, RandomSampler, SubsetRandomSampler,
                   WeightedRandomSampler, DistributedSampler)


def _length(source: object, exact: bool) -> _Length | None:
    rows = _known_length(source)
    return None if rows is None else _Length(rows, exact)


def _instances_length(source: object) -> _Length | None:
    """The length of a source of instances: exact for a map-style dataset (read at its
    indices), a list or tuple, and a loader of instances through one of torch's samplers."""
    if isinstance(source, DataLoader):
        exact = not isinstance(source.dataset, IterableDataset) and type(
            source.sampler) in _EXACT_SAMPLERS
    else:
        exact = isinstance(source, (list, tuple)) or (
            isinstance(source, Dataset) and not isinstance(source, IterableDataset))
    return _length(source, exact)


_SHUFFLED = ("gather: the DataLoader shuffles (its sampler is not sequential, or its workers "
             "hand out batches as they finish: in_order=False), so the "
             "position of a row names no instance: pass the dataset itself, a loader with "
             "shuffle=False, `ids` in the loader's order (in_order=False has none), or items "
             "with an 'id'")


def _ids(own: Sequence[object], ids: object, ordered: bool, what: str) -> object:
    """The ids to give the rows: ``ids``, else the ones the source carries (``own``, one per
    instance or batch), else ``None`` (positions), which only an ordered source may use."""
    carried = [i is not None for i in own]
    if ids is not None:
        if any(carried):
            raise ValueError(f"gather: the {what} carry their own 'id'; do not pass `ids` too")
        return ids
    if own and all(carried):
        return own
    if any(carried):
        raise ValueError(f"gather: some {what} carry an 'id' and others do not")
    if not ordered:
        raise ValueError(_SHUFFLED)
    return None  # positions 0..N-1, the dataset's own indices


def _distinct(row_ids: object, what: str) -> None:
    """Refuse ids the source carries that name two rows: a request for such an id would name
    two instances (the data set refuses them too, but without saying where they are)."""
    values = torch.as_tensor(row_ids).reshape(-1)
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    if unique.numel() == values.numel():
        return
    first = int(counts.gt(1).nonzero()[0])
    rows = (inverse == first).nonzero().flatten().tolist()
    raise ValueError(f"gather: the {what} carry duplicate ids: id {int(unique[first])} names "
                     f"rows {rows[:5]} (in the order read; {int(counts.gt(1).sum())} ids "
                     f"repeated); each instance needs an id of its own")


def _as_finished(loader: DataLoader[Any]) -> bool:
    """Whether ``loader``'s workers hand out its items as they finish (``in_order=False``),
    in an order that changes from one reading to the next."""
    return loader.num_workers > 0 and getattr(loader, "in_order", True) is False


def _in_order(loader: DataLoader[Any]) -> bool:
    """Whether ``loader`` reads its dataset in the dataset's own order."""
    if _as_finished(loader):
        return False
    if isinstance(loader.dataset, IterableDataset):
        return loader.num_workers == 0  # workers interleave their shares of the stream
    if loader.batch_sampler is None:
        return isinstance(loader.sampler, SequentialSampler)
    # torch's own BatchSampler keeps its sampler's order; another batch sampler (given as
    # batch_sampler=) may hand out batches in an order of its own (bucketing by length),
    # whatever sampler it holds.
    return (type(loader.batch_sampler) is BatchSampler
            and isinstance(loader.batch_sampler.sampler, SequentialSampler))


def _batch(batch: object, index: int, names: Sequence[str]) -> _Instance:
    """A collated batch, its rows still stacked."""
    raw_input, targets, supervision, identity = _unpack(batch, f"batch {index}", names)
    return _Instance(_input_structure(raw_input, f"the input of batch {index}"),
                     {name: None if targets.get(name) is None
                      else _tensor(targets[name], f"the {name!r} labels of batch {index}")
                      for name in names},
                     None if supervision is None else _tensor(supervision, "supervision"),
                     None if identity is None else identity)  # type: ignore[arg-type]


def _batch_mismatch(what: str) -> Callable[[int, torch.Tensor, torch.Tensor], str]:
    return _mismatch(what, "batch", "batch 0", "the rows of every batch need one shape (pad "
                     "sequences to one length for the whole data set, not per batch)")


def _loader_rows(loader: DataLoader[Any]) -> _Length | None:
    """How many rows ``loader``'s batches hold in all, where its sampler says (``len``)."""
    if isinstance(loader.dataset, IterableDataset):
        return None
    sampler = getattr(loader.batch_sampler, "sampler", None)
    return _length(sampler, type(loader.batch_sampler) is BatchSampler
                   and type(sampler) in _EXACT_SAMPLERS)


class _BatchRows:
    """A loader's collated batches, written into one column per input leaf and per task as
    they come (:class:`_Column`), so the data is held once and a collate function that
    reuses its buffers is read right; only the batches' supervision masks and ids are kept."""

    def __init__(self, specs: Sequence[TaskSpec], length: _Length | None) -> None:
        self.specs = specs
        self.rows = 0
        self.inputs = _InputColumns(length, "batch",
                                    lambda path: _batch_mismatch(f"the input{path}"))
        self.labels = {spec.name: _Column(length, _batch_mismatch(f"the {spec.name!r} labels"))
                       for spec in specs}
        self.masks: list[torch.Tensor | None] = []
        self.ids: list[object] = []

    def add(self, index: int, batch: _Instance) -> None:
        leaves = self.inputs.leaves(index, batch.input)
        rows = int(leaves[0][2].shape[0]) if leaves[0][2].dim() else 0
        for _, path, leaf in leaves:
            if leaf.dim() == 0 or leaf.shape[0] != rows:
                raise ValueError(f"gather: the input{path} of batch {index} has shape "
                                 f"{tuple(leaf.shape)}; every input of a batch needs one row "
                                 f"per instance ({rows})")
        labels = []
        for spec in self.specs:
            value = batch.targets[spec.name]
            if value is None or value.shape[:1] != (rows,):
                raise ValueError(f"gather: batch {index} holds {rows} instances but its "
                                 f"{spec.name!r} labels are "
                                 f"{'missing' if value is None else tuple(value.shape)}; a "
                                 f"collated batch needs every task's labels, one row per "
                                 f"instance (unlabelled pairs marked by 'supervision')")
            labels.append((self.labels[spec.name], value))
        for column, _, leaf in leaves:
            column.put_rows(self.rows, leaf, index, leaf)
        for column, label in labels:
            column.put_rows(self.rows, label, index, label)
        mask, identity = batch.supervision, batch.id
        self.masks.append(None if mask is None else mask.clone())
        self.ids.append(identity.clone() if isinstance(identity, torch.Tensor) else identity)
        self.rows += rows

    def input_tensors(self) -> Inputs:
        return self.inputs.tensors(self.rows)


def _gather_batches(loader: DataLoader[Any], specs: Sequence[TaskSpec], ids: object
                    ) -> tuple[MultiTaskDataset, bool]:
    names = [spec.name for spec in specs]
    # A batch_sampler= loader's own drop_last is False whatever its batch sampler does.
    if loader.drop_last or getattr(loader.batch_sampler, "drop_last", False) is True:
        raise ValueError("gather: the DataLoader drops its last incomplete batch "
                         "(drop_last=True): those instances would be missing")
    batches = _BatchRows(specs, _loader_rows(loader))
    for index, batch in enumerate(_loaded(loader)):
        batches.add(index, _batch(batch, index, names))
    if not batches.masks:
        raise ValueError("gather: the DataLoader gave no batch")
    targets: dict[str, torch.Tensor] = {}
    columns = []
    masks = batches.masks
    for column, spec in enumerate(specs):
        target = batches.labels[spec.name].result(batches.rows)
        assert target is not None  # every batch gave every task's labels
        supervised = labelled_rows(spec, target).cpu()
        if any(m is not None for m in masks):
            if any(m is None for m in masks):
                raise ValueError("gather: some batches carry 'supervision' and others do not")
            mask = torch.cat([m for m in masks if m is not None])
            if mask.dtype != torch.bool or mask.shape != (len(target), len(specs)):
                raise ValueError(f"gather: the batches' supervision must be bool [B, "
                                 f"{len(specs)}], got {mask.dtype} {tuple(mask.shape)}")
            supervised &= mask[:, column].cpu()
        targets[spec.name] = target
        columns.append(supervised)
    row_ids = _ids(batches.ids, ids, _in_order(loader), "batches")
    if ids is None and row_ids is not None:  # the batches' own: one tensor of ids per batch
        row_ids = torch.cat([_id_tensor(i, "the ids of a batch").reshape(-1)
                             for i in row_ids])  # type: ignore[attr-defined]
        _distinct(row_ids, "batches")
    return MultiTaskDataset(batches.input_tensors(), targets, specs,
                            row_ids,  # type: ignore[arg-type]
                            torch.stack(columns, dim=1)), row_ids is not None


def _loaded(loader: DataLoader[Any]) -> Iterator[object]:
    """The loader's batches. A loader fails to collate instances with a missing label (the
    default collate function cannot batch ``None``) or of different shapes: such an error
    comes back with that reason and the way round it."""
    iterator = iter(loader)
    index = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (TypeError, RuntimeError) as error:
            raise TypeError(f"gather: the DataLoader could not make batch {index} ({error}); "
                            f"a collate function cannot batch instances with a missing (None) "
                            f"label or of different shapes: pass the dataset itself, which "
                            f"gather reads one instance at a time") from error
        yield batch
        index += 1


def _as_list(items: list[object]) -> list[object]:
    return items


def _items(source: object, num_workers: int, batch_size: int,
           multiprocessing_context: str | None = None) -> Iterator[object]:
    if num_workers == 0:
        if isinstance(source, Dataset) and not isinstance(source, IterableDataset) \
                and hasattr(source, "__len__"):
            return (source[i] for i in range(len(source)))
        return iter(source)  # type: ignore[call-overload]
    if isinstance(source, IterableDataset) or not hasattr(source, "__getitem__") \
            or not hasattr(source, "__len__"):
        raise ValueError("gather: `num_workers` > 0 needs a map-style Dataset (with __len__ and "
                         "__getitem__); workers would each read a whole iterable")
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers,  # type: ignore
                        collate_fn=_as_list, multiprocessing_context=multiprocessing_context)
    return (item for batch in loader for item in batch)


def gather(source: Dataset[Any] | DataLoader[Any] | Iterable[Any],
           tasks: TasksSpec | TaskSpec, *, ids: Sequence[int] | torch.Tensor | None = None,
           num_workers: int = 0, batch_size: int = 64,
           multiprocessing_context: str | None = None) -> MultiTaskDataset:
    """Read ``source`` into a :class:`MultiTaskDataset` (the module docstring gives the layouts).

    Args:
        source: a map-style ``Dataset`` (read at indices ``0..len - 1``), an ``IterableDataset``
            or any iterable of instances (read in order), or a ``DataLoader`` of collated
            batches (read in its order; ``drop_last`` refused).
        tasks: the tasks in column order, in the forms :func:`~mtunlearn_ext.unlearn` takes
            (:data:`~mtunlearn_ext.data.task_forms.TasksSpec`): TaskSpecs, or a mapping task ->
            kind (``{"seg": "segmentation"}``) or -> TaskSpec; task names, or ``None`` for every
            task, when ``source`` is a :class:`MultiTaskDataset` (whose specs they pick). Every
            label key of an instance must be one of them. A classification or segmentation
            task given by kind has one class past its largest supervised label (there is no
            model here to say more; a TaskSpec with ``num_classes`` counts a class no
            instance carries).
        ids: the instances' ids, one per row in the order read. Default: the instances' own
            ``"id"`` when they carry one (an id carried twice is refused), else their
            positions ``0..N-1``, which for a map-style dataset are its indices, so
            ``ForgetRequest.create([17])`` forgets ``source[17]``.
        num_workers: worker processes reading a map-style dataset (a ``DataLoader`` that keeps
            the order); 0 reads in this process.
        batch_size: instances per worker task when ``num_workers`` > 0.
        multiprocessing_context: how the workers start (``"fork"``, ``"spawn"`` or
            ``"forkserver"``; default: ``DataLoader``'s, ``fork`` on Linux before Python 3.14).
            A forked worker needs nothing pickled but copies a process that runs threads
            (torch's), which Python 3.12 warns may deadlock; ``"forkserver"`` and ``"spawn"``
            start clean (the dataset must pickle; each worker imports torch first).

    Returns:
        the data set: a pair is supervised when the instance gives its label (not ``None``),
        the label is not the kind's "no label" value (``ignore_index``; a dense map without a
        labelled pixel) and, when instances carry ``"supervision"``, that mask keeps it.
    """
    given = tasks_from_data(tasks, [source], "gather")
    read = _gather(source, reading_specs(given, "gather"), ids=ids, num_workers=num_workers,
                   batch_size=batch_size, multiprocessing_context=multiprocessing_context)[0]
    if not isinstance(given, Mapping):
        return read
    # Tasks given by kind were read with a placeholder class count: now the labels are known.
    specs = task_specs(given, [read], None, ["source"], op="gather")
    return MultiTaskDataset(read.inputs, read.targets, specs, read.ids, read.supervision)


def _gather(source: Dataset[Any] | DataLoader[Any] | Iterable[Any],
            tasks: Sequence[TaskSpec], *, ids: Sequence[int] | torch.Tensor | None = None,
            num_workers: int = 0, batch_size: int = 64,
            multiprocessing_context: str | None = None) -> tuple[MultiTaskDataset, bool]:
    """:func:`gather`, and whether the rows' ids name the instances (the source's own
    ``"id"``, or ``ids``) rather than being their positions ``0..N-1``: a caller that keeps
    the ids apart from positions (``unlearn``, which compares ids with other data sets') needs
    to know, and ids that happen to equal the positions do not say it.

    Reading leaves torch's CPU generator as the caller had it: a loader draws its workers'
    base seed (and a shuffling one its order) from it, and so may a dataset's own
    transforms, which would move the caller's random stream (``unlearn`` promises not to)."""
    with forked_generators("cpu"):
        return _read(source, tasks, ids=ids, num_workers=num_workers, batch_size=batch_size,
                     multiprocessing_context=multiprocessing_context)


def _read(source: Dataset[Any] | DataLoader[Any] | Iterable[Any],
            tasks: Sequence[TaskSpec], *, ids: Sequence[int] | torch.Tensor | None = None,
            num_workers: int = 0, batch_size: int = 64,
            multiprocessing_context: str | None = None) -> tuple[MultiTaskDataset, bool]:
    specs = task_spec_list(tasks, "gather: `tasks` must be a sequence of TaskSpec (one per "
                                  "task, in column order)")
    workers = integer_value(num_workers)
    if workers is None or workers < 0:
        raise ValueError(f"gather: `num_workers` must be an integer >= 0, got {num_workers!r}")
    per_task = integer_value(batch_size)
    if per_task is None or per_task < 1:
        raise ValueError(f"gather: `batch_size` must be an integer >= 1, got {batch_size!r}")
    num_workers, batch_size = workers, per_task
    methods = multiprocessing.get_all_start_methods()
    if multiprocessing_context is not None and multiprocessing_context not in methods:
        raise ValueError(f"gather: `multiprocessing_context` must be None or one of {methods} "
                         f"(this system's start methods), got {multiprocessing_context!r}")
    if multiprocessing_context is not None and num_workers == 0:
        raise ValueError("gather: `multiprocessing_context` starts worker processes, which "
                         "`num_workers=0` has none of; give `num_workers` > 0 or leave it out")
    ordered = True
    if isinstance(source, DataLoader) and ids is not None and _as_finished(source):
        raise ValueError("gather: the DataLoader's workers hand out batches as they finish "
                         "(in_order=False), in an order no `ids` can follow; give it "
                         "in_order=True (the default), pass the dataset itself, or items "
                         "with an 'id'")
    if isinstance(source, DataLoader):
        # A batch_sampler= loader has no batch_size, yet collates batches as batch_size= does.
        if source.batch_sampler is not None:
            return _gather_batches(source, specs, ids)
        ordered = _in_order(source)  # no automatic batching: the loader yields instances
    if isinstance(source, (torch.Tensor, str, bytes)) or not (
            isinstance(source, Iterable) or hasattr(source, "__getitem__")):
        raise TypeError(f"gather: `source` must be a Dataset, a DataLoader or an iterable of "
                        f"instances, got {type(source).__name__}")
    names = [spec.name for spec in specs]
    rows = _InstanceRows(specs, _instances_length(source))
    for index, item in enumerate(_items(source, num_workers, batch_size,
                                        multiprocessing_context)):
        rows.add(index, _instance(item, index, names))
    if not rows.rows:
        raise ValueError("gather: `source` holds no instance")
    inputs = rows.input_tensors()
    targets: dict[str, torch.Tensor] = {}
    supervision = []
    for column, spec in enumerate(specs):
        targets[spec.name], supervised = rows.task_column(spec, column)
        supervision.append(supervised)
    row_ids = _ids(rows.ids, ids, ordered, "instances")
    if ids is None and row_ids is not None:
        _distinct(row_ids, "instances")
    return MultiTaskDataset(inputs, targets, specs, row_ids,  # type: ignore[arg-type]
                            torch.stack(supervision, dim=1)), row_ids is not None
