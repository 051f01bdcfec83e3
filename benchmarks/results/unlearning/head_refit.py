"""Round 41 of the memorising tuning: the heads refitted on retain data after the forget steps.

    python benchmarks/results/unlearning/head_refit.py --tune --seeds 0 --recipe memorising \
        --output-dir runs/head_refit_seed0 --benchmarks indoor --requests full \
        --methods _head_refit --checkpoints 40,45,50 --method-max-steps 50 --grid '...'
        # see memorising_tuning.sh

An experiment, not part of the library. On full requests what is left of the method's UIS on
street is mostly the test split's change (depth), which the forget steps cause by moving the
trunk (item 8 of UNLEARNING_RESULTS.md); constraints and anchors on held-out data (rounds 26,
27) slowed forgetting more than they kept the unseen scores. This variant (registered here as
``_head_refit``) leaves the forget steps as they are and adds, from step ``refit_from`` on,
steps that move the heads only, by retain descent: each head is fitted again to the features the
moved trunk now gives the retained instances. No such step sees a forget pair, and a head alone
cannot single out instances the trunk no longer separates, so the hope is that the test score
comes back further than the forget pairs' does.

In a refit step the trunk's learning rate is 0 (its Adam state is left as it is, and the loop's
zero gradients move nothing), the heads keep the method's optimizer and learning rate, and the
gradient is the retain batch's plain retain loss with the trunk held fixed (no graph through it).
Steps before ``refit_from`` are the method's own, with the same draws: checkpoint ``refit_from``
of a run is the preset's model itself, the control, and checkpoints after it are the
candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# First: importing _experiments puts the repository on sys.path.
from _experiments import run_evaluation

import torch

from mtunlearn_ext.unlearning.interference_aware import (
    InterferenceAware,
    InterferenceAwareConfig,
)
from mtunlearn_ext.unlearning.registry import register_unlearner


@dataclass
class HeadRefitConfig(InterferenceAwareConfig):
    refit_from: int = 40
    #: Round 42: the trunk's learning rate in the refit steps, as a fraction of its own (0: the
    #: heads alone, round 41 and the library's ``head_refit_steps``; above 0 the refit steps
    #: are plain retain descent on the whole model, the trunk at this fraction of its rate).
    refit_trunk_lr_scale: float = 0.0


@register_unlearner
class HeadRefit(InterferenceAware):
    name = "_head_refit"
    config_class = HeadRefitConfig
    config: HeadRefitConfig

    def _make_optimizer(self, groups: Any) -> torch.optim.Optimizer:
        self._optimizer = super()._make_optimizer(groups)
        self._trunk_lr = self._optimizer.param_groups[0]["lr"]
        return self._optimizer

    def compute_update(self, ctx: Any, forget_batch: Any, retain_batch: Any) -> Any:
        trunk_group = self._optimizer.param_groups[0]
        if ctx.step < self.config.refit_from:
            trunk_group["lr"] = self._trunk_lr
            return super().compute_update(ctx, forget_batch, retain_batch)
        trunk_group["lr"] = self._trunk_lr * self.config.refit_trunk_lr_scale
        if self.config.refit_trunk_lr_scale == 0.0:
            # The step the library now takes as `head_refit_steps` (written out here in round
            # 41; the library's gives this run's models bit for bit).
            return self.head_refit_update(ctx, retain_batch)
        return self.weighted_update(ctx, None, retain_batch)


if __name__ == "__main__":
    run_evaluation()
