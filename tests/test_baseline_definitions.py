"""Each baseline's update rule against its paper's definition: one step computed by hand.

A float64 model with a shared trunk and two heads ("a": two classes, so that SalUn's and random
labels' "random other class" is the one other class and their step is deterministic; "b": a
regression) takes one plain SGD step (no momentum, no clipping, every forget and retain pair in
its batch) on a full request and on a partial one (only "a" of the forget instances removed).
Each test writes the paper's objective out in plain torch from the raw data, not from the
problem's forget / retain split, and checks the method's weights against
``theta - lr * direction``; in the partial request that also checks that the non-target head
"b" is never pushed to forget (it gets retain descent or nothing). SCRUB's step is checked the
same way in test_scrub.py, the per-sample gradients and PCGrad's operator in
test_unlearning_baselines.py and test_surgery_aggregators.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
from mtunlearn_ext.ops._reference import pcgrad_order
from mtunlearn_ext.unlearning import UnlearningProblem, get_unlearner
from mtunlearn_ext.unlearning.baselines.salun import saliency_threshold

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [TaskSpec("a", "classification", num_classes=2), TaskSpec("b", "regression")]
N = 12
FORGET_ROWS = [0, 1, 2, 3]
LR = 0.1
#: One plain gradient step over the whole forget and retain sets.
ONE_STEP: dict[str, object] = {"steps": 1, "lr": LR, "optimizer": "sgd", "momentum": 0.0,
                               "grad_clip": None, "forget_batch_size": N,
                               "retain_batch_size": N}
Losses = dict[str, torch.Tensor]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(5, 2), "b": nn.Linear(5, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _raw_data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    return x, {"a": torch.randint(0, 2, (N,), generator=g),
               "b": torch.randn(N, 1, generator=g, dtype=torch.float64)}


def _problem(targets: list[str] | None) -> UnlearningProblem:
    x, y = _raw_data()
    return build_problem(_Net().double(), tasks=SPECS,
                         train_data=MultiTaskDataset(x, y, SPECS),
                         forget_request=ForgetRequest.create(FORGET_ROWS, targets),
                         shared_parameters=lambda n: n.startswith("trunk"))


def _per_row_losses(model: nn.Module, labels_a: torch.Tensor | None = None) -> Losses:
    """Task -> ``[N]`` per-row losses: cross-entropy for "a" (against ``labels_a`` when
    given), squared error averaged over the outputs for "b"."""
    x, y = _raw_data()
    out = model(x)
    a = y["a"] if labels_a is None else labels_a
    return {"a": -F.log_softmax(out["a"], 1).gather(1, a[:, None])[:, 0],
            "b": ((out["b"] - y["b"]) ** 2).mean(1)}


def _forget_loss(losses: Losses, targets: list[str]) -> torch.Tensor:
    """``L_f = sum_{t in S} mean_{i in F} l_t(i)``: the forget pairs are ``F x S``."""
    return sum((losses[t][FORGET_ROWS].mean() for t in targets),
               torch.zeros((), dtype=torch.float64))


def _retain_rows(task: str, targets: list[str]) -> list[int]:
    """The rows of ``task`` that stay supervised: all but the forget rows of a target task."""
    return [i for i in range(N) if task not in targets or i not in FORGET_ROWS]


def _retain_loss(losses: Losses, targets: list[str]) -> torch.Tensor:
    """``L_r = sum_t mean over t's retain pairs``; a forget instance's non-target tasks stay."""
    return sum((losses[t][_retain_rows(t, targets)].mean() for t in ("a", "b")),
               torch.zeros((), dtype=torch.float64))


def _grads(value: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    # A head no term reaches gets a zero gradient (the non-target head of a forget term).
    return list(torch.autograd.grad(value, list(model.parameters()), retain_graph=True,
                                     materialize_grads=True))


def _check_step(method: str, settings: dict[str, object], targets: list[str] | None,
                direction: Callable[[nn.Module, list[str]], list[torch.Tensor]]) -> None:
    """The method's one step equals ``theta - LR * direction(theta)``, ``theta`` the original
    weights (``direction`` gets a copy of the problem's model and the target tasks)."""
    problem = _problem(targets)
    hand = copy.deepcopy(problem.model)
    want = [p.detach() - LR * d for p, d in
            zip(hand.parameters(), direction(hand, list(problem.target_tasks)), strict=True)]
    result = get_unlearner(method, {**ONE_STEP, **settings}).unlearn(problem, validated=True)
    got = [p.detach() for p in result.model.parameters()]
    for (name, _), g, w in zip(hand.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _unflat(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    parts, start = [], 0
    for t in like:
        parts.append(vector[start:start + t.numel()].view_as(t))
        start += t.numel()
    return parts


def _head_b_rows(model: nn.Module) -> list[int]:
    """Positions of head "b"'s tensors in ``model.parameters()``."""
    return [i for i, (name, _) in enumerate(model.named_parameters()) if ".b." in f".{name}."]


REQUESTS = pytest.mark.parametrize("targets", [None, ["a"]], ids=["full", "partial"])


@REQUESTS
def test_finetune_descends_the_retain_loss_alone(targets: list[str] | None) -> None:
    _check_step("finetune", {}, targets,
                lambda m, s: _grads(_retain_loss(_per_row_losses(m), s), m))


@REQUESTS
def test_gradient_ascent_ascends_the_forget_pairs_alone(targets: list[str] | None) -> None:
    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        grads = [-g for g in _grads(_forget_loss(_per_row_losses(model), s), model)]
        if s == ["a"]:  # the non-target head is not pushed at all
            assert all(float(grads[i].abs().max()) == 0 for i in _head_b_rows(model))
        return grads

    _check_step("gradient_ascent", {}, targets, direction)


@REQUESTS
def test_neggrad_plus_is_the_weighted_sum_of_retain_descent_and_forget_ascent(
        targets: list[str] | None) -> None:
    # Kurmanji et al.: beta L_r - (1 - beta) L_f; here both weights are free.
    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        losses = _per_row_losses(model)
        return _grads(0.7 * _retain_loss(losses, s) - 0.3 * _forget_loss(losses, s), model)

    _check_step("neggrad_plus", {"forget_weight": 0.3, "retain_weight": 0.7}, targets,
                direction)


def _other_class_loss(model: nn.Module, s: list[str]) -> torch.Tensor:
    """The forget loss against the other class (two classes: the one random other class)."""
    _, y = _raw_data()
    return _forget_loss(_per_row_losses(model, labels_a=1 - y["a"]), s)


def test_random_labels_fits_the_forget_pairs_to_another_class_beside_retain_descent() -> None:
    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        return _grads(0.6 * _other_class_loss(model, s)
                      + 0.9 * _retain_loss(_per_row_losses(model), s), model)

    _check_step("random_labels", {"forget_weight": 0.6, "retain_weight": 0.9}, ["a"], direction)


def test_salun_masks_the_random_labels_step_to_the_most_salient_weights() -> None:
    fraction = 0.4

    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        # Fan et al.: m = 1[|grad_theta l_f(theta_o; D_f)| >= gamma], one threshold over every
        # weight, computed once at the original weights; the update is random labels on D_f
        # plus descent on D_r, multiplied by m.
        saliency = _flat(_grads(_forget_loss(_per_row_losses(model), s), model)).abs()
        keep = round(fraction * saliency.numel())
        gamma = saliency.sort(descending=True).values[keep - 1]
        mask = (saliency >= gamma) & (saliency > 0)
        assert 0 < int(mask.sum()) <= keep
        step = _grads(_other_class_loss(model, s) + _retain_loss(_per_row_losses(model), s),
                      model)
        masked = _unflat(_flat(step) * mask, step)
        # Head "b" has no forget gradient: never salient, so never moved.
        assert all(float(masked[i].abs().max()) == 0 for i in _head_b_rows(model))
        return masked

    _check_step("salun", {"saliency_fraction": fraction}, ["a"], direction)


def _pcgrad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Yu et al.'s PCGrad, written sequentially: each row, against every other row in its
    order, loses its component along that other (original) row where they conflict; the
    projected rows are summed."""
    total = torch.zeros_like(rows[0])
    for i, row in enumerate(rows):
        v = row.clone()
        for j in pcgrad_order(len(rows), i, 0):  # the order of seed 0, step 0
            dot = v @ rows[j]
            if dot < 0:
                v = v - dot / (rows[j] @ rows[j]) * rows[j]
        total = total + v
    return total


@REQUESTS
def test_pcgrad_projects_the_conflicting_forget_and_retain_gradients(
        targets: list[str] | None) -> None:
    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        losses = _per_row_losses(model)
        forget = _flat(_grads(-0.8 * _forget_loss(losses, s), model))
        retain = _flat(_grads(1.2 * _retain_loss(losses, s), model))
        assert forget @ retain < 0  # the case PCGrad changes
        return _unflat(_pcgrad([forget, retain]), list(model.parameters()))

    _check_step("pcgrad", {"forget_weight": 0.8, "retain_weight": 1.2}, targets, direction)


def test_pcgrad_per_task_rows_are_each_tasks_own_forget_and_retain_gradients() -> None:
    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        losses = _per_row_losses(model)
        rows = [_flat(_grads(-losses["a"][FORGET_ROWS].mean(), model))]
        rows += [_flat(_grads(losses[t][_retain_rows(t, s)].mean(), model)) for t in ("a", "b")]
        return _unflat(_pcgrad(rows), list(model.parameters()))

    _check_step("pcgrad", {"granularity": "task"}, ["a"], direction)


@REQUESTS
def test_orthograd_removes_the_span_of_the_per_sample_retain_gradients(
        targets: list[str] | None) -> None:
    def direction(model: nn.Module, s: list[str]) -> list[torch.Tensor]:
        # The paper's orthonormal basis (QR) of the per-sample retain gradients, each the
        # gradient of one instance's loss summed over its retained tasks.
        losses = _per_row_losses(model)
        per_sample = torch.stack([
            _flat(_grads(sum((losses[t][i] for t in ("a", "b")
                              if i in _retain_rows(t, s)), torch.zeros((), dtype=torch.float64)),
                         model))
            for i in range(N) if any(i in _retain_rows(t, s) for t in ("a", "b"))])
        basis, _ = torch.linalg.qr(per_sample.T)
        forget = _flat(_grads(-_forget_loss(losses, s), model))
        projected = forget - basis @ (basis.T @ forget)
        assert float(projected.norm()) > 1e-3 * float(forget.norm())
        retain = _flat(_grads(_retain_loss(losses, s), model))
        return _unflat(1.5 * projected + 0.5 * retain, list(model.parameters()))

    _check_step("orthograd", {"forget_weight": 1.5, "retain_weight": 0.5, "ridge": 0.0,
                              "num_per_sample": N}, targets, direction)


def test_the_saliency_threshold_is_the_keep_th_largest_magnitude_in_its_own_type() -> None:
    # Values float32 cannot hold: a threshold rounded to float32 dropped the entry it came from.
    magnitudes = [torch.tensor([0.1, 0.7, 0.3], dtype=torch.float64),
                  torch.tensor([0.9, 0.5], dtype=torch.float64)]
    for fraction, want in ((0.2, 0.9), (0.4, 0.7), (0.6, 0.5), (1.0, 0.1)):
        gamma = saliency_threshold(magnitudes, fraction)
        assert gamma.dtype == torch.float64 and float(gamma) == want
    half = saliency_threshold([torch.tensor([0.1, 0.7, 0.3], dtype=torch.float16)], 0.34)
    assert half.dtype == torch.float32 and float(half) == float(torch.tensor(0.7).half())
