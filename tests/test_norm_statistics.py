"""Models with BatchNorm and dropout: the steps run in eval mode by default, per-sample
gradients refuse a batch-coupled forward with a clear error, and the running statistics are
recomputed from the retain data alone after the steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext.data import ForgetRequest, MultiTaskDataset
from mtunlearn_ext.data.base import TaskSpec
from mtunlearn_ext.unlearning import available_unlearners, get_unlearner
from mtunlearn_ext.unlearning.gradients import per_sample_retain_grads
from mtunlearn_ext.unlearning.loop import GradientUnlearner
from mtunlearn_ext.unlearning.norm_statistics import (
    check_samples_independent,
    recalibrate_running_statistics,
    running_statistics_modules,
)

from unlearning_helpers import fit_kind_and_size

TASKS = {"kind": "classification", "size": "regression"}


def is_trunk(name: str) -> bool:
    return name.startswith("trunk.")


class NormNet(nn.Module):
    """A user's convolutional model with BatchNorm and dropout in its trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({"kind": nn.Linear(8, 3), "size": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


@pytest.fixture(scope="module")
def trained():  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 6, 6, generator=generator)
    y = {"kind": torch.randint(0, 3, (96,), generator=generator),
         "size": torch.randn(96, 1, generator=generator)}
    torch.manual_seed(0)
    # Some training, so that the running statistics are the data's.
    model = fit_kind_and_size(NormNet(), x, y, steps=30)
    return model.eval(), x, y


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _step_methods() -> list[str]:
    return [m for m in available_unlearners()
            if isinstance(get_unlearner(m, {}), GradientUnlearner)]


@pytest.mark.parametrize("method", _step_methods())
def test_every_step_method_runs_on_a_batchnorm_dropout_model(trained, method: str) -> None:  # type: ignore[no-untyped-def]
    model, x, y = trained
    before = _buffers(model)
    request = ForgetRequest.create(range(12), ["kind"])
    config = {"steps": 3, "lr": 1e-2, "recalibrate_norms": False}
    new, report = mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=(x, y),
                                        forget_request=request, shared_parameters=is_trunk,
                                        method=method, config=config, seed=0)
    # In eval mode nothing is written to the buffers: not the forget batches' statistics,
    # not num_batches_tracked.
    assert all(torch.equal(v, before[k]) for k, v in new.named_buffers())
    assert "norm_statistics_rows" not in report.extra
    # Eval mode steps are deterministic despite the dropout layer.
    again, _ = mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=(x, y),
                                     forget_request=request, shared_parameters=is_trunk,
                                     method=method, config=config, seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in new.state_dict().items())
    moved = any(not torch.equal(v, model.state_dict()[k]) for k, v in new.state_dict().items())
    assert moved, f"{method} did not change the model"


def _reference_statistics(model: nn.Module, inputs: torch.Tensor, sizes: list[int]
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer: the equal-weight mean over consecutive batches of ``inputs`` (in
    the recalibration's order: :func:`_shuffled`) of the batch mean and unbiased variance of its
    input, with every BatchNorm normalising by its batch (float64)."""
    model = _double_copy(model)
    norms = [m for _, m in running_statistics_modules(model)]
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in norms}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        z = args[0].transpose(0, 1).flatten(1)
        seen[id(module)].append((z.mean(dim=1), z.var(dim=1, unbiased=True)))

    handles = [m.register_forward_pre_hook(record) for m in norms]
    model.eval()
    for m in norms:
        m.train()  # batch statistics in the forward, as in the recalibration
    start = 0
    with torch.no_grad():
        for size in sizes:
            model(inputs[start:start + size].double())
            start += size
    for h in handles:
        h.remove()
    return [(torch.stack([s[0] for s in seen[id(m)]]).mean(0),
             torch.stack([s[1] for s in seen[id(m)]]).mean(0)) for m in norms]


def _double_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def _shuffled(inputs: torch.Tensor) -> torch.Tensor:
    """The rows in the order the recalibration draws them by default (seed 0)."""
    return inputs[torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(0))]


def test_a_retain_set_of_one_row_leaves_the_statistics_and_says_so(trained) -> None:  # type: ignore[no-untyped-def]
    """Review: with one retain row the running statistics (which averaged the forget
    instances in) were silently kept; only `norm_statistics_rows: 0` in the report said so."""
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with pytest.warns(UserWarning, match=r"the retain set has 1 row\(s\), too few to recompute "
                                         r"the running statistics of 2 normalisation layer"
                      ) as caught:
        new, report = mtunlearn_ext.unlearn(
            model, tasks=TASKS, train_data=(x, y),
            forget_request=ForgetRequest.create(range(1, 96)), shared_parameters=is_trunk,
            config={"steps": 1}, seed=0)
    assert {w.filename for w in caught if "too few" in str(w.message)} == {__file__}
    assert report.extra["norm_statistics_rows"] == 0
    after = new.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_recalibration_uses_the_retain_rows_only(trained) -> None:  # type: ignore[no-untyped-def]
    model, x, y = trained
    forget = list(range(0, 96, 4))  # 24 forget instances, 72 retained
    new, report = mtunlearn_ext.unlearn(
        model, tasks=TASKS, train_data=(x, y), forget_request=ForgetRequest.create(forget),
        shared_parameters=is_trunk, config={"steps": 4, "lr": 1e-2, "retain_batch_size": 24},
        seed=0)
    assert report.extra["norm_statistics_rows"] == 72
    assert report.extra["norm_statistics_layers"] == ["trunk.1", "trunk.4"]
    keep = torch.tensor([i for i in range(96) if i not in forget])
    # The retain set in the recalibration's random order: 72 rows as three batches of 24. The
    # statistics are recomputed under the unlearned weights from those rows alone.
    reference = _reference_statistics(new, _shuffled(x[keep]), [24, 24, 24])
    for (_, norm), (mean, var) in zip(running_statistics_modules(new), reference):
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert norm.momentum == 0.1 and not norm.training  # restored
    # The forget rows' inputs do not matter: different forget inputs, same statistics (the
    # update differs, so compare the recalibration itself on the same unlearned weights).
    retain = MultiTaskDataset(x[keep], {t: v[keep] for t, v in y.items()},
                              [TaskSpec("kind", "classification", num_classes=3),
                               TaskSpec("size", "regression")], keep)
    other = _double_copy(new).float()
    assert recalibrate_running_statistics(other, retain, 24) == 72
    for (_, a), (_, b) in zip(running_statistics_modules(new), running_statistics_modules(other)):
        torch.testing.assert_close(a.running_mean, b.running_mean)


def test_recalibration_batches_are_near_equal_and_never_single_rows(trained) -> None:  # type: ignore[no-untyped-def]
    model, x, y = trained
    specs = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression")]
    data = MultiTaskDataset(x[:33], {t: v[:33] for t, v in y.items()}, specs, torch.arange(33))
    copy_ = _double_copy(model).float()
    # 33 rows at batch size 32: batches of 16 and 17, not 32 and 1 (BatchNorm1d-like layers
    # cannot normalise one row, and it would weigh as much as 32).
    assert recalibrate_running_statistics(copy_, data, 32) == 33
    reference = _reference_statistics(copy_, _shuffled(x[:33]), [16, 17])
    for (_, norm), (mean, var) in zip(running_statistics_modules(copy_), reference):
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.running_var.double(), var, rtol=1e-5, atol=1e-6)
    one = MultiTaskDataset(x[:1], {t: v[:1] for t, v in y.items()}, specs, torch.arange(1))
    before = _buffers(copy_)
    assert recalibrate_running_statistics(copy_, one, 32) == 0
    assert all(torch.equal(v, before[k]) for k, v in copy_.named_buffers())
    with pytest.raises(ValueError, match="batch_size"):
        recalibrate_running_statistics(copy_, data, 0)
    # Batch sizes 1 and 2 with an odd row count made a single-row batch ([0, 1, 3]).
    three = MultiTaskDataset(x[:3], {t: v[:3] for t, v in y.items()}, specs, torch.arange(3))
    for batch_size in (1, 2):
        assert recalibrate_running_statistics(copy_, three, batch_size) == 3
    reference = _reference_statistics(copy_, x[:3], [3])
    for (_, norm), (mean, var) in zip(running_statistics_modules(copy_), reference):
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)


def test_recalibration_of_data_stored_in_order_finds_its_variance() -> None:
    """Review: the batches were consecutive rows in the data's order, so for data stored in
    order (by scene, class or time) each batch saw a narrow slice of it and the average of the
    batches' variances missed the spread between them: a feature sorted over 256 rows got a
    running variance of 0.049 instead of 3.04. The batches are now drawn in a random order
    (seeded: the result is the same at every call)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=generator)
    x[:, 0] = torch.linspace(-3.0, 3.0, 256)
    data = MultiTaskDataset(x, {"size": torch.zeros(256, 1)}, [TaskSpec("size", "regression")])
    runs = []
    for _ in range(2):
        model = nn.Sequential(nn.BatchNorm1d(4))
        assert recalibrate_running_statistics(model, data, 32) == 256
        runs.append(model[0])
    torch.testing.assert_close(runs[0].running_mean, x.mean(dim=0), rtol=0, atol=0.05)
    torch.testing.assert_close(runs[0].running_var, x.var(dim=0), rtol=0.1, atol=0)
    assert torch.equal(runs[0].running_var, runs[1].running_var)


def test_recalibration_updates_instance_norm_statistics() -> None:
    """Review: the recalibration averaged with ``momentum=None``, which InstanceNorm (with
    ``track_running_stats=True``, one of the layers it rewrites) reads as 0: its running
    statistics stayed at their reset values, mean 0 and variance 1, for inputs of mean 2 and
    variance 9. They are now the equal-weight average over the batches of its instances'
    statistics, as BatchNorm's are (equal batches here: the mean over every instance)."""
    generator = torch.Generator().manual_seed(0)
    x = 2.0 + 3.0 * torch.randn(64, 2, 5, 5, generator=generator)
    data = MultiTaskDataset(x, {"size": torch.zeros(64, 1)}, [TaskSpec("size", "regression")])
    model = nn.Sequential(nn.InstanceNorm2d(2, track_running_stats=True)).eval()
    assert recalibrate_running_statistics(model, data, 16) == 64
    norm = model[0]
    per_instance = x.flatten(2)
    torch.testing.assert_close(norm.running_mean, per_instance.mean(dim=2).mean(dim=0))
    torch.testing.assert_close(norm.running_var, per_instance.var(dim=2).mean(dim=0))
    assert norm.momentum == 0.1 and not norm.training  # restored


def test_per_sample_gradients_refuse_batch_statistics_with_a_clear_error(trained) -> None:  # type: ignore[no-untyped-def]
    model, x, y = trained
    specs = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression")]
    batch = {"input": x[:4], "targets": {t: v[:4] for t, v in y.items()},
             "supervision": torch.ones(4, 2, dtype=torch.bool)}
    names = [n for n, _ in model.named_parameters()]
    copy_ = _double_copy(model).float().train()
    with pytest.raises(ValueError, match=r"'trunk.1' \(BatchNorm2d\) is in training mode"):
        per_sample_retain_grads(copy_, batch, specs, names)
    # The user's names, without the wrapper's `module.` (review: the message named
    # 'module.trunk.1', which the user's model does not have).
    from mtunlearn_ext.api import build_problem
    wrapped = build_problem(copy_, tasks=TASKS, train_data=(x, y), shared_parameters=is_trunk,
                            forget_request=ForgetRequest.create(range(8), ["kind"])).model
    with pytest.raises(ValueError, match=r"^test: layer 'trunk\.1' \(BatchNorm2d\) is in "
                                         r"training mode"):
        check_samples_independent(wrapped.train(), "test")
    with pytest.raises(ValueError, match="train_mode"):
        mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=(x, y),
                              forget_request=ForgetRequest.create(range(8), ["kind"]),
                              shared_parameters=is_trunk,
                              config={"steps": 2, "train_mode": True}, seed=0)
    check_samples_independent(copy_.eval(), "test")  # eval mode: fine
    # ... unless a BatchNorm keeps no running statistics: it uses the batch's in eval mode too.
    batch_only = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) keeps no running statistics"):
        check_samples_independent(batch_only.eval(), "test")
    # In eval mode each row's gradient is that of the row alone, dropout or not.
    rows = per_sample_retain_grads(copy_, batch, specs, names)
    alone = copy_(x[2:3])
    loss = nn.functional.cross_entropy(alone["kind"], y["kind"][2:3]) + \
        ((alone["size"] - y["size"][2:3]) ** 2).mean()
    expected = torch.autograd.grad(loss, list(copy_.parameters()))
    for r, e in zip(rows, expected):
        torch.testing.assert_close(r[2], e, rtol=1e-4, atol=1e-6)


def test_train_mode_without_batch_statistics_runs_dropout_per_sample(trained) -> None:  # type: ignore[no-untyped-def]
    model, x, y = trained
    no_bn = NormNet()
    no_bn.trunk[1] = nn.GroupNorm(2, 6)
    no_bn.trunk[4] = nn.GroupNorm(2, 8)
    new, report = mtunlearn_ext.unlearn(
        no_bn, tasks=TASKS, train_data=(x, y),
        forget_request=ForgetRequest.create(range(8), ["kind"]), shared_parameters=is_trunk,
        config={"steps": 3, "lr": 1e-2, "train_mode": True}, seed=0)
    assert report.steps == 3 and "norm_statistics_rows" not in report.extra
    with pytest.raises(ValueError, match="recalibrate_norms"):
        mtunlearn_ext.unlearn(no_bn, tasks=TASKS, train_data=(x, y),
                              forget_request=ForgetRequest.create(range(8)),
                              shared_parameters=is_trunk, config={"recalibrate_norms": 1})
