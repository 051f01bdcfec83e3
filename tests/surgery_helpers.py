"""Shared fixtures of the surgery hook tests: a small multi-task network (a trunk and one head
per task), its batches and losses, and a float64 reference built on the flattened Jacobian."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

F64 = torch.float64
TASKS = 3


class OpLog(TorchDispatchMode):
    """Every aten op run under it, by name in order (what a step computes, reads back to the
    host or allocates), and a weak reference to each tensor ``aten.empty`` made (which of them
    outlive the step)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.empties: list[weakref.ref[torch.Tensor]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops.append(name)
        if name == "aten.empty":
            self.empties.append(weakref.ref(out))
        return out


class MultiTaskNet(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(TASKS)])
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def _batch(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 6, generator=gen, dtype=F64).to(dtype)
    y = torch.randn(TASKS, 10, generator=gen, dtype=F64).to(dtype)
    return x, y


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    # Task 1 is pushed against task 0 so that the surgery has conflicts to resolve.
    outs = model(x)
    return [((outs[t] - (-1) ** t * y[t]) ** 2).mean() for t in range(TASKS)]


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, aggregator
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Float64 reference: flattened per-task Jacobian of the trunk, aggregated as a matrix."""
    trunk = list(model.trunk.parameters())
    heads = list(model.heads.parameters())
    losses = _losses(model, x, y)
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, trunk, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1).to(F64) for g in grads]))
    jacobian = torch.stack(rows)
    update = aggregator(jacobian)
    shared, start = [], 0
    for p in trunk:
        shared.append(update[start:start + p.numel()].reshape(p.shape))
        start += p.numel()
    head_grads = torch.autograd.grad(sum(losses), heads)
    return shared, [g.to(F64) for g in head_grads], jacobian
