"""Random labels: fit the forget pairs to random targets while descending on the retain pairs.

``theta <- theta - eta grad [w_f sum_{t in S} L_t(f(x_f), y~) + w_r sum_t L^r_t]`` with ``y~`` a
random target drawn afresh at each step (objective ``random_target``): a uniformly random other
class for classification; for segmentation, depth, normals and regression the target of a random
retain instance, so regression targets are random but stay in the data's own range. Minimising a
loss against fresh random targets is bounded (>= 0) and, in expectation, pulls the forget
predictions toward the retain targets' mean, i.e. away from the instance-specific fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtunlearn_ext.unlearning.batches import Batch
from mtunlearn_ext.unlearning.loop import GradientUnlearner, StepConfig, StepContext, StepStats
from mtunlearn_ext.unlearning.registry import register_unlearner

__all__ = ["RandomLabels", "RandomLabelsConfig"]


@dataclass
class RandomLabelsConfig(StepConfig):
    """``forget_weight`` weighs the loss against the random targets, ``retain_weight`` the
    retain loss (SalUn's objective: the two summed, its ``alpha`` on the retain term). The
    forget objective defaults to ``random_target``."""

    steps: int = 100
    lr: float = 1e-3
    forget_weight: float = 1.0
    retain_weight: float = 1.0


@register_unlearner
class RandomLabels(GradientUnlearner):
    """Descent on random targets for the forget pairs and true targets for the retain pairs."""

    name = "random_labels"
    config_class = RandomLabelsConfig
    default_forget_objective = "random_target"

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        return self.weighted_update(ctx, forget_batch, retain_batch)
