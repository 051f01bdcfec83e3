"""Erasing the raw data of a removal: which training files a checkpoint's lineage lets be
missing, and which requested ids nothing is left of.

Honouring a removal request ends with deleting the person's files. ``mtunlearn train`` records
every training file's SHA-256 (:data:`~mtunlearn_ext.data.libmtl.TRAIN_FILES_KEY`); reading
the data for a checkpoint later, the files its lineage removed may be missing (every file of a
fully removed instance, the label files of a partial request's tasks), while every file still
there must hash to its digest and none may be added (:func:`check_train_files`). What was
found erased is kept in ``Benchmark.info[ERASED_KEY]`` for the commands: an id whose pairs are
gone can be neither forgotten nor retained again (:func:`refuse_erased_ids`), and ``verify``
cannot re-measure its forget metrics. Used by :mod:`mtunlearn_ext.workflow` (the data checks)
and the CLI; generated benchmarks are never erased (they are regenerated, not read)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext.data.base import Benchmark
from mtunlearn_ext.data.libmtl import FOLDER_OF_TASK, TRAIN_FILES_KEY
from mtunlearn_ext.lineage import lineage_removals

__all__ = ["ERASED_KEY", "check_train_files", "erased_forget_pairs", "erased_instances",
           "file_changes", "first_files", "num_train_recorded", "recorded_train_files",
           "refuse_erased_ids", "removed_files"]


#: ``Benchmark.info`` key of the training files found erased (``"image/5.npy"``, sorted), set by
#: :func:`benchmark_from_meta` for a checkpoint with recorded file digests.
ERASED_KEY = "erased_train_files"


def recorded_train_files(meta: Mapping[str, Any]) -> dict[str, str] | None:
    """The training files' SHA-256 digests a checkpoint recorded (``"image/5.npy" -> hex``),
    or None: an older checkpoint, or a benchmark read from no data root."""
    files = meta.get(TRAIN_FILES_KEY)
    if isinstance(files, Mapping) and files and all(
            isinstance(k, str) and isinstance(v, str) and _FILE.fullmatch(k)
            for k, v in files.items()):
        return dict(files)
    return None


_FILE = re.compile(r"([a-z]+)/(0|[1-9][0-9]*)\.npy")


def _file_number(path: str) -> tuple[str, int]:
    """``"label/7.npy"`` -> ``("label", 7)``."""
    folder, name = path.split("/")
    return folder, int(name[:-len(".npy")])


def num_train_recorded(files: Mapping[str, str]) -> int:
    """The training split's size when it was recorded: where its test ids start."""
    return 1 + max(_file_number(p)[1] for p in files)


def removed_files(removals: Sequence[Mapping[str, Any]], files: Iterable[str],
                  task_names: Sequence[str]) -> set[str]:
    """Those of ``files`` (``"folder/<i>.npy"``) that ``removals`` took out, and so may be
    erased: every file of a full request's instances (one naming every task is full), the
    label files of a partial request's target tasks (:data:`FOLDER_OF_TASK`), not its
    instances' images, which still carry their other tasks. An instance whose partial
    requests together name every task counts as removed by a full one: nothing of it is
    trained on any more, so its image may go too."""
    full: set[int] = set()
    partial: dict[int, set[str]] = {}  # instance id -> the tasks its partial requests named
    for entry in removals:
        tasks = entry.get("target_tasks")
        ids = [int(i) for i in entry["instance_ids"]]
        if tasks is None or set(task_names) <= set(tasks):
            full.update(ids)
            continue
        for i in ids:
            partial.setdefault(i, set()).update(tasks)
    # Looked at one request at a time, `seg` then `depth` of one id never erased its image.
    full.update(i for i, tasks in partial.items() if set(task_names) <= tasks)
    folders = {i: {FOLDER_OF_TASK.get(t, t) for t in tasks} for i, tasks in partial.items()}
    out = set()
    for path in files:
        folder, number = _file_number(path)
        if number in full or folder in folders.get(number, ()):
            out.add(path)
    return out


def first_files(paths: Sequence[str], shown: int = 3, split: str = "train") -> str:
    """A few of ``paths`` as ``<split>/...`` names, for an error."""
    more = f" (and {len(paths) - shown} more)" if len(paths) > shown else ""
    return ", ".join(f"{split}/{p}" for p in paths[:shown]) + more


def check_train_files(meta: Mapping[str, Any], bench: Benchmark, argument: str,
                       refuse: Callable[[str], UserInputError],
                       removals: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """The recorded training files now missing, once it is checked that they were erased as
    removals allow (``[]`` when none is missing: the whole-split hash is then compared as
    before). With files missing, the split's hash cannot match; instead every file present
    must hash to its recorded digest (a removed file overwritten or blanked instead of deleted
    is refused: it would be read as data), no file may have been added, and every missing one
    must have been removed by the checkpoint's lineage (``removals`` when given): a file
    erased without a request would silently leave the training set."""
    recorded = recorded_train_files(meta)
    now = bench.info.get(TRAIN_FILES_KEY)
    if recorded is None or not isinstance(now, Mapping):
        return []
    missing = [p for p in recorded if p not in now]
    if not missing:
        return []
    changed = [p for p in recorded if p in now and now[p] != recorded[p]]
    if changed:
        p = changed[0]
        raise refuse(f"{first_files(changed)} does not hash to the SHA-256 recorded at training "
                     f"(train/{p}: {recorded[p][:16]}..., now {str(now[p])[:16]}...): files "
                     "were edited or overwritten; a removed instance's files must be deleted, "
                     "not blanked; restore the data or train again")
    added = [p for p in now if p not in recorded]
    if added:
        raise refuse(f"{first_files(added)} was not in the training data when the checkpoint was "
                     "trained (files added or renumbered); restore the data or train again")
    known = removals if removals is not None else lineage_removals(meta, argument)
    allowed = removed_files(known or [], missing, bench.train.task_names)
    stray = [p for p in missing if p not in allowed]
    if stray:
        folder, number = _file_number(stray[0])
        named = {int(i) for e in known or [] for i in e["instance_ids"]}
        why = ("the checkpoint's earlier removals are unknown (it keeps only their hash)"
               if known is None else
               # The usual cause: a later request's files were erased and an earlier
               # checkpoint (whose lineage stops before it) is used; "never" misled there.
               f"instance {number} was not removed by this checkpoint's lineage (if a later "
               "request removed it, use that request's output, the latest checkpoint)"
               if number not in named else
               f"instance {number} was removed only from the tasks of a partial request, "
               f"whose {folder}/ file stays")
        verb = "is" if len(stray) == 1 else "are"
        raise refuse(f"{first_files(stray)} {verb} missing but {why}: only files that requests "
                     "of the checkpoint's lineage removed may be erased; restore them")
    return missing


def file_changes(recorded: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """``"image/2.npy edited"``, ``"... missing"``, ``"... added"``: how the files read now
    (``"<folder>/<i>.npy" -> SHA-256``) differ from the recorded ones, in file order."""
    changes = [(p, "missing" if p not in now else "edited") for p in recorded
               if now.get(p) != recorded[p]]
    changes += [(p, "added") for p in now if p not in recorded]
    return [f"{p} {how}" for p, how in sorted(changes, key=lambda c: _sort_key(c[0]))]


def _sort_key(path: str) -> tuple[str, int]:
    if _FILE.fullmatch(path) is None:
        return path, -1
    return _file_number(path)


def erased_instances(bench: Benchmark) -> dict[int, set[str]]:
    """Instance id -> the LibMTL folders (``"image"``, ``"label"``, ...) whose file of it was
    erased after a removal (:data:`ERASED_KEY`; empty for data read complete)."""
    out: dict[int, set[str]] = {}
    erased = bench.info.get(ERASED_KEY)
    for path in erased if isinstance(erased, list) else []:
        folder, number = _file_number(str(path))
        out.setdefault(number, set()).add(folder)
    return out


def erased_forget_pairs(bench: Benchmark, ids: Sequence[int],
                        tasks: Sequence[str] | None) -> list[int]:
    """The ids among ``ids`` whose pairs of ``tasks`` (``None``: every task) were erased: the
    instance is gone (its image was erased), or each task's label file is (for a full request
    too: partial requests that together named every task may leave only the image)."""
    erased = erased_instances(bench)
    present = set(bench.train.ids.tolist())
    names = list(tasks) if tasks else list(bench.train.task_names)
    out = []
    for i in ids:
        gone = erased.get(int(i), set())
        if not gone:
            continue
        if int(i) not in present or all(FOLDER_OF_TASK.get(t, t) in gone for t in names):
            out.append(int(i))
    return out


def refuse_erased_ids(bench: Benchmark, forget_ids: Sequence[int] | None,
                      target_tasks: Sequence[str] | None, argument: str = "--forget-ids"
                      ) -> None:
    """Refuse ``--forget-ids`` (or ``argument``: ``--retain-ids``, with every task) naming
    data already removed whose files were erased: nothing of them is left to forget or
    retain (the generic "unknown ids" error would not say why)."""
    if not forget_ids:
        return
    tasks = (None if target_tasks is None or set(bench.train.task_names) <= set(target_tasks)
             else target_tasks)
    gone = erased_forget_pairs(bench, forget_ids, tasks)
    if gone:
        raise UserInputError(argument, "ids of training data still present",
                             f"{len(gone)} erased ids {gone[:10]}",
                             "an earlier request of the checkpoint's lineage already removed "
                             "them and their files were erased since; leave them out")
