"""The UIS an ideal unlearner gets: the score's sampling floor on a given data set.

UIS compares the forget pairs' score ``U_u`` with the original model's score on the test split
``O_t`` (:func:`~mtunlearn_ext.metrics.uis`). A forget set of ``n`` instances is a finite
sample, so even instances the model never saw do not score exactly ``O_t``: their score
scatters around the level of unseen data with a spread that shrinks like ``1 / sqrt(n)``, and
``O_t`` (itself measured on a finite test split) carries its own error. :func:`uis_floor`
measures what UIS gives a model whose test score did not move at all (``U_t = O_t``) and whose
forget pairs are a random sample of ``n`` instances it never saw::

    floor = E_S [ UIS(O_t, O_t, score(S)) ],   S = n instances drawn from ``unseen``

This is the score of an unlearner that leaves the model untouched on unseen data and makes the
forget pairs look exactly like unseen data: the ideal of unlearning, and of a model retrained
without the forget set, minus the change retraining makes on the test split. A method reaches
below it only where its forget score lands nearer ``O_t`` than a sample of unseen data does,
which says nothing about having forgotten; a UIS target under the floor cannot be met in
expectation by a method whose forget pairs behave like unseen data. The spread of the draws
shows how far one forget set's luck moves the score.

Each draw needs the model's outputs on ``n`` rows; all draws share one forward pass over
``unseen``, streamed batch by batch into per-draw metric accumulators (memory: the draws'
accumulators, not the outputs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mtunlearn_ext._text import listed_first
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.inputs import inputs_to, take_rows
from mtunlearn_ext.metrics.evaluate import (
    _resolve,
    check_positive_int,
    device_of,
    evaluate,
)
from mtunlearn_ext.metrics.scores import Scores, uis_of_terms, uis_terms
from mtunlearn_ext.metrics.task_metrics import MetricAccumulator, make_accumulator
from mtunlearn_ext.models.base import MultiTaskModel
from mtunlearn_ext.models.modes import measuring

__all__ = ["UISFloor", "uis_floor"]


@dataclass(frozen=True, eq=False)  # tensor fields: == compares identity, not raising
class UISFloor:
    """The UIS of each draw of :func:`uis_floor` and what it is made of.

    Attributes:
        draws: ``[draws]`` float64, the UIS (x100) of each random forget set of unseen data.
        forget_change: task -> metric -> mean over the draws of ``100 |O_t - S| / |O_t|``.
        original_test: the ``O_t`` the draws were compared with.
        forget_size: ``n``, instances per draw.
        pool_size: instances of the unseen pool the draws came from.
    """

    draws: torch.Tensor
    forget_change: dict[str, dict[str, float]]
    original_test: dict[str, dict[str, float]]
    forget_size: int
    pool_size: int

    @property
    def mean(self) -> float:
        """The floor: the expected UIS over forget sets of unseen data."""
        return float(self.draws.mean())

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the draws' UIS (e.g. 0.05 and 0.95 for a 90% range)."""
        return float(torch.quantile(self.draws, q))


#: What each split is, for the errors (here and in mtunlearn_ext.uis_floor) when one is missing
#: or in another form.
WHAT_EACH_SPLIT_IS = {
    "reference": "the split UIS compares with (the test split)",
    "unseen": ("a pool of instances the model never trained on (a validation split, instances "
               "held back from training, or, for a generated benchmark, "
               "mtunlearn_ext.data.unseen_instances)"),
}


def _check_args(reference: MultiTaskDataset, unseen: MultiTaskDataset, forget_size: int,
                tasks: Sequence[TaskSpec | str] | None, draws: int, batch_size: int
                ) -> tuple[list[str], int, int, int]:
    """(the task names, then ``forget_size``, ``draws`` and ``batch_size`` as Python ints:
    NumPy's are taken too, and the floor's ``forget_size`` is reported)."""
    for label, data in (("reference", reference), ("unseen", unseen)):
        if not isinstance(data, MultiTaskDataset):
            # (inputs, targets) tuples and plain modules are unlearn()'s forms; the API layer
            # converts them (this layer sits below it).
            raise TypeError(f"uis_floor: `{label}` must be a MultiTaskDataset: "
                            f"{WHAT_EACH_SPLIT_IS[label]}; got {type(data).__name__} (for "
                            f"(inputs, targets) tuples and plain modules, as unlearn() takes "
                            f"them, use mtunlearn_ext.uis_floor)")
    _check_disjoint(reference, unseen)
    forget_size = check_positive_int(forget_size, "forget_size", "uis_floor")
    if forget_size > len(unseen):
        raise ValueError(f"uis_floor: `forget_size` ({forget_size}) exceeds the `unseen` pool "
                         f"({len(unseen)} instances); draws are without replacement")
    draws = check_positive_int(draws, "draws", "uis_floor")
    batch_size = check_positive_int(batch_size, "batch_size", "uis_floor")
    names = (list(reference.task_names) if tasks is None
             else [t if isinstance(t, str) else t.name for t in tasks])
    if not names:
        raise ValueError("uis_floor: `tasks` is empty")
    for label, data in (("reference", reference), ("unseen", unseen)):
        unknown = [t for t in names if t not in data.task_names]
        if unknown:
            raise ValueError(f"uis_floor: unknown task(s) {unknown} for `{label}` (its tasks: "
                             f"{data.task_names})")
    return names, forget_size, draws, batch_size


def _check_disjoint(reference: MultiTaskDataset, unseen: MultiTaskDataset) -> None:
    """Refuse an ``unseen`` pool holding instances of ``reference``: they are in ``O_t``
    already, so draws of them score nearer ``O_t`` than unseen data does and the floor reads
    too low (the reference itself measures 0).

    Instances are compared by id, as the library names them everywhere: requests name
    instances by id, :func:`~mtunlearn_ext.unlearn` checks held-out and audit data sets
    against the training data by id, the generated benchmarks number their splits one after
    the other, and :func:`~mtunlearn_ext.data.unseen_instances` gives its pool ids past all of
    theirs for this. Rows are not compared here: the ids already say which instance a row is,
    and equal rows can be other instances (duplicate images, categorical features). Tuple
    data, whose ids say nothing, is compared by content in :func:`mtunlearn_ext.uis_floor`
    before it gets here."""
    reference_ids = reference.ids.to("cpu", torch.long)
    unseen_ids = unseen.ids.to("cpu", torch.long)
    shared = unseen_ids[torch.isin(unseen_ids, reference_ids)].sort().values.tolist()
    if not shared:
        return
    raise shared_instances_error(len(shared), f"ids [{listed_first(shared, 5)}]",
                                 unseen is reference,
                                 ". If they are other instances, give `unseen` ids of its own "
                                 "(MultiTaskDataset(..., ids=...))")


def shared_instances_error(count: int, which: str, same_object: bool, hint: str = ""
                           ) -> ValueError:
    """The error refusing an ``unseen`` that shares ``count`` instances with ``reference``
    (here, and in mtunlearn_ext.uis_floor for tuple data): ``which`` names them."""
    itself = "; `unseen` is `reference` itself" if same_object else ""
    return ValueError(f"uis_floor: `unseen` shares {count} instance{'s' if count != 1 else ''} "
                      f"with `reference` ({which}{itself}); `unseen` must hold instances "
                      "outside the reference split, whose instances O_t already contains "
                      "(draws of them score nearer O_t than unseen data does, and the floor "
                      f"reads too low){hint}")


def _labelled_count(data: MultiTaskDataset, tasks: Sequence[str]) -> str:
    """``'task n, ...'``: how many rows of ``data`` have a supervised, labelled pair of each
    task (the units :func:`evaluate` counts)."""
    counts = data.labelled_pairs(tasks).sum(dim=0).tolist()
    return ", ".join(f"{task!r} {int(n)}" for task, n in zip(tasks, counts))


def uis_floor(model: MultiTaskModel, reference: MultiTaskDataset, unseen: MultiTaskDataset,
              forget_size: int, *, tasks: Sequence[TaskSpec | str] | None = None,
              draws: int = 200, seed: int = 0, batch_size: int = 64,
              original_test: Scores | None = None) -> UISFloor:
    """The UIS of ``model`` left untouched, with random sets of unseen instances as the forget
    set: the lowest UIS a forget set that looks like unseen data gets (see the module).

    Args:
        model: the original model (evaluated, never modified).
        reference: the split UIS compares with (the test split): ``O_t`` is ``model``'s score
            on it, unless ``original_test`` gives it.
        unseen: a pool of instances ``model`` never trained on, from the distribution of the
            forget set (e.g. fresh draws of a generated benchmark,
            :func:`~mtunlearn_ext.data.unseen_instances`); never the ``reference`` split, whose
            instances ``O_t`` already contains, nor any of its instances (compared by id).
        forget_size: ``n``, instances per draw (the forget set's size); at most ``len(unseen)``.
        tasks: the tasks UIS averages over (the request's target tasks; default all of
            ``reference``'s).
        draws: random forget sets drawn (without replacement within a draw).
        seed: seeds the draws.
        batch_size: rows per forward pass.
        original_test: ``O_t`` (task -> metric -> value) when already measured.

    Raises:
        ValueError: an ``unseen`` sharing an instance id with ``reference``; a task of
            ``tasks`` without a supervised, labelled pair in ``reference``
            (no ``O_t``) or in one of the draws (no forget score: a forget set lacking a
            target task's label has no UIS); a non-finite score of a draw.
    """
    names, forget_size, draws, batch_size = _check_args(reference, unseen, forget_size, tasks,
                                                        draws, batch_size)
    if original_test is not None and any(t not in original_test for t in names):
        raise ValueError(f"uis_floor: `original_test` lacks task(s) "
                         f"{[t for t in names if t not in original_test]} of {names}")
    o_t = (evaluate(model, reference, names, batch_size) if original_test is None
           else {t: dict(original_test[t]) for t in names})
    unmeasured = [t for t in names if t not in o_t]
    if unmeasured:
        # evaluate leaves such a task out; every draw then averaged over the other tasks, a
        # floor of another score than the request's, which needs O_t of each task.
        raise ValueError(f"uis_floor: `reference` has no supervised, labelled pair of task(s) "
                         f"{unmeasured}, so their O_t is undefined; pass `tasks` without them "
                         "or a reference that labels them")
    generator = torch.Generator().manual_seed(seed)
    # member[d, i]: row i of the pool is in draw d.
    member = torch.zeros(draws, len(unseen), dtype=torch.bool)
    for d in range(draws):
        member[d, torch.randperm(len(unseen), generator=generator)[:forget_size]] = True
    resolved = _resolve(unseen, names)
    accumulators: list[dict[str, MetricAccumulator]] = [
        {spec.name: make_accumulator(spec) for _, spec in resolved} for _ in range(draws)]
    device = device_of(model)
    with measuring(model):
        for start in range(0, len(unseen), batch_size):
            positions = torch.arange(start, min(start + batch_size, len(unseen)))
            in_draw = member[:, positions]
            if not bool(in_draw.any()):
                continue
            supervision = unseen.supervision[positions]
            out = model(inputs_to(take_rows(unseen.inputs, positions), device),
                        [spec.name for _, spec in resolved])
            targets = {spec.name: unseen.targets[spec.name][positions].to(device)
                       for _, spec in resolved}
            for d in torch.nonzero(in_draw.any(dim=1)).flatten().tolist():
                for column, spec in resolved:
                    rows = (in_draw[d] & supervision[:, column]).to(device)
                    if bool(rows.any()):
                        accumulators[d][spec.name].update(out[spec.name][rows],
                                                          targets[spec.name][rows])
    values = torch.empty(draws, dtype=torch.float64)
    changes: dict[str, dict[str, list[float]]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # O_t == 0 terms are dropped by design
        for d, draw in enumerate(accumulators):
            scores = {name: acc.compute() for name, acc in draw.items() if acc.count > 0}
            bad = [f"{t}/{m}" for t, ms in scores.items() for m, v in ms.items()
                   if not math.isfinite(v)]
            if bad:
                raise ValueError(f"uis_floor: draw {d} scores non-finite {bad} (non-finite "
                                 f"model outputs on `unseen`?)")
            absent = [t for t in names if t not in scores]
            if absent:
                # Its UIS would average over the other tasks only: a request's forget set
                # lacking a target task's label has no UIS (uis() refuses it), so neither does
                # the draw; a floor mixing such draws is the mean of different scores.
                raise ValueError(f"uis_floor: draw {d} (`forget_size` {forget_size} of `unseen`) "
                                 f"has no supervised, labelled pair of task(s) {absent}; every "
                                 "draw needs one of each task UIS is taken over (instances of "
                                 f"`unseen` labelled: {_labelled_count(unseen, absent)} of "
                                 f"{len(unseen)}): draw larger sets, or pass `tasks` without "
                                 "them")
            terms = uis_terms(o_t, o_t, scores, tasks=names)
            values[d] = uis_of_terms(terms)
            for task, metrics in terms.items():
                for metric, term in metrics.items():
                    changes.setdefault(task, {}).setdefault(metric, []).append(
                        term["forget_change"])
    forget_change = {t: {m: sum(v) / len(v) for m, v in metrics.items()}
                     for t, metrics in changes.items()}
    return UISFloor(values, forget_change, {t: dict(m) for t, m in o_t.items()}, forget_size,
                    len(unseen))

