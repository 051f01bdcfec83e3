"""``build_model``: the default model of a benchmark (or of a task list and input shape)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtunlearn_ext.data.base import Benchmark, TaskSpec
from mtunlearn_ext.data.inputs import describe
from mtunlearn_ext.models.base import MultiTaskModel
from mtunlearn_ext.models.dense import DenseMultiTaskNet
from mtunlearn_ext.models.mlp import MLPMultiTaskNet

__all__ = ["build_model"]

_DENSE_KINDS = ("segmentation", "depth", "normals")


def build_model(benchmark_or_tasks: Benchmark | Sequence[TaskSpec], *,
                input_shape: Sequence[int] | None = None, seed: int = 0,
                widths: Sequence[int] | None = None, head_hidden: int | None = None,
                hidden: Sequence[int] | None = None,
                depth_init: float | None = None) -> MultiTaskModel:
    """A freshly initialised multi-task model, the same for the same arguments and seed.

    Dense tasks (segmentation/depth/normals) and an input of shape ``[C, H, W]`` give a
    :class:`DenseMultiTaskNet`; classification/regression tasks and a flat input ``[D]`` give an
    :class:`MLPMultiTaskNet`.

    Args:
        benchmark_or_tasks: a :class:`Benchmark` or a list of task specs (then ``input_shape``
            is required). From a benchmark come the tasks, the input shape, the depth prior
            (``info["depth_prior"]``) and the default architecture (``info["model_config"]``:
            ``widths`` / ``head_hidden`` / ``hidden``, as the registry sizes them).
        input_shape: one input's shape, without the batch dimension.
        seed: initialisation seed; the global RNG state is left as it was.
        widths: encoder widths of the dense backbone (default ``(16, 32, 48, 64)``).
        head_hidden: hidden channels of each dense head (default ``widths[0]``).
        hidden: shared layer widths of the MLP (default ``(128, 128)``).
        depth_init: initial depth output in metres (default: the benchmark's ``depth_prior``).
    """
    if isinstance(benchmark_or_tasks, Benchmark):
        bench = benchmark_or_tasks
        tasks = list(bench.tasks or bench.train.tasks)
        if input_shape is None:
            inputs = bench.train.inputs
            if not isinstance(inputs, torch.Tensor):
                raise TypeError("build_model: the library's models take one input tensor; got "
                                f"several inputs ({describe(inputs)}): build the model yourself")
            input_shape = tuple(inputs.shape[1:])
        if depth_init is None and "depth_prior" in bench.info:
            depth_init = float(bench.info["depth_prior"])  # type: ignore[arg-type]
        defaults = bench.info.get("model_config") or {}
        assert isinstance(defaults, dict)
        widths = widths if widths is not None else defaults.get("widths")
        head_hidden = head_hidden if head_hidden is not None else defaults.get("head_hidden")
        hidden = hidden if hidden is not None else defaults.get("hidden")
    else:
        tasks = list(benchmark_or_tasks)
        if input_shape is None:
            raise ValueError("build_model: pass `input_shape` with a task list")
    if not tasks:
        raise ValueError("build_model: no tasks")
    shape = tuple(int(s) for s in input_shape)
    dense = [t.kind in _DENSE_KINDS for t in tasks]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if all(dense):
            if len(shape) != 3:
                raise ValueError(f"build_model: dense tasks need inputs [C, H, W], got {shape}")
            return DenseMultiTaskNet(tasks, in_channels=shape[0],
                                     widths=tuple(widths) if widths else (16, 32, 48, 64),
                                     head_hidden=head_hidden, depth_init=depth_init)
        if not any(dense):
            if len(shape) != 1:
                raise ValueError(f"build_model: flat tasks need inputs [D], got {shape}")
            return MLPMultiTaskNet(tasks, in_features=shape[0],
                                   hidden=tuple(hidden) if hidden else (128, 128))
    raise ValueError(f"build_model: cannot mix dense and flat tasks: "
                     f"{[(t.name, t.kind) for t in tasks]}")
