"""Held-out (validation) data: the generated benchmarks' validation split, the problem's
``held_out`` set, and the interference-aware method's forget caps calibrated on it."""

from __future__ import annotations

import warnings

import pytest
import torch

import mtunlearn_ext
from mtunlearn_ext.data import ForgetRequest
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.data.indoor import make_indoor
from mtunlearn_ext.data.registry import read_benchmark, save_benchmark
from mtunlearn_ext.data.street import make_street
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.unlearning import UnlearningProblem, get_unlearner
from unlearning_helpers import TwoHeads

warnings.filterwarnings("ignore", category=RuntimeWarning)

SETTINGS = {"steps": 2, "lr": 3e-3, "forget_batch_size": 6, "retain_batch_size": 12,
            "num_per_sample": 6, "num_coupled_per_sample": 3, "refresh_every": 2,
            "num_snapshots": 8, "snapshot_groups": 2, "cap_quantile": 0.5}


# Single-threaded tiny-model tests on the shared trained indoor/tiny model (conftest).
pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(bench, model, held_out=None) -> UnlearningProblem:  # type: ignore[no-untyped-def]
    request = ForgetRequest.create(bench.train.ids[:8], None)
    return UnlearningProblem.from_request(model, bench.train, request, held_out=held_out)


# -- the data ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_indoor, make_street], ids=["indoor", "street"])
def test_validation_split_leaves_train_and_test_unchanged(make) -> None:  # type: ignore[no-untyped-def]
    plain = make(6, 4, size=(8, 12), seed=3)
    with_val = make(6, 4, size=(8, 12), seed=3, num_validation=5)
    assert plain.validation is None
    for a, b in ((plain.train, with_val.train), (plain.test, with_val.test)):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.ids, b.ids)
        assert all(torch.equal(a.targets[t], b.targets[t]) for t in a.targets)
    val = with_val.validation
    assert val is not None and len(val) == 5
    assert val.ids.tolist() == list(range(10, 15))  # after the train and test ids
    assert not torch.equal(val.inputs, with_val.test.inputs[:5])
    with pytest.raises(ValueError, match="num_validation"):
        make(6, 4, size=(8, 12), num_validation=-1)


def test_benchmark_file_keeps_the_validation_split(tmp_path, indoor_tiny) -> None:  # type: ignore[no-untyped-def]
    assert indoor_tiny.validation is not None and len(indoor_tiny.validation) == 12
    path = tmp_path / "b.pt"
    save_benchmark(indoor_tiny, path)
    again = read_benchmark(path)
    assert again.validation is not None
    assert torch.equal(again.validation.inputs, indoor_tiny.validation.inputs)
    assert torch.equal(again.validation.ids, indoor_tiny.validation.ids)


# -- the problem -------------------------------------------------------------------------------


def test_problem_rejects_bad_held_out_sets(indoor_tiny, indoor_tiny_model) -> None:  # type: ignore[no-untyped-def]
    bench, model = indoor_tiny, indoor_tiny_model
    with pytest.raises(ValueError, match="shares 4 instance ids with the training set"):
        _problem(bench, model, bench.train.subset(torch.arange(4))).validate()
    with pytest.raises(ValueError, match="held_out set is empty"):
        _problem(bench, model, bench.validation.subset(torch.arange(0))).validate()
    other = MultiTaskDataset(indoor_tiny.validation.inputs,
                             {"depth": indoor_tiny.validation.targets["depth"]},
                             [indoor_tiny.tasks[1]], ids=indoor_tiny.validation.ids)
    with pytest.raises(ValueError, match="held_out set has tasks"):
        _problem(indoor_tiny, indoor_tiny_model, other).validate()
    _problem(indoor_tiny, indoor_tiny_model, indoor_tiny.validation).validate()


# -- the caps ----------------------------------------------------------------------------------


def _median_losses(model, data) -> dict[str, float]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = model(data.inputs)
    return {t.name: float(torch.quantile(task_loss(t, out[t.name], data.targets[t.name]), 0.5))
            for t in data.tasks}


@pytest.mark.parametrize("reference", ["held_out", "auto", "retain"])
def test_caps_are_the_quantile_of_the_chosen_set(indoor_tiny, indoor_tiny_model, reference: str) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(indoor_tiny, indoor_tiny_model, indoor_tiny.validation)
    result = get_unlearner("interference_aware",
                           {**SETTINGS, "cap_reference": reference}).unlearn(problem)
    extra = result.report.extra["interference_aware"]
    source = "retain" if reference == "retain" else "held_out"
    assert extra["forget_caps_from"] == source
    data = indoor_tiny.validation if source == "held_out" else problem.retain.subset(
        torch.arange(min(128, len(problem.retain))))
    expected = _median_losses(indoor_tiny_model, data)
    assert extra["forget_caps"] == pytest.approx(expected, rel=1e-5)


def test_held_out_caps_need_held_out_data(indoor_tiny, indoor_tiny_model) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(indoor_tiny, indoor_tiny_model)
    with pytest.raises(ValueError, match="cap_reference='held_out' needs a problem"):
        get_unlearner("interference_aware",
                      {**SETTINGS, "cap_reference": "held_out"}).unlearn(problem)
    auto = get_unlearner("interference_aware", {**SETTINGS, "cap_reference": "auto"})
    assert auto.unlearn(problem).report.extra["interference_aware"]["forget_caps_from"] == "retain"
    with pytest.raises(ValueError, match="cap_reference"):
        get_unlearner("interference_aware", {"cap_reference": "test"})


def test_public_api_takes_held_out_data(indoor_tiny, indoor_tiny_model) -> None:  # type: ignore[no-untyped-def]
    val = indoor_tiny.validation
    _, report = mtunlearn_ext.unlearn(
        indoor_tiny_model, tasks=indoor_tiny.tasks, train_data=indoor_tiny.train,
        forget_request=ForgetRequest.create(indoor_tiny.train.ids[:8], None),
        held_out_data=(val.inputs, dict(val.targets)),
        config={**SETTINGS, "cap_reference": "held_out"})
    extra = report.extra["interference_aware"]
    assert extra["forget_caps_from"] == "held_out"
    assert extra["forget_caps"] == pytest.approx(_median_losses(indoor_tiny_model, val), rel=1e-5)


# -- rank-matched caps -------------------------------------------------------------------------


@pytest.mark.parametrize("depth_weighted", [False, True], ids=["task-loss", "depth-weighted"])
def test_rank_matched_caps_give_each_forget_pair_its_reference_quantile(indoor_tiny, indoor_tiny_model, depth_weighted: bool) -> None:  # type: ignore[no-untyped-def]
    """Pair caps are the held-out quantiles at the pairs' own ranks: they keep the forget
    pairs' order and their mean is the mean of those quantiles. Losses are measured in each
    objective's own loss (the depth-weighted objective: the depth-weighted error)."""
    from mtunlearn_ext.unlearning.objectives import CappedAscentObjective, depth_weighted_abs_error

    def loss_of(spec, pred, target):  # type: ignore[no-untyped-def]
        if depth_weighted and spec.kind == "depth":
            return depth_weighted_abs_error(pred, target)
        return task_loss(spec, pred, target)

    problem = _problem(indoor_tiny, indoor_tiny_model, indoor_tiny.validation)
    objective = {"depth": "capped_depth_weighted_ascent"} if depth_weighted else None
    unlearner = get_unlearner("interference_aware", {**SETTINGS, "cap_quantile": "rank",
                                                     "cap_reference": "held_out", "steps": 1,
                                                     "forget_objective": objective})
    seen: dict[str, CappedAscentObjective] = {}
    original_setup = unlearner.setup

    def keep_objectives(ctx, report):  # type: ignore[no-untyped-def]
        original_setup(ctx, report)
        seen.update({t: o for t, o in ctx.objectives.items()
                     if isinstance(o, CappedAscentObjective)})

    unlearner.setup = keep_objectives  # type: ignore[method-assign]
    forget_view = problem.forget
    with torch.no_grad():
        forget_out = indoor_tiny_model(forget_view.inputs)
        held_out = indoor_tiny_model(indoor_tiny.validation.inputs)
    result = unlearner.unlearn(problem)
    extra = result.report.extra["interference_aware"]
    assert set(seen) == {t.name for t in indoor_tiny.tasks}
    for spec in indoor_tiny.tasks:
        own = loss_of(spec, forget_out[spec.name], forget_view.targets[spec.name]).double()
        reference = loss_of(spec, held_out[spec.name],
                            indoor_tiny.validation.targets[spec.name]).double()
        ranks = torch.argsort(torch.argsort(own)).double()
        expected = torch.quantile(reference, (ranks + 0.5) / own.numel())
        caps = seen[spec.name].caps_for(forget_view.ids, expected)
        assert isinstance(caps, torch.Tensor)
        torch.testing.assert_close(caps, expected, rtol=1e-4, atol=1e-6)
        # the lowest-loss forget pair gets the lowest cap, the highest the highest
        assert int(torch.argmin(caps)) == int(torch.argmin(own))
        assert int(torch.argmax(caps)) == int(torch.argmax(own))
        assert extra["forget_caps"][spec.name] == pytest.approx(float(expected.mean()), rel=1e-4)


def test_pair_caps_bound_only_their_own_instances(indoor_tiny) -> None:  # type: ignore[no-untyped-def]
    from mtunlearn_ext.unlearning.objectives import CappedAscentObjective

    spec = next(t for t in indoor_tiny.tasks if t.kind == "depth")
    objective = CappedAscentObjective(spec)
    objective.cap = 0.5
    objective.set_pair_caps(torch.tensor([7, 3]), torch.tensor([0.1, 0.2]))
    loss = torch.tensor([1.0, 1.0, 0.05, 1.0])
    caps = objective.caps_for(torch.tensor([3, 7, 7, 9]), loss)
    assert torch.equal(caps, torch.tensor([0.2, 0.1, 0.1, 0.5]))  # 9 has no own cap
    assert objective.caps_for(None, loss) == 0.5
    with pytest.raises(ValueError, match="distinct"):
        objective.set_pair_caps(torch.tensor([1, 1]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="finite"):
        objective.set_pair_caps(torch.tensor([1, 2]), torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="same length"):
        objective.set_pair_caps(torch.tensor([1, 2]), torch.tensor([0.1]))


def test_cap_quantile_rejects_unknown_strings() -> None:
    with pytest.raises(ValueError, match="cap_quantile"):
        get_unlearner("interference_aware", {"cap_quantile": "median"})
    with pytest.raises(ValueError, match="cap_quantile"):
        get_unlearner("interference_aware", {"cap_quantile": 1.5})


# -- held-out data the run does not read ---------------------------------------------------------


def _small() -> torch.nn.Module:
    torch.manual_seed(0)
    return TwoHeads()


def _small_data(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g),
            {"kind": torch.randint(0, 3, (n,), generator=g), "size": torch.randn(n, 1, generator=g)})


def _run(**kwargs):  # type: ignore[no-untyped-def]
    """unlearn() on the small model, and the warnings it gave."""
    x, y = _small_data(40, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, report = mtunlearn_ext.unlearn(
            _small(), tasks={"kind": "classification", "size": "regression"}, train_data=(x, y),
            forget_request=ForgetRequest.create(range(5)),
            shared_parameters=lambda n: n.startswith("trunk."), **kwargs)
    unused = [str(w.message) for w in caught if "`held_out_data` was not used" in str(w.message)]
    return new, report, unused


@pytest.mark.parametrize(("config", "method", "says"), [
    ({"steps": 2}, "interference_aware",
     "the forget caps come from the retain set (cap_reference='retain', the default); pass "
     "config={'cap_reference': 'held_out'} (or 'auto')"),
    ({"steps": 2, "cap_reference": "held_out", "cap_quantile": None}, "interference_aware",
     "the forget caps are the objectives' own (cap_quantile=None)"),
    ({"steps": 2, "cap_reference": "held_out", "forget_objective": "ascent"}, "interference_aware",
     "no target task has a capped forget objective (forget objectives {'kind': 'ascent', "
     "'size': 'ascent'})"),
    # The default cap_reference with no capped objective: no caps at all, not "from the
    # retain set" (the reason given first, wrongly, before the final review).
    ({"steps": 2, "forget_objective": "ascent"}, "interference_aware",
     "no target task has a capped forget objective"),
    ({"steps": 2}, "interference_aware_no_task", "cap_reference='retain', the default"),
    ({"steps": 2}, "neggrad_plus", "method 'neggrad_plus' does not read held-out data"),
])
def test_held_out_data_that_the_run_does_not_read_is_warned_about(config, method: str, says: str) -> None:  # type: ignore[no-untyped-def]
    """With the defaults (cap_reference="retain") held_out_data was validated and then ignored:
    the same model, bit for bit, and not a word. It still changes nothing (the defaults are
    kept), but unlearn says so and names the setting."""
    held = _small_data(30, 1)
    new, report, unused = _run(held_out_data=held, method=method, config=config)
    assert len(unused) == 1 and says in unused[0], unused
    plain, plain_report, none = _run(method=method, config=config)
    assert not none
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in new.state_dict().items())
    assert report.extra["summary"] == plain_report.extra["summary"]


@pytest.mark.parametrize("reference", ["held_out", "auto"])
def test_held_out_data_that_sets_the_caps_is_not_warned_about(reference: str) -> None:
    held = _small_data(30, 1)
    new, report, unused = _run(held_out_data=held,
                               config={"steps": 2, "cap_reference": reference})
    assert not unused
    assert report.extra["interference_aware"]["forget_caps_from"] == "held_out"
    _, retain_caps, _ = _run(held_out_data=held, config={"steps": 2, "cap_reference": "retain"})
    caps = report.extra["interference_aware"]["forget_caps"]
    assert caps and caps != retain_caps.extra["interference_aware"]["forget_caps"]


def test_a_method_from_outside_the_library_is_not_second_guessed() -> None:
    """A method defined elsewhere may read problem.held_out itself: no warning for it."""
    from mtunlearn_ext.api._unlearn import held_out_unused
    from mtunlearn_ext.unlearning import UnlearningReport
    from mtunlearn_ext.unlearning.baselines.neggrad_plus import NegGradPlus

    class Mine(NegGradPlus):
        name = "mine"

    assert held_out_unused(Mine(), UnlearningReport(method="mine", config={})) is None
    assert held_out_unused(NegGradPlus(), UnlearningReport(method="neggrad_plus", config={})) is not None


def test_equal_rows_are_found_whatever_the_rows_around_them() -> None:
    """Row prints were float sums, whose rounding depended on how many rows were summed: with
    two threads a long row alone is split between them, so 2-4 of 20 single-row views of
    1M-value rows got another print than in the training tensor and a held-out row equal to a
    training row went unnoticed. The prints are now integer sums of the bit patterns."""
    from mtunlearn_ext.api._instance_matching import equal_input_rows

    torch.set_num_threads(2)  # restored by conftest's autouse fixture
    train = torch.randn(20, 1_000_003, generator=torch.Generator().manual_seed(0))
    for row in range(20):
        assert equal_input_rows(train[row:row + 1], train, torch.arange(20)) == [(0, row)]
    # -0.0 equals 0.0; a permuted (non-contiguous) layout holds the same rows.
    signed = train[:3].clone()
    signed[1, 7] = -0.0
    unsigned = train[:3].clone()
    unsigned[1, 7] = 0.0
    assert equal_input_rows(signed[1:2], unsigned, torch.arange(3)) == [(0, 1)]
    images = torch.randn(6, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert equal_input_rows(channels_last[2:4], images, torch.arange(6)) == [(0, 2), (1, 3)]


def test_equal_rows_in_other_dtypes_are_found() -> None:
    """Prints of the values' own bit patterns missed a training row stored in another float
    dtype (float32 training data, the same row as float64 held-out data)."""
    from mtunlearn_ext.api._instance_matching import equal_input_rows

    train = torch.randn(6, 50, generator=torch.Generator().manual_seed(2))
    for other, reference in [(train.double(), train), (train.half(), train.half().float()),
                             (train.to(torch.bfloat16), train.to(torch.bfloat16).double())]:
        assert equal_input_rows(other[2:3], reference, torch.arange(6)) == [(0, 2)], other.dtype
