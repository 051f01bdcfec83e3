"""``retain_task_weights``: each task's weight in the retain objective, for every step-based
method, checked against the same weight written into the task's loss (a ``TaskSpec`` whose
loss is ``w`` times the kind's): the two must give the same run wherever the weighted task
is retained only (its forget objective and caps untouched)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest, TaskSpec
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.unlearning import get_unlearner

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHT = 3.0


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 2)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _scaled_mse(scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * F.mse_loss(prediction, target, reduction="none").mean(dim=-1)
    return loss


def _problem(b_loss_scale: float | None):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = {"a": torch.randint(0, 3, (60,), generator=g),
         "b": torch.randn(60, 2, generator=g, dtype=torch.float64)}
    b = TaskSpec("b", "regression") if b_loss_scale is None else TaskSpec(
        "b", "regression", loss=_scaled_mse(b_loss_scale))
    return build_problem(_TwoHeads().double(), tasks=[TaskSpec("a", "classification",
                                                              num_classes=3), b],
                         train_data=(x, y),
                         # partial: only "a" is forgotten, "b" is retained everywhere
                         forget_request=ForgetRequest.create(range(6), ["a"]),
                         shared_parameters=lambda n: n.startswith("trunk."))


@pytest.mark.parametrize("method, settings", [
    ("interference_aware", {}),
    ("interference_aware", {"refresh_every": 2, "instance_rows": "instance_task",
                            "num_per_sample": 8, "retain_batch_size": 16}),
    ("interference_aware", {"head_refit_steps": 2, "optimizer": "adam", "lr": 1e-2}),
    ("neggrad_plus", {}),
    ("finetune", {}),
    ("orthograd", {"num_per_sample": 8}),
    ("pcgrad", {"granularity": "task"}),
    ("pcgrad", {}),
])
def test_a_weight_equals_the_same_factor_in_the_tasks_loss(method: str,
                                                          settings: dict[str, object]) -> None:
    base = {"steps": 4, "grad_clip": None, **settings}
    weighted = get_unlearner(method, {**base, "retain_task_weights": {"b": WEIGHT}}
                             ).unlearn(_problem(None)).model.state_dict()
    in_the_loss = get_unlearner(method, base).unlearn(_problem(WEIGHT)).model.state_dict()
    plain = get_unlearner(method, base).unlearn(_problem(None)).model.state_dict()
    for name, value in weighted.items():
        torch.testing.assert_close(value, in_the_loss[name], rtol=1e-9, atol=1e-11, msg=name)
    assert any(not torch.allclose(value, plain[name]) for name, value in weighted.items())


@pytest.mark.parametrize("method", ["interference_aware", "neggrad_plus", "orthograd"])
def test_weights_of_one_change_nothing(method: str) -> None:
    base = {"steps": 3}
    ones = get_unlearner(method, {**base, "retain_task_weights": {"a": 1.0, "b": 1}}
                         ).unlearn(_problem(None)).model.state_dict()
    plain = get_unlearner(method, base).unlearn(_problem(None)).model.state_dict()
    assert all(torch.equal(value, plain[name]) for name, value in ones.items())


@pytest.mark.parametrize("weights, message", [
    ({"b": -1.0}, r"`retain_task_weights\['b'\]` must be a finite number >= 0, got -1.0"),
    ({"b": float("nan")}, r"`retain_task_weights\['b'\]` must be a finite number >= 0"),
    ({"b": True}, r"`retain_task_weights\['b'\]` must be a finite number >= 0, got True"),
    ({"b": "2"}, r"`retain_task_weights\['b'\]` must be a finite number >= 0, got '2'"),
    ({"": 1.0}, r"the keys of `retain_task_weights` must be task names, got ''"),
    ([("b", 1.0)], r"`retain_task_weights` must be a mapping or None, got \[\('b', 1.0\)\]"),
])
def test_bad_weights_are_named(weights: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_unlearner("interference_aware", {"retain_task_weights": weights})


def test_an_unknown_task_is_refused_before_any_work() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    y = {"a": torch.randint(0, 3, (30,), generator=g), "b": torch.randn(30, 2, generator=g)}
    with pytest.raises(ValueError, match=r"`retain_task_weights` names \['bb'\], which are not "
                                         r"tasks of the problem; its tasks: \['a', 'b'\]"):
        mtunlearn_ext.unlearn(_TwoHeads(), tasks={"a": "classification", "b": "regression"},
                              train_data=(x, y), forget_request=ForgetRequest.create(range(3)),
                              shared_parameters=lambda n: n.startswith("trunk."),
                              config={"steps": 1, "retain_task_weights": {"bb": 2.0}})
