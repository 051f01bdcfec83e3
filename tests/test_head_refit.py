"""``head_refit_steps``: steps after the forget steps that move the heads alone by retain
descent, the trunk held fixed, for every step-based method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.unlearning import get_unlearner

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"a": "classification", "b": "regression"}


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 3), "b": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _problem():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    y = {"a": torch.randint(0, 3, (60,), generator=g), "b": torch.randn(60, 1, generator=g)}
    return build_problem(_TwoHeads(), tasks=TASKS, train_data=(x, y),
                         forget_request=ForgetRequest.create(range(6)),
                         shared_parameters=lambda n: n.startswith("trunk."))


def _state(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if prefix in k}


@pytest.mark.parametrize("method, settings", [
    ("interference_aware", {"optimizer": "adam", "lr": 1e-2}),
    ("interference_aware", {"optimizer": "sgd", "lr": 1e-2, "weight_decay": 1e-2}),
    ("neggrad_plus", {"optimizer": "adam", "lr": 1e-2}),
])
def test_refit_steps_move_the_heads_and_leave_the_trunk_where_the_forget_steps_left_it(
        method: str, settings: dict[str, object]) -> None:
    problem = _problem()
    plain = get_unlearner(method, {**settings, "steps": 4}).unlearn(problem)
    refit = get_unlearner(method, {**settings, "steps": 4, "head_refit_steps": 5}
                          ).unlearn(problem)
    trunk_plain, trunk_refit = _state(plain.model, "trunk."), _state(refit.model, "trunk.")
    assert trunk_plain and all(torch.equal(trunk_plain[k], trunk_refit[k]) for k in trunk_plain)
    heads_plain, heads_refit = _state(plain.model, "heads."), _state(refit.model, "heads.")
    assert any(not torch.equal(heads_plain[k], heads_refit[k]) for k in heads_plain)
    assert refit.report.steps == 4 and refit.report.extra["head_refit_steps"] == 5
    assert "head_refit_steps" not in plain.report.extra


def test_a_refit_step_is_a_descent_step_on_the_retain_loss_of_the_heads() -> None:
    """One plain SGD refit step from the original model, over a batch that is the whole
    retain set: every head moves by -lr times the gradient of the summed per-task mean
    retain losses (the loop's retain term), the trunk not at all."""
    from mtunlearn_ext.unlearning.terms import retain_terms

    problem = _problem()
    lr = 0.1
    result = get_unlearner("interference_aware", {
        "steps": 0, "head_refit_steps": 1, "optimizer": "sgd", "momentum": 0.0, "lr": lr,
        "grad_clip": None, "retain_batch_size": len(problem.retain)}).unlearn(problem)
    model = problem.model
    model.zero_grad(set_to_none=True)
    batch = problem.retain.batch(torch.arange(len(problem.retain)))
    total = retain_terms(model(batch["input"]), batch, problem.tasks).total()
    assert total is not None
    total.backward()
    for name, param in model.named_parameters():
        new = dict(result.model.named_parameters())[name]
        if ".trunk." in f".{name}":
            assert torch.equal(new, param), name
        else:
            assert param.grad is not None
            torch.testing.assert_close(new, param - lr * param.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_refit_steps_alone_refit_the_heads_of_the_original_model() -> None:
    problem = _problem()
    result = get_unlearner("interference_aware", {"steps": 0, "head_refit_steps": 3}
                           ).unlearn(problem)
    original = problem.model
    assert all(torch.equal(v, original.state_dict()[k])
               for k, v in _state(result.model, "trunk.").items())
    assert any(not torch.equal(v, original.state_dict()[k])
               for k, v in _state(result.model, "heads.").items())
    # The curves cover the refit steps too, and the step callbacks count them after the others.
    assert result.report.curve_steps["retain_loss"] == [0, 1, 2]


def test_step_callbacks_and_the_progress_bar_count_the_refit_steps() -> None:
    problem = _problem()
    seen: list[int] = []
    unlearner = get_unlearner("interference_aware", {"steps": 2, "head_refit_steps": 3})
    unlearner.step_callbacks.append(lambda step, model: seen.append(step))
    unlearner.unlearn(problem)
    assert seen == [1, 2, 3, 4, 5]
    from mtunlearn_ext.api._unlearn import progress_bar

    bar = progress_bar(get_unlearner("interference_aware",
                                      {"steps": 2, "head_refit_steps": 3}))
    assert bar is not None and bar.total == 5
    bar.close()


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_a_bad_refit_step_count_is_refused(value: object) -> None:
    with pytest.raises((TypeError, ValueError), match="`head_refit_steps` must be an integer"):
        get_unlearner("interference_aware", {"head_refit_steps": value})


def test_unlearn_passes_the_setting_through() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g)
    y = {"a": torch.randint(0, 3, (40,), generator=g), "b": torch.randn(40, 1, generator=g)}
    model = _TwoHeads()
    common = dict(tasks=TASKS, train_data=(x, y), forget_request=ForgetRequest.create(range(4)),
                  shared_parameters=lambda n: n.startswith("trunk."))
    plain, _ = mtunlearn_ext.unlearn(model, config={"steps": 2}, **common)  # type: ignore
    refit, report = mtunlearn_ext.unlearn(model, config={"steps": 2, "head_refit_steps": 2},
                                          **common)  # type: ignore[arg-type]
    assert torch.equal(plain.trunk[0].weight, refit.trunk[0].weight)
    assert not torch.equal(plain.heads["a"].weight, refit.heads["a"].weight)
    assert report.config["head_refit_steps"] == 2
