"""Models: output contracts, the explicit parameter split, seeding, per-sample gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from mtunlearn_ext.data import Benchmark, MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.digits import digits_tasks
from mtunlearn_ext.data.indoor import indoor_tasks
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.models import (
    SHARED,
    DenseMultiTaskNet,
    MLPMultiTaskNet,
    MultiTaskModel,
    build_model,
)
from mtunlearn_ext.unlearning.protected_subspace import layer_ids_of

DENSE_TASKS = indoor_tasks()


def _dense(seed: int = 0) -> MultiTaskModel:
    return build_model(DENSE_TASKS, input_shape=(3, 16, 24), seed=seed, widths=(8, 8, 16, 16))


def test_dense_outputs_have_the_task_shapes_and_ranges() -> None:
    model = _dense()
    assert isinstance(model, DenseMultiTaskNet)
    x = torch.randn(2, 3, 16, 24)
    out = model(x)
    assert set(out) == {"segmentation", "depth", "normals"}
    assert out["segmentation"].shape == (2, 13, 16, 24)
    assert out["depth"].shape == (2, 1, 16, 24) and (out["depth"] > 0).all()
    assert out["normals"].shape == (2, 3, 16, 24)
    assert torch.allclose(out["normals"].norm(dim=1), torch.ones(2, 16, 24), atol=1e-5)
    only = model(x, ["depth"])
    assert set(only) == {"depth"} and torch.allclose(only["depth"], out["depth"])
    feats = model.features(x)
    assert torch.allclose(model.head_forward("normals", feats), out["normals"])
    with pytest.raises(ValueError, match="even"):
        model(torch.randn(1, 3, 15, 24))
    with pytest.raises(KeyError, match="unknown task"):
        model.task_parameters("edges")


def test_mlp_outputs() -> None:
    model = build_model(digits_tasks(), input_shape=(64,), seed=0)
    assert isinstance(model, MLPMultiTaskNet)
    out = model(torch.rand(5, 64))
    assert out["digit"].shape == (5, 10) and out["parity"].shape == (5, 2)


@pytest.mark.parametrize("make", [lambda: _dense(),
                                  lambda: build_model(digits_tasks(), input_shape=(64,))])
def test_parameter_split_is_a_partition(make) -> None:
    model = make()
    split = model.parameter_split()
    named = dict(model.named_parameters())
    assert sorted(split.all_names) == sorted(named)
    assert len(set(split.all_names)) == len(split.all_names)
    shared = model.shared_parameters()
    assert [n for n, _ in shared] == list(split.shared)
    assert all(named[n] is p for n, p in shared)
    assert all(n.startswith("backbone.") for n in split.shared)
    for task in model.task_names:
        params = model.task_parameters(task)
        assert params and all(named[n] is p for n, p in params)
        assert all(split.owner(n) == task for n, _ in params)
        assert split.names(task) == tuple(n for n, _ in params)
        layer_params = [p for _, ps in model.task_layers(task) for p in ps]
        assert {id(p) for p in layer_params} == {id(p) for _, p in params}
    assert split.owner(split.shared[0]) == SHARED
    # Per-layer groups cover the shared parameters exactly once, each group one module's own.
    layers = model.shared_layers()
    grouped = [p for _, ps in layers for p in ps]
    assert len(grouped) == len(shared)
    assert {id(p) for p in grouped} == {id(p) for _, p in shared}
    modules = dict(model.named_modules())
    for name, params in layers:
        assert {id(p) for p in params} == {id(p) for p in modules[name].parameters(recurse=False)}
    # The method groups any model's parameters by name alone (layer_ids_of): the same layers.
    ids = layer_ids_of([n for n, _ in shared])
    by_id: dict[int, set[int]] = {}
    for i, (_, p) in zip(ids, shared):
        by_id.setdefault(i, set()).add(id(p))
    assert sorted(map(sorted, by_id.values())) == sorted(sorted(id(p) for p in ps)
                                                         for _, ps in layers)
    with pytest.raises(KeyError):
        split.owner("nope")


def test_parameter_split_rejects_tied_weights() -> None:
    model = build_model(digits_tasks(), input_shape=(64,))
    model.heads["parity"][0].weight = model.heads["digit"][0].weight
    with pytest.raises(RuntimeError, match="tied"):
        model.parameter_split()


def test_a_task_named_shared_is_refused() -> None:
    """'shared' is the owner name of the backbone's parameters: a task of that name made
    ParameterSplit.owner() call its head's parameters shared and names('shared') return the
    backbone's instead of the head's."""
    from mtunlearn_ext.models import ParameterSplit

    tasks = [TaskSpec("shared", "classification", num_classes=3), TaskSpec("b", "regression")]
    with pytest.raises(ValueError, match="MultiTaskModel: a task may not be named 'shared'"):
        build_model(tasks, input_shape=[8])
    with pytest.raises(ValueError, match="ParameterSplit: a task may not be named 'shared'"):
        ParameterSplit(("backbone.w",), {"shared": ("heads.shared.w",)})
    build_model([TaskSpec("Shared", "regression")], input_shape=[8])  # only the exact name


def test_build_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = _dense(seed=1), _dense(seed=1), _dense(seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                          c.named_parameters()):
        assert torch.equal(pa, pb), na
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters())
               if pa.dim() > 1)


def test_depth_head_starts_at_the_prior() -> None:
    model = build_model(DENSE_TASKS, input_shape=(3, 16, 24), depth_init=3.0)
    bias = model.heads["depth"][1].bias
    assert math.isclose(float(nn.functional.softplus(bias.detach())), 3.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="depth_init"):
        build_model(DENSE_TASKS, input_shape=(3, 16, 24), depth_init=-1.0)


def test_build_model_argument_errors() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        build_model(DENSE_TASKS)
    with pytest.raises(ValueError, match="cannot mix"):
        build_model([DENSE_TASKS[0], TaskSpec("c", "classification", num_classes=2)],
                    input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        build_model(DENSE_TASKS, input_shape=(64,))


FLAT_TASKS = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression")]


@pytest.mark.parametrize("shape, error, message", [
    ((8.7,), TypeError, r"got float 8.7 in \(8.7,\)"),  # was 8 inputs
    ("64", TypeError, r"\(one input's shape, without the batch dimension\), got str '64'"),  # (6, 4)
    (8, TypeError, r"got int 8"),
    ((True,), TypeError, r"got bool True"),
    ((0,), ValueError, r"got 0 in \(0,\)"),
    ((3, -16, 16), ValueError, r"got -16"),
])
def test_build_model_refuses_an_input_shape_of_no_integer_sizes(shape: object,
                                                                error: type[Exception],
                                                                message: str) -> None:
    with pytest.raises(error, match=r"build_model: `input_shape` must be a sequence of integer "
                                    rf"sizes >= 1.*{message}"):
        build_model(FLAT_TASKS, input_shape=shape)  # type: ignore[arg-type]


def test_build_model_takes_sizes_of_any_integer_type() -> None:
    for shape in ((8,), [8], torch.Size([8]), (np.int64(8),), np.array([8])):
        model = build_model(FLAT_TASKS, input_shape=shape)  # type: ignore[arg-type]
        assert isinstance(model, MLPMultiTaskNet) and model.backbone[0].in_features == 8


@pytest.mark.parametrize("tasks, message", [
    ({"kind": "classification"}, r"got dict: build them, e.g. \[TaskSpec\(name, kind"),
    ({"kind": FLAT_TASKS[0]}, r"got dict"),
    ("kind", r"got str"),
    ([FLAT_TASKS[0], "size"], r"got str 'size' at position 1"),
])
def test_build_model_refuses_tasks_that_are_no_specs(tasks: object, message: str) -> None:
    """A dict of kinds failed with AttributeError: 'str' object has no attribute 'kind'."""
    with pytest.raises(TypeError, match=r"build_model: `benchmark_or_tasks` must be a Benchmark "
                                        rf"or a sequence of TaskSpec, {message}"):
        build_model(tasks, input_shape=(8,))  # type: ignore[arg-type]


@pytest.mark.parametrize("pack", [lambda a, b: (a, b), lambda a, b: {"x": a, "m": b}],
                         ids=["tuple", "dict"])
def test_build_model_refuses_a_benchmark_of_several_inputs(pack) -> None:
    # The library's models take one tensor: a benchmark holding several inputs per instance
    # is named in a TypeError (it was an AttributeError on the tuple's / dict's `.shape`).
    tasks = [TaskSpec("c", "classification", num_classes=2)]

    def data(n: int) -> MultiTaskDataset:
        return MultiTaskDataset(pack(torch.randn(n, 4), torch.ones(n, 4)),
                                {"c": torch.zeros(n, dtype=torch.long)}, tasks)

    bench = Benchmark("two-inputs", data(6), data(3), tasks)
    with pytest.raises(TypeError, match="one input tensor; got several inputs"):
        build_model(bench)
    assert isinstance(build_model(bench, input_shape=(4,)), MLPMultiTaskNet)


def test_per_sample_gradients_with_torch_func_match_a_loop() -> None:
    """GroupNorm keeps samples independent, so vmap'd per-sample gradients are exact."""
    model = build_model(DENSE_TASKS, input_shape=(3, 16, 16), widths=(4, 4, 8, 16))
    spec = DENSE_TASKS[1]  # depth
    x = torch.randn(2, 3, 16, 16)
    target = torch.rand(2, 1, 16, 16) + 0.5
    params = {n: p.detach() for n, p in model.shared_parameters()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}

    def loss_of(p: dict, xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **frozen}, (xi[None], ["depth"]))
        return task_loss(spec, out["depth"], ti[None])[0]

    per_sample = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, target)
    for i in range(2):
        model.zero_grad()
        task_loss(spec, model(x[i:i + 1], ["depth"])["depth"], target[i:i + 1])[0].backward()
        for name, p in model.shared_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4), name
