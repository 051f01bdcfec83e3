"""The interference-aware multi-task unlearner (after arXiv 2605.19042; docs/unlearning.md).

A request ``(F, S)`` removes the supervision of the target tasks ``S`` for the instances ``F``.
Because the backbone ``theta_s`` is shared, forgetting interferes with what must be kept at two
levels, and each step of this method removes one:

1. **Per-task forget gradients.** On a forget minibatch, for each target task ``t in S``, the
   gradient ``f_t`` of that task's bounded forgetting objective ``O_t``
   (:mod:`~mtunlearn_ext.unlearning.objectives`, chosen per task kind; by default
   ``capped_ascent`` with a cap calibrated on the retain set, or with ``cap_reference``
   ``"held_out"`` / ``"auto"`` on a held-out validation set: see ``cap_quantile``) with respect to
   ``theta_s`` and the task's head ``theta_t``.
2. **Task-aware gradient projection** (task-level interference). Every ``refresh_every`` steps,
   retain-gradient snapshots of the tasks to protect ``P`` are pushed into a per-layer
   :class:`~mtunlearn_ext.unlearning.protected_subspace.ProtectedSubspace` holding the ``k``
   newest snapshots ``M_l``; each ``f_t`` is projected off it layer by layer,
   ``f_l <- f_l - M_l^T (M_l M_l^T + lambda I)^{-1} M_l f_l``, from one batch of ``[L, k, k]``
   Gram matrices. ``P`` is every task in a full request and the non-target tasks ``T \\ S`` in
   a partial one (``protect="auto"``). In a partial request the snapshots also include the
   non-target gradients of the *forget instances' own* retained pairs ``F x (T \\ S)``: those
   are the supervision pairs a shared-backbone edit is most likely to break, since they share
   the exact inputs being forgotten. Each refresh takes one snapshot per (group of retain
   instances, protected task), and by default against targets sampled from the model's own
   prediction (:mod:`~mtunlearn_ext.unlearning.fisher`): at a trained optimum the labelled
   retain gradient nearly vanishes, while these samples span the Fisher / Gauss-Newton
   directions in which the retained pairs' loss curves, i.e. where a forget step would do
   second-order damage. The projection is linear and the same for every target task, so the
   step projects ``sum_t f_t`` once (one backward pass instead of ``|S|``; the per-task
   gradients are available from :meth:`InterferenceAware.forget_task_grads`). With
   ``protect="others"`` each target task ``t`` has its own subspace, spanned by the other
   tasks' snapshots (cross-task interference only), and each ``f_t`` is projected off its own.
3. **Instance-level gradient orthogonalization** (instance-level interference). The per-sample
   retain gradients ``r_1..r_B`` of the retain minibatch (``torch.func``: ``vmap(grad)`` over
   ``functional_call``; plus, in a partial request, forget instances with their retained pairs)
   define the directions along which individual retained instances move (each ``r_j`` is the
   gradient of instance ``j``'s term of the retain objective, so that outside refresh steps the
   same pass also gives those rows' share of the retain gradient of step 4: they are
   differentiated once). With ``u = -sum_t f_t``
   the forget *step* direction (over ``theta_s`` and the target heads):

   - ``"orthogonal"``: ``d = u - R^T (R R^T + lambda I)^{-1} R u`` (OrthoGrad's projection from
     the ``B x B`` Gram matrix, no QR over the huge dimension);
   - ``"nonconflicting"`` (default): the closest ``d`` to ``u`` with ``<d, r_j> <= 0`` for every
     ``j`` (``ops`` convention ``sign=-1``: a step along ``+d`` raises no retain sample's loss to
     first order), from the non-negative dual on the same Gram matrix, as in GEM. Only the
     conflicting components are removed, so less of the forget signal is lost than with the
     orthogonal complement, while the guarantee that matters (no retained instance gets worse to
     first order) is kept.

   The instance step acts on the task-projected direction and moves it along per-sample
   retain gradients, which are not orthogonal to the snapshots: the step keeps the instance
   constraints (exactly; ``"orthogonal"`` to within ``ridge``), the per-layer snapshot
   orthogonality of step 2 only approximately
   (docs/unlearning.md gives a measurement; ``instance_projection="off"`` keeps it exactly).

   With ``instance_memory = m`` the newest ``(m + 1) B`` per-sample gradients (``B``: the first
   step's rows; with batches of that size, those of this step's and the last ``m`` steps'
   batches) stay in the constraint set (:mod:`~mtunlearn_ext.unlearning.instance_memory`), so a
   step also avoids what the previous steps protected, at no extra backward pass.
4. **Update.** ``.grad`` of ``theta_s`` is ``w_r * r + alpha * (-d)``, with ``r`` the retain
   gradient of all tasks (``w_r``: ``retain_weight``); each target head gets ``w_r`` times its
   retain gradient plus ``alpha`` times its part of ``-d``; every other head ``w_r`` times its
   retain gradient only. The optimizer steps along ``-.grad``.

Every projection is a Gram pass, a tiny solve and a combination, done by the compiled ops on
per-parameter lists (:mod:`mtunlearn_ext.surgery`); parameters are never flattened into one copy.

Ablations (config switches, and registered variants for the experiment runner):
``interference_aware_no_task`` (no task projection), ``interference_aware_no_instance`` (no
instance orthogonalization), ``interference_aware_neither`` (both off: retain descent plus
``alpha`` times the raw forget gradient).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, get_args

import torch

from mtunlearn_ext._random import forked_generators
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.inputs import cat_rows, num_rows
from mtunlearn_ext.models.modes import BuffersKept
from mtunlearn_ext.ops.solvers import MAX_SOLVER_K
from mtunlearn_ext.surgery import (
    inner_list_stats,
    project_nonconflicting_list,
    project_out_list,
)
from mtunlearn_ext.unlearning.base import UnlearningProblem, UnlearningReport
from mtunlearn_ext.unlearning.batches import (
    Batch,
    BatchStream,
    batch_rows,
    batch_to,
    child_generator,
)
from mtunlearn_ext.unlearning.fisher import sampled_target_loss
from mtunlearn_ext.unlearning.gradients import (
    grads_of,
    per_sample_retain_grads_and_losses,
    per_sample_task_grads_and_losses,
)
from mtunlearn_ext.unlearning.instance_memory import PerSampleMemory
from mtunlearn_ext.unlearning.loop import (
    GradientUnlearner,
    StepConfig,
    StepContext,
    StepOptimizer,
    StepStats,
)
from mtunlearn_ext.unlearning.objectives import (
    FORGET_OBJECTIVES,
    CappedAscentObjective,
    needs_no_retain_pair,
    objective_names,
)
from mtunlearn_ext.unlearning.protected_subspace import ProtectedSubspace, layer_ids_of
from mtunlearn_ext.unlearning.registry import register_unlearner
from mtunlearn_ext.unlearning.terms import RetainTerms, retain_terms

__all__ = [
    "CAP_REFERENCES",
    "INSTANCE_MODES",
    "INSTANCE_ROWS",
    "PROTECT_MODES",
    "RANK_MATCHED_CAPS",
    "SNAPSHOT_TARGETS",
    "CapReference",
    "InstanceProjection",
    "InstanceRows",
    "InterferenceAware",
    "InterferenceAwareConfig",
    "InterferenceAwareNeither",
    "InterferenceAwareNoInstance",
    "InterferenceAwareNoTask",
    "ProtectMode",
    "RankMatchedCaps",
    "SnapshotTargets",
    "coupled_retain_set",
    "protected_tasks",
    "protection_plan",
]

# The closed choices of the config's text settings, as types (a misspelt one is a type error in
# the caller's code) and as tuples (the run-time check, for values from YAML or a command line).
InstanceProjection = Literal["nonconflicting", "orthogonal", "off"]
InstanceRows = Literal["instance", "instance_task"]
ProtectMode = Literal["auto", "all", "non_target", "others"]
SnapshotTargets = Literal["sampled", "labels"]
CapReference = Literal["auto", "held_out", "retain"]
#: ``cap_quantile``'s text value: every forget pair gets its own, rank-matched cap.
RankMatchedCaps = Literal["rank"]
INSTANCE_MODES: tuple[InstanceProjection, ...] = get_args(InstanceProjection)
INSTANCE_ROWS: tuple[InstanceRows, ...] = get_args(InstanceRows)
PROTECT_MODES: tuple[ProtectMode, ...] = get_args(ProtectMode)
SNAPSHOT_TARGETS: tuple[SnapshotTargets, ...] = get_args(SnapshotTargets)
CAP_REFERENCES: tuple[CapReference, ...] = get_args(CapReference)
RANK_MATCHED_CAPS: Final = "rank"


@dataclass
class InterferenceAwareConfig(StepConfig):
    """Settings of :class:`InterferenceAware` (the loop's settings are those of
    :class:`~mtunlearn_ext.unlearning.loop.StepConfig`).

    Loop (inherited, defaults re-chosen for this method):
        steps: optimisation steps.
        lr: learning rate of the shared backbone; ``head_lr_scale``: heads' rate relative to it.
        optimizer / momentum / weight_decay: ``"sgd"`` by default, ``momentum`` in ``[0, 1)``.
            A plain SGD step (``momentum=0``) is a positive multiple of ``-.grad`` (with the
            heads' part scaled by ``head_lr_scale``, which the instance constraints take into
            account), so the first-order guarantees of the projections carry over to the step
            exactly. Momentum (0.9 by default) adds earlier steps' directions, each projected
            against its own step's rows, so they hold for the new part of each step only;
            Adam's per-coordinate scaling keeps them only approximately.
        forget_batch_size / retain_batch_size: rows per step of the forget and retain sets.
        grad_clip: maximum global norm of the update (scaling keeps every projection property).
        forget_objective: objective name for every target task, or task name / task kind ->
            name (:data:`~mtunlearn_ext.unlearning.objectives.FORGET_OBJECTIVES`); ``None``:
            :data:`DEFAULT_OBJECTIVE`.
        retain_weight: ``w_r``, weight of the retain descent term.
        forget_weight: must stay 1 (the forget weight of this method is ``alpha``).

    Method:
        alpha: weight of the projected forget direction in the update.
        task_projection: project forget gradients off the per-layer protected subspaces.
        instance_projection: ``"nonconflicting"`` (sign-aware), ``"orthogonal"`` or ``"off"``.
        num_snapshots: ``k``, retain-gradient snapshots spanning each layer's protected subspace.
        refresh_every: steps between snapshot refreshes.
        snapshot_groups: each refresh splits the retain batch (and, in a partial request, a
            batch of the forget instances' retained pairs) into this many groups of instances
            and pushes one snapshot per (group, protected task). Near a trained optimum the mean
            retain gradient of a whole batch is small and noisy; gradients of small groups
            instead sample the directions in which the retain loss curves most (the span of
            per-instance gradients is that of the Gauss-Newton matrix ``sum_i r_i r_i^T``), so
            a forget step kept off them also avoids most of the second-order damage.
        snapshot_targets: ``"sampled"`` (default): each snapshot is the gradient of the task's
            loss against targets drawn from the model's own prediction
            (:mod:`~mtunlearn_ext.unlearning.fisher`), which samples the Fisher / Gauss-Newton
            matrix of the retained pairs even where their labelled gradient vanishes;
            ``"labels"``: the labelled retain loss.
        protect: which tasks' retain gradients span the subspace each target task's forget
            gradient is projected off: ``"auto"`` (every task in a full request, the non-target
            tasks in a partial one), ``"all"``, ``"non_target"`` (with a full request this
            protects nothing at the task level), ``"others"`` (for target ``t``, every task but
            ``t``: only cross-task interference, own-task conflicts being left to the
            instance-level step; one subspace, forget gradient and projection per target task).
        coupled: in a partial request, also protect the forget instances' retained pairs
            ``F x (T \\ S)`` (snapshots and per-sample gradients from them).
        ridge: relative Tikhonov term (``lambda = ridge * tr(G) / k``) of the task projection's
            solves and of the orthogonal instance projection; the sign-aware
            (``"nonconflicting"``) instance projection solves its dual without one.
        num_per_sample: retain instances (the first of each retain batch) whose per-sample
            gradients define the instance-level constraints.
        num_coupled_per_sample: forget instances with their retained pairs added to those
            constraints in a partial request (0: none).
        instance_rows: what one instance constraint is: ``"instance"`` (default), the gradient
            of an instance's whole retain term ``sum_t s_t m_it l_t(i)``, so a step may raise
            one of the instance's task losses where another falls; ``"instance_task"``, one
            row per (instance, task) pair, ``s_t m_it l_t(i)``: no retained *pair* gets worse
            to first order (``T`` times the rows, from one forward and ``T`` backward passes
            per instance; ``(instance_memory + 1) * (num_per_sample + num_coupled_per_sample)
            * T`` must stay within the solver's limit).
        instance_memory: earlier steps whose per-sample gradients stay in the instance
            constraints (:class:`~mtunlearn_ext.unlearning.instance_memory.PerSampleMemory`):
            each step then respects the newest ``(instance_memory + 1) * B`` rows, ``B`` being
            the first step's (its own and, with batches of that size, the last
            ``instance_memory`` steps'; after a smaller batch, part of an older step's too),
            at the cost of a larger Gram matrix and no extra backward pass (0: the current
            batch only).
        chunk_size: samples per ``vmap`` chunk of the per-sample gradients (bounds the
            pass's activations; the rows are kept for every sample).
        cap_quantile: with a capped objective (``capped_ascent`` or a variant), the cap of
            task ``t`` becomes this quantile of the original model's per-sample losses (in the
            objective's own loss) on (up to ``cap_rows``) pairs of ``t`` of the
            ``cap_reference`` set: each forget pair's loss is raised until it
            is as high as that of a pair the model fits poorly, and no further (its gradient is
            then zero), so the step budget no longer decides how far forgetting goes.
            ``"rank"``: each forget pair gets its own cap, the quantile of those losses at the
            pair's rank among the forget pairs' own original losses (``(r + 1/2) / n``), so
            the forget pairs' losses are raised toward the *distribution* of the reference
            set's losses instead of all to one level (a scalar cap pushes every pair it has not
            reached to the same high loss, past what unseen data looks like on average).
            ``None`` keeps the objective's own cap (the loss of an input-independent predictor,
            far higher).
        cap_reference: whose losses ``cap_quantile`` is taken over: ``"held_out"`` (the
            problem's ``held_out`` instances, never trained on: a retrained model fits the
            forget instances about as well as such unseen data, so ascent stops where the
            forget pairs look unseen), ``"retain"`` (retain pairs: a level the model fits,
            lower than the unseen one when it memorises; the default) or ``"auto"``
            (``held_out`` when the problem has it, else ``retain``).
        cap_rows: pairs of each task used to estimate its quantile: the first ``cap_rows``
            rows of that set that supervise the task, in the set's order (in a partial request
            the retain set holds the forget instances without their target-task labels; they
            take none of them).
    """

    steps: int = 25
    lr: float = 6e-3
    optimizer: StepOptimizer = "sgd"
    momentum: float = 0.9
    forget_batch_size: int = 16
    retain_batch_size: int = 32
    # Bounds each SGD step to ``lr`` in parameter norm: at an Adam-trained optimum some retain
    # gradients are large, and a looser clip let retain descent alone wreck a model
    # (presets.py has the numbers).
    grad_clip: float | None = 1.0
    alpha: float = 1.0
    task_projection: bool = True
    instance_projection: InstanceProjection = "nonconflicting"
    num_snapshots: int = 24
    refresh_every: int = 5
    snapshot_groups: int = 4
    snapshot_targets: SnapshotTargets = "sampled"
    protect: ProtectMode = "auto"
    coupled: bool = True
    ridge: float = 1e-4
    num_per_sample: int = 16
    num_coupled_per_sample: int = 8
    instance_rows: InstanceRows = "instance"
    instance_memory: int = 0
    chunk_size: int | None = None
    cap_quantile: float | RankMatchedCaps | None = 0.9
    cap_reference: CapReference = "retain"
    cap_rows: int = 128

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.forget_weight != 1.0:
            raise ValueError(f"{name}: the forget weight of this method is `alpha`; leave "
                             f"`forget_weight` at 1 (got {self.forget_weight})")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"{name}: `alpha` must be a finite number >= 0, got {self.alpha}")
        if self.instance_projection not in INSTANCE_MODES:
            raise ValueError(f"{name}: `instance_projection` must be one of {INSTANCE_MODES}, "
                             f"got {self.instance_projection!r}")
        if self.instance_rows not in INSTANCE_ROWS:
            raise ValueError(f"{name}: `instance_rows` must be one of {INSTANCE_ROWS}, got "
                             f"{self.instance_rows!r}")
        if self.protect not in PROTECT_MODES:
            raise ValueError(f"{name}: `protect` must be one of {PROTECT_MODES}, got "
                             f"{self.protect!r}")
        if not 1 <= self.num_snapshots <= MAX_SOLVER_K:
            raise ValueError(f"{name}: `num_snapshots` must be in [1, {MAX_SOLVER_K}], got "
                             f"{self.num_snapshots}")
        if self.refresh_every < 1:
            raise ValueError(f"{name}: `refresh_every` must be >= 1, got {self.refresh_every}")
        if self.snapshot_targets not in SNAPSHOT_TARGETS:
            raise ValueError(f"{name}: `snapshot_targets` must be one of {SNAPSHOT_TARGETS}, "
                             f"got {self.snapshot_targets!r}")
        if self.snapshot_groups < 1:
            raise ValueError(f"{name}: `snapshot_groups` must be >= 1, got "
                             f"{self.snapshot_groups}")
        if not (math.isfinite(self.ridge) and self.ridge >= 0):
            raise ValueError(f"{name}: `ridge` must be a finite number >= 0, got {self.ridge}")
        if not 1 <= self.num_per_sample <= MAX_SOLVER_K:
            raise ValueError(f"{name}: `num_per_sample` must be in [1, {MAX_SOLVER_K}], got "
                             f"{self.num_per_sample}")
        if self.num_coupled_per_sample < 0 or \
                self.num_per_sample + self.num_coupled_per_sample > MAX_SOLVER_K:
            raise ValueError(f"{name}: `num_coupled_per_sample` must be >= 0 with "
                             f"num_per_sample + num_coupled_per_sample <= {MAX_SOLVER_K}, got "
                             f"{self.num_coupled_per_sample}")
        constraints = (self.instance_memory + 1) * (self.num_per_sample
                                                    + self.num_coupled_per_sample)
        if self.instance_memory < 0 or constraints > MAX_SOLVER_K:
            raise ValueError(f"{name}: `instance_memory` must be >= 0 with (instance_memory + 1) "
                             f"* (num_per_sample + num_coupled_per_sample) <= {MAX_SOLVER_K} "
                             f"constraints, got {self.instance_memory} ({constraints})")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"{name}: `chunk_size` must be >= 1 or None, got {self.chunk_size}")
        if isinstance(self.cap_quantile, str):
            if self.cap_quantile != RANK_MATCHED_CAPS:
                raise ValueError(f"{name}: `cap_quantile` must be in (0, 1], "
                                 f"{RANK_MATCHED_CAPS!r} or None, got {self.cap_quantile!r}")
        elif self.cap_quantile is not None and not (
                isinstance(self.cap_quantile, (int, float))
                and 0.0 < self.cap_quantile <= 1.0):
            raise ValueError(f"{name}: `cap_quantile` must be in (0, 1], {RANK_MATCHED_CAPS!r} "
                             f"or None, got {self.cap_quantile!r}")
        if self.cap_reference not in CAP_REFERENCES:
            raise ValueError(f"{name}: `cap_reference` must be one of {CAP_REFERENCES}, got "
                             f"{self.cap_reference!r}")
        if self.cap_rows < 1:
            raise ValueError(f"{name}: `cap_rows` must be >= 1, got {self.cap_rows}")


#: The forgetting objective used when the config names none (see the module docstring of
#: :mod:`~mtunlearn_ext.unlearning.objectives` and docs/unlearning.md for the comparison that
#: chose it).
DEFAULT_OBJECTIVE = "capped_ascent"

#: The share of a task's forget pairs at or above their caps from the start (the capped
#: objective gives them no gradient) at which :class:`InterferenceAware` warns.
_AT_CAP_WARN_SHARE: Final = 0.9

#: Per-sample forget losses and their instance ids, by task (``_original_losses``).
ForgetLosses = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def protection_plan(problem: UnlearningProblem, mode: ProtectMode
                    ) -> dict[str, tuple[str, ...]]:
    """Target task -> the tasks whose retain gradients span the subspace its forget gradient is
    projected off (see ``protect``), in the problem's task order."""
    names = list(problem.task_names)
    plan: dict[str, tuple[str, ...]] = {}
    for target in problem.target_tasks:
        if mode == "all" or (mode == "auto" and problem.is_full):
            plan[target] = tuple(names)
        elif mode == "others":
            plan[target] = tuple(t for t in names if t != target)
        else:
            plan[target] = tuple(problem.non_target_tasks)
    return plan


def protected_tasks(problem: UnlearningProblem, mode: ProtectMode) -> list[str]:
    """Every task whose retain gradients span some protected subspace (see ``protect``)."""
    wanted = {t for tasks in protection_plan(problem, mode).values() for t in tasks}
    return [t for t in problem.task_names if t in wanted]


def coupled_retain_set(problem: UnlearningProblem) -> MultiTaskDataset | None:
    """The forget instances with their *retained* pairs (``F x (T \\ S)``), taken from the
    retain set; ``None`` in a full request (the forget instances keep nothing).

    The forget instances are those of the forget set: a requested id with no supervised pair
    of the target tasks has nothing to forget, is not in it, and its pairs are plain retain
    pairs."""
    if problem.is_full:
        return None
    wanted = set(int(i) for i in problem.forget.ids.tolist())
    rows = [p for p, i in enumerate(problem.retain.ids.tolist()) if int(i) in wanted]
    if not rows:
        return None
    return problem.retain.subset(torch.tensor(rows, dtype=torch.long))


def _refuse_non_finite_losses(losses: Mapping[str, torch.Tensor], where: str,
                              cap_reference: str) -> None:
    """Refuse losses the caps cannot be calibrated on: a NaN in them made every quantile NaN,
    and the run then failed with a message blaming a set without labels."""
    for task, values in losses.items():
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise ValueError(
                f"interference_aware: the original model's {task!r} loss is NaN or infinite on "
                f"{int(bad.sum())} of the {values.numel()} supervised pairs of {where} that the "
                f"forget caps are calibrated on (cap_reference={cap_reference!r}); the caps "
                f"need finite per-sample losses: check {task!r}'s loss function and labels "
                f"there (a loss such as sqrt(pred - target) is NaN wherever pred < target)")


def _cap_reference_rows(data: MultiTaskDataset, tasks: Sequence[str], limit: int
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rows whose losses calibrate the forget caps of ``tasks``: for each task its first
    ``limit`` rows of ``data`` *supervised for it*, in ``data``'s order. Returns (the union of
    those rows, ascending: what is forwarded; task -> ``[len(union)]`` bool, the task's own
    rows among them). Where the first ``limit`` rows supervise every task, the union is
    ``arange(min(limit, len(data)))``."""
    chosen: dict[str, torch.Tensor] = {}
    for task in tasks:
        supervised = data.supervision[:, data.task_index(task)]
        chosen[task] = supervised & (supervised.cumsum(0) <= limit)
    union = torch.zeros(len(data), dtype=torch.bool, device=data.supervision.device)
    for mask in chosen.values():
        union |= mask
    rows = union.nonzero().flatten()
    return rows, {task: mask[rows] for task, mask in chosen.items()}


def _per_task_grads(ctx: StepContext, losses: Mapping[str, torch.Tensor], tasks: Sequence[str]
                    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """One backward per task through the shared forward graph: task -> grads over ``theta_s``
    and task -> grads over that task's head ``theta_t``."""
    shared = ctx.groups.shared_params
    on_shared: dict[str, list[torch.Tensor]] = {}
    on_head: dict[str, list[torch.Tensor]] = {}
    for i, t in enumerate(tasks):
        head = ctx.groups.head_params(t)
        grads = grads_of(losses[t], shared + head, retain_graph=i < len(tasks) - 1)
        on_shared[t], on_head[t] = grads[:len(shared)], grads[len(shared):]
    return on_shared, on_head


def _split_rows(batch: Batch, groups: int) -> list[Batch]:
    """The batch cut into ``groups`` contiguous row groups (fewer if it has fewer rows)."""
    rows = num_rows(batch["input"])  # type: ignore[arg-type]
    bounds = torch.linspace(0, rows, min(groups, rows) + 1).round().long().tolist()
    return [batch_rows(batch, start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _concat_batches(a: Batch, b: Batch) -> Batch:
    """Rows of ``a`` then rows of ``b`` (same layout)."""
    out: Batch = {}
    for key, value in a.items():
        other = b[key]
        if key == "input":  # one tensor, or every input of a multi-input batch
            out[key] = cat_rows([value, other])  # type: ignore[list-item]
        elif isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor)
            out[key] = torch.cat([value, other])
        elif isinstance(value, Mapping):
            assert isinstance(other, Mapping)
            out[key] = {k: torch.cat([v, other[k]]) for k, v in value.items()}
        else:
            out[key] = value
    return out


def _push(subspaces: Mapping[tuple[str, ...], ProtectedSubspace], task: str,
          grads: list[torch.Tensor]) -> None:
    """Push a snapshot of ``task`` into every subspace that protects it."""
    for tasks, subspace in subspaces.items():
        if task in tasks:
            subspace.push(grads)


def _cgroup_memory(root: str = "/sys/fs/cgroup",
                   membership: str = "/proc/self/cgroup") -> tuple[int, int] | None:
    """The memory limit of this process's control groups (a container's, a systemd slice's)
    and what they use now that they cannot reclaim (usage less the inactive file cache), in
    bytes, or ``None`` where no group sets one: the host's RAM and ``MemAvailable`` know
    nothing of such a limit, and a run over it is killed. Every group on the process's path
    (``membership``'s line, from its own group up to ``root``; a group not visible under
    ``root``, as inside a container that mounts its own group there, is skipped) counts: the
    limit is the lowest, the use the one that leaves the least. cgroup v2 (``memory.max``,
    ``memory.current``, ``memory.stat``'s ``inactive_file``) or v1 (``memory/`` with
    ``memory.limit_in_bytes``, whose "no limit" is a number near 2**63,
    ``memory.usage_in_bytes`` and ``total_inactive_file``)."""
    groups = _cgroup_paths(membership)
    for folder, limit_file, usage_file, cache_key, path in (
            ("", "memory.max", "memory.current", "inactive_file", groups.get("")),
            ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file",
             groups.get("memory"))):
        found = False
        lowest: int | None = None
        least_left: int | None = None
        for group in _ancestors(path or "/"):
            read = _cgroup_figures(os.path.join(root, folder, group), limit_file, usage_file,
                                   cache_key)
            if read is None:
                continue
            found = True
            limit, used = read
            if limit is not None:
                lowest = limit if lowest is None else min(lowest, limit)
                left = max(limit - used, 0)
                least_left = left if least_left is None else min(least_left, left)
        if found:
            if lowest is None or least_left is None:
                return None
            return lowest, lowest - min(least_left, lowest)
    return None


def _cgroup_paths(membership: str) -> dict[str, str]:
    """The process's group per hierarchy from ``/proc/self/cgroup``: ``""`` for cgroup v2's
    unified line (``0::/path``), ``"memory"`` for v1's memory controller."""
    paths: dict[str, str] = {}
    try:
        with open(membership, encoding="utf-8") as lines:
            for line in lines:
                fields = line.rstrip("\n").split(":", 2)
                if len(fields) != 3:
                    continue
                if fields[0] == "0" and fields[1] == "":
                    paths[""] = fields[2]
                elif "memory" in fields[1].split(","):
                    paths["memory"] = fields[2]
    except OSError:
        pass
    return paths


def _ancestors(path: str) -> list[str]:
    """``"/a/b"`` -> ``["a/b", "a", ""]``: a group and the groups above it, relative to the
    hierarchy's root."""
    parts = [part for part in path.split("/") if part and part not in (".", "..")]
    return ["/".join(parts[:depth]) for depth in range(len(parts), -1, -1)]


def _cgroup_figures(folder: str, limit_file: str, usage_file: str,
                    cache_key: str) -> tuple[int | None, int] | None:
    """One group's limit (``None``: none set) and the use it cannot reclaim, or ``None`` where
    the group's files cannot be read."""
    try:
        with open(os.path.join(folder, limit_file), encoding="ascii") as limit_text:
            limit = limit_text.read().strip()
        with open(os.path.join(folder, usage_file), encoding="ascii") as usage_text:
            usage = int(usage_text.read().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 1 << 60:  # "max": no limit
        return None, usage
    cache = 0
    try:
        with open(os.path.join(folder, "memory.stat"), encoding="ascii") as stat:
            for line in stat:
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
    except (OSError, ValueError):
        pass
    return int(limit), max(usage - cache, 0)


def _device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (physical RAM for the CPU, or a container's limit
    when lower), or ``None`` if unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[1])
        if device.type == "cpu":
            ram = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
            group = _cgroup_memory()
            return ram if group is None else min(ram, group[0])
    except (RuntimeError, ValueError, OSError, AttributeError):
        return None
    return None


def _available_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still give now (the CPU: the kernel's ``MemAvailable``, or what a
    container's limit leaves when less; CUDA: free memory plus what torch's caching allocator
    holds unused), or ``None`` if unknown."""
    try:
        if device.type == "cuda":
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
        if device.type == "cpu":
            available = None
            with open("/proc/meminfo", encoding="ascii") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        available = int(line.split()[1]) * 1024
            group = _cgroup_memory()
            if group is not None:
                left = max(group[0] - group[1], 0)
                available = left if available is None else min(available, left)
            return available
    except (RuntimeError, ValueError, OSError, AttributeError):
        return None
    return None


_LOWER = ("lower `num_snapshots` (the snapshots: subspaces x num_snapshots x the shared "
          "parameters), `instance_memory` or `num_per_sample` / `num_coupled_per_sample` (the "
          "rows: one copy of the constrained parameters each), or protect fewer parameters")


def _check_fits(plan: Mapping[str, int], device: torch.device) -> None:
    """Refuse, before the first step and before any copy is made, settings whose gradient
    copies alone exceed the device's whole memory (the run would only fail later, out of
    memory, possibly after minutes, or be killed); warn when they exceed what the device
    can give now (other processes hold the rest)."""

    def size(n: int) -> str:
        return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"

    parts = ", ".join(f"{k} {size(v)}" for k, v in plan.items() if k != "total" and v)
    total = _device_memory(device)
    if total is not None and plan["total"] > total:
        raise ValueError(
            f"interference_aware: the gradient copies need {size(plan['total'])} ({parts}), "
            f"more than the {size(total)} of {device}; {_LOWER}")
    available = _available_memory(device)
    if available is not None and plan["total"] > available:
        warn_at_caller(
            f"interference_aware: the gradient copies need {size(plan['total'])} ({parts}), "
            f"more than the {size(available)} {device} can give now"
            f"{f' (of {size(total)})' if total is not None else ''}: "
            f"the run may fail out of memory; {_LOWER}")


def _own_memory(tensors: Sequence[torch.Tensor]) -> bool:
    """Each tensor is contiguous and no two share a storage (autograd may hand one gradient
    to two parameters, e.g. of ``a + b``), so each may be written in place on its own."""
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    return len(storages) == len(tensors) and all(t.is_contiguous() for t in tensors)


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    # Squared in place in a float64 copy (pow_ is the same kernel as ** 2): a second float64
    # copy of the largest layer was the step's peak (two float32 trunks for an MLP of 4 layers).
    # copy=True: for a float64 tensor .double() is the tensor itself, and squaring it in place
    # squared the step's direction of every float64 model.
    return torch.sqrt(sum(t.to(torch.float64, copy=True).pow_(2).sum()  # type: ignore[arg-type]
                          for t in tensors))


_NO_HELD_OUT = ("interference_aware: cap_reference='held_out' needs a problem with `held_out` "
                "instances (`held_out_data=` of mtunlearn_ext.unlearn / build_problem, "
                "`held_out=` of UnlearningProblem), or use 'auto' / 'retain'")


@register_unlearner
class InterferenceAware(GradientUnlearner):
    """Task-aware gradient projection + instance-level orthogonalization (see the module doc)."""

    name = "interference_aware"
    config_class = InterferenceAwareConfig
    default_forget_objective: ClassVar[str | None] = DEFAULT_OBJECTIVE
    config: InterferenceAwareConfig

    # -- set-up ---------------------------------------------------------------------------------

    def check_problem(self, problem: UnlearningProblem) -> None:
        """Also: ``cap_reference='held_out'`` needs held-out instances when caps are measured
        (``cap_quantile`` set) and a target task's objective is capped."""
        super().check_problem(problem)
        cfg = self.config
        if (cfg.cap_reference != "held_out" or cfg.cap_quantile is None
                or problem.held_out is not None):
            return
        names = objective_names(problem.target_specs(), problem.task_names,
                                self._objective_choice())
        if any(issubclass(FORGET_OBJECTIVES[name], CappedAscentObjective)
               for name in names.values()):
            raise ValueError(_NO_HELD_OUT)

    def setup(self, ctx: StepContext, report: UnlearningReport) -> None:
        cfg = self.config
        problem = ctx.problem
        shared_names = [n for n, _ in ctx.groups.shared]
        if not shared_names:
            frozen = any(not p.requires_grad for p in ctx.model.parameters())
            raise ValueError(
                f"{self.name}: the model has no trainable shared parameter"
                + (" (its frozen parameters are no method's to change: a frozen trunk, as in a "
                   "linear probe, couples no task)" if frozen else "")
                + "; nothing couples the tasks, which is what this method protects: use a "
                "per-task method such as 'neggrad_plus' or 'finetune'")
        plan = protection_plan(problem, cfg.protect)
        protect = protected_tasks(problem, cfg.protect)
        coupled = coupled_retain_set(problem) if cfg.coupled else None
        if cfg.coupled and not problem.is_full and coupled is None:
            warn_at_caller(
                "interference_aware: coupled=True, but the retain set holds no retained pair of "
                "the forget instances (no retain row has a forget instance's id), so none is "
                "protected explicitly: their other tasks' pairs are unlabelled or were removed "
                "by earlier requests, or the data do not link them (tuple `forget_data` rows "
                "are linked to `retain_data` rows with equal inputs only; give `train_data` and "
                "a ForgetRequest, or MultiTaskDatasets with shared ids, to link them)")
        if cfg.instance_rows == "instance_task" and self._uses_instance_constraints():
            num_tasks = len(problem.task_names)
            # The rows a step's batches can give: num_per_sample 40 of retain batches of 12
            # rows takes 12, and counting 40 refused runs that fit the solver.
            per_step = self._rows_per_step(problem, coupled)
            rows = (cfg.instance_memory + 1) * per_step
            if rows > MAX_SOLVER_K:
                raise ValueError(
                    f"interference_aware: `instance_rows='instance_task'` with {num_tasks} "
                    f"tasks keeps (instance_memory + 1) * {per_step // num_tasks} rows per step "
                    f"* {num_tasks} = {rows} "
                    f"constraints, over the solver's {MAX_SOLVER_K}; lower `instance_memory`, "
                    "`num_per_sample` or `num_coupled_per_sample`")
        coupled_tasks = [t for t in problem.non_target_tasks]
        # One subspace per distinct protected set (one in every mode but "others"). The copies
        # are sized and checked before any is made: the snapshots, the largest, would otherwise
        # take the memory first (a 25M-parameter model's plan over the machine's RAM ended in
        # the kernel's out-of-memory kill, not in the refusal).
        protected_sets = ([tasks for tasks in dict.fromkeys(plan.values()) if tasks]
                          if cfg.task_projection else [])
        if cfg.task_projection and not protected_sets:
            # The projection was on and did nothing: the run was the no-task-projection
            # ablation, and only the report's empty `protected_tasks` said so.
            warn_at_caller(
                f"interference_aware: protect={cfg.protect!r} protects no task in this "
                f"{'full' if problem.is_full else 'partial'} request (tasks "
                f"{list(problem.task_names)}, targets {list(problem.target_tasks)}), so the "
                "task-aware projection does nothing in this run; protect='auto' or 'all' "
                "protects every task of a full request")
        memory_plan = self.gradient_memory_plan(ctx, len(protected_sets), coupled)
        _check_fits(memory_plan, torch.device(problem.device))
        layer_ids = layer_ids_of(shared_names)
        subspaces = {tasks: ProtectedSubspace(ctx.groups.shared_params, layer_ids,
                                              cfg.num_snapshots, cfg.ridge)
                     for tasks in protected_sets}
        ctx.state.update({
            "protect": protect,
            "protect_plan": plan,
            "subspaces": subspaces,
            "coupled_stream": None if coupled is None else BatchStream(
                coupled, cfg.forget_batch_size, child_generator(ctx.generator), problem.device),
            "coupled_tasks": coupled_tasks,
            "instance_memory": PerSampleMemory(cfg.instance_memory, track_gram=True),
        })
        caps, cap_source, forget_losses = (self._calibrate_caps(ctx)
                                           if cfg.cap_quantile is not None else ({}, None, None))
        self._check_caps(ctx, cap_source)
        at_cap = self._forget_pairs_at_cap(ctx, forget_losses)
        self._warn_of_pairs_at_cap(ctx, at_cap, caps, cap_source)
        # What the run protects, as it runs: the task-level fields describe the protected
        # subspaces (none without the task projection), and the coupled instances count where
        # a component reads their retained pairs: the task projection's snapshots (of the
        # non-target tasks, into the subspaces) or the instance constraints' rows
        # (`num_coupled_per_sample` of them per step).
        coupled_used = coupled is not None and (
            (bool(subspaces) and bool(coupled_tasks))
            or (self._uses_instance_constraints() and cfg.num_coupled_per_sample > 0))
        report.extra["interference_aware"] = {
            "forget_caps": caps,
            "forget_caps_from": cap_source,
            "forget_pairs_at_cap": at_cap,
            "protected_tasks": protect if cfg.task_projection else [],
            "protected_by_target": ({t: list(tasks) for t, tasks in plan.items()}
                                    if cfg.task_projection else {}),
            "coupled_instances": len(coupled) if coupled_used and coupled is not None else 0,
            "shared_layers": next(iter(subspaces.values())).num_layers if subspaces else 0,
            "shared_numel": sum(p.numel() for p in ctx.groups.shared_params),
            "gradient_memory_bytes": memory_plan,
        }

    def _rows_per_step(self, problem: UnlearningProblem,
                       coupled: MultiTaskDataset | None) -> int:
        """The most instance constraint rows one step adds: its per-sample instances, each
        count cut to the rows its batch can have (the first ``num_per_sample`` of a retain
        batch of at most ``retain_batch_size`` rows of the retain set; in a partial request,
        the first ``num_coupled_per_sample`` of a batch of at most ``forget_batch_size``
        ``coupled`` rows), times the tasks with ``instance_rows="instance_task"``."""
        cfg = self.config
        instances = min(cfg.num_per_sample, cfg.retain_batch_size, len(problem.retain))
        if coupled is not None:
            instances += min(cfg.num_coupled_per_sample, cfg.forget_batch_size, len(coupled))
        return instances * (len(problem.task_names) if cfg.instance_rows == "instance_task"
                            else 1)

    def gradient_memory_plan(self, ctx: StepContext, num_subspaces: int,
                             coupled: MultiTaskDataset | None) -> dict[str, int]:
        """Bytes of gradient copies the method holds at once, by what holds them: the protected
        subspaces' snapshots (``num_snapshots`` per subspace, over the shared parameters), the
        instance memory's rows (``(instance_memory + 1)`` steps of per-sample rows over the
        shared and target-head parameters; none without a memory, whose constraints are views
        of the pass's rows) and one step's per-sample pass (its rows over every parameter).
        A step's rows are those its batches can give (``coupled``: the coupled retain rows of
        a partial request), not more. Activations of the ``vmap`` pass come on top (bounded by
        ``chunk_size``)."""
        cfg = self.config
        groups = ctx.groups

        def nbytes(params: Sequence[torch.Tensor]) -> int:
            return sum(p.numel() * p.element_size() for p in params)

        plan = {"snapshots": 0, "instance_memory": 0, "per_sample_pass": 0}
        if cfg.task_projection:
            plan["snapshots"] = num_subspaces * cfg.num_snapshots * nbytes(groups.shared_params)
        if self._uses_instance_constraints():
            # num_per_sample 64 of retain batches of 8 rows take 8: counting 64 overstated
            # the copies 8 times and refused a run that fit.
            per_step = self._rows_per_step(ctx.problem, coupled)
            constrained = groups.shared_params + [p for t in ctx.problem.target_tasks
                                                  for p in groups.head_params(t)]
            # With no memory the constraints are views of the pass's rows (no copy).
            plan["instance_memory"] = ((cfg.instance_memory + 1) * per_step
                                       * nbytes(constrained) if cfg.instance_memory else 0)
            plan["per_sample_pass"] = per_step * nbytes(groups.all_params)
        plan["total"] = sum(plan.values())
        return plan

    @torch.no_grad()
    def _calibrate_caps(self, ctx: StepContext
                        ) -> tuple[dict[str, float], str | None, ForgetLosses | None]:
        """Set each capped objective's cap to the ``cap_quantile`` of the (original)
        model's per-sample losses of its task on the ``cap_reference`` set (with ``"rank"``:
        one cap per forget pair, see the config); returns the caps (their mean for
        rank-matched caps), the set's name, and the forget pairs' losses and ids where
        rank-matching measured them (else ``None``).

        The losses of task ``t`` are those of the set's first ``cap_rows`` rows *supervised for
        t*, in the set's order (:func:`_cap_reference_rows`): in a partial request the retain
        set holds the forget instances without their target-task labels, and wherever they sit
        they take none of ``t``'s rows. One forward pass per batch of the union of the tasks'
        rows serves every task; only a task's own rows count for its quantile. Where the first
        ``cap_rows`` rows all supervise every capped task, the rows and batches are those of
        the set's first ``cap_rows`` rows.

        A task the set has no pair of keeps the objective's own cap (with a warning); one whose
        objective has no cap of its own either is refused (:meth:`_check_caps`)."""
        cfg = self.config
        assert cfg.cap_quantile is not None
        capped = {t: o for t, o in ctx.objectives.items() if isinstance(o, CappedAscentObjective)}
        if not capped:
            return {}, None, None
        problem = ctx.problem
        source = cfg.cap_reference
        if source == "auto":
            source = "held_out" if problem.held_out is not None else "retain"
        reference = problem.held_out if source == "held_out" else problem.retain
        if reference is None:
            raise ValueError(_NO_HELD_OUT)
        # Each cap is measured in its own objective's loss, which is what the ascent raises.
        loss_fns = {task: objective.loss for task, objective in capped.items()}
        rows, selected = _cap_reference_rows(reference, list(capped), cfg.cap_rows)
        losses, _ = self._original_losses(ctx, reference, loss_fns, rows, selected,
                                          split=int((rows < cfg.cap_rows).sum()))
        rank_matched = cfg.cap_quantile == RANK_MATCHED_CAPS
        if rank_matched:
            forget_losses, forget_ids = self._original_losses(
                ctx, problem.forget, loss_fns, torch.arange(len(problem.forget)))
        _refuse_non_finite_losses(losses, f"the {source} set", cfg.cap_reference)
        if rank_matched:
            _refuse_non_finite_losses(forget_losses, "the forget set", cfg.cap_reference)
        caps: dict[str, float] = {}
        for task, objective in capped.items():
            values = losses[task]
            if values.numel() == 0:
                if objective.cap_missing is None:  # else refused by _check_caps
                    if source == "retain":
                        why = " (the request removes the task from every instance labelled for it)"
                        fix = (f"pass held-out data labelled for {task!r} with "
                               "cap_reference='held_out'")
                    else:
                        why = ""
                        fix = f"label some of its {task!r} pairs, or use cap_reference='retain'"
                    warn_at_caller(
                        f"interference_aware: the {source} set has no supervised pair of task "
                        f"{task!r}{why}, so its forget cap stays the objective's own "
                        f"({objective.cap:.4g}) instead of the {source} losses' "
                        f"{cfg.cap_quantile!r} level; {fix}")
                continue
            if not rank_matched:
                assert isinstance(cfg.cap_quantile, (int, float))
                objective.cap = float(torch.quantile(values, float(cfg.cap_quantile)))
                caps[task] = objective.cap
                continue
            own = forget_losses[task]
            if own.numel() == 0:
                continue
            ranks = torch.empty(own.numel(), dtype=torch.float64)
            ranks[torch.argsort(own, stable=True)] = torch.arange(own.numel(),
                                                                  dtype=torch.float64)
            levels = (ranks + 0.5) / own.numel()
            pair_caps = torch.quantile(values.double(), levels)
            objective.set_pair_caps(forget_ids[task], pair_caps)
            if objective.cap_missing is not None:
                # Every forget pair has its own cap; a row without one (a row that does not
                # supervise the task, masked out of the objective) needs some finite value.
                objective.cap = float(pair_caps.max())
            caps[task] = float(pair_caps.mean())
        return caps, source, (forget_losses, forget_ids) if rank_matched else None

    @torch.no_grad()
    def _forget_pairs_at_cap(self, ctx: StepContext, measured: ForgetLosses | None
                             ) -> dict[str, list[int]]:
        """For each target task whose capped objective has a cap: ``[forget pairs whose
        original loss is already at or above their cap, forget pairs]``. Such a pair gives the
        capped ascent no gradient from the first step.

        ``measured``: the forget losses the calibration took (rank-matched caps). Otherwise
        one pass over the forget set measures them, in the steps' mode, with the generators
        given back after it: a dropout draw here would move every later step's draws, and the
        run's result with them."""
        capped = {t: o for t, o in ctx.objectives.items()
                  if isinstance(o, CappedAscentObjective) and o.cap_missing is None}
        forget = ctx.problem.forget
        if not capped or len(forget) == 0:
            return {}
        if measured is None:
            loss_fns = {task: objective.loss for task, objective in capped.items()}
            with forked_generators(ctx.problem.device):
                measured = self._original_losses(ctx, forget, loss_fns,
                                                 torch.arange(len(forget)))
        losses, ids = measured
        counts: dict[str, list[int]] = {}
        for task, objective in capped.items():
            own = losses.get(task)
            if own is None or own.numel() == 0:
                continue
            caps = objective.caps_for(ids[task], like=own)
            counts[task] = [int((own >= caps).sum()), own.numel()]
        return counts

    def _warn_of_pairs_at_cap(self, ctx: StepContext, at_cap: Mapping[str, list[int]],
                              caps: Mapping[str, float], cap_source: str | None) -> None:
        """Warn of each task whose forget pairs start (nearly) all at or above their caps:
        its forget objective has (next to) nothing to raise, and the run is a retain-only
        fine-tune for it."""
        cfg = self.config
        for task, (at, total) in at_cap.items():
            if at < _AT_CAP_WARN_SHARE * total:
                continue
            rank_matched = cfg.cap_quantile == RANK_MATCHED_CAPS and task in caps
            if rank_matched:
                level = f"their own rank-matched caps (mean {caps[task]:.4g})"
            else:
                objective = ctx.objectives[task]
                assert isinstance(objective, CappedAscentObjective)
                level = f"the task's forget cap {objective.cap:.4g}"
            where = (f" (the {cfg.cap_quantile!r} quantile of the {cap_source} set's losses)"
                     if task in caps and not rank_matched else
                     " (the objective's own)" if not rank_matched else "")
            warn_at_caller(
                f"interference_aware: {at} of the {total} forget pairs of task {task!r} start "
                f"at or above {level}{where}, so its capped forget objective has "
                f"{'nothing' if at == total else 'next to nothing'} to raise and the run only "
                f"repairs the retained tasks for it. The model may never have fit these pairs "
                f"(there is little to forget: compare with a model retrained without them), "
                f"or the caps are low: a higher `cap_quantile`, or caps from unseen data "
                f"(cap_reference='held_out' with held-out data)")

    def _check_caps(self, ctx: StepContext, cap_source: str | None) -> None:
        """Refuse, before the first step, a capped objective left without a cap: its own cap
        needs the retain set's pairs of its task (none there), and no calibrated cap replaced
        it (``cap_quantile=None``, or the ``cap_reference`` set has no pair of the task)."""
        cfg = self.config
        for task, objective in ctx.objectives.items():
            if not isinstance(objective, CappedAscentObjective):
                continue
            missing = objective.cap_missing
            forget = ctx.problem.forget
            if missing is None or not bool(forget.supervision[:, forget.task_index(task)].any()):
                continue  # (without a forget pair of the task the objective never runs)
            if cfg.cap_quantile is None:
                why = "and `cap_quantile=None` calibrates none in its place"
            else:
                why = (f"the {cap_source} set that `cap_reference={cfg.cap_reference!r}` "
                       f"calibrates the caps on has no supervised pair of {task!r} either")
            raise ValueError(
                f"interference_aware: {missing}; {why}. Calibrate the cap on held-out data "
                f"labelled for {task!r} (`held_out_data`, with cap_reference='held_out' or "
                f"'auto' and a `cap_quantile`), or choose an objective that needs no retain "
                f"pair: {needs_no_retain_pair(objective.spec)}")

    @staticmethod
    def _original_losses(ctx: StepContext, data: MultiTaskDataset,
                         loss_fns: Mapping[str, Callable[[torch.Tensor, torch.Tensor],
                                                         torch.Tensor]],
                         rows: torch.Tensor,
                         selected: Mapping[str, torch.Tensor] | None = None,
                         split: int | None = None,
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The model's per-sample losses (task -> ``loss_fns[task](pred, target)``) on the
        supervised pairs of ``data``'s ``rows`` (float32, CPU), and those pairs' instance ids.

        ``selected`` (task -> ``[len(rows)]`` bool) restricts each task to its own rows of
        ``rows``. Batches of 64 rows; with ``split``, no batch straddles position ``split`` of
        ``rows`` (the rows before it are batched as they would be alone)."""
        tasks = list(loss_fns)
        losses: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        ids: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
        total = rows.numel()
        split = total if split is None else min(max(split, 0), total)
        bounds = [(start, min(start + 64, split)) for start in range(0, split, 64)]
        bounds += [(start, min(start + 64, total)) for start in range(split, total, 64)]
        # In the steps' mode (with train_mode, batch statistics, as the steps' losses), but
        # writing nothing: a training-mode forward would take these rows, the forget ones among
        # them, into BatchNorm's running statistics before any step.
        with BuffersKept(ctx.model):
            for start, stop in bounds:
                batch = batch_to(data.batch(rows[start:stop]), ctx.problem.device)
                out = ctx.forward(batch)
                supervision = batch["supervision"]
                batch_ids = batch["id"]
                assert isinstance(supervision, torch.Tensor) and isinstance(batch_ids,
                                                                            torch.Tensor)
                for task in tasks:
                    mask = supervision[:, data.task_index(task)]
                    if selected is not None:
                        mask = mask & selected[task][start:stop].to(mask.device)
                    values = loss_fns[task](out[task],
                                            batch["targets"][task])  # type: ignore[index]
                    losses[task].append(values[mask].float().cpu())
                    ids[task].append(batch_ids[mask].cpu())
        return ({t: torch.cat(v) if v else torch.zeros(0) for t, v in losses.items()},
                {t: torch.cat(v) if v else torch.zeros(0, dtype=torch.long)
                 for t, v in ids.items()})

    # -- building blocks (also used by the interference diagnostics) --------------------------------

    @staticmethod
    def forget_task_grads(ctx: StepContext, terms_objective: Mapping[str, torch.Tensor]
                          ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """``f_t`` for every target task present: (task -> grads over ``theta_s``, task -> grads
        over ``theta_t``), one backward per task through the shared forward graph."""
        return _per_task_grads(ctx, terms_objective, list(terms_objective))

    @staticmethod
    def retain_task_grads(ctx: StepContext, losses: Mapping[str, torch.Tensor],
                          tasks: Sequence[str] | None = None
                          ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """Per-task retain gradients (task -> grads over ``theta_s``, task -> over ``theta_t``)
        for ``tasks`` (default: all) whose loss reaches the parameters."""
        names = [t for t in (tasks if tasks is not None else list(losses))
                 if t in losses and losses[t].requires_grad]
        return _per_task_grads(ctx, losses, names)

    def refresh(self, ctx: StepContext, retain_batch: Batch
                ) -> tuple[RetainTerms, list[torch.Tensor], dict[str, list[torch.Tensor]], int]:
        """A refresh step: the retain batch is cut into ``snapshot_groups`` groups; each group
        pushes one snapshot per protected task into the protected subspace (a gradient of that
        task's loss on the group, against model-sampled targets by default, see
        ``snapshot_targets``), and, in a partial request, a batch of the forget instances'
        retained pairs does the same for the non-target tasks.

        Returns the batch's retain terms (detached, for the curves), the batch's (labelled)
        retain gradient on ``theta_s`` and on each head, and the number of snapshots pushed. The
        group terms are weighted by ``n_gt / n_t`` (supervised pairs of task ``t`` in group
        ``g`` over the batch's), so the descent direction is exactly the whole batch's.
        """
        cfg = self.config
        subspaces: dict[tuple[str, ...], ProtectedSubspace] = ctx.state["subspaces"]
        groups = ctx.groups
        names = ctx.problem.task_names
        supervision = retain_batch["supervision"]
        assert isinstance(supervision, torch.Tensor)
        totals = supervision.sum(dim=0)
        shared = groups.shared_params
        retain_shared = [torch.zeros_like(p) for p in shared]
        retain_heads = {t: [torch.zeros_like(p) for p in groups.head_params(t)]
                        for t in groups.heads}
        losses: dict[str, torch.Tensor] = {t: torch.zeros(()) for t in names}
        pushed = 0
        for group in _split_rows(retain_batch, cfg.snapshot_groups):
            group_supervision = group["supervision"]
            assert isinstance(group_supervision, torch.Tensor)
            counts = group_supervision.sum(dim=0)
            out = ctx.forward(group)
            terms = retain_terms(out, group, ctx.problem.tasks)
            if subspaces:
                for task, grads in self._snapshot_grads(ctx, out, group, ctx.state["protect"],
                                                        terms):
                    _push(subspaces, task, grads)
                    del grads  # stored: let it go before the next task's is computed
                    pushed += 1
            weighted: torch.Tensor | None = None
            for c, t in enumerate(names):
                weight = float(counts[c]) / max(float(totals[c]), 1.0)
                losses[t] = losses[t] + weight * terms.loss[t].detach().cpu()
                if cfg.retain_task_weights is not None:
                    weight *= self.retain_task_weight(t)
                if weight > 0 and terms.loss[t].requires_grad:
                    term = weight * terms.loss[t]
                    weighted = term if weighted is None else weighted + term
            if weighted is None:
                continue
            grads_shared, grads_heads = groups.split(grads_of(weighted, groups.all_params))
            torch._foreach_add_(retain_shared, grads_shared)
            for t, head in grads_heads.items():
                if head:  # a head without trainable parameters (frozen) has nothing to add
                    torch._foreach_add_(retain_heads[t], head)
        stream: BatchStream | None = ctx.state.get("coupled_stream")
        if subspaces and stream is not None and self._snapshots_draw_coupled_rows(ctx):
            for group in _split_rows(stream.next(), cfg.snapshot_groups):
                out = ctx.forward(group)
                terms = retain_terms(out, group, ctx.problem.tasks)
                for task, grads in self._snapshot_grads(ctx, out, group,
                                                        ctx.state["coupled_tasks"], terms):
                    _push(subspaces, task, grads)
                    del grads
                    pushed += 1
        return RetainTerms(losses), retain_shared, retain_heads, pushed

    def _snapshot_grads(self, ctx: StepContext, out: Mapping[str, torch.Tensor], batch: Batch,
                        tasks: Sequence[str], terms: RetainTerms
                        ) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(task, gradient on ``theta_s``) for each task of ``tasks`` supervised in ``batch``:
        of the loss against model-sampled targets (``snapshot_targets="sampled"``) or of the
        labelled retain loss (``"labels"``). The forward graph is kept for the caller. One at
        a time, as the caller pushes them: a list held a copy of the trunk per protected task
        at once, the refresh step's peak."""
        supervision = batch["supervision"]
        targets = batch["targets"]
        assert isinstance(supervision, torch.Tensor) and isinstance(targets, Mapping)
        shared = ctx.groups.shared_params
        for t in tasks:
            rows = supervision[:, ctx.problem.task_names.index(t)]
            if self.config.snapshot_targets == "sampled":
                loss = sampled_target_loss(ctx.problem.spec(t), out[t], targets[t], rows,
                                           ctx.generator)
            else:
                loss = terms.loss[t] if bool(rows.any()) else None
            if loss is None or not loss.requires_grad:
                continue
            yield t, grads_of(loss, shared, retain_graph=True)

    def task_project(self, ctx: StepContext, f_shared: Mapping[str, list[torch.Tensor]]
                     ) -> list[torch.Tensor]:
        """Stacks ``[m, *shape_p]`` of ``m`` shared forget gradients, each projected off the
        per-layer protected subspace of its key's target task (unchanged when the projection is
        off). A key that is not a target task (a sum over targets) needs every target to share
        one subspace."""
        keys = list(f_shared)
        # Contiguous: the projection writes them in place (a channels_last or transposed
        # parameter's gradients stack into strided ones).
        stacks = [torch.stack([f_shared[k][p] for k in keys]).contiguous()
                  for p in range(len(ctx.groups.shared_params))]
        return self._project_stacks(ctx, keys, stacks)

    @staticmethod
    def _project_stacks(ctx: StepContext, keys: Sequence[str], stacks: list[torch.Tensor]
                        ) -> list[torch.Tensor]:
        """:meth:`task_project` on stacks already made (row ``i`` of each: key ``keys[i]``),
        projected in place."""
        subspaces: dict[tuple[str, ...], ProtectedSubspace] = ctx.state["subspaces"]
        plan: dict[str, tuple[str, ...]] = ctx.state["protect_plan"]
        if not subspaces:
            return stacks
        shared_sets = set(plan.values())
        rows_of: dict[tuple[str, ...], list[int]] = {}
        for row, key in enumerate(keys):
            if key in plan:
                tasks = plan[key]
            elif len(shared_sets) == 1:
                tasks = next(iter(shared_sets))
            else:
                raise ValueError(f"task_project: {key!r} is not a target task, and the target "
                                 f"tasks have different protected subspaces")
            rows_of.setdefault(tasks, []).append(row)
        for tasks, rows in rows_of.items():
            subspace = subspaces.get(tasks)
            if subspace is None or subspace.filled == 0:
                continue
            if len(rows) == len(keys):
                return subspace.project(stacks, outs=stacks)
            index = torch.tensor(rows, device=stacks[0].device)
            part = [s.index_select(0, index) for s in stacks]
            part = subspace.project(part, outs=part)
            for s, q in zip(stacks, part):
                s.index_copy_(0, index, q)
        return stacks

    def instance_batch(self, ctx: StepContext, retain_batch: Batch) -> Batch:
        """The instances whose per-sample gradients constrain the forget step."""
        cfg = self.config
        batch = batch_rows(retain_batch, 0, cfg.num_per_sample)
        stream: BatchStream | None = ctx.state.get("coupled_stream")
        if stream is not None and self._instances_draw_coupled_rows(ctx):
            batch = _concat_batches(
                batch, batch_rows(stream.next(), 0, cfg.num_coupled_per_sample))
        return batch

    @staticmethod
    def instance_task_scale(retain_batch: Batch,
                            task_weights: Sequence[float] | None = None) -> list[float]:
        """``s_t = w_t B / n_t`` for every task (``w_t``: ``task_weights``, the run's
        ``retain_task_weights`` in task order, 1 when not given; ``n_t``: the retain batch's
        supervised pairs of ``t``, ``B`` its rows; ``B / n_t`` is 1 for a task it never
        supervises). Each instance constraint is the gradient of that instance's term of the
        retain objective ``sum_t w_t mean_i l_t(i)``,
        ``r_i = d/d theta sum_t s_t m_it l_t(i)``, so that the mean of a whole batch's rows is
        the batch's retain gradient (a partial request's retain batch holds forget instances
        without their target-task labels, so ``n_t`` differs between tasks).

        A task the batch never supervises has no term in its rows, so its factor only weighs
        the coupled rows (the forget instances' retained pairs, drawn apart): 1, the value of a
        fully supervised batch, keeps their constraint (0 erased it for that step)."""
        supervision = retain_batch["supervision"]
        assert isinstance(supervision, torch.Tensor)
        rows = supervision.shape[0]
        scale = [rows / n if n else 1.0 for n in supervision.sum(dim=0).tolist()]
        if task_weights is None:
            return scale
        return [s * w for s, w in zip(scale, task_weights)]

    def retain_scale(self, ctx: StepContext, retain_batch: Batch) -> list[float]:
        """:meth:`instance_task_scale` with the run's ``retain_task_weights``."""
        weights = (None if self.config.retain_task_weights is None else
                   [self.retain_task_weight(t) for t in ctx.problem.task_names])
        return self.instance_task_scale(retain_batch, weights)

    def instance_project(self, ctx: StepContext, step_dir: list[torch.Tensor],
                         param_names: Sequence[str], batch: Batch,
                         per_sample: list[torch.Tensor] | None = None,
                         memory: PerSampleMemory | None = None,
                         task_scale: Sequence[float] | None = None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Make the forget step direction ``u`` (one tensor per parameter of ``param_names``)
        orthogonal to / non-conflicting with the per-sample retain gradients of ``batch``
        (computed here unless given: one ``[B, *shape]`` stack per name, of each row's loss
        with task ``t`` scaled by ``task_scale[t]``, see :meth:`instance_task_scale`), and
        with the rows ``memory`` keeps from earlier steps (this step's rows are added to it).

        With ``head_lr_scale != 1`` the rows' head parts are scaled by it, so that the step
        the optimizer takes (the heads' part of ``d`` times ``head_lr_scale``) is the one that
        keeps the constraints.

        Returns (the projected direction ``d``, this batch's constraint rows ``[B, *shape]``).
        ``step_dir`` is left as it was (the step counts its conflicts after).
        """
        cfg = self.config
        if per_sample is None:
            per_sample, _, _ = self.per_sample_rows(ctx, batch, param_names, task_scale)
        if cfg.head_lr_scale != 1.0:
            # The optimizer moves the heads by head_lr_scale times their part of the direction
            # (a diagonal D), so the step is D d: <D d, r_j> = <d, D r_j>, and the constraint
            # rows take the same scaling of their head parts.
            shared = {name for name, _ in ctx.groups.shared}
            per_sample = [rows if name in shared else rows * cfg.head_lr_scale
                          for name, rows in zip(param_names, per_sample)]
        constraints = per_sample if memory is None else memory.add(param_names, per_sample)
        kept = (memory.gram() if memory is not None and memory.track_gram and memory.filled
                else None)
        u = [g.unsqueeze(0) for g in step_dir]
        if cfg.instance_projection == "orthogonal":
            out = project_out_list(u, constraints, cfg.ridge, basis_gram=kept)
        else:
            out = project_nonconflicting_list(u, constraints, sign=-1, basis_gram=kept)
        assert isinstance(out, list)
        return [o[0] for o in out], per_sample

    def per_sample_rows(self, ctx: StepContext, batch: Batch, param_names: Sequence[str],
                        task_scale: Sequence[float] | None
                        ) -> tuple[list[torch.Tensor], int, dict[str, torch.Tensor]]:
        """One ``vmap`` pass over ``batch``: (the instance constraint rows, one stack per name:
        ``[B, *shape]``, each instance's task-scaled retain gradient, for
        ``instance_rows="instance"``, or ``[B * T, *shape]``, instance-major, one row per
        (instance, task), for ``"instance_task"``; the rows per instance, 1 or ``T``, so that
        the first ``k`` instances' rows are the first ``k`` times that many and sum to their
        retain gradients; each task's per-sample loss)."""
        cfg = self.config
        if cfg.instance_rows == "instance":
            rows, losses = per_sample_retain_grads_and_losses(
                ctx.model, batch, ctx.problem.tasks, param_names, cfg.chunk_size,
                task_scale=task_scale)
            return rows, 1, losses
        per_task, losses = per_sample_task_grads_and_losses(
            ctx.model, batch, ctx.problem.tasks, param_names, cfg.chunk_size,
            task_scale=task_scale)
        return [g.flatten(0, 1) for g in per_task], len(ctx.problem.tasks), losses

    @staticmethod
    def _snapshots_draw_coupled_rows(ctx: StepContext) -> bool:
        """A refresh of the full method pushes snapshots of the forget instances' retained
        pairs: the request has such pairs, tasks they supervise, and a protected subspace."""
        plan: dict[str, tuple[str, ...]] = ctx.state["protect_plan"]
        return (ctx.state.get("coupled_stream") is not None and bool(ctx.state["coupled_tasks"])
                and any(plan.values()))

    def _instances_draw_coupled_rows(self, ctx: StepContext) -> bool:
        """A step of the full method adds forget instances' retained pairs to its instance
        constraints."""
        cfg = self.config
        return (ctx.state.get("coupled_stream") is not None and cfg.alpha > 0
                and cfg.num_coupled_per_sample > 0)

    def _skip_coupled_rows(self, ctx: StepContext, *, snapshots: bool) -> None:
        """Both components draw the forget instances' retained rows from one stream (a
        refresh's snapshots first, then the instance constraints). A component switched off by
        its ablation still moves the stream on where the full method would have drawn (the
        same predicates decide both), so that the other component sees the rows it sees in
        the full method: an ablation changes its own component only."""
        stream: BatchStream | None = ctx.state.get("coupled_stream")
        draws = (self._snapshots_draw_coupled_rows(ctx) if snapshots
                 else self._instances_draw_coupled_rows(ctx))
        if stream is not None and draws:
            stream.skip()

    def _uses_instance_constraints(self) -> bool:
        """The step projects against per-sample retain gradients (whose pass, outside refresh
        steps, also supplies part of the retain gradient)."""
        return self.config.alpha > 0 and self.config.instance_projection != "off"

    def _retain_with_per_sample(self, ctx: StepContext, retain_batch: Batch,
                                instance_rows: Batch
                                ) -> tuple[list[torch.Tensor], RetainTerms, list[torch.Tensor]]:
        """The step's per-sample pass, shared with the retain descent term.

        ``instance_rows`` are the retain batch's first ``k = min(num_per_sample, B)`` rows, then
        any coupled rows (:meth:`instance_batch`). One ``vmap`` pass over them, over every
        parameter, gives their per-sample gradients ``r_i`` (task-scaled, see
        :meth:`instance_task_scale`) and losses; ``sum_{i<k} r_i / B`` is the first ``k``
        rows' share of the retain gradient, and a batched forward and backward over the other
        ``B - k`` rows (none when the constraints cover the batch) adds the rest, their tasks
        weighted ``1 / n_t`` as in the whole batch's objective. The first ``k`` rows are thus
        differentiated once instead of twice.

        Returns (the instance constraint rows (:meth:`per_sample_rows`), one stack per
        parameter of ``groups.all_names``; the batch's retain terms (detached; each task's mean
        loss over its supervised rows); the batch's retain gradient, one tensor per parameter)."""
        groups = ctx.groups
        tasks = ctx.problem.task_names
        supervision = retain_batch["supervision"]
        assert isinstance(supervision, torch.Tensor)
        rows = supervision.shape[0]
        counts = supervision.sum(dim=0).tolist()
        k = min(self.config.num_per_sample, rows)
        per_sample, per_instance, losses = self.per_sample_rows(
            ctx, instance_rows, groups.all_names, self.retain_scale(ctx, retain_batch))
        retain = [g[:k * per_instance].sum(dim=0) / rows for g in per_sample]
        sums = {t: losses[t][:k].sum() for t in tasks}
        if k < rows:
            rest = batch_rows(retain_batch, k, rows)
            rest_terms = self.retain_step_terms(ctx, rest)
            rest_supervision = rest["supervision"]
            assert isinstance(rest_supervision, torch.Tensor)
            rest_counts = rest_supervision.sum(dim=0).tolist()
            total: torch.Tensor | None = None
            for t, n, m in zip(tasks, counts, rest_counts):
                if not n or not m:
                    continue
                sums[t] = sums[t] + rest_terms.loss[t].detach() * m
                share = m / n
                if self.config.retain_task_weights is not None:
                    share *= self.retain_task_weight(t)
                term = rest_terms.loss[t] * share
                total = term if total is None else total + term
            if total is not None and total.requires_grad:
                torch._foreach_add_(retain, grads_of(total, groups.all_params))
        terms = {t: sums[t] / n if n else sums[t] * 0.0 for t, n in zip(tasks, counts)}
        return per_sample, RetainTerms(terms), retain

    # -- the step ------------------------------------------------------------------------------

    def compute_update(self, ctx: StepContext, forget_batch: Batch | None,
                       retain_batch: Batch | None) -> StepStats:
        assert forget_batch is not None and retain_batch is not None
        cfg = self.config
        groups = ctx.groups
        shared = groups.shared_params
        stats = StepStats()

        # Retain: grouped per-task gradients at refresh steps (they feed the snapshots), else
        # one backward of the total (only the sum is needed for the descent term).
        refresh_step = ctx.step % cfg.refresh_every == 0
        refresh = cfg.task_projection and refresh_step
        # Zeros are made only where no gradient replaces them: made up front, they were one
        # more copy of the trunk alive through the per-sample pass (the step's peak).
        retain_shared: list[torch.Tensor] | None = None
        retain_heads: dict[str, list[torch.Tensor]] = {}
        # The instance constraints' rows are the first rows of the retain batch: outside
        # refresh steps their per-sample pass also gives those rows' share of the retain
        # gradient, and only the remaining rows take a batched forward and backward.
        per_sample_all: list[torch.Tensor] | None = None
        if refresh:
            stats.retain, retain_shared, retain_heads, pushed = self.refresh(ctx, retain_batch)
            stats.extra["snapshots_pushed"] = float(pushed)
        elif refresh_step:
            self._skip_coupled_rows(ctx, snapshots=True)
        instance_rows = (self.instance_batch(ctx, retain_batch)
                         if self._uses_instance_constraints() else None)
        if instance_rows is None:
            self._skip_coupled_rows(ctx, snapshots=False)
        if not refresh and instance_rows is not None:
            per_sample_all, stats.retain, retain_all = self._retain_with_per_sample(
                ctx, retain_batch, instance_rows)
            retain_shared, retain_heads = groups.split(retain_all)
        elif not refresh:
            stats.retain = self.retain_step_terms(ctx, retain_batch)
            total = stats.retain.total()
            if total is not None and total.requires_grad:
                retain_shared, retain_heads = groups.split(grads_of(total, groups.all_params))
        if retain_shared is None:
            retain_shared = [torch.zeros_like(p) for p in shared]

        # Forget: the task-aware projection is linear and shares its subspaces across target
        # tasks, so projecting sum_t f_t equals summing the projected f_t: one backward of the
        # summed objective gives both sum_t f_t on theta_s and every f_t on its own head.
        stats.forget = self.forget_step_terms(ctx, forget_batch)
        targets = list(stats.forget.objective)
        forget_shared: list[torch.Tensor] | None = None
        forget_heads: dict[str, list[torch.Tensor]] = {}
        if targets and cfg.alpha > 0:
            plan = ctx.state["protect_plan"]
            if len({plan[t] for t in targets}) <= 1 or not ctx.state["subspaces"]:
                total_forget = stats.forget.total()
                assert total_forget is not None
                heads = [p for t in targets for p in groups.head_params(t)]
                forget_grads = grads_of(total_forget, shared + heads)
                raw, forget_heads = groups.split(forget_grads, targets)
                if ctx.state["subspaces"]:  # taken before the projection writes over `raw`
                    raw_norm = _norm(raw)
                # Keyed by a target present here: they all share its subspace (under
                # protect="others" absent targets may have their own). Projected where they
                # are when no two gradients share memory: a stacked copy was one more copy of
                # the trunk.
                if _own_memory(forget_grads):
                    projected = self._project_stacks(
                        ctx, [targets[0]], [g.unsqueeze(0) for g in raw])
                else:
                    projected = self.task_project(ctx, {targets[0]: raw})
                forget_shared = [s[0] for s in projected]
                del forget_grads
            else:
                # A subspace per target task: each f_t is projected off its own, then summed.
                per_task, forget_heads = self.forget_task_grads(ctx, stats.forget.objective)
                raw = [torch.stack([per_task[t][p] for t in per_task]).sum(0)
                       for p in range(len(shared))]
                if ctx.state["subspaces"]:
                    raw_norm = _norm(raw)
                projected = self.task_project(ctx, per_task)
                forget_shared = [s.sum(0) for s in projected]
            del raw, projected
            if ctx.state["subspaces"]:  # a curve only where a task projection runs
                stats.extra["task_kept_fraction"] = (
                    _norm(forget_shared) / raw_norm.clamp(min=1e-30))

            if cfg.instance_projection != "off":
                # Over the heads of every target task of the request, also those without a
                # pair in this forget batch (a zero forget direction there): the rows then
                # cover the same parameters at every step, so the instance memory keeps them
                # (it restarts when the parameters change), and a head the step moves through
                # the projection is one the constraints see.
                head_tasks = [t for t in ctx.problem.target_tasks if t in groups.heads]
                for t in head_tasks:
                    if t not in forget_heads:
                        forget_heads[t] = [torch.zeros_like(p) for p in groups.head_params(t)]
                names = [n for n, _ in groups.shared] + [n for t in head_tasks
                                                         for n, _ in groups.heads[t]]
                # The shared part negated in place (each is this step's own buffer, the
                # projection's output or a sum of it); a head's gradient may share memory with
                # another's, so those are copied.
                step_dir = [g.neg_() for g in forget_shared] + [-g for t in head_tasks
                                                                for g in forget_heads[t]]
                before = _norm(step_dir)
                assert instance_rows is not None
                given = None
                if per_sample_all is not None:
                    position = {n: i for i, n in enumerate(groups.all_names)}
                    given = [per_sample_all[position[n]] for n in names]
                memory: PerSampleMemory = ctx.state["instance_memory"]
                projected_dir, per_sample = self.instance_project(
                    ctx, step_dir, names, instance_rows, given, memory,
                    task_scale=self.retain_scale(ctx, retain_batch))
                stats.extra["instance_conflicts"] = float(self._conflicts(step_dir, per_sample))
                stats.extra["instance_constraints"] = float(
                    max(memory.filled, per_sample[0].shape[0]))
                stats.extra["instance_kept_fraction"] = (
                    _norm(projected_dir) / before.clamp(min=1e-30))
                del step_dir
                # In place: the projection's outputs are its own, and nothing reads them after.
                forget_shared, forget_heads = groups.split([d.neg_() for d in projected_dir],
                                                           head_tasks)
        if forget_shared is None:
            forget_shared = [torch.zeros_like(p) for p in shared]

        # Update: retain descent everywhere, alpha * projected forget on theta_s and S's heads.
        for p, r, f in zip(shared, retain_shared, forget_shared):
            p.grad = cfg.retain_weight * r + cfg.alpha * f
        for t in groups.heads:
            params = groups.head_params(t)
            r_list = retain_heads.get(t, [torch.zeros_like(p) for p in params])
            f_list = forget_heads.get(t)
            for i, p in enumerate(params):
                grad = cfg.retain_weight * r_list[i]
                if f_list is not None:
                    grad = grad + cfg.alpha * f_list[i]
                p.grad = grad
        return stats

    @staticmethod
    def _conflicts(step_dir: Sequence[torch.Tensor], per_sample: Sequence[torch.Tensor]) -> int:
        """How many retain samples the raw forget step would hurt to first order
        (``<u, r_j> > 0``), from one ``inner_list`` pass (no flat or float64 copies)."""
        inner = inner_list_stats([u.unsqueeze(0) for u in step_dir], per_sample)
        return int((inner > 0).sum())


# -- ablations, registered so that the experiment runner can run them beside the full method ----


@dataclass
class _NoTaskConfig(InterferenceAwareConfig):
    task_projection: bool = False

    def validate(self) -> None:
        super().validate()
        _check_ablated(self, task_projection=False)


@dataclass
class _NoInstanceConfig(InterferenceAwareConfig):
    instance_projection: InstanceProjection = "off"

    def validate(self) -> None:
        super().validate()
        _check_ablated(self, instance_projection="off")


@dataclass
class _NeitherConfig(InterferenceAwareConfig):
    task_projection: bool = False
    instance_projection: InstanceProjection = "off"

    def validate(self) -> None:
        super().validate()
        _check_ablated(self, task_projection=False, instance_projection="off")


def _check_ablated(config: InterferenceAwareConfig, **fixed: object) -> None:
    """An ablation's switched-off component cannot be switched back on by a setting."""
    for field_name, value in fixed.items():
        if getattr(config, field_name) != value:
            raise ValueError(f"{type(config).__name__}: this ablation fixes `{field_name}` to "
                             f"{value!r}; got {getattr(config, field_name)!r}")


@register_unlearner
class InterferenceAwareNoTask(InterferenceAware):
    """Ablation: no task-aware projection (instance-level orthogonalization only)."""

    name = "interference_aware_no_task"
    config_class = _NoTaskConfig


@register_unlearner
class InterferenceAwareNoInstance(InterferenceAware):
    """Ablation: no instance-level orthogonalization (task-aware projection only)."""

    name = "interference_aware_no_instance"
    config_class = _NoInstanceConfig


@register_unlearner
class InterferenceAwareNeither(InterferenceAware):
    """Ablation: neither projection (retain descent + ``alpha`` x raw forget gradient)."""

    name = "interference_aware_neither"
    config_class = _NeitherConfig
