"""PCGrad over forget and retain gradients: plain gradient surgery as an unlearning baseline.

The update is PCGrad (Yu et al.) applied to the rows

    ``split`` granularity: ``[w_f f, w_r r]`` with ``f = grad sum_{t in S} O_t`` (forget objective,
    ``ascent`` by default) and ``r = grad sum_t L^r_t``;
    ``task`` granularity: one row ``w_f f_t`` per target task and one ``w_r r_t`` per task,

where each row, against the other (unprojected) rows in its own seeded random order, drawn
afresh each step, is projected onto the normal plane of every one it conflicts with (negative
inner product) and the projected rows are summed, as in Yu et al. Computed by
:func:`mtunlearn_ext.ops.pcgrad_weights` from the ``k x k`` Gram matrix of the rows: two passes
over the gradients whatever ``k``, through the surgery layer's
:func:`~mtunlearn_ext.surgery.aggregate_list` on per-parameter stacks. Rows cover every
parameter (backbone and heads), never flattened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from mtunlearn_ext.surgery import PCGradWeighting, aggregate_list
from mtunlearn_ext.unlearning.batches import Batch
from mtunlearn_ext.unlearning.gradients import assign_grads, task_grads
from mtunlearn_ext.unlearning.loop import GradientUnlearner, StepConfig, StepContext, StepStats
from mtunlearn_ext.unlearning.registry import register_unlearner

__all__ = ["GRANULARITIES", "PCGradConfig", "PCGradGranularity", "PCGradUnlearner"]

#: What one row of PCGrad's projection is (``PCGradConfig.granularity``).
PCGradGranularity = Literal["split", "task"]
GRANULARITIES: tuple[PCGradGranularity, ...] = get_args(PCGradGranularity)


@dataclass
class PCGradConfig(StepConfig):
    """``granularity``: ``"split"`` (one forget and one retain row) or ``"task"`` (one row per
    target task's forget objective and per task's retain loss)."""

    steps: int = 100
    lr: float = 1e-3
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    granularity: PCGradGranularity = "split"

    def validate(self) -> None:
        super().validate()
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"PCGradConfig: `granularity` must be 'split' or 'task', got "
                             f"{self.granularity!r}")


@register_unlearner
class PCGradUnlearner(GradientUnlearner):
    """PCGrad of the forget and retain gradients."""

    name = "pcgrad"
    config_class = PCGradConfig
    default_forget_objective = "ascent"
    config: PCGradConfig

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        assert forget_batch is not None and retain_batch is not None
        cfg = self.config
        params = ctx.groups.all_params
        stats = StepStats()
        stats.forget = self.forget_step_terms(ctx, forget_batch)
        stats.retain = self.retain_step_terms(ctx, retain_batch)
        if cfg.granularity == "split":
            named: dict[str, torch.Tensor] = {}
            if stats.forget.objective and cfg.forget_weight > 0:
                forget_total = stats.forget.total()
                assert forget_total is not None  # the objective has a task
                named["forget"] = cfg.forget_weight * forget_total
            if cfg.retain_weight > 0:
                retain_total = stats.retain.total()
                assert retain_total is not None  # the retain loss has every task
                named["retain"] = cfg.retain_weight * retain_total
        else:
            named = {f"forget/{t}": cfg.forget_weight * v
                     for t, v in stats.forget.objective.items() if cfg.forget_weight > 0}
            if cfg.retain_weight > 0:
                named.update({f"retain/{t}": cfg.retain_weight * self.retain_task_weight(t) * v
                              for t, v in stats.retain.loss.items() if v.requires_grad})
        # Two separate forward graphs: every row needs its own backward through one of them.
        per_task = list(task_grads(named, params).values())
        if not per_task:
            return stats
        # A fresh, seeded projection order each step, as PCGrad shuffles the tasks; the rows stay
        # per-parameter stacks [k, *shape_p] (the surgery layer: one Gram pass, the coefficient-
        # space PCGrad, one combination into the outputs), never a flat copy.
        seed = (ctx.problem.seed * 1_000_003 + ctx.step) % (2**31)
        # Each parameter's task gradients are let go once stacked: kept until every stack was
        # made, they were k more copies of the model at the step's peak.
        by_param = [list(grads) for grads in zip(*per_task)][::-1]  # popped in parameter order
        del per_task
        stacks = []
        while by_param:
            stacks.append(torch.stack(by_param.pop()))
        # Contiguous whatever the parameter's layout: the surgery writes them in place.
        update = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        aggregate_list(PCGradWeighting(seed=seed, reshuffle=False), stacks, update)
        assign_grads(params, update)
        return stats
