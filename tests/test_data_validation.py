"""Input validation of the data layer: forget requests built directly, row selections by mask or
position, targets and ids of a data set, the ids of the unseen pool; and, in ``unlearn`` and
``uis_floor``, class labels past the model's classes (the first bad row named, every data set
counted) and data sets that describe a task otherwise than ``tasks``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from mtunlearn_ext.data import ForgetRequest, MultiTaskDataset, TaskSpec, registry
from mtunlearn_ext.data.registry import UNSEEN_ID_OFFSET, unseen_instances

SPECS = [TaskSpec("a", "classification", num_classes=3), TaskSpec("b", "regression")]


def _data(n: int = 6, ids: object = None) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = {"a": torch.randint(0, 3, (n,), generator=g), "b": torch.randn(n, 1, generator=g)}
    return MultiTaskDataset(x, y, SPECS, ids=ids)  # type: ignore[arg-type]


# -- ForgetRequest built directly (bug 11) --------------------------------------------------------


@pytest.mark.parametrize("bad, shown", [
    ((1.7, 2.2), "1.7"),  # was truncated to ids 1 and 2
    ((True, False), "True"),  # was ids 1 and 0
    ([torch.tensor(True)], "tensor(True)"),
    ([torch.tensor(1.5)], "tensor(1.5"),
    (torch.tensor([0.5, 1.0]), "0.5"),
    (("1", "2"), "'1'"),
    ("3,5", "'3,5'"),
    (b"35", "b'35'"),  # was ids 51 and 53, the bytes' codes
    (bytearray(b"\x03"), "bytearray(b'\\x03')"),  # was id 3
])
def test_direct_forget_request_refuses_non_integer_ids(bad: object, shown: str) -> None:
    with pytest.raises(TypeError, match=r"ForgetRequest: `instance_ids` must be integers") as info:
        ForgetRequest(bad, ("a",))  # type: ignore[arg-type]
    assert shown in str(info.value)


def test_direct_forget_request_normalises_ids_and_hash() -> None:
    """However the ids are given, a request holds Python ints and hashes them the same way."""
    expected = ForgetRequest.create([1, 2], "a")
    for ids in (torch.tensor([2, 1]), np.array([1, 2]), (1.0, 2.0), [np.int64(1), torch.tensor(2)]):
        request = ForgetRequest(ids, ("a",))  # type: ignore[arg-type]
        assert all(type(i) is int for i in request.instance_ids)
        assert sorted(request.instance_ids) == [1, 2]
        assert request.ids_hash() == expected.ids_hash()
    # One task named by a plain string stays one task, as in ``create``.
    assert ForgetRequest((1, 2), "a").target_tasks == ("a",)  # type: ignore[arg-type]
    assert ForgetRequest((1, 2), ["a"]).target_tasks == ("a",)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`target_tasks` must be task names"):
        ForgetRequest((1, 2), (3,))  # type: ignore[arg-type]


def test_forget_request_refuses_id_matrices() -> None:
    """A ``[2, 2]`` tensor or array used to be flattened into four ids without a word; a 0-d
    tensor stays one id and a 1-D one a list."""
    for ids in (torch.tensor([[1, 2], [3, 4]]), np.array([[1], [2]])):
        with pytest.raises(TypeError, match=r"`instance_ids` must be one-dimensional \(one id per "
                                            r"instance\), got shape \((2, 2|2, 1)\)"):
            ForgetRequest.create(ids, "a")
    assert ForgetRequest.create(torch.tensor(3), "a").instance_ids == (3,)
    assert ForgetRequest.create(np.array([3, 1]), "a").instance_ids == (3, 1)


def test_direct_forget_request_with_tensor_duplicates_is_refused() -> None:
    """A tensor's elements are distinct objects: the duplicate check used to miss ``[1, 1, 2]``."""
    request = ForgetRequest(torch.tensor([1, 1, 2]), ("a",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`instance_ids` holds duplicates: \[1\]"):
        request.validate(_data())
    with pytest.raises(ValueError, match=r"`instance_ids` holds duplicates"):
        request.split(_data())


# -- unseen_instances' ids (bug 12) ---------------------------------------------------------------


def test_unseen_instances_ids_lie_outside_every_benchmark_split(  # type: ignore[no-untyped-def]
        indoor_tiny) -> None:
    pool = unseen_instances("indoor", 8, seed=0, size="tiny")
    assert pool.ids.tolist() == list(range(UNSEEN_ID_OFFSET, UNSEEN_ID_OFFSET + 8))
    splits = [indoor_tiny.train, indoor_tiny.test, indoor_tiny.validation]
    seen = set(torch.cat([s.ids for s in splits if s is not None]).tolist())
    assert seen.isdisjoint(pool.ids.tolist())
    # Above the largest id any generated benchmark size can produce.
    for _, _, sizes in registry._GENERATED.values():
        for kwargs in sizes.values():
            total = kwargs["num_train"] + kwargs["num_test"] + kwargs["num_validation"]
            assert total < UNSEEN_ID_OFFSET
    # The same arguments still give the same pool, whose rows are the generator's.
    again = unseen_instances("indoor", 8, seed=0, size="tiny")
    assert torch.equal(again.inputs, pool.inputs) and torch.equal(again.ids, pool.ids)


# -- subset / batch positions (bug 13) -------------------------------------------------------------


def test_subset_and_batch_take_a_bool_mask_as_a_mask() -> None:
    data = _data(ids=torch.arange(100, 106))
    mask = torch.tensor([False, False, False, True, True, True])
    assert data.subset(mask).ids.tolist() == [103, 104, 105]
    assert data.batch(mask)["id"].tolist() == [103, 104, 105]
    assert data.subset([True, False, True, False, False, False]).ids.tolist() == [100, 102]
    for method in ("subset", "batch"):
        with pytest.raises(ValueError, match=rf"MultiTaskDataset.{method}: `positions`: a bool "
                                             r"mask must have shape \[6\]"):
            getattr(data, method)(torch.tensor([True, False]))


@pytest.mark.parametrize("positions", [[0.7, 2.2], torch.tensor([0.0, 2.0]), np.array([1.5])])
def test_subset_and_batch_refuse_non_integer_positions(positions: object) -> None:
    data = _data()
    for method in ("subset", "batch"):
        with pytest.raises(TypeError, match=rf"MultiTaskDataset.{method}: `positions` must be "
                                            r"integer row positions"):
            getattr(data, method)(positions)


def test_subset_and_batch_still_take_integer_positions() -> None:
    data = _data(ids=torch.arange(100, 106))
    assert data.subset([4, 1]).ids.tolist() == [104, 101]
    assert data.subset(np.array([2, 3], dtype=np.int32)).ids.tolist() == [102, 103]
    assert data.batch(torch.tensor([5, 0], dtype=torch.int32))["id"].tolist() == [105, 100]
    assert len(data.subset([])) == 0


# -- targets and ids of MultiTaskDataset (bug 14) -------------------------------------------------


@pytest.mark.parametrize("convert, kind", [(lambda t: t.numpy(), "ndarray"),
                                           (lambda t: t.tolist(), "list")])
def test_dataset_refuses_non_tensor_targets_naming_the_task(  # type: ignore[no-untyped-def]
        convert, kind: str) -> None:
    x, a = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(TypeError, match=rf"MultiTaskDataset: `targets\['a'\]` must be a tensor "
                                        rf"\[N, ...\].*got {kind}"):
        MultiTaskDataset(x, {"a": convert(a), "b": torch.randn(4, 1)}, SPECS)


def test_dataset_refuses_a_0d_target_naming_the_task() -> None:
    with pytest.raises(ValueError, match=r"MultiTaskDataset: `targets\['a'\]` must be a tensor "
                                         r"\[N, ...\].*got a 0-d tensor"):
        MultiTaskDataset(torch.randn(4, 2), {"a": torch.tensor(1), "b": torch.randn(4, 1)}, SPECS)


def test_dataset_takes_ids_as_a_list_or_numpy_array() -> None:
    assert _data(ids=[10, 11, 12, 13, 14, 15]).ids.tolist() == [10, 11, 12, 13, 14, 15]
    from_numpy = _data(ids=np.arange(6))
    assert from_numpy.ids.dtype == torch.long and from_numpy.ids.tolist() == list(range(6))
    # Exact, as ForgetRequest.create takes them: no float32 rounding of 2**24 + 1.
    big = [16777217.0 + i for i in range(6)]
    assert _data(ids=big).ids.tolist() == [16777217 + i for i in range(6)]
    with pytest.raises(ValueError, match=r"MultiTaskDataset: `ids` must be N unique integers"):
        _data(ids=[0.5, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"MultiTaskDataset: `ids` must be N unique integers"):
        _data(ids=[True, False, True, False, True, False])
    with pytest.raises(TypeError, match=r"MultiTaskDataset: `ids` must be N unique integers"):
        _data(ids=["a", "b", "c", "d", "e", "f"])
    with pytest.raises(ValueError, match=r"MultiTaskDataset: `ids` must be N unique integers"):
        _data(ids=[0, 0, 1, 2, 3, 4])


@pytest.mark.parametrize("ids, shown", [
    (np.arange(6, dtype=np.uint64) + np.uint64(2 ** 63), "9223372036854775808"),  # wrapped to -2**63
    (torch.tensor([2 ** 63 + 5, 1, 2, 3, 4, 5], dtype=torch.uint64), "9223372036854775813"),
    ([2 ** 63, 1, 2, 3, 4, 5], "9223372036854775808"),
    ([2 ** 64, 1, 2, 3, 4, 5], "18446744073709551616"),
    ([1e19, 1.0, 2.0, 3.0, 4.0, 5.0], "1e+19"),  # saturated to 2**63 - 1
    ([float("inf"), 1.0, 2.0, 3.0, 4.0, 5.0], "inf"),
])
def test_dataset_refuses_ids_outside_int64(ids: object, shown: str) -> None:
    with pytest.raises(ValueError, match=r"MultiTaskDataset: `ids` must be N unique integers in "
                                         r"the int64 range \[-2\*\*63, 2\*\*63\), got " + re.escape(shown)):
        _data(ids=ids)


def test_dataset_takes_ids_at_the_ends_of_int64() -> None:
    top = np.arange(6, dtype=np.uint64) + np.uint64(2 ** 63 - 6)
    assert _data(ids=top).ids.tolist() == [2 ** 63 - 6 + i for i in range(6)]
    assert _data(ids=[-2 ** 63, 1, 2, 3, 4, 5]).ids[0].item() == -2 ** 63
    assert _data(ids=torch.tensor(range(6), dtype=torch.uint64)).ids.tolist() == list(range(6))


def test_dataset_id_errors_say_what_is_wrong() -> None:
    """One message, "`ids` must be N unique integers", stood for a wrong length, a matrix and
    duplicates alike."""
    with pytest.raises(ValueError, match=r"`ids` must be N unique integers, one per row: expected "
                                         r"shape \[6\], got \(5,\)"):
        _data(ids=torch.arange(5))
    with pytest.raises(ValueError, match=r"one per row: expected shape \[6\], got \(2, 3\)"):
        _data(ids=torch.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match=r"`ids` must be N unique integers: id 7 appears 3 times "
                                         r"\(ids repeated: 2\)"):
        _data(ids=[7, 9, 7, 9, 7, 2])


@pytest.mark.parametrize("tasks, shown", [
    ({"a": "classification", "b": "regression"}, r"got dict: build them, e.g. \[TaskSpec"),
    ({"a": SPECS[0], "b": SPECS[1]}, r"got dict"),
    ("ab", r"got str"),
    (SPECS[0], r"got TaskSpec"),
    ([SPECS[0], "b"], r"got str 'b' at position 1"),
])
def test_dataset_refuses_tasks_that_are_no_sequence_of_specs(tasks: object, shown: str) -> None:
    """A dict of kinds failed with AttributeError: 'str' object has no attribute 'name'."""
    x = torch.randn(4, 2)
    y = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.randn(4, 1)}
    with pytest.raises(TypeError, match=r"MultiTaskDataset: `tasks` must be a sequence of TaskSpec "
                                        rf"\(one per task, in column order\), {shown}"):
        MultiTaskDataset(x, y, tasks)  # type: ignore[arg-type]
    assert MultiTaskDataset(x, y, tuple(SPECS)).task_names == ["a", "b"]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": None}, TypeError, r"`name` must be a non-empty string, got NoneType None"),
    ({"name": 3}, TypeError, r"`name` must be a non-empty string, got int 3"),
    ({"name": ""}, ValueError, r"`name` must be a non-empty string, got ''"),
    ({"num_classes": -3}, ValueError, r"task 'k': `num_classes` must be an integer >= 1 or None, "
                                      r"got -3"),
    ({"num_classes": 0}, ValueError, r"`num_classes` must be an integer >= 1 or None, got 0"),
    ({"num_classes": "3"}, TypeError, r"`num_classes` must be an integer >= 1 or None, got str"),
    ({"num_classes": True}, TypeError, r"`num_classes` must be an integer >= 1 or None, got bool"),
    ({"num_classes": 3.0}, TypeError, r"`num_classes` must be an integer >= 1 or None, got float"),
    ({"ignore_index": True}, TypeError, r"`ignore_index` must be an integer, got bool"),
    ({"ignore_index": "-1"}, TypeError, r"`ignore_index` must be an integer, got str"),
])
def test_task_spec_validates_its_fields(kwargs: dict[str, object], error: type[Exception],
                                        message: str) -> None:
    """num_classes -3, '3' and True and a None name were kept as given."""
    fields: dict[str, object] = {"name": "k", "kind": "classification", "num_classes": 3, **kwargs}
    with pytest.raises(error, match=rf"TaskSpec: .*{message}"):
        TaskSpec(**fields)  # type: ignore[arg-type]


def test_task_spec_still_takes_valid_fields() -> None:
    assert TaskSpec("k", "classification", num_classes=1, ignore_index=255).num_classes == 1
    # NumPy integers (`y.max() + 1`) were taken before the checks; kept, as Python ints.
    spec = TaskSpec("k", "segmentation", num_classes=np.int64(5), ignore_index=np.uint8(255))
    assert (spec.num_classes, spec.ignore_index) == (5, 255)
    assert type(spec.num_classes) is int and type(spec.ignore_index) is int
    assert TaskSpec("r", "regression").num_classes is None
    with pytest.raises(ValueError, match=r"needs num_classes"):
        TaskSpec("k", "segmentation")


@pytest.mark.parametrize("positions, shown", [([-1], "-1"), ([100], "100"), ([0, 6], "6"),
                                              (torch.tensor([2, -6]), "-6")])
def test_subset_and_batch_refuse_positions_outside_the_rows(positions: object, shown: str) -> None:
    """-1 silently selected the last row; 100 raised a bare IndexError."""
    data = _data()
    for method in ("subset", "batch"):
        with pytest.raises(IndexError, match=rf"MultiTaskDataset.{method}: `positions` must be row "
                                             rf"positions in \[0, 6\), got {shown} \(1 outside\)"):
            getattr(data, method)(positions)
    assert data.subset([0, 5]).ids.tolist() == [0, 5]


# -- labels and task kinds checked against the model and `tasks` (unlearn, uis_floor) -------------


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.heads = nn.ModuleDict({"kind": nn.Linear(16, 3), "size": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: head(z) for t, head in self.heads.items()}


def test_a_label_past_the_models_classes_names_its_row_when_tasks_are_kinds() -> None:
    """docs/unlearning.md: checked before any work, each error naming the set, task and row.
    With a TaskSpec the error named row 17; with the task given by kind only the task."""
    import mtunlearn_ext

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=generator)
    y = {"kind": torch.randint(0, 3, (40,), generator=generator),
         "size": torch.randn(40, 1, generator=generator)}
    y["kind"][17] = 7
    with pytest.raises(ValueError, match=r"task 'kind' \(classification\) has class labels up "
                                         r"to 7 .*first: `train_data` row 17.*but the model "
                                         r"predicts 3 classes"):
        mtunlearn_ext.unlearn(_TwoHeads(), tasks={"kind": "classification", "size": "regression"},
                              train_data=(x, y),
                              forget_request=mtunlearn_ext.ForgetRequest.create(range(5), ["kind"]),
                              shared_parameters=lambda name: name.startswith("trunk."),
                              config={"steps": 1})


def test_the_label_error_counts_every_data_set_and_survives_an_empty_one() -> None:
    """The row-naming label check read ``labels.reshape(0, -1)`` on an empty data set (a
    RuntimeError instead of the ValueError), and counted only the first data set with a bad
    row."""
    import mtunlearn_ext

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=generator)
    y = {"kind": torch.randint(0, 3, (40,), generator=generator),
         "size": torch.randn(40, 1, generator=generator)}
    y["kind"][17] = 7
    common = {"tasks": {"kind": "classification", "size": "regression"},
              "shared_parameters": lambda name: name.startswith("trunk."), "config": {"steps": 1}}
    empty = (x[:0], {"kind": y["kind"][:0], "size": y["size"][:0]})
    with pytest.raises(ValueError, match=r"labels up to 7 \(1 supervised row, first: "
                                         r"`retain_data` row 17\)"):
        mtunlearn_ext.unlearn(_TwoHeads(), forget_data=empty, retain_data=(x, y), **common)
    retain = {**y, "kind": torch.where(torch.arange(40) < 3, 8, y["kind"])}
    forget = (x[:5], {"kind": torch.tensor([0, 1, 9, 0, 0])})
    with pytest.raises(ValueError, match=r"labels up to 9 \(5 supervised rows, first: "
                                         r"`forget_data` row 2\)"):
        mtunlearn_ext.unlearn(_TwoHeads(), forget_data=forget, retain_data=(x, retain), **common)


def test_uis_floor_refuses_a_data_set_that_describes_a_task_otherwise() -> None:
    """With a mapping ``tasks``, a split given as a data set must describe each task as the
    mapping does (unlearn() refuses the same): both data sets used to be measured as the data
    sets said, and a tuple beside a data set failed deep inside the UIS computation."""
    import mtunlearn_ext
    from mtunlearn_ext.data import MultiTaskDataset, TaskSpec

    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (torch.randn(n, 8, generator=generator),
                {"kind": torch.randint(0, 3, (n,), generator=generator)})

    test, pool = split(60), split(50)
    spec = TaskSpec("kind", "classification", num_classes=3)
    as_set = [MultiTaskDataset(d[0], d[1], [spec], ids=torch.arange(first, first + len(d[0])))
              for d, first in ((test, 0), (pool, 1000))]  # ids of their own: other instances
    model = _TwoHeads().eval()
    message = (r"uis_floor: `reference` describes task 'kind' as TaskSpec\(name='kind', "
               r"kind='classification'.*but `tasks` as 'regression'; they must agree")
    with pytest.raises(ValueError, match=message):
        mtunlearn_ext.uis_floor(model, as_set[0], as_set[1], 10, tasks={"kind": "regression"})
    with pytest.raises(ValueError, match=message):
        mtunlearn_ext.uis_floor(model, as_set[0], (pool[0], {"kind": pool[1]["kind"][:, None]
                                                             .float()}),
                                10, tasks={"kind": "regression"})
    with pytest.raises(TypeError, match=r"`tasks` must be a list of task names.*got the string "
                                        r"'kind' \(write \['kind'\]\)"):
        mtunlearn_ext.uis_floor(model, as_set[0], as_set[1], 10, tasks="kind")
    # Agreeing kinds are measured, the same as the names alone.
    agreeing = mtunlearn_ext.uis_floor(model, as_set[0], as_set[1], 10,
                                       tasks={"kind": "classification"}, draws=5)
    by_name = mtunlearn_ext.uis_floor(model, as_set[0], as_set[1], 10, tasks=["kind"], draws=5)
    assert torch.equal(agreeing.draws, by_name.draws)


# -- labels padded with another negative value than the ignore index -----------------------------


def _padded_labels(pad: int) -> MultiTaskDataset:
    """Per-token tags ``[N, L, 1]`` padded with ``pad`` past each sequence's length, a task
    whose ignore index is the default -1."""
    tags = torch.tensor([[0, 2, 1, pad], [1, pad, pad, pad], [2, 2, 0, 1]]).unsqueeze(-1)
    spec = TaskSpec("tag", "segmentation", num_classes=3)
    return MultiTaskDataset(torch.zeros(3, 4), {"tag": tags}, [spec])


def test_negative_labels_outside_the_classes_suggest_them_as_the_ignore_index() -> None:
    # Hugging Face pads token labels with -100: the error said "outside [0, 3) other than
    # ignore_index -1" and left the way out (the spec's ignore_index) to be guessed.
    with pytest.raises(ValueError, match=re.escape(
            "train set: task 'tag' (segmentation) has labels outside [0, 3) other than "
            "ignore_index -1 on 2 supervised rows (first: row 0, id 0); if -100 marks unlabelled "
            "positions (Hugging Face pads labels with -100), pass the task as "
            "`TaskSpec('tag', 'segmentation', num_classes=3, ignore_index=-100)`") + "$"):
        _padded_labels(-100).check_values("train set")
    data = _padded_labels(-2)
    data.targets["tag"][2, 0, 0] = -7  # two values: the most common one is the padding
    with pytest.raises(ValueError, match=r"; if -2 marks unlabelled positions .*"
                                         r"ignore_index=-2\)`$"):
        data.check_values("train set")


def test_labels_past_the_classes_get_no_ignore_index_hint() -> None:
    data = _padded_labels(-1)
    data.targets["tag"][0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\) other than ignore_index -1 on "
                                         r"1 supervised rows \(first: row 0, id 0\)$"):
        data.check_values("train set")


def _uint8_maps(ignore_index: int = -1) -> MultiTaskDataset:
    """Four 4 x 4 uint8 label maps of 3 classes, 255 on row 0's first line and all of row 1."""
    labels = torch.randint(0, 3, (4, 4, 4), generator=torch.Generator().manual_seed(0))
    labels = labels.to(torch.uint8)
    labels[0, 0] = 255
    labels[1] = 255
    spec = TaskSpec("seg", "segmentation", num_classes=3, ignore_index=ignore_index)
    return MultiTaskDataset(torch.zeros(4, 2), {"seg": labels}, [spec])


def test_uint8_255_labels_are_no_ignore_index_of_minus_one() -> None:
    """torch compares uint8 255 with -1 as equal: under the default ignore_index a map of
    uint8 labels with 255 for "unlabelled" passed the checks, an all-255 row counted as
    unsupervised and the others' 255s reached cross-entropy ("IndexError: Target 255 is out of
    bounds"). 255 is a label there, refused with the way out."""
    data = _uint8_maps()
    assert data.supervision[:, 0].tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match=re.escape(
            "train set: task 'seg' (segmentation) has labels outside [0, 3) other than "
            "ignore_index -1 on 2 supervised rows (first: row 0, id 0); if 255 marks unlabelled "
            "pixels (the Cityscapes / Pascal VOC convention), pass the task as "
            "`TaskSpec('seg', 'segmentation', num_classes=3, ignore_index=255)`") + "$"):
        data.check_values("train set")
    marked = _uint8_maps(ignore_index=255)
    assert marked.supervision[:, 0].tolist() == [True, False, True, True]
    marked.check_values("train set")


@pytest.mark.parametrize(("values", "dtype", "index", "expected"), [
    ([0, 1, 255], torch.uint8, -1, [False, False, False]),  # 255 is no -1
    ([0, 1, 255], torch.uint8, 255, [False, False, True]),
    ([-1, 1, 2], torch.int8, -1, [True, False, False]),
    ([-1, 1, 2], torch.int64, -100, [False, False, False]),
    ([-1, 1, 2], torch.float32, -1, [True, False, False]),
    ([0, 1, 1], torch.bool, -1, [False, False, False]),
    ([0, 1, 1], torch.bool, 0, [True, False, False]),
])
def test_is_ignore_index_compares_without_wrapping(values: list[int], dtype: torch.dtype,
                                                   index: int, expected: list[bool]) -> None:
    from mtunlearn_ext.data.base import is_ignore_index

    assert is_ignore_index(torch.tensor(values).to(dtype), index).tolist() == expected


def test_unlearn_suggests_the_ignore_index_of_negative_labels_for_a_task_by_kind() -> None:
    import mtunlearn_ext

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=generator)
    y = {"kind": torch.randint(0, 3, (40,), generator=generator),
         "size": torch.randn(40, 1, generator=generator)}
    y["kind"][[4, 9]] = -100
    with pytest.raises(ValueError, match=r"`train_data`: task 'kind' \(classification\) has "
                                         r"labels outside \[0, 3\) other than ignore_index -1 .*"
                                         r"`TaskSpec\('kind', 'classification', num_classes=3, "
                                         r"ignore_index=-100\)`") as refused:
        mtunlearn_ext.unlearn(_TwoHeads(), tasks={"kind": "classification", "size": "regression"},
                              train_data=(x, y),
                              forget_request=mtunlearn_ext.ForgetRequest.create(range(5), ["kind"]),
                              shared_parameters=lambda name: name.startswith("trunk."),
                              config={"steps": 1})
    # Said once: the traceback showed the same error twice, the second "during handling of"
    # the first (the rows-read wording was raised inside the first check's handler).
    assert refused.value.__context__ is None


class _DepthAndClass(nn.Module):
    """A tiny dense model: a shared conv trunk, a depth map head and a class head."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(1, 4, 3, padding=1)
        self.depth = nn.Conv2d(4, 1, 1)
        self.kind = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        return {"depth": self.depth(h), "kind": self.kind(h.mean(dim=(2, 3)))}


def test_negative_depth_targets_are_warned_of_as_unlabelled_pixels() -> None:
    """Depth <= 0 reads as "no label": standardised depths (half below zero) lost half their
    pixels in the losses and metrics without a word. ``unlearn`` and ``evaluate`` now say how
    many values, rows and which share of the supervised pixels; positive depths (0 = unknown)
    stay silent, and unsupervised rows' targets are not read."""
    import warnings

    import mtunlearn_ext

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 6, 6, generator=generator)
    depth = torch.rand(24, 1, 6, 6, generator=generator) + 0.5
    depth[0, 0, 0, :3] = 0.0  # unknown pixels, as documented: no warning
    kind = torch.randint(0, 3, (24,), generator=generator)
    tasks = {"depth": "depth", "kind": "classification"}
    common = dict(tasks=tasks, shared_parameters=["trunk.weight", "trunk.bias"],
                  config={"steps": 1})
    request = mtunlearn_ext.ForgetRequest.create([0, 1], None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtunlearn_ext.unlearn(_DepthAndClass(), train_data=(x, {"depth": depth, "kind": kind}),
                              forget_request=request, **common)  # type: ignore[arg-type]
        mtunlearn_ext.evaluate(_DepthAndClass(), (x, {"depth": depth, "kind": kind}),
                               tasks=tasks)
    standardised = (depth - depth.mean()) / depth.std()
    below = int((standardised < 0).sum())
    with pytest.warns(UserWarning, match=r"^unlearn: `train_data`: depth targets <= 0 count as "
                                         r"unlabelled pixels.*task 'depth': "
                                         rf"{below} negative values \(\d+\.\d% of its supervised "
                                         r"pixels, on \d+ rows\)") as record:
        mtunlearn_ext.unlearn(_DepthAndClass(),
                              train_data=(x, {"depth": standardised, "kind": kind}),
                              forget_request=request, **common)  # type: ignore[arg-type]
    assert [w.filename for w in record if "depth targets" in str(w.message)] == [__file__]
    with pytest.warns(UserWarning, match=r"^evaluate: `data`: depth targets <= 0"):
        mtunlearn_ext.evaluate(_DepthAndClass(), (x, {"depth": standardised, "kind": kind}),
                               tasks=tasks)
    # Negative values on rows with no depth supervision are never read: no warning.
    # Integer depths and a depth task with a loss of its own (the depth metrics still skip
    # pixels <= 0) are counted too (diff review), as is `audit_data`.
    with pytest.warns(UserWarning, match=r"^evaluate: `data`: depth targets <= 0 .*task 'depth': "
                                         r"\d+ negative values"):
        mtunlearn_ext.evaluate(_DepthAndClass(),
                               (x, {"depth": (standardised * 10).long(), "kind": kind}),
                               tasks=tasks)

    def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred - target).abs().flatten(1).mean(dim=1)

    with pytest.warns(UserWarning, match=r"^evaluate: `data`: depth targets <= 0 count as "
                                         r"unlabelled pixels, which the built-in depth loss and "
                                         r"the depth metrics skip"):
        mtunlearn_ext.evaluate(_DepthAndClass(), (x, {"depth": standardised, "kind": kind}),
                               tasks={"depth": TaskSpec("depth", "depth", loss=l1),
                                      "kind": "classification"})
    audit = (x[:12] + 5.0, {"depth": standardised[:12], "kind": kind[:12]})
    with pytest.warns(UserWarning, match=r"^unlearn: `audit_data`: depth targets <= 0"):
        mtunlearn_ext.unlearn(_DepthAndClass(), train_data=(x, {"depth": depth, "kind": kind}),
                              forget_request=request, audit_data=audit,
                              **common)  # type: ignore[arg-type]
    mixed = torch.cat([depth[:12], standardised[12:]])
    supervision = torch.ones(24, 2, dtype=torch.bool)
    supervision[12:, 0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtunlearn_ext.evaluate(_DepthAndClass(), (x, {"depth": mixed, "kind": kind}, supervision),
                               tasks=tasks)
