"""``build_model``: the default model of a benchmark (or of a task list and input shape)."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence

import torch

from mtunlearn_ext._random import seeded_generators
from mtunlearn_ext.data.base import Benchmark, TaskSpec, task_spec_list
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
                depth_init: float | None = None,
                regression_dims: Mapping[str, int] | None = None) -> MultiTaskModel:
    """A freshly initialised multi-task model, the same for the same arguments and seed.

    Dense tasks (segmentation/depth/normals) and an input of shape ``[C, H, W]`` give a
    :class:`DenseMultiTaskNet`; classification/regression tasks and a flat input ``[D]`` give an
    :class:`MLPMultiTaskNet`.

    Args:
        benchmark_or_tasks: a :class:`Benchmark` or a list of task specs (then ``input_shape``
            is required). From a benchmark come the tasks, the input shape, the depth prior
            (``info["depth_prior"]``) and the default architecture (``info["model_config"]``:
            ``widths`` / ``head_hidden`` / ``hidden``, as the registry sizes them) and each
            regression head's output size (the entries of one training target row: ``d`` for
            targets ``[N, d]``, 1 for ``[N]``).
        input_shape: one input's shape, without the batch dimension.
        seed: initialisation seed; the global RNG state is left as it was.
        widths: encoder widths of the dense backbone (default ``(16, 32, 48, 64)``).
        head_hidden: hidden channels of each dense head (default ``widths[0]``).
        hidden: shared layer widths of the MLP (default ``(128, 128)``).
        depth_init: initial depth output in metres (default: the benchmark's ``depth_prior``).
        regression_dims: regression task -> its output size ``d``. From a benchmark every entry
            is read from its training targets (a value given here must agree with them); with
            a task list a regression task not in it gets one output.
    """
    bench: Benchmark | None = None
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
        tasks = task_spec_list(benchmark_or_tasks, "build_model: `benchmark_or_tasks` must be a "
                               "Benchmark or a sequence of TaskSpec")
        if input_shape is None:
            raise ValueError("build_model: pass `input_shape` with a task list")
    if not tasks:
        raise ValueError("build_model: no tasks")
    regression = [t.name for t in tasks if t.kind == "regression"]
    unknown = [name for name in regression_dims or {} if name not in regression]
    if unknown:
        raise ValueError(f"build_model: `regression_dims` names {unknown}, which are not "
                         f"regression tasks; the regression tasks are {regression}")
    if bench is not None:
        regression_dims = _regression_dims(bench, tasks, regression_dims)
    shape = _input_shape(input_shape)
    dense = [t.kind in _DENSE_KINDS for t in tasks]
    with seeded_generators(seed, "cpu"):  # the caller's generators, CUDA ones too, untouched
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
                                   hidden=tuple(hidden) if hidden else (128, 128),
                                   regression_dims=regression_dims)
    raise ValueError(f"build_model: cannot mix dense and flat tasks: "
                     f"{[(t.name, t.kind) for t in tasks]}")


def _input_shape(input_shape: object) -> tuple[int, ...]:
    """``input_shape`` as a tuple of sizes >= 1. ``int()`` of each entry truncated 8.7 to 8
    and a string was read one digit at a time ('64' -> (6, 4)); both are refused."""
    what = "build_model: `input_shape` must be a sequence of integer sizes >= 1"
    if isinstance(input_shape, (str, bytes, Mapping)) or not isinstance(input_shape, Iterable):
        raise TypeError(f"{what} (one input's shape, without the batch dimension), got "
                        f"{type(input_shape).__name__} {input_shape!r:.60}")
    sizes = list(input_shape)
    shape: list[int] = []
    for size in sizes:
        try:
            if isinstance(size, bool):
                raise TypeError
            value = operator.index(size)
        except TypeError:
            raise TypeError(f"{what}, got {type(size).__name__} {size!r:.40} in "
                            f"{tuple(sizes)!r:.80}") from None
        if value < 1:
            raise ValueError(f"{what}, got {value} in {tuple(sizes)!r:.80}")
        shape.append(value)
    return tuple(shape)


def _regression_dims(bench: Benchmark, tasks: Sequence[TaskSpec],
                     given: Mapping[str, int] | None) -> dict[str, int]:
    """Each regression task's output size from ``bench``'s training targets (the entries of
    one row), checked against ``given``."""
    dims: dict[str, int] = {}
    for t in tasks:
        if t.kind != "regression":
            continue
        target = bench.train.targets.get(t.name)
        if target is None:
            raise ValueError(f"build_model: the benchmark's training set has no targets of "
                             f"regression task {t.name!r} to size its head from; it has "
                             f"{sorted(bench.train.targets)}")
        d = math.prod(target.shape[1:])
        if d < 1:
            raise ValueError(f"build_model: regression task {t.name!r} has targets of shape "
                             f"{tuple(target.shape)}, with no entry per row; expected [N, d], "
                             f"d >= 1")
        if given is not None and t.name in given and given[t.name] != d:
            raise ValueError(f"build_model: `regression_dims[{t.name!r}]` is {given[t.name]!r}, "
                             f"but the task's training targets have {d} entries per row "
                             f"(shape {tuple(target.shape)})")
        dims[t.name] = d
    return dims
