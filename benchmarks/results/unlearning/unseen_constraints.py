"""Round 26 of the memorising tuning: the forget step also kept off unseen data's gradients.

    python benchmarks/results/unlearning/unseen_constraints.py --tune --seeds 0 \
        --recipe memorising --output-dir runs/unseen_constraints_seed0 --benchmarks street \
        --requests full --methods _unseen_constrained --grid '...'   # see memorising_tuning.sh

An experiment, not part of the library: the interference diagnostic
(``benchmarks/unseen_interference.py``) showed the projected forget gradient still conflicting
with the loss gradients on unseen data, so this variant of the interference-aware method
(registered here as ``_unseen_constrained``) projects its forget direction, after the instance
step, off each task's loss gradient on a batch of the problem's held-out instances (refreshed
every ``unseen_every`` steps). The arguments are those of ``benchmarks/unlearning_eval.py``.
The validation UIS the tuning reports for it is optimistic (the constraints come from the
same held-out instances), which only favours it; it still did not beat the preset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# First: importing _experiments puts the repository on sys.path.
from _experiments import held_out_stream, run_evaluation

import torch

from mtunlearn_ext.surgery import project_out_list
from mtunlearn_ext.unlearning.interference_aware import (
    InterferenceAware,
    InterferenceAwareConfig,
)
from mtunlearn_ext.unlearning.registry import register_unlearner


@dataclass
class UnseenConstrainedConfig(InterferenceAwareConfig):
    unseen_every: int = 5
    unseen_rows: int = 32


@register_unlearner
class UnseenConstrained(InterferenceAware):
    name = "_unseen_constrained"
    config_class = UnseenConstrainedConfig

    def setup(self, ctx: Any, report: Any) -> None:
        super().setup(ctx, report)
        ctx.state["unseen_stream"] = held_out_stream(ctx, self.name, self.config.unseen_rows)

    def _unseen_rows(self, ctx: Any, names: Sequence[str]) -> list[torch.Tensor]:
        """One stack ``[T, *shape]`` per parameter of ``names``: each task's loss gradient on a
        held-out batch (zero on other tasks' heads), recomputed every ``unseen_every``
        steps."""
        key = (ctx.step // self.config.unseen_every, tuple(names))
        cached = ctx.state.get("unseen_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        batch = ctx.state["unseen_stream"].next()
        on_shared, on_head = self.retain_task_grads(ctx, self.retain_step_terms(ctx, batch).loss)
        shared_names = [n for n, _ in ctx.groups.shared]
        rows = []
        for task in on_shared:
            by_name = {**dict(zip(shared_names, on_shared[task])),
                       **dict(zip((n for n, _ in ctx.groups.heads[task]), on_head[task]))}
            rows.append([by_name[n] if n in by_name else torch.zeros_like(p)
                         for n, p in zip(names, self._params(ctx, names))])
        stacks = [torch.stack([row[j] for row in rows]) for j in range(len(names))]
        ctx.state["unseen_cache"] = (key, stacks)
        return stacks

    @staticmethod
    def _params(ctx: Any, names: Sequence[str]) -> list[torch.Tensor]:
        params = dict(ctx.model.named_parameters())
        return [params[n] for n in names]

    def instance_project(self, ctx: Any, step_dir: list[torch.Tensor],
                         param_names: Sequence[str], batch: Any,
                         per_sample: list[torch.Tensor] | None = None, memory: Any = None,
                         task_scale: Sequence[float] | None = None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        direction, stacks = super().instance_project(ctx, step_dir, param_names, batch,
                                                     per_sample, memory, task_scale)
        rows = [d.unsqueeze(0) for d in direction]
        out = project_out_list(rows, self._unseen_rows(ctx, param_names), self.config.ridge,
                               outs=rows)
        assert isinstance(out, list)
        return [o[0] for o in out], stacks


if __name__ == "__main__":
    run_evaluation()
