"""Gradient ascent on the forget pairs: ``theta <- theta + eta grad sum_{t in S} L^f_t``.

The classic baseline: maximise the target tasks' loss on the forget pairs with no retain signal
(objective ``ascent``; any other objective can be chosen, which turns it into "descent on the
forget objective only"). Unbounded: only the step budget keeps the model usable.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtunlearn_ext.unlearning.batches import Batch
from mtunlearn_ext.unlearning.loop import GradientUnlearner, StepConfig, StepContext, StepStats
from mtunlearn_ext.unlearning.registry import register_unlearner

__all__ = ["GradientAscent", "GradientAscentConfig"]


@dataclass
class GradientAscentConfig(StepConfig):
    steps: int = 30
    lr: float = 1e-3
    retain_weight: float = 0.0


@register_unlearner
class GradientAscent(GradientUnlearner):
    """Ascent on the target tasks' loss of the forget pairs."""

    name = "gradient_ascent"
    config_class = GradientAscentConfig
    default_forget_objective = "ascent"
    uses_retain = False

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        return self.weighted_update(ctx, forget_batch, None)
