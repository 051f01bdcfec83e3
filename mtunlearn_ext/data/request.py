"""Forget requests: which supervision pairs to remove, and the forget/retain split they induce."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import numpy as np
import torch

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext.data.base import MultiTaskDataset, integer_valued

#: A request's type: ``"full"`` removes every task of its instances, ``"partial"`` a proper
#: subset (the experiments', presets' and command line's ``request``).
RequestType = Literal["full", "partial"]
REQUEST_TYPES: tuple[RequestType, ...] = get_args(RequestType)

#: How many ids a long request's repr shows at each end.
_REPR_EDGE_IDS = 5


@dataclass(frozen=True, eq=False)
class ForgetRequest:
    """Forget the supervision of ``target_tasks`` for the instances ``instance_ids``.

    Full-task unlearning names every task (or ``target_tasks=None``); partial-task unlearning a
    proper subset, and the other tasks' labels of those instances stay in the retain pairs.
    Built directly or by :meth:`create`, the ids are checked and held as Python ints the same
    way (a mask or fractions are refused), so ``ids_hash`` does not depend on how they came.
    Two requests are equal (and hash alike) when they name the same instances and the same
    target tasks, in whatever order: the order is kept as given (a set of task names is
    sorted) but does not make another request (:meth:`resolved_tasks`, which a run uses, puts
    them in the data set's order), and :meth:`split`'s sets hold their rows in the data set's
    order whatever the ids' order.
    """

    instance_ids: tuple[int, ...]
    target_tasks: tuple[str, ...] | None = None

    def _key(self) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
        tasks = None if self.target_tasks is None else tuple(sorted(self.target_tasks))
        return tuple(sorted(self.instance_ids)), tasks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ForgetRequest):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        # The dataclass repr printed every id: 689k characters for a request of 100,000 ids,
        # in a REPL and in the repr of each problem holding it. A short request reads as before.
        ids = self.instance_ids
        if len(ids) <= 2 * _REPR_EDGE_IDS:
            shown = repr(ids)
        else:
            head = ", ".join(str(i) for i in ids[:_REPR_EDGE_IDS])
            tail = ", ".join(str(i) for i in ids[-_REPR_EDGE_IDS:])
            shown = f"({head}, ..., {tail}) [{len(ids):,} ids]"
        return f"ForgetRequest(instance_ids={shown}, target_tasks={self.target_tasks!r})"

    def __post_init__(self) -> None:
        # A request built directly (not by ``create``) gets the same ids, the same refusals and
        # the same ``ids_hash``: a tuple of floats was truncated, bools became ids 0/1, and a
        # tensor's elements (distinct objects) passed the duplicate check of ``validate``.
        object.__setattr__(self, "instance_ids", _integer_ids(self.instance_ids))
        object.__setattr__(self, "target_tasks", task_names(self.target_tasks))

    @staticmethod
    def create(instance_ids: Sequence[int] | torch.Tensor | np.ndarray[Any, Any],
               target_tasks: Sequence[str] | str | None = None) -> ForgetRequest:
        """A request from ids (a sequence, NumPy array or tensor of integers; integral floats,
        as a data frame's column may hold, are accepted; a mapping is refused, not read as its
        keys) and target task names (one name may be given as a plain string; ``None``: every
        task, a full request). The constructor itself normalises both (``__post_init__``)."""
        return ForgetRequest(instance_ids, target_tasks)  # type: ignore[arg-type]

    def resolved_tasks(self, dataset: MultiTaskDataset) -> list[str]:
        """The target tasks in ``dataset``'s task order (every task for a full request), names
        it lacks last, as given, for :meth:`validate` to refuse."""
        if self.target_tasks is None:
            return list(dataset.task_names)
        # One request, one order: the tasks as given (a list, or a set sorted by name) made the
        # records and the per-task work of two equal requests differ.
        column = {name: i for i, name in enumerate(dataset.task_names)}
        return sorted(self.target_tasks, key=lambda name: column.get(name, len(column)))

    def is_full(self, dataset: MultiTaskDataset) -> bool:
        """Whether the request targets every task of ``dataset`` (a full-task request)."""
        return set(self.resolved_tasks(dataset)) == set(dataset.task_names)

    def ids_hash(self) -> str:
        """SHA-256 of the sorted instance ids, for unlearning records."""
        text = ",".join(str(i) for i in sorted(self.instance_ids))
        return hashlib.sha256(text.encode()).hexdigest()

    def validate(self, dataset: MultiTaskDataset, partial: bool | None = None) -> None:
        """Raise a clear error for an empty request, duplicate or unknown ids, unknown task names,
        no target task, or (when ``partial`` is True) a partial request naming every task."""
        if len(self.instance_ids) == 0:
            raise ValueError("ForgetRequest: `instance_ids` is empty; name at least one instance")
        if len(set(self.instance_ids)) != len(self.instance_ids):
            repeated = sorted(i for i, k in Counter(self.instance_ids).items() if k > 1)
            raise ValueError(f"ForgetRequest: `instance_ids` holds duplicates: {repeated[:10]}"
                             f"{' ...' if len(repeated) > 10 else ''}")
        dataset.positions_of(self.instance_ids)  # KeyError naming unknown ids
        tasks = self.resolved_tasks(dataset)
        if len(tasks) == 0:
            raise ValueError("ForgetRequest: `target_tasks` is empty; name at least one task")
        unknown = [t for t in tasks if t not in dataset.task_names]
        if unknown:
            raise UnknownNameError(f"ForgetRequest: unknown task names {unknown}; the data set has "
                                   f"tasks {dataset.task_names}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"ForgetRequest: `target_tasks` holds duplicates: {tasks}")
        if partial and set(tasks) == set(dataset.task_names):
            raise ValueError(f"ForgetRequest: a partial-task request must leave at least one task; "
                             f"it names every task {tasks} (use a full-task request instead)")
        if len(self.instance_ids) == len(dataset) and set(tasks) == set(dataset.task_names):
            raise ValueError("ForgetRequest: the request forgets every pair of the data set; "
                             "nothing would be left to retain")

    def forget_mask(self, dataset: MultiTaskDataset) -> torch.Tensor:
        """``[N, T]`` bool: the supervised pairs in ``instance_ids x target_tasks``."""
        self.validate(dataset)
        mask = torch.zeros_like(dataset.supervision)
        rows = dataset.positions_of(self.instance_ids)
        cols = torch.tensor([dataset.task_index(t) for t in self.resolved_tasks(dataset)])
        mask[rows.unsqueeze(1), cols.unsqueeze(0)] = True
        return mask & dataset.supervision

    def split(self, dataset: MultiTaskDataset) -> tuple[MultiTaskDataset, MultiTaskDataset]:
        """``(forget, retain)``: the forget set holds the forget instances with only the forget
        pairs supervised; the retain set holds every instance that keeps at least one supervised
        pair, with the forget pairs cleared (so a partial request keeps the forget instances'
        other tasks there)."""
        forget_pairs = self.forget_mask(dataset)
        retain_sup = dataset.supervision & ~forget_pairs
        forget_rows = forget_pairs.any(dim=1).nonzero().flatten()
        retain_rows = retain_sup.any(dim=1).nonzero().flatten()
        forget = dataset.with_supervision(forget_pairs).subset(forget_rows)
        retain = dataset.with_supervision(retain_sup).subset(retain_rows)
        return forget, retain


def _integer_ids(instance_ids: object) -> tuple[int, ...]:
    """The ids as Python ints, exactly (no detour through float32); a bool, a fraction, NaN or a
    non-number is refused: a mask or a score column passed by mistake must not become ids."""
    def refuse(shown: object) -> TypeError:
        first = shown[0] if isinstance(shown, list) and shown else shown
        if isinstance(first, (bool, np.bool_)) or (
                isinstance(first, torch.Tensor) and first.dtype == torch.bool):
            why = ("ids, not a mask: the ids of a mask's True entries are "
                   "`torch.nonzero(mask).flatten()` or `np.flatnonzero(mask)`")
        elif isinstance(first, (float, str, np.floating, np.str_)) or (
                isinstance(first, torch.Tensor) and first.is_floating_point()):
            why = "the instances' ids, not strings or fractions"
        else:
            why = "one int id per instance"
        return TypeError(f"ForgetRequest: `instance_ids` must be integers ({why}), "
                         f"got {shown!r:.80}")

    if isinstance(instance_ids, int) and not isinstance(instance_ids, bool):
        return (instance_ids,)  # one id
    if isinstance(instance_ids, (str, bytes, bytearray)):
        # Iterated, bytes give their codes: b"35" became ids 51 and 53 without a word.
        raise TypeError(f"ForgetRequest: `instance_ids` must be integers (the instances' ids, "
                        f"not strings or fractions), got {instance_ids!r:.60}; pass "
                        "`[int(i) for i in text.split(',')]` for ids written out")
    if isinstance(instance_ids, Mapping):
        # Iterated, a mapping gives its keys: {id: name} and {name: id} alike became ids
        # without a word, and which half was meant is the caller's to say.
        raise TypeError(f"ForgetRequest: `instance_ids` must be integers (one int id per "
                        f"instance), got a {type(instance_ids).__name__} "
                        f"{instance_ids!r:.60}; pass `list(mapping)` for its keys or "
                        f"`list(mapping.values())` for its values")
    if isinstance(instance_ids, torch.Tensor) or hasattr(instance_ids, "__array__"):
        try:
            values = torch.as_tensor(instance_ids)
        except (TypeError, ValueError, RuntimeError) as error:
            raise refuse(instance_ids) from error
        if values.dim() > 1:
            # A matrix is no list of ids: flattening a [2, 2] block (or a mask table) would
            # silently pick instances the caller never named.
            raise TypeError(f"ForgetRequest: `instance_ids` must be one-dimensional (one id "
                            f"per instance), got shape {tuple(values.shape)}; pass "
                            f"`ids.flatten()` if every entry is an id")
        if not integer_valued(values):
            raise refuse(values.reshape(-1)[:5].tolist())
        return tuple(int(i) for i in values.reshape(-1).tolist())
    try:
        items = list(cast(Iterable[Any], instance_ids))
    except TypeError as error:
        raise refuse(instance_ids) from error
    ids = []
    for value in items:
        if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
            # A 0-d tensor or NumPy scalar: ``int()`` would truncate 1.7 and take True as 1.
            try:
                one = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise refuse(value) from error
            if one.numel() != 1 or not integer_valued(one):
                raise refuse(value)
            ids.append(int(one.reshape(-1)[0].item()))
        elif isinstance(value, bool) or not (
                isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                or hasattr(value, "__index__")):
            raise refuse(value)
        else:
            ids.append(int(value))
    return tuple(ids)


def task_names(target_tasks: object, owner: str = "ForgetRequest"
               ) -> tuple[str, ...] | None:
    """The task names as a tuple (``None``: every task), in the order given (a set's sorted).
    One name may be a plain string, which must stay one task (iterating it would make one task
    per character). ``owner`` starts the errors (the request, or the entry point given them)."""
    if target_tasks is None:
        return None
    if isinstance(target_tasks, str):
        return (target_tasks,)
    if isinstance(target_tasks, Mapping):
        # Iterated, a mapping gives its keys: {task: weight} became the target tasks without a
        # word.
        raise TypeError(f"{owner}: `target_tasks` must be task names (a string or a sequence "
                        f"of strings) or None, got a {type(target_tasks).__name__} "
                        f"{target_tasks!r:.60}; pass `list(mapping)` for its keys")
    try:
        names = tuple(cast(Iterable[Any], target_tasks))
    except TypeError as error:
        raise TypeError(f"{owner}: `target_tasks` must be task names (a string or a sequence "
                        f"of strings) or None, got {target_tasks!r:.80}") from error
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{owner}: `target_tasks` must be task names (strings), got "
                            f"{name!r:.80} in {names!r:.80}")
    if isinstance(target_tasks, (set, frozenset)):
        # A set of strings iterates in the order of their hashes, which PYTHONHASHSEED draws
        # anew in every process: one request's target tasks (in its records, and the order of
        # the per-task work) differed from run to run. Sorted, a set gives one order.
        names = tuple(sorted(names))
    return names


def build_request(dataset: MultiTaskDataset, kind: RequestType, seed: int,
                  forget_fraction: float = 0.1, forget_ids: Sequence[int] | None = None,
                  target_tasks: Sequence[str] | None = None) -> ForgetRequest:
    """The forget request of an experiment.

    Target tasks: every task (``kind="full"``) or ``target_tasks`` (``"partial"``; default the
    first task). Forget ids: ``forget_ids`` as given, or ``round(fraction * n)`` (at least 1) of
    the ``n`` training instances that supervise every target task, chosen by a ``randperm`` seeded
    with ``seed`` and sorted.
    """
    if kind == "full":
        if target_tasks is not None and set(target_tasks) != set(dataset.task_names):
            raise ValueError(f"a full request targets every task; got target tasks "
                             f"{list(target_tasks)} (use --request partial)")
        tasks: list[str] | None = None
    elif kind == "partial":
        tasks = list(target_tasks) if target_tasks else [dataset.task_names[0]]
    else:
        raise ValueError(f"request kind must be 'full' or 'partial', got {kind!r}")
    if forget_ids is not None:
        ids = sorted(int(i) for i in forget_ids)
    else:
        names = dataset.task_names if tasks is None else tasks
        columns = torch.tensor([dataset.task_index(t) for t in names])
        eligible = dataset.supervision[:, columns].all(dim=1).nonzero().flatten()
        count = max(1, int(round(forget_fraction * len(dataset))))
        if count > eligible.numel():
            raise ValueError(f"cannot forget {count} instances: only {eligible.numel()} "
                             f"supervise every target task {names}")
        generator = torch.Generator().manual_seed(seed)
        chosen = eligible[torch.randperm(eligible.numel(), generator=generator)[:count]]
        ids = sorted(int(i) for i in dataset.ids[chosen].tolist())
    request = ForgetRequest.create(ids, tasks)
    request.validate(dataset, partial=kind == "partial")
    return request
