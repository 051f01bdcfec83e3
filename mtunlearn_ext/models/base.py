"""The multi-task model contract: one shared backbone, one head per task, and an explicit,
queryable split of the parameters between them.

Unlearning code reads this split, never the module structure: the shared parameters
``theta_s`` are ``model.backbone``'s, the parameters ``theta_t`` of task ``t`` are
``model.heads[t]``'s, and :meth:`MultiTaskModel.parameter_split` checks that every parameter
belongs to exactly one of them. Parameter names are the full names of ``model.named_parameters()``
(``"backbone.enc1.0.0.weight"``), so they plug straight into ``torch.func.functional_call``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext.data.base import TaskSpec

if TYPE_CHECKING:
    from mtunlearn_ext.data.inputs import Inputs

__all__ = ["MultiTaskModel", "ParameterSplit", "SHARED", "check_takes_task_names", "device_of"]

SHARED = "shared"
"""Owner name of the backbone's parameters in a :class:`ParameterSplit` (so no task may be
named so)."""

_SHARED_NAME_MESSAGE = (f"{{where}}: a task may not be named {SHARED!r}, the owner name of the "
                        f"shared (backbone) parameters in ParameterSplit.owner() / names(); "
                        f"rename the task")


def check_takes_task_names(model: nn.Module, op: str) -> None:
    """Raise ``TypeError`` if ``model`` cannot be called as ``model(inputs, task_names)``, the
    :class:`MultiTaskModel` contract that ``op`` (training, evaluation) relies on: a plain
    ``forward(x)`` failed with torch's bare "takes 2 positional arguments but 3 were given"."""
    import inspect

    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to read (a C-implemented forward)
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(
            f"{op}: `model` must take (inputs, task names), as MultiTaskModel.forward does; "
            f"{type(model).__name__}.forward{signature} takes no task names. Subclass "
            "MultiTaskModel, or give forward a second parameter (`tasks=None`, which it may "
            "ignore); mtunlearn_ext.unlearn wraps a plain model itself") from None


@dataclass(frozen=True)
class ParameterSplit:
    """Which parameter belongs to the shared backbone and which to each task head.

    ``shared``: the backbone's parameter names, in ``named_parameters`` order; ``heads``: task
    name -> that head's parameter names. Every trainable parameter of the model is in exactly one.
    """

    shared: tuple[str, ...]
    heads: Mapping[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        if SHARED in self.heads:
            raise ValueError(_SHARED_NAME_MESSAGE.format(where="ParameterSplit"))

    def owner(self, name: str) -> str:
        """:data:`SHARED` or the task name owning parameter ``name``; ``KeyError`` if none."""
        if name in self.shared:
            return SHARED
        for task, names in self.heads.items():
            if name in names:
                return task
        raise UnknownNameError(f"ParameterSplit: no parameter named {name!r}")

    def names(self, owner: str) -> tuple[str, ...]:
        """The parameter names of ``owner`` (:data:`SHARED` or a task name)."""
        if owner == SHARED:
            return self.shared
        if owner not in self.heads:
            raise UnknownNameError(f"ParameterSplit: unknown owner {owner!r}; owners are "
                                   f"{[SHARED, *self.heads]}")
        return self.heads[owner]

    @property
    def all_names(self) -> tuple[str, ...]:
        """Every parameter name of the split: the shared ones, then each head's."""
        return self.shared + tuple(n for names in self.heads.values() for n in names)


class MultiTaskModel(nn.Module):
    """A shared backbone and one head per task: ``f_t(x) = h_t(g(x))``.

    Args:
        backbone: ``g``, maps an input batch to shared features.
        heads: task name -> ``h_t``, maps the shared features to the task's prediction (output
            activations such as positive depth or unit normals belong to the head).
        tasks: the task specs; their names must be the keys of ``heads``, and none may be
            :data:`SHARED` (``"shared"``, the owner name of the backbone's parameters).

    ``forward(x)`` returns task name -> prediction for every task (or the ``tasks`` asked for).
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if SHARED in names:
            raise ValueError(_SHARED_NAME_MESSAGE.format(where="MultiTaskModel"))
        if sorted(names) != sorted(heads):
            raise ValueError(f"MultiTaskModel: `heads` has tasks {sorted(heads)} but `tasks` "
                             f"names {names}")
        self.backbone = backbone
        self.heads = nn.ModuleDict({name: heads[name] for name in names})
        self.tasks: list[TaskSpec] = list(tasks)

    @property
    def task_names(self) -> list[str]:
        """The task names, in the order of ``tasks``."""
        return [t.name for t in self.tasks]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared features ``g(x)``."""
        return self.backbone(x)

    def head_forward(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """Task ``task``'s prediction ``h_t(z)`` from shared features ``z``."""
        self._check_task(task)
        return self.heads[task](features)

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None
                ) -> dict[str, torch.Tensor]:
        features = self.features(x)
        wanted = self.task_names if tasks is None else list(tasks)
        return {task: self.head_forward(task, features) for task in wanted}

    if TYPE_CHECKING:
        # ``model(x)`` is typed (``nn.Module.__call__`` returns ``Any``): task -> prediction.
        # The inputs are the contract's (one tensor, or several inputs: what the library passes
        # every model, a subclass's or a SplitModel), not only this forward's tensor. Declared
        # for checkers only: the call and its hooks run exactly as nn.Module runs them.
        def __call__(self, x: Inputs, tasks: Sequence[str] | None = None
                     ) -> dict[str, torch.Tensor]: ...

    # -- the parameter split -------------------------------------------------------------------

    def shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` of every backbone parameter (``theta_s``)."""
        return [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]

    def task_parameters(self, task: str) -> list[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` of every parameter of task ``task``'s head (``theta_t``)."""
        self._check_task(task)
        return [(f"heads.{task}.{n}", p) for n, p in self.heads[task].named_parameters()]

    def shared_modules(self) -> list[tuple[str, nn.Module]]:
        """``(full name, module)`` of every backbone module that owns parameters directly."""
        return [(f"backbone.{n}" if n else "backbone", m)
                for n, m in self.backbone.named_modules()
                if any(True for _ in m.parameters(recurse=False))]

    def shared_layers(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Per-layer groups of the shared parameters: ``(module name, [its own parameters])``,
        one group per module that owns parameters (a convolution, a norm layer), in forward
        declaration order. Per-layer Gram matrices (``[L, k, k]``) are taken over these groups."""
        return [(name, list(m.parameters(recurse=False))) for name, m in self.shared_modules()]

    def task_layers(self, task: str) -> list[tuple[str, list[nn.Parameter]]]:
        """Per-layer groups of task ``task``'s head, as :meth:`shared_layers`."""
        self._check_task(task)
        prefix = f"heads.{task}"
        return [(f"{prefix}.{n}" if n else prefix, list(m.parameters(recurse=False)))
                for n, m in self.heads[task].named_modules()
                if any(True for _ in m.parameters(recurse=False))]

    def parameter_split(self) -> ParameterSplit:
        """The explicit split ``theta = (theta_s, theta_1, ..., theta_T)``.

        Raises ``RuntimeError`` if a parameter sits outside the backbone and heads, or is shared
        between them (tied weights would make per-task projections ill-defined).
        """
        shared = tuple(n for n, _ in self.shared_parameters())
        heads = {t: tuple(n for n, _ in self.task_parameters(t)) for t in self.task_names}
        split = ParameterSplit(shared, heads)
        all_named = list(self.named_parameters(remove_duplicate=False))
        stray = sorted({n for n, _ in all_named} - set(split.all_names))
        if stray:
            raise RuntimeError(f"MultiTaskModel: parameters outside the backbone and heads: "
                               f"{stray}")
        if len({id(p) for _, p in all_named}) != len(all_named):
            raise RuntimeError("MultiTaskModel: a parameter tensor is tied between two places")
        return split

    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise UnknownNameError(f"unknown task {task!r}; this model has tasks {self.task_names}")


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
