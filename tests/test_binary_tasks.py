"""The ``binary`` task kind: independent yes/no labels predicted as logits (a click or
conversion head, multi-label attributes), trained with binary cross-entropy. A recommender's
one-logit heads had no kind of their own: as ``regression`` with a custom BCE loss, the metrics
scored logits by squared error, the sampled-target snapshots drew Gaussian noise and the
forget caps were measured at the mean label fed as a logit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest, TaskSpec
from mtunlearn_ext.data import MultiTaskDataset
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.metrics.task_metrics import make_accumulator
from mtunlearn_ext.unlearning.fisher import sampled_target_loss
from mtunlearn_ext.unlearning.objectives import FORGET_OBJECTIVES

pytestmark = pytest.mark.usefixtures("one_thread")

CLICK = TaskSpec("click", "binary")
TAGS = TaskSpec("tags", "binary", ignore_index=-1)


def test_the_loss_is_bce_over_the_labelled_entries() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.25, -1.0, -1.0], [-1.0, -1.0, -1.0],
                           [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    got = task_loss(TAGS, logits, labels)
    for row in range(5):
        keep = labels[row] != -1
        want = (F.binary_cross_entropy_with_logits(logits[row][keep], labels[row][keep])
                if keep.any() else torch.zeros((), dtype=torch.float64))
        torch.testing.assert_close(got[row], want)
    got.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert bool((logits.grad[2] == 0).all())  # a row without a label moves nothing
    # One logit per row: [B] or [B, 1] predictions against [B] labels.
    one = torch.tensor([0.3, -2.0])
    torch.testing.assert_close(task_loss(CLICK, one, torch.tensor([1.0, 0.0])),
                               F.binary_cross_entropy_with_logits(
                                   one, torch.tensor([1.0, 0.0]), reduction="none"))
    with pytest.raises(ValueError, match=r"binary pred \(2, 2\) and target \(2, 3\) differ"):
        task_loss(TAGS, torch.zeros(2, 2), torch.zeros(2, 3))


def test_supervision_values_and_metrics_of_binary_labels() -> None:
    x = torch.randn(4, 2)
    tags = torch.tensor([[1.0, -1.0], [-1.0, -1.0], [0.0, 1.0], [0.5, 0.0]])
    data = MultiTaskDataset(x, {"tags": tags}, [TAGS])
    assert data.supervision[:, 0].tolist() == [True, False, True, True]
    data.check_values()
    for bad in (2.0, float("nan")):
        shown = r"labels outside \[0, 1\] \(or NaN\) other than ignore_index -1"
        broken = tags.clone()
        broken[2, 1] = bad
        with pytest.raises(ValueError, match=rf"task 'tags' \(binary\) has {shown} on 1 "
                                             rf"supervised rows \(first: row 2"):
            MultiTaskDataset(x, {"tags": broken}, [TAGS]).check_values()
    metrics = make_accumulator(TAGS)
    logits = torch.tensor([[2.0, 5.0], [0.0, 0.0], [-1.0, 1.0], [0.5, 0.5]])
    metrics.update(logits[:2], tags[:2])
    metrics.update(logits[2:], tags[2:])
    p = torch.sigmoid(torch.tensor([2.0, -1.0, 1.0, 0.5, 0.5], dtype=torch.float64))
    y = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    scores = metrics.compute()
    assert scores["accuracy"] == pytest.approx(4 / 5)  # 0.5 reads as positive, 0.5 logit > 0
    assert scores["brier"] == pytest.approx(float((p - y).pow(2).mean()))
    assert metrics.count == 5


def test_objectives_and_sampled_targets_of_binary_labels() -> None:
    targets = torch.tensor([[1.0], [0.0], [1.0], [1.0], [-1.0]])
    retain = MultiTaskDataset(torch.randn(5, 2), {"click": targets}, [CLICK])
    g = torch.Generator().manual_seed(0)
    mean = FORGET_OBJECTIVES["mean_target"](CLICK)
    mean.prepare(retain, g, "cpu")
    assert mean.reference is not None and mean.reference.tolist() == [0.75]
    rate_logit = torch.full((2, 1), math.log(3.0))
    torch.testing.assert_close(mean.per_sample(rate_logit, torch.tensor([[1.0], [-1.0]])),
                               torch.tensor([0.5623351, 0.0]))  # H(0.75) at the rate; skipped
    capped = FORGET_OBJECTIVES["capped_ascent"](CLICK)
    capped.prepare(retain, g, "cpu")  # the loss of predicting the rate, over the labels
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert capped.cap == pytest.approx(entropy, rel=1e-5)
    uniform = FORGET_OBJECTIVES["uniform"](CLICK)
    value = uniform.per_sample(torch.tensor([[0.0], [3.0], [3.0]]),
                               torch.tensor([[1.0], [0.0], [-1.0]]))
    assert value[0] == pytest.approx(0.0, abs=1e-7) and value[1] > 0 and value[2] == 0
    drawn = FORGET_OBJECTIVES["random_target"](TAGS)
    drawn.prepare(MultiTaskDataset(torch.randn(3, 2), {"tags": torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}, [TAGS]), g, "cpu")
    random = drawn.random_targets(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    assert random[0, 1] == -1 and bool(((random == 0) | (random == 1))[:, 0].all())
    logits = torch.randn(4, 2, requires_grad=True)
    loss = sampled_target_loss(TAGS, logits, torch.tensor([[1.0, -1.0], [0.0, 1.0],
                                                           [-1.0, -1.0], [1.0, 0.0]]),
                               torch.tensor([True, True, False, True]), g)
    assert loss is not None
    loss.backward()
    assert logits.grad is not None and bool((logits.grad[2] == 0).all())
    assert bool((logits.grad[0, 1] == 0).all()) and bool((logits.grad[1] != 0).all())


class _ClickModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"click": nn.Linear(32, 1), "tags": nn.Linear(32, 2),
                                    "genre": nn.Linear(32, 3)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _click_data(n: int = 120):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    tags = (torch.rand(n, 2, generator=g) < 0.4).float()
    tags[torch.rand(n, 2, generator=g) < 0.3] = -1.0  # entries without a label
    return x, {"click": (x[:, :1] > 0).float(), "tags": tags,
               "genre": torch.randint(0, 3, (n,), generator=g)}


def _trained() -> nn.Module:
    model = _ClickModel()
    x, y = _click_data()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    specs = {"click": CLICK, "tags": TAGS,
             "genre": TaskSpec("genre", "classification", num_classes=3)}
    for _ in range(150):
        out = model(x)
        loss = sum(task_loss(specs[t], out[t], y[t]).mean() for t in specs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("method", ["interference_aware", "orthograd", "neggrad_plus",
                                    "salun", "pcgrad"])
@pytest.mark.parametrize("targets", [None, ["click"]])
def test_unlearn_forgets_binary_labels_and_evaluates_them(method: str,
                                                          targets: list[str] | None) -> None:
    model = _trained()
    x, y = _click_data()
    tasks = {"click": "binary", "tags": TAGS, "genre": "classification"}
    new, report = mtunlearn_ext.unlearn(
        model, tasks=tasks, train_data=(x, y), forget_request=ForgetRequest.create(
            range(12), targets), shared_parameters=lambda n: n.startswith("trunk."),
        method=method, config={"steps": 15, "lr": 2e-2})
    summary = report.extra["summary"]
    assert summary["forget_loss_after"]["click"] > summary["forget_loss_before"]["click"]
    scores = mtunlearn_ext.evaluate(new, (x[12:], {t: v[12:] for t, v in y.items()}),
                                    tasks=tasks)
    assert set(scores["click"]) == {"accuracy", "brier"}
    assert 0 <= scores["tags"]["brier"] <= 1 and scores["click"]["accuracy"] > 0.8
