"""Fine-tuning on the retain pairs only ("catastrophic forgetting" baseline).

``theta <- theta - eta grad sum_t L^r_t``: the forget pairs are never visited; their influence
fades only as far as continued training on the rest overwrites it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtunlearn_ext.unlearning.batches import Batch
from mtunlearn_ext.unlearning.loop import (
    GradientUnlearner,
    StepConfig,
    StepContext,
    StepOptimizer,
    StepStats,
)
from mtunlearn_ext.unlearning.registry import register_unlearner

__all__ = ["FineTune", "FineTuneConfig"]


@dataclass
class FineTuneConfig(StepConfig):
    """Defaults: a short run of the original optimiser family (Adam) on retain batches.
    ``forget_weight`` must stay 0: the forget pairs are only measured (the forget curves)."""

    steps: int = 200
    lr: float = 1e-3
    optimizer: StepOptimizer = "adam"
    forget_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        # The steps see no forget batch, so any other weight would be ignored without a word.
        if self.forget_weight != 0.0:
            raise ValueError(f"FineTuneConfig: fine-tuning has no forget term (its forget pairs "
                             f"are only measured); leave `forget_weight` at 0 or use "
                             f"'neggrad_plus' for weighted ascent plus retain descent, got "
                             f"{self.forget_weight!r}")


@register_unlearner
class FineTune(GradientUnlearner):
    """Continue training on the retain pairs."""

    name = "finetune"
    config_class = FineTuneConfig
    uses_forget = False
    # The forget pairs enter only the curves, as their plain losses: ascent needs nothing from
    # the retain set (a capped objective refused a task without retain pairs, and with it the
    # whole run, for a term the method never uses).
    default_forget_objective = "ascent"
    forget_objective_is_setting = False

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        return self.weighted_update(ctx, None, retain_batch)
