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
    """``retain_weight`` must stay 0: the steps draw no retain batch (``head_refit_steps``
    refit the heads on the retain loss, weighted by ``retain_task_weights``)."""

    steps: int = 30
    lr: float = 1e-3
    retain_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        # The steps see no retain batch, so any other weight would be ignored without a word.
        if self.retain_weight != 0.0:
            raise ValueError(f"GradientAscentConfig: gradient ascent has no retain term; leave "
                             f"`retain_weight` at 0 or use 'neggrad_plus' for ascent plus "
                             f"weighted retain descent, got {self.retain_weight!r}")


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
