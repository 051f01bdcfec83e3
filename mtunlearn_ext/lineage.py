"""A checkpoint's lineage: the requests that made it, and keeping what they removed removed.

An unlearned checkpoint's metadata lists every request its lineage removed
(:data:`REMOVALS_KEY`), oldest first. A later request on it keeps those pairs out of its retain
set (:func:`exclude_removed`) and does not forget them a second time (:func:`without_removed`);
the record and ``verify`` read the same list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.request import ForgetRequest

__all__ = ["REMOVALS_KEY", "check_forget_left", "exclude_removed", "is_removal_list",
           "lineage_removals", "removal_counts", "removal_entry", "unknown_removals_hint",
           "without_removed"]

#: ``meta["removals"]`` of an unlearned checkpoint: every request its lineage removed, oldest
#: first, its own last; each ``{"instance_ids", "target_tasks" (None: every task),
#: "ids_sha256"}``. ``None`` where they are not known.
REMOVALS_KEY = "removals"


def removal_entry(request: ForgetRequest) -> dict[str, Any]:
    """A request as an entry of a checkpoint's ``removals`` and a record's
    ``request.earlier_removals``: its ids (sorted), its own target tasks (``None``: every
    task) and the ids' hash."""
    return {"instance_ids": sorted(request.instance_ids),
            "target_tasks": None if request.target_tasks is None else list(request.target_tasks),
            "ids_sha256": request.ids_hash()}


def is_removal_list(value: object) -> bool:
    """Whether ``value`` is a list of removal entries (:func:`removal_entry`'s form)."""
    def ints(v: object) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                           for i in v)

    return isinstance(value, list) and all(
        isinstance(e, Mapping) and ints(e.get("instance_ids"))
        and (e.get("target_tasks") is None or (isinstance(e.get("target_tasks"), list) and all(
            isinstance(t, str) for t in e["target_tasks"])))
        for e in value)


def lineage_removals(meta: Mapping[str, Any], argument: str = "--checkpoint"
                     ) -> list[dict[str, Any]] | None:
    """What the requests that made this checkpoint removed (:data:`REMOVALS_KEY`): ``[]`` for
    an original (``mtunlearn train``), the recorded list for an unlearned checkpoint, ``None``
    where it is not known: an unlearned checkpoint written before checkpoints kept the ids
    (its metadata has only their hash, ``ids_sha256``), or after an unlearning run whose own
    input's removals were unknown. A malformed list is a :class:`UserInputError`."""
    if REMOVALS_KEY in meta:
        removals = meta[REMOVALS_KEY]
        if removals is None:
            return None
        if not is_removal_list(removals):
            raise UserInputError(argument, "a checkpoint whose metadata lists its removals "
                                 "(instance ids, target tasks)", meta.get(REMOVALS_KEY),
                                 f"its {REMOVALS_KEY!r} is malformed")
        return [dict(e) for e in removals]
    return [] if meta.get("kind") == "original" else None


def unknown_removals_hint(meta: Mapping[str, Any]) -> str:
    """Why a checkpoint's earlier removals are unknown, and the way out, for an error."""
    return (f"it is an unlearned checkpoint (method {meta.get('method')!r}, from the checkpoint "
            f"with SHA-256 {str(meta.get('parent_sha256'))[:16]}...) whose metadata keeps only "
            "the hash of the ids it forgot (ids_sha256), not the ids: its retain set would hold "
            "them again and they would be re-learned; unlearn from the original checkpoint with "
            "the earlier ids and the new ones together, or name the retain set, without the "
            "earlier ids, with --retain-ids")


def _removed_mask(dataset: MultiTaskDataset, removals: Sequence[Mapping[str, Any]]
                  ) -> torch.Tensor:
    """``[N, T]`` bool: the pairs of ``dataset`` that ``removals`` name (their target tasks,
    every task for a full request, of the instances still in ``dataset``)."""
    mask = torch.zeros_like(dataset.supervision)
    rows = {int(i): p for p, i in enumerate(dataset.ids.tolist())}
    for entry in removals:
        tasks = entry.get("target_tasks") or dataset.task_names
        unknown = [t for t in tasks if t not in dataset.task_names]
        if unknown:
            raise UserInputError("--checkpoint", f"earlier removals of the tasks "
                                 f"{dataset.task_names}", unknown, "unknown task names in the "
                                 "checkpoint's removals")
        columns = torch.tensor([dataset.task_index(t) for t in tasks])
        positions = [rows[int(i)] for i in entry["instance_ids"] if int(i) in rows]
        if positions:
            mask[torch.tensor(positions).unsqueeze(1), columns.unsqueeze(0)] = True
    return mask


def without_removed(dataset: MultiTaskDataset, removals: Sequence[Mapping[str, Any]]
                    ) -> MultiTaskDataset:
    """``dataset`` with the pairs that ``removals`` (earlier requests of the checkpoint's
    lineage) took out marked unsupervised: what is left to forget. A removed pair is not
    forgotten a second time (gradient ascent on it again would only damage the model further;
    ``mtunlearn_ext.unlearn`` refuses it too), nor drawn by ``--forget-fraction``."""
    if not removals:
        return dataset
    return dataset.with_supervision(dataset.supervision & ~_removed_mask(dataset, removals))


def removal_counts(dataset: MultiTaskDataset, removals: Sequence[Mapping[str, Any]]
                   ) -> tuple[int, int]:
    """``(entirely, partly)``: how many instances of ``dataset`` the ``removals`` (earlier
    requests of the checkpoint's lineage) took out with every supervised pair, and how many
    with some of them only (a partial request's target tasks), their other labels still read."""
    if not removals:
        return 0, 0
    supervised = dataset.supervision
    removed = supervised & _removed_mask(dataset, removals)
    touched = removed.any(dim=1)
    entirely = touched & ~(supervised & ~removed).any(dim=1)
    return int(entirely.sum()), int((touched & ~entirely).sum())


def check_forget_left(train: MultiTaskDataset, remaining: MultiTaskDataset,
                      request: ForgetRequest, argument: str) -> list[int]:
    """The ids of ``request`` some of whose pairs the lineage removed already (``train``'s
    supervised pairs missing from ``remaining``, :func:`without_removed`), to say that only
    the rest is forgotten. A request left with nothing to forget is a :class:`UserInputError`
    naming ``argument``: the unlearners would refuse the empty forget set with a traceback."""
    named, left = request.forget_mask(train), request.forget_mask(remaining)
    targets = request.resolved_tasks(train)
    if not bool(left.any()):
        if bool(named.any()):
            gone = sorted(int(i) for i in train.ids[named.any(dim=1)].tolist())
            raise UserInputError(argument, f"ids with pairs of the target tasks {targets} "
                                 "not removed yet", f"{len(gone)} removed ids {gone[:10]}",
                                 "earlier requests of the checkpoint's lineage already removed "
                                 "every pair this request names: nothing is left to forget; "
                                 "leave them out")
        raise UserInputError(argument, f"ids with a supervised pair of the target tasks "
                             f"{targets}", f"{len(request.instance_ids)} ids without one",
                             "nothing is left to forget")
    return sorted(int(i) for i in train.ids[(named & ~left).any(dim=1)].tolist())


def exclude_removed(retain: MultiTaskDataset, removals: Sequence[Mapping[str, Any]],
                    retain_ids: Sequence[int] | None = None) -> tuple[MultiTaskDataset, int]:
    """``retain`` without the pairs that ``removals`` (earlier requests of the checkpoint's
    lineage) took out: their target tasks' supervision (every task for a full request) of the
    instances they name; instances left with no supervised pair are dropped. Returns the
    retain set and the number of pairs taken out. An id of ``retain_ids`` that an earlier
    request removed entirely is refused (:class:`UserInputError` naming ``--retain-ids``): a
    removed instance stays removed."""
    if not removals:
        return retain, 0
    rows = {int(i): p for p, i in enumerate(retain.ids.tolist())}
    supervision = retain.supervision & ~_removed_mask(retain, removals)
    excluded = int(retain.supervision.sum()) - int(supervision.sum())
    kept = supervision.any(dim=1)
    if retain_ids is not None:
        gone = sorted(i for i in retain_ids if i in rows and not bool(kept[rows[i]]))
        if gone:
            raise UserInputError("--retain-ids", "ids that no earlier request of the "
                                 "checkpoint's lineage removed",
                                 f"{len(gone)} removed ids {gone[:10]}",
                                 "an instance removed earlier stays removed; leave them out")
    if not bool(kept.any()):
        raise UserInputError("request", "a request that leaves something to retain",
                             "nothing", "the earlier removals and this request take every pair")
    return (retain.with_supervision(supervision).subset(kept.nonzero().flatten()), excluded)
