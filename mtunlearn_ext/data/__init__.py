"""Multi-task data sets, generated benchmarks, real-data loaders, and forget requests."""

from mtunlearn_ext.data.base import TASK_KINDS, Benchmark, MultiTaskDataset, TaskKind, TaskSpec
from mtunlearn_ext.data.digits import make_digits
from mtunlearn_ext.data.gathering import gather
from mtunlearn_ext.data.indoor import INDOOR_CLASSES, make_indoor
from mtunlearn_ext.data.libmtl import LayoutError, load_cityscapes, load_nyuv2
from mtunlearn_ext.data.registry import (
    BENCHMARKS,
    SIZES,
    Size,
    UNSEEN_SEED_OFFSET,
    default_cache_dir,
    load_benchmark,
    read_benchmark,
    register_benchmark,
    registered_benchmarks,
    save_benchmark,
    unseen_instances,
)
from mtunlearn_ext.data.request import REQUEST_TYPES, ForgetRequest, RequestType
from mtunlearn_ext.data.street import STREET_CLASSES, make_street
from mtunlearn_ext.data.task_forms import TasksSpec

__all__ = ["BENCHMARKS", "INDOOR_CLASSES", "REQUEST_TYPES", "SIZES", "STREET_CLASSES",
           "TASK_KINDS", "UNSEEN_SEED_OFFSET", "Benchmark", "ForgetRequest", "LayoutError",
           "MultiTaskDataset", "RequestType", "Size", "TaskKind", "TaskSpec", "TasksSpec",
           "default_cache_dir", "gather", "load_benchmark", "load_cityscapes", "load_nyuv2",
           "make_digits",
           "make_indoor", "make_street", "read_benchmark", "register_benchmark",
           "registered_benchmarks", "save_benchmark", "unseen_instances"]
