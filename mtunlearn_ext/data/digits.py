"""``digits``: scikit-learn's bundled 8x8 handwritten digits (no download) as three tasks.

Tasks on the same images: ``digit`` (10 classes), ``parity`` (0 even, 1 odd) and ``magnitude``
(1 if the digit is >= 5). The tasks are deterministic functions of one latent label, so they
share most of their features: a small, fast benchmark with strong task interference.
Inputs: the 64 pixel intensities scaled from ``[0, 16]`` to ``[0, 1]``. Instance ids are the row
indices in ``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset, TaskSpec

__all__ = ["DIGITS_VERSION", "digits_tasks", "make_digits"]

DIGITS_VERSION = 1


def digits_tasks() -> list[TaskSpec]:
    return [TaskSpec("digit", "classification", num_classes=10),
            TaskSpec("parity", "classification", num_classes=2),
            TaskSpec("magnitude", "classification", num_classes=2)]


def _dataset(x: np.ndarray, y: np.ndarray, ids: np.ndarray, tasks: list[TaskSpec]
             ) -> MultiTaskDataset:
    digit = torch.from_numpy(y.astype(np.int64))
    targets = {"digit": digit, "parity": digit % 2, "magnitude": (digit >= 5).long()}
    return MultiTaskDataset(torch.from_numpy((x / 16.0).astype(np.float32)), targets, tasks,
                            ids=torch.from_numpy(ids.astype(np.int64)))


def make_digits(seed: int = 0, test_fraction: float = 0.25,
                num_samples: int | None = None) -> Benchmark:
    """The ``digits`` benchmark: a stratified train/test split of the 1797 digits.

    Args:
        seed: seeds the split (and the subsample).
        test_fraction: share of the instances in the test set, in ``(0, 1)``.
        num_samples: use a stratified subsample of this many instances (default all).
    """
    number = integer_value(seed)
    if number is None or not 0 <= number < 2 ** 32:
        # scikit-learn takes random_state=None for a fresh random split: make_digits(seed=None)
        # gave other training instances (other ids) at every call, recorded as seed None.
        raise ValueError(f"make_digits: `seed` must be an integer in [0, 2**32) (the split's "
                         f"random_state), got {seed!r}")
    seed = number
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"make_digits: `test_fraction` must be in (0, 1), got {test_fraction}")
    x, y = load_digits(return_X_y=True)
    ids = np.arange(len(y))
    if num_samples is not None:
        if not 20 <= num_samples <= len(y):
            raise ValueError(f"make_digits: `num_samples` must be in [20, {len(y)}], "
                             f"got {num_samples}")
        if num_samples < len(y):
            ids, _ = train_test_split(ids, train_size=num_samples, stratify=y,
                                      random_state=seed)
            ids = np.sort(ids)
    train_ids, test_ids = train_test_split(ids, test_size=test_fraction, stratify=y[ids],
                                           random_state=seed)
    train_ids, test_ids = np.sort(train_ids), np.sort(test_ids)
    tasks = digits_tasks()
    info: dict[str, object] = {"source": "sklearn.datasets.load_digits", "seed": seed,
                               "test_fraction": test_fraction, "generator_version": DIGITS_VERSION,
                               "inputs": "64 pixel intensities in [0, 1] (8x8, row-major)"}
    return Benchmark("digits", _dataset(x[train_ids], y[train_ids], train_ids, tasks),
                     _dataset(x[test_ids], y[test_ids], test_ids, tasks), tasks, info)
