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
