"""Seeded multi-task training on the supervised pairs of a data set, and atomic checkpoints.

Training minimises :func:`~mtunlearn_ext.losses.masked_multitask_loss`, so only supervised
``(instance, task)`` pairs contribute. Training a fresh model on the retain set of a request
(``ForgetRequest.split``) with the original recipe and seed is therefore the retrained gold
standard.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import numbers
import os
import pickle
import re
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.optim.optimizer import ParamsT
from tqdm.auto import tqdm

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext._expansion import MAX_ADDED_BY_SHARING, SelfContainingError, expanded_size
from mtunlearn_ext._fields import check_field_types, unknown_fields
from mtunlearn_ext._io import atomic_torch_save, tensor_bytes
from mtunlearn_ext._progress import report as progress_report
from mtunlearn_ext._random import TORCH_SEED_LIMIT, seeded_generators
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec, batch_to
from mtunlearn_ext.losses import masked_multitask_loss
from mtunlearn_ext.models.base import MultiTaskModel, check_takes_task_names, device_of
from mtunlearn_ext.models.modes import gradients_on
from mtunlearn_ext.models.sparse_embeddings import dense_embedding_gradients

__all__ = ["Checkpoint", "CheckpointError", "TrainConfig", "TrainResult", "load_checkpoint",
           "load_weights_only", "make_optimizer", "meta_sha256", "save_checkpoint",
           "state_dict_sha256", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the same config and seed give the same model.

    Attributes:
        epochs: passes over the data.
        batch_size: rows per step (the last batch of an epoch may be smaller).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay, a finite number >= 0.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum, in ``[0, 1)`` (checked whatever the optimizer).
        schedule: ``"cosine"`` (to 0 over all steps, after ``warmup_steps`` linear warm-up) or
            ``"constant"``.
        warmup_steps: linear warm-up steps.
        grad_clip: max global gradient norm, or ``None``.
        seed: seeds the data order and any randomness inside the model.
        task_weights: task name -> loss weight, a finite number >= 0 (default 1 for every
            task); :func:`train` refuses names that are not tasks of its data set.
        num_threads: intra-op CPU threads during training (restored afterwards); ``None`` leaves
            torch's setting. On a CPU shared with other jobs, 1 thread avoids OpenMP barriers
            waiting on descheduled threads (measured >10x faster on a busy 2-core machine), and
            fixing it makes float reductions, hence results, repeatable across machines.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    momentum: float = 0.9
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = None
    seed: int = 0
    task_weights: Mapping[str, float] | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.epochs < 1:  # 0 epochs trains nothing and has no final loss
            raise ValueError(f"TrainConfig: `epochs` must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig: `batch_size` must be >= 1, got {self.batch_size}")
        # torch's optimizers pass lr and weight decay to float32 kernels, which refuse a value
        # past float32's largest with a bare RuntimeError from inside the step.
        largest = float(torch.finfo(torch.float32).max)
        if not (0 < self.lr <= largest):
            raise ValueError(f"TrainConfig: `lr` must be a positive number at most "
                             f"{largest:.4g} (float32's largest), got {self.lr}")
        if not (0 <= self.weight_decay <= largest):
            raise ValueError(f"TrainConfig: `weight_decay` must be a finite number >= 0, got "
                             f"{self.weight_decay}" + (f" (at most {largest:.4g}, float32's "
                                                       "largest)" if self.weight_decay > 0
                                                      else ""))
        if not (math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0):
            # torch's SGD refuses a negative momentum only inside the run; at 1 or more the
            # velocity (a geometric sum of earlier steps) never decays and the steps diverge.
            raise ValueError(f"TrainConfig: `momentum` must be in [0, 1), got {self.momentum}")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"TrainConfig: unknown optimizer {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig: unknown schedule {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: `warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig: `grad_clip` must be > 0 or None, got {self.grad_clip}")
        # The range RetrainConfig's seed override has, which seeds the same generators here.
        if not 0 <= self.seed < TORCH_SEED_LIMIT:
            raise ValueError(f"TrainConfig: `seed` must be an int in [0, 2**64), got "
                             f"{self.seed!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"TrainConfig: `num_threads` must be >= 1 or None, got "
                             f"{self.num_threads}")
        for task, weight in (self.task_weights or {}).items():
            if not isinstance(task, str):
                raise ValueError(f"TrainConfig: `task_weights` keys must be task names, got "
                                 f"{task!r}")
            if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                    or not (math.isfinite(weight) and weight >= 0)):
                raise ValueError(f"TrainConfig: `task_weights[{task!r}]` must be a finite "
                                 f"number >= 0, got {weight!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (for checkpoint metadata and run records): numbers as Python's own
        ``int`` / ``float`` (a NumPy float passes the field checks but is no plain type)."""
        out = {k: _plain_number(v) for k, v in asdict(self).items()}
        out["task_weights"] = None if self.task_weights is None else {
            k: _plain_number(v) for k, v in self.task_weights.items()}
        return out


def recipe_from_mapping(values: object, what: str) -> TrainConfig:
    """A :class:`TrainConfig` from a mapping of its fields, refusing anything else, and any key
    that is no field, as ``TypeError`` naming ``what`` (the argument it came from) and the
    fields (``TrainConfig(**values)`` would say only "unexpected keyword argument")."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must be a TrainConfig or a mapping of its fields, got "
                        f"{type(values).__name__}")
    unknown, known = unknown_fields(TrainConfig, values)
    if unknown:
        raise TypeError(f"{what}: unknown TrainConfig field(s) {unknown}; known: {known}")
    return TrainConfig(**values)


def _plain_number(value: Any) -> Any:
    """``value`` as a Python ``int`` / ``float`` when it is a number of another type (NumPy's);
    anything else as it is."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


@dataclass
class TrainResult:
    """What a training run did: mean loss per epoch (total and per task), steps, wall time."""

    epoch_losses: list[float] = field(default_factory=list)
    task_epoch_losses: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    num_rows: int = 0

    @property
    def final_loss(self) -> float:
        """The last epoch's mean loss (NaN for a run of no epoch)."""
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")


def make_optimizer(params: ParamsT, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``config`` over ``params`` (what torch's optimizers take:
    tensors, (name, tensor) pairs or parameter-group dicts)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at ``step`` (0-based) of ``total``."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant" or total <= config.warmup_steps:
        return 1.0
    progress = (step - config.warmup_steps) / (total - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _select_tasks(dataset: MultiTaskDataset, tasks: Sequence[TaskSpec | str] | None
                  ) -> tuple[list[TaskSpec], torch.Tensor]:
    """The task specs to train and the matching ``[N, len(tasks)]`` columns of the mask."""
    if tasks is None:
        return list(dataset.tasks), dataset.supervision
    specs: list[TaskSpec] = []
    for t in tasks:
        name = t if isinstance(t, str) else t.name
        specs.append(dataset.tasks[dataset.task_index(name)])
    columns = torch.tensor([dataset.task_index(s.name) for s in specs], dtype=torch.long)
    return specs, dataset.supervision[:, columns]


def train(model: MultiTaskModel, dataset: MultiTaskDataset,
          tasks: Sequence[TaskSpec | str] | None = None, config: TrainConfig | None = None,
          progress: bool = False) -> TrainResult:
    """Train ``model`` in place on the supervised pairs of ``dataset``.

    Each step minimises ``sum_t w_t L_t`` (:func:`masked_multitask_loss`) over a batch; rows
    with no supervised pair among ``tasks`` are dropped before batching. The data order of epoch
    ``e`` is a ``torch.randperm`` drawn from a generator seeded with ``config.seed``, and the
    global torch RNG is seeded with it inside a forked RNG state (restored on return), so the
    same model, data, config and thread count give bit-identical results.

    Args:
        model: the model (its parameters are updated in place; it is left in train mode).
        dataset: the training data (e.g. a retain set).
        tasks: the tasks to train (specs or names; default every task of ``dataset``).
        config: the recipe (default :class:`TrainConfig()`).
        progress: show a tqdm bar over epochs (on stderr; off unless asked for).
    """
    config = config or TrainConfig()
    check_takes_task_names(model, "train")
    unknown = sorted(set(config.task_weights or {}) - set(dataset.task_names))
    if unknown:
        raise ValueError(f"train: `task_weights` names unknown tasks {unknown}; the data set "
                         f"has {dataset.task_names}")
    specs, supervision = _select_tasks(dataset, tasks)
    split = getattr(model, "parameter_split", None)
    head_tasks = split().heads if split is not None else model.heads
    missing = [s.name for s in specs if s.name not in head_tasks]
    if missing:
        raise UnknownNameError(f"train: the model has no head for tasks {missing}")
    rows = supervision.any(dim=1).nonzero().flatten()
    result = TrainResult(task_epoch_losses={s.name: [] for s in specs}, num_rows=int(rows.numel()))
    if rows.numel() == 0:
        raise ValueError("train: no supervised pair in `dataset` for the selected tasks")
    device = device_of(model)
    optimizer = make_optimizer(model.parameters(), config)
    steps_per_epoch = math.ceil(rows.numel() / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    start = time.perf_counter()
    with cpu_threads(config.num_threads), seeded_generators(config.seed, device), \
            dense_embedding_gradients(model), gradients_on():
        order_generator = torch.Generator().manual_seed(config.seed)
        model.train()
        bar = tqdm(range(config.epochs), desc="train", disable=not progress, leave=False)
        for _epoch in bar:
            order = rows[torch.randperm(rows.numel(), generator=order_generator)]
            loss_sum = 0.0
            task_sums = {s.name: 0.0 for s in specs}
            for begin in range(0, order.numel(), config.batch_size):
                positions = order[begin:begin + config.batch_size]
                batch = batch_to(dataset.batch(positions), device)
                batch_sup = supervision[positions].to(device)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * _lr_factor(result.steps, total_steps, config)
                out = model(batch["input"], [s.name for s in specs])  # type: ignore[arg-type]
                loss, per_task = masked_multitask_loss(out, batch, specs, batch_sup,
                                                       config.task_weights)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(result.steps, loss.item(),
                                        {k: v.item() for k, v in per_task.items()})
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                result.steps += 1
                progress_report(result.steps / total_steps)
                loss_sum += loss.item()
                for name, value in per_task.items():
                    task_sums[name] += value.item()
            result.epoch_losses.append(loss_sum / steps_per_epoch)
            for name in task_sums:
                result.task_epoch_losses[name].append(task_sums[name] / steps_per_epoch)
            bar.set_postfix(loss=f"{result.epoch_losses[-1]:.4f}")
    result.seconds = time.perf_counter() - start
    return result


class NonFiniteLoss(FloatingPointError):
    """Training met a NaN/Inf loss: the ``step`` (0-based) and the loss ``value``, with each
    task's loss (``per_task``), as attributes for callers that report them their own way."""

    def __init__(self, step: int, value: float, per_task: dict[str, float]) -> None:
        super().__init__(f"train: non-finite loss {value} at step {step} (per task: "
                         f"{per_task})")
        self.step, self.value, self.per_task = step, value, per_task


@contextmanager
def cpu_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with ``num_threads`` torch intra-op threads (``None``: the setting as it
    is), then restore the count it had before."""
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# -- checkpoints ---------------------------------------------------------------------------------

_CHECKPOINT_FORMAT = "mtunlearn_ext.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt or not the expected one."""


def state_dict_sha256(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a model's state (names, dtypes, shapes and bytes, in order): which weights
    a record speaks of, independent of how a checkpoint file was serialised. Takes a module or
    a ``state_dict``; also :func:`mtunlearn_ext.api.state_dict_sha256`, which records carry."""
    state = (model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module)
             else model_or_state)
    digest = hashlib.sha256()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):  # a module's extra state (a counter, say)
            digest.update(f"{name}:{value!r};".encode())
            continue
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(tensor_bytes(value))
    return digest.hexdigest()


def meta_sha256(meta: Mapping[str, Any]) -> str:
    """SHA-256 over a checkpoint's metadata (plain data, :func:`save_checkpoint`), each value
    tagged with its type, dicts in key order: a flipped byte in the benchmark's seed or in the
    ids of a removal changes it. ``torch.load`` checks no CRC, and the weights' hash does not
    cover what the metadata says the weights were trained on and had removed."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if value is None or isinstance(value, bool):
            digest.update(f"{value};".encode())
        elif isinstance(value, int):
            digest.update(f"i{value};".encode())
        elif isinstance(value, float):
            digest.update(f"f{value.hex()};".encode())
        elif isinstance(value, str):
            text = value.encode("utf-8", "surrogatepass")
            digest.update(f"s{len(text)}:".encode() + text)
        elif isinstance(value, torch.Tensor):
            # Its values: a conjugate or negative view resolved, a sparse tensor made dense
            # (its bytes are not viewable as they are).
            dense = value.detach()
            dense = dense.to_dense() if dense.layout != torch.strided else dense
            dense = dense.resolve_conj().resolve_neg()
            layout = "" if value.layout == torch.strided else str(value.layout)
            digest.update(f"t{value.dtype}{tuple(value.shape)}{layout}:".encode())
            digest.update(tensor_bytes(dense))
        elif isinstance(value, (list, tuple)):
            digest.update(f"{'l' if isinstance(value, list) else 'u'}{len(value)}:".encode())
            for item in value:
                feed(item)
        elif isinstance(value, Mapping):
            digest.update(f"d{len(value)}:".encode())
            for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
                feed(key)
                feed(value[key])
        else:  # save_checkpoint refuses anything else (_check_plain)
            raise TypeError(f"meta_sha256: {type(value).__name__} is no plain metadata")

    feed(meta)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model's ``state_dict``, its metadata, the file's SHA-256, and
    the :func:`state_dict_sha256` of the weights that the file recorded when it was written
    (checked on load; ``None`` for a file written before checkpoints held it)."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    sha256: str
    state_sha256: str | None = None

    def __repr__(self) -> str:
        # The dataclass repr printed every tensor of the state dict (17k characters for the
        # digits benchmark's 16-tensor MLP) and the whole metadata: named and counted here.
        values = sum(tensor.numel() for tensor in self.state_dict.values())
        return (f"Checkpoint(state_dict: {len(self.state_dict)} tensors ({values:,} values), "
                f"meta: {sorted(self.meta)}, sha256={self.sha256!r}, "
                f"state_sha256={self.state_sha256!r})")


#: The exact types metadata may hold: what ``torch.load(weights_only=True)`` reads back as it
#: was written (a subclass, e.g. ``numpy.float64`` of ``float``, is refused by the reader).
_PLAIN_SCALARS = (type(None), bool, int, float, str)


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` naming the entry (``meta['a'][0]``) that is not plain data."""
    kind = type(value)
    if kind in _PLAIN_SCALARS or kind in (torch.Tensor, torch.nn.Parameter):
        return
    if kind in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if kind in (dict, collections.OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_SCALARS:
                raise TypeError(f"save_checkpoint: {where} has a key {key!r} of type "
                                f"{type(key).__name__}; metadata keys must be str, int, float, "
                                f"bool or None")
            _check_plain(item, f"{where}[{key!r}]")
        return
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    raise TypeError(f"save_checkpoint: {where} is a {kind.__module__}.{kind.__qualname__} "
                    f"({text}); checkpoint metadata must be plain data (None, bool, int, "
                    f"float, str, tensors, and lists, tuples and dicts of them), which "
                    f"load_checkpoint can read back without running code: convert it "
                    f"(float(x), str(path), sorted(a_set))")


def save_checkpoint(path: str | os.PathLike[str], model: torch.nn.Module,
                    meta: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> str:
    """Write ``model.state_dict()`` and ``meta`` to ``path`` atomically; return its SHA-256.

    ``meta`` must hold plain data (None, bool, int, float, str, tensors, and lists, tuples and
    dicts of them; exactly those types, not subclasses such as NumPy scalars), because
    :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, which executes no
    code: anything else is refused here with a ``TypeError`` naming the entry, before the
    file is written. The file also holds the :func:`state_dict_sha256` of the weights and the
    :func:`meta_sha256` of the metadata, which :func:`load_checkpoint` checks (``torch.load``
    does not check the archive's CRCs: a flipped bit in a weight, or in the seed the data are
    regenerated from, would load silently). An existing file is never overwritten unless
    ``overwrite=True``.
    """
    meta = dict(meta or {})
    _check_plain(meta, "meta")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "state_dict": state,
        "meta": meta,
        "state_sha256": state_dict_sha256(state),
        "meta_sha256": meta_sha256(meta),
    }
    return atomic_torch_save(payload, path, overwrite=overwrite)


def _not_a_checkpoint(path: Path, error: pickle.UnpicklingError) -> str:
    """One line for a file torch's weights-only loader refuses (a pickle, a JSON text). torch's
    own refusal spans several lines and advises loading the file again with
    ``weights_only=False``, which runs whatever code it holds: only its reason (``Unsupported
    operand 123``, ``Unsupported global: GLOBAL x.Y``) is kept."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        head = b""
    if head.startswith(b"{"):  # "Unsupported operand 123" is torch's word for a "{"
        return (f"checkpoint {path} is not an mtunlearn checkpoint: it is JSON text (an "
                "unlearning record? its `output.checkpoint` names the checkpoint it describes)")
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
    detail = re.split(r"(?<=\.)\s", found.group(1).strip())[0].rstrip(".") if found else ""
    return (f"checkpoint {path} is not an mtunlearn checkpoint: torch's safe (weights-only) "
            f"loader refuses its contents{f' ({detail})' if detail else ''}; only the files "
            "`mtunlearn train` and `mtunlearn unlearn` write are read")


def _refuse_compressed_entries(path: Path, data: bytes) -> None:
    """torch.save stores its archive's entries uncompressed, so a tensor holds at most what
    the file does; torch.load also inflates compressed ones, and a 0.7 MB file whose one
    entry deflates to 512 MiB of zeros took that much memory to read."""
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return  # not a zip archive: torch's own reader decides (and refuses what it cannot)
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"checkpoint {path} is not an mtunlearn checkpoint: its archive "
                              f"holds compressed entries ({packed[0]}), which torch.save never "
                              "writes; only the files `mtunlearn train` and `mtunlearn "
                              "unlearn` write are read")


def _refuse_outsized(path: Path, payload: Any, file_size: int) -> None:
    """Refuse what hashing the loaded payload would blow up: parts shared through the pickle's
    memo that expand far beyond what the file writes out (a few hundred bytes naming a list
    of two copies of a list of two copies ... sixty deep hashed for ever), a part containing
    itself, and a tensor with more values than the file holds (a stride of 0, or a sparse
    tensor's size, makes a 4-byte storage a 4 GiB array once made contiguous)."""
    tensors: dict[int, torch.Tensor] = {}

    def parts(value: Any) -> list[Any] | None:
        if isinstance(value, torch.Tensor):
            tensors[id(value)] = value
            return None
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, dict):
            return [item for pair in value.items() for item in pair]
        return None

    try:
        expanded, written = expanded_size(payload, parts)
    except SelfContainingError as error:
        raise CheckpointError(f"checkpoint {path} is damaged: {error}") from None
    if expanded - written > MAX_ADDED_BY_SHARING:
        raise CheckpointError(f"checkpoint {path} is damaged: its parts shared through the "
                              f"pickle's memo expand it to {expanded:,} values from {written:,} "
                              f"written (at most {MAX_ADDED_BY_SHARING:,} more are read)")
    for tensor in tensors.values():
        values = tensor.numel() * tensor.element_size()
        if values > file_size:
            raise CheckpointError(f"checkpoint {path} is damaged: a tensor of shape "
                                  f"{tuple(tensor.shape)} holds {values:,} bytes of values, "
                                  f"more than the file's {file_size:,} bytes (elements that "
                                  "overlap, or a sparse tensor's size)")


def load_weights_only(path: str | os.PathLike[str]) -> Any:
    """``torch.load(path, weights_only=True)`` of a file someone else may have made, with the
    refusals of :func:`load_checkpoint` before anything walks what it holds: compressed archive
    entries, parts shared or nested past reading, tensors with more values than the file.
    Raises :class:`CheckpointError` for those, and torch's errors as they are."""
    p = Path(path)
    data = p.read_bytes()
    _refuse_compressed_entries(p, data)
    loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    _refuse_outsized(p, loaded, len(data))
    return loaded


def load_checkpoint(path: str | os.PathLike[str], expected_sha256: str | None = None,
                    model: torch.nn.Module | None = None) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The file is read once: its SHA-256 and the loaded weights come from the same bytes (a file
    replaced between a hash and a second read could otherwise pass as the expected one).
    Raises :class:`CheckpointError` with the path and the reason when the file is missing, its
    SHA-256 differs from ``expected_sha256``, it is truncated/corrupt/not a checkpoint, or its
    weights differ from the hash recorded at save time. With ``model`` the state dict is also
    loaded into it (strictly).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} " + ("is a folder, not a checkpoint file"
                                                    if p.is_dir() else "does not exist"))
    try:
        data = p.read_bytes()
    except FileNotFoundError as error:  # removed since the check
        raise CheckpointError(f"checkpoint {p} does not exist") from error
    if not data:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes: a save that never wrote, or "
                              "a file truncated to nothing)")
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise CheckpointError(f"checkpoint {p} has SHA-256 {sha}, expected {expected_sha256} "
                              "(truncated, modified or a different file)")
    _refuse_compressed_entries(p, data)
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol other than its own before it refuses such a
            # file: two lines on stderr beside the one-line error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(_not_a_checkpoint(p, error)) from error
    except Exception as error:  # torch raises several types for a damaged zip archive
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        # torch's miniz errors go on for four sentences about a likely corrupted file: the
        # first says what failed, and the message says the rest.
        first = first.split(". This is an internal miniz error")[0]
        raise CheckpointError(f"checkpoint {p} cannot be read (truncated or corrupt?): "
                              f"{type(error).__name__}: {first}") from error
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not an mtunlearn_ext checkpoint ({_CHECKPOINT_FORMAT})")
    _refuse_outsized(p, payload, len(data))
    state, meta, recorded, recorded_meta = (payload.get("state_dict"), payload.get("meta"),
                                            payload.get("state_sha256"),
                                            payload.get("meta_sha256"))
    if (not isinstance(state, dict) or not isinstance(meta, dict)
            or not all(isinstance(v, torch.Tensor) for v in state.values())
            or not (recorded is None or isinstance(recorded, str))
            or not (recorded_meta is None or isinstance(recorded_meta, str))):
        raise CheckpointError(f"checkpoint {p} is damaged: its state dict or metadata is not "
                              "what save_checkpoint writes")
    if recorded_meta is not None:  # checkpoints written before it was recorded: as before
        try:
            actual_meta = meta_sha256(meta)
        except TypeError as error:
            raise CheckpointError(f"checkpoint {p} is damaged: {error}") from error
        except RecursionError:  # lists in lists 200,000 deep: a traceback with exit 1
            raise CheckpointError(f"checkpoint {p} is damaged: its metadata is nested too "
                                  "deeply to read") from None
        if actual_meta != recorded_meta:
            raise CheckpointError(f"checkpoint {p} is corrupt: its metadata (the benchmark, "
                                  f"seed and removals it names) hashes to {actual_meta}, the "
                                  f"file recorded {recorded_meta} when it was written")
    if recorded is not None:
        actual = state_dict_sha256(state)
        if actual != recorded:
            raise CheckpointError(f"checkpoint {p} is corrupt: its weights hash to {actual}, "
                                  f"the file recorded {recorded} when it was written")
    checkpoint = Checkpoint(state, meta, sha, recorded)
    if model is not None:
        model.load_state_dict(checkpoint.state_dict)
    return checkpoint
