"""The loss terms of one unlearning step, evaluated on a forget and a retain minibatch.

Forget terms: for each target task ``t in S``, the forgetting objective ``O_t`` averaged over the
batch's forget pairs of ``t`` (only supervised pairs: the forget set supervises exactly
``F x S``, so a non-target task of a forget instance never enters a forget term), together with
the plain task loss ``L_t`` on the same pairs (detached; for curves and membership checks).

Retain terms: for every task, the mean task loss over the batch's supervised retain pairs
(:func:`mtunlearn_ext.losses.masked_multitask_loss`), which in a partial request includes the
forget instances' non-target labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mtunlearn_ext._functional import widened
from mtunlearn_ext.data.base import TaskSpec, neutral_unsupervised
from mtunlearn_ext.losses import masked_multitask_loss, task_loss
from mtunlearn_ext.unlearning.objectives import ForgetObjective

__all__ = ["ForgetTerms", "RetainTerms", "forget_terms", "mean_of", "retain_terms"]


@dataclass
class ForgetTerms:
    """``objective[t]``: ``O_t`` (with graph); ``loss[t]``: ``L_t`` (detached); ``count[t]``:
    forget pairs of ``t`` in the batch. Tasks without a pair in the batch are absent."""

    objective: dict[str, torch.Tensor]
    loss: dict[str, torch.Tensor]
    count: dict[str, int]

    def total(self, task_weights: Mapping[str, float] | None = None) -> torch.Tensor | None:
        """``sum_t w_t O_t`` over the tasks present (``None`` when none is)."""
        return _weighted_sum(self.objective, task_weights)


@dataclass
class RetainTerms:
    """``loss[t]``: mean retain loss of task ``t`` on the batch (with graph; an exact 0 for a
    task with no supervised pair in the batch). ``weights``: the tasks' weights in
    :meth:`total` (the run's ``retain_task_weights``; 1 for a task left out)."""

    loss: dict[str, torch.Tensor]
    weights: Mapping[str, float] | None = None

    def total(self, task_weights: Mapping[str, float] | None = None) -> torch.Tensor | None:
        """``sum_t w_t L_t`` (``task_weights``, else :attr:`weights`)."""
        return _weighted_sum(self.loss, self.weights if task_weights is None else task_weights)


def _weighted_sum(values: Mapping[str, torch.Tensor],
                  weights: Mapping[str, float] | None) -> torch.Tensor | None:
    total: torch.Tensor | None = None
    for name, value in values.items():
        term = value * (1.0 if weights is None else float(weights.get(name, 1.0)))
        total = term if total is None else total + term
    return total


def mean_of(values: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Mean of the values (detached), for curves; ``None`` for an empty mapping."""
    if not values:
        return None
    return torch.stack([v.detach().float() for v in values.values()]).mean()


def forget_terms(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, object],
                 tasks: Sequence[TaskSpec], objectives: Mapping[str, ForgetObjective],
                 ) -> ForgetTerms:
    """Forget terms of a forget batch.

    ``O_t = (1 / n_t) sum_i m_it o_t(i)`` and ``L_t = (1 / n_t) sum_i m_it l_t(i)`` over the
    batch's forget pairs of each target task ``t`` (the keys of ``objectives``), with ``m`` the
    batch's supervision (columns in the order of ``tasks``, every task of the problem).
    Unsupervised pairs may hold any target (they get the task's neutral one, see
    :func:`~mtunlearn_ext.data.base.neutral_unsupervised`): neither the terms nor their
    gradients depend on it.
    """
    supervision = batch["supervision"]
    targets = batch["targets"]
    assert isinstance(supervision, torch.Tensor) and isinstance(targets, Mapping)
    ids = batch.get("id")
    assert ids is None or isinstance(ids, torch.Tensor)
    columns = {spec.name: c for c, spec in enumerate(tasks)}
    specs = {spec.name: spec for spec in tasks}
    objective: dict[str, torch.Tensor] = {}
    loss: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    for name, fn in objectives.items():
        mask = supervision[:, columns[name]]
        n = int(mask.sum())
        if n == 0:
            continue
        pred = outputs[name]
        # Neutral targets on unsupervised pairs, as the retain terms have: the ``where`` below
        # keeps their values out of the sum, not a NaN out of the gradient (``0 * NaN``), and an
        # out-of-range class label there made the loss kernel raise.
        target = neutral_unsupervised(specs[name], targets[name], mask)
        per_sample = fn.per_pair(pred, target, ids)
        # Half precision summed in float32 (the batch's sum may pass fp16's 65504, its mean
        # not), the mean returned in the prediction's type.
        wide = widened(per_sample)
        zero = torch.zeros((), dtype=wide.dtype, device=wide.device)
        objective[name] = (torch.where(mask, wide, zero).sum() / n).to(per_sample.dtype)
        with torch.no_grad():
            plain = task_loss(specs[name], pred.detach(), target)
            kept = torch.where(mask, widened(plain), 0.0)
            loss[name] = (kept.sum() / n).to(plain.dtype)
        count[name] = n
    return ForgetTerms(objective, loss, count)


def retain_terms(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, object],
                 tasks: Sequence[TaskSpec]) -> RetainTerms:
    """Retain terms of a retain batch (every task, supervision-masked)."""
    _, per_task = masked_multitask_loss(outputs, batch, tasks)
    return RetainTerms(dict(per_task))
