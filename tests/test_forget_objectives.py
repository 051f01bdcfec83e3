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


def test_class_objectives_against_float64_hand_computations() -> None:
    """``capped_ascent`` ``-min(CE, log C)``, ``uniform`` ``-log C - mean_c log p_c`` and
    ``mean_target`` ``sum_c pi_c log(pi_c / p_c)`` (a class absent from the retain labels adds
    nothing), written out per sample in float64."""
    spec = TaskSpec("kind", "classification", num_classes=4)
    retain_labels = torch.tensor([0, 0, 1, 2, 0, 1])  # class 3 never seen: pi_3 = 0
    prior = [3 / 6, 2 / 6, 1 / 6, 0.0]
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 4.0, 1.0, 2.0]],
                          dtype=torch.float64)
    labels = torch.tensor([0, 3, 2])
    for row, (z, y) in enumerate(zip(logits.tolist(), labels.tolist())):
        log_norm = math.log(sum(math.exp(v) for v in z))
        log_p = [v - log_norm for v in z]
        expected = {
            "capped_ascent": -min(-log_p[y], math.log(4)),
            "uniform": -math.log(4) - sum(log_p) / 4,
            "mean_target": sum(pi * (math.log(pi) - lp) for pi, lp in zip(prior, log_p) if pi),
        }
        for name, value in expected.items():
            got = _prepared(name, spec, retain_labels).per_sample(logits, labels)[row]
            assert abs(float(got) - value) < 1e-6, (name, row)


def test_dense_objectives_against_float64_hand_computations() -> None:
    """Per labelled pixel, then averaged: segmentation ``uniform`` and ``mean_target`` (per-pixel
    retain frequencies), depth ``capped_ascent`` (mean L1, cap = the retain mean's mean L1 on
    the retain set) and normals ``mean_target``; a sample with no labelled pixel scores 0."""
    gen = torch.Generator().manual_seed(1)
    seg = TaskSpec("seg", "segmentation", num_classes=3, ignore_index=255)
    retain_seg = torch.randint(0, 3, (7, 2, 3), generator=gen)
    logits = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 2, 3), generator=gen)
    labels[0, 0] = 255
    labels[1] = 255  # nothing labelled
    uniform = _prepared("uniform", seg, retain_seg).per_sample(logits, labels)
    mean_target = _prepared("mean_target", seg, retain_seg).per_sample(logits, labels)
    log_p = torch.log_softmax(logits, dim=1)
    kl_uniform, kl_prior = [], []
    for h, w in [(1, 0), (1, 1), (1, 2)]:  # sample 0's labelled pixels
        kl_uniform.append(-math.log(3) - sum(float(log_p[0, c, h, w]) for c in range(3)) / 3)
        column = retain_seg[:, h, w].tolist()
        freq = [column.count(c) / len(column) for c in range(3)]
        kl_prior.append(sum(f * (math.log(f) - float(log_p[0, c, h, w]))
                            for c, f in enumerate(freq) if f))
    assert abs(float(uniform[0]) - sum(kl_uniform) / 3) < 1e-9
    assert abs(float(mean_target[0]) - sum(kl_prior) / 3) < 1e-6
    assert float(uniform[1]) == 0.0 and float(mean_target[1]) == 0.0

    depth = TaskSpec("depth", "depth")
    retain_depth = torch.rand(5, 1, 2, 2, generator=gen, dtype=torch.float64) + 0.5
    mean_depth = retain_depth.mean(dim=0)
    cap = float((retain_depth - mean_depth).abs().mean())
    capped = _prepared("capped_ascent", depth, retain_depth)
    assert abs(capped.cap - cap) < 1e-6  # type: ignore[attr-defined]
    target = retain_depth[:2].clone()
    target[0, 0, 0, 0] = 0.0  # unlabelled
    pred = target + torch.tensor([0.1, 10.0], dtype=torch.float64).view(2, 1, 1, 1)
    pred[0, 0, 0, 0] = 1e6  # ignored at an unlabelled pixel
    got = capped.per_sample(pred, target)
    assert abs(float(got[0]) + 0.1) < 1e-9 and abs(float(got[1]) + cap) < 1e-6

    normals = TaskSpec("normals", "normals")
    retain_normals = torch.nn.functional.normalize(
        torch.randn(6, 3, 1, 2, generator=gen, dtype=torch.float64), dim=1)
    reference = torch.nn.functional.normalize(retain_normals.mean(dim=0), dim=0)
    pred = torch.randn(1, 3, 1, 2, generator=gen, dtype=torch.float64)
    expected = sum(1 - float((pred[0, :, 0, w] / pred[0, :, 0, w].norm()) @ reference[:, 0, w])
                   for w in range(2)) / 2
    got = _prepared("mean_target", normals, retain_normals).per_sample(pred, retain_normals[:1])
    assert abs(float(got[0]) - expected) < 1e-6


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


def test_capped_and_reference_objectives_stop_pushing_once_reached() -> None:
    """The bound in practice: past its cap a sample's ``capped_ascent`` gradient is exactly
    zero (even at logits of 1e4), and ``uniform`` / ``mean_target`` have zero gradient at
    their reference, so none drives the outputs further."""
    spec = TaskSpec("kind", "classification", num_classes=3)
    capped = _prepared("capped_ascent", spec, torch.tensor([0, 1, 2, 2]))
    wrong = torch.tensor([[1e4, -1e4, 0.0], [0.0, 3.0, 0.0]])  # both misclassify label 2
    value, grad = _value_and_grad(capped, wrong, torch.tensor([1, 2]))
    torch.testing.assert_close(value, torch.full((2,), -math.log(3)))
    assert float(grad.abs().sum()) == 0.0
    _, grad = _value_and_grad(_prepared("uniform", spec, torch.tensor([0])), torch.zeros(1, 3),
                              torch.tensor([0]))
    assert float(grad.abs().max()) < 1e-7
    mean_target = _prepared("mean_target", spec, torch.tensor([0, 1, 2, 2]))
    prior_logits = torch.tensor([[0.25, 0.25, 0.5]]).log()
    _, grad = _value_and_grad(mean_target, prior_logits, torch.tensor([0]))
    assert float(grad.abs().max()) < 1e-7


class _ThreeHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(4, 6)
        self.heads = torch.nn.ModuleDict({"kind": torch.nn.Linear(6, 3),
                                          "size": torch.nn.Linear(6, 2),
                                          "flag": torch.nn.Linear(6, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.trunk(x))
        return {name: head(features) for name, head in self.heads.items()}


@pytest.mark.parametrize("objective", ["capped_ascent", "ascent", "mean_target",
                                       "random_target"])
def test_a_partial_request_moves_only_the_target_heads(objective: str) -> None:
    """The forget terms of a partial request (target task ``size`` only) reach the trunk and
    the ``size`` head; every other head's gradient is exactly zero (none at all)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tasks = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression"),
             TaskSpec("flag", "binary")]
    targets = {"kind": torch.randint(0, 3, (8,), generator=gen),
               "size": torch.randn(8, 2, generator=gen),
               "flag": (torch.rand(8, 1, generator=gen) > 0.5).float()}
    retain = MultiTaskDataset(torch.randn(8, 4, generator=gen), targets, tasks)
    objectives = {"size": _prepared(objective, tasks[1], targets["size"])}
    model = _ThreeHeads()
    supervision = torch.tensor([[False, True, False]] * 4)
    batch = {"supervision": supervision, "id": torch.arange(4),
             "targets": {name: value[:4] for name, value in targets.items()}}
    terms = forget_terms(model(retain.inputs[:4]), batch, tasks, objectives)
    total = terms.total()
    assert total is not None and set(terms.objective) == {"size"}
    total.backward()
    assert model.trunk.weight.grad is not None
    assert float(model.trunk.weight.grad.abs().sum()) > 0
    assert float(model.heads["size"].weight.grad.abs().sum()) > 0  # type: ignore[union-attr]
    for name in ("kind", "flag"):
        for parameter in model.heads[name].parameters():
            assert parameter.grad is None or float(parameter.grad.abs().sum()) == 0.0


def test_half_precision_batch_means_do_not_overflow() -> None:
    """Review: the forget terms and the retain (multi-task) loss summed a batch's per-sample
    values in their own type, so 8 fp16 regression losses of 9e3 each (sum 7.2e4, past 65504)
    gave an inf retain loss and a -inf forget objective (ascent) though their mean is 9e3.
    Summed in float32 now, the means returned in fp16."""
    from mtunlearn_ext.losses import masked_multitask_loss

    spec = TaskSpec("size", "regression")
    target = torch.zeros(8, 1)
    pred = torch.full((8, 1), 95.0, dtype=torch.float16)  # squared error 9025 per sample
    each = float(torch.tensor(9025.0).half())  # 9024 in fp16
    batch = {"supervision": torch.ones(8, 1, dtype=torch.bool), "targets": {"size": target},
             "id": torch.arange(8)}
    _, per_task = masked_multitask_loss({"size": pred}, batch, [spec])
    assert per_task["size"].dtype == torch.float16 and float(per_task["size"]) == each
    terms = forget_terms({"size": pred}, batch, [spec],
                         {"size": FORGET_OBJECTIVES["ascent"](spec)})
    assert float(terms.objective["size"]) == -each and float(terms.loss["size"]) == each


@pytest.mark.parametrize("dtype", _HALF)
def test_half_precision_regression_loss_squares_without_overflow(dtype: torch.dtype) -> None:
    """The regression loss squared each error in the prediction's type: one fp16 error of 300
    among 100 entries squared to inf (past 65504) though the sample's mean squared error, 900,
    is an fp16 number. Squared and averaged in float32 now, returned in the input's type; the
    gradient, 2 e / d, was finite either way."""
    spec = TaskSpec("size", "regression")
    target = torch.zeros(2, 100)
    pred = torch.zeros(2, 100, dtype=dtype)
    pred[0, 7] = 300.0
    pred[1] = 3.0  # 9 per entry: unchanged by the widening
    pred.requires_grad_(True)
    loss = task_loss(spec, pred, target)
    assert loss.dtype == dtype
    assert loss.detach().double().tolist() == [900.0, 9.0]
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    assert float(grad[0, 7]) == 6.0 and float(grad[0].abs().sum()) == 6.0
    assert torch.equal(grad[1].float(), torch.full((100,), 0.06, dtype=dtype).float())
