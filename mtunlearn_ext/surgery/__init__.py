"""Gradient surgery on the compiled ops: projections on parameter lists, aggregators, a training
loop hook and its distributed variants.

One implementation for everything: a Gram pass (``ops.gram_list``), a small solve in coefficient
space, a combination pass (``ops.combine_list``) into output tensors, never a flat copy.

- :mod:`~mtunlearn_ext.surgery.projections`: :func:`project_out_list`,
  :func:`project_nonconflicting_list`, :func:`aggregate_list` (global or per layer).
- :mod:`~mtunlearn_ext.surgery.weightings` / :mod:`~mtunlearn_ext.surgery.aggregators`:
  TorchJD-compatible ``Weighting`` (Gram -> weights) and ``Aggregator`` (``[k, n]`` -> ``[n]``)
  for Mean, Sum, PCGrad, UPGrad and MGDA.
- :mod:`~mtunlearn_ext.surgery.hook`: :class:`GradientSurgery`, ``backward(losses)`` into
  ``.grad`` for any optimizer loop.
- :mod:`~mtunlearn_ext.surgery.distributed`: FSDP2 / sharded lists (one ``k x k`` all-reduce) and
  replicated (DDP-style) parameters.

This package imports only ``torch`` and :mod:`mtunlearn_ext.ops`.
"""

import torch.distributed as _dist

from mtunlearn_ext.surgery.aggregators import MGDA, Aggregator, Mean, PCGrad, Sum, UPGrad
from mtunlearn_ext.surgery.hook import GradientSurgery, GradReducer, PerTaskMode
from mtunlearn_ext.surgery.min_norm import min_norm_simplex
from mtunlearn_ext.surgery.projections import (
    aggregate_list,
    gram_list_stats,
    inner_list_stats,
    project_nonconflicting_list,
    project_out_list,
)
from mtunlearn_ext.surgery.weightings import (
    MeanWeighting,
    MGDAWeighting,
    PCGradWeighting,
    SumWeighting,
    UPGradWeighting,
    Weighting,
)

__all__ = [
    "MGDA",
    "Aggregator",
    "GradReducer",
    "GradientSurgery",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "PCGrad",
    "PCGradWeighting",
    "PerTaskMode",
    "Sum",
    "SumWeighting",
    "UPGrad",
    "UPGradWeighting",
    "Weighting",
    "aggregate_list",
    "gram_list_stats",
    "inner_list_stats",
    "min_norm_simplex",
    "project_nonconflicting_list",
    "project_out_list",
]

if _dist.is_available():
    from mtunlearn_ext.surgery.distributed import (
        ReplicatedReducer,
        ShardedReducer,
        default_backend,
        replicated_surgery,
        sharded_surgery,
        stats_all_reduce,
    )

    __all__ += [
        "ReplicatedReducer",
        "ShardedReducer",
        "default_backend",
        "replicated_surgery",
        "sharded_surgery",
        "stats_all_reduce",
    ]
