"""Round 40 of the memorising tuning: the method's update confined to forget-specific weights.

    python benchmarks/results/unlearning/forget_specific_mask.py --tune --seeds 0 \
        --recipe memorising --output-dir runs/forget_mask_seed0 --benchmarks indoor \
        --requests partial --methods _forget_specific_mask --grid '...'  # see memorising_tuning.sh

An experiment, not part of the library. On partial requests what is left of the method's UIS is
mostly the target task's change on unseen data, which the forget step causes (round 35) and
which constraints or anchors on held-out data did not remove (rounds 26, 27, 39). This variant
(registered here as ``_forget_specific_mask``) lets only the weights that are specific to the
forget pairs move: at the original model, with ``f`` the gradient of the plain target-task
losses summed over the forget pairs and ``r`` the retain loss gradient over ``mask_retain_rows``
retain rows (per pair, so that both are on the same scale),

    ``score = |f| / (|r| + mean(|r|) of that tensor)``

and the update (retain descent and projected forget direction together, as in SalUn) is
multiplied entrywise by ``1[score >= gamma]``, ``gamma`` the ``(1 - mask_fraction)`` quantile
over every entry of the model. A weight where the forget pairs pull hard but the retain data
barely does is one whose change the retained instances (and, the hope is, unseen ones) do not
feel. ``mask_fraction = 1`` is the control: the same set-up passes (and generator draws), no
mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# First: importing _experiments puts the repository on sys.path.
from _experiments import run_evaluation

import torch

from mtunlearn_ext.unlearning.batches import BatchStream, child_generator
from mtunlearn_ext.unlearning.baselines.salun import saliency_threshold
from mtunlearn_ext.unlearning.gradients import summed_pass_grads
from mtunlearn_ext.unlearning.interference_aware import (
    InterferenceAware,
    InterferenceAwareConfig,
)
from mtunlearn_ext.unlearning.objectives import make_forget_objectives
from mtunlearn_ext.unlearning.registry import register_unlearner
from mtunlearn_ext.unlearning.terms import forget_terms, retain_terms


@dataclass
class ForgetSpecificMaskConfig(InterferenceAwareConfig):
    mask_fraction: float = 0.3
    mask_retain_rows: int = 128


@register_unlearner
class ForgetSpecificMask(InterferenceAware):
    name = "_forget_specific_mask"
    config_class = ForgetSpecificMaskConfig
    config: ForgetSpecificMaskConfig

    def setup(self, ctx: Any, report: Any) -> None:
        super().setup(ctx, report)
        cfg, problem = self.config, ctx.problem
        generator = child_generator(ctx.generator)
        ascent = make_forget_objectives(problem.target_specs(), problem.retain, generator,
                                        problem.device, "ascent")

        def forget_objective(batch: Any) -> tuple[Any, int]:
            terms = forget_terms(ctx.forward(batch), batch, problem.tasks, ascent)
            return terms.total(terms.count), sum(terms.count.values())

        def retain_objective(batch: Any) -> tuple[Any, int]:
            # Each task's mean loss times its supervised pairs (a task without any adds 0).
            terms = retain_terms(ctx.forward(batch), batch, problem.tasks)
            counts = dict(zip(problem.task_names, batch["supervision"].sum(dim=0).tolist()))
            return terms.total(counts), int(sum(counts.values()))

        forget_stream = BatchStream(problem.forget, 64, generator, problem.device,
                                    shuffle=False)
        rows = torch.randperm(len(problem.retain), generator=generator)[:cfg.mask_retain_rows]
        retain_stream = BatchStream(problem.retain.subset(rows), 64, generator, problem.device,
                                    shuffle=False)

        def mean_grad(stream: BatchStream, objective: Any) -> list[torch.Tensor]:
            batches = (stream.next() for _ in range(stream.batches_per_pass))
            grads, pairs = summed_pass_grads(batches, objective, ctx.groups.all_params)
            return [g / max(pairs, 1) for g in grads]

        f = mean_grad(forget_stream, forget_objective)
        r = mean_grad(retain_stream, retain_objective)
        if cfg.mask_fraction >= 1.0:
            ctx.state["forget_masks"] = None
            return
        scores = [fi.abs() / (ri.abs() + ri.abs().mean()).clamp(min=1e-30)
                  for fi, ri in zip(f, r)]
        gamma = saliency_threshold(scores, cfg.mask_fraction)
        masks = [(s >= gamma) & (s > 0) for s in scores]
        ctx.state["forget_masks"] = masks
        n_shared = ctx.groups.num_shared
        report.extra["forget_mask_density_shared"] = (
            sum(int(m.sum()) for m in masks[:n_shared])
            / max(sum(m.numel() for m in masks[:n_shared]), 1))

    def compute_update(self, ctx: Any, forget_batch: Any, retain_batch: Any) -> Any:
        stats = super().compute_update(ctx, forget_batch, retain_batch)
        masks = ctx.state["forget_masks"]
        if masks is not None:
            for p, mask in zip(ctx.groups.all_params, masks):
                if p.grad is not None:
                    p.grad.mul_(mask)
        return stats


if __name__ == "__main__":
    run_evaluation()
