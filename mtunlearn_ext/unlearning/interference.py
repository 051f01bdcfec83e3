"""Measuring interference: cosines between per-task forget and retain gradients on ``theta_s``.

Task-level interference is visible in the signs of ``cos(f_s, r_t)`` between the forget gradient
of a target task ``s`` and the retain gradient of a task ``t``. Both are gradients of quantities
to *minimise*, so a step along ``-f_s`` changes ``L^r_t`` by ``-eta <f_s, r_t>`` to first order:
a *negative* cosine means that forgetting ``s`` raises task ``t``'s retain loss (interference), a
positive one that it lowers it. The matrix is shown before and after the interference-aware
projections, with the retain gradients taken on a batch that did *not* build the protected
subspaces, so "after" shows how well the protection generalises beyond its snapshots.

When the problem has held-out instances (``held_out``, data no model trained on), their
per-task loss gradients ``u_t`` are rows too: ``cos(f_s, u_t) < 0`` means that forgetting ``s``
raises task ``t``'s loss on *unseen* data, the test-score change that UIS counts, which no
constraint on training instances targets directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

from mtunlearn_ext import ops
from mtunlearn_ext._random import seeded_generators
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.models.copies import copy_model
from mtunlearn_ext.ops._checks import check_int
from mtunlearn_ext.unlearning.base import (
    UnlearningProblem,
    UnlearningReport,
    config_from_mapping,
)
from mtunlearn_ext.unlearning.batches import Batch, batch_to, child_generator
from mtunlearn_ext.unlearning.gradients import ParameterGroups
from mtunlearn_ext.unlearning.interference_aware import (
    InterferenceAware,
    InterferenceAwareConfig,
)
from mtunlearn_ext.unlearning.loop import StepContext
from mtunlearn_ext.unlearning.objectives import make_forget_objectives

__all__ = ["InterferenceMatrix", "cosine_matrix", "interference_matrix"]


@dataclass(eq=False)  # tensor fields: == compares identity, not raising
class InterferenceMatrix:
    """Cosines between gradient rows ``labels`` (``forget/<task>``, then ``retain/<task>``,
    then, when the problem has held-out instances, ``unseen/<task>``).

    ``before``: raw forget gradients; ``after``: forget gradients after the task-aware
    projection and the instance-level step (the retain rows are the same in both).
    ``forget_kept``: ``|f_after| / |f_before|`` per target task.

    A row that is the zero vector (a forget objective capped on every row of the batch, a
    task with no supervised pair in the retain batch) has no direction: its cosines, its
    diagonal entry and, for a forget row, its kept share are NaN (stored as null), not 0,
    which would read as orthogonal, no interference.
    """

    labels: list[str]
    before: torch.Tensor
    after: torch.Tensor
    forget_kept: dict[str, float]


def cosine_matrix(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """``[k, k]`` cosines of ``k`` vectors given as per-parameter lists (one Gram pass with
    ``ops.gram_list`` over the stacked rows, no flat copy of the parameters). The cosines of
    a zero vector are undefined: NaN in its row and column (a clamped norm gave 0, which reads
    as orthogonal)."""
    stacks = [torch.stack([row[p] for row in rows]) for p in range(len(rows[0]))]
    gram = ops.gram_list(stacks).double()
    squared = gram.diagonal()
    norms = squared.clamp(min=1e-30).sqrt()
    cosines = gram / norms[:, None] / norms[None, :]
    zero = squared == 0
    cosines[zero, :] = float("nan")
    cosines[:, zero] = float("nan")
    return cosines.float()


def interference_matrix(problem: UnlearningProblem,
                        config: InterferenceAwareConfig | Mapping[str, Any] | None = None, *,
                        batch_size: int = 16, rows: int = 128) -> InterferenceMatrix:
    """Forget/retain gradient cosines on the shared parameters before and after projection.

    One retain batch of ``batch_size`` rows fills the protected subspaces (as a refresh step
    would) and supplies the per-sample gradients of the instance step. The displayed
    gradients are means over up to ``rows`` rows of each set, taken ``batch_size`` at a time:
    ``f_s`` for every target task over the forget set, ``r_t`` over retain rows other than the
    protection's, and with ``problem.held_out`` ``u_t`` over held-out rows (fewer where a set
    is smaller). One batch's cosines change sign from batch to batch: on the demo's original
    model one forget/unseen cell ranged from -0.80 to +0.39 over 20 batches of 16 rows, and is
    -0.67 over the whole sets. The problem's model is not modified (a copy is
    differentiated). Seeded by ``problem.seed``: the batches, and with ``train_mode`` the
    dropout masks, which are drawn from torch's generators seeded for the call and given back
    to the caller as they were. ``config``: the method's settings, a
    :class:`InterferenceAwareConfig` or a mapping of its fields (as :func:`mtunlearn_ext.unlearn`
    takes them).
    """
    if isinstance(config, Mapping):  # as unlearn and get_unlearner take settings
        cfg = cast(InterferenceAwareConfig,
                   config_from_mapping(InterferenceAwareConfig, config))
    else:
        cfg = config or InterferenceAwareConfig()
    batch_size = check_int("interference_matrix", "batch_size", batch_size, at_least=1)
    rows = check_int("interference_matrix", "rows", rows, at_least=1)
    with seeded_generators(problem.seed, problem.device):
        return _interference_matrix(problem, cfg, batch_size, rows)


def _mean_task_grads(data: MultiTaskDataset, positions: torch.Tensor, batch_size: int,
                     device: torch.device | str,
                     grads_of: Callable[[Batch], dict[str, list[torch.Tensor]]]
                     ) -> dict[str, list[torch.Tensor]]:
    """The mean of ``grads_of`` over the rows ``positions`` of ``data``, ``batch_size`` rows at
    a time, each batch's gradients (of its mean loss) weighted by its rows."""
    summed: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        weight = len(chunk) / len(positions)
        for task, grads in grads_of(batch_to(data.batch(chunk), device)).items():
            if task in summed:
                torch._foreach_add_(summed[task], grads, alpha=weight)
            else:
                summed[task] = [g * weight for g in grads]
    return summed


def _interference_matrix(problem: UnlearningProblem, cfg: InterferenceAwareConfig,
                         batch_size: int, rows: int) -> InterferenceMatrix:
    method = InterferenceAware(cfg)
    model = copy_model(problem.model).to(problem.device)
    model.train(cfg.train_mode)
    generator = torch.Generator().manual_seed(problem.seed)
    groups = ParameterGroups.from_model(model, problem.task_names)
    objectives = make_forget_objectives(problem.target_specs(), problem.retain,
                                        child_generator(generator), problem.device,
                                        cfg.forget_objective or method.default_forget_objective,
                                        forget=problem.forget)
    ctx = StepContext(model, problem, groups, objectives, child_generator(generator))
    method.setup(ctx, UnlearningReport(method=method.name, config=cfg.to_dict()))
    retain_order = torch.randperm(len(problem.retain), generator=child_generator(generator))
    forget_order = torch.randperm(len(problem.forget), generator=child_generator(generator))
    snapshot_rows = retain_order[:batch_size]
    # The displayed retain rows are never the protection's (a retain set of one batch or less
    # shows the protection's own rows rather than none).
    display_rows = (retain_order[batch_size:batch_size + rows]
                    if len(retain_order) > batch_size else snapshot_rows)
    snapshot_batch = batch_to(problem.retain.batch(snapshot_rows), problem.device)

    # Protected subspaces, built exactly as a refresh step builds them.
    method.refresh(ctx, snapshot_batch)

    def retain_grads(batch: Batch) -> dict[str, list[torch.Tensor]]:
        return method.retain_task_grads(ctx, method.retain_step_terms(ctx, batch).loss)[0]

    def forget_grads(batch: Batch) -> dict[str, list[torch.Tensor]]:
        return method.forget_task_grads(ctx, method.forget_step_terms(ctx, batch).objective)[0]

    r_shared = _mean_task_grads(problem.retain, display_rows, batch_size, problem.device,
                                retain_grads)
    f_shared = _mean_task_grads(problem.forget, forget_order[:rows], batch_size,
                                problem.device, forget_grads)
    targets = list(f_shared)

    projected = method.task_project(ctx, f_shared) if cfg.task_projection else \
        [torch.stack([f_shared[t][p] for t in targets]) for p in range(len(groups.shared))]
    after: dict[str, list[torch.Tensor]] = {t: [s[i] for s in projected]
                                            for i, t in enumerate(targets)}
    if cfg.instance_projection != "off":
        names = [n for n, _ in groups.shared]
        batch = method.instance_batch(ctx, snapshot_batch)
        for t in targets:
            step_dir = [-g for g in after[t]]
            d, _ = method.instance_project(ctx, step_dir, names, batch,
                                           task_scale=method.retain_scale(ctx, snapshot_batch))
            after[t] = [-x for x in d]

    labels = [f"forget/{t}" for t in targets] + [f"retain/{t}" for t in r_shared]
    retain_rows_list = [r_shared[t] for t in r_shared]
    if problem.held_out is not None:
        # Drawn last, so the rows above are the same with or without held-out data.
        unseen_order = torch.randperm(len(problem.held_out),
                                      generator=child_generator(generator))
        u_shared = _mean_task_grads(problem.held_out, unseen_order[:rows], batch_size,
                                    problem.device, retain_grads)
        labels += [f"unseen/{t}" for t in u_shared]
        retain_rows_list += [u_shared[t] for t in u_shared]
    before = cosine_matrix([f_shared[t] for t in targets] + retain_rows_list)
    after_m = cosine_matrix([after[t] for t in targets] + retain_rows_list)
    kept = {}
    for t in targets:
        num = sum(float((g.double() ** 2).sum()) for g in after[t]) ** 0.5
        den = sum(float((g.double() ** 2).sum()) for g in f_shared[t]) ** 0.5
        kept[t] = num / den if den > 0 else float("nan")  # no forget gradient to keep
    return InterferenceMatrix(labels, before, after_m, kept)
