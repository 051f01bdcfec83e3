"""The public result objects as a user handles them in a REPL, in ``if`` / ``assert`` and in
sets: their reprs, truth values and equality (an API review)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.metrics.uis_floor import UISFloor
from mtunlearn_ext.surgery import GradientSurgery, UPGrad
from mtunlearn_ext.unlearning.interference import InterferenceMatrix

TASKS = {"a": "classification", "b": "regression"}


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}


def test_a_report_repr_names_its_curves_instead_of_printing_every_value() -> None:
    """The dataclass repr printed every logged value (8.7k characters at the default 25
    steps, 49k at 200); it now names each curve with its length and last value."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = {"a": torch.randint(0, 3, (40,), generator=g), "b": torch.randn(40, 1, generator=g)}
    _, report = mtunlearn_ext.unlearn(_TwoHeads(), tasks=TASKS, train_data=(x, y),
                                      forget_request=ForgetRequest.create(range(5)),
                                      shared_parameters=lambda n: n.startswith("trunk."),
                                      config={"steps": 200, "log_every": 1})
    text = repr(report)
    assert len(report.curves["forget_loss"]) == 200
    assert len(text) < 1500, len(text)
    last = report.curves["forget_loss"][-1]
    assert f"forget_loss: 200 points, last {last:.4g}" in text
    assert "method='interference_aware'" in text and "steps=200" in text and str(report) == text


def test_requests_naming_the_same_pairs_are_equal_in_any_order() -> None:
    """Equality compared the id tuples in order: two requests for the same instances were
    unequal, hashed apart and both kept in a set (their ids_hash was already the same)."""
    first = ForgetRequest.create([3, 1, 2], ["b", "a"])
    second = ForgetRequest.create([1, 2, 3], ["a", "b"])
    assert first == second and hash(first) == hash(second) and len({first, second}) == 1
    assert first.instance_ids == (3, 1, 2)  # the order is kept: it orders the forget rows
    assert first != ForgetRequest.create([1, 2, 4], ["a", "b"])
    assert first != ForgetRequest.create([1, 2, 3], ["a"])
    assert ForgetRequest.create([1, 2]) != ForgetRequest.create([1, 2], ["a", "b"])
    assert first != (1, 2, 3)


def test_a_long_request_repr_shows_its_ends_and_count_not_every_id() -> None:
    """The dataclass repr printed every id (689k characters for 100,000 ids), and so did the
    repr of each problem holding the request; a short request reads as before."""
    big = ForgetRequest.create(range(100_000), ["a"])
    assert repr(big) == ("ForgetRequest(instance_ids=(0, 1, 2, 3, 4, ..., 99995, 99996, 99997, "
                         "99998, 99999) [100,000 ids], target_tasks=('a',))")
    assert repr(ForgetRequest.create([3, 1, 2])) == (
        "ForgetRequest(instance_ids=(3, 1, 2), target_tasks=None)")
    ten = ForgetRequest.create(range(10))
    assert repr(ten) == f"ForgetRequest(instance_ids={tuple(range(10))!r}, target_tasks=None)"
    assert "[11 ids]" in repr(ForgetRequest.create(range(11)))


def test_a_checkpoint_repr_counts_its_tensors_instead_of_printing_them() -> None:
    """The dataclass repr printed every tensor of the state dict (17k characters for the
    digits benchmark's 16-tensor MLP) and the whole metadata."""
    from mtunlearn_ext.training import Checkpoint

    state = {f"layer{i}.weight": torch.zeros(64, 64) for i in range(16)}
    checkpoint = Checkpoint(state_dict=state, meta={"task_names": ["a"] * 1000, "seed": 0},
                            sha256="ab" * 32)
    assert repr(checkpoint) == ("Checkpoint(state_dict: 16 tensors (65,536 values), meta: "
                                f"['seed', 'task_names'], sha256='{'ab' * 32}', "
                                "state_sha256=None)")


def test_a_benchmark_repr_names_a_long_info_value_by_its_size() -> None:
    """A LibMTL benchmark's info holds the SHA-256 of every file it read; the dataclass repr
    printed each (67,829 characters for the 795 digests below, 385 now). Short values, and
    the rest of the repr, read as before."""
    from mtunlearn_ext.data import Benchmark

    spec = TaskSpec("a", "classification", num_classes=2)
    data = MultiTaskDataset(torch.randn(4, 3), {"a": torch.tensor([0, 1, 1, 0])}, [spec])
    files = {f"image/{i}.npy": "ab" * 32 for i in range(795)}
    benchmark = Benchmark("nyuv2", data, data, [spec],
                          {"layout": "LibMTL npy", "train_files_sha256": files})
    text = repr(benchmark)
    assert len(text) < 700, len(text)
    assert ("info={'layout': 'LibMTL npy', 'train_files_sha256': <dict of 795 entries>}, "
            "validation=None)") in text
    assert text.startswith(f"Benchmark(name='nyuv2', train={data!r}, test={data!r}, "
                           f"tasks=[{spec!r}], ")
    short = Benchmark("toy", data, data, [spec], {"seed": 0, "sizes": [1, 2]})
    assert repr(short) == (f"Benchmark(name='toy', train={data!r}, test={data!r}, "
                           f"tasks=[{spec!r}], info={{'seed': 0, 'sizes': [1, 2]}}, "
                           "validation=None)")


def test_parameter_groups_say_their_sizes_instead_of_printing_every_parameter() -> None:
    """The dataclass repr printed each parameter's values (9.6k characters for a small
    two-head model), and a StepContext's repr, which a method's author prints, held it."""
    from mtunlearn_ext.unlearning import ParameterGroups

    model = _TwoHeads()
    named = dict(model.named_parameters())
    groups = ParameterGroups(
        tuple((n, p) for n, p in named.items() if n.startswith("trunk.")),
        {t: tuple((n, p) for n, p in named.items() if n.startswith(f"heads.{t}."))
         for t in ("a", "b")})
    assert repr(groups) == ("ParameterGroups(shared: 2 tensors (56 values), heads: "
                            "{a: 2 tensors (27 values), b: 2 tensors (9 values)})")


def test_results_holding_tensors_compare_without_raising() -> None:
    """The generated ``__eq__`` compared tensor fields, so ``copy.deepcopy(floor) == floor``
    raised "Boolean value of Tensor ... is ambiguous"; they compare by identity now."""
    floor = UISFloor(draws=torch.tensor([1.0, 2.0]), forget_change={"a": {"accuracy": 1.0}},
                     original_test={"a": {"accuracy": 0.9}}, forget_size=3, pool_size=9)
    assert floor == floor and (copy.deepcopy(floor) == floor) is False
    matrix = InterferenceMatrix(labels=["forget/a"], before=torch.eye(1), after=torch.eye(1),
                                forget_kept={"a": 1.0})
    assert matrix == matrix and (copy.deepcopy(matrix) == matrix) is False


def test_a_data_set_and_a_surgery_say_what_they_hold() -> None:
    data = MultiTaskDataset(torch.randn(5, 3), {"a": torch.tensor([0, 1, -1, 1, 0])},
                            [TaskSpec("a", "classification", num_classes=2)])
    assert repr(data) == ("MultiTaskDataset(5 instances, tasks {a: classification}, supervised "
                          "pairs {a 4})")
    layer = nn.Linear(3, 3)
    assert repr(GradientSurgery(list(layer.parameters()), UPGrad(), per_layer=[0, 0])) == (
        "GradientSurgery(UPGrad(pref_vector=None, reg_eps=0.0), shared: 2 tensors (12 values), "
        "heads: None, per_task='autograd', per_layer: 1 layer, check_finite=True)")


def test_curves_read_a_steps_tensors_in_one_transfer_as_the_same_numbers() -> None:
    """The recorder read each logged tensor with its own .item() (on CUDA a sync per value,
    about 9 per step, where its docstring said one per step); now one transfer per call, which
    must give the numbers each .item() gave, for every float dtype."""
    from mtunlearn_ext.unlearning.base import CurveRecorder

    gen = torch.Generator().manual_seed(0)
    values = {f"v{dtype}".replace("torch.", ""): (torch.randn((), generator=gen) * 1e3).to(dtype)
              for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
    recorder = CurveRecorder()
    recorder.log(3, **values, plain=0.25, absent=None, count=torch.tensor(7))
    for name, value in values.items():
        assert recorder.curves[name] == [value.item()] and recorder.steps[name] == [3]
    assert recorder.curves["plain"] == [0.25] and recorder.curves["count"] == [7.0]
    assert "absent" not in recorder.curves
