"""SCRUB: the unlearned model as a student that moves away from the original on the forget
pairs and stays with it on the retain pairs (Kurmanji et al., "Towards Unbounded Machine
Unlearning", 2023).

The original model is kept, frozen, as the teacher ``T``; the student ``S`` starts from it. With
``D_t(S, T)`` a per-pair divergence of task ``t``'s predictions (below), ``L^r_t`` the retain
task loss, ``S`` the target tasks and ``w_t`` the retain task weights, each step descends

    ``- w_f sum_{t in S} D^f_t  +  w_r sum_t w_t (L^r_t + alpha D^r_t)``

where the forget term (SCRUB's "max step") is on for the first ``forget_steps`` steps only and
the retain term (its "min step": the retain loss plus distillation toward the teacher) always.
Each divergence is averaged over the batch's supervised pairs of the task: on the forget side
the forget pairs (``F x S``), on the retain side the retain pairs (in a partial request those
include the forget instances' other tasks, so their target tasks are never pulled back to the
teacher). SCRUB alternates a max epoch and a min epoch for its first epochs; here both terms
share one update per step, with the same split between a first phase that pushes away and a
last one that only repairs. Under SGD the two orders agree to first order in the learning
rate. Measured against the alternation (a max step on the forget batch, then a min step on the
retain batch, each its own Adam step; an experiment outside the library) on ``indoor`` /
``small``, memorising recipe, seed 0, full request, by the tuning score's gap to the retrained
model (untouched model 5.95; lower is better): at the preset's learning rate 3e-4 the joint
step scored 4.57, the alternation 5.37; at 1.5e-4 5.32 / 5.51; at 6e-4 and 1e-3 the joint step
diverged (8.39 / 39.3) where the alternation did not (5.13 / 5.59), but no rate of it reached
the joint step's best. Partial request at its preset 1e-4: 1.85 / 1.90 (untouched 1.93).

Divergences ``D_t(S, T)`` by task kind, per pair:

- classification: ``tau^2 KL(softmax(T / tau) || softmax(S / tau))`` (SCRUB's distillation at
  temperature ``tau``); segmentation: the same per pixel, averaged over the labelled pixels;
  binary: the Bernoulli KL of ``sigmoid(. / tau)`` per labelled entry, times ``tau^2``;
- regression: the squared error between the two predictions; depth: their absolute error and
  normals ``1 - cos`` of the two, averaged over the labelled pixels (the tasks' own losses with
  the teacher's prediction as the target).

The forget term is unbounded (a KL grows without limit): ``forget_steps`` bounds it, as SCRUB's
number of max epochs does. It starts at a zero gradient: at the first step the student *is* the
teacher, where every divergence is at its minimum, so the push away begins only once the retain
term has moved the student (SCRUB's student, in train mode, also differs by its dropout and
batch-norm noise; here the steps run in eval mode unless ``train_mode`` is set). A retain term
already at rest (a model that fits its retain pairs exactly) leaves the student where it is,
forget term included. The teacher runs in eval mode, without gradients; it costs one copy
of the model and one forward per batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._functional import unit_normalize
from mtunlearn_ext.data.base import TaskSpec
from mtunlearn_ext.losses import task_loss, valid_pixel_mask
from mtunlearn_ext.models.copies import copy_model
from mtunlearn_ext.models.modes import eval_mode
from mtunlearn_ext.unlearning.base import UnlearningReport
from mtunlearn_ext.unlearning.batches import Batch
from mtunlearn_ext.unlearning.loop import (
    GradientUnlearner,
    StepConfig,
    StepContext,
    StepOptimizer,
    StepStats,
)
from mtunlearn_ext.unlearning.registry import register_unlearner
from mtunlearn_ext.unlearning.terms import ForgetTerms, forget_terms, retain_terms

__all__ = ["SCRUB", "SCRUBConfig", "prediction_divergence"]


#: The largest temperature whose square is a float32 number.
_LARGEST_TAU = math.sqrt(float(torch.finfo(torch.float32).max))


@dataclass
class SCRUBConfig(StepConfig):
    """``forget_steps``: the first steps that carry the forget (max) term; ``None`` takes two
    thirds of ``steps`` (SCRUB's 2 max epochs of 3). ``distill_weight``: ``alpha``, the weight
    of the retain distillation beside the retain loss (SCRUB's 0.001 against 0.99).
    ``temperature``: ``tau`` of the class divergences (SCRUB's 4; at most 1.8e19, past which
    ``tau^2`` leaves float32). ``forget_weight`` weighs the forget term, ``retain_weight`` the
    retain one. The forget term is SCRUB's divergence: ``forget_objective`` is not used."""

    steps: int = 60
    lr: float = 1e-4
    optimizer: StepOptimizer = "adam"
    forget_steps: int | None = None
    distill_weight: float = 0.001
    temperature: float = 4.0

    def validate(self) -> None:
        super().validate()
        if self.forget_steps is not None and (
                integer_value(self.forget_steps) is None or self.forget_steps < 0):
            raise ValueError(f"SCRUBConfig: `forget_steps` must be an integer >= 0 or None, got "
                             f"{self.forget_steps!r}")
        if not (math.isfinite(self.distill_weight) and self.distill_weight >= 0):
            raise ValueError(f"SCRUBConfig: `distill_weight` must be a finite number >= 0, got "
                             f"{self.distill_weight!r}")
        # The class divergences are scaled by tau^2: past float32's largest that is inf, and
        # inf times the divergence's 0 made every weight NaN.
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= _LARGEST_TAU):
            raise ValueError(f"SCRUBConfig: `temperature` must be a finite number > 0 and at "
                             f"most {_LARGEST_TAU:.4g} (its square, which scales the class "
                             f"divergences, at most float32's largest), got "
                             f"{self.temperature!r}")
        if self.forget_objective is not None:
            raise ValueError("SCRUBConfig: `forget_objective` does not apply (SCRUB's forget "
                             "term is the divergence from the original model); leave it None, "
                             f"got {self.forget_objective!r}")

    def max_steps(self) -> int:
        """The number of steps with the forget term."""
        return (2 * self.steps) // 3 if self.forget_steps is None else self.forget_steps


@contextlib.contextmanager
def _measuring(model: torch.nn.Module) -> Iterator[None]:
    with eval_mode(model), torch.no_grad():
        yield


def _mean_over(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over its ``kept`` entries (``[B, ...]``; 0 where none)."""
    flat = torch.where(kept, values, torch.zeros((), dtype=values.dtype,
                                                 device=values.device)).flatten(1)
    return flat.sum(1) / kept.flatten(1).sum(1).clamp(min=1).to(values.dtype)


def _class_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 KL(softmax(teacher / tau) || softmax(student / tau))`` over dimension 1."""
    log_t = F.log_softmax(teacher / tau, dim=1)
    log_s = F.log_softmax(student / tau, dim=1)
    return tau * tau * (log_t.exp() * (log_t - log_s)).sum(dim=1)


def prediction_divergence(spec: TaskSpec, student: torch.Tensor, teacher: torch.Tensor,
                          target: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``[B]``: how far ``student``'s predictions of task ``spec`` are from ``teacher``'s, per
    row, over the entries ``target`` labels (see the module text for each kind)."""
    teacher = teacher.detach().to(student.dtype)
    tau = temperature
    kind = spec.kind
    if kind == "classification":
        kl = _class_kl(student, teacher, tau)
        return torch.where(target != spec.ignore_index, kl, torch.zeros_like(kl))
    if kind == "segmentation":
        return _mean_over(_class_kl(student, teacher, tau), valid_pixel_mask(spec, target))
    if kind == "binary":
        s = student.reshape(student.shape[0], -1) / tau
        t = teacher.reshape(teacher.shape[0], -1) / tau
        # KL(Bern(sigmoid t) || Bern(sigmoid s)) = BCE(s, sigmoid t) - BCE(t, sigmoid t)
        p = torch.sigmoid(t)
        kl = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
              - F.binary_cross_entropy_with_logits(t, p, reduction="none"))
        labelled = target.reshape(target.shape[0], -1) != spec.ignore_index
        return tau * tau * _mean_over(kl, labelled)
    if kind == "regression":
        return task_loss(TaskSpec(spec.name, "regression"), student, teacher)
    valid = valid_pixel_mask(spec, target.to(student.dtype))
    if kind == "depth":
        return _mean_over((student - teacher).abs()[:, 0], valid)
    if kind == "normals":
        cosine = (unit_normalize(student, dim=1, eps=1e-8)
                  * unit_normalize(teacher, dim=1, eps=1e-8)).sum(dim=1)
        return _mean_over(1.0 - cosine, valid)
    raise ValueError(f"prediction_divergence: unsupported task kind {kind!r}")


def _divergences(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor],
                 batch: Batch, specs: list[TaskSpec], tasks: list[str], tau: float
                 ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Task -> the mean divergence over the batch's supervised pairs of the task, and their
    count (tasks without a pair left out)."""
    supervision = batch["supervision"]
    targets = batch["targets"]
    assert isinstance(supervision, torch.Tensor) and isinstance(targets, Mapping)
    columns = {spec.name: c for c, spec in enumerate(specs)}
    by_name = {spec.name: spec for spec in specs}
    means, counts = {}, {}
    for name in tasks:
        mask = supervision[:, columns[name]]
        n = int(mask.sum())
        if n == 0:
            continue
        per_pair = prediction_divergence(by_name[name], student[name], teacher[name],
                                         targets[name], tau)
        means[name] = torch.where(mask, per_pair, torch.zeros_like(per_pair)).sum() / n
        counts[name] = n
    return means, counts


@register_unlearner
class SCRUB(GradientUnlearner):
    """Push away from the original model on the forget pairs, distil toward it (and fit the
    labels) on the retain pairs."""

    name = "scrub"
    config_class = SCRUBConfig
    config: SCRUBConfig
    # Its objectives are only the curves' plain forget losses: ascent needs no preparation.
    default_forget_objective = "ascent"
    forget_objective_is_setting = False

    def shares_prefixes(self, model: torch.nn.Module) -> bool:
        """Not with ``forget_steps`` left to its default, two thirds of ``steps``."""
        return self.config.forget_steps is not None and super().shares_prefixes(model)

    def setup(self, ctx: StepContext, report: UnlearningReport) -> None:
        teacher = copy_model(ctx.model)
        for p in teacher.parameters():
            p.requires_grad_(False)
        ctx.state["teacher"] = teacher
        report.extra["forget_steps"] = min(self.config.max_steps(), self.config.steps)

    def _teacher_outputs(self, ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
        teacher = ctx.state["teacher"]
        with eval_mode(teacher), torch.no_grad():
            return dict(teacher(batch["input"]))

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        cfg = self.config
        specs = list(ctx.problem.tasks)
        tau = cfg.temperature
        stats = StepStats()
        total: torch.Tensor | None = None
        if forget_batch is not None:
            # After the forget phase the term is only measured, for the curves (the same
            # quantity throughout the run), in eval mode: a training-mode forward would write
            # the forget batch into BatchNorm's statistics and draw dropout masks.
            pushing = ctx.step < cfg.max_steps()
            with contextlib.nullcontext() if pushing else _measuring(ctx.model):
                out = ctx.forward(forget_batch)
                teacher = self._teacher_outputs(ctx, forget_batch)
                divergence, count = _divergences(out, teacher, forget_batch, specs,
                                                 list(ctx.objectives), tau)
            # The plain forget losses (the objectives are ascent: -loss).
            plain = forget_terms({t: o.detach() for t, o in out.items()}, forget_batch, specs,
                                 ctx.objectives).objective
            stats.forget = ForgetTerms({t: -d.detach() for t, d in divergence.items()},
                                       {t: -v for t, v in plain.items()}, count)
            if pushing and divergence and cfg.forget_weight > 0:
                total = -cfg.forget_weight * torch.stack(list(divergence.values())).sum()
        if retain_batch is not None:
            out = ctx.forward(retain_batch)
            teacher = self._teacher_outputs(ctx, retain_batch)
            # One forward serves the retain loss and the distillation.
            retain = retain_terms(out, retain_batch, specs)
            retain.weights = cfg.retain_task_weights
            stats.retain = retain
            distill, _ = _divergences(out, teacher, retain_batch, specs,
                                      [s.name for s in specs], tau)
            terms = [self.retain_task_weight(t) * (retain.loss[t] + cfg.distill_weight
                                                   * distill.get(t, 0.0))
                     for t in retain.loss]
            if terms and cfg.retain_weight > 0:
                term = cfg.retain_weight * torch.stack(terms).sum()
                total = term if total is None else total + term
        if total is not None:
            total.backward()
        return stats
