"""``mtunlearn_ext.unlearn`` on models and data written as users write them (a review that
tried regression labels missing as NaN, heads named after their task with a suffix, output
keys other than the task names), not as the library's own tests build them."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem

TASKS = {"kind": "classification", "size": "regression"}


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.heads = nn.ModuleDict({"kind": nn.Linear(8, 3), "size": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _data(n: int = 24) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), {"kind": torch.randint(0, 3, (n,), generator=g),
                                            "size": torch.randn(n, 1, generator=g)}


def _unlearn(model: nn.Module, data: object, **kwargs: object) -> nn.Module:
    settings: dict[str, object] = dict(
        tasks=TASKS, train_data=data, forget_request=ForgetRequest.create(range(3), ["kind"]),
        shared_parameters=lambda name: name.startswith("trunk."), config={"steps": 2})
    settings.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a two-step run on random labels: its advice
        new, _ = mtunlearn_ext.unlearn(model, **settings)  # type: ignore[arg-type]
    return new


def test_regression_labels_missing_as_nan_are_told_how_to_mask_them() -> None:
    """A regression label missing as NaN (pandas' missing value) was refused as "NaN or Inf
    targets" with no word of the supervision mask that says a pair has no label."""
    x, y = _data()
    size = y["size"].clone()
    size[5:8] = float("nan")
    targets = {"kind": y["kind"], "size": size}
    message = ("unlearn: `train_data`: task 'size' (regression) has NaN or Inf targets on 3 "
               "supervised rows (first: row 5, id 5); if NaN marks a missing label, mark those "
               "rows unsupervised: a supervision mask [N, T], (inputs, targets, mask) or "
               "MultiTaskDataset(..., supervision=mask), whose column 1 (task 'size') is "
               "~targets['size'].isnan().flatten(1).any(1)")
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        _unlearn(_TwoHeads(), (x, targets))
    mask = torch.ones(len(x), 2, dtype=torch.bool)
    mask[:, 1] = ~targets["size"].isnan().flatten(1).any(1)  # what the message says
    new = _unlearn(_TwoHeads(), (x, targets, mask))
    assert all(torch.isfinite(p).all() for p in new.parameters())
    infinite = y["size"].clone()
    infinite[5] = float("inf")  # no missing value: no advice about one
    with pytest.raises(ValueError, match=r"NaN or Inf targets on 1 supervised rows "
                                         r"\(first: row 5, id 5\)$"):
        _unlearn(_TwoHeads(), (x, {"kind": y["kind"], "size": infinite}))


class _SuffixHeads(nn.Module):
    """Heads as torchvision-style models name them: ``kind_head``, not ``heads.kind``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.kind_head, self.size_head = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {"kind": self.kind_head(z), "size": self.size_head(z)}


def test_heads_named_after_their_task_with_a_suffix_are_told_as_head_parameters() -> None:
    """Heads named `kind_head` were refused as "neither shared nor in a head" with no word
    of how the default split finds heads (a component equal to the task's name)."""
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(
            "A head is found by a dotted component of its name equal to its task's, which these "
            "have not; if they are the heads their module names suggest, pass head_parameters="
            "{'kind': model.get_submodule('kind_head'), 'size': model.get_submodule('size_head')}"
            ) + "$"):
        _unlearn(_SuffixHeads(), (x, y))
    model = _SuffixHeads()
    new = _unlearn(model, (x, y), head_parameters={"kind": model.get_submodule("kind_head"),
                                                   "size": model.get_submodule("size_head")})
    assert not torch.equal(new.kind_head.weight, model.kind_head.weight)


class _OneHeadByName(nn.Module):
    """`kind`'s head found by name, `size`'s (`fc_size`) not."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.kind, self.fc_size = nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {"kind": self.kind(z), "size": self.fc_size(z)}


def test_head_parameters_for_some_tasks_leave_the_others_found_by_name() -> None:
    """Naming the one oddly named head (what the refusal suggests) switched off the lookup by
    name for every other task, whose heads were then refused as "neither shared nor in a
    head"."""
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(
            "pass head_parameters={'size': model.get_submodule('fc_size')}") + "$"):
        _unlearn(_OneHeadByName(), (x, y))
    model = _OneHeadByName()
    problem = build_problem(
        model, tasks=TASKS, train_data=(x, y), forget_request=ForgetRequest.create(range(3)),
        shared_parameters=model.trunk, head_parameters={"size": model.fc_size})
    split = problem.model.parameter_split()  # type: ignore[operator]
    assert sorted(split.heads["kind"]) == ["module.kind.bias", "module.kind.weight"]
    assert sorted(split.heads["size"]) == ["module.fc_size.bias", "module.fc_size.weight"]
    assert sorted(split.shared) == ["module.trunk.0.bias", "module.trunk.0.weight"]
    new = _unlearn(model, (x, y), head_parameters={"size": model.fc_size})
    assert not torch.equal(new.kind.weight, model.kind.weight)


class _LeftOverHead(_TwoHeads):
    def __init__(self) -> None:
        super().__init__()
        self.kind_head2 = nn.Linear(8, 2)  # a left-over: no task's prediction uses it


def test_a_left_over_module_named_after_a_task_is_not_offered_as_its_only_head() -> None:
    """The refusal of an unused `kind_head2` offered it as `kind`'s whole head: following
    that left `heads.kind` in no head."""
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(
            "and it found a head of ['kind'] that way already: if those tasks use these modules "
            "too, pass head_parameters={'kind': [model.get_submodule('heads.kind'), "
            "model.get_submodule('kind_head2')]} (a task given there is not looked up by name); "
            "if nothing uses them (a left-over module), freeze them") + "$"):
        _unlearn(_LeftOverHead(), (x, y))
    model = _LeftOverHead()
    model.kind_head2.requires_grad_(False)  # what the message offers for a left-over
    new = _unlearn(model, (x, y))
    assert torch.equal(new.kind_head2.weight, model.kind_head2.weight)


class _HeadsKeyedOtherwise(_TwoHeads):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"cls": nn.Linear(8, 3), "reg": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {"kind": self.heads["cls"](z), "size": self.heads["reg"](z)}


def test_heads_keyed_otherwise_are_told_how_heads_are_found() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(
            "A head is found by a dotted component of its name equal to its task's "
            "(heads.kind.weight), which 'heads.cls.weight' has not") + "$"):
        _unlearn(_HeadsKeyedOtherwise(), (x, y))


class _OwnOutputNames(_TwoHeads):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(x)
        return {"kind_logits": out["kind"], "size_pred": out["size"]}


def test_outputs_under_names_of_their_own_are_told_what_the_keys_must_be() -> None:
    """A forward returning `{"kind_logits": ..., "size_pred": ...}` was refused as having "no
    prediction for tasks ['kind', 'size']", with no word that the keys are the task names."""
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(
            "has no prediction for tasks ['kind', 'size'] (it returns ['kind_logits', "
            "'size_pred']); the output's keys are read as task names: return the tasks' "
            "predictions under ['kind', 'size'], or name the tasks (in `tasks` and the targets) "
            "as the model names its outputs") + "$"):
        _unlearn(_OwnOutputNames(), (x, y))
    renamed = {"kind_logits": y["kind"], "size_pred": y["size"]}  # what the message offers
    model = _OwnOutputNames()
    # The heads, `heads.kind` and `heads.size`, are then no longer found by the tasks' names.
    _unlearn(model, (x, renamed),
             tasks={"kind_logits": "classification", "size_pred": "regression"},
             forget_request=ForgetRequest.create(range(3), ["kind_logits"]),
             head_parameters={"kind_logits": model.heads["kind"],
                              "size_pred": model.heads["size"]})


class _Instances(torch.utils.data.Dataset[dict[str, object]]):
    """Instances as dicts carrying a user's own ids (strings: user names)."""

    def __init__(self, x: torch.Tensor, y: dict[str, torch.Tensor], ids: list[object]) -> None:
        self.x, self.y, self.ids = x, y, ids

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"input": self.x[i], "targets": {t: v[i] for t, v in self.y.items()},
                "id": self.ids[i]}


@pytest.mark.parametrize("loader", [False, True])
def test_string_ids_are_told_to_be_mapped_to_integers(loader: bool) -> None:
    """A dataset whose instances carry string ids ("u0") was refused as "must be a tensor, a
    NumPy array, a number or a list of numbers, got str" (through a loader: torch.as_tensor's
    "too many dimensions 'str'"), with no word of what to carry instead."""
    x, y = _data()
    names = [f"u{i}" for i in range(len(x))]
    data: object = _Instances(x, y, list(names))
    if loader:
        data = torch.utils.data.DataLoader(data, batch_size=5)
    where = "the ids of a batch" if loader else "the id of instance 0"
    with pytest.raises(TypeError, match=re.escape(
            f"unlearn: `train_data`: gather: {where} must be integer ids (a tensor, a NumPy "
            "array, a number or a list of numbers), got the string 'u0': carry integer ids "
            "instead (a dict from your ids to 0..N-1, say) and name those integers in the "
            "ForgetRequest") + "$"):
        _unlearn(_TwoHeads(), data)
    number = {name: i for i, name in enumerate(names)}  # what the message says to do
    _unlearn(_TwoHeads(), _Instances(x, y, [number[n] for n in names]),
             forget_request=ForgetRequest.create([number["u0"], number["u1"]], ["kind"]))


def test_numpy_arrays_are_told_to_be_converted() -> None:
    x, y = _data()
    with pytest.raises(TypeError, match=r"^unlearn: the inputs of `train_data` must be a tensor, "
                                        r".*, got ndarray: convert it with torch\.from_numpy"):
        _unlearn(_TwoHeads(), (x.numpy(), y))
    with pytest.raises(TypeError, match=r"^unlearn: `train_data` targets of task 'kind' must be "
                                        r".*, got ndarray: convert it with torch\.from_numpy"):
        _unlearn(_TwoHeads(), (x, {"kind": y["kind"].numpy(), "size": y["size"]}))


def test_a_mask_per_task_or_of_numbers_is_told_how_to_write_it() -> None:
    """A supervision mask written as the targets are, {task: [N] bool}, or as 0/1 floats, was
    refused as "must be a bool tensor [N, T] ..., got dict" with no word of how to build one."""
    x, y = _data()
    labelled = {"kind": torch.ones(len(x), dtype=torch.bool), "size": torch.rand(len(x)) > 0.3}
    with pytest.raises(TypeError, match=re.escape(
            "got dict: stack the columns in the order of `tasks`, torch.stack([mask['kind'], "
            "mask['size']], dim=1).bool()") + "$"):
        _unlearn(_TwoHeads(), (x, y, labelled))
    mask = torch.stack([labelled["kind"], labelled["size"]], dim=1).bool()  # as it says
    with pytest.raises(TypeError, match=re.escape(
            "got torch.float32 (24, 2): mark the supervised pairs True, mask.bool() for 0/1 "
            "values") + "$"):
        _unlearn(_TwoHeads(), (x, y, mask.float()))
    _unlearn(_TwoHeads(), (x, y, mask))


class _KeywordOnly(_TwoHeads):
    def forward(self, *, pixels: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return super().forward(pixels)


def test_a_keyword_only_forward_given_a_tensor_is_told_to_take_a_dict() -> None:
    """`forward(self, *, pixels)` given inputs as one tensor failed with Python's "takes 1
    positional argument but 2 were given" alone."""
    x, y = _data()
    with pytest.raises(ValueError, match=re.escape(
            "takes 1 positional argument but 2 were given (its forward takes keyword arguments "
            "only, ['pixels']: give the inputs as a dict, ({'pixels': ...}, targets), which is "
            "passed by keyword)") + "$"):
        _unlearn(_KeywordOnly(), (x, y))
    _unlearn(_KeywordOnly(), ({"pixels": x}, y))


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _ResNetTwoHeads(nn.Module):
    """A torchvision-like residual trunk (stem, a basic block, pooling) and two heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = _Block(4)
        self.heads = nn.ModuleDict({"kind": nn.Linear(4, 3), "size": nn.Linear(4, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.layer1(torch.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3))
        return {t: h(z) for t, h in self.heads.items()}


def test_a_resnet_trunk_from_a_shuffling_loader_with_its_own_ids() -> None:
    """A guard over what a user's vision model and loader bring together: BatchNorm in training
    mode, a forward hook, a shuffling loader whose batches carry non-contiguous ids: the
    returned model is of the user's class with the hook, the user's model is left as it was,
    and the run is the one the same instances give as a tuple."""
    x, y = _data()
    images = torch.randn(len(x), 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(len(x)) * 7 + 100
    model = _ResNetTwoHeads().train()
    seen: list[int] = []
    model.layer1.register_forward_hook(lambda module, args, out: seen.append(len(out)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    instances = [{"input": images[i], "targets": {t: v[i] for t, v in y.items()},
                  "id": int(ids[i])} for i in range(len(x))]
    loader = torch.utils.data.DataLoader(
        instances, batch_size=5, shuffle=True,  # type: ignore[arg-type]
        generator=torch.Generator().manual_seed(3))
    trunk = lambda name: not name.startswith("heads.")  # noqa: E731
    new = _unlearn(model, loader, shared_parameters=trunk,
                   forget_request=ForgetRequest.create([100, 107, 114], ["kind"]))
    assert type(new) is _ResNetTwoHeads and not new.training and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    seen.clear()
    new(images[:2])
    assert seen == [2]  # the hook came along
    as_tuple = _unlearn(_ResNetTwoHeads().train(), (images, y), shared_parameters=trunk)
    assert all(torch.equal(v, as_tuple.state_dict()[k]) for k, v in new.state_dict().items())


def test_the_run_computes_on_the_models_own_device_by_default() -> None:
    """`device` defaulted to "cpu": a CUDA model given without it was unlearned on the CPU and
    came back there (tests/test_cuda.py runs that case on a GPU). The default is the model's
    own device, and a model spread over several devices is asked which one to compute on."""
    import inspect

    from mtunlearn_ext.api._problem import model_device

    for entry_point in (mtunlearn_ext.unlearn, mtunlearn_ext.api.build_problem):
        assert inspect.signature(entry_point).parameters["device"].default is None
    assert model_device(_TwoHeads()) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters
    # Meta parameters are left to the checks that name them (test_api_validation).
    assert model_device(_TwoHeads().to("meta")) == torch.device("cpu")
    with pytest.raises(ValueError, match=re.escape(
            "`device`: the model's parameters are on several devices (cpu, cuda:1); pass the "
            "one to compute on, device=...")):
        model_device(_FakeDevices([torch.device("cpu"), torch.device("cuda", 1)]))
    x, y = _data()
    new = _unlearn(_TwoHeads(), (x, y))
    assert {p.device.type for p in new.parameters()} == {"cpu"}


class _FakeDevices(nn.Module):
    """A module whose parameters report the given devices (no second device here)."""

    def __init__(self, devices: list[torch.device]) -> None:
        super().__init__()
        self._devices = devices

    def parameters(self, recurse: bool = True):  # type: ignore[no-untyped-def]
        class _On:
            def __init__(self, device: torch.device) -> None:
                self.device, self.is_meta = device, False
        return iter([_On(d) for d in self._devices])
