"""One unlearning experiment, end to end: ``python -m mtunlearn_ext.experiment``.

Phases (each timed): load the benchmark; build the forget request (explicit ids, or a seeded
random fraction of the training instances) and split the training set into forget and retain
pairs; train the original model on every pair (or load it from the cache); retrain from scratch
on the retain pairs with the same recipe and seed (or load it); run every requested unlearning
method on a copy of the original; evaluate every model on the forget pairs, the retain pairs and
the test set, run the membership attack on the forget pairs, and score every unlearned model with
UIS and the gap to the retrained model.

The results file is JSON (schema ``mtunlearn_ext.experiment/1``) written atomically (temporary
file, fsync, rename). Checkpoints of the original and retrained models are cached under
``cache_dir``, keyed by benchmark, size, seed, a fingerprint of the training data (with what
each custom task loss computes: :func:`loss_identity`), the model's architecture and initial
weights, the recipe, the thread count and the device (and, for the retrained model, the
request), so several methods can be compared without retraining. A cache entry is verified
when read (the hash of its weights, stored in the file) and rebuilt if corrupt; it is written
once, by the first process that trains it (the others use that file), and holds no wall time
(that goes to a ``.time.json`` file beside it), so its bytes are a function of the key. Models
of a custom loss that cannot be identified are not cached. Everything is a function of the
seed: the forget ids, the training runs, the unlearning runs and the attack's data halving.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mtunlearn_ext._errors import UserInputError
from mtunlearn_ext._fields import check_field_types
from mtunlearn_ext._io import json_safe, json_sha256, write_text_atomic
from mtunlearn_ext._progress import within
from mtunlearn_ext._random import MAX_RUN_SEED, forked_generators, seed_generators
from mtunlearn_ext._text import display_width, pad_to, visible_controls
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, warn_at_caller
from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.fingerprint import dataset_fingerprint, loss_identity, loss_problems
from mtunlearn_ext.data.request import REQUEST_TYPES, ForgetRequest, RequestType, build_request
from mtunlearn_ext.metrics import evaluate, membership_attack, retrain_gap, uis, uis_terms
from mtunlearn_ext.metrics.membership import ATTACKS, MembershipAttack, attackable_instances
from mtunlearn_ext.metrics.scores import uis_term_defined
from mtunlearn_ext.models import MultiTaskModel, build_model
from mtunlearn_ext.records import code_version, run_environment
from mtunlearn_ext.training import (
    Checkpoint,
    CheckpointError,
    TrainConfig,
    cpu_threads,
    load_checkpoint,
    recipe_from_mapping,
    save_checkpoint,
    state_dict_sha256,
    train,
)
from mtunlearn_ext.unlearning import (
    BASELINES,
    UnlearningProblem,
    available_unlearners,
    get_unlearner,
)
from mtunlearn_ext.unlearning.registry import method_source
from mtunlearn_ext.workflow import add_import_option, imported_or_exit, parse_ids

if TYPE_CHECKING:
    from mtunlearn_ext.data.registry import Size

__all__ = [
    "ExperimentConfig",
    "ExperimentData",
    "PreparedExperiment",
    "ReferenceModel",
    "build_request",
    "experiment_threads",
    "format_table",
    "loss_identity",
    "main",
    "prepare_experiment",
    "run_experiment",
    "train_reference_model",
    "write_json_atomic",
]

SCHEMA = "mtunlearn_ext.experiment/1"

#: The two models an experiment trains (:func:`train_reference_model`).
ReferenceModel = Literal["original", "retrained"]

#: The metric shown per task kind in the printed table (the JSON holds every metric).
PRIMARY_METRIC: dict[str, str] = {
    "classification": "accuracy",
    "segmentation": "miou",
    "depth": "delta_1.25",
    "normals": "within_30",
    "regression": "mse",
    "binary": "accuracy",
}

SPLITS = ("forget", "retain", "test")


@dataclass
class ExperimentConfig:
    """Everything that defines an experiment (the CLI fills it from its arguments).

    Attributes:
        benchmark, size, data_root: passed to ``load_benchmark``.
        request: ``"full"`` or ``"partial"``.
        forget_fraction: share of training instances to forget (ignored with ``forget_ids``).
        forget_ids: explicit instance ids to forget.
        target_tasks: the target tasks of a partial request (default: the first task).
        methods: unlearning methods to run (registry names).
        method_configs: method -> settings overriding its defaults.
        seed: seeds the data, the forget ids, training, retraining and every method.
        output: path of the JSON results file.
        cache_dir: where original/retrained checkpoints are cached.
        device: ``"cpu"`` or ``"cuda"``.
        train_overrides: fields of the benchmark's training recipe to override (e.g. epochs).
        eval_batch_size: batch size of evaluation.
        mia_attack: ``"logistic"`` or ``"loss"`` (see :mod:`mtunlearn_ext.metrics.membership`).
        progress: show training progress bars.
        threads: torch intra-op threads for the run (``None``: leave torch's setting). On a
            shared small machine one thread can be several times faster for these models.
    """

    benchmark: str = "indoor"
    size: Size = "small"
    data_root: str | None = None
    request: RequestType = "full"
    forget_fraction: float = 0.1
    forget_ids: list[int] | None = None
    target_tasks: list[str] | None = None
    methods: list[str] = field(default_factory=lambda: list(BASELINES))
    method_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    output: str = "runs/experiment.json"
    cache_dir: str = ".cache/mtunlearn"
    device: str = "cpu"
    train_overrides: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 64
    mia_attack: MembershipAttack = "logistic"
    progress: bool = False
    threads: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` naming the first field that is out of range
        or of the wrong type."""
        check_field_types(self)
        if self.request not in REQUEST_TYPES:
            raise ValueError(f"ExperimentConfig: `request` must be 'full' or 'partial', got "
                             f"{self.request!r}")
        if self.forget_ids is None and not 0.0 < self.forget_fraction < 1.0:
            raise ValueError(f"ExperimentConfig: `forget_fraction` must be in (0, 1), got "
                             f"{self.forget_fraction}")
        unknown = [m for m in self.methods if m not in available_unlearners()]
        if unknown:
            raise ValueError(f"ExperimentConfig: unknown methods {unknown}; available: "
                             f"{available_unlearners()} (a method of your own: register it "
                             "with @register_unlearner at the top level of a module, and pass "
                             "--import MODULE)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"ExperimentConfig: duplicate methods in {self.methods}")
        stray = sorted(set(self.method_configs) - set(self.methods))
        if stray:
            raise ValueError(f"ExperimentConfig: settings given for methods not run: {stray}")
        if self.mia_attack not in ATTACKS:
            raise ValueError(f"ExperimentConfig: `mia_attack` must be 'logistic' or 'loss', got "
                             f"{self.mia_attack!r}")
        if self.eval_batch_size < 1:
            raise ValueError("ExperimentConfig: `eval_batch_size` must be >= 1")
        if self.seed < 0:
            raise ValueError(f"ExperimentConfig: `seed` must be >= 0, got {self.seed}")
        # The commands' --seed range: the seed feeds the generators `train` and `unlearn`
        # seed (load_benchmark, default_recipe, build_model), so a run here can be repeated
        # there; digits' split (scikit-learn) takes 32 bits.
        if self.seed > MAX_RUN_SEED:
            raise ValueError(f"ExperimentConfig: `seed` must be in [0, 2**32-1] (numpy/"
                             f"scikit-learn seeds are 32-bit), got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"ExperimentConfig: `threads` must be >= 1, got {self.threads}")


# -- caching ---------------------------------------------------------------------------------


#: Problems already warned about in this process (each warning once).
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warn_at_caller(message, MtUnlearnRuntimeWarning)


def _timing_path(path: Path) -> Path:
    """The file beside a cached checkpoint holding the wall time of the run that wrote it
    (kept out of the checkpoint, whose bytes are then a function of the recipe alone)."""
    return path.with_name(path.stem + ".time.json")


def _recorded_seconds(path: Path, sha: str) -> float | None:
    """The training time recorded beside ``path`` for the checkpoint of SHA-256 ``sha``."""
    try:
        record = json.loads(_timing_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("checkpoint_sha256") != sha:
        return None
    seconds = record.get("train_seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def _read_entry(path: Path, meta: Mapping[str, Any],
                model: MultiTaskModel) -> tuple[Checkpoint | None, str | None]:
    """The verified checkpoint at ``path`` loaded into ``model`` if it is this entry's, else
    ``None`` and why (``None`` for a missing file)."""
    if not path.is_file():
        return None, None
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        return None, f"unreadable or corrupt checkpoint ({error})"
    if checkpoint.state_sha256 is None:
        return None, "checkpoint without a weights hash (an older version wrote it)"
    if checkpoint.meta.get("key") != meta["key"]:
        return None, "cache key differs"
    try:
        model.load_state_dict(checkpoint.state_dict)
    except RuntimeError as error:
        return None, f"weights do not fit the model ({str(error).splitlines()[0]})"
    return checkpoint, None


def _remove_if_unchanged(path: Path, seen: os.stat_result | None) -> None:
    """Remove the bad cache entry ``path`` unless another process replaced it since it was
    read (then the new file is left to the next reader)."""
    if seen is None:
        return
    try:
        now = os.stat(path)
        if (now.st_ino, now.st_size, now.st_mtime_ns) == (seen.st_ino, seen.st_size,
                                                          seen.st_mtime_ns):
            path.unlink()
    except FileNotFoundError:
        pass


def _train_cached(path: Path | None, meta: dict[str, Any],
                  factory: Callable[[], MultiTaskModel], dataset: MultiTaskDataset,
                  recipe: TrainConfig, device: str,
                  progress: bool) -> tuple[MultiTaskModel, dict[str, Any]]:
    """Load the model at ``path`` if it is a verified checkpoint of this entry (``meta["key"]``,
    weights matching the hash recorded in the file), else train it and save it there.

    An unreadable, corrupt, foreign or old entry is warned about, removed and rebuilt. The
    entry is written only if it is still new: when another process filled it meanwhile, its
    file (verified) is the one used, so the record always names the checkpoint on disk.
    ``path=None``: train, do not cache. Returns the model and a record (``cached``,
    ``train_seconds`` of the run that produced it, ``checkpoint``, ``sha256`` of the file,
    ``state_sha256`` of the weights, ``train_steps``).
    """
    model = factory()
    if path is not None:
        try:
            seen: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            seen = None
        checkpoint, problem = _read_entry(path, meta, model)
        if checkpoint is not None:
            return model.to(device), {
                "cached": True, "checkpoint": str(path), "sha256": checkpoint.sha256,
                "state_sha256": checkpoint.state_sha256,
                "train_seconds": _recorded_seconds(path, checkpoint.sha256),
                "train_steps": checkpoint.meta.get("train_steps")}
        if problem is not None:
            warn_at_caller(f"{path}: {problem}; retraining", MtUnlearnRuntimeWarning)
            _remove_if_unchanged(path, seen)
        model = factory()  # a failed load may have written part of the weights
    model = model.to(device)
    result = train(model, dataset, None, recipe, progress=progress)
    record = {"cached": False, "checkpoint": None, "sha256": None,
              "state_sha256": state_dict_sha256(model), "train_seconds": result.seconds,
              "train_steps": result.steps}
    if path is None:
        return model, record
    # No wall time in the file: the same entry is the same bytes whichever run writes it.
    file_meta = {**meta, "train_steps": result.steps, "final_loss": result.final_loss}
    try:
        sha = save_checkpoint(path, model, file_meta)
    except FileExistsError:
        # Another process wrote the entry while this one trained: use its file, so that this
        # run's record names the weights on disk.
        winner = factory()
        checkpoint, problem = _read_entry(path, meta, winner)
        if checkpoint is None:
            warn_at_caller(f"{path}: written by another process meanwhile, but unusable "
                           f"({problem}); this run's model is used, not cached",
                           MtUnlearnRuntimeWarning)
            return model, record
        if checkpoint.state_sha256 != record["state_sha256"]:
            warn_at_caller(f"{path}: another process wrote different weights for this entry "
                           "meanwhile (training is not reproducible here?); using its file",
                           MtUnlearnRuntimeWarning)
        return winner.to(device), {**record, "checkpoint": str(path),
                                   "sha256": checkpoint.sha256,
                                   "state_sha256": checkpoint.state_sha256}
    write_text_atomic(_timing_path(path), json.dumps({"checkpoint_sha256": sha,
                                                      "train_seconds": result.seconds}) + "\n")
    return model, {**record, "checkpoint": str(path), "sha256": sha}


# -- evaluation --------------------------------------------------------------------------------


def _evaluate_model(model: nn.Module, splits: Mapping[str, MultiTaskDataset],
                    target_tasks: Sequence[str], config: ExperimentConfig,
                    test: MultiTaskDataset, retain: MultiTaskDataset,
                    forget: MultiTaskDataset) -> dict[str, Any]:
    """Metrics on every split and the membership attack on the forget pairs."""
    metrics = {name: evaluate(model, ds, None, config.eval_batch_size)  # type: ignore[arg-type]
               for name, ds in splits.items()}
    attack = membership_attack(model, retain, test, forget, list(target_tasks),  # type: ignore[arg-type]
                               batch_size=config.eval_batch_size,
                               attack=config.mia_attack, seed=config.seed)
    return {"metrics": metrics, "mia_auc": attack.auc,
            "mia": dataclasses.asdict(attack) | {"tasks": list(attack.tasks)}}


def _scores(entry: Mapping[str, Any], original: Mapping[str, Any],
            retrained: Mapping[str, Any], target_tasks: Sequence[str]) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined ratios are dropped by design
        return {
            "uis": uis(original["metrics"]["test"], entry["metrics"]["test"],
                       entry["metrics"]["forget"], tasks=list(target_tasks)),
            "uis_terms": uis_terms(original["metrics"]["test"], entry["metrics"]["test"],
                                   entry["metrics"]["forget"], tasks=list(target_tasks)),
            "retrain_gap": retrain_gap(entry["metrics"], retrained["metrics"], entry["mia_auc"],
                                       retrained["mia_auc"]),
        }


def _undefined_uis_terms(original_test: Mapping[str, Mapping[str, Any]],
                         target_tasks: Sequence[str]) -> list[str]:
    """``task/metric (O_t=value)`` of every UIS term that :func:`uis_terms` skips: the
    original model's test score is 0 or not finite, the same for every model scored."""
    left_out = []
    for task in target_tasks:
        for metric, value in original_test.get(task, {}).items():
            number = float(value)
            if not uis_term_defined(number):
                left_out.append(f"{task}/{metric} (O_t={number:g})")
    return left_out


# -- the experiment ----------------------------------------------------------------------------


def _load_benchmark(config: ExperimentConfig) -> Benchmark:
    from mtunlearn_ext.data.registry import load_benchmark

    return load_benchmark(config.benchmark, seed=config.seed, size=config.size,
                          data_root=config.data_root)


def default_recipe(benchmark: Benchmark, seed: int,
                   overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The benchmark's training recipe (``benchmark.info["train_config"]`` when the data module
    provides one, else :class:`TrainConfig` defaults), seeded, with ``overrides`` applied.

    ``overrides`` may not hold a ``seed`` other than ``seed`` (``ValueError``): the recipe's
    seed is always ``seed``, the run's own (the commands' ``--seed``), so an override of it
    would be silently ignored. The same value passes: a checkpoint's stored recipe, which
    holds its seed, can be given back as ``--train`` with that ``--seed``.
    """
    if overrides and "seed" in overrides and overrides["seed"] != seed:
        raise ValueError(f"seed ({overrides['seed']!r}) is not a recipe override: the "
                         "training seed is the run's seed; use --seed")
    base = benchmark.info.get("train_config")
    values: dict[str, Any] = {}
    if isinstance(base, TrainConfig):
        values = base.to_dict()
    elif isinstance(base, Mapping):
        values = dict(base)
    values.update(overrides or {})
    values["seed"] = seed
    return recipe_from_mapping(values, "the training recipe")


@dataclass
class ExperimentData:
    """An experiment's data, forget request, forget/retain split and training recipe."""

    benchmark: Benchmark
    request: ForgetRequest
    forget: MultiTaskDataset
    retain: MultiTaskDataset
    target_tasks: list[str]
    recipe: TrainConfig
    factory: Callable[[], MultiTaskModel]
    data_key: str


@dataclass
class PreparedExperiment(ExperimentData):
    """Everything before the unlearning methods: the :class:`ExperimentData` plus the original
    and retrained models (trained or loaded from the cache), with the time of each phase."""

    original: MultiTaskModel
    original_record: dict[str, Any]
    retrained: MultiTaskModel
    retrained_record: dict[str, Any]
    phases: dict[str, float] = field(default_factory=dict)

    def problem(self, config: ExperimentConfig) -> UnlearningProblem:
        """The unlearning problem every method receives."""
        return UnlearningProblem(model=self.original, tasks=list(self.benchmark.train.tasks),
                                 forget=self.forget, retain=self.retain, request=self.request,
                                 target_tasks=self.target_tasks, device=config.device,
                                 seed=config.seed, train_config=self.recipe,
                                 model_factory=self.factory, held_out=self.benchmark.validation)


@dataclass
class _Setup:
    """The experiment's data and where (and under which key) its two models are cached (the
    path is ``None`` where they are not cached: a custom loss that cannot be identified)."""

    data: ExperimentData
    checkpoints: dict[str, tuple[Path | None, dict[str, Any], MultiTaskDataset]]
    phases: dict[str, float]


@contextmanager
def experiment_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with ``num_threads`` torch intra-op threads (``ExperimentConfig.threads``;
    ``None``: torch's setting as it is), then restore the count it had before. Every
    experiment function runs its work under it; ``with experiment_threads(config.threads):``
    runs calls of your own with the experiment's thread count (a torch kernel's result may
    depend on it)."""
    with cpu_threads(num_threads):
        yield


def _callers_random_state_kept(config: ExperimentConfig) -> AbstractContextManager[None]:
    """Run a block whose draws from torch's global generators :func:`_setup` seeds with
    ``config.seed`` (the numbers depend on the seed alone), and give the caller's generators
    back after it: an experiment must not restart the caller's own random stream. Only the
    generators a run on ``config.device`` draws from are seeded, and those are restored."""
    return forked_generators(config.device)


def _setup(config: ExperimentConfig, benchmark: Benchmark | None) -> _Setup:
    """The experiment's data, request and cache entries. Call it under
    :func:`experiment_threads` (the key holds ``config.threads``, else the current count)
    and :func:`_callers_random_state_kept` (it seeds torch's global generators)."""
    config.validate()
    phases: dict[str, float] = {}
    seed_generators(config.seed, config.device)

    start = time.perf_counter()
    bench = benchmark if benchmark is not None else _load_benchmark(config)
    if bench.name != config.benchmark:
        raise ValueError(f"ExperimentConfig: `benchmark` is {config.benchmark!r} but the "
                         f"benchmark passed is {bench.name!r}; set config.benchmark to its name "
                         "(the results record it)")
    train_set = bench.train
    _check_validation_unseen(bench)
    _check_held_out_settings(config, bench)
    phases["load_data"] = time.perf_counter() - start

    start = time.perf_counter()
    request = build_request(train_set, config.request, config.seed, config.forget_fraction,
                            config.forget_ids, config.target_tasks)
    forget, retain = request.split(train_set)
    target_tasks = request.resolved_tasks(train_set)
    if attackable_instances(forget, target_tasks) == 0:
        # Checked here, not by the attack after both models have trained.
        raise ValueError(f"ExperimentConfig: no forget instance has a label of every target "
                         f"task {list(target_tasks)}, and the membership attack scores only "
                         "such instances; name some that do in `forget_ids`")
    phases["split"] = time.perf_counter() - start

    recipe = default_recipe(bench, config.seed, config.train_overrides)

    def factory() -> MultiTaskModel:
        return build_model(bench, seed=config.seed)

    data_key = dataset_fingerprint(train_set)
    initial = factory()
    # The architecture as printed by torch, and the initial weights (the seed, the depth
    # prior, the initialisation code): two models that start apart are two entries.
    model_key = {"architecture": json_sha256(repr(initial)), "init": state_dict_sha256(initial)}
    # The intra-op thread count and the device change the trained weights (the order of float
    # sums) and the recorded training time: a model trained otherwise is another model.
    # So do the torch build and the CPU instruction sets (the rounding of its kernels): a
    # model trained under AVX-512 was reused by a run under AVX2, whose results then recorded
    # AVX2 beside another machine's models. The training code is keyed by what it says (the
    # package version stayed 0.1.0 through 32 commits to training.py, and a run at a new
    # commit reused models the old code had trained; reproducibility audit).
    threads = config.threads if config.threads is not None else torch.get_num_threads()
    environment = run_environment(threads)
    base_key = {"benchmark": bench.name, "size": config.size, "seed": config.seed,
                "data": data_key, "model": model_key, "recipe": recipe.to_dict(),
                "threads": threads, "device": torch.device(config.device).type,
                "torch": environment["torch"], "cpu_isa": environment["cpu_isa"],
                "extension": environment["extension"], "package": _package_version(),
                "training_code": _training_code_digest()}
    request_key = {"ids": request.ids_hash(), "target_tasks": sorted(target_tasks)}
    cache = Path(config.cache_dir) / f"{bench.name}-{config.size}-seed{config.seed}"
    original_key = json_sha256(base_key)
    retrain_key = json_sha256({**base_key, "request": request_key})
    problems = loss_problems(train_set.tasks)
    if problems:
        # A loss whose behaviour cannot be told apart from another's of the same name would
        # share their entry: train, but neither read nor write the cache.
        _warn_once(f"{bench.name}: the models are not cached (trained on every run): a custom "
                   f"loss cannot be identified reliably, so a cached model could be another "
                   f"loss's; {'; '.join(problems)}")
    checkpoints: dict[str, tuple[Path | None, dict[str, Any], MultiTaskDataset]] = {
        "original": (None if problems else cache / f"original-{original_key[:16]}.pt",
                     {"key": original_key, **base_key}, train_set),
        "retrained": (None if problems else cache / f"retrain-{retrain_key[:16]}.pt",
                      {"key": retrain_key, **base_key, "request": request_key}, retain),
    }
    data = ExperimentData(bench, request, forget, retain, target_tasks, recipe, factory, data_key)
    return _Setup(data, checkpoints, phases)


def _check_held_out_settings(config: ExperimentConfig, bench: Benchmark) -> None:
    """A method set to take its forget caps from held-out instances (``cap_reference=
    'held_out'``) reads the benchmark's validation split, every problem's held-out set: on a
    benchmark without one it is refused here, before any model is trained (the method refused
    it only after the trainings, as a traceback from a worker)."""
    if bench.validation is not None:
        return
    for method in config.methods:
        config_of = getattr(get_unlearner(method, config.method_configs.get(method) or {}),
                            "config", None)
        if (getattr(config_of, "cap_reference", None) == "held_out"
                and getattr(config_of, "cap_quantile", None) is not None):
            raise ValueError(
                f"ExperimentConfig: {method}'s settings take its forget caps from held-out "
                f"instances (cap_reference='held_out'), but benchmark {bench.name!r} has no "
                "validation split to give them (indoor and street have one); set "
                "cap_reference to 'auto' or 'retain' in its method_configs")


def _check_validation_unseen(bench: Benchmark) -> None:
    """The validation split becomes every problem's held-out set, whose instances must be
    unseen: ids shared with the training split are refused here, before any model is trained
    (the problem refused them only at the first method, naming a set the user never passed)."""
    if bench.validation is None:
        return
    shared = sorted(set(bench.validation.ids.tolist()) & set(bench.train.ids.tolist()))
    if shared:
        raise ValueError(f"{bench.name}: the validation split shares {len(shared)} instance ids "
                         f"with the training split (first: {shared[:5]}); it becomes the "
                         "unlearning problems' held-out set of unseen instances, so give it ids "
                         "of its own (e.g. offset them past the training ids: ids=... in "
                         "MultiTaskDataset)")


def _reference_model(setup: _Setup, which: ReferenceModel, config: ExperimentConfig
                     ) -> tuple[MultiTaskModel, dict[str, Any]]:
    path, meta, dataset = setup.checkpoints[which]
    start = time.perf_counter()
    with experiment_threads(config.threads):
        result = _train_cached(path, meta, setup.data.factory, dataset, setup.data.recipe,
                               config.device, config.progress)
    setup.phases[f"{which}_model"] = time.perf_counter() - start
    return result


def train_reference_model(config: ExperimentConfig, which: ReferenceModel,
                          benchmark: Benchmark | None = None) -> dict[str, Any]:
    """Train (or find in the cache) only the ``"original"`` or the ``"retrained"`` model of
    ``config``'s experiment, so that both can be trained in parallel processes before
    :func:`run_experiment` loads them. Returns the model's cache record. The thread count is
    ``config.threads`` meanwhile, and restored after, as is the caller's random state."""
    if which not in ("original", "retrained"):
        raise ValueError(f"train_reference_model: `which` must be 'original' or 'retrained', "
                         f"got {which!r}")
    with experiment_threads(config.threads), _callers_random_state_kept(config):
        _, record = _reference_model(_setup(config, benchmark), which, config)
    return record


def _package_version() -> str:
    from mtunlearn_ext import __version__

    return __version__


#: The code that decides a reference model's weights (beside the model's own, which the key
#: holds as its architecture and initial weights): files and folders of the package.
_TRAINING_CODE: tuple[str, ...] = ("training.py", "losses.py", "_random.py", "data", "models")


def _source_digest(root: Path, names: Sequence[str]) -> str:
    """SHA-256 over the syntax trees of the ``.py`` files named (folders: every file in them)
    under ``root``: a change of code changes it, one of comments or layout does not."""
    import ast

    paths = sorted(path for name in names
                   for path in ((root / name).rglob("*.py") if (root / name).is_dir()
                                else [root / name]))
    digest = hashlib.sha256()
    for path in paths:
        tree = ast.dump(ast.parse(path.read_text(encoding="utf-8")))
        digest.update(f"{path.relative_to(root).as_posix()}\0{tree}\0".encode())
    return digest.hexdigest()


@functools.cache
def _training_code_digest() -> str:
    # Once per process, as the code it runs was imported once.
    return _source_digest(Path(__file__).resolve().parent, _TRAINING_CODE)


def prepare_experiment(config: ExperimentConfig,
                       benchmark: Benchmark | None = None) -> PreparedExperiment:
    """Load the data, build and split the request, and get the original and retrained models
    (from the cache when their keys match). ``benchmark`` may be passed directly (a benchmark
    of your own, which has no name to load it by: ``config.benchmark`` must be its name).

    The thread count is ``config.threads`` meanwhile and restored on return: a caller that
    goes on to unlearn or evaluate at that count runs its work under
    :func:`experiment_threads` itself (:func:`run_experiment` does). The caller's random
    state is restored on return too (the models depend on ``config.seed`` alone)."""
    with experiment_threads(config.threads), _callers_random_state_kept(config):
        return _prepare(config, benchmark)


def _prepare(config: ExperimentConfig, benchmark: Benchmark | None) -> PreparedExperiment:
    # prepare_experiment's work, leaving torch's generators as _setup seeded them:
    # run_experiment goes on from there (as it always did) and restores the caller's state.
    # Both callers hold experiment_threads(config.threads) around it.
    setup = _setup(config, benchmark)
    original, original_record = _reference_model(setup, "original", config)
    retrained, retrained_record = _reference_model(setup, "retrained", config)
    data = {f.name: getattr(setup.data, f.name) for f in dataclasses.fields(ExperimentData)}
    return PreparedExperiment(**data, original=original, original_record=original_record,
                              retrained=retrained, retrained_record=retrained_record,
                              phases=setup.phases)


def run_experiment(config: ExperimentConfig, benchmark: Benchmark | None = None, *,
                   on_unlearned: Callable[[str, nn.Module], None] | None = None
                   ) -> dict[str, Any]:
    """Run the experiment, write the JSON results file, and return its content.

    ``benchmark`` may be passed directly (a benchmark of your own; ``config.benchmark`` must be
    its name, which the results record); otherwise it is loaded by name. The whole run
    uses ``config.threads`` intra-op threads; the count is restored on return, and so is the
    caller's random state (the numbers depend on ``config.seed`` alone).

    ``on_unlearned(method, model)``: called with each method's unlearned model as soon as
    its run ends, before its evaluation (which must not change it: copy what you keep), so
    that a caller who wants the weights (the demo's sample plot) need not run the method
    again.
    """
    with experiment_threads(config.threads), _callers_random_state_kept(config):
        return _run_experiment(config, benchmark, on_unlearned)


def _run_experiment(config: ExperimentConfig, benchmark: Benchmark | None,
                    on_unlearned: Callable[[str, nn.Module], None] | None = None
                    ) -> dict[str, Any]:
    code = code_version()  # the code this run imported and runs: read before the work
    # Methods of one's own (plugins): which class and file, as the code version names the
    # library's; read before the work too (a file edited during the run is not this run's).
    sources = {m: source for m in config.methods if (source := method_source(m)) is not None}
    prepared = _prepare(config, benchmark)
    bench, request, forget, retain = (prepared.benchmark, prepared.request, prepared.forget,
                                      prepared.retain)
    train_set, test_set = bench.train, bench.test
    tasks: list[TaskSpec] = list(train_set.tasks)
    target_tasks, recipe, data_key = prepared.target_tasks, prepared.recipe, prepared.data_key
    original, original_record = prepared.original, prepared.original_record
    retrained, retrained_record = prepared.retrained, prepared.retrained_record
    phases = dict(prepared.phases)

    splits = {"forget": forget, "retain": retain, "test": test_set}
    models: dict[str, dict[str, Any]] = {}
    model: nn.Module  # a reference model, then the reused gold model or each method's output
    # Progress (the demo's bar): an equal share for each model evaluated, a method's share
    # covering its unlearning run and its evaluation.
    share = 1.0 / (2 + len(config.methods))
    for index, (label, model, record) in enumerate((("original", original, original_record),
                                                    ("retrained", retrained, retrained_record))):
        start = time.perf_counter()
        with within(index * share, (index + 1) * share):
            entry = _evaluate_model(model, splits, target_tasks, config, test_set, retain,
                                    forget)
        entry.update(record)
        entry["eval_seconds"] = time.perf_counter() - start
        phases[f"evaluate/{label}"] = entry["eval_seconds"]
        models[label] = entry
    models["retrained"]["wall_time_s"] = retrained_record["train_seconds"]
    # Reference rows: the gold model's own UIS, and the untouched original's UIS and gap (the
    # "do nothing" baseline every method must beat).
    uis_left_out = _undefined_uis_terms(models["original"]["metrics"]["test"], target_tasks)
    if uis_left_out:
        # One warning for the run (the scores below would repeat it for every model).
        warn_at_caller(f"UIS leaves out {', '.join(uis_left_out)}: the original model's test "
                       "score is 0 or not finite there, so the relative change is undefined; "
                       "every model's UIS is over the other terms (the results' "
                       "`uis_left_out` lists them)", MtUnlearnRuntimeWarning)
    models["retrained"]["uis"] = _scores(models["retrained"], models["original"],
                                         models["retrained"], target_tasks)["uis"]
    models["original"].update(_scores(models["original"], models["original"],
                                      models["retrained"], target_tasks))

    problem = prepared.problem(config)
    for index, method in enumerate(config.methods, start=2):
        settings = dict(config.method_configs.get(method, {}))
        unlearner = get_unlearner(method, settings)
        with within(index * share, (index + 1) * share):
            diverged: str | None = None  # why a method stopped on a non-finite value
            if method == "retrain" and not settings:
                # The gold model is this method's output: reuse it (the report keeps the time the
                # training run took) instead of training the identical model twice.
                model, wall, report = retrained, float(retrained_record["train_seconds"] or 0.0), {
                    "method": "retrain", "config": unlearner.config.to_dict(),
                    "wall_time_s": float(retrained_record["train_seconds"] or 0.0),
                    "reused_retrained_checkpoint": True}
            else:
                start = time.perf_counter()
                try:
                    with within(0.0, 0.8):  # the rest of the share: its evaluation
                        result = unlearner.unlearn(problem)
                    model, report = result.model, result.report.to_dict()
                except FloatingPointError as error:
                    # A method's own check stopped it inside a step: the same outcome as a run
                    # that returned NaN weights, scored so (null UIS, infinite gap), not a crash
                    # that lost every other method's result.
                    diverged = str(error)
                    model, report = _diverged_model(problem.model), {"diverged": diverged}
                wall = time.perf_counter() - start
            phases[f"unlearn/{method}"] = wall
            if on_unlearned is not None:
                on_unlearned(method, model)
            start = time.perf_counter()
            entry = _evaluate_model(model, splits, target_tasks, config, test_set, retain, forget)
            entry.update(_scores(entry, models["original"], models["retrained"], target_tasks))
            entry["wall_time_s"] = wall
            entry["eval_seconds"] = time.perf_counter() - start
            entry["report"] = report
            if diverged is not None:
                entry["diverged"] = diverged
            phases[f"evaluate/{method}"] = entry["eval_seconds"]
            models[method] = entry

    results = {
        "schema": SCHEMA,
        "config": dataclasses.asdict(config),
        "environment": _environment(config.device),
        "code": code,  # which commit to check out to rerun the experiment
        "method_sources": sources,
        "benchmark": {
            "name": bench.name, "size": config.size, "num_train": len(train_set),
            "num_test": len(test_set),
            "tasks": [t.describe() for t in tasks],
            "data_sha256": data_key,
        },
        "recipe": recipe.to_dict(),
        "request": {
            "type": config.request, "target_tasks": target_tasks,
            "non_target_tasks": [t for t in train_set.task_names if t not in target_tasks],
            "num_forget_instances": len(request.instance_ids),
            "num_forget_pairs": int(forget.supervision.sum()),
            "num_retain_instances": len(retain), "num_retain_pairs": int(retain.supervision.sum()),
            "ids_sha256": request.ids_hash(), "forget_ids": list(request.instance_ids),
        },
        "phases_seconds": phases,
        "uis_left_out": uis_left_out,
        "models": models,
    }
    results = json_safe(results)
    write_json_atomic(config.output, results)
    return results


def _diverged_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every floating parameter NaN: what a method that stopped on
    a non-finite value leaves to score, evaluated as a run that returned NaN weights is."""
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.parameters():
            if p.is_floating_point():
                p.fill_(math.nan)
    return broken


def _environment(device: str) -> dict[str, Any]:
    return {**run_environment(torch.get_num_threads()), "device": device}


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (:func:`write_text_atomic`): readers
    see the old file or the whole new one, never a part."""
    write_text_atomic(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


# -- the table -----------------------------------------------------------------------------------


def format_table(results: Mapping[str, Any]) -> str:
    """A plain-text, aligned comparison table of every model in ``results``.

    Columns: each task's primary metric (:data:`PRIMARY_METRIC`) on the forget pairs (target
    tasks only), the retain pairs and the test set; the attack AUC; UIS and the retrain gap
    (unlearned models); the unlearning wall time.
    """
    tasks = results["benchmark"]["tasks"]
    targets = set(results["request"]["target_tasks"])
    columns: list[tuple[str, Callable[[Mapping[str, Any]], Any]]] = []
    for split in SPLITS:
        for spec in tasks:
            if split == "forget" and spec["name"] not in targets:
                continue
            metric = PRIMARY_METRIC[spec["kind"]]

            def getter(entry: Mapping[str, Any], s: str = split, t: str = spec["name"],
                       m: str = metric) -> Any:
                return entry["metrics"].get(s, {}).get(t, {}).get(m)

            columns.append((f"{split[0].upper()}:{spec['name']}.{metric}", getter))
    columns += [("MIA", lambda e: e.get("mia_auc")), ("UIS", lambda e: e.get("uis")),
                ("gap", lambda e: e.get("retrain_gap")),
                ("time_s", lambda e: e.get("wall_time_s"))]
    # A name's control characters as escapes: the table is printed and put in reports.
    header = ["model"] + [visible_controls(name) for name, _ in columns]
    rows = [header]
    for label, entry in results["models"].items():
        row = [visible_controls(str(label))]
        for name, get in columns:
            value = get(entry)
            if value is None:
                row.append("-")
            elif name in ("UIS", "gap", "time_s"):
                row.append(f"{value:.2f}")
            else:
                row.append(f"{value:.4f}")
        rows.append(row)
    # Aligned by terminal columns: a CJK task or model name takes two a character.
    widths = [max(display_width(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(pad_to(c, w, right=i > 0) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    left_out = results.get("uis_left_out") or []
    legend_left_out = (f" UIS leaves out {', '.join(left_out)}: the original's test score is "
                       "0 or not finite there." if left_out else "")
    legend = ("F/R/T: forget pairs / retain pairs / test; MIA: attack AUC on the forget pairs "
              "(compare with 'retrained'); UIS, gap: x100, lower is better; time_s: unlearning "
              "(retrain: its training run) wall time; -: none (not measured, or not a finite "
              "number: a model that diverged)." + legend_left_out)
    return "\n".join(lines) + "\n" + legend


# -- CLI -------------------------------------------------------------------------------------------


def _parse_ids(text: str) -> list[int]:
    # The mtunlearn command's reading of ids (ASCII digits, id files with a BOM or '#'
    # comments), in argparse's words.
    try:
        return parse_ids(text, "--forget-ids") or []
    except UserInputError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--forget-ids: ")) from None


def _parse_json_object(text: str, what: str) -> dict[str, Any]:
    path = Path(text)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{what} must be a JSON object or a file holding one: "
                                         f"{error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtunlearn_ext.experiment",
        description="Run one multi-task unlearning experiment and write a JSON results file.")
    parser.add_argument("--benchmark", default="indoor", help="benchmark name (load_benchmark)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    add_import_option(parser)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--request", default="full", choices=["full", "partial"])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--forget-fraction", type=float, default=0.1,
                       help="share of training instances to forget (seeded)")
    group.add_argument("--forget-ids", type=_parse_ids, default=None,
                       help="instance ids, comma/space separated, or a file holding them")
    parser.add_argument("--target-tasks", default=None,
                        help="comma-separated target tasks of a partial request (default: first)")
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated methods, or 'all' for every baseline "
                             f"({','.join(BASELINES)}; the interference-aware method and its "
                             "ablations by name, e.g. 'all,interference_aware')")
    parser.add_argument("--method-config", type=lambda s: _parse_json_object(s, "--method-config"),
                        default={}, help='JSON {"method": {"setting": value}} or a file')
    parser.add_argument("--train", type=lambda s: _parse_json_object(s, "--train"), default={},
                        help='JSON overrides of the training recipe, e.g. {"epochs": 5}')
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data, the models, the request and the methods "
                             "(default: 0)")
    parser.add_argument("--output", default="runs/experiment.json")
    parser.add_argument("--cache-dir", default=".cache/mtunlearn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--mia-attack", default="logistic", choices=["logistic", "loss"])
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    methods = [method for m in args.methods.split(",") if m.strip()
               for method in (BASELINES if m.strip() == "all" else (m.strip(),))]
    targets = None if args.target_tasks is None else [
        t.strip() for t in args.target_tasks.split(",") if t.strip()]
    return ExperimentConfig(
        benchmark=args.benchmark, size=args.size, data_root=args.data_root, request=args.request,
        forget_fraction=args.forget_fraction, forget_ids=args.forget_ids, target_tasks=targets,
        methods=methods, method_configs=args.method_config, seed=args.seed, output=args.output,
        cache_dir=args.cache_dir, device=args.device, train_overrides=args.train,
        eval_batch_size=args.eval_batch_size, mia_attack=args.mia_attack, progress=args.progress,
        threads=args.threads)


def check_experiment(config: ExperimentConfig) -> Benchmark:
    """Every input of an experiment checked before any training: ``config``, its benchmark
    (name, data root), the target tasks and the training recipe's overrides. Returns the loaded
    benchmark; raises ``ValueError`` (``FileNotFoundError`` for a real data set's root) naming
    what is wrong."""
    config.validate()
    for method in config.methods:  # settings a method does not have, or refuses
        try:
            get_unlearner(method, config.method_configs.get(method) or {})
        except (TypeError, ValueError) as error:
            raise ValueError(f"--method-config: {error}") from error
    benchmark = _load_benchmark(config)
    unknown = [t for t in config.target_tasks or [] if t not in benchmark.train.task_names]
    if unknown:
        raise ValueError(f"--target-tasks: unknown tasks {unknown}; {config.benchmark!r} has "
                         f"{benchmark.train.task_names}")
    try:
        recipe = default_recipe(benchmark, config.seed, config.train_overrides)
    except (TypeError, ValueError) as error:  # an unknown field, or a bad value, of TrainConfig
        raise ValueError(f"--train: {error}") from error
    unknown = sorted(set(recipe.task_weights or {}) - set(benchmark.train.task_names))
    if unknown:
        raise ValueError(f"--train: `task_weights` names unknown tasks {unknown}; "
                         f"{config.benchmark!r} has {benchmark.train.task_names}")
    _check_held_out_settings(config, benchmark)
    return benchmark


def checked_benchmark(config: ExperimentConfig) -> Benchmark | None:
    """:func:`check_experiment` for the command lines: the loaded benchmark, or one line
    (``error: ...``) printed and ``None`` (the caller exits with code 2)."""
    try:
        return check_experiment(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run an experiment from the command line (``python -m mtunlearn_ext.experiment``;
    ``argv``: its arguments, default ``sys.argv[1:]``); returns the exit code (2: refused)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    imported_or_exit(parser, args.imports)
    config = config_from_args(args)
    benchmark = checked_benchmark(config)
    if benchmark is None:
        return 2
    results = run_experiment(config, benchmark)
    print(format_table(results))
    print(f"results written to {config.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
