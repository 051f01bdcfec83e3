"""Seeded minibatch streams over the forget and retain sets.

Unlearning runs a fixed number of steps, each drawing one forget and one retain minibatch, and
the two sets have very different sizes: a :class:`BatchStream` is an endless sequence of
minibatches, one random permutation per pass (epoch), drawn from its own generator. Seeding the
two streams from one method generator makes the batch order a function of the seed alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from mtunlearn_ext.data.base import MultiTaskDataset, batch_to
from mtunlearn_ext.data.inputs import slice_rows

__all__ = ["Batch", "BatchStream", "batch_to", "child_generator"]

Batch = dict[str, object]


def child_generator(parent: torch.Generator) -> torch.Generator:
    """A new CPU generator seeded by one draw from ``parent`` (independent sub-streams that stay
    reproducible whatever the other streams draw)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=parent).item())
    child = torch.Generator()
    child.manual_seed(seed)
    return child


def batch_rows(batch: Mapping[str, object], start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of a collated batch (views; per-task target dicts and every input of
    a multi-input batch sliced too)."""
    out: Batch = {}
    for key, value in batch.items():
        if key == "input":
            out[key] = slice_rows(value, start, stop)  # type: ignore[arg-type]
        elif isinstance(value, torch.Tensor):
            out[key] = value[start:stop]
        elif isinstance(value, Mapping):
            out[key] = {k: v[start:stop] for k, v in value.items()}
        else:
            out[key] = value
    return out


class BatchStream:
    """Endless seeded minibatches of ``dataset``.

    Each pass over the data is a fresh ``randperm`` from ``generator``; a batch never straddles
    two passes, so with ``drop_last=False`` the last batch of a pass may be smaller (a forget set
    smaller than the batch size gives the whole set every step). With ``shuffle=False`` the
    order is fixed (used for deterministic full passes).

    Args:
        dataset: the rows to draw from.
        batch_size: rows per batch (capped at ``len(dataset)``).
        generator: the stream's own generator (see :func:`child_generator`).
        device: where batches are delivered.
    """

    def __init__(self, dataset: MultiTaskDataset, batch_size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"BatchStream: `batch_size` must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("BatchStream: the data set is empty")
        self.dataset = dataset
        self.batch_size = min(batch_size, len(dataset))
        self.generator = generator
        self.device = device
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0

    def _new_pass(self) -> None:
        n = len(self.dataset)
        self._order = torch.randperm(n, generator=self.generator) if self.shuffle \
            else torch.arange(n)
        self._cursor = 0
        self.epoch += 1

    def next(self) -> Batch:
        """The next minibatch (starting a new pass when the current one is used up)."""
        return batch_to(self.dataset.batch(self._advance()), self.device)

    def skip(self) -> None:
        """Move on as :meth:`next` does, without building the batch: a consumer switched off
        (an ablation) keeps the rows every other consumer of the stream is given."""
        self._advance()

    def _advance(self) -> torch.Tensor:
        n = len(self.dataset)
        remaining = n - self._cursor
        if self.epoch == 0 or remaining <= 0 or (self.drop_last and remaining < self.batch_size):
            self._new_pass()
        positions = self._order[self._cursor:self._cursor + self.batch_size]
        self._cursor += positions.numel()
        return positions

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    @property
    def batches_per_pass(self) -> int:
        """Batches in one pass over the data set (a short last batch counts unless
        ``drop_last``)."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
