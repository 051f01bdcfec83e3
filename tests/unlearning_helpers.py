"""Shared set-up of the interference-aware unlearner's tests: a method's step context on a
problem, as its own loop would build it (a copy of the model in train mode, parameter groups,
seeded forget objectives, the method's ``setup``)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mtunlearn_ext.unlearning import (
    ParameterGroups,
    UnlearningProblem,
    UnlearningReport,
    make_forget_objectives,
)
from mtunlearn_ext.unlearning.interference_aware import InterferenceAware
from mtunlearn_ext.unlearning.loop import StepContext
from mtunlearn_ext.unlearning.protected_subspace import ProtectedSubspace

_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCHMARKS not in sys.path:  # the memory tests count as the memory benchmarks do
    sys.path.insert(0, _BENCHMARKS)
from _bench_common import peak_allocated_bytes  # noqa: E402,F401  (used by the memory tests)


def step_context(problem: UnlearningProblem, method: InterferenceAware) -> StepContext:
    model = copy.deepcopy(problem.model).train()
    groups = ParameterGroups.from_model(model, problem.task_names)
    generator = torch.Generator().manual_seed(0)
    objectives = make_forget_objectives(problem.target_specs(), problem.retain, generator, "cpu",
                                        method.config.forget_objective
                                        or method.default_forget_objective)
    ctx = StepContext(model, problem, groups, objectives, generator)
    method.setup(ctx, UnlearningReport(method=method.name, config={}))
    return ctx


class TwoHeads(nn.Module):
    """A user's model: a shared trunk and two heads, not a mtunlearn_ext MultiTaskModel.
    Input: [batch, 6]; outputs: "kind" (3 classes) and "size" (one value)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh())
        self.heads = nn.ModuleDict({"kind": nn.Linear(24, 3), "size": nn.Linear(24, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def fit_kind_and_size(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor],
                      steps: int) -> nn.Module:
    """Train a model with a 3-class "kind" head and a one-value "size" head on ``(x, y)``:
    ``steps`` full-batch Adam steps (lr 1e-2) on the sum of both losses."""
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        out = model(x)
        loss = nn.functional.cross_entropy(out["kind"], y["kind"]) + \
            ((out["size"] - y["size"]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def memorised_kind_and_size() -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """A :class:`TwoHeads` model fitted (150 steps, memorising a little, so there is something
    to forget) on 120 random instances, with its data ``(model, x, y)``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=generator)
    y = {"kind": torch.randint(0, 3, (120,), generator=generator),
         "size": torch.randn(120, 1, generator=generator)}
    torch.manual_seed(0)
    return fit_kind_and_size(TwoHeads(), x, y, steps=150), x, y


class WideTrunkThreeHeads(nn.Module):
    """A trunk of three ``width``-wide layers (most of the parameters in two square ones) and
    three heads: two classifications of 3 classes ("a", "b"), one regression ("c")."""

    def __init__(self, width: int = 256) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width),
                                   nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 3), "b": nn.Linear(width, 3),
                                    "c": nn.Linear(width, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}


WIDE_TASKS = {"a": "classification", "b": "classification", "c": "regression"}


def wide_trunk_data(n: int = 48) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, generator=g), {"a": torch.randint(0, 3, (n,), generator=g),
                                             "b": torch.randint(0, 3, (n,), generator=g),
                                             "c": torch.randn(n, 1, generator=g)}


def per_layer_inner(subspace: ProtectedSubspace, g_stacks: Sequence[torch.Tensor]
                    ) -> torch.Tensor:
    """``[L, m, filled]`` float64: the per-layer inner products ``<g_l, M_l rows>`` of ``m``
    vectors (stacks ``[m, *shape_p]``) with a subspace's snapshots, in plain float64 torch, a
    check independent of the ops the projection runs on (after it they are ~0 up to the
    ridge)."""
    basis = subspace.basis()
    m = g_stacks[0].shape[0]
    out = torch.zeros((subspace.num_layers, m, subspace.filled), dtype=torch.float64)
    for layer, g, b in zip(subspace.layer_ids, g_stacks, basis):
        out[layer] += g.reshape(m, -1).double() @ b.reshape(subspace.filled, -1).double().T
    return out
