"""Behaviour a mutation review found unpinned: each test here fails on a one-line change of the
code that the rest of the suite let pass (a review making 112 such changes; 24 survived, 10 of
them with no observable effect). The expected values are worked out by hand."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from mtunlearn_ext._io import placements, remove_if_placed, write_text_new
from mtunlearn_ext.data.base import TaskSpec
from mtunlearn_ext.metrics.scores import uis_terms
from mtunlearn_ext.metrics.task_metrics import make_accumulator
from mtunlearn_ext.surgery import MGDA, GradientSurgery, SumWeighting, min_norm_simplex
from mtunlearn_ext.surgery.hook import _poison_if_not_finite
from mtunlearn_ext.surgery.min_norm import _gram_roundoff, _kkt_optimal
from mtunlearn_ext.unlearning.objectives import objective_names


def _scores(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    accumulator = make_accumulator(spec)
    accumulator.update(pred, target)
    return accumulator.compute()


def test_regression_errors_average_over_every_output_entry() -> None:
    """Counted by rows, mse and mae of a 3-output target were 3x too large (every other test
    used one output)."""
    scores = _scores(TaskSpec("r", "regression"), torch.tensor([[1.0, 2.0, 3.0]]),
                     torch.zeros(1, 3))
    assert scores == {"mse": pytest.approx(14 / 3), "mae": pytest.approx(2.0)}


def test_a_perfect_normal_has_angle_zero_not_nan() -> None:
    """Without the clamp before arccos, a float32 unit normal's cosine with itself rounds above
    1 and its angle is NaN, making the mean and the median NaN."""
    normal = torch.tensor([0.6, 0.8, 0.0]).reshape(1, 3, 1, 1)
    scores = _scores(TaskSpec("n", "normals"), normal, normal.clone())
    assert scores["mean_angle"] == pytest.approx(0.0, abs=1e-5)
    assert scores["median_angle"] == pytest.approx(0.005)  # the centre of the first bin


def test_the_median_angle_is_its_bins_centre() -> None:
    """The median is read from 0.01-degree bins at their centre (0.005 off at most); the test
    of it put angles on bin edges, where the centre and the lower edge look alike."""
    theta = math.radians(20.009)
    pred = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=torch.float64)
    pred = pred.reshape(1, 3, 1, 1).expand(5, 3, 1, 1).contiguous()
    target = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    scores = _scores(TaskSpec("n", "normals"), pred, target.expand(5, 3, 1, 1).contiguous())
    assert scores["median_angle"] == pytest.approx(20.005, abs=1e-9)


def test_a_zero_binary_logit_predicts_the_negative_class() -> None:
    """Probability 1/2 is not a positive prediction (``z > 0``, not ``z >= 0``)."""
    scores = _scores(TaskSpec("b", "binary"), torch.zeros(2, 1), torch.zeros(2, 1))
    assert scores["accuracy"] == 1.0


def test_a_task_names_objective_wins_over_its_kinds() -> None:
    """The docs: in ``forget_objective`` a task's name wins over its kind."""
    specs = [TaskSpec("seg", "segmentation", num_classes=3), TaskSpec("other", "segmentation",
                                                                      num_classes=3)]
    names = objective_names(specs, ["seg", "other"], {"segmentation": "mean_target",
                                                      "seg": "uniform"})
    assert names == {"seg": "uniform", "other": "mean_target"}


def test_a_metric_direction_given_overrides_the_known_one() -> None:
    """``higher_is_better`` overrides the built-in direction of a known metric: with accuracy
    taken as an error, a forget score above the original is a disadvantage."""
    original, test, forget = {"a": {"accuracy": 0.8}}, {"a": {"accuracy": 0.8}}, {
        "a": {"accuracy": 0.9}}
    default = uis_terms(original, test, forget)["a"]["accuracy"]["forget_advantage"]
    flipped = uis_terms(original, test, forget, higher_is_better={"accuracy": False})
    assert default == pytest.approx(12.5)
    assert flipped["a"]["accuracy"]["forget_advantage"] == pytest.approx(-12.5)


def test_mgda_keeps_its_iterations() -> None:
    aggregator = MGDA(iterations=7)
    assert aggregator.weighting.iterations == 7  # type: ignore[attr-defined]
    assert repr(aggregator) == "MGDA(iterations=7)"


def test_mgda_reads_an_asymmetric_gram_as_its_symmetric_part() -> None:
    """``a^T G a`` only sees ``(G + G^T) / 2``: for [[1, .2], [.2, 2]] the minimiser is
    ``a_1 = (2 - .2) / (1 + 2 - .4) = 9/13``, whatever antisymmetric part is added."""
    symmetric = torch.tensor([[1.0, 0.2], [0.2, 2.0]], dtype=torch.float64)
    skew = torch.tensor([[0.0, 0.5], [-0.5, 0.0]], dtype=torch.float64)
    for gram in (symmetric, symmetric + skew):
        torch.testing.assert_close(min_norm_simplex(gram),
                                   torch.tensor([9 / 13, 4 / 13], dtype=torch.float64))


def test_the_float32_optimality_test_allows_rounding_not_a_visible_error() -> None:
    """A float32 Gram's answers are held to ten units of float32 rounding: weights 1e-4 off
    the optimum ([.5, .5] for this Gram) are refused, the optimum itself passes."""
    gram = torch.tensor([[1.0, 0.2], [0.2, 1.0]], dtype=torch.float64)
    roundoff = _gram_roundoff(torch.float32)
    off = torch.tensor([0.5001, 0.4999], dtype=torch.float64)
    assert not bool(_kkt_optimal(gram, off, 1e-12, roundoff))
    assert bool(_kkt_optimal(gram, torch.tensor([0.5, 0.5], dtype=torch.float64), 1e-12,
                             roundoff))


def test_a_rollback_leaves_a_file_another_run_put_at_its_path(tmp_path: Path) -> None:
    path, other = tmp_path / "out.json", tmp_path / "theirs.json"
    placed: dict[str, tuple[int, int]] = {}
    with placements(placed):
        write_text_new(path, "mine")
    other.write_text("theirs")
    os.replace(other, path)
    remove_if_placed(path, placed)
    assert path.read_text() == "theirs"
    with placements(placed):
        write_text_new(tmp_path / "own.json", "mine")
    remove_if_placed(tmp_path / "own.json", placed)
    assert not (tmp_path / "own.json").exists()


def test_the_uis_floors_forget_change_is_the_mean_over_its_draws() -> None:
    """The model is left untouched, so each draw's UIS is half its forget-set change, averaged
    over the metrics: the mean of the draws' UIS is half the mean ``forget_change`` (taken as
    the largest draw's, it was not)."""
    import mtunlearn_ext
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": self.net(x)}

    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(60, 4, generator=gen), {"a": torch.randint(0, 3, (60,), generator=gen)})
            for _ in range(2)]
    floor = mtunlearn_ext.uis_floor(Heads(), data[0], data[1], 5,
                                    tasks={"a": "classification"}, draws=30)
    changes = list(floor.forget_change["a"].values())
    assert floor.draws.std() > 0 and len(changes) >= 1
    assert floor.mean == pytest.approx(sum(changes) / len(changes) / 2, rel=1e-9)


def test_a_cpu_constant_loss_is_read_on_the_host_on_the_cpu_too() -> None:
    """A constant loss (a task without labels in the batch) on the CPU was read on the host
    only beside rows on a GPU, so no CPU test ran that branch: it is taken by the constant's
    device now. Read there, an infinite constant poisons its row as a NaN one does (not only
    NaN), and a finite one adds nothing: not even ``0 * c``, which turned a -0.0 entry +0.0."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    GradientSurgery([w], SumWeighting()).backward([(w * w).sum(), torch.tensor(math.inf)])
    assert w.grad is not None and bool(w.grad.isnan().all())
    rows = [torch.tensor([-0.0, 3.0]), torch.tensor([[-0.0]])]
    _poison_if_not_finite(rows, torch.tensor(2.0))
    assert [r.tolist() for r in rows] == [[0.0, 3.0], [[0.0]]]
    assert bool(torch.signbit(rows[0][0])) and bool(torch.signbit(rows[1][0, 0]))
    for bad in (math.nan, -math.inf):
        poisoned = [torch.zeros(2), torch.ones(1, 1)]
        _poison_if_not_finite(poisoned, torch.tensor(bad, dtype=torch.float64))
        assert all(bool(r.isnan().all()) for r in poisoned)
