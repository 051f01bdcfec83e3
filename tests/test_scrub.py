"""The SCRUB baseline: its divergences per task kind against float64 formulas written out here,
its step against the hand-written objective (both phases), and what its settings do."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
from mtunlearn_ext.unlearning import (
    ParameterGroups,
    StepContext,
    get_unlearner,
    make_forget_objectives,
)
from mtunlearn_ext.unlearning.baselines.scrub import SCRUB, SCRUBConfig, prediction_divergence

pytestmark = pytest.mark.usefixtures("one_thread")

TAU = 2.5


def _kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``tau^2 sum_c p_c (log p_c - log q_c)`` per row of ``[B, C]`` logits, written out."""
    p = torch.exp(teacher / TAU) / torch.exp(teacher / TAU).sum(1, keepdim=True)
    q = torch.exp(student / TAU) / torch.exp(student / TAU).sum(1, keepdim=True)
    return TAU ** 2 * (p * (p.log() - q.log())).sum(1)


def _bernoulli_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    p, q = torch.sigmoid(teacher / TAU), torch.sigmoid(student / TAU)
    return TAU ** 2 * (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())


def _double(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def test_the_divergence_of_each_kind_against_its_formula() -> None:
    torch.manual_seed(0)
    spec = TaskSpec("c", "classification", num_classes=4)
    s, t = _double(5, 4), _double(5, 4)
    labels = torch.tensor([0, 1, spec.ignore_index, 3, 2])
    want = torch.where(labels != spec.ignore_index, _kl_rows(t, s), 0.0)
    assert want[2] == 0 and (want != 0).sum() == 4
    torch.testing.assert_close(prediction_divergence(spec, s, t, labels, TAU), want)

    spec = TaskSpec("seg", "segmentation", num_classes=3, ignore_index=-1)
    s, t = _double(2, 3, 4, 5), _double(2, 3, 4, 5)
    labels = torch.randint(-1, 3, (2, 4, 5))
    labels[1] = -1  # no labelled pixel: 0
    per_pixel = _kl_rows(t.permute(0, 2, 3, 1).reshape(-1, 3),
                         s.permute(0, 2, 3, 1).reshape(-1, 3)).reshape(2, 4, 5)
    valid = labels[0] != -1
    want = torch.stack([per_pixel[0][valid].mean(), torch.zeros((), dtype=torch.float64)])
    torch.testing.assert_close(prediction_divergence(spec, s, t, labels, TAU), want)

    spec = TaskSpec("b", "binary")
    s, t = _double(3, 4), _double(3, 4)
    labels = torch.tensor([[1.0, 0.0, -1.0, 0.5], [-1.0] * 4, [0.0, 1.0, 1.0, 0.0]])
    kl = _bernoulli_kl(t, s)
    want = torch.stack([kl[0][[0, 1, 3]].mean(), torch.zeros((), dtype=torch.float64),
                        kl[2].mean()])
    torch.testing.assert_close(prediction_divergence(spec, s, t, labels, TAU), want)

    spec = TaskSpec("r", "regression")
    s, t = _double(4, 3), _double(4, 3)
    torch.testing.assert_close(prediction_divergence(spec, s, t, _double(4, 3), TAU),
                               ((s - t) ** 2).mean(1))

    spec = TaskSpec("d", "depth")
    s, t = _double(2, 1, 3, 3), _double(2, 1, 3, 3)
    depth = torch.rand(2, 1, 3, 3, dtype=torch.float64) + 0.5
    depth[0, 0, 0] = 0.0  # a row of unlabelled pixels
    valid = depth[:, 0] > 0
    want = torch.stack([(s - t).abs()[i, 0][valid[i]].mean() for i in range(2)])
    torch.testing.assert_close(prediction_divergence(spec, s, t, depth, TAU), want)

    spec = TaskSpec("n", "normals")
    s, t = _double(2, 3, 2, 2), _double(2, 3, 2, 2)
    normals = F.normalize(_double(2, 3, 2, 2), dim=1)
    normals[1, :, 0, 0] = 0.0
    cosine = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    valid = normals.abs().sum(1) > 0
    want = torch.stack([(1 - cosine[i])[valid[i]].mean() for i in range(2)])
    torch.testing.assert_close(prediction_divergence(spec, s, t, normals, TAU), want)


def test_the_divergence_is_zero_and_flat_where_the_student_is_the_teacher() -> None:
    spec = TaskSpec("c", "classification", num_classes=3)
    t = _double(4, 3)
    s = t.clone().requires_grad_()
    value = prediction_divergence(spec, s, t, torch.zeros(4, dtype=torch.long), TAU).sum()
    (gradient,) = torch.autograd.grad(value, s)
    assert abs(float(value.detach())) < 1e-12 and float(gradient.abs().max()) < 1e-12


# -- the step -----------------------------------------------------------------------------------

SPECS = [TaskSpec("c", "classification", num_classes=3), TaskSpec("r", "regression"),
         TaskSpec("b", "binary")]
TASKS = {s.name: s for s in SPECS}


class _Model(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), *(
            (nn.BatchNorm1d(16), nn.Dropout(0.3)) if norm else ()))
        self.heads = nn.ModuleDict({"c": nn.Linear(16, 3), "r": nn.Linear(16, 2),
                                    "b": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _data(n: int = 40) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(n, 1, generator=g) < 0.4).double()
    binary[::5] = -1.0  # unlabelled entries
    return MultiTaskDataset(torch.randn(n, 6, generator=g, dtype=torch.float64),
                            {"c": torch.randint(0, 3, (n,), generator=g),
                             "r": torch.randn(n, 2, generator=g, dtype=torch.float64),
                             "b": binary}, SPECS)


def _hand_objective(student: nn.Module, teacher: nn.Module, forget: dict[str, object],
                    retain: dict[str, object], targets: list[str], cfg: SCRUBConfig,
                    with_forget: bool) -> torch.Tensor:
    """SCRUB's objective written out: ``-w_f sum_{t in S} D^f_t + w_r sum_t w_t (L^r_t +
    alpha D^r_t)``, each term a mean over the batch's supervised pairs of the task."""

    def divergence(name: str, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name == "c":
            return _kl_rows(t, s)
        if name == "r":
            return ((s - t) ** 2).mean(1)
        kl = _bernoulli_kl(t, s)
        labelled = y != -1
        return torch.where(labelled, kl, 0.0).sum(1) / labelled.sum(1).clamp(min=1)

    def loss(name: str, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name == "c":
            # an unsupervised pair's neutral label (-1) is dropped by the mean over pairs
            return -torch.log_softmax(s, 1).gather(1, y.long().clamp(min=0).unsqueeze(1))[:, 0]
        if name == "r":
            return ((s - y) ** 2).mean(1)
        labelled = y != -1
        p = torch.sigmoid(s)
        bce = -(y * p.log() + (1 - y) * (1 - p).log())
        return torch.where(labelled, bce, 0.0).sum(1) / labelled.sum(1).clamp(min=1)

    def mean_over_pairs(values: torch.Tensor, batch: dict[str, object], name: str
                        ) -> torch.Tensor:
        rows = batch["supervision"][:, list(TASKS).index(name)]  # type: ignore[index]
        return values[rows].mean()

    total = torch.zeros((), dtype=torch.float64)
    if with_forget:
        s_out, t_out = student(forget["input"]), teacher(forget["input"])
        for name in targets:
            y = forget["targets"][name]  # type: ignore[index]
            total = total - cfg.forget_weight * mean_over_pairs(
                divergence(name, s_out[name], t_out[name], y), forget, name)
    s_out, t_out = student(retain["input"]), teacher(retain["input"])
    for name in TASKS:
        y = retain["targets"][name]  # type: ignore[index]
        weight = (cfg.retain_task_weights or {}).get(name, 1.0)
        total = total + cfg.retain_weight * weight * (
            mean_over_pairs(loss(name, s_out[name], y), retain, name)
            + cfg.distill_weight * mean_over_pairs(divergence(name, s_out[name], t_out[name], y),
                                                   retain, name))
    return total


@pytest.mark.parametrize("targets", [None, ["c", "r"]], ids=["full", "partial"])
@pytest.mark.parametrize("with_forget", [True, False], ids=["max phase", "min phase"])
def test_a_step_is_the_gradient_of_scrubs_objective(targets: list[str] | None,
                                                    with_forget: bool) -> None:
    data = _data()
    problem = build_problem(_Model().double(), tasks=SPECS, train_data=data,
                            forget_request=ForgetRequest.create(range(8), targets),
                            shared_parameters=lambda n: n.startswith("trunk"))
    teacher = problem.model
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # away from the teacher, where the forget term has a gradient
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cfg = SCRUBConfig(steps=10, forget_steps=4, distill_weight=0.7, temperature=TAU,
                      forget_weight=1.3, retain_weight=0.9, retain_task_weights={"r": 2.0})
    method = SCRUB(cfg)
    objectives = make_forget_objectives(problem.target_specs(), problem.retain,
                                        torch.Generator(), "cpu", "ascent")
    ctx = StepContext(student, problem, ParameterGroups.from_model(student, problem.task_names),
                      objectives, torch.Generator(), step=2 if with_forget else 4)
    ctx.state["teacher"] = teacher
    forget = problem.forget.batch(torch.arange(len(problem.forget)))
    retain = problem.retain.batch(torch.arange(20))
    stats = method.compute_update(ctx, forget, retain)
    got = [p.grad for p in student.parameters()]
    want = torch.autograd.grad(
        _hand_objective(student, teacher, forget, retain, list(problem.target_tasks), cfg,
                        with_forget), list(student.parameters()))
    for g, w in zip(got, want, strict=True):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # The forget term is measured in both phases (the curves), pushed only in the first.
    assert stats.forget is not None and set(stats.forget.objective) == set(problem.target_tasks)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("train_mode", [False, True])
def test_without_its_forget_phase_and_distillation_it_is_fine_tuning(train_mode: bool) -> None:
    # In training mode (BatchNorm, dropout) the forget batches it only measures must neither
    # enter the running statistics nor draw dropout masks.
    common = {"steps": 6, "lr": 0.05, "optimizer": "sgd", "momentum": 0.0, "grad_clip": None,
              "train_mode": train_mode, "recalibrate_norms": False}
    runs = {}
    for method, extra in (("scrub", {"forget_steps": 0, "distill_weight": 0.0}),
                          ("finetune", {"forget_weight": 0.0}),
                          ("scrub", {"forget_steps": 0, "distill_weight": 1.0}),
                          ("scrub", {"forget_steps": 3, "distill_weight": 0.0})):
        model, _ = mtunlearn_ext.unlearn(
            _Model(norm=train_mode).double(), tasks=SPECS, train_data=_data(),
            forget_request=ForgetRequest.create(range(8)),
            shared_parameters=lambda n: n.startswith("trunk"), method=method,
            config={**common, **extra})
        runs[(method, *extra.values())] = torch.cat([t.detach().flatten().double()
                                                     for t in model.state_dict().values()])
    plain, finetune = runs[("scrub", 0, 0.0)], runs[("finetune", 0.0)]
    torch.testing.assert_close(plain, finetune, rtol=1e-12, atol=1e-13)
    assert (runs[("scrub", 0, 1.0)] - finetune).abs().max() > 1e-6
    assert (runs[("scrub", 3, 0.0)] - finetune).abs().max() > 1e-6


def test_the_forget_phase_is_two_thirds_of_the_steps_unless_given() -> None:
    assert SCRUBConfig(steps=60).max_steps() == 40
    assert SCRUBConfig(steps=10, forget_steps=25).max_steps() == 25
    _, report = mtunlearn_ext.unlearn(
        _Model().double(), tasks=SPECS, train_data=_data(),
        forget_request=ForgetRequest.create(range(8)),
        shared_parameters=lambda n: n.startswith("trunk"), method="scrub",
        config={"steps": 9})
    assert report.extra["forget_steps"] == 6
    # The forget objective's curve is minus the divergence from the teacher throughout: 0 at
    # the start (the student is the teacher), below after.
    objective = report.curves["forget_objective"]
    assert len(objective) == 9 and objective[0] == 0 and all(v < 0 for v in objective[1:])


@pytest.mark.parametrize("settings, message", [
    ({"forget_steps": -1}, "`forget_steps` must be an integer >= 0 or None, got -1"),
    ({"forget_steps": 2.5}, "`forget_steps` must be an integer or None, got 2.5"),
    ({"distill_weight": -0.1}, "`distill_weight` must be a finite number >= 0"),
    ({"distill_weight": math.nan}, "`distill_weight` must be a finite number >= 0"),
    ({"temperature": 0.0}, "`temperature` must be a finite number > 0"),
    ({"forget_objective": "ascent"}, "`forget_objective` does not apply"),
])
def test_bad_settings_are_named(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_unlearner("scrub", settings)
