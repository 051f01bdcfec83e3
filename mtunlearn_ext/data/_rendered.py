"""The split and seeding scheme shared by the rendered benchmarks (``indoor``, ``street``).

A benchmark is ``num_train`` + ``num_test`` (+ ``num_validation``) images of random scenes. The
splits draw from three independent streams spawned from ``[seed, stream_key]``, so no split
changes with another's size, and the validation stream (the third, added last) leaves the train
and test splits bit for bit as they were before it existed. Inside a split, the scenes and the
pixel noise draw from two streams of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.data._raycast import Scene, focal_length
from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset, TaskSpec

__all__ = ["RenderedKind", "make_rendered_benchmark"]

SampleScene = Callable[[np.random.Generator], Scene]
Render = Callable[[list[Scene], tuple[int, int], np.random.Generator], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RenderedKind:
    """What tells one rendered benchmark from another: its scenes, renderer and constants."""

    name: str
    stream_key: int  # the benchmark's own entropy beside the seed: [seed, stream_key]
    tasks: Callable[[], list[TaskSpec]]
    sample_scene: SampleScene
    render: Render
    classes: tuple[str, ...]
    version: int
    fov_x: float
    conventions: Mapping[str, str]  # the targets' conventions, e.g. "depth": "z-depth ..."
    rgb_normalisation: tuple[float, float]
    depth_prior: float


def _split(kind: RenderedKind, num: int, size: tuple[int, int],
           seed_seq: np.random.SeedSequence, first_id: int,
           tasks: list[TaskSpec]) -> tuple[MultiTaskDataset, list[list[float]]]:
    scene_seq, noise_seq = seed_seq.spawn(2)
    scene_rng = np.random.default_rng(scene_seq)
    scenes = [kind.sample_scene(scene_rng) for _ in range(num)]
    out = kind.render(scenes, size, np.random.default_rng(noise_seq))
    cameras = [[float(s.camera_height), float(s.yaw), float(s.pitch)] for s in scenes]
    data = MultiTaskDataset(out["input"], {t.name: out[t.name] for t in tasks}, tasks,
                            ids=torch.arange(first_id, first_id + num))
    return data, cameras


def make_rendered_benchmark(kind: RenderedKind, num_train: int, num_test: int,
                            size: tuple[int, int], seed: int,
                            num_validation: int) -> Benchmark:
    """``num_train`` + ``num_test`` (+ ``num_validation``) rendered images of ``kind``.

    Train ids are ``0 .. num_train - 1``, test ids follow, then the validation ids.
    """
    fn = f"make_{kind.name}"
    number = integer_value(seed)
    if number is None or number < 0:  # True was taken for seed 1, None failed inside numpy
        raise ValueError(f"{fn}: `seed` must be an integer >= 0, got {seed!r}")
    seed = number
    if num_train < 1 or num_test < 0 or num_validation < 0:
        raise ValueError(f"{fn}: need num_train >= 1, num_test >= 0 and num_validation "
                         f">= 0, got {num_train}, {num_test}, {num_validation}")
    h, w = size
    if h < 4 or w < 4:
        raise ValueError(f"{fn}: `size` must be at least (4, 4), got {size}")
    tasks = kind.tasks()
    train_seq, test_seq, validation_seq = np.random.SeedSequence([seed, kind.stream_key]).spawn(3)
    train, train_cams = _split(kind, num_train, (h, w), train_seq, 0, tasks)
    test, test_cams = _split(kind, num_test, (h, w), test_seq, num_train, tasks)
    validation = None
    if num_validation:
        validation, _ = _split(kind, num_validation, (h, w), validation_seq,
                               num_train + num_test, tasks)
    info: dict[str, object] = {
        "classes": list(kind.classes), "size": [h, w], "seed": seed,
        "generator_version": kind.version, "fov_x": kind.fov_x,
        "focal_px": focal_length(w, kind.fov_x),
        **kind.conventions,
        "rgb_normalisation": list(kind.rgb_normalisation), "depth_prior": kind.depth_prior,
        "train_cameras": train_cams, "test_cameras": test_cams,
    }
    return Benchmark(kind.name, train, test, tasks, info, validation)
