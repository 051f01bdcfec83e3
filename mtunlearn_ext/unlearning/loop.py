"""The step loop shared by every gradient-based unlearning method.

A :class:`GradientUnlearner` runs ``steps`` optimisation steps. Each step draws one forget and
one retain minibatch from seeded :class:`~mtunlearn_ext.unlearning.batches.BatchStream`\\ s, asks
the method for an update direction (:meth:`GradientUnlearner.compute_update`, which writes every
parameter's ``.grad``), optionally masks it (:meth:`GradientUnlearner.mask_update`), clips its
global norm and lets the optimizer step. Then ``head_refit_steps`` more steps (default 0) move
the heads alone by retain descent (:meth:`GradientUnlearner.head_refit_update`): they draw
retain batches only (a forget batch at the last one, for the forget-loss curve), and the trunk
is held where the forget steps left it. The shared backbone and the heads are separate optimizer
parameter groups, so their learning rates can differ (``head_lr_scale``).

Sign convention: ``.grad`` always holds the gradient of a quantity to *minimise*; forgetting is
expressed through the forget objective (``ascent`` = minimise ``-L``), never by flipping signs
inside the optimizer.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

import math
import numbers

import torch
from torch import nn

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._progress import report as progress_report
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.data.inputs import Inputs, num_rows
from mtunlearn_ext.models.modes import eval_mode
from mtunlearn_ext.models.sparse_embeddings import dense_embedding_gradients
from mtunlearn_ext.unlearning.base import (
    CurveRecorder,
    Unlearner,
    UnlearnerConfig,
    UnlearningProblem,
    UnlearningReport,
)
from mtunlearn_ext.unlearning.batches import Batch, BatchStream, child_generator
from mtunlearn_ext.unlearning.gradients import ParameterGroups
from mtunlearn_ext.unlearning.norm_statistics import (
    recalibrate_running_statistics,
    running_statistics_modules,
)
from mtunlearn_ext.unlearning.objectives import (
    FORGET_OBJECTIVES,
    ForgetObjective,
    make_forget_objectives,
    objective_names,
)
from mtunlearn_ext.unlearning.terms import (
    ForgetTerms,
    RetainTerms,
    forget_terms,
    mean_of,
    retain_terms,
)

__all__ = ["STEP_OPTIMIZERS", "GradientUnlearner", "StepConfig", "StepContext", "StepOptimizer",
           "StepStats"]

#: The optimizers of the unlearning steps (``StepConfig.optimizer``).
StepOptimizer = Literal["sgd", "adam"]
STEP_OPTIMIZERS: tuple[StepOptimizer, ...] = get_args(StepOptimizer)

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class StepConfig(UnlearnerConfig):
    """Settings shared by every step-based method.

    Attributes:
        steps: optimisation steps.
        lr: learning rate of the shared backbone.
        head_lr_scale: learning rate of the heads relative to ``lr``.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        momentum: SGD momentum, in ``[0, 1)``.
        adam_beta2: Adam's second-moment decay (``betas = (0.9, adam_beta2)``).
        adam_eps: Adam's ``eps``: a coordinate whose gradient stays well below it moves by
            about ``lr * |g| / eps`` (an SGD-like step) instead of ``lr``; the default is
            PyTorch's. It must be above 0 in the parameters' type (checked when the run
            starts): a value that rounds to 0 there would divide 0 by 0.
        weight_decay: L2 weight decay (SGD) / Adam's coupled decay.
        forget_batch_size: forget pairs per step (a smaller forget set gives all of it).
        retain_batch_size: retain instances per step.
        grad_clip: maximum global norm of the update, or ``None``.
        forget_objective: one objective name for every target task, or task name / kind ->
            name, or ``None`` for the method's default (see
            :mod:`mtunlearn_ext.unlearning.objectives`). Every key of a mapping must be a task
            of the problem or a task kind (checked when the run starts, where the tasks are
            known): a misspelt key is refused, not ignored.
        warmup_steps: the learning rates rise linearly over the first this many steps (step
            ``s < warmup_steps`` uses ``(s + 1) / warmup_steps`` of them), then stay constant;
            0: constant from the start. A fresh Adam state moves every coordinate by about
            ``lr`` on its first steps, whatever the gradient's size; a warm-up tempers that.
        forget_weight: weight of the forget term in the update.
        retain_weight: weight of the retain term in the update.
        retain_task_weights: task name -> weight of that task's mean loss in the retain
            objective, a finite number >= 0 (default 1 for every task; names must be tasks of
            the problem). A model trained on a weighted sum of task losses (``TrainConfig``'s
            ``task_weights``, or a loss in large units beside cross-entropies) keeps its tasks
            in the same balance: every retain term (the descent term, the heads' refit, each
            instance's constraint row and OrthoGrad's basis rows) weighs task ``t`` by it. The
            snapshots of the task projection are per task, so their subspaces do not change.
        log_every: record curves every this many steps (and at the last step).
        train_mode: run the steps with the model in training mode. Off by default: the steps
            run in eval mode, where a BatchNorm layer normalises with its stored statistics
            instead of the batch's (each sample's forward is then its own, as per-sample
            gradients need, and no forget batch writes its statistics into the buffers) and
            dropout is off (the steps are deterministic). For models without such layers, the
            project's own included, both modes compute the same.
        head_refit_steps: after the ``steps``, this many steps that move the heads alone, by
            descent on the retain loss of a retain batch, the trunk held fixed (its learning
            rate 0; the optimizer and its state continue). The forget steps move the trunk, and
            with it the features every head reads: refitting each head to the features the
            retained instances now have restores what the move cost retained and unseen data,
            while no refit step sees a forget pair and a head alone cannot single out instances
            the trunk no longer separates. The heads move at ``lr * head_lr_scale``, so a
            scale of 0 is refused with refit steps. Step callbacks count these after the others;
            the report's ``steps`` counts the forget steps only.
        recalibrate_norms: after the steps, recompute the running statistics of every
            BatchNorm-like layer from the retain instances alone, under the unlearned weights
            (:func:`~mtunlearn_ext.unlearning.norm_statistics.recalibrate_running_statistics`;
            one no-grad forward pass over the retain set), so that they no longer hold the
            forget instances' contribution. Nothing to do for models without such layers.
    """

    steps: int = 100
    lr: float = 1e-3
    head_lr_scale: float = 1.0
    optimizer: StepOptimizer = "sgd"
    momentum: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    forget_batch_size: int = 16
    retain_batch_size: int = 32
    grad_clip: float | None = 5.0
    forget_objective: str | dict[str, str] | None = None
    warmup_steps: int = 0
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_task_weights: dict[str, float] | None = None
    log_every: int = 1
    train_mode: bool = False
    head_refit_steps: int = 0
    recalibrate_norms: bool = True

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.steps < 0:
            raise ValueError(f"{name}: `steps` must be >= 0, got {self.steps}")
        for field_name in ("lr", "head_lr_scale", "forget_weight", "retain_weight",
                           "weight_decay", "momentum"):
            value = getattr(self, field_name)
            # torch's optimizers pass these to float32 kernels, which refuse (with a bare
            # RuntimeError from inside the step) a value past float32's largest.
            if not (math.isfinite(value) and 0 <= value <= _FLOAT32_MAX):
                raise ValueError(f"{name}: `{field_name}` must be a finite number >= 0 and at "
                                 f"most {_FLOAT32_MAX:.4g} (float32's largest), got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"{name}: `lr` must be > 0, got {self.lr}")
        if self.lr * self.head_lr_scale > _FLOAT32_MAX:
            raise ValueError(f"{name}: the heads' learning rate `lr` x `head_lr_scale` "
                             f"({self.lr!r} x {self.head_lr_scale!r}) must be at most "
                             f"{_FLOAT32_MAX:.4g} (float32's largest)")
        if not self.momentum < 1.0:
            # The velocity is a geometric sum of earlier updates with ratio `momentum`: at 1 or
            # more it never decays and the steps grow without bound.
            raise ValueError(f"{name}: `momentum` must be in [0, 1), got {self.momentum!r}")
        if not 0.0 <= self.adam_beta2 < 1.0:
            raise ValueError(f"{name}: `adam_beta2` must be in [0, 1), got {self.adam_beta2!r}")
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"{name}: `adam_eps` must be a finite number > 0, got "
                             f"{self.adam_eps!r}")
        if self.optimizer not in STEP_OPTIMIZERS:
            raise ValueError(f"{name}: `optimizer` must be 'sgd' or 'adam', got "
                             f"{self.optimizer!r}")
        for field_name in ("warmup_steps", "head_refit_steps"):
            value = getattr(self, field_name)
            if integer_value(value) is None or value < 0:
                raise ValueError(f"{name}: `{field_name}` must be an integer >= 0, got "
                                 f"{value!r}")
        if self.head_refit_steps and self.head_lr_scale == 0:
            # The refit holds the trunk (rate 0) and moves the heads at lr x head_lr_scale:
            # with a scale of 0 its steps ran and moved nothing.
            raise ValueError(f"{name}: `head_refit_steps` ({self.head_refit_steps}) moves the "
                             f"heads alone, at `lr` x `head_lr_scale`, which is 0 here: its "
                             f"steps would move nothing; raise `head_lr_scale` above 0 or set "
                             f"`head_refit_steps` to 0")
        for field_name in ("forget_batch_size", "retain_batch_size", "log_every"):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{name}: `{field_name}` must be >= 1, got "
                                 f"{getattr(self, field_name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"{name}: `grad_clip` must be > 0 or None, got {self.grad_clip}")
        choices = ([] if self.forget_objective is None else
                   [self.forget_objective] if isinstance(self.forget_objective, str) else
                   list(self.forget_objective.values()))
        if isinstance(self.forget_objective, Mapping):
            # The keys name tasks (checked against the problem's when the run starts) or kinds.
            bad_keys = [k for k in self.forget_objective if not isinstance(k, str) or not k]
            if bad_keys:
                raise ValueError(f"{name}: the keys of `forget_objective` must be task names or "
                                 f"task kinds, got {bad_keys}")
        if self.retain_task_weights is not None:
            for task, weight in self.retain_task_weights.items():
                if not isinstance(task, str) or not task:
                    raise ValueError(f"{name}: the keys of `retain_task_weights` must be task "
                                     f"names, got {task!r}")
                if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (
                        math.isfinite(weight) and 0 <= weight <= _FLOAT32_MAX):
                    raise ValueError(f"{name}: `retain_task_weights[{task!r}]` must be a finite "
                                     f"number >= 0, got {weight!r}")
        unknown = [c for c in choices if c not in FORGET_OBJECTIVES]
        if unknown:
            raise ValueError(f"{name}: unknown forget objective(s) {unknown}; known: "
                             f"{sorted(FORGET_OBJECTIVES)}")


@dataclass
class StepContext:
    """What a method's step sees: the model being edited, its parameter groups, the problem, the
    prepared forget objectives of the target tasks, and the method's generator."""

    model: nn.Module
    problem: UnlearningProblem
    groups: ParameterGroups
    objectives: dict[str, ForgetObjective]
    generator: torch.Generator
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's per-task outputs for ``batch["input"]``."""
        # The whole input structure goes to the model: a library model takes its tensor, a
        # user's multi-input module is unpacked by the API's wrapper (``SplitModel``).
        inputs: Inputs = batch["input"]  # type: ignore[assignment]
        try:
            return self.model(inputs)
        except ValueError as error:
            if not (self.model.training and _ONE_ROW_BATCH_NORM in str(error)):
                raise
            raise ValueError(
                f"train_mode=True: a batch of {num_rows(inputs)} row(s) reached a "
                f"normalisation layer in training mode, where it normalises by the batch's "
                f"own statistics and needs at least 2 rows; run the "
                f"steps in eval mode (train_mode=False, the default: stored statistics), or "
                f"give the forget and retain sets, and forget_batch_size / retain_batch_size, "
                f"at least 2 rows") from error


#: torch's refusal of a one-row batch in a training-mode BatchNorm.
_ONE_ROW_BATCH_NORM = "Expected more than 1 value per channel when training"


@dataclass
class StepStats:
    """Loss terms measured in a step (before its update), for the curves."""

    forget: ForgetTerms | None = None
    retain: RetainTerms | None = None
    extra: dict[str, float | torch.Tensor] = field(default_factory=dict)


class GradientUnlearner(Unlearner):
    """Base of the step-based methods (see the module docstring).

    Subclasses set ``default_forget_objective`` (used when the config names none; ``None`` means
    the per-kind defaults of :data:`~mtunlearn_ext.unlearning.objectives.DEFAULT_FORGET_OBJECTIVES`),
    ``uses_forget`` / ``uses_retain`` and implement :meth:`compute_update`.
    """

    config_class: ClassVar[type[UnlearnerConfig]] = StepConfig
    default_forget_objective: ClassVar[str | None] = None
    #: Whether ``forget_objective`` is a setting of the method (SCRUB builds objectives for its
    #: curves alone): where it is, the objectives a run built are its resolved setting.
    forget_objective_is_setting: ClassVar[bool] = True
    uses_forget: ClassVar[bool] = True
    uses_retain: ClassVar[bool] = True

    config: StepConfig

    def __init__(self, config: UnlearnerConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        #: Called as ``callback(steps_done, model)`` after every optimizer step, to watch a run
        #: (e.g. evaluate along the trajectory when choosing a step budget). A callback must not
        #: modify the model; evaluation that switches to eval mode must switch back.
        self.step_callbacks: list[Callable[[int, nn.Module], None]] = []

    def shares_prefixes(self, model: nn.Module) -> bool:
        """Whether, under this configuration, the model after step ``s`` of a longer run is the
        model an ``s``-step run returns (then one run, watched by :attr:`step_callbacks`,
        scores every step budget). Not when a run ends with work of its own: the heads'
        refit (``head_refit_steps``) or the running statistics of ``model``'s normalisation
        layers recomputed (``recalibrate_norms``). Subclasses whose schedule depends on
        ``steps`` say so too."""
        if self.config.head_refit_steps:
            return False
        return not (self.config.recalibrate_norms and running_statistics_modules(model))

    # -- hooks -------------------------------------------------------------------------------

    def setup(self, ctx: StepContext, report: UnlearningReport) -> None:
        """Called once before the first step (e.g. to compute a saliency mask)."""

    @abstractmethod
    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        """Write the update direction into every parameter's ``.grad`` (the optimizer steps
        along ``-grad``); return the terms measured on the batches."""

    def mask_update(self, ctx: StepContext) -> None:
        """Edit the ``.grad`` s after :meth:`compute_update` (default: nothing)."""

    # -- building blocks for subclasses --------------------------------------------------------

    def forget_step_terms(self, ctx: StepContext, batch: Batch) -> ForgetTerms:
        """Forward a forget batch and evaluate the target tasks' objectives (with graph)."""
        return forget_terms(ctx.forward(batch), batch, ctx.problem.tasks, ctx.objectives)

    def retain_step_terms(self, ctx: StepContext, batch: Batch) -> RetainTerms:
        """Forward a retain batch and evaluate every task's retain loss (with graph)."""
        terms = retain_terms(ctx.forward(batch), batch, ctx.problem.tasks)
        terms.weights = self.config.retain_task_weights
        return terms

    def retain_task_weight(self, task: str) -> float:
        """Task ``task``'s weight in the retain objective (``retain_task_weights``; 1)."""
        weights = self.config.retain_task_weights
        return 1.0 if weights is None else float(weights.get(task, 1.0))

    def head_refit_update(self, ctx: StepContext, retain_batch: Batch) -> StepStats:
        """``.grad`` of the retain loss on the heads alone (``head_refit_steps``): the trunk's
        parameters are held fixed, so no graph is built through them and they get no
        gradient (the loop leaves their ``.grad`` None, so the optimizer skips them; their
        learning rate is 0 besides)."""
        shared = ctx.groups.shared_params
        for p in shared:
            p.requires_grad_(False)
        try:
            terms = self.retain_step_terms(ctx, retain_batch)
            total = terms.total()
            if total is not None:
                total.backward()
        finally:
            for p in shared:
                p.requires_grad_(True)
        return StepStats(retain=terms)

    def weighted_update(self, ctx: StepContext, forget_batch: Batch | None,
                        retain_batch: Batch | None) -> StepStats:
        """``.grad = d/d theta [w_f sum_{t in S} O_t + w_r sum_t L^r_t]``: one backward through
        both forward passes (terms whose batch is ``None`` or whose weight is 0 are left out)."""
        cfg = self.config
        stats = StepStats()
        total: torch.Tensor | None = None
        if forget_batch is not None:
            stats.forget = self.forget_step_terms(ctx, forget_batch)
            forget_total = stats.forget.total()
            if forget_total is not None and cfg.forget_weight > 0:
                total = cfg.forget_weight * forget_total
        if retain_batch is not None:
            stats.retain = self.retain_step_terms(ctx, retain_batch)
            retain_total = stats.retain.total()
            if retain_total is not None and cfg.retain_weight > 0:
                term = cfg.retain_weight * retain_total
                total = term if total is None else total + term
        if total is not None:
            total.backward()
        return stats

    # -- the loop ----------------------------------------------------------------------------

    def _make_optimizer(self, groups: ParameterGroups) -> torch.optim.Optimizer:
        cfg = self.config
        head_params = [p for _, p in groups.all[groups.num_shared:]]
        param_groups = [{"params": groups.shared_params, "lr": cfg.lr}]
        if head_params:
            param_groups.append({"params": head_params, "lr": cfg.lr * cfg.head_lr_scale})
        if cfg.optimizer == "adam":
            # float(): torch refuses betas of mixed types, so an int 0 (JSON's `0`) failed
            # with "betas must be either both floats or both Tensors".
            return torch.optim.Adam(param_groups, lr=cfg.lr, betas=(0.9, float(cfg.adam_beta2)),
                                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def _objective_choice(self) -> str | Mapping[str, str] | None:
        return self.config.forget_objective or self.default_forget_objective

    def check_problem(self, problem: UnlearningProblem) -> None:
        """``forget_objective``'s keys must name tasks of the problem or task kinds (checked
        as :meth:`_unlearn` builds the objectives, before any work),
        ``retain_task_weights``' keys tasks of the problem, and Adam's ``adam_eps`` a number
        above 0 in the type of the model's parameters."""
        objective_names(problem.target_specs(), problem.task_names, self._objective_choice())
        unknown = sorted(set(self.config.retain_task_weights or {}) - set(problem.task_names))
        if unknown:
            raise ValueError(f"{self.name}: `retain_task_weights` names {unknown}, which are not "
                             f"tasks of the problem; its tasks: {list(problem.task_names)}")
        if self.config.optimizer == "adam":
            self._check_adam_eps(problem.model)

    def _check_adam_eps(self, model: nn.Module) -> None:
        # Adam adds eps in the parameters' own type: one that rounds to 0 there (1e-50 in
        # float32) divides 0 by 0 at every coordinate whose gradient is 0 (a dead unit), and
        # the run returned NaN weights, blamed on the learning rate.
        eps = self.config.adam_eps
        dtypes = {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}
        for dtype in sorted(dtypes, key=str):
            if float(torch.tensor(eps, dtype=dtype)) == 0.0:
                raise ValueError(f"{self.name}: `adam_eps` ({eps!r}) is 0 in {dtype}, the type "
                                 f"of the model's parameters, where Adam adds it (a coordinate "
                                 f"whose gradient is 0 would become 0 / 0); give at least "
                                 f"{torch.finfo(dtype).tiny:.4g} ({dtype}'s smallest normal "
                                 f"number)")

    def _unlearn(self, model: nn.Module | None, problem: UnlearningProblem,
                 generator: torch.Generator, recorder: CurveRecorder,
                 report: UnlearningReport) -> nn.Module | None:
        assert model is not None
        # Sparse embedding tables step with dense gradients (the same values; Adam, gradient
        # clipping, the projections and vmap take no sparse ones) and are given back sparse.
        with dense_embedding_gradients(model):
            return self._steps(model, problem, generator, recorder, report)

    def _steps(self, model: nn.Module, problem: UnlearningProblem, generator: torch.Generator,
               recorder: CurveRecorder, report: UnlearningReport) -> nn.Module | None:
        cfg = self.config
        device = problem.device
        groups = ParameterGroups.from_model(model, problem.task_names)
        model.train(cfg.train_mode)
        # Independent child streams: the batch order of one set does not depend on how many
        # draws the other, or an objective, made.
        forget_gen = child_generator(generator)
        retain_gen = child_generator(generator)
        objective_gen = child_generator(generator)
        method_gen = child_generator(generator)
        objectives = make_forget_objectives(problem.target_specs(), problem.retain,
                                            objective_gen, device, self._objective_choice(),
                                            forget=problem.forget)
        report.extra["forget_objectives"] = {t: o.name for t, o in objectives.items()}
        names = set(report.extra["forget_objectives"].values())
        if cfg.forget_objective is None and self.forget_objective_is_setting and names:
            report.extra["resolved_settings"] = {"forget_objective": (
                names.pop() if len(names) == 1 else dict(report.extra["forget_objectives"]))}
        ctx = StepContext(model, problem, groups, objectives, method_gen)
        forget_stream = BatchStream(problem.forget, cfg.forget_batch_size, forget_gen, device)
        retain_stream = BatchStream(problem.retain, cfg.retain_batch_size, retain_gen, device)
        self.setup(ctx, report)
        optimizer = self._make_optimizer(groups)
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        params = groups.all_params
        total_steps = cfg.steps + cfg.head_refit_steps
        for step in range(total_steps):
            ctx.step = step
            refit = step >= cfg.steps
            if refit:
                # The optimizer's first group is the trunk (_make_optimizer): held in place.
                optimizer.param_groups[0]["lr"] = 0.0
            elif cfg.warmup_steps:
                scale = min(1.0, (step + 1) / cfg.warmup_steps)
                for group, base_lr in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base_lr * scale
            log_now = step % cfg.log_every == 0 or step == total_steps - 1
            # A refit step needs no forget batch; its forget-loss curve point is measured at
            # the last step only (a forward pass per refit step cost as much as the step).
            log_forget = log_now and (not refit or step == total_steps - 1)
            forget_batch = (forget_stream.next() if (self.uses_forget and not refit) or log_forget
                            else None)
            retain_batch = retain_stream.next() if self.uses_retain or refit or log_now else None
            optimizer.zero_grad(set_to_none=True)
            try:
                if refit:
                    assert retain_batch is not None
                    stats = self.head_refit_update(ctx, retain_batch)
                else:
                    stats = self.compute_update(ctx, forget_batch if self.uses_forget else None,
                                                retain_batch if self.uses_retain else None)
            except FloatingPointError as error:
                # The model was finite when the run began (the problem's checks): a NaN or Inf
                # gradient inside a step is the run diverging, not the user's input; the op's
                # own advice (check_finite=False) is no setting of the run's.
                where = str(error).replace("; pass finite values (or check_finite=False to let "
                                           "them propagate)", "")
                raise FloatingPointError(
                    f"{self.name}: the run diverged at step {step} of {total_steps} ({where}); "
                    "lower the learning rate or the step count (`config`), or keep gradient "
                    "clipping on") from error
            # A parameter no term reaches must not be skipped by Adam's state. In a refit step
            # the trunk is the exception: it never moves again, so its state no longer matters,
            # and leaving its gradients None lets the optimizer skip its tensors.
            for p in (params[groups.num_shared:] if refit else params):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.mask_update(ctx)
            grad_norm = None
            if cfg.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if log_now:
                self._fill_missing_stats(ctx, stats, forget_batch, retain_batch)
                self._log(recorder, step, stats, grad_norm)
            optimizer.step()
            for callback in self.step_callbacks:
                callback(step + 1, model)
            progress_report((step + 1) / total_steps)
        report.steps = cfg.steps
        if cfg.head_refit_steps:
            report.extra["head_refit_steps"] = cfg.head_refit_steps
        if cfg.recalibrate_norms and running_statistics_modules(model):
            # Which layers were rewritten (frozen ones included: their statistics were averaged
            # over the forget instances too whenever they ran in training mode).
            prefix = getattr(model, "wrapped_prefix", "")
            report.extra["norm_statistics_layers"] = [
                name.removeprefix(prefix) for name, _ in running_statistics_modules(model)]
            rows = recalibrate_running_statistics(model, problem.retain, cfg.retain_batch_size,
                                                  device)
            report.extra["norm_statistics_rows"] = rows
            if rows == 0:  # one row has no variance: the statistics stay the original's
                warn_at_caller(
                    f"{self.name}: the retain set has {len(problem.retain)} row(s), too few to "
                    f"recompute the running statistics of "
                    f"{len(report.extra['norm_statistics_layers'])} normalisation layer(s): "
                    "they stay the original model's, which averaged the forget instances in "
                    "too (recalibrate_norms needs at least two retain rows)")
        return None

    def _fill_missing_stats(self, ctx: StepContext, stats: StepStats, forget_batch: Batch | None,
                            retain_batch: Batch | None) -> None:
        """Measure (without gradients) the terms a method did not need, so every method has both
        curves; costs a forward pass only at logging steps. In eval mode: a training-mode
        forward made only for the curves would draw dropout masks (shifting every later one)
        and write the batch into BatchNorm's running statistics (fine-tuning would take in
        forget batches), so that ``log_every`` changed the unlearned model."""
        missing_forget = stats.forget is None and forget_batch is not None
        missing_retain = stats.retain is None and retain_batch is not None
        if not (missing_forget or missing_retain):
            return
        # Not measuring(): a snapshot of every buffer at every logged step (each step, by
        # default) costs more than the forward on a model with large buffers, and the model is
        # the run's own copy, whose steps write what its forward writes anyway.
        with eval_mode(ctx.model), torch.no_grad():
            if missing_forget:
                assert forget_batch is not None
                stats.forget = forget_terms(ctx.forward(forget_batch), forget_batch,
                                            ctx.problem.tasks, ctx.objectives)
            if missing_retain:
                assert retain_batch is not None
                stats.retain = retain_terms(ctx.forward(retain_batch), retain_batch,
                                            ctx.problem.tasks)

    @staticmethod
    def _log(recorder: CurveRecorder, step: int, stats: StepStats,
             grad_norm: torch.Tensor | None) -> None:
        values: dict[str, float | torch.Tensor | None] = {}
        if stats.forget is not None:
            values["forget_loss"] = mean_of(stats.forget.loss)
            values["forget_objective"] = mean_of(stats.forget.objective)
            for t, v in stats.forget.loss.items():
                values[f"forget_loss/{t}"] = v
        if stats.retain is not None:
            values["retain_loss"] = mean_of(stats.retain.loss)
            for t, v in stats.retain.loss.items():
                values[f"retain_loss/{t}"] = v
        if grad_norm is not None:
            values["update_norm"] = grad_norm
        values.update(stats.extra)
        recorder.log(step, **values)
