"""SalUn-style saliency-masked random labels.

Saliency (Fan et al., SalUn): the weights that matter for forgetting are those where the forget
loss is steep. With ``g = grad_theta sum_{t in S} L^f_t`` accumulated over the whole forget set
(the plain task losses, i.e. the gradient-ascent direction, at the original model), the mask is

    ``m = 1[|g| >= gamma and |g| > 0]``, ``gamma`` the ``(1 - saliency_fraction)`` quantile of
    ``|g|``

over every parameter entry of the model together (one global threshold, so layers with steep
forget gradients get more of the budget). An entry with no forget gradient is never salient:
when more than ``1 - saliency_fraction`` of the entries have none (``gamma = 0``; in a partial
request the other tasks' heads get no forget gradient), fewer than ``saliency_fraction`` of
them move, and those other heads take no retain update either. The update is the random-labels
update (:mod:`~mtunlearn_ext.unlearning.baselines.random_labels`) multiplied by ``m``
entrywise: weights outside the salient set never move, which limits collateral damage to the
retained pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtunlearn_ext.unlearning.base import UnlearningReport
from mtunlearn_ext.unlearning.batches import Batch, BatchStream
from mtunlearn_ext.unlearning.baselines.random_labels import RandomLabels, RandomLabelsConfig
from mtunlearn_ext.unlearning.gradients import summed_pass_grads
from mtunlearn_ext.unlearning.loop import StepContext
from mtunlearn_ext.unlearning.objectives import make_forget_objectives
from mtunlearn_ext.unlearning.registry import register_unlearner
from mtunlearn_ext.unlearning.terms import forget_terms

__all__ = ["SalUn", "SalUnConfig"]


@dataclass
class SalUnConfig(RandomLabelsConfig):
    """``saliency_fraction``: share of parameter entries allowed to move (SalUn's default 0.5;
    fewer where fewer have a forget gradient, see the module text).
    ``saliency_batch_size``: forget rows per pass when accumulating the saliency gradient."""

    saliency_fraction: float = 0.5
    saliency_batch_size: int = 64

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.saliency_fraction <= 1.0:
            raise ValueError(f"SalUnConfig: `saliency_fraction` must be in (0, 1], got "
                             f"{self.saliency_fraction}")
        if self.weight_decay != 0:
            # The optimizer adds decay to every weight, masked or not: the mask would leak.
            raise ValueError(f"SalUnConfig: `weight_decay` must be 0 (decay would move weights "
                             f"outside the saliency mask), got {self.weight_decay}")
        if self.saliency_batch_size < 1:
            raise ValueError(f"SalUnConfig: `saliency_batch_size` must be >= 1, got "
                             f"{self.saliency_batch_size}")


def saliency_threshold(magnitudes: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The value ``gamma`` with a ``fraction`` of all entries of ``magnitudes`` at or above it,
    in their own (promoted) type: half precision is widened to float32, where its values are
    exact, but float64 is not narrowed (a float32 ``gamma`` rounded above the keep-th largest
    float64 magnitude half the time, and the mask ``|g| >= gamma`` lost that entry)."""
    flat = torch.cat([m.reshape(-1) for m in magnitudes])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    keep = max(1, int(round(fraction * flat.numel())))
    # The keep-th largest = the (n - keep + 1)-th smallest.
    return flat.kthvalue(flat.numel() - keep + 1).values


@register_unlearner
class SalUn(RandomLabels):
    """Random labels restricted to the weights most salient for the forget loss."""

    name = "salun"
    config_class = SalUnConfig
    config: SalUnConfig

    def setup(self, ctx: StepContext, report: UnlearningReport) -> None:
        cfg = self.config
        problem = ctx.problem
        params = ctx.groups.all_params
        # The saliency is the plain forget-loss gradient, whatever the update's objective.
        ascent = make_forget_objectives(problem.target_specs(), problem.retain, ctx.generator,
                                        problem.device, "ascent")
        stream = BatchStream(problem.forget, cfg.saliency_batch_size, ctx.generator,
                             problem.device, shuffle=False)

        def summed_forget_loss(batch: Batch) -> tuple[torch.Tensor | None, int]:
            # Summed over pairs (each task's mean times its pair count), not averaged per
            # batch, so the result does not depend on the batch size.
            terms = forget_terms(ctx.forward(batch), batch, problem.tasks, ascent)
            return terms.total(terms.count), sum(terms.count.values())

        grads, total_pairs = summed_pass_grads(
            (stream.next() for _ in range(stream.batches_per_pass)), summed_forget_loss, params)
        magnitudes = [g.abs() for g in grads]
        gamma = saliency_threshold(magnitudes, cfg.saliency_fraction)
        masks = [(m >= gamma) & (m > 0) for m in magnitudes]
        ctx.state["saliency_masks"] = masks
        n_shared = ctx.groups.num_shared
        kept_shared = sum(int(m.sum()) for m in masks[:n_shared])
        kept_heads = sum(int(m.sum()) for m in masks[n_shared:])
        size_shared = sum(m.numel() for m in masks[:n_shared])
        size_heads = sum(m.numel() for m in masks[n_shared:])
        report.extra["saliency"] = {
            "threshold": float(gamma),
            "density": (kept_shared + kept_heads) / max(size_shared + size_heads, 1),
            "density_shared": kept_shared / max(size_shared, 1),
            "density_heads": kept_heads / max(size_heads, 1),
            "forget_pairs": total_pairs,
        }

    def mask_update(self, ctx: StepContext) -> None:
        for p, mask in zip(ctx.groups.all_params, ctx.state["saliency_masks"]):
            if p.grad is not None:
                p.grad.mul_(mask)
