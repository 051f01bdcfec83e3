"""NegGrad+: gradient ascent on the forget pairs plus descent on the retain pairs.

``theta <- theta - eta grad [w_r sum_t L^r_t - w_f sum_{t in S} L^f_t]`` (Kurmanji et al.'s
NegGrad+ writes it ``beta L_r - (1 - beta) L_f``; here the two weights are free). The retain
term anchors the shared backbone while the forget term removes the target supervision.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtunlearn_ext.unlearning.batches import Batch
from mtunlearn_ext.unlearning.loop import GradientUnlearner, StepConfig, StepContext, StepStats
from mtunlearn_ext.unlearning.registry import register_unlearner

__all__ = ["NegGradPlus", "NegGradPlusConfig"]


@dataclass
class NegGradPlusConfig(StepConfig):
    """``forget_weight`` ``w_f`` and ``retain_weight`` ``w_r``: the paper's
    ``beta L_r - (1 - beta) L_f`` is the same direction with ``beta = w_r / (w_r + w_f)`` (2/3
    at the defaults), at a learning rate scaled by ``w_r + w_f``."""

    steps: int = 100
    lr: float = 1e-3
    forget_weight: float = 0.5
    retain_weight: float = 1.0


@register_unlearner
class NegGradPlus(GradientUnlearner):
    """Weighted ascent on forget pairs and descent on retain pairs."""

    name = "neggrad_plus"
    config_class = NegGradPlusConfig
    default_forget_objective = "ascent"

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        return self.weighted_update(ctx, forget_batch, retain_batch)
