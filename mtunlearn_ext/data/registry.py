"""``load_benchmark``: every benchmark by name and size, generated ones cached on disk.

Sizes (train / test instances, image ``H x W``; the generated ``indoor`` and ``street`` also
have a validation split of half the test size, ``Benchmark.validation``):

=========== ======================= ======================== =========================
name        tiny (tests, < 2 s)     small (default demo)     medium
=========== ======================= ======================== =========================
indoor      48 / 24, 24x32          600 / 200, 48x64         1500 / 500, 96x128
street      48 / 24, 24x48          600 / 200, 48x96         1500 / 500, 96x192
digits      300 / 100 (subsample)   1347 / 450 (all)         1347 / 450 (all)
nyuv2       32 / 16, 72x96          795 / 654, 72x96         795 / 654, 144x192
cityscapes  32 / 16, 32x64          all, 64x128              all, 128x256
=========== ======================= ======================== =========================

The generated benchmarks (``indoor``, ``street``) are cached as one ``torch.save`` file per
``(name, size, seed, generator version, generator arguments)``, written atomically (temporary
file, fsync, ``os.replace``), so concurrent or interrupted runs never leave a partial file; an
unreadable cache file is regenerated. ``digits`` loads from scikit-learn's bundled copy in
milliseconds and is not cached; ``nyuv2`` / ``cityscapes`` are read from ``data_root`` (LibMTL
layout, see :mod:`mtunlearn_ext.data.libmtl`).

Every loaded benchmark carries its default architecture and training recipe in
``info["model_config"]`` (read by :func:`~mtunlearn_ext.models.build_model`) and
``info["train_config"]`` (fields of :class:`~mtunlearn_ext.training.TrainConfig`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, overload

import torch

from mtunlearn_ext._definitions import defined_name, same_definition
from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._io import atomic_torch_save
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, warn_at_caller
from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset, TaskSpec, describe_callable
from mtunlearn_ext.data.digits import make_digits
from mtunlearn_ext.data.indoor import INDOOR_VERSION, make_indoor
from mtunlearn_ext.data.libmtl import load_cityscapes, load_nyuv2
from mtunlearn_ext.data.street import STREET_VERSION, make_street

__all__ = ["BENCHMARKS", "GENERATED_BENCHMARKS", "SIZES", "UNSEEN_ID_OFFSET",
           "UNSEEN_SEED_OFFSET", "Size", "default_cache_dir", "load_benchmark", "read_benchmark",
           "register_benchmark", "registered_benchmarks", "save_benchmark", "unseen_instances"]

Size = Literal["tiny", "small", "medium"]
SIZES: tuple[Size, ...] = get_args(Size)
BENCHMARKS: tuple[str, ...] = ("indoor", "street", "digits", "nyuv2", "cityscapes")
_CACHE_FORMAT = "mtunlearn_ext.benchmark/1"
#: :func:`unseen_instances` draws from generator seeds at and above this one, which no
#: benchmark seed reaches in practice.
UNSEEN_SEED_OFFSET = 2**40
#: The first instance id of :func:`unseen_instances`' data sets (its ids are
#: ``UNSEEN_ID_OFFSET + 0 .. count - 1``): far above every id of :func:`load_benchmark`'s
#: splits (generated ones number their train, test and validation instances from 0, a few
#: thousand at most), so an unseen pool never shares an id with a training set and passes as
#: audit or held-out data.
UNSEEN_ID_OFFSET = 2**40

# name -> size -> keyword arguments of the generator / loader
_GENERATED: dict[str, tuple[Callable[..., Benchmark], int, dict[str, dict[str, Any]]]] = {
    "indoor": (make_indoor, INDOOR_VERSION, {
        "tiny": {"num_train": 48, "num_test": 24, "num_validation": 12, "size": (24, 32)},
        "small": {"num_train": 600, "num_test": 200, "num_validation": 100, "size": (48, 64)},
        "medium": {"num_train": 1500, "num_test": 500, "num_validation": 250,
                   "size": (96, 128)},
    }),
    "street": (make_street, STREET_VERSION, {
        "tiny": {"num_train": 48, "num_test": 24, "num_validation": 12, "size": (24, 48)},
        "small": {"num_train": 600, "num_test": 200, "num_validation": 100, "size": (48, 96)},
        "medium": {"num_train": 1500, "num_test": 500, "num_validation": 250,
                   "size": (96, 192)},
    }),
}
#: The benchmarks drawn from a generator (any number of fresh instances: :func:`unseen_instances`).
GENERATED_BENCHMARKS: tuple[str, ...] = tuple(_GENERATED)
_DIGITS = {"tiny": {"num_samples": 400}, "small": {}, "medium": {}}
_REAL: dict[str, tuple[Callable[..., Benchmark], dict[str, dict[str, Any]]]] = {
    "nyuv2": (load_nyuv2, {
        "tiny": {"size": (72, 96), "max_train": 32, "max_test": 16},
        "small": {"size": (72, 96)},
        "medium": {"size": (144, 192)},
    }),
    "cityscapes": (load_cityscapes, {
        "tiny": {"size": (32, 64), "max_train": 32, "max_test": 16},
        "small": {"size": (64, 128)},
        "medium": {"size": (128, 256)},
    }),
}


# name -> size -> (model_config, train_config): the default architecture and training recipe,
# read by ``build_model`` and by the experiment runner from ``info``. The dense recipe was sized
# on "small" indoor (2 CPU cores): 10 epochs of batch 16 reach mIoU ~0.66; batch 32 or a
# narrower stem stalled near 0.2-0.4 in the same time (the small classes need the extra steps).
_DENSE_MODEL = {"widths": [24, 32, 48, 64], "head_hidden": 32}
_DENSE_TRAIN = {"epochs": 10, "batch_size": 16, "lr": 4e-3}
_RECIPES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "indoor": {size: (_DENSE_MODEL, _DENSE_TRAIN) for size in SIZES},
    "street": {size: (_DENSE_MODEL, _DENSE_TRAIN) for size in SIZES},
    "digits": {size: ({"hidden": [128, 128]}, {"epochs": 30, "batch_size": 64, "lr": 3e-3})
               for size in SIZES},
    "nyuv2": {size: ({"widths": [32, 48, 64, 96], "head_hidden": 32},
                     {"epochs": 20, "batch_size": 16, "lr": 4e-3}) for size in SIZES},
    "cityscapes": {size: ({"widths": [32, 48, 64, 96], "head_hidden": 32},
                          {"epochs": 20, "batch_size": 16, "lr": 4e-3}) for size in SIZES},
}


def _with_recipe(benchmark: Benchmark, name: str, size: str) -> Benchmark:
    """Record the default architecture and training recipe of ``(name, size)`` in ``info``
    (plain dicts; not part of the cached data, so a new recipe needs no regeneration)."""
    model_config, train_config = _RECIPES[name][size]
    benchmark.info["model_config"] = dict(model_config)
    benchmark.info["train_config"] = dict(train_config)
    benchmark.info["size_name"] = size
    return benchmark


def default_cache_dir() -> Path:
    """``$MTUNLEARN_CACHE`` if set, else ``~/.cache/mtunlearn_ext``."""
    env = os.environ.get("MTUNLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtunlearn_ext"


def _cache_path(cache_dir: Path, name: str, size: str, seed: int, version: int,
                kwargs: dict[str, Any]) -> Path:
    # The arguments' hash keeps a changed size table from reading a stale file.
    digest = hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{name}-{size}-seed{seed}-v{version}-{digest}.pt"


def _task_dict(t: TaskSpec) -> dict[str, Any]:
    return {"name": t.name, "kind": t.kind, "num_classes": t.num_classes,
            "ignore_index": t.ignore_index}


def _dataset_dict(d: MultiTaskDataset) -> dict[str, Any]:
    return {"inputs": d.inputs, "targets": d.targets, "ids": d.ids, "supervision": d.supervision}


def _from_dict(payload: dict[str, Any]) -> Benchmark:
    tasks = [TaskSpec(**t) for t in payload["tasks"]]

    def dataset(d: dict[str, Any]) -> MultiTaskDataset:
        return MultiTaskDataset(d["inputs"], d["targets"], tasks, d["ids"], d["supervision"])

    validation = payload.get("validation")
    return Benchmark(payload["name"], dataset(payload["train"]), dataset(payload["test"]), tasks,
                     payload["info"], None if validation is None else dataset(validation))


def save_benchmark(benchmark: Benchmark, path: str | os.PathLike[str],
                   overwrite: bool = True) -> str:
    """Write ``benchmark`` to ``path`` atomically (``torch.save`` of plain types); returns the
    file's SHA-256. ``info`` must hold plain types and tensors.

    A task with a custom ``loss`` (in ``benchmark.tasks`` or a split's tasks) is refused
    (``ValueError`` naming it): the file holds data, not code, so the loss cannot be stored.
    Save the benchmark with tasks without ``loss`` and give them their loss again after
    :func:`read_benchmark`.
    """
    splits = [benchmark.train, benchmark.test]
    if benchmark.validation is not None:
        splits.append(benchmark.validation)
    for task in [*benchmark.tasks, *(t for split in splits for t in split.tasks)]:
        if task.loss is not None:
            raise ValueError(
                f"save_benchmark: task {task.name!r} has a custom loss "
                f"({describe_callable(task.loss)}), which a benchmark file cannot store (it "
                f"holds data, not code); save the benchmark with tasks without `loss` and give "
                f"them their loss again after read_benchmark")
    payload = {"format": _CACHE_FORMAT, "name": benchmark.name,
               "tasks": [_task_dict(t) for t in benchmark.tasks],
               "train": _dataset_dict(benchmark.train), "test": _dataset_dict(benchmark.test),
               "validation": (None if benchmark.validation is None
                              else _dataset_dict(benchmark.validation)),
               "info": benchmark.info}
    return atomic_torch_save(payload, path, overwrite=overwrite)


def read_benchmark(path: str | os.PathLike[str]) -> Benchmark:
    """Read a file written by :func:`save_benchmark` (``weights_only``: executes no code)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _CACHE_FORMAT:
        raise ValueError(f"{path} is not an mtunlearn_ext benchmark file ({_CACHE_FORMAT})")
    return _from_dict(payload)


#: Benchmarks of the user's own: name -> ``builder(seed=, size=, data_root=) -> Benchmark``.
_REGISTERED: dict[str, Callable[..., Benchmark]] = {}


BuilderT = TypeVar("BuilderT", bound=Callable[..., Benchmark])


@overload
def register_benchmark(name: str, builder: None = ...) -> Callable[[BuilderT], BuilderT]: ...
@overload
def register_benchmark(name: str, builder: BuilderT) -> BuilderT: ...


def register_benchmark(name: str, builder: Callable[..., Benchmark] | None = None) -> Any:
    """Make ``load_benchmark(name, seed=, size=, data_root=)`` build a benchmark of your own
    with ``builder(seed=seed, size=size, data_root=data_root)`` (a :class:`Benchmark` named
    ``name``), so that everything that loads benchmarks by name takes it: the experiment
    runner, checkpoints that record it, and the ``mtunlearn`` command with ``--import`` of the
    module that registers it. Also a decorator: ``@register_benchmark("toy")``.

    The builder's benchmark is not cached; its ``info`` may hold ``train_config`` (the training
    recipe, a mapping of :class:`~mtunlearn_ext.training.TrainConfig` fields) and
    ``model_config`` (``build_model``'s architecture arguments). A built-in name, or one taken
    by another builder, is refused; the same builder defined again (equal module and qualified
    name: a reloaded module) replaces its entry."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_benchmark: `name` must be an identifier-like string, got "
                         f"{name!r}")
    if name in BENCHMARKS:
        raise ValueError(f"register_benchmark: {name!r} is a built-in benchmark; choose another "
                         "name")

    def register(fn: BuilderT) -> BuilderT:
        if not callable(fn):
            raise TypeError(f"register_benchmark: `builder` must be callable, got "
                            f"{type(fn).__name__}")
        existing = _REGISTERED.get(name)
        if existing is not None and not same_definition(existing, fn):
            raise ValueError(f"register_benchmark: the name {name!r} is taken by "
                             f"{defined_name(existing)}")
        _REGISTERED[name] = fn
        return fn

    return register if builder is None else register(builder)


def registered_benchmarks() -> tuple[str, ...]:
    """The names :func:`load_benchmark` knows: the built-in ones, then the registered ones."""
    return BENCHMARKS + tuple(_REGISTERED)


def load_benchmark(name: str, *, seed: int = 0, size: Size = "small",
                   data_root: str | os.PathLike[str] | None = None,
                   cache_dir: str | os.PathLike[str] | None = None,
                   use_cache: bool = True, allow_erased: bool = False,
                   num_train: int | None = None) -> Benchmark:
    """The benchmark ``name`` (one of :data:`BENCHMARKS`) at ``size`` (see the module table).

    Args:
        name: ``"indoor"``, ``"street"``, ``"digits"``, ``"nyuv2"`` or ``"cityscapes"``.
        seed: generator seed (generated benchmarks; the split seed for ``digits``; unused by the
            real data sets, whose split is fixed).
        size: ``"tiny"``, ``"small"`` or ``"medium"``.
        data_root: the LibMTL-layout root of ``nyuv2`` / ``cityscapes`` (required for them).
        cache_dir: where generated benchmarks are cached (default :func:`default_cache_dir`).
        use_cache: read and write the cache (``False``: always generate, write nothing); a
            cache that cannot be written is warned of (``RuntimeWarning``), not an error.
        allow_erased, num_train: ``nyuv2`` / ``cityscapes`` only: read a training split whose
            removed data were erased (see :func:`mtunlearn_ext.data.libmtl.load_libmtl`).
    """
    if size not in SIZES:
        raise ValueError(f"load_benchmark: unknown size {size!r}; choose one of {SIZES}")
    number = integer_value(seed)
    if number is None or number < 0:
        raise ValueError(f"load_benchmark: `seed` must be an integer >= 0, got {seed!r}")
    seed = number
    if name in _REGISTERED:
        benchmark = _REGISTERED[name](seed=seed, size=size, data_root=data_root)
        if not isinstance(benchmark, Benchmark) or benchmark.name != name:
            got = (f"one named {benchmark.name!r}" if isinstance(benchmark, Benchmark)
                   else type(benchmark).__name__)
            raise ValueError(f"load_benchmark: the builder registered for {name!r} must return "
                             f"a Benchmark named {name!r}, got {got}")
        benchmark.info.setdefault("size_name", size)
        return benchmark
    if name == "digits":
        return _with_recipe(make_digits(seed=seed, **_DIGITS[size]), name, size)
    if name in _REAL:
        loader, sizes = _REAL[name]
        if data_root is None:
            raise ValueError(f"load_benchmark: {name!r} is real data; pass `data_root`, the "
                             f"folder holding LibMTL's preprocessed train/ and val/ folders")
        erased: dict[str, Any] = ({"allow_erased": True, "num_train": num_train}
                                  if allow_erased else {})
        return _with_recipe(loader(data_root, **sizes[size], **erased), name, size)
    if name not in _GENERATED:
        raise ValueError(f"load_benchmark: unknown benchmark {name!r}; choose one of "
                         f"{registered_benchmarks()} (one of your own: register_benchmark, and "
                         "--import its module on the command line)")
    generate, version, sizes = _GENERATED[name]
    kwargs = sizes[size]
    if not use_cache:
        return _with_recipe(generate(seed=seed, **kwargs), name, size)
    path = _cache_path(Path(cache_dir).expanduser() if cache_dir is not None
                       else default_cache_dir(), name, size, seed, version, kwargs)
    if path.is_file():
        try:
            return _with_recipe(read_benchmark(path), name, size)
        except Exception as error:  # a damaged cache file is regenerated, never trusted
            warn_at_caller(f"load_benchmark: cannot read cache file {path} ({error}); "
                           "regenerating it", MtUnlearnRuntimeWarning)
    benchmark = generate(seed=seed, **kwargs)
    try:
        save_benchmark(benchmark, path, overwrite=True)
    except OSError as error:
        # The cache only saves time: a folder that cannot be written (a read-only home, a
        # MTUNLEARN_CACHE that names no folder) failed the load of data just generated, and
        # the command line blamed --data-root, which a generated benchmark has none of.
        warn_at_caller(f"load_benchmark: cannot write cache file {path} ({error}); using the "
                       "generated data without caching it (set MTUNLEARN_CACHE to a writable "
                       "folder to keep it)", MtUnlearnRuntimeWarning)
    return _with_recipe(benchmark, name, size)


def unseen_instances(name: str, count: int, *, seed: int = 0, size: Size = "small"
                     ) -> MultiTaskDataset:
    """``count`` fresh instances of the generated benchmark ``name`` at ``size``: scenes from
    the same distribution as ``load_benchmark(name, seed=s, size=size)``'s splits, from the
    generator seed ``UNSEEN_SEED_OFFSET + seed``, so no model trained on a benchmark seed has
    seen them (the unseen pool of :func:`~mtunlearn_ext.metrics.uis_floor`). Their ids are
    ``UNSEEN_ID_OFFSET + 0 .. count - 1`` (:data:`UNSEEN_ID_OFFSET`), outside every benchmark
    split's ids, so the pool may serve as audit or held-out data of a model trained on a
    benchmark (the generator's own test ids start at 1 and would collide with the training
    ids). Not cached; the same arguments give the same tensors.
    """
    if name not in GENERATED_BENCHMARKS:
        raise ValueError(f"unseen_instances: {name!r} is not a generated benchmark; choose one "
                         f"of {GENERATED_BENCHMARKS}")
    if size not in SIZES:
        raise ValueError(f"unseen_instances: unknown size {size!r}; choose one of {SIZES}")
    number = integer_value(count)
    if number is None or number < 1:
        raise ValueError(f"unseen_instances: `count` must be a positive int, got {count!r}")
    count = number
    number = integer_value(seed)
    if number is None or not 0 <= number < UNSEEN_SEED_OFFSET:
        raise ValueError(f"unseen_instances: `seed` must be an int in [0, 2**40), got {seed!r}")
    seed = number
    generate, _, sizes = _GENERATED[name]
    # The test split of a generator seed is its own stream: one training instance is the
    # generators' minimum and changes nothing in it.
    fresh = generate(seed=UNSEEN_SEED_OFFSET + seed, num_train=1, num_test=count,
                     num_validation=0, size=sizes[size]["size"]).test
    return MultiTaskDataset(fresh.inputs, fresh.targets, fresh.tasks,
                            UNSEEN_ID_OFFSET + torch.arange(count), fresh.supervision)
