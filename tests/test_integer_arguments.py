"""Integer arguments take NumPy's integers (``np.int64(3)``, as indexing an array or
``np.random.randint`` gives) and keep the plain ``int`` they stand for (records are JSON), as
the config dataclasses do; a bool and a whole float stay refused (architecture review: about
25 inline checks refused ``np.int64``, and the seed ranges differed between entry points)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.data import TaskSpec, gather, load_benchmark, unseen_instances
from mtunlearn_ext.data import gathering, registry
from mtunlearn_ext.experiment import ExperimentConfig
from mtunlearn_ext.metrics.evaluate import check_positive_int
from mtunlearn_ext.metrics.task_metrics import confusion_matrix
from mtunlearn_ext.models.mlp import MLPMultiTaskNet
from mtunlearn_ext.surgery import GradientSurgery, PCGradWeighting, Sum
from mtunlearn_ext.training import TrainConfig
from mtunlearn_ext.unlearning import get_unlearner
from mtunlearn_ext.workflow import parse_ids

pytestmark = pytest.mark.usefixtures("one_thread")

#: What the argument checks refuse though ``operator.index`` or ``int()`` would take it.
NOT_INTEGERS = [True, np.bool_(True), torch.tensor(True), 2.0, np.float64(2.0), "2",
                torch.tensor([2]), np.array([2])]


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), np.array(3), torch.tensor(3)],
                         ids=["int", "int64", "uint8", "0-d array", "0-d tensor"])
def test_an_integral_scalar_is_its_plain_int(value: object) -> None:
    number = integer_value(value)
    assert number == 3 and type(number) is int


@pytest.mark.parametrize("value", NOT_INTEGERS + [None], ids=repr)
def test_a_bool_a_whole_float_or_a_one_element_tensor_is_no_integer(value: object) -> None:
    assert integer_value(value) is None


def test_load_benchmark_takes_a_numpy_seed_as_an_int(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real = registry.make_digits

    def recording(**kwargs: Any) -> Any:
        seen.append(kwargs["seed"])
        return real(**kwargs)

    monkeypatch.setattr(registry, "make_digits", recording)
    load_benchmark("digits", seed=np.int64(4), size="tiny", use_cache=False)
    assert seen == [4] and type(seen[0]) is int
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"load_benchmark: `seed` must be an integer >= 0, "
                                             rf"got {bad!r}"):
            load_benchmark("digits", seed=bad, size="tiny", use_cache=False)


def test_unseen_instances_take_a_numpy_count_and_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    generate, version, sizes = registry._GENERATED["indoor"]

    def recording(**kwargs: Any) -> Any:
        seen.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setitem(registry._GENERATED, "indoor", (recording, version, sizes))
    pool = unseen_instances("indoor", np.int64(2), seed=np.int32(1), size="tiny")
    assert len(pool) == 2
    (call,) = seen
    assert type(call["num_test"]) is int
    assert call["seed"] == registry.UNSEEN_SEED_OFFSET + 1 and type(call["seed"]) is int
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"unseen_instances: `count` must be a positive "
                                             rf"int, got {bad!r}"):
            unseen_instances("indoor", bad, size="tiny")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"unseen_instances: `seed` must be an int in "
                                             rf"\[0, 2\*\*40\), got {bad!r}"):
            unseen_instances("indoor", 2, seed=bad, size="tiny")  # type: ignore[arg-type]


def test_mlp_widths_may_come_from_a_numpy_array() -> None:
    tasks = [TaskSpec("digit", "classification", num_classes=10), TaskSpec("ink", "regression")]
    model = MLPMultiTaskNet(tasks, in_features=np.int64(64), hidden=np.array([16, 8]),
                            head_hidden=np.int64(4), regression_dims={"ink": np.int64(2)})
    widths = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, nn.Linear)]
    assert all(type(w) is int for pair in widths for w in pair)
    assert widths[:2] == [(64, 16), (16, 8)]
    assert model(torch.zeros(3, 64))["ink"].shape == (3, 2)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"MLPMultiTaskNet: `hidden\[1\]` must be an int "
                                             rf">= 1, got {bad!r}"):
            MLPMultiTaskNet(tasks, hidden=[8, bad])  # type: ignore[list-item]
        with pytest.raises(ValueError, match=r"MLPMultiTaskNet: `in_features` must be an int"):
            MLPMultiTaskNet(tasks, in_features=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"MLPMultiTaskNet: `regression_dims\['ink'\]` "
                                             rf"must be an int >= 1, got {bad!r}"):
            MLPMultiTaskNet(tasks, regression_dims={"ink": bad})  # type: ignore[dict-item]


def test_gather_takes_a_numpy_batch_size_and_worker_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    specs = [TaskSpec("score", "regression")]
    rows = [(torch.full((2,), float(i)), {"score": torch.tensor([float(i)])}) for i in range(5)]
    seen: list[tuple[Any, Any]] = []
    real = gathering._items

    def recording(source: object, num_workers: Any, batch_size: Any, *args: Any,
                  **kwargs: Any) -> Any:
        seen.append((num_workers, batch_size))
        return real(source, num_workers, batch_size, *args, **kwargs)

    monkeypatch.setattr(gathering, "_items", recording)
    read = gather(rows, specs, num_workers=np.int64(0), batch_size=np.int64(3))
    assert len(read) == 5
    assert seen == [(0, 3)] and all(type(v) is int for v in seen[0])
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"gather: `batch_size` must be an integer >= 1, "
                                             rf"got {bad!r}"):
            gather(rows, specs, batch_size=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"gather: `num_workers` must be an integer >= 0, "
                                             rf"got {bad!r}"):
            gather(rows, specs, num_workers=bad)  # type: ignore[arg-type]


def test_gradient_surgery_keeps_num_layers_as_an_int() -> None:
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    surgery = GradientSurgery(trunk.parameters(), Sum(), per_layer=[0, 0, 1, 1],
                              num_layers=np.int64(3))
    assert surgery.num_layers == 3 and type(surgery.num_layers) is int
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"GradientSurgery: `num_layers` must be an integer "
                                             rf">= 1, got {bad!r}"):
            GradientSurgery(trunk.parameters(), Sum(), per_layer=[0, 0, 1, 1],
                            num_layers=bad)  # type: ignore[arg-type]


def test_pcgrad_and_retrain_keep_a_numpy_seed_as_an_int() -> None:
    weighting = PCGradWeighting(seed=np.int64(5))
    assert weighting.seed == 5 and type(weighting.seed) is int
    config = get_unlearner("retrain", {"seed": np.int64(6)}).config
    assert getattr(config, "seed") == 6 and type(getattr(config, "seed")) is int
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"PCGradWeighting: `seed` must be an integer >= 0"):
            PCGradWeighting(seed=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"RetrainConfig: `seed` must be"):
            get_unlearner("retrain", {"seed": bad})


def test_metric_arguments_take_numpy_integers() -> None:
    assert check_positive_int(np.int64(7), "batch_size", "evaluate") == 7
    assert type(check_positive_int(np.int64(7), "batch_size", "evaluate")) is int
    labels = torch.tensor([0, 1, 2, 1])
    assert confusion_matrix(labels, labels, np.int64(3)).trace() == 4
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"evaluate: `batch_size` must be an integer >= 1, "
                                             rf"got {bad!r}"):
            check_positive_int(bad, "batch_size", "evaluate")
        with pytest.raises(ValueError, match=r"confusion_matrix: `num_classes` must be an "
                                             rf"integer >= 1, got {bad!r}"):
            confusion_matrix(labels, labels, bad)  # type: ignore[arg-type]


def test_a_list_of_ids_may_hold_numpy_integers() -> None:
    ids = parse_ids([np.int64(3), 4], "--forget-ids")
    assert ids == [3, 4] and all(type(i) is int for i in ids)


def test_libmtl_sizes_and_caps_are_plain_ints() -> None:
    from mtunlearn_ext.data.libmtl import _checked_arguments

    checked = _checked_arguments("nyuv2", (np.int64(4), np.int64(6)), np.int64(3), None)
    assert checked == ((4, 6), 3, None)
    assert [type(v) for v in (*checked[0], checked[1])] == [int, int, int]
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match=r"nyuv2: `size` must be None or \(height, width\)"):
            _checked_arguments("nyuv2", (4, bad), None, None)
        with pytest.raises(ValueError, match=r"nyuv2: `max_test` must be None or an integer "
                                             rf">= 1, got {bad!r}"):
            _checked_arguments("nyuv2", None, None, bad)


def test_a_bool_tensor_is_no_number_of_classes() -> None:
    """``operator.index(torch.tensor(True))`` is 1: a mask's element was taken for one class."""
    with pytest.raises(TypeError, match=r"`num_classes` must be an integer >= 1 or None"):
        TaskSpec("t", "classification", num_classes=torch.tensor(True))  # type: ignore


# -- seed ranges -------------------------------------------------------------------------------


def test_train_config_takes_the_seeds_retrain_config_takes() -> None:
    """Retrain's `seed` overrides the recipe's, and both seed train()'s generators: the recipe
    took 2**64 (failing inside torch's manual_seed) and -1, which RetrainConfig refused."""
    assert TrainConfig(seed=2**64 - 1).seed == 2**64 - 1
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match=rf"TrainConfig: `seed` must be an int in "
                                             rf"\[0, 2\*\*64\), got {bad}"):
            TrainConfig(seed=bad)
        with pytest.raises(ValueError, match=r"RetrainConfig: `seed` must be an int in "
                                             r"\[0, 2\*\*64\) or None"):
            get_unlearner("retrain", {"seed": bad})


def test_experiment_seeds_are_the_commands_seeds() -> None:
    """ExperimentConfig took any seed >= 0, the commands' --seed at most 2**32 - 1, though
    both seed the same benchmark, recipe and model."""
    ExperimentConfig(benchmark="digits", seed=2**32 - 1).validate()
    with pytest.raises(ValueError, match=r"ExperimentConfig: `seed` must be in \[0, 2\*\*32-1\] "
                                         r".*got 4294967296"):
        ExperimentConfig(benchmark="digits", seed=2**32).validate()
