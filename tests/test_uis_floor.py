"""``uis_floor``: the UIS of an untouched model with random sets of unseen instances as the forget
set, and ``unseen_instances``, the fresh scenes it draws them from."""

from __future__ import annotations

import pytest
import torch

from mtunlearn_ext.data import MultiTaskDataset, TaskSpec, load_benchmark, unseen_instances
from mtunlearn_ext.metrics import evaluate, uis, uis_floor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool():
    return unseen_instances("indoor", 40, seed=0, size="tiny")


def test_unseen_instances_are_fresh_and_reproducible(indoor_tiny, pool) -> None:
    assert len(pool) == 40 and pool.task_names == indoor_tiny.train.task_names
    assert pool.inputs.shape[1:] == indoor_tiny.train.inputs.shape[1:]
    again = unseen_instances("indoor", 40, seed=0, size="tiny")
    assert torch.equal(again.inputs, pool.inputs)
    other = unseen_instances("indoor", 40, seed=1, size="tiny")
    assert not torch.equal(other.inputs, pool.inputs)
    # None of them is an image of the benchmark's own splits.
    seen = torch.cat([indoor_tiny.train.inputs, indoor_tiny.test.inputs]).flatten(1)
    distances = torch.cdist(pool.inputs.flatten(1), seen)
    assert float(distances.min()) > 1.0
    street = unseen_instances("street", 3, size="tiny")
    assert street.task_names == load_benchmark("street", size="tiny").train.task_names


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "digits", "count": 3}, "not a generated benchmark"),
    ({"name": "indoor", "count": 0}, "`count`"),
    ({"name": "indoor", "count": 3, "seed": -1}, "`seed`"),
    ({"name": "indoor", "count": 3, "size": "huge"}, "unknown size"),
])
def test_unseen_instances_rejects_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        unseen_instances(**kwargs)


def test_a_draw_of_the_whole_pool_is_the_pools_uis(indoor_tiny, indoor_tiny_model, pool) -> None:
    test = indoor_tiny.test
    floor = uis_floor(indoor_tiny_model, test, pool, len(pool), draws=3, batch_size=16)
    # Same batches, same rows, same order of the pooled sums: equal to the last bit.
    original = evaluate(indoor_tiny_model, test, batch_size=16)
    expected = uis(original, original, evaluate(indoor_tiny_model, pool, batch_size=16))
    assert floor.draws.shape == (3,) and floor.draws.dtype == torch.float64
    assert torch.equal(floor.draws, torch.full((3,), expected, dtype=torch.float64))
    assert floor.forget_size == len(pool) and floor.pool_size == len(pool)
    assert floor.original_test == original
    assert expected > 0.0


def test_the_reference_itself_has_no_distance(indoor_tiny, indoor_tiny_model) -> None:
    test = indoor_tiny.test
    # The reference's rows under ids of their own (the reference itself is refused, below):
    # the floor's zero point, draws that score exactly O_t.
    renumbered = MultiTaskDataset(test.inputs, test.targets, test.tasks,
                                  ids=test.ids + 10**6, supervision=test.supervision)
    floor = uis_floor(indoor_tiny_model, test, renumbered, len(test), draws=2, batch_size=64)
    assert floor.mean == 0.0 and floor.quantile(0.95) == 0.0
    assert all(v == 0.0 for metrics in floor.forget_change.values() for v in metrics.values())


def test_an_unseen_pool_sharing_instances_with_the_reference_is_refused(
        indoor_tiny, indoor_tiny_model, pool) -> None:
    """``unseen`` was documented never to be the reference split nor overlap it (its instances
    are already in O_t, and draws of them score nearer O_t than unseen data does: the floor
    reads too low), but nothing checked it: the reference itself measured a floor of 0."""
    test = indoor_tiny.test
    with pytest.raises(ValueError, match=r"^uis_floor: `unseen` shares 24 instances with "
                                         r"`reference` \(ids \[\d+, \d+, \d+, \d+, \d+, "
                                         r"\.\.\.\]; `unseen` is `reference` itself\).*O_t"):
        uis_floor(indoor_tiny_model, test, test, 4, draws=2)
    # A pool with a few of the test split's instances among unseen ones.
    some = test.subset([3, 7])
    mixed = MultiTaskDataset(torch.cat([pool.inputs, some.inputs]),
                             {t: torch.cat([pool.targets[t], some.targets[t]])
                              for t in pool.task_names},
                             pool.tasks, ids=torch.cat([pool.ids, some.ids]),
                             supervision=torch.cat([pool.supervision, some.supervision]))
    shared = sorted(some.ids.tolist())
    with pytest.raises(ValueError, match=rf"^uis_floor: `unseen` shares 2 instances with "
                                         rf"`reference` \(ids \[{shared[0]}, {shared[1]}\]\)"):
        uis_floor(indoor_tiny_model, test, mixed, 4, draws=2)
    # Fresh scenes, ids of their own: measured.
    assert uis_floor(indoor_tiny_model, test, pool, 4, draws=2).draws.shape == (2,)


def test_draws_are_seeded_and_smaller_sets_scatter_more(indoor_tiny, indoor_tiny_model,
                                                        pool) -> None:
    test = indoor_tiny.test
    model = indoor_tiny_model.train()  # evaluated in eval mode, then put back
    first = uis_floor(model, test, pool, 10, draws=20, seed=3)
    assert model.training
    model.eval()
    again = uis_floor(model, test, pool, 10, draws=20, seed=3)
    other = uis_floor(model, test, pool, 10, draws=20, seed=4)
    assert torch.equal(first.draws, again.draws) and not torch.equal(first.draws, other.draws)
    assert len(set(first.draws.tolist())) > 10  # the draws differ from each other
    assert first.quantile(0.05) <= first.mean <= first.quantile(0.95)
    # Sets of 4 instances scatter further from the test level than sets of 40 (the whole pool)
    # on average: the floor falls with n.
    small = uis_floor(model, test, pool, 4, draws=40, seed=3)
    whole = uis_floor(model, test, pool, len(pool), draws=1)
    assert small.mean > whole.mean


def test_target_tasks_and_a_given_original_score(indoor_tiny, indoor_tiny_model, pool) -> None:
    test = indoor_tiny.test
    floor = uis_floor(indoor_tiny_model, test, pool, 8, tasks=["segmentation"], draws=5)
    assert set(floor.forget_change) == {"segmentation"}
    assert set(floor.original_test) == {"segmentation"}
    # O_t given: the draws are compared with it, not with a fresh evaluation.
    shifted = {"segmentation": {m: v * 0.5 for m, v in
                                evaluate(indoor_tiny_model, test)["segmentation"].items()}}
    moved = uis_floor(indoor_tiny_model, test, pool, 8, tasks=["segmentation"], draws=5,
                      original_test=shifted)
    assert moved.original_test == shifted and moved.mean > floor.mean
    with pytest.raises(ValueError, match=r"`original_test` lacks task\(s\) \['depth'\]"):
        uis_floor(indoor_tiny_model, test, pool, 8, tasks=["segmentation", "depth"],
                  original_test=shifted)


def test_non_finite_outputs_are_an_error(indoor_tiny, pool) -> None:
    from mtunlearn_ext.models import build_model

    model = build_model(indoor_tiny, seed=0)
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    original = {"depth": {"abs_err": 1.0, "rel_err": 0.5, "delta_1.25": 0.5}}
    with pytest.raises(ValueError, match="non-finite"):
        uis_floor(model, indoor_tiny.test, pool, 4, tasks=["depth"], draws=2,
                  original_test=original)



def test_a_task_unlabelled_in_the_reference_or_a_draw_is_an_error(indoor_tiny, indoor_tiny_model,
                                                                   pool) -> None:
    """Metrics review: evaluate leaves out a task with no supervised, labelled pair, and the
    floor averaged each draw over the tasks left: with depth unlabelled in the reference, or
    in a draw of one instance from a pool labelling depth on every other instance, the floor
    was a mean over segmentation and normals only (or over a mix of draws with and without
    depth), with no word. A request's UIS needs every target task's O_t and forget score."""
    test = indoor_tiny.test
    no_depth = test.supervision.clone()
    no_depth[:, 1] = False
    with pytest.raises(ValueError, match=r"`reference` has no supervised, labelled pair of "
                                         r"task\(s\) \['depth'\]"):
        uis_floor(indoor_tiny_model, test.with_supervision(no_depth), pool, 4, draws=3)
    sparse = pool.supervision.clone()
    sparse[::2, 1] = False
    with pytest.raises(ValueError, match=r"draw \d+ \(`forget_size` 1 of `unseen`\) has no "
                                         r"supervised, labelled pair of task\(s\) \['depth'\]; "
                                         r".*'depth' 20 of 40"):
        uis_floor(indoor_tiny_model, test, pool.with_supervision(sparse), 1, draws=10)
    # Draws that each hold a labelled instance of every task are measured as before.
    assert uis_floor(indoor_tiny_model, test, pool.with_supervision(sparse), 39,
                     draws=3).draws.shape == (3,)

@pytest.mark.parametrize("kwargs, message", [
    ({"forget_size": 41}, "exceeds the `unseen` pool"),
    ({"forget_size": 0}, "`forget_size`"),
    ({"forget_size": True}, "`forget_size`"),
    ({"forget_size": 4, "draws": 0}, "`draws`"),
    ({"forget_size": 4, "batch_size": 0}, "`batch_size`"),
    ({"forget_size": 4, "tasks": ["colour"]}, r"unknown task\(s\) \['colour'\]"),
    ({"forget_size": 4, "tasks": []}, "`tasks` is empty"),
])
def test_uis_floor_rejects_bad_arguments(indoor_tiny, indoor_tiny_model, pool, kwargs,
                                         message) -> None:
    with pytest.raises(ValueError, match=message):
        uis_floor(indoor_tiny_model, indoor_tiny.test, pool, **kwargs)


# -- the data forms of mtunlearn_ext.unlearn ------------------------------------------------------


class _TwoHeads(torch.nn.Module):
    """A user's own module, as in unlearn()'s example: ``model(x)`` -> task -> output, no
    ``parameter_split()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict({"kind": torch.nn.Linear(32, 3),
                                          "size": torch.nn.Linear(32, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}


class _CalledWithTasks(torch.nn.Module):
    """The same module called as the library calls a MultiTaskModel, ``model(x, tasks)``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, tasks: object = None) -> dict[str, torch.Tensor]:
        return self.module(x)


def _tuple_data(rows: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 8, generator=generator),
            {"kind": torch.randint(0, 3, (rows,), generator=generator),
             "size": torch.randn(rows, 1, generator=generator)})


def _as_dataset(data: tuple[torch.Tensor, dict[str, torch.Tensor]], first_id: int = 0
                ) -> MultiTaskDataset:
    x, y = data
    return MultiTaskDataset(x, {"kind": y["kind"]},
                            [TaskSpec("kind", "classification", num_classes=3)],
                            ids=torch.arange(first_id, first_id + len(x)))


def test_tuple_data_and_a_plain_module_as_unlearn_takes_them() -> None:
    """mtunlearn_ext.uis_floor takes the data forms unlearn() takes. The metric's own function
    compared ``forget_size`` with the tuple's length (2), and then read ``.task_names`` off the
    tuple (AttributeError)."""
    from mtunlearn_ext import uis_floor as api_uis_floor

    model = _TwoHeads().eval()
    test, pool = _tuple_data(60, seed=1), _tuple_data(50, seed=2)
    floor = api_uis_floor(model, test, pool, 10, tasks={"kind": "classification"}, draws=20)
    # The same measurement on the same values given as data sets, with the module called as a
    # MultiTaskModel is: equal to the last bit.
    expected = uis_floor(_CalledWithTasks(model), _as_dataset(test), _as_dataset(pool, 1000),
                         10, tasks=["kind"], draws=20)
    assert torch.equal(floor.draws, expected.draws)
    assert floor.pool_size == 50 and floor.forget_size == 10
    assert set(floor.original_test) == {"kind"}  # the other task's targets are left out
    # One split a data set, the other a tuple: the task's kind comes from the data set (whose
    # ids, here those the tuple gets, are no obstacle either way round).
    mixed = api_uis_floor(model, _as_dataset(test), pool, 10, tasks=["kind"], draws=20)
    assert torch.equal(mixed.draws, expected.draws)
    mixed = api_uis_floor(model, test, _as_dataset(pool), 10, tasks=["kind"], draws=20)
    assert torch.equal(mixed.draws, expected.draws)
    # A supervision mask (columns in the order of `tasks`) keeps its unlabelled rows out: the
    # whole pool scores as the labelled rows alone.
    supervised = torch.ones(50, 1, dtype=torch.bool)
    supervised[:10] = False
    masked = api_uis_floor(model, test, (pool[0], pool[1], supervised), 50,
                       tasks={"kind": "classification"}, draws=1)
    labelled = api_uis_floor(model, test, (pool[0][10:], {"kind": pool[1]["kind"][10:]}), 40,
                         tasks={"kind": "classification"}, draws=1)
    assert torch.equal(masked.draws, labelled.draws)


def test_the_api_refuses_an_unseen_split_sharing_instances_with_the_reference() -> None:
    """As the metric does (by id), for the forms unlearn() takes: tuple rows carry no ids, so
    they are compared by content (equal inputs and labels), the ids the API makes up for them
    (0..N-1 for both splits) being no instances' ids."""
    from mtunlearn_ext import uis_floor as api_uis_floor

    model = _TwoHeads().eval()
    kinds = {"kind": "classification"}
    test, pool = _tuple_data(60, seed=1), _tuple_data(50, seed=2)
    with pytest.raises(ValueError, match=r"^uis_floor: `unseen` shares 60 instances with "
                                         r"`reference` \(`unseen` rows \[0, 1, 2, 3, 4, "
                                         r"\.\.\.\] have the inputs and labels of `reference` "
                                         r"rows \[0, 1, 2, 3, 4, \.\.\.\]; .* compared by "
                                         r"content; `unseen` is `reference` itself\); `unseen` "
                                         r"must hold instances outside the reference split"):
        api_uis_floor(model, test, test, 10, tasks=kinds)
    # Two test rows among the pool's, in a tuple beside a tuple or beside a data set.
    x = torch.cat([pool[0], test[0][[5, 9]]])
    y = {t: torch.cat([pool[1][t], test[1][t][[5, 9]]]) for t in pool[1]}
    message = (r"^uis_floor: `unseen` shares 2 instances with `reference` \(`unseen` rows "
               r"\[50, 51\] have the inputs and labels of `reference` rows \[5, 9\]")
    with pytest.raises(ValueError, match=message):
        api_uis_floor(model, test, (x, y), 10, tasks=kinds)
    with pytest.raises(ValueError, match=message):
        api_uis_floor(model, _as_dataset(test), (x, y), 10, tasks=["kind"])
    with pytest.raises(ValueError, match=message):
        api_uis_floor(model, test, _as_dataset((x, y), 1000), 10, tasks=["kind"])
    # Equal inputs labelled otherwise are other instances (duplicate images).
    relabelled = {t: v.clone() for t, v in y.items()}
    relabelled["kind"][50:] = (relabelled["kind"][50:] + 1) % 3
    assert api_uis_floor(model, test, (x, relabelled), 10, tasks=kinds, draws=2).pool_size == 52
    # Two data sets: compared by id, by the metric.
    with pytest.raises(ValueError, match=r"^uis_floor: `unseen` shares 50 instances with "
                                         r"`reference` \(ids \[0, 1, 2, 3, 4, \.\.\.\]\);"
                                         r".*give `unseen` ids of its own"):
        api_uis_floor(model, _as_dataset(test), _as_dataset(pool), 10, tasks=["kind"])
    assert api_uis_floor(model, _as_dataset(test), _as_dataset(pool, 1000), 10,
                         tasks=["kind"], draws=2).pool_size == 50


def test_tuple_data_needs_the_task_kinds_and_none_is_refused_by_name() -> None:
    from mtunlearn_ext import uis_floor as api_uis_floor

    model = _TwoHeads().eval()
    test, pool = _tuple_data(60, seed=1), _tuple_data(50, seed=2)
    with pytest.raises(TypeError, match=r"uis_floor: `reference` and `unseen` given as \(inputs, "
                                        r"targets\) carry no task kinds, so `tasks` must give "
                                        r"them: a mapping task -> kind \(e.g. \{'kind': "):
        api_uis_floor(model, test, pool, 10, tasks=["kind"])
    # A benchmark without a validation split: `unseen` None was `object of type 'NoneType'
    # has no len()`.
    with pytest.raises(TypeError, match=r"uis_floor: `unseen` is None; expected a "
                                        r"MultiTaskDataset or \(inputs, targets"
                                        r"\[, supervision\]\).*never trained on"):
        api_uis_floor(model, test, None, 10, tasks={"kind": "classification"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"uis_floor: `reference` is None; .*test split"):
        api_uis_floor(model, None, pool, 10, tasks={"kind": "classification"})  # type: ignore[arg-type]
    # unlearn()'s own checks of the forms, under this function's name.
    with pytest.raises(TypeError, match=r"^uis_floor: `unseen`\[1\] must be the targets"):
        api_uis_floor(model, test, (pool[0], pool[1]["kind"]), 10,  # type: ignore[arg-type]
                  tasks={"kind": "classification"})
    with pytest.raises(ValueError, match=r"uis_floor: task 'kind' \(classification\) has class "
                                         r"labels up to 5\b.*, but the model predicts 3 classes"):
        bad = {"kind": pool[1]["kind"].clone()}
        bad["kind"][7] = 5
        api_uis_floor(model, test, (pool[0], bad), 10, tasks={"kind": "classification"})
    with pytest.raises(ValueError, match="`tasks` is empty"):
        api_uis_floor(model, test, pool, 10, tasks={})


def test_the_metric_itself_refuses_other_forms_and_names_the_api_function() -> None:
    """mtunlearn_ext.metrics sits below the API: its uis_floor takes data sets only, and says
    where the other forms are taken (``None`` was ``object of type 'NoneType' has no len()``,
    a tuple ``forget_size (10) exceeds the unseen pool (2 instances)``)."""
    test, pool = _tuple_data(60, seed=1), _tuple_data(50, seed=2)
    model = _CalledWithTasks(_TwoHeads().eval())
    with pytest.raises(TypeError, match=r"uis_floor: `unseen` must be a MultiTaskDataset: a pool "
                                        r"of instances the model never trained on .*got NoneType "
                                        r".*use mtunlearn_ext\.uis_floor"):
        uis_floor(model, _as_dataset(test), None, 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"uis_floor: `reference` must be a MultiTaskDataset: the "
                                        r"split UIS compares with .*got tuple"):
        uis_floor(model, test, _as_dataset(pool), 10)  # type: ignore[arg-type]
