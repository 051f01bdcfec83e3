"""Multi-task data sets, generated benchmarks, and forget requests."""

from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.request import ForgetRequest

__all__ = ["Benchmark", "ForgetRequest", "MultiTaskDataset", "TaskSpec"]
