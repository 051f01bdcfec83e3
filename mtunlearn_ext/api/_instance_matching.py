"""Which rows of two data sets are one instance, when ids cannot say so (data
given as tuples, whose ids the API makes up): rows with equal inputs, found by exact per-row
prints then compared exactly, and with equal labels where both supervise a task. Used to refuse
held-out and audit data that hold a training instance, a forget row given twice, and a forget
pair that the retain set still supervises, and to link a partial request's forget rows to their
retained pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mtunlearn_ext._text import listed_first
from mtunlearn_ext.api._entry import entry
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.inputs import Inputs, named_leaves


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


def equal_input_rows(inputs: Inputs, reference: Inputs, reference_rows: torch.Tensor,
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


def rows_of_instances_in(data: MultiTaskDataset, other: MultiTaskDataset
                         ) -> list[tuple[int, int]]:
    """``(row, other row)`` for every row of ``data`` that is an instance of ``other`` as far
    as the model can tell: equal inputs, and equal labels on every task both rows supervise
    (one at least), as :func:`check_unseen` compares rows whose ids say nothing."""
    def same_pairs(row: int, other_row: int) -> bool:
        return _same_labels(data, row, other, other_row)

    return equal_input_rows(data.inputs, other.inputs, torch.arange(len(other)), same_pairs)


@dataclass(frozen=True)
class TrainedRows:
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


def check_unseen(data: MultiTaskDataset, what: str, own_ids: bool,
                  trained: Sequence[TrainedRows], *, against: str = "the training set",
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
            raise ValueError(f"{entry()}: `{what}` shares {len(shared)} instance ids with "
                             f"{against} (first: {shared[:5]}); it must {must}")
    for part in trained:
        if own_ids and part.own_ids:
            continue
        def same_pairs(row: int, train_row: int, part: TrainedRows = part) -> bool:
            return _same_labels(data, row, part.data, train_row)

        equal = equal_input_rows(data.inputs, part.data.inputs, part.rows, same_pairs)
        if equal:
            row, train_row = equal[0]
            made = (f" (ids are not compared: `{part.label}`, given as (inputs, targets), got "
                    f"ids {int(part.data.ids.min())}..{int(part.data.ids.max())} from unlearn, "
                    f"which name none of your instances)" if own_ids and not part.own_ids
                    else "")
            raise ValueError(
                f"{entry()}: `{what}` row {row} has the same inputs as `{part.label}` row "
                f"{train_row}, and the same labels ({len(equal)} "
                f"row{'s' if len(equal) != 1 else ''} "
                f"of `{what}` equal {'training ' if against == 'the training set' else ''}"
                f"pairs){made}; it must {must}")


def check_rows_given_once(forget: MultiTaskDataset, what: str) -> None:
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

    repeats = equal_input_rows(forget.inputs, forget.inputs, torch.arange(len(forget)),
                                same_pairs)
    if repeats:
        row, earlier = repeats[0]
        raise ValueError(f"{entry()}: `{what}` row {row} repeats row {earlier} (the same inputs "
                         f"and the same labels of the target tasks; {len(repeats)} "
                         f"row{'s' if len(repeats) != 1 else ''} repeat an earlier one): give "
                         f"each forget instance once, or it is counted and forgotten as "
                         f"several")


def linked_to_retained_copies(forget: MultiTaskDataset, retain: MultiTaskDataset, *,
                               link: bool, given_rows: torch.Tensor | None = None
                               ) -> MultiTaskDataset:
    """``forget_data`` and ``retain_data`` come without shared ids, so an instance given in both
    shows only as equal inputs (every one of them, for a multi-input model).

    A forget pair whose input is also a retain row that supervises the same task is refused (the
    retain term would teach the label back). With ``link`` (a partial request), a forget row
    whose input is a retain row supervising other tasks only is that instance: it takes the
    retain row's id, so that the method sees the row's pairs as the forget instance's retained
    pairs (and protects them, ``coupled``), as with ``train_data`` and a ``ForgetRequest``. Each
    retain row links one forget row at most. ``given_rows`` are the forget rows' positions in
    the ``forget_data`` the caller passed (rows without a target pair were left out before),
    which the refusal names. Returns ``forget`` with the linked ids."""
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
    clashes: list[tuple[int, int, str]] = []  # every one, so that one message names them all
    for f_row, key in enumerate(_row_prints(f_leaves)):
        for r_row in by_print.get(key, []):
            if not same_row(f_row, r_row):
                continue
            clash = forget.supervision[f_row] & retain.supervision[r_row]
            if bool(clash.any()):
                clashes.append((f_row, r_row, forget.task_names[int(clash.nonzero()[0])]))
                continue
            if (link and r_row not in taken and bool(retain.supervision[r_row].any())
                    and int(ids[f_row]) == int(forget.ids[f_row])):
                ids[f_row] = retain.ids[r_row]
                taken.add(r_row)
    if clashes:
        _refuse_retained_forget_pairs(clashes, given_rows)
    if torch.equal(ids, forget.ids):
        return forget
    return MultiTaskDataset(forget.inputs, forget.targets, forget.tasks, ids, forget.supervision)


def _refuse_retained_forget_pairs(clashes: list[tuple[int, int, str]],
                                  given_rows: torch.Tensor | None) -> None:
    """Refuse forget rows that ``retain_data`` still supervises, ``(forget row, retain row,
    first task in both)`` each, naming the caller's rows of both (a row of ``forget_data`` left
    out for having no target pair shifted the positions the check sees: the message named the
    row before the one given) and how many there are."""
    def caller_row(f_row: int) -> int:
        return f_row if given_rows is None else int(given_rows[f_row])

    f_row, r_row, task = clashes[0]
    message = (f"{entry()}: `forget_data` row {caller_row(f_row)} is also `retain_data` row "
               f"{r_row} (same input), which still supervises task {task!r}")
    if len(clashes) > 1:
        message += (f"; {len(clashes)} rows of `forget_data` are retained so: rows "
                    f"{listed_first([caller_row(f) for f, _, _ in clashes], 10)} "
                    f"(`retain_data` rows "
                    f"{listed_first([r for _, r, _ in clashes], 10)})")
    raise ValueError(message + "; take the pairs to forget out of `retain_data` (or pass "
                     "`train_data` and a `forget_request`)")


def check_ids_not_retained(forget: MultiTaskDataset, retain: MultiTaskDataset,
                           given_rows: torch.Tensor) -> None:
    """Refuse ``forget_data`` and ``retain_data`` data sets that hold one instance id (one
    instance: a data set's ids are its instances) with a pair of the same task supervised in
    both, whatever their inputs (an augmented or re-encoded copy). The problem's own check
    refused it as 'pairs supervised in both the forget and the retain set', pointing to
    ``ForgetRequest.split``, which the caller never used, and naming no row. ``given_rows``
    are the forget rows' positions in the ``forget_data`` passed."""
    common = sorted(set(forget.ids.tolist()) & set(retain.ids.tolist()))
    if not common:
        return
    forget_rows, retain_rows = forget.positions_of(common), retain.positions_of(common)
    both = forget.supervision[forget_rows] & retain.supervision[retain_rows]
    clashing = both.any(dim=1).nonzero().flatten().tolist()
    if not clashing:
        return
    first = clashing[0]
    task = forget.task_names[int(both[first].nonzero()[0])]
    raise ValueError(
        f"{entry()}: `forget_data` and `retain_data` both hold instance id {common[first]} "
        f"(`forget_data` row {int(given_rows[forget_rows[first]])}, `retain_data` row "
        f"{int(retain_rows[first])}), whose pair of task {task!r} is to be forgotten and is "
        f"still supervised in `retain_data`; {len(clashing)} instance"
        f"{'s are' if len(clashing) != 1 else ' is'} so (ids "
        f"{listed_first([common[i] for i in clashing], 10)}; `forget_data` rows "
        f"{listed_first([int(given_rows[forget_rows[i]]) for i in clashing], 10)}; "
        f"`retain_data` rows {listed_first([int(retain_rows[i]) for i in clashing], 10)}): "
        "take the pairs to forget out of `retain_data` (or pass `train_data` and a "
        "`forget_request`)")
