"""``mtunlearn_ext.unlearn``'s data arguments: input that was accepted and gave a wrong request,
an obscure error later, or a silently different result (found by a review), now refused with
an error naming the argument, or handled as the docs say."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec

TASKS = {"a": "classification", "b": "regression"}
SPECS = [TaskSpec("a", "classification", num_classes=3), TaskSpec("b", "regression")]


class _TwoHeads(nn.Module):
    def __init__(self, features: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(features, 16), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


class _TwoInputs(_TwoHeads):
    def forward(self, x: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return super().forward(x * m)


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.randn(n, 1, generator=g)}


def _rest(x: torch.Tensor, y: dict[str, torch.Tensor], start: int = 5
          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return x[start:], {t: v[start:] for t, v in y.items()}


def _problem(**kwargs: object):  # type: ignore[no-untyped-def]
    return build_problem(_TwoHeads(), tasks=TASKS, shared_parameters=lambda n: n.startswith(
        "trunk."), **kwargs)  # type: ignore[arg-type]


def test_a_forget_set_without_a_pair_of_the_target_tasks_is_refused() -> None:
    """It ran: empty forget losses, and a model changed by retain steps alone."""
    x, y = _data()
    nothing = "the forget set supervises no pair of the target tasks"
    with pytest.raises(ValueError, match=nothing):
        _problem(forget_data=(x[:5], {"a": y["a"][:5]}), retain_data=_rest(x, y),
                 target_tasks=["b"])
    with pytest.raises(ValueError, match=nothing):
        _problem(forget_data=(x[:5], {t: v[:5] for t, v in y.items()},
                              torch.zeros(5, 2, dtype=torch.bool)),
                 retain_data=_rest(x, y))


def test_a_data_set_whose_specs_differ_from_tasks_is_refused() -> None:
    """The losses follow `tasks`, the targets the data set's specs: a different ignore_index
    failed with "Target -1 is out of bounds" inside the step."""
    x, y = _data()
    data = MultiTaskDataset(x, y, SPECS)
    other = [TaskSpec("a", "classification", num_classes=3, ignore_index=0), SPECS[1]]
    with pytest.raises(ValueError, match=r"`train_data` describes task 'a' as .*ignore_index=-1"
                                         r".* but `tasks` as .*ignore_index=0"):
        build_problem(_TwoHeads(), tasks=other, train_data=data,
                      forget_request=ForgetRequest.create(range(3)),
                      shared_parameters=lambda n: n.startswith("trunk."))
    assert len(build_problem(_TwoHeads(), tasks=SPECS, train_data=data,
                             forget_request=ForgetRequest.create(range(3)),
                             shared_parameters=lambda n: n.startswith("trunk.")).forget) == 3


def test_targets_of_unknown_tasks_and_invented_labels_are_refused() -> None:
    x, y = _data()
    # A misspelt key made a full request partial, silently.
    with pytest.raises(KeyError, match=r"`forget_data` has targets for unknown tasks \['B'\]"):
        _problem(forget_data=(x[:5], {"a": y["a"][:5], "B": y["b"][:5]}),
                 retain_data=_rest(x, y))
    with pytest.raises(KeyError, match=r"`train_data` has targets for unknown tasks \['c'\]"):
        _problem(train_data=(x, {**y, "c": y["b"]}), forget_request=ForgetRequest.create([0]))
    # A mask that supervises a task without targets would train on zero placeholders.
    with pytest.raises(ValueError, match=r"`forget_data`'s supervision marks pairs of \['b'\] "
                                         r"supervised, but it has no targets for them"):
        _problem(forget_data=(x[:5], {"a": y["a"][:5]}, torch.ones(5, 2, dtype=torch.bool)),
                 retain_data=_rest(x, y), target_tasks=["a", "b"])
    with pytest.raises(TypeError, match=r"`retain_data` targets of task 'b' must be a tensor "
                                        r"\[N, \.\.\.\] .*got list"):
        _problem(forget_data=(x[:5], {"a": y["a"][:5]}),
                 retain_data=(x[5:], {"a": y["a"][5:], "b": y["b"][5:].tolist()}))
    with pytest.raises(TypeError, match=r"`forget_data` targets of task 'a' must be a tensor .*"
                                        r"got a 0-d tensor"):
        _problem(forget_data=(x[:1], {"a": y["a"][0]}), retain_data=_rest(x, y))


def test_arguments_of_the_other_way_in_are_refused_not_ignored() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match="`retain_data` goes with `forget_data`"):
        _problem(train_data=(x, y), forget_request=ForgetRequest.create([0]),
                 retain_data=(x[:6], y))
    with pytest.raises(ValueError, match="a `forget_request` names instances of `train_data`"):
        _problem(forget_data=(x[:5], {"a": y["a"][:5]}), retain_data=_rest(x, y),
                 forget_request=ForgetRequest.create([30, 31], ["b"]))


def test_duplicate_target_tasks_are_refused_on_both_ways_in() -> None:
    """["a", "a"] weighted task a twice (a different model) on the forget_data way in."""
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape("`target_tasks` ['a', 'a'] names a task "
                                                   "twice")):
        _problem(forget_data=(x[:5], {"a": y["a"][:5]}), retain_data=_rest(x, y),
                 target_tasks=["a", "a"])
    with pytest.raises(ValueError, match="duplicates"):
        _problem(train_data=(x, y), forget_request=ForgetRequest.create([0], ["a", "a"]))


def test_a_tuple_retain_set_beside_a_forget_data_set_gets_ids_of_its_own() -> None:
    """The tuple got ids 0..N-1 and the data set kept its own 0..4: a false "supervised in
    both" error for a full request, and for a partial one other instances taken for the forget
    instances' retained pairs."""
    x, y = _data()
    forget = MultiTaskDataset(x[:5], {"a": y["a"][:5], "b": y["b"][:5]}, SPECS)
    problem = _problem(forget_data=forget, retain_data=(x[5:], y_rest := {
        t: v[5:] for t, v in y.items()}))
    assert problem.is_full
    assert set(problem.retain.ids.tolist()).isdisjoint(problem.forget.ids.tolist())
    partial = forget.with_supervision(torch.tensor([[True, False]]).expand(5, 2).clone())
    problem = _problem(forget_data=partial, retain_data=(x[5:], y_rest), target_tasks=["a"])
    assert not problem.is_full
    assert set(problem.retain.ids.tolist()).isdisjoint(problem.forget.ids.tolist())


def test_the_model_is_checked_on_the_forget_inputs() -> None:
    """Forget inputs of another width passed and failed inside the step with a raw error."""
    x, y = _data()
    with pytest.raises(ValueError, match=r"the model fails on the forget set's inputs .*"
                                         r"mat1 and mat2"):
        _problem(forget_data=(torch.randn(5, 9), {"a": y["a"][:5]}), retain_data=(x, y))


def test_equal_inputs_are_matched_whatever_the_key_order_and_memory_layout() -> None:
    """Several inputs were matched by position (a dict with its keys in another order never
    matched, so a still-supervised forget pair passed), and the prefilter's row sums depended
    on the memory layout (a column-major copy of a row was not found)."""
    x, y = _data()
    mask = torch.ones_like(x)
    common = dict(tasks=TASKS, shared_parameters=lambda n: n.startswith("trunk."))
    forget_y = {"a": y["a"][:5]}
    still = "`forget_data` row 0 is also `retain_data` row 0 (same input)"
    with pytest.raises(ValueError, match=re.escape(still)):
        build_problem(_TwoInputs(), forget_data=({"m": mask[:5], "x": x[:5]}, forget_y),
                      retain_data=({"x": x, "m": mask}, y), **common)  # type: ignore[arg-type]
    wide = x * torch.logspace(-8, 8, 8)  # values over 16 orders of magnitude
    column_major = wide.t().contiguous().t()
    assert torch.equal(column_major, wide) and not column_major.is_contiguous()
    with pytest.raises(ValueError, match=re.escape(still)):
        build_problem(_TwoHeads(), forget_data=(column_major[:5], forget_y),
                      retain_data=(wide, y), **common)  # type: ignore[arg-type]
    # Linked in a partial request (the retain rows keep only task b): rows 0-4's ids.
    supervision = torch.ones(40, 2, dtype=torch.bool)
    supervision[:5, 0] = False
    problem = build_problem(_TwoInputs(), forget_data=({"m": mask[:5], "x": x[:5]}, forget_y),
                            retain_data=({"x": x, "m": mask}, y, supervision),
                            **common)  # type: ignore[arg-type]
    assert problem.forget.ids.tolist() == [0, 1, 2, 3, 4]


# -- found by the review of the unlearning core -------------------------------------------------


class _NormAndDropout(nn.Module):
    """A trunk with running statistics (BatchNorm) and dropout: layers whose forward depends
    on the train/eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Dropout(0.3))
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


@pytest.mark.parametrize("modes", ["eval", "mixed"])
def test_unlearn_leaves_every_module_mode_output_and_buffer_of_the_model(modes: str) -> None:
    """``unlearn`` switched the caller's model into training mode (the report's loss pass saved
    the wrapper's mode, always training, and restored it recursively): the user's next forward
    then normalised with the batch's statistics, wrote them into the running ones and drew
    dropout masks. Each module must keep its own mode, a mixed one included (a frozen
    BatchNorm inside a training model), and so its outputs and buffers."""
    x, y = _data()
    model = _NormAndDropout()
    with torch.no_grad():
        model.train()
        model(x)  # running statistics of its own
    if modes == "eval":
        model.eval()
    else:  # a training model with a frozen BatchNorm and its dropout off
        model.train()
        model.trunk[1].eval()
        model.trunk[3].eval()
    before_modes = _modes(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before_out = model(x[:6])
    common = dict(tasks=TASKS, train_data=(x, y), shared_parameters=lambda n: n.startswith(
        "trunk."))
    problem = build_problem(model, forget_request=ForgetRequest.create(range(5)),
                            **common)  # type: ignore[arg-type]
    assert problem.model.training == model.training  # the wrapper has the module's mode
    new, _ = mtunlearn_ext.unlearn(model, forget_request=ForgetRequest.create(range(5)),
                                   config={"steps": 2}, **common)  # type: ignore[arg-type]
    assert _modes(model) == before_modes
    assert not any(_modes(new).values())  # the unlearned copy comes back in eval mode
    with torch.no_grad():
        after_out = model(x[:6])  # the user's next forward on the original
    for task in before_out:
        assert torch.equal(before_out[task], after_out[task]), task
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key


@pytest.mark.parametrize("method", ["interference_aware", "neggrad_plus"])
def test_momentum_of_one_or_more_is_refused(method: str) -> None:
    """Momentum 1.5 was accepted (only finite and >= 0 were checked) and blew the weights up:
    SGD's velocity is a geometric sum with ratio `momentum`, which never decays at 1 or more."""
    from mtunlearn_ext.unlearning import get_unlearner

    for bad in (1.0, 1.5, 3.0):
        with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\)"):
            get_unlearner(method, {"momentum": bad})
    for good in (0.0, 0.5, 0.99):
        assert get_unlearner(method, {"momentum": good}).config.momentum == good  # type: ignore[attr-defined]
    x, y = _data()
    with pytest.raises(ValueError, match=r"`momentum` must be in \[0, 1\), got 1\.5"):
        mtunlearn_ext.unlearn(_TwoHeads(), tasks=TASKS, train_data=(x, y),
                              forget_request=ForgetRequest.create(range(5)), method=method,
                              shared_parameters=lambda n: n.startswith("trunk."),
                              config={"steps": 1, "momentum": 1.5})


def test_forget_objective_keys_must_name_a_task_or_a_kind() -> None:
    """A misspelt task or kind in a `forget_objective` mapping was ignored: the run went on
    with the default objective for that task, and the report said so only in passing."""
    from mtunlearn_ext.unlearning import get_unlearner
    from mtunlearn_ext.unlearning.interference import interference_matrix
    from mtunlearn_ext.unlearning.interference_aware import InterferenceAwareConfig

    x, y = _data()
    common = dict(tasks=TASKS, train_data=(x, y),
                  shared_parameters=lambda n: n.startswith("trunk."))
    for key in ("knd", "clasification", "A"):
        message = (rf"`forget_objective` has key\(s\) \['{key}'\] that are neither a task of the "
                   rf"problem nor a task kind; valid keys: the tasks \['a', 'b'\] or the kinds "
                   rf"\['classification', 'segmentation', 'depth', 'normals', 'regression'\]")
        with pytest.raises(ValueError, match=message):
            mtunlearn_ext.unlearn(_TwoHeads(), forget_request=ForgetRequest.create(range(5)),
                                  config={"steps": 1, "forget_objective": {key: "ascent"}},
                                  **common)  # type: ignore[arg-type]
    partial = ForgetRequest.create(range(5), ["a"])
    # Valid keys: a target task, a kind (also one that no task has), a non-target task.
    for choice, used in (({"a": "ascent"}, "ascent"),
                         ({"classification": "ascent", "depth": "uniform"}, "ascent"),
                         ({"b": "ascent"}, "capped_ascent")):
        _, report = mtunlearn_ext.unlearn(_TwoHeads(), forget_request=partial,
                                          config={"steps": 1, "forget_objective": choice},
                                          **common)  # type: ignore[arg-type]
        assert report.extra["forget_objectives"] == {"a": used}
    # Every layer that builds the objectives: a baseline, and the interference diagnostics.
    problem = build_problem(_TwoHeads(), forget_request=partial, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`forget_objective` has key\(s\) \['knd'\]"):
        get_unlearner("neggrad_plus", {"steps": 1, "forget_objective": {"knd": "ascent"}}
                      ).unlearn(problem)
    with pytest.raises(ValueError, match=r"`forget_objective` has key\(s\) \['knd'\]"):
        interference_matrix(problem, InterferenceAwareConfig(forget_objective={"knd": "ascent"}))


def test_a_request_without_a_pair_of_its_target_tasks_names_them() -> None:
    """A request whose instances have no label of its target task failed with "the forget set
    is empty", naming neither the task nor the request (the empty-set check came before the
    more specific one)."""
    import dataclasses

    x, y = _data()
    supervision = torch.ones(40, 2, dtype=torch.bool)
    supervision[:5, 1] = False  # instances 0-4 have no "b" label
    message = (r"unlearn: `forget_request` names 5 instances, none with a supervised pair of "
               r"the target task \['b'\] in `train_data`")
    with pytest.raises(ValueError, match=message):
        _problem(train_data=(x, y, supervision), forget_request=ForgetRequest.create(range(5),
                                                                                     ["b"]))
    with pytest.raises(ValueError, match=message):
        mtunlearn_ext.unlearn(_TwoHeads(), tasks=TASKS, train_data=(x, y, supervision),
                              forget_request=ForgetRequest.create(range(5), ["b"]),
                              shared_parameters=lambda n: n.startswith("trunk."),
                              config={"steps": 1})
    # Instances with labels of the other task only: the full request forgets those.
    problem = _problem(train_data=(x, y, supervision), forget_request=ForgetRequest.create(
        range(5)))
    assert int(problem.forget.supervision[:, 1].sum()) == 0
    # The problem's own check names the target tasks too.
    empty = problem.forget.subset(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the forget set is empty: no instance of the request "
                                         r"has a supervised pair of the target tasks "
                                         r"\['a', 'b'\]"):
        dataclasses.replace(problem, forget=empty).validate()
