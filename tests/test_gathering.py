"""``mtunlearn_ext.data.gather``: a torch Dataset, DataLoader or iterable of instances read into a
``MultiTaskDataset`` (labels missing or ``None`` as unsupervised pairs, ids by position or the
instances' own), and ``unlearn`` taking such data directly with the same result as the tensors."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import mtunlearn_ext
from mtunlearn_ext.data import ForgetRequest, MultiTaskDataset, TaskSpec, gather

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = [TaskSpec("topic", "classification", num_classes=3), TaskSpec("score", "regression")]
N = 40


def _tensors(n: int = N, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, {"topic": torch.randint(0, 3, (n,), generator=g),
               "score": torch.randn(n, 1, generator=g)}


def _unlabelled(i: int) -> bool:
    """Instances without a topic label in the datasets below."""
    return i % 7 == 3


class _Instances(Dataset):
    """A user's map-style dataset: ``(x, {task: label})``, the topic label ``None`` on some
    instances and absent from the mapping on others."""

    def __init__(self, x: torch.Tensor, y: dict[str, torch.Tensor]) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, object]]:
        labels: dict[str, object] = {"score": self.y["score"][i]}
        if not _unlabelled(i):
            labels["topic"] = int(self.y["topic"][i])
        elif i % 2:
            labels["topic"] = None
        return self.x[i], labels


def _expected(x: torch.Tensor, y: dict[str, torch.Tensor]) -> MultiTaskDataset:
    supervision = torch.ones(len(x), 2, dtype=torch.bool)
    supervision[[i for i in range(len(x)) if _unlabelled(i)], 0] = False
    topic = y["topic"].clone()
    topic[~supervision[:, 0]] = SPECS[0].ignore_index
    return MultiTaskDataset(x, {"topic": topic, "score": y["score"]}, SPECS,
                            supervision=supervision)


def _assert_same(a: MultiTaskDataset, b: MultiTaskDataset) -> None:
    assert a.task_names == b.task_names
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.supervision, b.supervision)
    for name in a.task_names:
        assert a.targets[name].dtype == b.targets[name].dtype, name
        assert torch.equal(a.targets[name], b.targets[name]), name
    if isinstance(a.inputs, torch.Tensor):
        assert torch.equal(a.inputs, b.inputs)  # type: ignore[arg-type]
    else:
        assert type(a.inputs) is type(b.inputs)
        left = a.inputs.values() if isinstance(a.inputs, dict) else a.inputs
        right = b.inputs.values() if isinstance(b.inputs, dict) else b.inputs  # type: ignore
        for u, v in zip(left, right):  # type: ignore[call-overload]
            assert torch.equal(u, v)


def test_a_map_style_dataset_reads_missing_labels_as_unsupervised_pairs() -> None:
    x, y = _tensors()
    read = gather(_Instances(x, y), SPECS)
    _assert_same(read, _expected(x, y))
    assert torch.equal(read.ids, torch.arange(N))  # the dataset's indices
    assert int((~read.supervision[:, 0]).sum()) == sum(_unlabelled(i) for i in range(N)) > 0


def test_a_label_written_as_no_label_is_no_pair() -> None:
    # -1 (the task's ignore_index) given as the label: the same as no label, as for tensors.
    items = [(torch.zeros(2), {"topic": -1 if i == 1 else 2, "score": [0.5]}) for i in range(3)]
    read = gather(items, SPECS)
    assert read.supervision[:, 0].tolist() == [True, False, True]
    assert read.supervision[:, 1].all()


def test_a_multitaskdataset_round_trips_with_its_ids_and_mask() -> None:
    x, y = _tensors()
    mask = torch.rand(N, 2, generator=torch.Generator().manual_seed(1)) > 0.3
    original = MultiTaskDataset(x, y, SPECS, ids=torch.arange(N) * 5 + 100, supervision=mask)
    read = gather(original, SPECS)
    assert torch.equal(read.ids, original.ids)
    assert torch.equal(read.supervision, mask)
    assert torch.equal(read.inputs, x)  # type: ignore[arg-type]
    # Unsupervised pairs come back as the "no label" value the items carry.
    assert torch.equal(read.targets["topic"][mask[:, 0]], y["topic"][mask[:, 0]])
    assert (read.targets["topic"][~mask[:, 0]] == -1).all()


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
def test_several_inputs_keep_their_structure(structure: str) -> None:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (6, 4), generator=g)
    mask = torch.rand(6, 4, generator=g) > 0.5
    pair = {"tuple": (ids, mask), "list": [ids, mask], "dict": {"ids": ids, "mask": mask}}[structure]
    items = []
    for i in range(6):
        one = ({k: v[i] for k, v in pair.items()} if isinstance(pair, dict)
               else type(pair)(v[i] for v in pair))
        items.append((one, {"topic": i % 3, "score": torch.tensor([float(i)])}))
    read = gather(items, SPECS)
    _assert_same(read, MultiTaskDataset(pair, {"topic": torch.arange(6) % 3,  # type: ignore
                                               "score": torch.arange(6.0).reshape(6, 1)}, SPECS))


def test_numpy_values_and_number_lists_become_tensors() -> None:
    items = [(np.array([1.0, 2.0]), {"topic": np.int64(i % 3), "score": [float(i)]})
             for i in range(4)]
    items.append(([3.0, 4.0], {"topic": 1, "score": np.array([4.0])}))  # a feature list
    read = gather(items, SPECS)
    assert read.inputs.shape == (5, 2)  # type: ignore[union-attr]
    assert read.targets["topic"].tolist() == [0, 1, 2, 0, 1]
    assert read.targets["score"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_dict_items_carry_their_own_supervision_and_ids() -> None:
    items = [{"input": torch.full((2,), float(i)), "targets": {"topic": 1, "score": [0.0]},
              "supervision": torch.tensor([i != 2, True]), "id": 10 * i} for i in range(4)]
    read = gather(items, SPECS)
    assert read.ids.tolist() == [0, 10, 20, 30]
    assert read.supervision[:, 0].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="carry their own 'id'; do not pass `ids`"):
        gather(items, SPECS, ids=[1, 2, 3, 4])
    items[1].pop("id")
    with pytest.raises(ValueError, match="some instances carry an 'id' and others do not"):
        gather(items, SPECS)


def test_explicit_ids_name_the_rows() -> None:
    x, y = _tensors(6)
    read = gather(_Instances(x, y), SPECS, ids=[5, 4, 3, 2, 1, 0])
    assert read.ids.tolist() == [5, 4, 3, 2, 1, 0]


def test_an_iterable_and_a_generator_read_in_order() -> None:
    x, y = _tensors()

    class Stream(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            data = _Instances(x, y)
            return (data[i] for i in range(len(data)))

    _assert_same(gather(Stream(), SPECS), _expected(x, y))
    data = _Instances(x, y)
    _assert_same(gather((data[i] for i in range(N)), SPECS), _expected(x, y))


class _OneBuffer(Dataset):
    """A dataset that hands out one input buffer and one label buffer, rewritten for every
    instance (as a loader reusing its arrays does)."""

    def __init__(self, x: torch.Tensor, y: dict[str, torch.Tensor]) -> None:
        self.x, self.y = x, y
        self.input, self.score = torch.empty_like(x[0]), torch.empty_like(y["score"][0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, object]]:
        self.input.copy_(self.x[i])
        self.score.copy_(self.y["score"][i])
        topic = None if _unlabelled(i) else int(self.y["topic"][i])
        return self.input, {"topic": topic, "score": self.score}


@pytest.mark.parametrize("sized", [True, False])
def test_a_source_that_rewrites_one_buffer_is_read_row_by_row(sized: bool) -> None:
    """The rows were kept as given and stacked at the end (every array held twice in memory,
    and a buffer rewritten for each instance read as N copies of the last one); each row is
    copied as it comes now."""
    x, y = _tensors()
    source = _OneBuffer(x, y)
    read = gather(source if sized else (source[i] for i in range(N)), SPECS)
    _assert_same(read, _expected(x, y))


def test_a_stream_longer_than_a_block_is_joined_in_order(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Without a length the rows go into blocks (4 rows here) joined at the end; a later
    instance's wider dtype promotes the earlier rows as torch.stack does, and a task whose
    last instances have no label gets zero (then "no label") rows up to the end."""
    import mtunlearn_ext.data.gathering as gathering

    monkeypatch.setattr(gathering, "_BLOCK_ROWS", 4)
    x, y = _tensors(n=11)
    items = [(x[i].half() if i < 6 else x[i],
              {"topic": int(y["topic"][i]) if i < 5 else None, "score": y["score"][i]})
             for i in range(11)]
    read = gather(iter(items), SPECS)
    assert read.inputs.dtype == torch.float32
    assert torch.equal(read.inputs, torch.stack([row for row, _ in items]))  # type: ignore
    assert read.supervision[:, 0].tolist() == [True] * 5 + [False] * 6
    assert torch.equal(read.targets["topic"][:5], y["topic"][:5])
    assert (read.targets["topic"][5:] == SPECS[0].ignore_index).all()
    assert torch.equal(read.targets["score"], y["score"])


@pytest.fixture
def block_counts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of blocks each column of a gather holds when it is joined, in order (blocks
    of 4 rows where a source does not say its length)."""
    import mtunlearn_ext.data.gathering as gathering

    blocks: list[int] = []
    result = gathering._Column.result

    def counted(column: gathering._Column, rows: int) -> torch.Tensor | None:
        blocks.append(len(column.blocks))
        return result(column, rows)

    monkeypatch.setattr(gathering._Column, "result", counted)
    monkeypatch.setattr(gathering, "_BLOCK_ROWS", 4)
    return blocks


@pytest.mark.parametrize("sized", [True, False])
def test_the_result_holds_its_rows_and_no_more(sized: bool, block_counts: list[int]) -> None:
    """Mutation review: a source with a length is read into one block of exactly its rows,
    the result itself (blocks of the default size for 6 instances, joined at the end, went
    unnoticed); a short source without one gave a view of a whole block, which the result
    kept alive."""
    n = 6 if sized else 3  # more rows than a block, or fewer
    x, y = _tensors(n=n)
    items = [(x[i], {"topic": int(y["topic"][i]), "score": y["score"][i]}) for i in range(n)]
    read = gather(items if sized else iter(items), SPECS)
    assert block_counts == [1, 1, 1]  # the input and both labels: one block each
    for tensor in (read.inputs, read.targets["topic"], read.targets["score"]):
        assert isinstance(tensor, torch.Tensor)
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert torch.equal(read.inputs, x)  # type: ignore[arg-type]


def test_a_sized_loader_is_read_into_one_block_per_column(block_counts: list[int]) -> None:
    """Mutation review: a loader whose sampler has a length is read into one block of its rows
    (blocks of the default size joined at the end, the data held twice, went unnoticed)."""
    x, y = _tensors(n=10)
    read = gather(DataLoader(MultiTaskDataset(x, y, SPECS), batch_size=3), SPECS)
    assert block_counts == [1, 1, 1]
    assert read.inputs.untyped_storage().nbytes() == x.numel() * x.element_size()  # type: ignore
    assert torch.equal(read.inputs, x)  # type: ignore[arg-type]


def test_a_loader_whose_sampler_cannot_say_its_length_is_read() -> None:
    """Review of the change: sizing the columns from the loader's sampler called its __len__,
    and one raising NotImplementedError (the base Sampler's way) failed the whole read, which
    joined the batches without asking before."""
    from torch.utils.data import Sampler

    class InOrder(Sampler[int]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(N))

        def __len__(self) -> int:
            raise NotImplementedError

    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS)
    read = gather(DataLoader(data, batch_size=4, sampler=InOrder()), SPECS)  # items carry ids
    _assert_same(read, data)


def test_instances_of_two_input_structures_are_refused() -> None:
    """Mutation review: a tuple of inputs in one instance and a list in the next passed
    unnoticed when only the leaves' paths were compared."""
    items = [((torch.zeros(2), torch.zeros(2)), {"score": torch.zeros(1)}),
             ([torch.zeros(2), torch.zeros(2)], {"score": torch.zeros(1)})]
    with pytest.raises(ValueError, match=r"the input of instance 1 is .*, instance 0's is .*: "
                                         r"every instance needs the same structure"):
        gather(items, [TaskSpec("score", "regression")])


def test_rows_on_another_device_are_named() -> None:
    """Mutation review: the device check had no test (torch.stack used to refuse; a copy into
    the first row's block would move a row to another device without a word)."""
    spec = [TaskSpec("score", "regression")]
    meta = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=r"the input is on meta in instance 1 but on cpu in "
                                         r"instance 0; every instance needs one device"):
        gather([(torch.zeros(2), {"score": torch.zeros(1)}), (meta, {"score": torch.zeros(1)})],
               spec)
    with pytest.raises(ValueError, match=r"the 'score' label is on meta in instance 1 but on "
                                         r"cpu in the first labelled instance"):
        gather([(torch.zeros(2), {"score": torch.zeros(1)}),
                (torch.zeros(2), {"score": torch.zeros(1, device="meta")})], spec)

    def batch_on(device: str) -> dict[str, object]:
        return {"input": torch.zeros(2, 3, device=device),
                "targets": {"score": torch.zeros(2, 1)}}

    with pytest.raises(ValueError, match=r"the input is on meta in batch 1 but on cpu in batch "
                                         r"0; every batch needs one device"):
        gather(DataLoader(["cpu", "meta"], batch_size=1,
                          collate_fn=lambda items: batch_on(items[0])), spec)


def test_a_dataset_longer_or_shorter_than_its_len_gives_the_rows_it_gave() -> None:
    x, y = _tensors(n=6)
    for claimed in (4, 9):
        class Lying:  # an iterable whose len() is not its number of items
            def __len__(self) -> int:
                return claimed

            def __iter__(self):  # type: ignore[no-untyped-def]
                return iter([(x[i], {"topic": int(y["topic"][i]), "score": y["score"][i]})
                             for i in range(6)])

        read = gather(Lying(), SPECS)
        assert torch.equal(read.inputs, x)  # type: ignore[arg-type]
        assert torch.equal(read.targets["topic"], y["topic"])


def _claiming(claimed: int, rows: int) -> object:
    """A sampler that yields indices ``0..rows - 1`` and says it yields ``claimed``."""
    from torch.utils.data import Sampler

    class Claiming(Sampler[int]):
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(range(rows))

        def __len__(self) -> int:
            return claimed

    return Claiming()


@pytest.fixture
def rows_held(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """For each column of a gather, in order: the most rows its blocks held at once, the
    blocks a made block replaced counted beside it (blocks of 4 rows where a length is not
    believed)."""
    import mtunlearn_ext.data.gathering as gathering

    held: dict[int, int] = {}
    reserve, result = gathering._Column._reserve, gathering._Column.result

    def counted(column: gathering._Column, *args: object) -> None:
        before = list(column.blocks)
        reserve(column, *args)  # type: ignore[arg-type]
        rows = {id(block): len(block) for block in before + column.blocks}
        held[id(column)] = max(held.get(id(column), 0), sum(rows.values()))

    order: list[int] = []

    def read(column: gathering._Column, rows: int) -> torch.Tensor | None:
        tensor = result(column, rows)
        order.append(held[id(column)])
        return tensor

    monkeypatch.setattr(gathering._Column, "_reserve", counted)
    monkeypatch.setattr(gathering._Column, "result", read)
    monkeypatch.setattr(gathering, "_BLOCK_ROWS", 4)
    return order


@pytest.mark.parametrize("source", ["loader", "iterable"])
def test_a_length_that_overstates_is_not_allocated(source: str, rows_held: list[int]) -> None:
    """Review: the rows a loader's sampler (or an iterable) claims were allocated at the
    first row, zeros for every one: a sampler claiming 10**7 rows made 305 MiB of blocks for
    1000 rows read, 10**9 would ask for 30 GiB. A length no one vouches for is believed once
    the rows given reach an eighth of it: these 10 rows take three blocks of 4, and the result
    holds them and no row that was not given."""
    x, y = _tensors(n=10)
    data = MultiTaskDataset(x, y, SPECS, ids=torch.arange(10) + 100)
    if source == "loader":
        read = gather(DataLoader(data, batch_size=3, sampler=_claiming(10**7, 10)), SPECS)
    else:
        class Claiming:
            def __len__(self) -> int:
                return 10**7

            def __iter__(self):  # type: ignore[no-untyped-def]
                return (data[i] for i in range(10))

        read = gather(Claiming(), SPECS)
    assert rows_held == [12, 12, 12]  # the input and both labels
    _assert_same(read, data)
    for tensor in (read.inputs, read.targets["topic"], read.targets["score"]):
        assert isinstance(tensor, torch.Tensor)
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("claimed", [20, 80])
def test_a_believed_length_that_is_wrong_gives_the_rows_read(claimed: int,
                                                             rows_held: list[int]) -> None:
    """40 rows in batches of 7: a claim of 80 is believed at the second batch (14 * 8 >= 80),
    the 8 rows of blocks read so far copied into its 80 rows; a claim of 20 at the first,
    the 20 rows past it going into blocks after it. Either way the result is the 40 rows as
    given, in a tensor of its own size."""
    x, y = _tensors(n=40)
    data = MultiTaskDataset(x, y, SPECS, ids=torch.arange(40) + 100)
    read = gather(DataLoader(data, batch_size=7, sampler=_claiming(claimed, 40)), SPECS)
    assert rows_held == [88 if claimed == 80 else 40] * 3
    _assert_same(read, data)
    assert read.inputs.untyped_storage().nbytes() == x.numel() * x.element_size()  # type: ignore


def test_the_length_of_torchs_samplers_is_believed_at_once(rows_held: list[int]) -> None:
    """torch's own samplers yield their length: it is allocated at the first batch, with no
    blocks before it to copy (40 rows, not 40 and the 4 of a first block)."""
    x, y = _tensors(n=40)
    data = MultiTaskDataset(x, y, SPECS)
    read = gather(DataLoader(data, batch_size=3), SPECS)
    assert rows_held == [40, 40, 40]
    _assert_same(read, data)
    instances = _Instances(x, y)
    gather(instances, SPECS)
    gather([instances[i] for i in range(N)], SPECS)
    assert rows_held == [40] * 9


# DataLoader workers fork on Linux, by default; Python 3.12 warns about any fork of a process
# holding threads (torch's intra-op pool, once a test ran a parallel op): these tests fork on
# purpose, and their workers only read the listed rows.
_FORK_WARNING = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")


@_FORK_WARNING
def test_workers_read_the_same_rows_in_the_same_order() -> None:
    x, y = _tensors()
    _assert_same(gather(_Instances(x, y), SPECS, num_workers=2, batch_size=3), _expected(x, y))
    with pytest.raises(ValueError, match="needs a map-style Dataset"):
        gather(iter([]), SPECS, num_workers=1)


def test_workers_started_clean_read_the_same_rows() -> None:
    """Workers forked from a process running torch's threads (DataLoader's default on Linux)
    draw Python 3.12's deadlock warning; a forkserver's workers read the same rows in order,
    and a start method that does not exist, or one without workers, is named."""
    x, y = _tensors()
    _assert_same(gather(_Instances(x, y), SPECS, num_workers=1, batch_size=4,
                        multiprocessing_context="forkserver"), _expected(x, y))
    with pytest.raises(ValueError, match=r"`multiprocessing_context` must be None or one of "
                                         r"\[.*'spawn'.*\] .*got 'thread'"):
        gather(_Instances(x, y), SPECS, num_workers=1, multiprocessing_context="thread")
    with pytest.raises(ValueError, match="`num_workers=0` has none of"):
        gather(_Instances(x, y), SPECS, multiprocessing_context="spawn")


def test_a_loader_of_collated_batches_reads_in_its_order() -> None:
    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS)
    _assert_same(gather(DataLoader(data, batch_size=7), SPECS), data)
    # A (input, targets) loader, as a training loop's, with a partial last batch.
    pairs = [(x[i], {"topic": y["topic"][i], "score": y["score"][i]}) for i in range(N)]
    _assert_same(gather(DataLoader(pairs, batch_size=16), SPECS), data)  # type: ignore


def test_a_loader_batched_by_its_own_batch_sampler_is_read_as_batches() -> None:
    """Review: a DataLoader given batch_sampler= (batch_size None, batches collated all the
    same) was read as a loader of single instances: each collated batch taken for one
    instance, refused with "supervision must be bool"-like errors about its shapes."""
    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS)

    class Runs(torch.utils.data.Sampler[list[int]]):
        """Batches of uneven sizes, in order, as a bucketing sampler gives them."""

        def __iter__(self) -> Iterator[list[int]]:
            start, size = 0, 1
            while start < N:
                yield list(range(start, min(start + size, N)))
                start, size = start + size, size + 2

        def __len__(self) -> int:
            return sum(1 for _ in iter(self))

    _assert_same(gather(DataLoader(data, batch_sampler=Runs()), SPECS), data)  # ids carried
    # Items without ids: the order is the sampler's own (no torch sampler to read it from),
    # so the ids say it.
    pairs = [(x[i], {"topic": y["topic"][i], "score": y["score"][i]}) for i in range(N)]
    with pytest.raises(ValueError, match="the DataLoader shuffles"):
        gather(DataLoader(pairs, batch_sampler=Runs()), SPECS)  # type: ignore
    _assert_same(gather(DataLoader(pairs, batch_sampler=Runs()), SPECS,  # type: ignore
                        ids=list(range(N))), data)


def test_a_batch_sampler_dropping_its_last_batch_is_refused() -> None:
    """Review: the drop_last guard read the DataLoader's own drop_last, which is False for a
    loader given batch_sampler=BatchSampler(..., drop_last=True): the last incomplete batch's
    instances were silently missing from the gathered data."""
    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(N)),
                                            N - 1, drop_last=True)
    with pytest.raises(ValueError, match=r"drops its last incomplete batch"):
        gather(DataLoader(data, batch_sampler=sampler), SPECS)


@_FORK_WARNING
def test_a_loader_whose_workers_hand_out_batches_as_they_finish_needs_ids() -> None:
    """Review: a DataLoader with in_order=False (its workers' batches as they finish) was
    taken as read in order: its rows got positions as ids, so an id named another instance
    whenever a later batch came first (0..7 read as 2, 3, 6, 7, 0, 1, 4, 5)."""
    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS)
    pairs = [(x[i], {"topic": y["topic"][i], "score": y["score"][i]}) for i in range(N)]
    loader = DataLoader(pairs, batch_size=4, num_workers=1, in_order=False)  # type: ignore
    with pytest.raises(ValueError, match=r"in_order=False"):
        gather(loader, SPECS)
    with pytest.raises(ValueError, match=r"in_order=False\), in an order no `ids` can follow"):
        gather(loader, SPECS, ids=list(range(N)))
    # Items that carry their ids are read right in any order.
    got = gather(DataLoader(data, batch_size=4, num_workers=1, in_order=False), SPECS)
    order = torch.as_tensor(got.ids).argsort()
    assert torch.equal(got.inputs[order], data.inputs)


def test_a_batch_sampler_of_its_own_order_needs_ids_whatever_sampler_it_holds() -> None:
    """Review: a batch_sampler= loader was taken as read in order when its batch sampler held
    a SequentialSampler, though a batch sampler of its own (bucketing by length) hands out the
    batches in an order of its own: the rows got positions as ids, each naming another
    instance (0..5 read as 4, 5, 2, 3, 0, 1)."""
    x, y = _tensors()
    pairs = [(x[i], {"topic": y["topic"][i], "score": y["score"][i]}) for i in range(N)]

    class LastFirst(torch.utils.data.Sampler[list[int]]):
        def __init__(self) -> None:
            self.sampler = torch.utils.data.SequentialSampler(range(N))

        def __iter__(self) -> Iterator[list[int]]:
            indices = list(self.sampler)
            return iter([indices[i:i + 4] for i in range(0, N, 4)][::-1])

        def __len__(self) -> int:
            return -(-N // 4)

    with pytest.raises(ValueError, match="the DataLoader shuffles"):
        gather(DataLoader(pairs, batch_sampler=LastFirst()), SPECS)  # type: ignore


class _ReusedBatch:
    """A collate function writing every batch into one set of buffers (as a loader staging
    batches in pinned memory does): the batch it hands out is overwritten by the next."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def _into(self, name: str, rows: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(rows)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape[1:] != stacked.shape[1:]:
            buffer = self.buffers[name] = torch.empty((64, *stacked.shape[1:]),
                                                      dtype=stacked.dtype)
        return buffer[:len(rows)].copy_(stacked)

    def __call__(self, items: list[dict[str, object]]) -> dict[str, object]:
        return {"input": self._into("input", [item["input"] for item in items]),  # type: ignore
                "targets": {name: self._into(name, [item["targets"][name]  # type: ignore
                                                    for item in items])
                            for name in ("topic", "score")},
                "supervision": self._into("supervision",
                                          [item["supervision"] for item in items]),  # type: ignore
                "id": self._into("id", [item["id"] for item in items])}  # type: ignore


@pytest.mark.parametrize("block_rows", [None, 5])
def test_a_loader_reusing_its_batch_buffers_is_read_batch_by_batch(
        block_rows: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader's batches were kept as given and joined at the end (the data held twice, and
    a collate function reusing its buffers read as copies of the last batch); each batch is
    copied as it comes now, into blocks where the loader's length is unknown (here 5 rows,
    so batches of 7 straddle them)."""
    import mtunlearn_ext.data.gathering as gathering

    x, y = _tensors()
    supervision = torch.ones(N, 2, dtype=torch.bool)
    supervision[::3, 0] = False  # masks that differ from batch to batch
    y = dict(y, topic=torch.where(supervision[:, 0], y["topic"], SPECS[0].ignore_index))
    data = MultiTaskDataset(x, y, SPECS, ids=torch.arange(N) + 100, supervision=supervision)
    if block_rows is not None:
        monkeypatch.setattr(gathering, "_BLOCK_ROWS", block_rows)
        monkeypatch.setattr(gathering, "_loader_rows", lambda loader: None)
    read = gather(DataLoader(data, batch_size=7, collate_fn=_ReusedBatch()), SPECS)
    _assert_same(read, data)
    assert torch.equal(read.ids, data.ids)
    assert torch.equal(read.supervision, supervision)


def _collated(inputs: object, rows: int, score_rows: int | None = None) -> dict[str, object]:
    """A collated batch of ``rows`` instances with ``inputs`` (score labels: ``score_rows``)."""
    return {"input": inputs,
            "targets": {"topic": torch.zeros(rows, dtype=torch.long),
                        "score": torch.zeros(rows if score_rows is None else score_rows, 1)}}


@pytest.mark.parametrize("collate, message", [
    # padded to each batch's own longest sequence
    (lambda items: _collated(torch.zeros(len(items), 3 + items[0]), len(items)),
     r"the input has shape \(2, 5\) in batch 1 but \(2, 3\) in batch 0; .*pad sequences to "
     r"one length for the whole data set"),
    # one input a row short
    (lambda items: _collated((torch.zeros(len(items), 3), torch.zeros(len(items) - 1)),
                             len(items)),
     r"the input\[1\] of batch 0 has shape \(1,\); every input of a batch needs one row per "
     r"instance \(2\)"),
    # labels a row short
    (lambda items: _collated(torch.zeros(len(items), 3), len(items), len(items) - 1),
     r"batch 0 holds 2 instances but its 'score' labels are \(1, 1\); a collated batch needs "
     r"every task's labels, one row per instance"),
    # one input, then two
    (lambda items: _collated(torch.zeros(len(items), 3) if items[0] == 0 else
                             (torch.zeros(len(items), 3), torch.zeros(len(items), 3)),
                             len(items)),
     r"the input of batch 1 is \(shape \(2, 3\) float32, shape \(2, 3\) float32\), batch 0's "
     r"is shape \(2, 3\): every batch needs the same structure"),
])
def test_a_loader_whose_batches_disagree_names_the_batch(
        collate: Callable[[list[int]], dict[str, object]], message: str) -> None:
    """Batches padded to their own longest sequence, or an input or a label with a row
    missing, named the batch; torch.cat's error named none (or the rows were misread)."""
    with pytest.raises(ValueError, match=message):
        gather(DataLoader(list(range(4)), batch_size=2, collate_fn=collate), SPECS)


@_FORK_WARNING
def test_reading_leaves_the_callers_random_stream() -> None:
    """Side-effects review: iterating a loader draws its base seed from torch's global
    generator (a loader gather builds for `num_workers`, or the caller's own), so gather, and
    unlearn or evaluate given such data, moved the caller's random stream; a refused
    shuffling loader moved it before the error."""
    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS)
    pairs = [(x[i], {"topic": y["topic"][i], "score": y["score"][i]}) for i in range(N)]
    reads = [lambda: gather(_Instances(x, y), SPECS, num_workers=1, batch_size=8),
             lambda: gather(DataLoader(data, batch_size=7), SPECS),
             lambda: gather(DataLoader(pairs, batch_size=8, shuffle=True), SPECS)]  # refused
    for read in reads:
        torch.manual_seed(3)
        expected = torch.rand(2, generator=torch.Generator().manual_seed(3))
        try:
            read()
        except ValueError as error:
            assert "shuffles" in str(error)
        assert torch.equal(torch.rand(2), expected)


def test_a_shuffling_loader_needs_ids() -> None:
    x, y = _tensors()
    data = MultiTaskDataset(x, y, SPECS, ids=torch.arange(N) + 1000)
    loader = DataLoader(data, batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    read = gather(loader, SPECS)  # the items carry "id": rows found by id whatever the order
    order = torch.argsort(read.ids)
    _assert_same(read.subset(order), data)
    assert not torch.equal(read.ids, data.ids)  # it did shuffle
    pairs = [(x[i], {"topic": y["topic"][i], "score": y["score"][i]}) for i in range(N)]
    with pytest.raises(ValueError, match="shuffles .* names no instance"):
        gather(DataLoader(pairs, batch_size=8, shuffle=True), SPECS)  # type: ignore
    with pytest.raises(ValueError, match="shuffles"):
        gather(DataLoader(_Instances(x, y), batch_size=None, shuffle=True), SPECS)
    with pytest.raises(ValueError, match="drop_last=True"):
        gather(DataLoader(data, batch_size=8, drop_last=True), SPECS)


def test_a_loader_that_cannot_collate_missing_labels_says_why() -> None:
    x, y = _tensors()
    with pytest.raises(TypeError, match=r"could not make batch 0 .*None.*pass the dataset itself"):
        gather(DataLoader(_Instances(x, y), batch_size=4), SPECS)


@pytest.mark.parametrize("items, message", [
    ([(torch.zeros(2), {"topc": 1})], r"instance 0 has labels of unknown tasks \['topc'\]"),
    ([(torch.zeros(2), {"topic": 1}), (torch.zeros(3), {"topic": 1})],
     r"the input has shape \(3,\) in instance 1 but \(2,\) in instance 0.*pad"),
    ([(torch.zeros(2), {"topic": torch.zeros(2, dtype=torch.long)}),
      (torch.zeros(2), {"topic": torch.zeros(3, dtype=torch.long)})],
     r"'topic' label has shape \(3,\) in instance 1"),
    ([(torch.zeros(2), {"score": [1.0]})], "no instance has a label of task 'topic'"),
    ([], "holds no instance"),
    ([torch.zeros(2)], r"instance 0 must be \(input, \{task: label\}\)"),
    ([(torch.zeros(2), [1, 2])], "the targets of instance 0 must be a mapping"),
    ([{"x": torch.zeros(2)}], "needs 'input' and 'targets'"),
    ([{"input": torch.zeros(2), "targets": {"topic": 1}, "weight": 1.0}],
     r"keys \['weight'\] besides"),
    ([{"input": torch.zeros(2), "targets": {"topic": 1}, "supervision": torch.ones(3).bool()}],
     r"supervision of instance 0 must be bool \[2\]"),
    ([{"input": torch.zeros(2), "targets": {"topic": 1, "score": [0.0]}, "id": 1.5}],
     "the id of instance 0 must be one integer"),
    ([(torch.zeros(2), {"topic": "cat"})], "'topic' label of instance 0 must be a tensor"),
])
def test_bad_instances_are_refused_naming_what_and_where(items: list[object],
                                                          message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        gather(items, SPECS)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="`source` must be a Dataset"):
        gather(torch.zeros(3, 2), SPECS)
    with pytest.raises(TypeError, match="^gather: task names alone are not enough for data "
                                        "given as tuples or torch data sets"):
        gather([(torch.zeros(2), {"topic": 1})], ["topic"])
    with pytest.raises(TypeError, match="^gather: `tasks` must be TaskSpecs or a mapping"):
        gather([(torch.zeros(2), {"topic": 1})], 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_workers` must be an integer >= 0"):
        gather([], SPECS, num_workers=-1)
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        gather([], SPECS, batch_size=0)


# -- the task forms unlearn takes ------------------------------------------------------------------


def test_tasks_by_kind_count_their_classes_on_the_labels() -> None:
    """The mapping task -> kind that unlearn takes (a TypeError from gather, once): a class
    count is one past the largest supervised label, the unsupervised ones (the ``None`` and
    missing labels, read as ``ignore_index``) left out."""
    x, y = _tensors()
    read = gather(_Instances(x, y), {"topic": "classification", "score": "regression"})
    _assert_same(read, _expected(x, y))
    assert read.tasks == SPECS
    y["topic"][y["topic"] == 2] = 1  # no instance of class 2 left: two classes counted
    assert gather(_Instances(x, y), {"topic": "classification", "score": "regression"}
                  ).tasks[0] == TaskSpec("topic", "classification", num_classes=2)
    # A TaskSpec says more where the labels cannot: a class no instance carries.
    four = TaskSpec("topic", "classification", num_classes=4)
    read = gather(_Instances(x, y), {"topic": four, "score": "regression"})
    assert read.tasks == [four, SPECS[1]]
    read = gather(DataLoader(_expected(*_tensors()), batch_size=7),
                  {"topic": "classification", "score": "regression"})
    _assert_same(read, _expected(*_tensors()))
    assert read.tasks == SPECS


def test_task_names_or_none_pick_the_specs_of_a_data_set_read() -> None:
    """As for unlearn: names (any order; the data set's is kept), or no tasks at all, stand for
    the specs of a :class:`MultiTaskDataset` given as the source; one TaskSpec is a list."""
    data = _expected(*_tensors())
    for tasks in (None, ["score", "topic"], ["topic", "score"]):
        read = gather(data, tasks)
        _assert_same(read, data)
        assert read.tasks == SPECS
    single = MultiTaskDataset(data.inputs, {"score": data.targets["score"]}, [SPECS[1]])
    assert gather(single, SPECS[1]).tasks == [SPECS[1]]
    with pytest.raises(ValueError, match=r"^gather: `tasks` names \['nope'\], not tasks of "):
        gather(data, ["nope"])


def test_tasks_by_kind_are_refused_as_unlearn_refuses_them() -> None:
    x, y = _tensors()
    with pytest.raises(ValueError, match="^gather: task 'topic' has unknown kind "
                                         "'clasification'"):
        gather(_Instances(x, y), {"topic": "clasification",  # type: ignore[dict-item]
                                  "score": "regression"})
    with pytest.raises(ValueError, match=r"^gather: `tasks` maps 'topic' to a TaskSpec named "
                                         r"'score'"):
        gather(_Instances(x, y), {"topic": SPECS[1], "score": "regression"})
    # Labels, but each the "no label" value: no supervised pair to count classes on.
    unlabelled = [(x[i], {"topic": -1, "score": y["score"][i]}) for i in range(4)]
    with pytest.raises(ValueError, match=r"^gather: task 'topic' \(classification\) has no "
                                         r"supervised label to count its classes from; pass a "
                                         r"TaskSpec with num_classes$"):
        gather(unlabelled, {"topic": "classification", "score": "regression"})
    with pytest.raises(ValueError, match=r"^gather: instance 0 has labels of unknown tasks "
                                         r"\['topic'\]"):
        gather(_Instances(x, y), {"score": "regression"})


# -- unlearn on a Dataset -------------------------------------------------------------------------


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 16), nn.ReLU())
        self.heads = nn.ModuleDict({"topic": nn.Linear(16, 3), "score": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {name: head(h) for name, head in self.heads.items()}


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.state_dict().values()]


@pytest.mark.parametrize("tasks", ["specs", "kinds"])
def test_unlearn_on_a_dataset_equals_unlearn_on_its_tensors(tasks: str) -> None:
    x, y = _tensors()
    expected = _expected(x, y)
    given = (SPECS if tasks == "specs"
             else {"topic": "classification", "score": "regression"})
    common = dict(forget_request=ForgetRequest.create([1, 2, 5], target_tasks=["topic"]),
                  shared_parameters=lambda name: name.startswith("trunk"),
                  config={"steps": 3})
    model = _TwoHeads()
    from_tensors, report = mtunlearn_ext.unlearn(
        model, tasks=given, train_data=(expected.inputs, expected.targets, expected.supervision),
        **common)  # type: ignore[arg-type]
    from_dataset, report_d = mtunlearn_ext.unlearn(model, tasks=given,
                                                   train_data=_Instances(x, y),
                                                   **common)  # type: ignore[arg-type]
    from_loader, _ = mtunlearn_ext.unlearn(model, tasks=given,  # no automatic batching
                                           train_data=DataLoader(_Instances(x, y),
                                                                 batch_size=None),
                                           **common)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(_weights(from_tensors), _weights(from_dataset)))
    assert all(torch.equal(a, b) for a, b in zip(_weights(from_tensors), _weights(from_loader)))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(from_dataset)))
    assert report.extra["summary"] == report_d.extra["summary"]


def test_unlearn_held_out_and_audit_datasets_are_not_matched_by_position() -> None:
    # Every dataset's positions are 0..N-1: were they compared as ids, held-out data would
    # "overlap" the training data. They are compared by content, as tuples are.
    x, y = _tensors()
    unseen_x, unseen_y = _tensors(24, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # held-out data unused by the defaults
        _, report = mtunlearn_ext.unlearn(
            _TwoHeads(), tasks=SPECS, train_data=_Instances(x, y),
            forget_request=ForgetRequest.create([1, 2, 5]),
            held_out_data=_Instances(unseen_x[:12], {t: v[:12] for t, v in unseen_y.items()}),
            audit_data=_Instances(unseen_x[12:], {t: v[12:] for t, v in unseen_y.items()}),
            shared_parameters=lambda name: name.startswith("trunk"), config={"steps": 2})
    assert "forget_mia_auc_after" in report.extra["summary"]
    # A training instance among them is still found (by its inputs and labels).
    with pytest.raises(ValueError, match="held_out_data"):
        mtunlearn_ext.unlearn(
            _TwoHeads(), tasks=SPECS, train_data=_Instances(x, y),
            forget_request=ForgetRequest.create([1]),
            held_out_data=_Instances(x[:12], {t: v[:12] for t, v in y.items()}),
            shared_parameters=lambda name: name.startswith("trunk"), config={"steps": 1})


def test_unlearn_names_the_argument_a_bad_dataset_came_as() -> None:
    x, y = _tensors()
    with pytest.raises(ValueError, match=r"unlearn: `retain_data`: gather: .*unknown tasks"):
        mtunlearn_ext.unlearn(
            _TwoHeads(), tasks=SPECS, forget_data=(x[:3], {"topic": y["topic"][:3]}),
            retain_data=DataLoader([(x[i], {"topc": 1}) for i in range(5)],  # type: ignore
                                   batch_size=None),
            shared_parameters=lambda name: name.startswith("trunk"))


class _Keyed(Dataset):
    """A user's dataset whose instances carry an ``"id"`` (a database key), as a
    ``MultiTaskDataset``'s own items do; the keys run backwards, so no id is its position."""

    def __init__(self, data: MultiTaskDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, object]:
        return self.data[i]


def _keyed(x: torch.Tensor, y: dict[str, torch.Tensor]) -> MultiTaskDataset:
    return MultiTaskDataset(x, y, SPECS, ids=1000 + torch.arange(len(x)).flip(0))


def _rows_of(inputs: torch.Tensor, x: torch.Tensor) -> list[int]:
    return [next(i for i in range(len(x)) if torch.equal(row, x[i])) for row in inputs]


@pytest.mark.parametrize("tasks", ["specs", "kinds"])
def test_unlearn_names_a_datasets_instances_by_the_ids_they_carry(tasks: str) -> None:
    """They were named by position: ForgetRequest.create([0]) forgot dataset[0] whatever its
    id, and the instances' own ids were unknown ("ids 0 to 39")."""
    x, y = _tensors()
    data = _keyed(x, y)  # dataset[i] carries id 1039 - i
    given = (SPECS if tasks == "specs"
             else {"topic": "classification", "score": "regression"})
    common = dict(tasks=given, shared_parameters=lambda name: name.startswith("trunk"))
    request = ForgetRequest.create([1039, 1030], target_tasks=["topic"])  # dataset[0], [9]
    problem = mtunlearn_ext.api.build_problem(_TwoHeads(), train_data=_Keyed(data),
                                              forget_request=request, **common)  # type: ignore
    assert sorted(_rows_of(problem.forget.inputs, x)) == [0, 9]  # type: ignore[arg-type]
    assert sorted(problem.forget.ids.tolist()) == [1030, 1039]
    assert sorted(problem.retain.ids.tolist()) == sorted(data.ids.tolist())
    # The same run as on the data set in id order (a torch dataset's rows are taken so), the
    # same as on a loader over it (review: a dataset kept its index order, a loader was
    # sorted, and the two gave different weights), and the record names the ids it was given.
    model = _TwoHeads()
    from_dataset, report = mtunlearn_ext.unlearn(model, train_data=_Keyed(data),
                                                 forget_request=request, config={"steps": 3},
                                                 **common)  # type: ignore[arg-type]
    from_ids, _ = mtunlearn_ext.unlearn(model, train_data=data.subset(torch.argsort(data.ids)),
                                        forget_request=request, config={"steps": 3},
                                        **common)  # type: ignore[arg-type]
    from_loader, _ = mtunlearn_ext.unlearn(model, train_data=DataLoader(_Keyed(data),
                                                                        batch_size=5),
                                           forget_request=request, config={"steps": 3},
                                           **common)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(_weights(from_dataset), _weights(from_ids)))
    assert all(torch.equal(a, b) for a, b in zip(_weights(from_dataset), _weights(from_loader)))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(from_dataset)))
    assert report.request["ids_sha256"] == request.ids_hash()
    assert report.request["ids_named_by"] == "the 'id' each instance of `train_data` carries"
    # Positions name no instance now; the message gives the ids there are.
    with pytest.raises(KeyError, match=r"not in `train_data`: \[0\] .*`train_data` \(a _Keyed "
                                       r"whose instances carry an 'id'\) names its 40 instances "
                                       r"by those ids, from 1000 to 1039"):
        mtunlearn_ext.api.build_problem(_TwoHeads(), train_data=_Keyed(data),
                                        forget_request=ForgetRequest.create([0]),
                                        **common)  # type: ignore[arg-type]


def test_unlearn_takes_the_ids_forget_held_out_and_audit_datasets_carry() -> None:
    x, y = _tensors()
    data = _keyed(x, y)
    common = dict(tasks=SPECS, shared_parameters=lambda name: name.startswith("trunk"),
                  config={"steps": 2})
    rows = torch.tensor([0, 9, 17])
    # forget_data / retain_data: the record hashes the ids the forget instances carry.
    _, report = mtunlearn_ext.unlearn(
        _TwoHeads(), forget_data=_Keyed(data.subset(rows)), retain_data=_Keyed(
            data.subset(torch.arange(20, N))), **common)  # type: ignore[arg-type]
    assert report.request["ids_sha256"] == ForgetRequest.create([1039, 1030, 1022]).ids_hash()
    assert report.request["ids_named_by"] == "the 'id' each instance of `forget_data` carries"
    # Held-out and audit data are compared with the training data by the ids they carry, as
    # data sets are: a held-out instance with a training id is refused...
    unseen_x, unseen_y = _tensors(24, seed=7)
    held = MultiTaskDataset(unseen_x[:12], {t: v[:12] for t, v in unseen_y.items()}, SPECS,
                            ids=torch.arange(1035, 1047))
    with pytest.raises(ValueError, match=r"`held_out_data` shares 5 instance ids with the "
                                         r"training set \(first: \[1035, 1036"):
        mtunlearn_ext.unlearn(_TwoHeads(), train_data=_Keyed(data), held_out_data=_Keyed(held),
                              forget_request=ForgetRequest.create([1039]),
                              **common)  # type: ignore[arg-type]
    # ... and ids of their own keep an audit set apart from the held-out set by id.
    audit = MultiTaskDataset(unseen_x[12:], {t: v[12:] for t, v in unseen_y.items()}, SPECS,
                             ids=torch.arange(3000, 3012))
    held = MultiTaskDataset(held.inputs, held.targets, SPECS, ids=torch.arange(2000, 2012))
    with pytest.raises(ValueError, match=r"`audit_data` shares 9 instance ids with "
                                         r"`held_out_data` \(first: \[2003, 2004"):
        mtunlearn_ext.unlearn(
            _TwoHeads(), train_data=_Keyed(data), held_out_data=_Keyed(held),
            audit_data=_Keyed(MultiTaskDataset(audit.inputs, audit.targets, SPECS,
                                               ids=torch.arange(2003, 2015))),
            forget_request=ForgetRequest.create([1039]), **common)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # held-out data unused by the defaults
        _, report = mtunlearn_ext.unlearn(
            _TwoHeads(), train_data=_Keyed(data), held_out_data=_Keyed(held),
            audit_data=_Keyed(audit), forget_request=ForgetRequest.create([1039]),
            **common)  # type: ignore[arg-type]
    assert "forget_mia_auc_after" in report.extra["summary"]


def test_unlearn_on_a_shuffling_loader_forgets_the_instances_its_ids_name() -> None:
    """The rows were named by the shuffled read order: ForgetRequest.create([1039]) forgot an
    instance drawn by the global random state, while the record said id 1039."""
    x, y = _tensors()
    data = _keyed(x, y)
    common = dict(tasks=SPECS, shared_parameters=lambda name: name.startswith("trunk"))
    request = ForgetRequest.create([1039, 1030])  # dataset[0], dataset[9]
    model = _TwoHeads()
    in_id_order = data.subset(torch.argsort(data.ids))
    expected, _ = mtunlearn_ext.unlearn(model, train_data=in_id_order, forget_request=request,
                                        config={"steps": 3}, **common)  # type: ignore[arg-type]
    for seed in (0, 1):
        torch.manual_seed(seed)
        loader = DataLoader(data, batch_size=8, shuffle=True)  # batches carry "id"
        problem = mtunlearn_ext.api.build_problem(model, train_data=loader,
                                                  forget_request=request,
                                                  **common)  # type: ignore[arg-type]
        assert sorted(_rows_of(problem.forget.inputs, x)) == [0, 9]  # type: ignore[arg-type]
        torch.manual_seed(seed)
        new, report = mtunlearn_ext.unlearn(
            model, train_data=DataLoader(data, batch_size=8, shuffle=True),
            forget_request=request, config={"steps": 3}, **common)  # type: ignore[arg-type]
        # Read in id order: the same run whatever order the loader shuffled the rows into.
        assert all(torch.equal(a, b) for a, b in zip(_weights(new), _weights(expected)))
        assert report.request["ids_sha256"] == request.ids_hash()


def test_instances_carrying_one_id_twice_are_refused_naming_the_argument() -> None:
    x, y = _tensors(6)
    items = [{"input": x[i], "targets": {"topic": y["topic"][i], "score": y["score"][i]},
              "id": [7, 8, 9, 8, 10, 11][i]} for i in range(6)]
    with pytest.raises(ValueError, match=r"gather: the instances carry duplicate ids: id 8 "
                                         r"names rows \[1, 3\]"):
        gather(items, SPECS)
    with pytest.raises(ValueError, match=r"unlearn: `train_data`: gather: the batches carry "
                                         r"duplicate ids: id 8 names rows \[1, 3\]"):
        mtunlearn_ext.unlearn(_TwoHeads(), tasks=SPECS, train_data=DataLoader(
            items, batch_size=4), forget_request=ForgetRequest.create([7]),  # type: ignore
            shared_parameters=lambda name: name.startswith("trunk"))
