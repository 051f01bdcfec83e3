""":func:`build_problem`: the caller's model, data and request, checked, as the
:class:`~mtunlearn_ext.unlearning.UnlearningProblem` the methods run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn

from mtunlearn_ext._text import listed_first
from mtunlearn_ext.api._data_forms import (
    as_dataset,
    check_data_like,
    check_request_ids,
    check_values_of,
    ids_named_by_text,
    read_in,
    target_task_names,
    with_tasks,
)
from mtunlearn_ext.api._entry import entered, entry
from mtunlearn_ext.api._instance_matching import (
    TrainedRows,
    check_ids_not_retained,
    check_rows_given_once,
    check_unseen,
    linked_to_retained_copies,
)
from mtunlearn_ext.api._lineage import (
    Lineage,
    carried_lineage,
    check_carried_fits,
    requests_removed_before,
    without_earlier_removals,
)
from mtunlearn_ext.api._model_split import (
    fresh_split_model,
    has_own_split,
    split_model,
    unwrapped_with_prefix,
)
from mtunlearn_ext.api._task_specs import (
    classes_predicted_by, task_specs, tasks_from_data)
from mtunlearn_ext.api._types import (DataLike, InMemoryData, ParameterSpec, SharedSpec,
                                      TasksSpec)
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.request import ForgetRequest
from mtunlearn_ext.training import TrainConfig, recipe_from_mapping
from mtunlearn_ext.unlearning import UnlearningProblem


@dataclass(frozen=True)
class Naming:
    """How the caller names the request's instances, for the report: ``named_by`` (its
    ``ids_named_by``), ``ids`` the ids its ``ids_sha256`` hashes (``None``: the request's own,
    which are already the caller's), and ``own_held_out`` whether the problem's held-out ids
    are the caller's (not made by :func:`unlearn`), which decides how audit data is compared
    with them; ``earlier`` the requests removed before this one (``earlier_requests``) and
    ``excluded_pairs`` how many pairs of ``train_data`` they took out of the retain set."""

    named_by: str
    ids: list[int] | None
    own_held_out: bool = False
    earlier: tuple[ForgetRequest, ...] = ()
    excluded_pairs: int = 0
    lineage: Lineage | None = None


#: Why a named instance can have no pair of a task: how the caller's data marks it unlabelled.
_UNLABELLED = ("(unlabelled: the supervision mask's False, or the task's no-label value such "
               "as -1)")


def _warn_of_targets_without_pairs(tasks: list[str], where: str) -> None:
    """Warn that the target ``tasks`` have no pair to forget (``where`` says where none was
    found): the request runs on its other target tasks, and a report that names these tasks
    among its targets, as forgotten, would otherwise be all the caller saw of it."""
    if not tasks:
        return
    one = len(tasks) == 1
    warn_at_caller(f"{entry()}: target task{'' if one else 's'} {tasks} of the request "
                   f"{'has' if one else 'have'} no supervised pair {where}: only the other "
                   "target tasks' pairs are forgotten (the model learned nothing of "
                   f"{'it' if one else 'them'} from these instances, unless "
                   f"{'its' if one else 'their'} labels were left out by mistake)")


def build_problem(model: nn.Module, *,
                  tasks: TasksSpec = None,
                  train_data: DataLike | None = None,
                  forget_request: ForgetRequest | None = None,
                  forget_data: DataLike | None = None,
                  retain_data: DataLike | None = None,
                  target_tasks: Sequence[str] | str | None = None,
                  held_out_data: DataLike | None = None,
                  shared_parameters: SharedSpec | None = None,
                  head_parameters: Mapping[str, ParameterSpec] | None = None,
                  device: torch.device | str | None = None,
                  seed: int = 0,
                  fresh_model: Callable[[], nn.Module] | None = None,
                  train_config: TrainConfig | Mapping[str, Any] | None = None,
                  earlier_requests: Sequence[ForgetRequest] | None = None
                  ) -> UnlearningProblem:
    """The validated :class:`~mtunlearn_ext.unlearning.UnlearningProblem` that :func:`unlearn`
    runs, from the same arguments (see there): for the layers below it, such as
    :func:`~mtunlearn_ext.unlearning.interference.interference_matrix` (forget/retain gradient
    cosines before and after the projections) or several methods on one request
    (``get_unlearner(name, settings).unlearn(problem)``). The problem's model wraps ``model``
    (its parameters, not a copy) with the shared/head split; methods never modify it. A
    method's result model is such a wrapper too (its forward takes ``(inputs, task_names)``):
    your module is its ``.module`` (what :func:`unlearn` returns), unless ``model`` was a
    :class:`~mtunlearn_ext.models.MultiTaskModel`, which is used as it is. Data
    given as tuples may hold several inputs per instance (see :data:`DataLike`): the problem's
    data sets keep them as a tuple or dict, and its model unpacks them into ``model``.

    ``fresh_model`` (a function returning a newly initialised model of the same architecture,
    the same initialisation seed as the original) and ``train_config`` (the recipe:
    :class:`~mtunlearn_ext.training.TrainConfig` or its fields) let ``method="retrain"`` train
    the gold-standard model on the retain pairs, with the library's trainer (the masked
    multi-task loss of :func:`~mtunlearn_ext.losses.masked_multitask_loss`).
    """
    with entered("build_problem"):
        return build_problem_with_naming(
            model, tasks=tasks, train_data=train_data, forget_request=forget_request,
            forget_data=forget_data, retain_data=retain_data, target_tasks=target_tasks,
            held_out_data=held_out_data, shared_parameters=shared_parameters,
            head_parameters=head_parameters, device=device, seed=seed, fresh_model=fresh_model,
            train_config=train_config, earlier_requests=earlier_requests)[0]


def build_problem_with_naming(model: nn.Module, *,
                   tasks: TasksSpec = None,
                   train_data: DataLike | None, forget_request: ForgetRequest | None,
                   forget_data: DataLike | None, retain_data: DataLike | None,
                   target_tasks: Sequence[str] | str | None, held_out_data: DataLike | None,
                   shared_parameters: SharedSpec | None,
                   head_parameters: Mapping[str, ParameterSpec] | None,
                   device: torch.device | str | None, seed: int,
                   fresh_model: Callable[[], nn.Module] | None,
                   train_config: TrainConfig | Mapping[str, Any] | None,
                   earlier_requests: Sequence[ForgetRequest] | None = None
                   ) -> tuple[UnlearningProblem, list[TrainedRows], Naming]:
    """:func:`build_problem`, the training rows as given (for the checks that held-out
    and audit data are unseen), and how the caller's data names the request's instances."""
    if not isinstance(model, nn.Module):  # (an AttributeError from deep inside, at first)
        raise TypeError(f"{entry()}: `model` must be an nn.Module returning task -> output, got "
                        f"{type(model).__name__}")
    model, wrapper_prefix = unwrapped_with_prefix(model)
    given_tasks = tasks_from_data(tasks, [train_data, forget_data, retain_data, held_out_data],
                            entry())
    earlier, carried = requests_removed_before(model, earlier_requests, forget_data is not None)
    lineage = carried_lineage(model)
    if (train_data is None) == (forget_data is None):
        raise ValueError(f"{entry()}: give either `train_data` and `forget_request`, or "
                         "`forget_data` and `retain_data`")
    as_passed = (train_data, forget_data, retain_data, held_out_data)
    given_train, given_forget = train_data, forget_data
    # Instances that carry an "id" come back as a data set with those ids and take the data
    # set's path from here on: its ids name them in the request, the split and the checks.
    train_data, forget_data, retain_data, held_out_data = (
        cast("InMemoryData | None", read_in(data, given_tasks, what, keep_ids=True))
        for what, data in zip(
            ("train_data", "forget_data", "retain_data", "held_out_data"), as_passed))
    for what, data in (("train_data", train_data), ("forget_data", forget_data),
                       ("retain_data", retain_data), ("held_out_data", held_out_data)):
        if data is not None:
            check_data_like(data, what)
    if device is None:
        device = model_device(model)
    try:
        meta = torch.device(device).type == "meta"
    except (RuntimeError, TypeError):
        meta = False  # refused, with its reason, by the problem's validation
    if meta:
        raise ValueError(f"{entry()}: `device` 'meta' holds no values; unlearning computes on "
                         "'cpu' or 'cuda'")
    specs = task_specs(given_tasks, [train_data, forget_data, retain_data], classes_predicted_by(
        model, not has_own_split(model, shared_parameters, head_parameters),
        train_data if train_data is not None else retain_data, given_tasks),
        ["train_data", "forget_data", "retain_data"], op=entry())
    train_data, forget_data, retain_data, held_out_data = (
        data if data is as_given else cast("InMemoryData | None", with_tasks(data, specs))
        for data, as_given
        in zip((train_data, forget_data, retain_data, held_out_data), as_passed))
    names = [s.name for s in specs]
    if train_data is not None:
        if forget_request is None:
            raise ValueError(f"{entry()}: `train_data` needs a `forget_request`")
        if target_tasks is not None:
            raise ValueError(f"{entry()}: with `forget_request`, the target tasks are the "
                             "request's")
        if retain_data is not None:
            raise ValueError(f"{entry()}: `retain_data` goes with `forget_data`; with `train_data` "
                             "and a `forget_request` the retain set is the rest of `train_data`")
        full = as_dataset(train_data, specs, "train_data")
        own = isinstance(train_data, MultiTaskDataset)
        trained_rows = full.supervision.any(dim=1).nonzero().flatten()
        request = forget_request
        check_request_ids(request, full, given_train, own, removed_before=earlier,
                          removed_by=("the requests `model` carries (from the unlearn() that "
                                      "returned it)" if carried else "`earlier_requests`"))
        request.validate(full)
        trained = [TrainedRows("train_data", full, trained_rows, own)]
        # Pairs an earlier request removed are neither retained (the model would learn them
        # again) nor forgotten a second time.
        if carried:
            check_carried_fits(lineage, full, own)
        remaining, excluded = without_earlier_removals(full, earlier, given_train, own, carried)
        # The rows in forget or retain: one whose every pair an earlier request removed is
        # read by neither, as one with no supervised pair, so its inputs may hold anything.
        check_values_of(full, "train_data", own,
                        remaining.supervision.any(dim=1).nonzero().flatten())
        forget, retain = request.split(remaining)
        naming = Naming(ids_named_by_text("train_data", given_train, own), None, earlier=earlier,
                         excluded_pairs=excluded,
                         lineage=Lineage((*earlier, request),
                                          not carried or lineage is None or lineage.complete,
                                          own, len(full)))
        targets = request.resolved_tasks(full)
        if not len(forget):  # said here, where the request and its data are known by name
            count = len(request.instance_ids)
            if bool(request.forget_mask(full).any()):
                by = ("the requests `model` carries (from the unlearn() that returned it)"
                      if carried else "`earlier_requests`")
                raise ValueError(f"{entry()}: every pair `forget_request` names ({count} instance"
                                 f"{'s' if count != 1 else ''}, target tasks {targets}) was "
                                 f"removed already by {by}: there is nothing left to forget")
            raise ValueError(f"{entry()}: `forget_request` names {count} instance"
                             f"{'s' if count != 1 else ''}, none with a supervised pair of the "
                             f"target task{'s' if len(targets) != 1 else ''} {targets} in "
                             "`train_data` (its supervision mask marks those pairs unlabelled): "
                             "there is nothing to forget")
        if not len(retain):
            takers = ("`forget_request` and the requests `model` carries together take" if
                      carried and earlier else "`forget_request` and `earlier_requests` "
                      "together take" if earlier else "`forget_request` takes")
            raise ValueError(f"{entry()}: {takers} every pair of `train_data`: nothing would be "
                             "left to retain")
        asked, still = request.forget_mask(full), request.forget_mask(remaining)
        rows = full.positions_of(request.instance_ids)
        _warn_of_targets_without_pairs(
            [t for t in targets if not bool(asked[:, full.task_index(t)].any())],
            f"on the {len(rows)} instance{'s' if len(rows) != 1 else ''} `forget_request` names "
            f"in `train_data` {_UNLABELLED}")
        bare = sorted(int(full.ids[r]) for r in rows[~asked[rows].any(dim=1)].tolist())
        if bare:  # some named instances, not all (none with a pair is refused above)
            shown = listed_first(bare, 10)
            warn_at_caller(f"{entry()}: {len(bare)} of the {len(rows)} instances `forget_request` "
                           f"names ({shown}) have no supervised pair of the target task"
                           f"{'s' if len(targets) != 1 else ''} {targets} in `train_data` "
                           f"{_UNLABELLED}: nothing of them is forgotten, as nothing of them "
                           "was learned")
        gone = sorted(int(i) for i in full.ids[(asked & ~still).any(dim=1)].tolist())
        if gone:  # some named pairs, not all (none left is refused above)
            by = ("the requests `model` carries" if carried else "`earlier_requests`")
            shown = listed_first(gone, 10)
            warn_at_caller(f"{entry()}: {int((asked & ~still).sum())} of the {int(asked.sum())} "
                           f"pairs `forget_request` names ({len(gone)} instance"
                           f"{'s' if len(gone) != 1 else ''}: {shown}) were removed already by "
                           f"{by}; only the other {int(still.sum())} are forgotten")
    else:
        if retain_data is None:
            raise ValueError(f"{entry()}: `forget_data` needs `retain_data`")
        if forget_request is not None:
            raise ValueError(f"{entry()}: a `forget_request` names instances of `train_data`; with "
                             "`forget_data` the forget set is that data itself (its target tasks "
                             "in `target_tasks`)")
        # Tuple data gets ids 0..N-1; a MultiTaskDataset keeps its own. A tuple retain set
        # beside a forget data set starts past the forget set's ids, so that the two never
        # name different instances by one id.
        retain_offset = (int(forget_data.ids.max()) + 1
                         if isinstance(forget_data, MultiTaskDataset) and len(forget_data) else 0)
        retain = as_dataset(retain_data, specs, "retain_data", id_offset=retain_offset)
        if isinstance(forget_data, MultiTaskDataset):
            given = [t for t in names if bool(forget_data.supervision[:, forget_data.task_index(t)]
                                              .any())]
        else:
            assert forget_data is not None
            given = [t for t in names if t in forget_data[1]]
        named = target_task_names(target_tasks)
        targets = named if named is not None else given
        if named is None and given and len(given) < len(names):
            # A label dict left out by mistake would keep that task's supervision learned.
            left = [t for t in names if t not in given]
            warn_at_caller(f"{entry()}: `forget_data` has no targets for task"
                           f"{'s' if len(left) > 1 else ''} {left}, so only {given} "
                           f"{'is' if len(given) == 1 else 'are'} forgotten (a partial request); "
                           "pass `target_tasks` to say so, or give every task's targets for a "
                           "full request")
        if len(set(targets)) != len(targets):
            raise ValueError(f"{entry()}: `target_tasks` {targets} names a task twice")
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise ValueError(f"{entry()}: target tasks {targets} must be a non-empty subset of "
                             f"{names}")
        targets = [t for t in names if t in targets]  # one order, as a request's tasks
        forget = as_dataset(forget_data, specs, "forget_data", like=retain,
                             id_offset=int(retain.ids.max()) + 1 if len(retain) else 0)
        # Only the target tasks' pairs are forgotten; anything else given is not a forget pair.
        columns = torch.tensor([t in targets for t in names])
        forget = forget.with_supervision(forget.supervision & columns)
        given_rows = forget
        kept = forget.supervision.any(dim=1)
        if len(forget) and not bool(kept.all()):
            # As `forget_request` says it of train_data's rows: a row with nothing to forget
            # counted as a forgotten instance in the report (2 where train_data gave 1).
            bare = (~kept).nonzero().flatten().tolist()
            shown = listed_first(bare, 10)
            what = (f"no supervised pair of the target task{'s' if len(targets) != 1 else ''} "
                    f"{targets} {_UNLABELLED}")
            if not bool(kept.any()):
                raise ValueError(f"{entry()}: none of the {len(forget)} rows of `forget_data` "
                                 f"has a {what.removeprefix('no ')}: there is nothing to forget")
            warn_at_caller(f"{entry()}: {len(bare)} of the {len(forget)} rows of `forget_data` "
                           f"(positions {shown}) have {what}: nothing of them is forgotten, as "
                           "nothing of them was learned")
            forget = forget.subset(kept.nonzero().flatten())
        if len(forget):
            without = [t for t in targets
                       if not bool(forget.supervision[:, forget.task_index(t)].any())]
            missing = ([] if isinstance(forget_data, MultiTaskDataset) or forget_data is None
                       else [t for t in without if t not in forget_data[1]])
            _warn_of_targets_without_pairs(
                missing, "in `forget_data`, which has no targets for it")
            _warn_of_targets_without_pairs(
                [t for t in without if t not in missing],
                f"on the rows of `forget_data` {_UNLABELLED}")
        for what, data in (("forget_data", forget), ("retain_data", retain)):
            if not len(data):  # said by name here; the problem would say "the ... set is empty"
                raise ValueError(f"{entry()}: `{what}` has no rows: "
                                 + ("there is nothing to forget" if what == "forget_data" else
                                    "a request needs retained pairs to protect and train on"))
        own_forget = isinstance(forget_data, MultiTaskDataset)
        own_retain = isinstance(retain_data, MultiTaskDataset)
        check_values_of(retain, "retain_data", own_retain)
        check_values_of(forget, "forget_data", own_forget)
        if not own_forget:  # a data set's ids name its instances: each is there once
            check_rows_given_once(forget, "forget_data")
        partial = set(targets) != set(names)
        forget = linked_to_retained_copies(forget, retain, link=partial,
                                           given_rows=kept.nonzero().flatten())
        if own_forget and own_retain:
            check_ids_not_retained(forget, retain, kept.nonzero().flatten())
        request = ForgetRequest.create(forget.ids, targets if partial else None)
        trained = [TrainedRows("forget_data", given_rows, torch.arange(len(given_rows)),
                               own_forget),
                   TrainedRows("retain_data", retain, torch.arange(len(retain)), own_retain)]
        # Given as a tuple, the problem names the forget rows by ids made for them (past the
        # retain rows', or a linked retain row's): the record hashes their positions in
        # `forget_data`, 0..n-1, which the caller can name; a data set's ids are its own
        # (before a row took the id of the retain row it is linked to).
        naming = Naming(ids_named_by_text("forget_data", given_forget, own_forget),
                         cast(MultiTaskDataset, forget_data).ids[kept].tolist() if own_forget
                         else kept.nonzero().flatten().tolist())
    held_out = None
    if held_out_data is not None:
        # Tuple data gets ids past every training id; a MultiTaskDataset keeps its own, and
        # one that shares ids with a training data set is refused. Against ids made for a
        # tuple (which name no instance of the caller's) rows are compared by their inputs.
        top = max([int(d.ids.max()) + 1 for d in (forget, retain) if len(d)] or [0])
        held_out = as_dataset(held_out_data, specs, "held_out_data", like=retain, id_offset=top)
        own_held_out = isinstance(held_out_data, MultiTaskDataset)
        check_values_of(held_out, "held_out_data", own_held_out)
        check_unseen(held_out, "held_out_data", own_held_out, trained)
        if own_held_out and len(held_out) and not set(held_out.ids.tolist()).isdisjoint(
                forget.ids.tolist() + retain.ids.tolist()):
            # Its ids met only ids made for a tuple (the check above): new ones past them, so
            # that no id names two instances (the problem's own check compares ids).
            held_out = MultiTaskDataset(held_out.inputs, held_out.targets, held_out.tasks,
                                        torch.arange(top, top + len(held_out)),
                                        held_out.supervision)
        else:
            naming = replace(naming, own_held_out=own_held_out)
    wrapped = split_model(model, names, shared_parameters, head_parameters, wrapper_prefix)
    _warn_of_gradient_hooks(model)
    if (fresh_model is None) != (train_config is None):
        raise ValueError(f"{entry()}: `fresh_model` and `train_config` go together (retraining "
                         "needs both the architecture and the recipe)")
    factory: Callable[[], nn.Module] | None = None
    recipe = None
    if fresh_model is not None:
        recipe = (train_config if isinstance(train_config, TrainConfig)
                  else recipe_from_mapping(train_config, f"{entry()}: `train_config`"))
        factory = fresh_split_model(fresh_model, wrapped, names)
    problem = UnlearningProblem(model=wrapped, tasks=specs, forget=forget, retain=retain,
                                request=request, target_tasks=list(targets), device=device,
                                seed=seed, held_out=held_out, train_config=recipe,
                                model_factory=factory)
    problem.validate()
    return problem, trained, naming


def _warn_of_gradient_hooks(model: nn.Module) -> None:
    """Warn when trainable parameters carry gradient hooks: the methods step a copy of the
    model (a parameter's copy has no hooks) and take per-sample gradients under torch.func,
    so a hook that masks or clips a gradient (pruned weights kept at zero) silently has no
    effect on the run."""
    hooked = [n for n, p in model.named_parameters() if p.requires_grad and (
        p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None))]
    if hooked:
        # Reached from unlearn and from build_problem at different depths: a fixed stacklevel
        # of 3 pointed at unlearn's own file.
        warn_at_caller(f"{entry()}: trainable parameter(s) {hooked} carry gradient hooks "
                       "(`Tensor.register_hook` or `register_post_accumulate_grad_hook`), which "
                       "the unlearning steps do not run: they step a copy of the model, whose "
                       "parameters have no hooks, and take per-sample gradients under "
                       "torch.func. A hook that masks or scales a gradient (pruned weights kept "
                       "at zero) changes nothing here: put such a mask in the forward "
                       "(`torch.nn.utils.prune`), or freeze the parameter")


def model_device(model: nn.Module) -> torch.device:
    """Where a run computes when no ``device`` is given: the model's own device, that of its
    parameters (CPU for a model without any). A CUDA model ran on the CPU, and came back there,
    when the default was ``"cpu"``; a model spread over several devices has no one to take.
    Meta parameters hold no values to compute with: left to the model checks, which name
    them."""
    devices = {p.device for p in model.parameters() if not p.is_meta}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"{entry()}: `device`: the model's parameters are on several devices "
                         f"({names}); pass the one to compute on, device=...")
    return devices.pop() if devices else torch.device("cpu")
