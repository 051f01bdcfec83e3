"""Round 27 of the memorising tuning: outputs on unseen inputs anchored to the original's.

    python benchmarks/results/unlearning/held_out_anchor.py --tune --seeds 0 \
        --recipe memorising --output-dir runs/held_out_anchor_seed0 --benchmarks street \
        --requests full --methods _held_out_anchor --grid '...'   # see memorising_tuning.sh

An experiment, not part of the library. Round 26 kept the forget direction off unseen data's
loss gradients at step time and the test-score change still built up over the steps. This
variant of the interference-aware method (registered here as ``_held_out_anchor``) adds a
restoring term instead: ``anchor_weight`` times the distance between the model's current and
original outputs on a batch of ``anchor_rows`` held-out *inputs* (labels unused), in each
task's own loss (depth: mean |z - z0|, normals: mean 1 - cos, segmentation: KL(p0 || p)). It is
zero, with zero gradient, until the outputs drift, and grows with the drift. With
``anchor_split = 2`` only the held-out rows at even positions are anchors, so the other half
of the validation split stays unseen by the step (the validation UIS the tuning reports is
still partly optimistic: half its instances were anchored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# First: importing _experiments puts the repository on sys.path.
from _experiments import held_out_of, held_out_stream, run_evaluation

import torch
import torch.nn.functional as F

from mtunlearn_ext._functional import unit_normalize
from mtunlearn_ext.unlearning.batches import batch_to
from mtunlearn_ext.unlearning.gradients import grads_of
from mtunlearn_ext.unlearning.interference_aware import (
    InterferenceAware,
    InterferenceAwareConfig,
)
from mtunlearn_ext.unlearning.registry import register_unlearner


@dataclass
class HeldOutAnchorConfig(InterferenceAwareConfig):
    anchor_weight: float = 1.0
    anchor_rows: int = 16
    anchor_split: int = 2


def output_distance(kind: str, pred: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean distance of ``pred`` from ``original`` in the task kind's own loss."""
    if kind in ("classification", "segmentation"):
        log_p = F.log_softmax(pred, dim=1)
        log_p0 = F.log_softmax(original, dim=1)
        return (log_p0.exp() * (log_p0 - log_p)).sum(dim=1).mean()
    if kind == "normals":
        return (1 - (unit_normalize(pred, dim=1) * unit_normalize(original, dim=1)).sum(1)).mean()
    return (pred - original).abs().mean()


@register_unlearner
class HeldOutAnchor(InterferenceAware):
    name = "_held_out_anchor"
    config_class = HeldOutAnchorConfig
    config: HeldOutAnchorConfig

    @torch.no_grad()
    def setup(self, ctx: Any, report: Any) -> None:
        super().setup(ctx, report)
        held_out = held_out_of(ctx, self.name)
        anchors = held_out.subset(torch.arange(0, len(held_out), self.config.anchor_split))
        outputs: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(anchors), 64):
            batch = batch_to(anchors.batch(torch.arange(start, min(start + 64, len(anchors)))),
                             ctx.problem.device)
            for task, value in ctx.forward(batch).items():
                outputs.setdefault(task, []).append(value.detach())
        ctx.state["anchor_outputs"] = {t: torch.cat(v) for t, v in outputs.items()}
        ctx.state["anchor_position"] = {int(i): p for p, i in enumerate(anchors.ids.tolist())}
        ctx.state["anchor_stream"] = held_out_stream(ctx, self.name, self.config.anchor_rows,
                                                     anchors)

    def compute_update(self, ctx: Any, forget_batch: Any, retain_batch: Any) -> Any:
        stats = super().compute_update(ctx, forget_batch, retain_batch)
        weight = self.config.anchor_weight
        if weight <= 0:
            return stats
        batch = ctx.state["anchor_stream"].next()
        position = ctx.state["anchor_position"]
        index = torch.tensor([position[int(i)] for i in batch["id"].tolist()],
                             device=ctx.problem.device)
        out = ctx.forward(batch)
        kinds = {spec.name: spec.kind for spec in ctx.problem.tasks}
        total = sum(output_distance(kinds[t], out[t],
                                    ctx.state["anchor_outputs"][t].index_select(0, index))
                    for t in out)
        stats.extra["anchor_distance"] = float(total.detach())
        params = ctx.groups.all_params
        for p, g in zip(params, grads_of(total, params)):
            p.grad = g * weight if p.grad is None else p.grad + weight * g
        return stats


if __name__ == "__main__":
    run_evaluation()
