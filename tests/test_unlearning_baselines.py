"""The unlearning interface and every baseline, end to end on tiny digits.

Every baseline runs on a full-task and a partial-task request of a small trained model; the
checks are the contract of an unlearning method: a new model (the input one untouched, bit for
bit), a changed model whose forget loss moves the way forgetting requires, a report with curves
and settings, determinism by seed, and, for partial requests, the non-target supervision of the
forget instances left alone.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch

import mtunlearn_ext
from mtunlearn_ext import ops
from mtunlearn_ext.data import ForgetRequest
from mtunlearn_ext.data.registry import load_benchmark
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.models import ParameterSplit, build_model
from mtunlearn_ext.training import TrainConfig, train
from mtunlearn_ext.unlearning import (
    BASELINES,
    FORGET_OBJECTIVES,
    GradientUnlearner,
    ParameterGroups,
    StepConfig,
    UnlearningProblem,
    available_unlearners,
    get_unlearner,
    make_forget_objectives,
    per_sample_retain_grads,
    per_sample_retain_grads_and_losses,
    per_sample_task_grads_and_losses,
    register_unlearner,
    summed_pass_grads,
)
from mtunlearn_ext.unlearning.baselines.salun import saliency_threshold

from unlearning_helpers import (
    WIDE_TASKS,
    WideTrunkThreeHeads,
    peak_allocated_bytes,
    wide_trunk_data,
)

warnings.filterwarnings("ignore", category=RuntimeWarning)

RECIPE = TrainConfig(epochs=15, batch_size=32, lr=3e-3, seed=0)
STEP_METHODS = [m for m in BASELINES if m != "retrain"]
# Few steps keep the file fast; learning rates big enough that every method visibly acts.
SETTINGS: dict[str, dict[str, object]] = {
    "finetune": {"steps": 30, "lr": 1e-3},
    "gradient_ascent": {"steps": 10, "lr": 5e-3},
    "neggrad_plus": {"steps": 20, "lr": 5e-3},
    "random_labels": {"steps": 20, "lr": 5e-3},
    "salun": {"steps": 20, "lr": 5e-3},
    "orthograd": {"steps": 20, "lr": 5e-3, "num_per_sample": 16},
    "pcgrad": {"steps": 20, "lr": 5e-3},
    "scrub": {"steps": 20, "lr": 5e-3, "optimizer": "sgd"},
    "retrain": {},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_benchmark("digits", size="tiny", seed=0)


@pytest.fixture(scope="module")
def original(bench):  # type: ignore[no-untyped-def]
    model = build_model(bench, seed=0)
    train(model, bench.train, None, RECIPE, progress=False)
    return model.eval()


def _problem(bench, model, partial: bool) -> UnlearningProblem:  # type: ignore[no-untyped-def]
    ids = bench.train.ids[torch.randperm(len(bench.train),
                                         generator=torch.Generator().manual_seed(1))[:30]]
    request = ForgetRequest.create(ids, ["digit"] if partial else None)
    return UnlearningProblem.from_request(
        model, bench.train, request, seed=0, train_config=RECIPE,
        model_factory=lambda: build_model(bench, seed=0))


def _forget_loss(model, problem: UnlearningProblem) -> float:  # type: ignore[no-untyped-def]
    """Mean task loss over the forget pairs (target tasks of the forget instances)."""
    with torch.no_grad():
        out = model(problem.forget.inputs)
        values = []
        for spec in problem.target_specs():
            col = problem.forget.task_index(spec.name)
            rows = problem.forget.supervision[:, col]
            values.append(task_loss(spec, out[spec.name], problem.forget.targets[spec.name])[rows])
    return float(torch.cat(values).mean())


def _state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_lists_every_baseline() -> None:
    assert set(BASELINES) <= set(available_unlearners())
    with pytest.raises(KeyError, match="registered"):
        get_unlearner("no_such_method")
    with pytest.raises(TypeError, match="unknown settings"):
        get_unlearner("neggrad_plus", {"stepz": 3})
    with pytest.raises(ValueError, match="steps"):
        get_unlearner("neggrad_plus", steps=-1)
    with pytest.raises(ValueError, match="forget objective"):
        get_unlearner("gradient_ascent", forget_objective="nope")

    # Every method's settings are checked against their types (these were accepted, and used
    # half-way: a float step count, a string as a switch).
    for method, settings, message in (
            ("neggrad_plus", {"steps": 1.5}, "`steps` must be an integer, got 1.5"),
            ("interference_aware", {"task_projection": "yes"},
             "`task_projection` must be True or False, got 'yes'"),
            ("interference_aware", {"coupled": -1}, "`coupled` must be True or False, got -1"),
            ("interference_aware", {"cap_rows": "all"}, "`cap_rows` must be an integer"),
            ("orthograd", {"retain_batch_size": 2.5}, "`retain_batch_size` must be an integer"),
            ("retrain", {"epochs": "10"}, "`epochs` must be an integer or None, got '10'"),
            ("finetune", {"lr": True}, "`lr` must be a number, got True")):
        with pytest.raises(ValueError, match=re.escape(message)):
            get_unlearner(method, settings)
    get_unlearner("finetune", {"lr": 1, "steps": 3})  # an integer is a number
    method = get_unlearner("orthograd", {"steps": 3}, lr=0.5)
    assert method.config.steps == 3 and method.config.lr == 0.5


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("method", list(BASELINES))
def test_baseline_end_to_end(bench, original, method: str, partial: bool) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(bench, original, partial)
    before = _state(original)
    data_before = {k: v.clone() for k, v in bench.train.targets.items()}
    forget_before = _forget_loss(original, problem)

    result = get_unlearner(method, SETTINGS[method]).unlearn(problem)

    # The input model and the data are untouched, bit for bit; the output is a new module.
    assert result.model is not original
    for name, tensor in original.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{method} modified the input model ({name})"
    for name, tensor in bench.train.targets.items():
        assert torch.equal(tensor, data_before[name])
    # The model changed, and is finite.
    after = result.model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not result.model.training

    # The forget loss rises (every method that sees the forget set, and retraining, which never
    # sees it); fine-tuning, which never sees it either, must at least not fit it better.
    forget_after = _forget_loss(result.model, problem)
    if method == "finetune":
        assert forget_after > forget_before - 0.02
    else:
        assert forget_after > forget_before + 0.05, (method, forget_before, forget_after)

    report = result.report
    assert report.method == method and report.wall_time_s > 0
    assert report.request["full"] is (not partial)
    assert report.config == get_unlearner(method, SETTINGS[method]).config.to_dict()
    assert report.steps > 0
    assert len(report.curves["retain_loss"]) >= 1
    if method != "retrain":
        steps = SETTINGS[method]["steps"]
        assert len(report.curves["forget_loss"]) == steps
        assert len(report.curves["retain_loss"]) == steps
        assert all(math.isfinite(v) for v in report.curves["retain_loss"])
        # Forget objectives exist for the target tasks only.
        assert set(report.extra["forget_objectives"]) == set(problem.target_tasks)
        assert {k.split("/")[1] for k in report.curves if k.startswith("forget_loss/")} \
            == set(problem.target_tasks)


@pytest.mark.parametrize("method", ["gradient_ascent", "neggrad_plus", "orthograd", "scrub"])
def test_deterministic_by_seed(bench, original, method: str) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(bench, original, partial=False)
    first = get_unlearner(method, SETTINGS[method]).unlearn(problem).model.state_dict()
    second = get_unlearner(method, SETTINGS[method]).unlearn(problem).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # The caller's global random state is left as it was.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get_unlearner(method, SETTINGS[method]).unlearn(problem)
    assert torch.equal(torch.rand(3), expected)
    problem.seed = 7
    third = get_unlearner(method, SETTINGS[method]).unlearn(problem).model.state_dict()
    assert any(not torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize("method", ["neggrad_plus", "retrain"])
def test_a_cpu_run_leaves_the_cuda_generators_alone(bench, original, method: str,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproducibility review: unlearn (and the trainer and model factory that retraining
    uses) seeded with torch.manual_seed, which reseeds every CUDA generator too, but gave back
    only the CPU one: on a machine with a GPU a CPU run reset the caller's CUDA random streams
    (or queued that reset until CUDA starts). A CPU run now seeds the CPU generator alone."""
    seeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    problem = _problem(bench, original, partial=False)
    first = get_unlearner(method, SETTINGS[method]).unlearn(problem).model.state_dict()
    assert seeded == []
    # And the run still depends on its seed alone.
    torch.random.default_generator.manual_seed(321)
    second = get_unlearner(method, SETTINGS[method]).unlearn(problem).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_partial_request_keeps_non_target_supervision(bench, original) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(bench, original, partial=True)
    forget_ids = set(problem.request.instance_ids)
    # The split: forget supervises only the target task; the forget instances stay in the retain
    # set with their non-target labels, unchanged.
    target_col = problem.forget.task_index("digit")
    assert problem.forget.supervision[:, target_col].all()
    assert not problem.forget.supervision[:, [c for c in range(3) if c != target_col]].any()
    rows = [i for i, x in enumerate(problem.retain.ids.tolist()) if x in forget_ids]
    assert len(rows) == len(forget_ids)
    sup = problem.retain.supervision[rows]
    assert not sup[:, target_col].any() and sup[:, [1, 2]].all()
    train_pos = bench.train.positions_of(problem.retain.ids[rows])
    for task in ("parity", "magnitude"):
        assert torch.equal(problem.retain.targets[task][rows], bench.train.targets[task][train_pos])

    # A forget-only method never moves a non-target head (its gradient is exactly zero there),
    # while it does move the target head and the backbone.
    result = get_unlearner("gradient_ascent", SETTINGS["gradient_ascent"]).unlearn(problem)
    groups_before = ParameterGroups.from_model(original)
    groups_after = ParameterGroups.from_model(result.model)
    for task in ("parity", "magnitude"):
        for (_, p0), (_, p1) in zip(groups_before.heads[task], groups_after.heads[task]):
            assert torch.equal(p0, p1)
    assert any(not torch.equal(p0, p1) for (_, p0), (_, p1)
               in zip(groups_before.heads["digit"], groups_after.heads["digit"]))
    assert any(not torch.equal(p0, p1) for (_, p0), (_, p1)
               in zip(groups_before.shared, groups_after.shared))


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "task_scaled"])
def test_per_sample_grads_match_autograd(bench, original, scaled: bool) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(bench, original, partial=True)
    groups = ParameterGroups.from_model(original)
    batch = problem.retain.batch(torch.arange(5))
    batch["supervision"][0, 1] = False  # a sample with one task unsupervised
    scale = [1.0 + 0.5 * c for c in range(len(problem.tasks))] if scaled else None
    grads, losses = per_sample_retain_grads_and_losses(original, batch, problem.tasks,
                                                       groups.all_names, task_scale=scale)
    if not scaled:
        for g, plain in zip(grads, per_sample_retain_grads(original, batch, problem.tasks,
                                                           groups.all_names)):
            torch.testing.assert_close(g, plain)
    for i in range(5):
        out = original(batch["input"][i:i + 1])
        values = {spec.name: task_loss(spec, out[spec.name],
                                       batch["targets"][spec.name][i:i + 1])[0]
                  for spec in problem.tasks}
        total = sum(values[spec.name] * (1.0 if scale is None else scale[c])
                    for c, spec in enumerate(problem.tasks) if batch["supervision"][i, c])
        expected = torch.autograd.grad(total, groups.all_params, allow_unused=True)
        for g, e, p in zip(grads, expected, groups.all_params):
            e = torch.zeros_like(p) if e is None else e
            torch.testing.assert_close(g[i], e, rtol=1e-4, atol=1e-6)
        for c, spec in enumerate(problem.tasks):  # the curves' losses: masked, unscaled
            want = values[spec.name].detach() if batch["supervision"][i, c] else torch.zeros(())
            torch.testing.assert_close(losses[spec.name][i], want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="task_scale"):
        per_sample_retain_grads_and_losses(original, batch, problem.tasks, groups.all_names,
                                           task_scale=[1.0])
    # A hand-made batch may hold anything on the unsupervised pair (here a class index out of
    # range, which the loss kernel would reject): the same gradients.
    name = problem.tasks[1].name
    dirty = {**batch, "targets": {**batch["targets"], name: batch["targets"][name].clone()}}
    dirty["targets"][name][0] = 99
    for g, clean in zip(per_sample_retain_grads(original, dirty, problem.tasks, groups.all_names),
                        per_sample_retain_grads(original, batch, problem.tasks,
                                                groups.all_names)):
        assert torch.isfinite(g).all() and torch.equal(g, clean)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "task_scaled"])
def test_per_sample_task_grads_are_each_pairs_own_gradient(bench, original, scaled: bool) -> None:  # type: ignore[no-untyped-def]
    """Row ``(i, t)`` is the gradient of sample ``i``'s task-``t`` loss alone (zero where the
    pair is unsupervised), and the rows of a sample sum to its per-sample retain gradient."""
    problem = _problem(bench, original, partial=True)
    groups = ParameterGroups.from_model(original)
    batch = problem.retain.batch(torch.arange(4))
    batch["supervision"][1, 0] = False
    scale = [1.0 + 0.5 * c for c in range(len(problem.tasks))] if scaled else None
    rows, losses = per_sample_task_grads_and_losses(original, batch, problem.tasks,
                                                    groups.all_names, task_scale=scale)
    summed, summed_losses = per_sample_retain_grads_and_losses(
        original, batch, problem.tasks, groups.all_names, task_scale=scale)
    num_tasks = len(problem.tasks)
    for r, s, p in zip(rows, summed, groups.all_params):
        assert r.shape == (4, num_tasks, *p.shape)
        torch.testing.assert_close(r.sum(dim=1), s, rtol=1e-4, atol=1e-6)
    for name in summed_losses:
        torch.testing.assert_close(losses[name], summed_losses[name])
    for i in range(4):
        out = original(batch["input"][i:i + 1])
        for c, spec in enumerate(problem.tasks):
            value = task_loss(spec, out[spec.name], batch["targets"][spec.name][i:i + 1])[0]
            expected = torch.autograd.grad(value * (1.0 if scale is None else scale[c]),
                                           groups.all_params, allow_unused=True,
                                           retain_graph=True)
            for r, e, p in zip(rows, expected, groups.all_params):
                want = torch.zeros_like(p) if e is None or not batch["supervision"][i, c] else e
                torch.testing.assert_close(r[i, c], want, rtol=1e-4, atol=1e-6)
    assert not any(bool(r[1, 0].any()) for r in rows)
    with pytest.raises(ValueError, match="task_scale"):
        per_sample_task_grads_and_losses(original, batch, problem.tasks, groups.all_names,
                                         task_scale=[1.0, 2.0, 3.0, 4.0])


def test_orthograd_direction_is_orthogonal_to_retain_samples(bench, original) -> None:  # type: ignore[no-untyped-def]
    """With the retain term off and plain SGD, one step moves the model by ``-lr d``; ``d`` must
    be orthogonal to every per-sample retain gradient of that step's retain batch."""
    problem = _problem(bench, original, partial=False)
    method = get_unlearner("orthograd", steps=1, lr=1.0, momentum=0.0, retain_weight=0.0,
                           grad_clip=None, retain_batch_size=8, num_per_sample=8)
    captured = {}
    original_update = type(method).compute_update

    def spy(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
        captured["batch"] = retain_batch
        return original_update(self, ctx, forget_batch, retain_batch)

    type(method).compute_update = spy  # type: ignore[method-assign]
    try:
        result = method.unlearn(problem)
    finally:
        type(method).compute_update = original_update  # type: ignore[method-assign]
    groups0 = ParameterGroups.from_model(original)
    groups1 = ParameterGroups.from_model(result.model)
    step = torch.cat([(p0 - p1).reshape(-1) for p0, p1 in zip(groups0.all_params,
                                                              groups1.all_params)])
    assert step.norm() > 0
    grads = per_sample_retain_grads(original, captured["batch"], problem.tasks, groups0.all_names)
    basis = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)
    cosines = (basis @ step) / (basis.norm(dim=1) * step.norm())
    assert cosines.abs().max() < 1e-3


def test_salun_moves_only_salient_weights(bench, original) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(bench, original, partial=False)
    result = get_unlearner("salun", steps=5, lr=5e-3, saliency_fraction=0.2).unlearn(problem)
    density = result.report.extra["saliency"]["density"]
    assert 0.15 < density <= 0.2 + 1e-6
    before = torch.cat([p.reshape(-1) for p in original.parameters()])
    after = torch.cat([p.reshape(-1) for p in result.model.parameters()])
    moved = (before != after).float().mean().item()
    assert 0 < moved <= density + 1e-6
    assert saliency_threshold([torch.arange(10.0)], 0.3) == 7.0
    with pytest.raises(ValueError, match="weight_decay"):
        get_unlearner("salun", weight_decay=1e-4)


def test_salun_mask_keeps_exactly_its_share_of_entries(  # type: ignore[no-untyped-def]
        bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """With distinct saliencies the mask ``|g| >= gamma`` (gamma the keep-th largest) keeps
    exactly ``keep`` entries, the largest; ``|g| > gamma`` kept one fewer, and none at all for a
    share below one entry (SalUn then moved nothing)."""
    from mtunlearn_ext.unlearning.baselines import salun as salun_module

    model = build_model(bench, seed=0)
    size = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(5)
    # Every magnitude 1..size once (exact in float32), random signs, spread over the tensors.
    values = torch.randperm(size, generator=gen).double() + 1.0
    values *= torch.where(torch.rand(size, generator=gen) < 0.5, -1.0, 1.0).double()

    def distinct_saliency(batches, loss_of, params):  # type: ignore[no-untyped-def]
        chunks = values.split([p.numel() for p in params])
        return [c.reshape(p.shape).to(p.dtype) for c, p in zip(chunks, params)], 30

    masks: list[list[torch.Tensor]] = []
    mask_update = salun_module.SalUn.mask_update

    def recorded(self, ctx) -> None:  # type: ignore[no-untyped-def]
        masks.append(ctx.state["saliency_masks"])
        mask_update(self, ctx)

    monkeypatch.setattr(salun_module, "summed_pass_grads", distinct_saliency)
    monkeypatch.setattr(salun_module.SalUn, "mask_update", recorded)
    problem = _problem(bench, model, partial=False)
    for fraction, keep in ((0.2, round(0.2 * size)), (1e-9, 1)):
        masks.clear()
        unlearner = get_unlearner("salun", steps=1, lr=1e-3, saliency_fraction=fraction)
        result = unlearner.unlearn(problem)
        assert round(result.report.extra["saliency"]["density"] * size) == keep
        mask = torch.cat([m.reshape(-1) for m in masks[0]])
        assert int(mask.sum()) == keep
        assert set(mask.nonzero().reshape(-1).tolist()) == set(
            values.abs().topk(keep).indices.tolist())


def test_summed_pass_grads_is_the_gradient_of_the_whole_sum() -> None:
    """One backward per batch adds up to the gradient of the loss summed over every batch (a
    float64 reference in one graph); a batch without a loss adds neither gradient nor count."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    batches = [{"x": torch.randn(n, 5, dtype=torch.float64, generator=generator)}
               for n in (4, 1, 7)]
    batches.insert(1, {"x": torch.zeros(0, 5, dtype=torch.float64)})

    def loss_of(batch):  # type: ignore[no-untyped-def]
        x = batch["x"]
        if x.shape[0] == 0:
            return None, 0
        return torch.tanh(x @ weight.T + bias).pow(2).sum(), x.shape[0]

    grads, count = summed_pass_grads(batches, loss_of, [weight, bias])
    assert count == 12
    whole = torch.cat([b["x"] for b in batches])
    expected = torch.autograd.grad(torch.tanh(whole @ weight.T + bias).pow(2).sum(),
                                   [weight, bias])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_pcgrad_update_does_not_conflict(bench, original) -> None:  # type: ignore[no-untyped-def]
    """For two conflicting rows, PCGrad's summed update has no negative inner product with
    either; the per-task granularity runs and moves the model."""
    rows = torch.stack([torch.tensor([1.0, 0.2]), torch.tensor([-1.0, 1.0])])
    assert float(rows[0] @ rows[1]) < 0
    update = ops.pcgrad(rows, seed=0)
    assert torch.all(rows @ update >= -1e-6)
    problem = _problem(bench, original, partial=True)
    result = get_unlearner("pcgrad", steps=3, granularity="task").unlearn(problem)
    assert result.report.steps == 3
    before = torch.cat([p.reshape(-1) for p in original.parameters()])
    after = torch.cat([p.reshape(-1) for p in result.model.parameters()])
    assert not torch.equal(before, after)


@pytest.mark.parametrize("granularity, rows", [("split", 2), ("task", 6)])
def test_pcgrad_lets_each_task_gradient_go_once_stacked(granularity: str, rows: int) -> None:
    """A PCGrad step holds its ``k`` task gradients once: each parameter's are let go when
    they are stacked. They were all kept until every stack was made, twice ``k`` copies of the
    model at the step's peak (7.1 model sizes at ``k = 2``, 15.1 at ``k = 6``; now 5.1 and
    10.9, the update, the momentum and the model returned on top)."""
    model = WideTrunkThreeHeads()
    x, y = wide_trunk_data()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def run() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 2 steps forget little, and are said to
            mtunlearn_ext.unlearn(model, tasks=WIDE_TASKS, train_data=(x, y),
                                  forget_request=ForgetRequest.create(range(6)), method="pcgrad",
                                  config={"steps": 2, "forget_batch_size": 4,
                                          "retain_batch_size": 8, "granularity": granularity},
                                  shared_parameters=lambda name: name.startswith("trunk."))

    peak = peak_allocated_bytes(run)
    assert peak <= (1.5 * rows + 3.5) * model_bytes, f"peak {peak / model_bytes:.1f} model sizes"


@pytest.mark.parametrize("name", sorted(n for n, cls in FORGET_OBJECTIVES.items()
                                        if "classification" in cls.kinds))
def test_forget_objectives(bench, original, name: str) -> None:  # type: ignore[no-untyped-def]
    """Bounded objectives have their minimum where they say; values are finite; ascent is the
    negated task loss."""
    problem = _problem(bench, original, partial=False)
    objectives = make_forget_objectives(problem.target_specs(), problem.retain,
                                        torch.Generator().manual_seed(0), "cpu", name)
    spec = problem.spec("digit")
    objective = objectives["digit"]
    batch = problem.forget.batch(torch.arange(8))
    target = batch["targets"]["digit"]
    logits = original(batch["input"])["digit"]
    values = objective.per_sample(logits, target)
    assert values.shape == (8,) and torch.isfinite(values).all()
    if name == "ascent":
        torch.testing.assert_close(values, -task_loss(spec, logits, target))
    if name == "uniform":
        zero = objective.per_sample(torch.zeros_like(logits), target)
        torch.testing.assert_close(zero, torch.zeros(8), atol=1e-6, rtol=0)
        assert (values > 0).all()
    if name == "mean_target":
        prior = objective.reference
        assert prior is not None and abs(float(prior.sum()) - 1) < 1e-5
        at_prior = objective.per_sample(prior.log().expand_as(logits), target)
        torch.testing.assert_close(at_prior, torch.zeros(8), atol=1e-5, rtol=0)
    if name == "capped_ascent":
        assert objective.cap == pytest.approx(math.log(10))
        huge = torch.zeros_like(logits)
        huge[torch.arange(8), (target + 1) % 10] = 50.0  # confidently wrong: loss above the cap
        confident = huge.clone().requires_grad_(True)
        objective.per_sample(confident, target).sum().backward()
        assert confident.grad is not None and confident.grad.abs().max() == 0
    if name == "random_target":
        for _ in range(5):
            assert (objective.random_targets(target) != target).all()


def test_mean_target_for_dense_tasks() -> None:
    """Depth/normals/segmentation references: the per-pixel retain mean; zero objective there."""
    bench = load_benchmark("indoor", size="tiny", seed=0)
    specs = bench.train.tasks
    objectives = make_forget_objectives(specs, bench.train, torch.Generator().manual_seed(0),
                                        "cpu", "mean_target")
    batch = bench.train.batch(torch.arange(4))
    for spec in specs:
        objective = objectives[spec.name]
        ref = objective.reference
        assert ref is not None
        target = batch["targets"][spec.name]
        if spec.kind == "segmentation":
            assert ref.shape == (spec.num_classes, *target.shape[1:])
            pred = ref.clamp(min=1e-12).log().expand(4, *ref.shape)
        else:
            pred = ref.expand(4, *ref.shape)
        values = objective.per_sample(pred, target)
        torch.testing.assert_close(values, torch.zeros(4), atol=1e-4, rtol=0)
        worse = objective.per_sample(pred + torch.randn_like(pred), target)
        assert (worse > values).all()


def test_segmentation_reference_is_the_per_pixel_class_frequency() -> None:
    """Counted pixel by pixel in Python: each pixel's class frequencies over the retain set's
    labelled pixels (ignored ones skipped); a pixel never labelled takes the global prior."""
    from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
    from mtunlearn_ext.unlearning.objectives import CappedAscentObjective

    gen = torch.Generator().manual_seed(3)
    spec = TaskSpec("seg", "segmentation", num_classes=4, ignore_index=-1)
    targets = torch.randint(0, 4, (30, 3, 5), generator=gen)
    targets[torch.rand(targets.shape, generator=gen) < 0.3] = -1
    targets[:, 2, 4] = -1  # never labelled
    data = MultiTaskDataset(torch.zeros(30, 1), {"seg": targets}, [spec])
    objective = CappedAscentObjective(spec)
    objective.prepare(data, torch.Generator().manual_seed(0), "cpu")
    assert objective.reference is not None
    labelled = targets[targets >= 0]
    prior = [float((labelled == c).sum()) / labelled.numel() for c in range(4)]
    for h in range(3):
        for w in range(5):
            column = targets[:, h, w]
            column = column[column >= 0]
            for c in range(4):
                expected = (float((column == c).sum()) / column.numel() if column.numel()
                            else prior[c])
                assert abs(float(objective.reference[c, h, w]) - expected) < 1e-6, (h, w, c)


def test_depth_weighted_abs_error_against_a_float64_reference() -> None:
    """``sum_p d_p |d_hat_p - d_p| / sum_p d_p`` over valid pixels, per sample; unlabelled
    pixels (``d = 0``) and their predictions do not count; a sample without a valid pixel
    scores 0."""
    from mtunlearn_ext.unlearning.objectives import depth_weighted_abs_error

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(5, 1, 7, 9, generator=gen, dtype=torch.float64) * 10
    target[target < 2] = 0.0  # unlabelled pixels
    target[4] = 0.0  # a sample with none labelled
    pred = torch.rand(5, 1, 7, 9, generator=gen, dtype=torch.float64) * 10
    expected = torch.zeros(5, dtype=torch.float64)
    for i in range(4):
        d, p = target[i, 0], pred[i, 0]
        valid = d > 0
        expected[i] = ((p - d).abs()[valid] * d[valid]).sum() / d[valid].sum()
    for dtype in (torch.float64, torch.float32):
        got = depth_weighted_abs_error(pred.to(dtype), target.to(dtype))
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    poisoned = pred.clone()
    poisoned[target == 0] = float("nan")  # predictions at unlabelled pixels must not leak in
    torch.testing.assert_close(depth_weighted_abs_error(poisoned, target), expected)
    # Nor NaN depths at unlabelled pixels, in the value or the gradient.
    nan_target = target.clone()
    nan_target[target == 0] = float("nan")
    grads = []
    for t in (target, nan_target):
        p = pred.clone().requires_grad_(True)
        value = depth_weighted_abs_error(p, t)
        torch.testing.assert_close(value.detach(), expected)
        grads.append(torch.autograd.grad(value.sum(), p)[0])
    assert torch.isfinite(grads[1]).all() and torch.equal(grads[0], grads[1])
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        depth_weighted_abs_error(pred[:, 0], target[:, 0])


def test_depth_weighted_ascent_pushes_each_pixel_in_proportion_to_its_depth() -> None:
    """Below its cap the objective's gradient on a pixel's prediction is ``-d_p / sum d``
    (plain capped ascent: ``-1 / |P|`` everywhere), so the error it adds grows with depth;
    its cap is the weighted loss of the retain mean map, and it serves depth tasks only."""
    from mtunlearn_ext.unlearning.objectives import (
        CappedAscentObjective,
        DepthWeightedCappedAscentObjective,
        depth_weighted_abs_error,
    )

    bench = load_benchmark("indoor", size="tiny", seed=0)
    depth = next(t for t in bench.train.tasks if t.kind == "depth")
    objectives = make_forget_objectives([depth], bench.train, torch.Generator().manual_seed(0),
                                        "cpu", {"depth": "capped_depth_weighted_ascent"})
    objective = objectives[depth.name]
    assert isinstance(objective, DepthWeightedCappedAscentObjective)
    target = bench.train.batch(torch.arange(3))["targets"][depth.name]
    valid = target > 0
    pred = (target + 0.01).requires_grad_(True)  # tiny errors: far below the cap
    objective.per_sample(pred, target).sum().backward()
    assert pred.grad is not None
    per_sample_sum = (target * valid).flatten(1).sum(1).view(-1, 1, 1, 1)
    expected = torch.where(valid, -target / per_sample_sum, torch.zeros_like(target))
    torch.testing.assert_close(pred.grad, expected, rtol=1e-5, atol=1e-9)
    # The cap: the weighted loss of the retain set's mean map (what plain capped ascent takes
    # in its own, unweighted, loss).
    plain = make_forget_objectives([depth], bench.train, torch.Generator().manual_seed(0), "cpu",
                                   "capped_ascent")[depth.name]
    assert isinstance(plain, CappedAscentObjective) and plain.reference is not None
    supervised = bench.train.targets[depth.name][bench.train.supervision[:, bench.train.task_index(depth.name)]]
    reference = plain.reference.expand(supervised.shape[0], *plain.reference.shape)
    assert objective.cap == pytest.approx(
        float(depth_weighted_abs_error(reference, supervised.float()).mean()), rel=1e-5)
    assert objective.cap != pytest.approx(plain.cap, rel=1e-3)
    # Above the cap nothing moves.
    far = (target * 5 + 10).requires_grad_(True)
    objective.per_sample(far, target).sum().backward()
    assert far.grad is not None and far.grad.abs().max() == 0
    segmentation = next(t for t in bench.train.tasks if t.kind == "segmentation")
    with pytest.raises(ValueError, match="does not apply to task"):
        DepthWeightedCappedAscentObjective(segmentation)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_warmup_raises_the_learning_rates_linearly(bench, original, optimizer: str) -> None:  # type: ignore[no-untyped-def]
    """Step ``s < warmup_steps`` runs at ``(s + 1) / warmup_steps`` of every group's rate (heads
    keep their ``head_lr_scale``), then the rates stay put; ``warmup_steps = 0`` is constant."""
    problem = _problem(bench, original, partial=False)
    for warmup, factors in ((4, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]), (0, [1.0] * 6)):
        unlearner = get_unlearner("neggrad_plus", steps=6, lr=2e-3, head_lr_scale=0.5,
                                  optimizer=optimizer, warmup_steps=warmup)
        made: list[torch.optim.Optimizer] = []
        make = unlearner._make_optimizer

        def keep(groups, make=make, made=made):  # type: ignore[no-untyped-def]
            made.append(make(groups))
            return made[-1]

        unlearner._make_optimizer = keep  # type: ignore[method-assign]
        seen: list[list[float]] = []
        unlearner.step_callbacks.append(
            lambda steps, model: seen.append([g["lr"] for g in made[0].param_groups]))
        unlearner.unlearn(problem)
        assert seen == [[pytest.approx(2e-3 * f), pytest.approx(1e-3 * f)] for f in factors]
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="warmup_steps"):
            get_unlearner("neggrad_plus", warmup_steps=bad)


def test_adam_settings_reach_the_optimizer_and_its_first_step() -> None:
    """``adam_beta2`` / ``adam_eps`` become the Adam optimizer's ``betas[1]`` / ``eps``: its
    first step is ``lr * m / (sqrt(v) + eps)`` with bias-corrected moments, ``lr * g / (|g| +
    eps)``, so a gradient far below ``eps`` moves its coordinate by about ``lr * g / eps``, and
    one far above by ``lr``. Out-of-range values are refused by name."""
    model = torch.nn.Linear(3, 1, bias=False)
    groups = ParameterGroups.from_model(model)
    unlearner = get_unlearner("neggrad_plus", optimizer="adam", lr=0.1, adam_beta2=0.99,
                              adam_eps=1e-3)
    optimizer = unlearner._make_optimizer(groups)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizer.param_groups[0]["eps"] == 1e-3
    grad = torch.tensor([[1e-6, 1.0, -10.0]])
    with torch.no_grad():
        model.weight.zero_()
    model.weight.grad = grad.clone()
    optimizer.step()
    expected = -0.1 * grad.double() / (grad.double().abs() + 1e-3)
    torch.testing.assert_close(model.weight.detach().double(), expected, rtol=1e-5, atol=1e-12)
    for field_name, bad in (("adam_beta2", 1.0), ("adam_beta2", -0.1), ("adam_eps", 0.0),
                            ("adam_eps", float("inf"))):
        with pytest.raises(ValueError, match=field_name):
            get_unlearner("neggrad_plus", **{field_name: bad})


def test_custom_method_plugs_into_the_interface(bench, original, registries_restored) -> None:  # type: ignore[no-untyped-def]
    """A new step-based method needs only a name, a config and ``compute_update``."""

    @register_unlearner
    class HeadsOnly(GradientUnlearner):
        name = "_test_heads_only"
        config_class = StepConfig

        def compute_update(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
            stats = self.weighted_update(ctx, forget_batch, retain_batch)
            for p in ctx.groups.shared_params:
                p.grad = None if p.grad is None else torch.zeros_like(p.grad)
            return stats

    problem = _problem(bench, original, partial=False)
    result = get_unlearner("_test_heads_only", steps=3, lr=1e-2).unlearn(problem)
    groups0, groups1 = ParameterGroups.from_model(original), ParameterGroups.from_model(result.model)
    assert all(torch.equal(a, b) for a, b in zip(groups0.shared_params, groups1.shared_params))
    assert any(not torch.equal(a, b) for a, b in zip(groups0.all_params, groups1.all_params))
    clone = copy.deepcopy(problem)
    clone.target_tasks = ["nope"]
    with pytest.raises(ValueError, match="target tasks"):
        get_unlearner("_test_heads_only").unlearn(clone)


def test_retrain_reports_its_recipes_thread_count(bench, original) -> None:  # type: ignore[no-untyped-def]
    """A recipe with ``num_threads`` trains at that count whatever the caller's: the report
    (and so the record's environment) said the caller's (reproducibility review)."""
    import dataclasses

    problem = _problem(bench, original, partial=False)
    problem.train_config = dataclasses.replace(RECIPE, epochs=1, num_threads=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = get_unlearner("retrain").unlearn(problem).report
    finally:
        torch.set_num_threads(before)
    assert report.threads == 2


def test_retrain_with_another_seed_is_a_second_gold_model(bench, original) -> None:  # type: ignore[no-untyped-def]
    problem = _problem(bench, original, partial=False)
    gold = _state(get_unlearner("retrain").unlearn(problem).model)
    # The recipe's own seed is the gold standard itself.
    same = _state(get_unlearner("retrain", {"seed": RECIPE.seed}).unlearn(problem).model)
    assert all(torch.equal(gold[k], same[k]) for k in gold)
    # Another seed orders the batches differently: another model of the same retain pairs.
    result = get_unlearner("retrain", {"seed": RECIPE.seed + 1}).unlearn(problem)
    other = _state(result.model)
    assert any(not torch.equal(gold[k], other[k]) for k in gold)
    assert result.report.extra["recipe"]["seed"] == RECIPE.seed + 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`seed`"):
            get_unlearner("retrain", {"seed": bad})


class _DropoutNormNet(torch.nn.Module):
    def __init__(self, tasks: list) -> None:  # type: ignore[type-arg]
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32),
                                            torch.nn.ReLU(), torch.nn.Dropout(0.3))
        self.heads = torch.nn.ModuleDict({t.name: torch.nn.Linear(32, t.num_classes)
                                          for t in tasks})

    def forward(self, x: torch.Tensor, tasks: object = None) -> dict[str, torch.Tensor]:
        z = self.backbone(x)
        return {t: h(z) for t, h in self.heads.items()}

    def parameter_split(self) -> ParameterSplit:
        return ParameterSplit(
            tuple(f"backbone.{n}" for n, _ in self.backbone.named_parameters()),
            {t: tuple(f"heads.{t}.{n}" for n, _ in h.named_parameters())
             for t, h in self.heads.items()})


@pytest.mark.parametrize("method", ["finetune", "gradient_ascent"])
def test_log_every_changes_what_is_recorded_only(method: str) -> None:
    """At logging steps the loop forwards a batch of the set a method does not use, for its
    curve. In training mode that forward drew dropout masks (shifting every later one) and
    wrote the batch into BatchNorm's running statistics (fine-tuning took in forget batches):
    log_every changed the unlearned weights (by up to 0.023) and buffers."""
    bench = load_benchmark("digits", size="tiny", seed=0)
    torch.manual_seed(0)
    model = _DropoutNormNet(bench.tasks)
    train(model, bench.train, None, TrainConfig(epochs=1, batch_size=32, lr=3e-3, seed=0),
          progress=False)
    model.eval()
    problem = UnlearningProblem.from_request(model, bench.train,
                                             ForgetRequest.create(bench.train.ids[:30]), seed=0)
    states = []
    for log_every in (1, 100):
        result = get_unlearner(method, steps=6, lr=1e-3, train_mode=True, log_every=log_every,
                               recalibrate_norms=False).unlearn(problem)
        states.append(result.model.state_dict())
        assert len(result.report.curves["retain_loss"]) == (6 if log_every == 1 else 2)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_capped_objectives_ignore_nan_at_unlabelled_retain_pixels() -> None:
    """The data contract lets an unlabelled depth or normals pixel hold NaN; the per-pixel
    reference masked it by multiplying (NaN * 0 is NaN), so the cap and every value of the
    default objective were NaN."""
    from mtunlearn_ext.data.base import TaskSpec as Spec
    from mtunlearn_ext.data import MultiTaskDataset

    depth, normals = Spec("dep", "depth"), Spec("nor", "normals")
    g = torch.Generator().manual_seed(0)
    td = torch.rand(4, 1, 4, 4, generator=g) + 0.5
    tn = torch.nn.functional.normalize(torch.randn(4, 3, 4, 4, generator=g), dim=1)
    td[0, 0, 0, 0] = float("nan")
    tn[0, :, 0, 0] = float("nan")
    retain = MultiTaskDataset(torch.randn(4, 2, 4, 4, generator=g), {"dep": td, "nor": tn},
                              [depth, normals])
    retain.check_values("retain")
    objectives = make_forget_objectives([depth, normals], retain, g, "cpu", "capped_ascent")
    valid = torch.nan_to_num(td) > 0
    reference = torch.where(valid, torch.nan_to_num(td), 0).sum(0) / valid.sum(0)
    expected_cap = task_loss(depth, reference.expand(4, 1, 4, 4), td).mean()
    assert math.isclose(objectives["dep"].cap, float(expected_cap), rel_tol=1e-5)  # type: ignore[attr-defined]
    assert math.isfinite(objectives["nor"].cap)  # type: ignore[attr-defined]
    pred = torch.rand(2, 1, 4, 4, generator=g) + 0.5
    assert torch.isfinite(objectives["dep"].per_sample(pred, td[1:3])).all()


def test_capped_ascent_needs_retain_pairs_only_for_its_own_cap() -> None:
    """Review: capped ascent built its retain reference whatever it was for, so a partial request
    removing a task from every instance was refused ("the retain set has no supervised pair
    ... to build a reference from") even where the cap needs no reference (log C) or comes from
    elsewhere. The reference only measures the objective's own cap: without retain pairs a class
    task under its kind's loss keeps log C, any other has no cap until one is set, and running
    without one says why and what works."""
    from mtunlearn_ext.data import MultiTaskDataset
    from mtunlearn_ext.data.base import TaskSpec as Spec
    from mtunlearn_ext.unlearning.objectives import CappedAscentObjective

    kind, size = Spec("kind", "classification", num_classes=3), Spec("size", "regression")
    g = torch.Generator().manual_seed(0)
    retain = MultiTaskDataset(torch.randn(6, 4, generator=g),
                              {"kind": torch.randint(0, 3, (6,), generator=g),
                               "size": torch.randn(6, 1, generator=g)}, [kind, size],
                              supervision=torch.zeros(6, 2, dtype=torch.bool))
    objectives = make_forget_objectives([kind, size], retain, g, "cpu", "capped_ascent")
    on_kind, on_size = objectives["kind"], objectives["size"]
    assert isinstance(on_kind, CappedAscentObjective) and isinstance(on_size, CappedAscentObjective)
    assert on_kind.cap == pytest.approx(math.log(3)) and on_kind.cap_missing is None
    logits, labels = torch.randn(5, 3, generator=g), torch.randint(0, 3, (5,), generator=g)
    torch.testing.assert_close(on_kind.per_sample(logits, labels),
                               -task_loss(kind, logits, labels).clamp(max=math.log(3)))
    assert math.isnan(on_size.cap)
    missing = on_size.cap_missing
    assert missing is not None and "'size'" in missing and "`forget_request`" in missing
    pred, target = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)
    with pytest.raises(ValueError, match=r"forget objective 'capped_ascent' of task 'size' has no "
                                         r"cap: .*retain set has none.*"
                                         r"forget_objective=\{'size': 'ascent'\}.*"
                                         r"cap_reference='held_out'"):
        on_size.per_sample(pred, target)
    on_size.cap = 0.25  # a cap from elsewhere (the interference-aware method's calibration)
    assert on_size.cap_missing is None
    torch.testing.assert_close(on_size.per_sample(pred, target),
                               -task_loss(size, pred, target).clamp(max=0.25))
    # An objective that needs the retain pairs themselves still refuses, saying what works.
    with pytest.raises(ValueError, match=r"'mean_target': the retain set has no supervised pair "
                                         r"of task 'size'.*forget_objective=\{'size': 'ascent'\}"):
        make_forget_objectives([size], retain, g, "cpu", "mean_target")


def test_a_problem_whose_model_has_no_parameter_split_warns() -> None:
    """Such a model silently counted as all-shared (no head task-specific for any method; the
    extensibility review measured other weights than with the split given)."""
    bench = load_benchmark("digits", size="tiny", seed=0)
    torch.manual_seed(0)

    class Unsplit(_DropoutNormNet):
        parameter_split = None  # type: ignore[assignment]  # a multi-task model without one

    problem = UnlearningProblem.from_request(Unsplit(bench.tasks), bench.train,
                                             ForgetRequest.create(bench.train.ids[:30]), seed=0)
    with pytest.warns(UserWarning, match=r"has no parameter_split\(\), so every parameter "
                                         r"counts as shared .*build_problem") as caught:
        problem.validate()
    # At this line (a fixed stacklevel pointed one frame above the caller of validate()).
    assert {w.filename for w in caught if "parameter_split" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnlearningProblem.from_request(build_model(bench, seed=0), bench.train,
                                       ForgetRequest.create(bench.train.ids[:30]),
                                       seed=0).validate()
