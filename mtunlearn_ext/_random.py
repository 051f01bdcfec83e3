"""Seeding torch's global generators for a block of work, and giving the caller's back after.

``torch.manual_seed`` seeds every generator: the CPU one and every CUDA device's (at once, or
queued until CUDA starts). Seeded so inside ``torch.random.fork_rng(devices=[])``, a block
restored only the CPU generator, so a CPU run on a machine with a GPU reset the caller's CUDA
random streams. These helpers seed exactly the generators a run on ``device`` can draw from
(the CPU one, and that CUDA device's for a CUDA run) and restore exactly those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

__all__ = ["MAX_RUN_SEED", "TORCH_SEED_LIMIT", "forked_generators", "seed_generators",
           "seeded_generators"]

#: The largest seed of a run (the commands' ``--seed``, :class:`ExperimentConfig`): numpy's
#: and scikit-learn's ``random_state`` (the data splits) take ``[0, 2**32 - 1]``; torch's
#: generators take more.
MAX_RUN_SEED = 2**32 - 1
#: Seeds of torch's generators lie below this (``manual_seed`` unpacks a 64-bit unsigned
#: integer; a larger one fails with "Overflow when unpacking long long").
TORCH_SEED_LIMIT = 2**64


def _cuda_index(device: torch.device | str) -> int | None:
    """The CUDA device index a run on ``device`` draws from, ``None`` for any other device."""
    where = torch.device(device)
    if where.type != "cuda":
        return None
    return where.index if where.index is not None else torch.cuda.current_device()


def forked_generators(device: torch.device | str) -> AbstractContextManager[None]:
    """Run a block and restore the generators a run on ``device`` draws from afterwards: the
    CPU one, and for a CUDA device that device's."""
    index = _cuda_index(device)
    return torch.random.fork_rng(devices=[] if index is None else [index])


def seed_generators(seed: int, device: torch.device | str) -> None:
    """Seed the generators a run on ``device`` draws from with ``seed``, and no other (those
    :func:`forked_generators` restores)."""
    torch.random.default_generator.manual_seed(seed)
    index = _cuda_index(device)
    if index is not None:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


@contextmanager
def seeded_generators(seed: int, device: torch.device | str) -> Iterator[None]:
    """Run a block on the generators of ``device`` (see above) seeded with ``seed``, then give
    the caller's states back."""
    with forked_generators(device):
        seed_generators(seed, device)
        yield
