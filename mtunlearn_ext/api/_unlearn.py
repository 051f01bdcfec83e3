"""``mtunlearn_ext.unlearn``: run a method on the problem :func:`build_problem` makes,
and report losses before and after, the optional membership-inference audit, and the chain of
removals the returned model carries."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

import torch
from torch import nn

from mtunlearn_ext._text import visible_controls
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.api._data_forms import as_dataset, read_in
from mtunlearn_ext.api._instance_matching import TrainedRows, check_unseen
from mtunlearn_ext.api._lineage import LINEAGE_ATTRIBUTE, Lineage, carried_lineage
from mtunlearn_ext.api._model_split import SplitModel, unwrapped
from mtunlearn_ext.api._problem import build_problem_with_naming
from mtunlearn_ext.api._types import (DataLike, InMemoryData, ParameterSpec, SharedSpec,
                                      TasksSpec)
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.inputs import inputs_to
from mtunlearn_ext.data.request import ForgetRequest
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.metrics.evaluate import evaluate
from mtunlearn_ext.models.base import device_of
from mtunlearn_ext.metrics.membership import (attackable_instances, auc_chance_spread,
                                              membership_attack)
from mtunlearn_ext.metrics.retained import RetainedCheck, check_retained
from mtunlearn_ext.models.modes import BuffersKept, ignoring_compile, measuring
from mtunlearn_ext.training import TrainConfig, state_dict_sha256
from mtunlearn_ext.unlearning import (
    GradientUnlearner,
    Unlearner,
    UnlearnerConfig,
    UnlearningProblem,
    UnlearningReport,
    get_unlearner,
)


def progress_bar(unlearner: Unlearner) -> Any:
    """A tqdm bar advanced by a step callback of a step-based method (``None`` for others)."""
    if not isinstance(unlearner, GradientUnlearner):
        return None
    from tqdm.auto import tqdm

    steps = getattr(unlearner.config, "steps", None)
    if steps is not None:
        steps += getattr(unlearner.config, "head_refit_steps", 0)
    # A registered method's name is the user's: its control characters shown, not obeyed.
    bar = tqdm(total=steps, desc=visible_controls(unlearner.name), unit="step")

    def advance(step: int, model: nn.Module) -> None:
        bar.update(step - bar.n)

    unlearner.step_callbacks.append(advance)
    return bar


def _audit(model: nn.Module, problem: UnlearningProblem, unseen: MultiTaskDataset,
           seed: int, max_members: int = 2000) -> tuple[dict[str, float], float]:
    """Membership-inference AUCs of the forget set and of held-back members, both against half
    of ``unseen`` (see :func:`unlearn`'s ``audit_data``), and the forget AUC's spread under
    chance: its standard deviation were the forget rows drawn from unseen data
    (Mann-Whitney, ``sqrt((n_f + n_u + 1) / (12 n_f n_u))``)."""
    members = problem.retain
    if len(members) > max_members:
        generator = torch.Generator().manual_seed(seed)
        members = members.subset(torch.randperm(len(members), generator=generator)[:max_members])
    try:
        result = membership_attack(model, members, unseen,  # type: ignore[arg-type]
                                   problem.forget, problem.target_tasks,
                                   max_members=max_members, seed=seed)
    except ValueError as error:  # checked before the run: the first audit is of the input
        raise ValueError(
            f"unlearn: `audit_data`: the membership audit of the forget set cannot run "
            f"({str(error).removeprefix('membership_attack: ')}): it attacks the target tasks "
            f"{list(problem.target_tasks)}, and needs a forget instance, 4 retain instances "
            f"(the members) and 4 `audit_data` instances besides the half that fits the attack "
            f"(the non-members) labelled for every one of them; leave `audit_data` out for "
            f"this request, or give more labelled instances") from error
    n_f, n_u = result.num_forget, result.num_non_members_eval
    spread = auc_chance_spread(n_f, n_u)
    return {"forget_mia_auc": result.auc, "member_mia_auc": result.member_auc}, spread


def _overshoot_note(before: float, after: float, spread: float, summary: Mapping[str, Any],
                    report: UnlearningReport) -> str | None:
    """A warning's text when the run took the forget set's audit AUC below 0.5 by more than
    twice its chance spread (and down by more than that from ``before``): the forget
    instances then read as *less* like training data than unseen instances (their losses
    pushed past unseen data's), which an attacker can tell as well as a forget set left above
    0.5. ``None`` otherwise, also for a forget set that was already there before the run
    (instances the model never fit)."""
    if not (after < 0.5 - 2 * spread and before - after > 2 * spread):  # NaN: warned of apart
        return None
    losses_before, losses_after = summary["forget_loss_before"], summary["forget_loss_after"]
    facts = next((facts for facts in report.extra.values()
                  if isinstance(facts, Mapping) and "forget_caps" in facts), {})
    caps = facts.get("forget_caps", {})
    losses = ", ".join(f"{t} {losses_before[t]:.3g} -> {losses_after[t]:.3g}"
                       + (f" (cap {caps[t]:.3g})" if isinstance(caps.get(t), float) else "")
                       for t in losses_after if t in losses_before)
    source = facts.get("forget_caps_from")
    if source == "held_out":
        remedy = "lower `lr` or `steps` (momentum, or Adam's, carries a loss past its cap)"
    elif source is not None and "cap_reference" in report.config:
        remedy = ("lower `lr` or `steps`, or take the forget caps from unseen data "
                  "(`held_out_data=` with config `cap_reference='held_out'`)")
    else:
        remedy = "lower `lr` or `steps`"
    return (f"unlearn: the forget set's audit AUC went {before:.2f} -> {after:.2f}, below 0.5 "
            f"by more than twice its spread under chance ({spread:.2f}): the forget instances "
            "now look less like training data than unseen instances do, as telling to an "
            f"attacker as an AUC above 0.5; the forgetting overshot (forget losses {losses}): "
            f"{remedy}, and audit again")


#: The rows of the forget and retain sets that the report's before/after summary measures.
_SUMMARY_ROWS = 256


def _mean_losses(model: nn.Module, data: MultiTaskDataset, limit: int = _SUMMARY_ROWS,
                 batch_size: int = 64) -> dict[str, float]:
    """Mean task loss over the supervised pairs of the first ``limit`` rows (for the report).
    Measured (:func:`~mtunlearn_ext.models.modes.measuring`): ``model`` may be the caller's
    model, whose modules may be in mixed modes (``model.train(was_training)`` would flip them
    all) and whose forward may write buffers."""
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    device = device_of(model)
    rows = min(limit, len(data))
    with measuring(model), ignoring_compile():  # a probe: its compile would be thrown away
        for start in range(0, rows, batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, rows)))
            out = model(inputs_to(batch["input"], device))  # type: ignore[arg-type]
            for c, spec in enumerate(data.tasks):
                mask = batch["supervision"][:, c].to(device)  # type: ignore[index]
                if not bool(mask.any()):
                    continue
                target = batch["targets"][spec.name].to(device)  # type: ignore[index]
                values = task_loss(spec, out[spec.name], target)
                totals[spec.name] = totals.get(spec.name, 0.0) + float(values[mask].sum())
                counts[spec.name] = counts.get(spec.name, 0) + int(mask.sum())
    return {t: totals[t] / counts[t] for t in totals}


def _kept_rows(retain: MultiTaskDataset, limit: int = _SUMMARY_ROWS) -> MultiTaskDataset:
    """``limit`` retain rows spread evenly over the set (all of a smaller one): a data set
    ordered by task still shows every task (its first rows might hold one task only)."""
    if len(retain) <= limit:
        return retain
    return retain.subset(torch.linspace(0, len(retain) - 1, limit).round().long().unique())


def _kept_metrics(model: nn.Module, rows: MultiTaskDataset
                  ) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The task metrics (:func:`~mtunlearn_ext.metrics.evaluate`) of ``rows``: what the
    kept-metrics check compares before and after the run, and the tasks it cannot measure (a
    custom loss whose prediction has another layout than its kind's metrics read: a mean and
    a log-variance for a regression target), left out rather than refusing the run."""
    metrics: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    with ignoring_compile():  # a probe: its compile would be thrown away
        try:
            return evaluate(model, rows), skipped  # type: ignore[arg-type]
        except ValueError:
            pass
        for task in rows.task_names:  # one at a time, to keep those that can be measured
            try:
                metrics.update(evaluate(model, rows, tasks=[task]))  # type: ignore[arg-type]
            except ValueError:
                skipped.append(task)
    return metrics, skipped


#: How much worse a kept error metric (lower is better) must get for :func:`unlearn` to warn:
#: more than doubled. A score (an accuracy, an mIoU) warns past the check's own 25%, as the CLI
#: does; an error near 0 on memorised retain rows moves by more than 25% of itself without harm
#: (a regression MSE of 0.0009 -> 0.0013 in the library's own tests), where a damaged task's
#: grows many times over (0.001 -> 0.04 in a new user's run at too high a learning rate).
_ERROR_WARN_WORSENING = 1.0


def _kept_metrics_note(check: RetainedCheck, rows: int) -> str | None:
    """A warning's text when the run damaged a kept metric: a score that lost more than the
    check's tolerance, or an error that more than doubled (:data:`_ERROR_WARN_WORSENING`)."""
    # An error that was exactly 0 counts as infinitely worse for any change: warned of only
    # once it is no longer finite (a confident binary head's Brier score rounds to 0.0).
    damaged = [c for c in check.exceeded
               if c.after is None or (c.before is not None and c.after < c.before)
               or (c.worsening > _ERROR_WARN_WORSENING and c.before != 0)]
    if not damaged:
        return None
    shown = "; ".join(c.describe() for c in damaged[:3])
    more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
    return (f"unlearn: {len(damaged)} kept metric(s) of {rows} retain rows got much "
            f"worse than the input model's: {shown}{more}; the run damaged what it was to keep: "
            "try a gentler setting (a lower `lr`, fewer `steps` in `config`), and "
            "check_retained on your own splits to confirm (the comparison: "
            "report.extra['summary']['retained_check'])")


#: The caller's model class: :func:`unlearn` returns a new module of it.
ModelT = TypeVar("ModelT", bound=nn.Module)


def unlearn(model: ModelT, *,
            tasks: TasksSpec = None,
            train_data: DataLike | None = None,
            forget_request: ForgetRequest | None = None,
            forget_data: DataLike | None = None,
            retain_data: DataLike | None = None,
            target_tasks: Sequence[str] | str | None = None,
            held_out_data: DataLike | None = None,
            audit_data: DataLike | None = None,
            shared_parameters: SharedSpec | None = None,
            head_parameters: Mapping[str, ParameterSpec] | None = None,
            method: str = "interference_aware",
            config: Mapping[str, Any] | UnlearnerConfig | None = None,
            device: torch.device | str | None = None,
            seed: int = 0,
            progress: bool = False,
            fresh_model: Callable[[], nn.Module] | None = None,
            train_config: TrainConfig | Mapping[str, Any] | None = None,
            earlier_requests: Sequence[ForgetRequest] | None = None
            ) -> tuple[ModelT, UnlearningReport]:
    """Remove the supervision of ``target_tasks`` for some instances from a multi-task model.

    The model maps an input batch (one tensor, or several inputs: see below) to
    ``{task: prediction}``; its parameters split into a shared trunk ``theta_s`` and one head
    ``theta_t`` per task. A request removes the pairs
    ``F x S`` (forget instances ``F``, target tasks ``S``); everything else is retained, including,
    in a *partial* request (``S`` a proper subset of the tasks), the other tasks' labels of ``F``.
    The default method (:class:`~mtunlearn_ext.unlearning.interference_aware.InterferenceAware`)
    moves ``theta_s`` by retain descent plus ``alpha`` times the forget direction after

    - a per-layer projection off the recent retain gradients of the tasks to protect,
      ``f_l <- f_l - M_l^T (M_l M_l^T + lambda I)^-1 M_l f_l`` (task-level interference), and
    - a sign-aware projection against per-sample retain gradients ``r_j``, so that
      ``<d, r_j> <= 0``: the step raises no retained instance's loss to first order
      (instance-level interference).

    Give the data one of two ways:

    - ``train_data`` (the full training set) and ``forget_request``
      (:class:`~mtunlearn_ext.data.ForgetRequest`: instance ids, target tasks; ``None`` tasks =
      full request). Preferred for partial requests: the method then knows which retained pairs
      belong to the forget instances and protects them explicitly.
    - ``forget_data`` (the forget instances with targets for the target tasks) and
      ``retain_data`` (every retained pair), plus ``target_tasks`` (a task name or a list of
      them; default: the tasks with targets in ``forget_data``, with a warning when that
      leaves a task out). In a partial request, a
      forget row whose input equals a ``retain_data`` row's is taken to be that instance, so that
      its retained pairs are known (and protected) as with ``train_data``; one that would still
      supervise a target pair there is refused. As a request names an id once, a ``forget_data``
      tuple gives each instance once: a row repeating an earlier one (equal inputs, equal labels of
      the same target tasks) is refused; equal inputs labelled otherwise are another instance.

    Each is a :class:`~mtunlearn_ext.data.MultiTaskDataset` or ``(inputs, targets[,
    supervision])`` (:data:`DataLike`): ``targets`` task -> ``[N, ...]``; ``inputs`` one
    ``[N, ...]`` tensor (``model(x)``), or a model's several inputs as a tuple
    (``((ids, mask), targets)``: ``model(ids, mask)``) or a dict (``({"ids": ids, "mask":
    mask}, targets)``: ``model(ids=ids, mask=mask)``) of tensors of any dtypes whose first
    dimension is the instance (``N`` rows each). A torch ``Dataset`` or ``DataLoader`` of
    instances ``(input, {task: label})`` is read into memory first
    (:func:`~mtunlearn_ext.data.gather`: a missing or ``None`` label is an unsupervised pair).
    Instances that carry an ``"id"`` (a loader's batches: one per row) are then a data set
    with those ids: the ids name them in ``forget_request``, the split, the report and the
    checks of held-out and audit data (the rows taken in id order, so that a shuffling
    loader's order does not change the run, and a dataset runs as a loader over it does);
    others are taken as a tuple, named by position,
    a map-style dataset's indices.

    Args:
        model: any ``nn.Module`` returning a mapping task -> output (a ``torch.compile``'d
            one, or a ``DataParallel`` / ``DistributedDataParallel`` wrapper, is unlearned
            through the module it wraps, which is what comes back); never modified (weights,
            buffers, and each module's train/eval mode). Layers
            with running statistics (BatchNorm) and dropout are fine: the steps run in eval
            mode and the statistics are recomputed from the retain data after them (the
            settings ``train_mode`` and ``recalibrate_norms``).
        tasks: task specs, or a mapping task -> kind (``"classification"``, ``"regression"``,
            ``"binary"``, ``"segmentation"``, ``"depth"``, ``"normals"``), which picks the
            task's loss (:func:`mtunlearn_ext.losses.task_loss`) and forgetting objective.
            Given as a kind, a classification or segmentation task has as many classes as the model
            predicts (dimension 1 of its output), and every label must be one of them.
            With the data given as :class:`~mtunlearn_ext.data.MultiTaskDataset` (which
            carries its tasks' specs), ``tasks`` may be left out or give task names only.
        held_out_data: optional instances the model was never trained on (a validation
            split, never the data you evaluate on), same layout as ``retain_data``. A retrained
            model fits the forget instances about as well as unseen data, so the default
            method can stop raising a forget pair's loss where such data's loss lies: with
            ``config={"cap_reference": "held_out"}`` (or ``"auto"``) its forget caps come
            from this data. Its defaults (``cap_reference="retain"``) and the other methods do
            not read it: the run is then the same as without it, and a ``UserWarning`` names
            the setting to change.
        audit_data: optional instances the model was never trained on, distinct from
            ``held_out_data`` (which the method may use), at least 8 rows with the target tasks'
            labels. Held-out and audit data are refused when they hold a training instance:
            by id where both are data sets, else (data given as tuples, whose ids ``unlearn``
            makes up) by equal inputs and labels. The report's summary then holds a loss-based
            membership-inference audit of the forget set before and after
            (:func:`~mtunlearn_ext.metrics.membership_attack`: a seeded draw of at most 2000
            retain rows is halved, and one half of it is fitted against half of
            ``audit_data``, scored against the other half): ``forget_mia_auc_*`` near 0.5 means
            the forget instances look like unseen data to the attack; ``member_mia_auc_*`` (the
            other half of the drawn retain rows, held back, against the same unseen half) shows
            that the attack itself still separates members.
        shared_parameters: the trunk: names, parameters, modules (``model.backbone``: all
            its parameters), or a predicate on names. Not needed for a model with
            ``parameter_split()``.
        head_parameters: task -> its head's names, parameters or module(s) (default: a
            parameter whose dotted name contains the task's name as a component, e.g.
            ``heads.depth.weight``; the modules' names are looked at before the parameter's
            own, so a task named ``weight`` does not claim every ``....weight``); the tasks it
            leaves out keep the heads found by name.
        method: registry name (see :func:`mtunlearn_ext.unlearning.available_unlearners`).
        config: the method's settings (a mapping or its config object); defaults otherwise.
        device: where to compute, and where the returned model is (default: the model's own
            device, its parameters'); seed: seeds every random choice (same seed, same result
            on the same device, thread count, torch build and CPU instruction sets).
        progress: show a progress bar over the steps of a step-based method (tqdm, stderr).
        fresh_model, train_config: what ``method="retrain"`` (the gold standard: training from
            scratch on the retain pairs) needs; see :func:`build_problem`.
        earlier_requests: the requests already removed from ``model`` (a chain of removals),
            with ``train_data``: their pairs are left out of the retain set, which would
            otherwise train the model on them again, and a request naming only such pairs is
            refused. A model that :func:`unlearn` returned carries its own (an attribute,
            kept by ``copy.deepcopy`` and pickling, not by ``state_dict``): a second request
            on it keeps the first removed without this argument (a run that changed no
            weight adds nothing to them). Pass them for a model loaded
            from a ``state_dict`` (the record keeps only the ids' hashes;
            ``report.request["earlier_requests"]`` lists them); given, the list replaces what
            the model carries (a warning names carried requests it leaves out). Ids of a
            ``MultiTaskDataset`` no longer in ``train_data`` (rows dropped, their data erased)
            are skipped; requests named by row positions need ``train_data`` of the same
            number of rows (else refused: the positions would name other instances). With
            ``forget_data`` / ``retain_data``, leave removed pairs out of ``retain_data``.

    Returns:
        ``(unlearned_model, report)``: a new module of the same class as ``model`` (in eval
        mode, its parameters without ``.grad``; for a model in ``torch.compile``'s or
        (Distributed)DataParallel's wrapper, of the module inside it, which the annotation
        cannot say), and an
        :class:`~mtunlearn_ext.unlearning.UnlearningReport` whose ``extra["summary"]`` holds the
        mean task losses on forget and retain pairs before and after (``forget_loss_before``,
        ``forget_loss_after``, ...; first 256 rows of each set) and ``extra["weights_changed"]``:
        ``False`` (with a ``UserWarning``) when the run left every weight and buffer exactly as
        it was (``steps: 0``), which unlearned nothing, and ``extra["parameters_changed"]``:
        ``False`` (with a ``UserWarning``) when every parameter is as it was, whatever the
        buffers (running statistics recomputed on the retain rows after 0 steps).

    Example::

        import torch
        from torch import nn
        import mtunlearn_ext

        class TwoHeads(nn.Module):
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
                self.heads = nn.ModuleDict({"kind": nn.Linear(32, 3), "size": nn.Linear(32, 1)})
            def forward(self, x):
                z = self.trunk(x)
                return {t: h(z) for t, h in self.heads.items()}

        x = torch.randn(200, 8)
        y = {"kind": torch.randint(0, 3, (200,)), "size": torch.randn(200, 1)}
        model = TwoHeads()  # ... trained on (x, y) ...
        new_model, report = mtunlearn_ext.unlearn(
            model, tasks={"kind": "classification", "size": "regression"},
            train_data=(x, y),
            forget_request=mtunlearn_ext.ForgetRequest.create(range(10), ["kind"]),  # partial
            shared_parameters=lambda name: name.startswith("trunk."),
            config={"steps": 30, "lr": 1e-2})
        print(report.extra["summary"])
    """
    if not isinstance(progress, bool):  # a string such as "no" would be taken as true
        raise TypeError(f"unlearn: `progress` must be True or False, got {progress!r}")
    # Probing forwards (the input checks, the head probe, the losses before) run on the
    # caller's own modules; a forward that writes buffers even in eval mode (a quantisation
    # observer's min/max) would change the model the caller keeps.
    kept = BuffersKept(model)
    try:
        problem, trained, naming = build_problem_with_naming(
            model, tasks=tasks, train_data=train_data, forget_request=forget_request,
            forget_data=forget_data, retain_data=retain_data, target_tasks=target_tasks,
            held_out_data=held_out_data, shared_parameters=shared_parameters,
            head_parameters=head_parameters, device=device, seed=seed, fresh_model=fresh_model,
            train_config=train_config, earlier_requests=earlier_requests)
        wrapped, forget, retain = problem.model, problem.forget, problem.retain
        audit = None
        if audit_data is not None:
            audit_data = cast(InMemoryData, read_in(audit_data, problem.tasks, "audit_data",
                                                     keep_ids=True))
            audit = as_dataset(audit_data, problem.tasks, "audit_data", like=retain)
            audit.check_values("unlearn: `audit_data`")
            audit.warn_of_negative_depths("unlearn: `audit_data`")
            problem.check_model_on(audit, "`audit_data`")
            # A data set's ids against the training data sets' ids; tuple data (ids of its own,
            # 0..N-1) and training data given as tuples: by equal inputs and labels.
            own_audit = isinstance(audit_data, MultiTaskDataset)
            check_unseen(audit, "audit_data", own_audit, trained)
            if problem.held_out is not None and len(problem.held_out):
                # The forget caps are measured on the held-out instances: an audit on them would
                # compare the forget set with the very losses it was steered to.
                check_unseen(audit, "audit_data", own_audit,
                              [TrainedRows("held_out_data", problem.held_out,
                                        torch.arange(len(problem.held_out)), naming.own_held_out)],
                              against="`held_out_data`",
                              must="be distinct from `held_out_data` (the instances the forget "
                                   "caps may be measured on)")
            # The rows the attack scores: a supervised pair whose label is all ignore_index
            # has no loss to attack.
            labelled = attackable_instances(audit, problem.target_tasks)
            if labelled < 8:
                raise ValueError(f"unlearn: `audit_data` needs at least 8 instances with labels of "
                                 f"the target tasks {problem.target_tasks}, got {labelled}")
        unlearner = get_unlearner(method, config)
        if unlearner.name == "retrain" and (fresh_model is None or train_config is None):
            lacking = " and ".join(f"`{name}`" for name, value in (
                ("fresh_model", fresh_model), ("train_config", train_config)) if value is None)
            raise ValueError(f"unlearn: method='retrain' trains a new model on the retained "
                             f"pairs and needs {lacking}: `fresh_model`, a function returning "
                             "a new, untrained model of the same architecture, and "
                             "`train_config`, the recipe (TrainConfig or its fields)")
        if isinstance(unlearner, GradientUnlearner) and not any(
                p.requires_grad for p in wrapped.parameters()):
            count = sum(1 for _ in wrapped.parameters())
            raise ValueError(f"unlearn: no parameter of `model` requires grad (requires_grad is "
                             f"False for all {count}), so method {unlearner.name!r} has nothing to "
                             f"update; unfreeze the parameters it may change (at least the shared "
                             f"trunk's: `p.requires_grad_(True)`)")
        before_f = _mean_losses(wrapped, forget)
        before_r = _mean_losses(wrapped, retain)
        kept_rows = _kept_rows(retain)
        kept_before, not_checked = _kept_metrics(wrapped, kept_rows)
        audit_before = _audit(wrapped, problem, audit, problem.seed)[0] if audit is not None else {}
        bar = progress_bar(unlearner) if progress else None
        try:
            # build_problem validated it, and nothing since has changed it.
            result = unlearner.unlearn(problem, validated=True)
        finally:
            if bar is not None:
                bar.close()
    finally:
        kept.restore()
    after_f = _mean_losses(result.model, forget)
    after_r = _mean_losses(result.model, retain)
    kept_after, _ = _kept_metrics(result.model, kept_rows)
    measured = [t for t in kept_before if t in kept_after]
    not_checked += [t for t in kept_before if t not in kept_after]
    retained = check_retained({"retain": {t: kept_before[t] for t in measured}},
                              {"retain": {t: kept_after[t] for t in measured}},
                              splits=["retain"])
    result.report.extra["summary"] = {
        "forget_loss_before": before_f, "forget_loss_after": after_f,
        "retain_loss_before": before_r, "retain_loss_after": after_r,
        "retained_check": {**retained.to_dict(), "rows": len(kept_rows),
                           "not_checked": not_checked},
    }
    if audit is not None:
        audit_after, spread = _audit(result.model, problem, audit, problem.seed)
        for key in audit_before:
            result.report.extra["summary"][f"{key}_before"] = audit_before[key]
            result.report.extra["summary"][f"{key}_after"] = audit_after[key]
        note = _overshoot_note(audit_before["forget_mia_auc"], audit_after["forget_mia_auc"],
                               spread, result.report.extra["summary"], result.report)
        if note is not None:
            warn_at_caller(note)
    result.report.request["ids_named_by"] = naming.named_by
    if naming.ids is not None:
        result.report.request["ids_sha256"] = ForgetRequest.create(naming.ids).ids_hash()
    if train_data is not None:
        # The chain of removals, by the ids' hashes as the request's own: a record shows that
        # the retain set left the earlier requests' pairs out.
        result.report.request["earlier_requests"] = [
            {"ids_sha256": r.ids_hash(), "num_instances": len(r.instance_ids),
             "target_tasks": None if r.target_tasks is None else r.resolved_tasks(problem.retain)}
            for r in naming.earlier]
        result.report.request["earlier_pairs_excluded"] = naming.excluded_pairs
    if kept_note := _kept_metrics_note(retained, len(kept_rows)):
        warn_at_caller(kept_note)
    if held_out_data is not None:
        unused = held_out_unused(unlearner, result.report)
        if unused is not None:
            warn_at_caller(f"unlearn: `held_out_data` was not used: {unused}")
    out = result.model.module if isinstance(result.model, SplitModel) else result.model
    source = wrapped.module if isinstance(wrapped, SplitModel) else wrapped
    # The input is never modified, so it still holds the weights the run started from; the
    # hashes tell apart what save_unlearned's and the CLI's tell apart.
    out_state = unwrapped(out).state_dict()
    out_sha = state_dict_sha256(out_state)
    changed = out_sha != state_dict_sha256(source)
    result.report.extra["weights_changed"] = changed
    # What save_unlearned ties the report to: a record describes these weights and no others;
    # or these weights cast as a whole to another floating type (the half-precision way in:
    # unlearn a float32 copy, cast the result back).
    result.report.extra["model_state_sha256"] = out_sha
    result.report.extra["model_state_sha256_cast"] = {
        str(dtype).removeprefix("torch."): state_dict_sha256(FloatingCast(out_state, dtype))
        for dtype in CASTS_SAVED}
    if not changed:
        # As `mtunlearn unlearn` says it (steps 0): save_unlearned keeps
        # it in the record (weights_changed: false) and verify_saved does not pass it.
        warn_at_caller(f"unlearn: {unlearner.name} left the weights exactly as they were "
                       f"({result.report.steps} steps): the returned model (a copy) holds the "
                       f"input model's weights, nothing was unlearned; save_unlearned's record "
                       f"says so (weights_changed: false) and verify_saved will not pass it")
    same = not changed or same_parameters(out, source)  # an equal state: equal parameters
    result.report.extra["parameters_changed"] = not same
    if changed and same:
        # Buffers alone moved (BatchNorm's running statistics, recomputed on the retain rows
        # by recalibrate_norms even after 0 steps): the supervision is in the parameters.
        warn_at_caller(f"unlearn: {unlearner.name} left every parameter exactly as it was "
                       f"({result.report.steps} steps); only buffers changed (running "
                       f"statistics: recalibrate_norms), so the request's supervision is still "
                       f"in the weights; save_unlearned's record says so (parameters_changed: "
                       f"false) and verify_saved will not pass it")
    # A run that changed no weight removed nothing (as the CLI's checkpoint `removals`): the
    # returned model carries what the input did. Carrying its request refused the same
    # request again on the returned model, and listed a removal that never happened in every
    # later record.
    if naming.lineage is not None:
        lineage = (naming.lineage if changed
                   else replace(naming.lineage, requests=naming.earlier))
    else:  # forget_data: what it removed no later train_data id names
        before = carried_lineage(source)
        if not changed:
            lineage = before if before is not None else Lineage(())
        else:
            lineage = (Lineage((), False) if before is None
                       else replace(before, complete=False))
    if out is not source:  # the input is never modified
        out.__dict__[LINEAGE_ATTRIBUTE] = lineage
    diverged = non_finite_parameters(out)
    if diverged:
        first = first_non_finite_loss(result.report)
        when = f", the first NaN/Inf loss recorded: {first[0]} at step {first[1]}" if first else ""
        warn_at_caller(f"unlearn: the run diverged: the returned model has NaN/Inf in "
                       f"{len(diverged)} parameter(s) (first: {diverged[0]}{when}); lower the "
                       f"learning rate or the step count (`config`), or keep gradient clipping "
                       f"on; save_unlearned refuses such a model")
    elif unbounded := non_finite_last_losses(result.report):
        warn_at_caller(f"unlearn: the run diverged: its weights are finite but its last measured "
                       f"{' and '.join(unbounded)} are NaN/Inf (step "
                       f"{result.report.curve_steps[unbounded[0]][-1]}); lower the learning rate "
                       f"or the step count (`config`)")
    return cast(ModelT, out), result.report


def first_non_finite_loss(report: UnlearningReport) -> tuple[str, int] | None:
    """The mean loss curve and step of the report's first NaN/Inf loss (at a logged step:
    every ``log_every``-th), the step a run with NaN weights diverged at; ``None`` if none."""
    found: list[tuple[int, str]] = []
    for name in ("forget_loss", "retain_loss"):
        values, steps = report.curves.get(name, []), report.curve_steps.get(name, [])
        found += [(step, name) for step, value in zip(steps, values)
                  if not math.isfinite(value)][:1]
    return (min(found)[1], min(found)[0]) if found else None


def non_finite_last_losses(report: UnlearningReport) -> list[str]:
    """Which of the report's two mean loss curves end on NaN/Inf: a model whose weights grew
    huge but finite (float64 ones, a learning rate near float32's largest) scores Inf losses."""
    return [name for name in ("forget_loss", "retain_loss")
            if report.curves.get(name) and not math.isfinite(report.curves[name][-1])]


#: The half-precision types a returned model may be cast to, as a whole, and still be saved
#: with its report (unlearn refuses such a model: "unlearn a float32 copy, cast the result
#: back"); save_unlearned compares it by the hash of the returned state cast the same way.
CASTS_SAVED = (torch.bfloat16, torch.float16)


def is_extra_state(name: str) -> bool:
    """A module's ``get_extra_state()`` entry of a state dict, which ``module.to`` leaves."""
    return name == "_extra_state" or name.endswith("._extra_state")


class FloatingCast(Mapping[str, Any]):
    """``state`` with every floating parameter and buffer cast to ``dtype`` on the CPU, as
    ``module.to(dtype)`` casts them, one tensor at a time as it is read (hashing it needs no
    cast copy of the whole model, nor memory on the model's device)."""

    def __init__(self, state: Mapping[str, Any], dtype: torch.dtype) -> None:
        self._state, self._dtype = state, dtype

    def __getitem__(self, name: str) -> Any:
        value = self._state[name]
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and not is_extra_state(name):
            return value.detach().to("cpu").to(self._dtype)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that hold NaN/Inf (buffers may hold Inf on purpose: an
    additive attention mask of -inf)."""
    return [name for name, p in model.named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())]


def same_parameters(model: nn.Module, other: nn.Module, other_cast: torch.dtype | None = None
                    ) -> bool:
    """Whether ``model`` has ``other``'s parameters (the same names, equal values), whatever
    their buffers: a run that moved only running statistics unlearned no supervision.
    ``other_cast``: compare with ``other``'s floating parameters cast to that type (``model``
    is a cast of the run's model)."""
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())

    def as_compared(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return t.to(other_cast) if other_cast is not None and t.is_floating_point() else t

    return mine.keys() == theirs.keys() and all(
        p.shape == theirs[n].shape and torch.equal(p.detach().cpu(), as_compared(theirs[n]))
        for n, p in mine.items())


def held_out_unused(unlearner: Unlearner, report: UnlearningReport) -> str | None:
    """Why a run of one of the library's methods did not read the problem's held-out data, and
    the setting that would make it; ``None`` when it did, or for a method defined outside the
    library (which may read ``problem.held_out`` itself). Among the library's methods only the
    interference-aware one (and its ablations) reads it, for the forget caps; it says in its
    report which set its caps came from."""
    from mtunlearn_ext.unlearning.interference_aware import InterferenceAware

    if not type(unlearner).__module__.startswith("mtunlearn_ext."):
        return None
    if not isinstance(unlearner, InterferenceAware):
        return (f"method {unlearner.name!r} does not read held-out data (of the library's "
                f"methods only 'interference_aware' and its ablations do, for their forget caps "
                f"with cap_reference='held_out' or 'auto'); leave it out, or run "
                f"method='interference_aware' with config={{'cap_reference': 'held_out'}}")
    extra = report.extra.get("interference_aware", {})
    if "forget_caps_from" not in extra:  # not said: not known
        return None
    source = extra["forget_caps_from"]
    if source == "held_out":
        return None
    cfg = unlearner.config
    if cfg.cap_quantile is None:
        return ("the forget caps are the objectives' own (cap_quantile=None), so no set is "
                "measured for them; set config={'cap_quantile': 0.9 (or 'rank'), "
                "'cap_reference': 'held_out'} to raise forget losses to the held-out level")
    if source is None:  # no capped objective: no caps measured on any set
        return (f"no target task has a capped forget objective (forget objectives "
                f"{report.extra.get('forget_objectives')}), so there are no caps to take from "
                f"it; use a capped objective ('capped_ascent', the default) in "
                f"`forget_objective`")
    return ("the forget caps come from the retain set (cap_reference='retain', the "
            "default); pass config={'cap_reference': 'held_out'} (or 'auto') to take them "
            "from `held_out_data`, the level a retrained model reaches on unseen data")
