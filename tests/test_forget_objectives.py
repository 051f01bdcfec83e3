"""The forgetting objectives per head type (:mod:`mtunlearn_ext.unlearning.objectives`) against
float64 hand computations, in half precision, at extreme scales, and in partial requests."""

from __future__ import annotations

import math

import pytest
import torch

from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.unlearning import forget_terms
from mtunlearn_ext.unlearning.objectives import (
    FORGET_OBJECTIVES,
    CappedAscentObjective,
    ForgetObjective,
    depth_weighted_abs_error,
)

_HALF = [torch.float16, torch.bfloat16]


def _prepared(name: str, spec: TaskSpec, retain_targets: torch.Tensor) -> ForgetObjective:
    retain = MultiTaskDataset(torch.zeros(retain_targets.shape[0], 1),
                              {spec.name: retain_targets}, [spec])
    objective = FORGET_OBJECTIVES[name](spec)
    objective.prepare(retain, torch.Generator().manual_seed(0), "cpu")
    return objective


def _value_and_grad(objective: ForgetObjective, pred: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    pred = pred.detach().clone().requires_grad_(True)
    value = objective.per_sample(pred, target)
    (grad,) = torch.autograd.grad(value.sum(), pred)
    return value.detach(), grad


@pytest.mark.parametrize("dtype", _HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_mean_target_is_finite_in_half_precision(kind: str, dtype: torch.dtype) -> None:
    """Review: with a class absent from the retain labels, ``mean_target`` gave NaN for every
    fp16 sample (its ``log(max(pi, 1e-12))``: 1e-12 is 0 in fp16, and ``0 * log 0`` is NaN).
    It now matches the float64 value to the precision's rounding."""
    gen = torch.Generator().manual_seed(0)
    if kind == "classification":
        spec = TaskSpec("t", kind, num_classes=5)
        retain = torch.randint(0, 4, (40,), generator=gen)  # class 4 never seen
        pred = torch.randn(3, 5, generator=gen) * 3
        target = torch.tensor([0, 4, 2])
    else:
        spec = TaskSpec("t", kind, num_classes=5, ignore_index=255)
        retain = torch.randint(0, 4, (40, 4, 4), generator=gen)
        pred = torch.randn(3, 5, 4, 4, generator=gen) * 3
        target = torch.randint(0, 5, (3, 4, 4), generator=gen)
    objective = _prepared("mean_target", spec, retain)
    exact = objective.per_sample(pred.double(), target)
    value, grad = _value_and_grad(objective, pred.to(dtype), target)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value.double(), exact, rtol=2e-2, atol=2e-2)


def test_half_precision_dense_means_do_not_overflow() -> None:
    """Review: the per-sample sum over a map's pixels was taken in the map's type, so an fp16
    segmentation loss over 256 x 256 pixels at a mean cross-entropy of 5 was inf (the sum,
    3e5, is past fp16's 65504), and so were ``uniform`` and ``ascent`` with it. The sum is now
    float32 and the mean, an fp16 number, is returned in fp16."""
    spec = TaskSpec("seg", "segmentation", num_classes=8, ignore_index=255)
    logits = torch.zeros(2, 8, 256, 256)
    logits[:, 0] = 5.0  # every pixel's label is another class: CE 5.1, KL(U || p) 2.4
    labels = torch.ones(2, 256, 256, dtype=torch.long)
    exact = task_loss(spec, logits.double(), labels)
    half = task_loss(spec, logits.half(), labels)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), exact, rtol=5e-3, atol=0)
    uniform = FORGET_OBJECTIVES["uniform"](spec)
    value, grad = _value_and_grad(uniform, logits.half(), labels)
    torch.testing.assert_close(value.double(), uniform.per_sample(logits.double(), labels),
                               rtol=5e-3, atol=0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", _HALF, ids=["fp16", "bf16"])
def test_depth_weighted_error_of_far_depths_in_half_precision(dtype: torch.dtype) -> None:
    """Review: at depths of 1e4 with errors of 1e3, fp16's products ``d_p e_p`` (1e7) and sums
    overflowed: NaN (inf / inf) for every sample. Computed in float32, cast back."""
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 1, 8, 8, generator=gen) + 0.5) * 1e4
    pred = target + 1e3 * torch.randn(2, 1, 8, 8, generator=gen)
    exact = depth_weighted_abs_error(pred.double(), target.double())
    got = depth_weighted_abs_error(pred.to(dtype), target)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=0)


def test_a_cap_beyond_fp16_range_bounds_an_fp16_loss() -> None:
    """Review: a regression task with targets of scale 1e4 has a cap near 1e8, and
    ``loss.clamp(max=cap)`` raised 'value cannot be converted to type c10::Half' for an fp16
    prediction. The cap now saturates at the type's largest value: a finite loss is ascended
    as in float32, an overflowed one (inf) is past the cap, with zero gradient."""
    spec = TaskSpec("size", "regression")
    objective = CappedAscentObjective(spec)
    objective.cap = 1e8
    target = torch.tensor([[100.0, 0.0], [1e4, 0.0]])
    pred = torch.tensor([[110.0, 0.0], [1.2e4, 0.0]])  # squared errors 100 and 4e6
    value, grad = _value_and_grad(objective, pred.half(), target)
    assert float(value[0]) == -50.0 and float(grad[0, 0]) == -10.0
    assert float(value[1]) == -torch.finfo(torch.float16).max and float(grad[1].abs().sum()) == 0
    objective.set_pair_caps(torch.tensor([7]), torch.tensor([1e9]))
    pred = pred.detach().half().requires_grad_(True)
    per_pair = objective.per_pair(pred, target, torch.tensor([7, 8]))
    assert torch.isfinite(per_pair).all()
