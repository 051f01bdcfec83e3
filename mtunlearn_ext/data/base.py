"""Multi-task data in memory: inputs, one target tensor per task, instance ids, and a supervision
mask saying which (instance, task) pairs carry a label. The inputs are one tensor or, for a model
with several inputs, a tuple or dict of tensors (:mod:`mtunlearn_ext.data.inputs`).

The supervision mask is what unlearning edits: a partial-task request clears the target tasks'
pairs of the forget instances and leaves their other tasks' labels in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import Dataset

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.data.inputs import (
    Inputs,
    check_inputs,
    inputs_to,
    map_leaves,
    named_leaves,
    num_rows,
    take_rows,
)

TaskKind = Literal["classification", "segmentation", "depth", "normals", "regression", "binary"]
TASK_KINDS: tuple[TaskKind, ...] = get_args(TaskKind)


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task problem.

    ``classification``: target ``[]`` long in ``[0, num_classes)``. ``segmentation``: ``[H, W]``
    long, ``ignore_index`` for unlabelled pixels. ``depth``: ``[1, H, W]`` float, ``0`` where
    unknown. ``normals``: ``[3, H, W]`` unit vectors, all-zero where unknown. ``regression``:
    ``[d]`` float. ``binary``: ``[d]`` (or ``[]``) labels in ``[0, 1]`` (0/1, or soft
    probabilities) of ``d`` independent yes/no outputs whose predictions are logits (a click, a
    conversion, an attribute; a sigmoid head trained with binary cross-entropy), an entry equal
    to ``ignore_index`` unlabelled (a row with no labelled entry is no pair of the task).

    ``loss`` replaces the kind's loss (:func:`mtunlearn_ext.losses.task_loss`) wherever the
    library takes this task's loss: training and retraining, the retain terms and per-sample
    gradients of unlearning, the forgetting objective's capped ascent and its caps, and the
    membership attack. It maps ``(prediction [B, ...], target [B, ...])`` to per-sample losses
    ``[B]`` (a label-smoothed or focal cross-entropy, a Huber loss, ...) and must accept the
    kind's "no label" value on unsupervised pairs (``ignore_index`` for class and binary
    labels, 0 for dense and regression targets), whose losses are masked out; it must be
    ``torch.func`` friendly (the per-sample pass calls it on batches of one under ``vmap``).
    The kind still decides the metrics, the unlabelled-pixel rules, the reference predictions
    and the likelihood of the sampled-target snapshots that the task projection protects
    (:mod:`mtunlearn_ext.unlearning.fisher`). A regression task's reference prediction is the
    retain targets' mean, fed to ``loss`` as a prediction: right for a loss whose prediction
    lives in the targets' space (MSE, Huber), not for one that reads logits, where
    ``capped_ascent``'s cap would be measured at the wrong point: yes/no labels read from
    logits (BCE-with-logits) are the ``binary`` kind; for another loss on logits, let the
    interference-aware method calibrate its caps on unseen data instead
    (``cap_reference="held_out"`` with ``held_out_data``), or use the ``"ascent"`` objective.
    Per-token labels (sequence tagging) fit ``segmentation`` as ``[B, C, L, 1]`` predictions
    and ``[L, 1]`` targets.
    """

    name: str
    kind: TaskKind
    num_classes: int | None = None
    ignore_index: int = -1
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # A name or count of another type was kept as given and failed far away (a None name
        # as a model's head key, num_classes '3' in a head's width) or never (-3, True).
        if not isinstance(self.name, str):
            raise TypeError(f"TaskSpec: `name` must be a non-empty string, got "
                            f"{type(self.name).__name__} {self.name!r}")
        if not self.name:
            raise ValueError("TaskSpec: `name` must be a non-empty string, got ''")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec: `kind` must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.num_classes is not None:
            number = integer_value(self.num_classes)
            if number is None:
                raise TypeError(f"TaskSpec: task {self.name!r}: `num_classes` must be an integer "
                                f">= 1 or None, got {type(self.num_classes).__name__} "
                                f"{self.num_classes!r}")
            # NumPy's integers (`y.max() + 1`) are kept as the Python int they stand for.
            object.__setattr__(self, "num_classes", number)
            if self.num_classes < 1:
                raise ValueError(f"TaskSpec: task {self.name!r}: `num_classes` must be an "
                                 f"integer >= 1 or None, got {self.num_classes}")
        if self.kind in ("classification", "segmentation") and not self.num_classes:
            raise ValueError(f"TaskSpec: task {self.name!r} of kind {self.kind} needs num_classes")
        ignore_index = integer_value(self.ignore_index)
        if ignore_index is None:
            raise TypeError(f"TaskSpec: task {self.name!r}: `ignore_index` must be an integer, "
                            f"got {type(self.ignore_index).__name__} {self.ignore_index!r}")
        object.__setattr__(self, "ignore_index", ignore_index)
        if self.loss is not None and not callable(self.loss):
            raise TypeError(f"TaskSpec: task {self.name!r}: `loss` must be a callable "
                            f"(prediction, target) -> [B] losses, got {type(self.loss).__name__}")

    def describe(self) -> dict[str, object]:
        """The spec as plain data (records, fingerprints): the four defining fields, and the
        custom loss's qualified name when there is one (a ``functools.partial`` as
        ``partial(<function>, <arguments>)``, :func:`describe_callable`)."""
        out: dict[str, object] = {"name": self.name, "kind": self.kind,
                                  "num_classes": self.num_classes,
                                  "ignore_index": self.ignore_index}
        if self.loss is not None:
            out["loss"] = describe_callable(self.loss)
        return out


#: Longest argument text :func:`describe_callable` shows; a longer one shows its type.
_MAX_ARGUMENT_TEXT = 40

#: How far a labelled normal's length may be from 1: one resampled from unit vectors is
#: shorter, never longer; normals stored as colours ((n + 1) / 2, or x 255) are longer than 1
#: or mostly far from it.
NORMAL_LENGTH_SLACK = 0.1


def describe_callable(fn: Callable[..., object]) -> str:
    """A short, deterministic name of ``fn``: its qualified name (a callable object's: its
    type's); a ``functools.partial`` as ``partial(name, arg, ..., key=value, ...)`` with the
    keywords sorted. An argument shows its ``repr`` when that is one line of at most 40
    characters without a memory address, a callable its own description, anything else its
    type (``<Tensor>``)."""
    if isinstance(fn, functools.partial):
        parts = [describe_callable(fn.func)]
        parts += [_describe_argument(a) for a in fn.args]
        parts += [f"{k}={_describe_argument(v)}" for k, v in sorted(fn.keywords.items())]
        return f"partial({', '.join(parts)})"
    return str(getattr(fn, "__qualname__", type(fn).__qualname__))


def _describe_argument(value: object) -> str:
    if callable(value):
        return describe_callable(value)
    text = repr(value)
    if len(text) > _MAX_ARGUMENT_TEXT or "\n" in text or " at 0x" in text:
        return f"<{type(value).__qualname__}>"
    return text


def integer_valued(values: torch.Tensor) -> bool:
    """Whether every entry is an integer: an integer dtype, or floats without a fraction (a
    data frame's id column may be float); never a bool mask, NaN or a complex number."""
    if values.dtype == torch.bool or values.is_complex():
        return False
    return not values.is_floating_point() or bool((values == values.round()).all())


def neutral_unsupervised(spec: TaskSpec, target: torch.Tensor,
                         supervised: torch.Tensor) -> torch.Tensor:
    """``target`` (``[B, ...]``) with the rows where ``supervised`` (``[B]`` bool) is False set
    to the task's "no label" value: ``ignore_index`` for class and binary labels, 0 (unknown)
    for depth, normals and regression. Losses drop unsupervised pairs with ``torch.where``,
    which keeps their values out of a sum but not out of a gradient (``0 * NaN`` is NaN) nor
    out of the loss kernel (an out-of-range class index raises); with neutral targets there, an
    unsupervised pair may hold anything. On the CPU a fully supervised ``target`` comes back
    as it is (no copy: batches neutralised once by :meth:`MultiTaskDataset.batch` pass the
    losses' second call for free); on an accelerator a new tensor is always written, since
    looking first would cost a host sync."""
    if supervised.device.type == "cpu" and bool(supervised.all()):
        return target
    fill = spec.ignore_index if spec.kind in ("classification", "segmentation", "binary") else 0
    if not target.is_floating_point() and target.dtype != torch.bool:
        info = torch.iinfo(target.dtype)
        if not info.min <= fill <= info.max:  # uint8 labels, ignore_index -1: widen, not wrap
            target = target.long()
    mask = supervised.reshape(-1, *([1] * (target.dim() - 1))).to(target.device)
    return torch.where(mask, target, fill)


def is_ignore_index(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``target == ignore_index``, elementwise, without wrapping: torch compares a uint8 label
    with ``-1`` as with 255, so a map of uint8 labels with 255 for "unlabelled" (the
    Cityscapes / VOC convention) read as all unlabelled under the default ``ignore_index=-1``
    and its 255s reached the losses as classes. An integer dtype that cannot hold the index
    holds no ignored entry."""
    if target.dtype == torch.bool:
        representable = ignore_index in (0, 1)
    elif target.is_floating_point() or target.is_complex():
        representable = True
    else:
        info = torch.iinfo(target.dtype)
        representable = info.min <= ignore_index <= info.max
    if not representable:
        return torch.zeros(target.shape, dtype=torch.bool, device=target.device)
    return target == ignore_index


def labelled_pixels(spec: TaskSpec, target: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool: the pixels of a dense target that carry a label (the losses'
    rule; NaN reads as no label). Segmentation: label ``!= ignore_index``; depth
    ``[B, 1, H, W]``: ``> 0``; normals ``[B, 3, H, W]``: not the zero vector."""
    if spec.kind == "segmentation":
        return ~is_ignore_index(target, spec.ignore_index)
    if spec.kind == "depth":
        return target[:, 0] > 0
    if spec.kind == "normals":
        return target.abs().sum(dim=1) > 0
    raise ValueError(f"valid_pixel_mask: task {spec.name!r} of kind {spec.kind} is not dense")


def labelled_rows(spec: TaskSpec, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the rows of ``target`` (``[N, ...]``) that carry a label of their own: a
    class label other than ``ignore_index``, binary labels with an entry other than
    ``ignore_index``, a dense map with a labelled pixel (:func:`labelled_pixels`); every
    regression row. Without a supervision mask, these rows
    are the supervised ones: a row written as "no label" (a ``-1`` class) then counts as no
    pair of its task, not as a pair whose loss is always zero."""
    n = target.shape[0]
    if n == 0 or spec.kind == "regression":
        return torch.ones(n, dtype=torch.bool, device=target.device)
    if spec.kind in ("classification", "binary"):
        return (~is_ignore_index(target.reshape(n, -1), spec.ignore_index)).any(dim=1)
    if target.dim() < 2:  # no map: refused, naming the task, by the data set's value checks
        return torch.ones(n, dtype=torch.bool, device=target.device)
    return labelled_pixels(spec, target).reshape(n, -1).any(dim=1)


def _all_finite(values: torch.Tensor) -> bool:
    """True when ``values`` holds no NaN or Inf (always for integer tensors), from one min/max
    pass (NaN propagates through both; an Inf is the min or the max), about 10x faster on CPU
    than materialising ``isfinite``."""
    if values.numel() == 0 or not (values.is_floating_point() or values.is_complex()):
        return True
    if values.is_complex():
        return bool(torch.isfinite(values).all())
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _ignore_index_hint(spec: TaskSpec, outside: torch.Tensor) -> str:
    """For class labels ``outside`` the classes (and not the ignore index): when some are
    negative, most likely a padding value the spec does not know (Hugging Face pads labels
    with -100), the spec that would take the most common one as its ignore index; empty when
    none is negative (labels past the classes want another ``num_classes``)."""
    negative = outside[outside < 0]
    if not negative.numel():
        if bool((outside == 255).any()) and spec.ignore_index != 255:
            return (f"; if 255 marks unlabelled pixels (the Cityscapes / Pascal VOC "
                    f"convention), pass the task as `TaskSpec({spec.name!r}, {spec.kind!r}, "
                    f"num_classes={spec.num_classes}, ignore_index=255)`")
        return ""
    value = int(torch.mode(negative.flatten()).values)
    return (f"; if {value} marks unlabelled positions (Hugging Face pads labels with -100), "
            f"pass the task as `TaskSpec({spec.name!r}, {spec.kind!r}, "
            f"num_classes={spec.num_classes}, ignore_index={value})`")


def _check_target(name: str, target: object) -> None:
    """Refuse a task's targets that are not a tensor with a row dimension, naming the task
    (NumPy arrays and lists have no ``shape`` / ``numel`` the losses and metrics rely on; a 0-d
    tensor has no rows)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"MultiTaskDataset: `targets[{name!r}]` must be a tensor [N, ...] (one "
                        f"row per instance), got {type(target).__name__}; convert it with "
                        f"torch.as_tensor")
    if target.dim() == 0:
        raise ValueError(f"MultiTaskDataset: `targets[{name!r}]` must be a tensor [N, ...] (one "
                         f"row per instance), got a 0-d tensor")


def _id_tensor(ids: object, what: str = "MultiTaskDataset: `ids` must be N unique integers"
               ) -> torch.Tensor:
    """``ids`` (a tensor, or a list / NumPy array of integers, as ``ForgetRequest.create``
    takes them) as a long tensor; a bool mask, a bool in a list, fractions, NaN and ids
    outside int64 are refused, not truncated, in a ``ValueError`` (``TypeError`` for no
    numbers) starting with ``what``, the argument's rule."""
    if isinstance(ids, torch.Tensor):
        values = ids
    else:
        try:
            values = torch.as_tensor(ids)
            if values.is_floating_point() and not hasattr(ids, "__array__"):
                # Python floats default to float32, which would round ids above 2**24.
                values = torch.as_tensor(ids, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            huge = _first_python_int_outside_int64(ids)
            if huge is not None:
                raise ValueError(f"{what} in the int64 range [-2**63, 2**63), got "
                                 f"{huge}") from error
            raise TypeError(f"{what} (a tensor, list or NumPy array), got "
                            f"{ids!r:.80}") from error
        if values.dtype != torch.bool:  # all bools: refused below as a mask
            flag = _first_bool(ids)
            if flag is not None:
                raise ValueError(f"{what}, got bool {flag!r} among {ids!r:.80} (it would be "
                                 f"read as id {int(bool(flag))})")
    if not integer_valued(values):
        raise ValueError(f"{what}, got {values.dtype} values {values.reshape(-1)[:5].tolist()}")
    # The cast to int64 below wraps uint64 ids >= 2**63 to negative ones and saturates huge
    # floats: another instance's id, or a duplicate, without a word.
    if values.dtype == torch.uint64:
        over = values.view(torch.int64) < 0  # read as int64, exactly the ids >= 2**63
        if bool(over.any()):
            first = int(values.view(torch.int64)[over][0]) + 2 ** 64
            raise ValueError(f"{what} in the int64 range [-2**63, 2**63), got {first}")
    elif values.is_floating_point():
        over = (values >= 2.0 ** 63) | (values < -2.0 ** 63)
        if bool(over.any()):
            raise ValueError(f"{what} in the int64 range [-2**63, 2**63), got "
                             f"{float(values[over][0])!r}")
    return values.to(torch.long)


def _first_bool(ids: object) -> object | None:
    """The first bool (Python's, NumPy's or a 0-d bool tensor) in the list or tuple ``ids``,
    nested ones too, or None. torch converts ``[3, True]`` to ids 3 and 1 without a word; a
    bool among ids is a mask's entry or a flag passed by mistake. Lists only: a tensor or an
    array has one dtype, whose bools are refused as a mask."""
    if not isinstance(ids, (list, tuple)):
        return None
    # One pass over the element types in C (~15% of the conversion's time) before any loop.
    if not set(map(type, ids)) & {bool, np.bool_, torch.Tensor, list, tuple}:
        return None
    for value in ids:
        if isinstance(value, (bool, np.bool_)) or (
                isinstance(value, torch.Tensor) and value.dtype == torch.bool):
            return value
        found = _first_bool(value)
        if found is not None:
            return found
    return None


def _first_python_int_outside_int64(ids: object) -> int | None:
    """The first Python integer of ``ids`` (a list, tuple or object array, flat or nested)
    outside int64, which is why torch could not convert it; None if there is none."""
    try:
        flat = np.asarray(ids, dtype=object).reshape(-1)
    except (TypeError, ValueError):
        return None
    for value in flat:
        if isinstance(value, int) and not isinstance(value, bool) and not (
                -2 ** 63 <= value < 2 ** 63):
            return value
    return None


def _row_positions(positions: object, n: int, method: str) -> torch.Tensor:
    """``positions`` as a 1-d long tensor of rows: integer positions, or a bool mask of length
    ``n`` (its True rows). A mask must not be read as positions 0/1, nor a fraction truncated
    into another row."""
    what = f"MultiTaskDataset.{method}: `positions`"
    try:
        pos = torch.as_tensor(positions)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{what} must be integer row positions or a bool mask of length {n}, "
                        f"got {positions!r:.80}") from error
    if pos.dtype == torch.bool:
        if pos.shape != (n,):
            raise ValueError(f"{what}: a bool mask must have shape [{n}] (one entry per row), "
                             f"got {tuple(pos.shape)}")
        return pos.nonzero().flatten()
    if pos.numel() == 0:
        return pos.to(torch.long).reshape(-1)  # [] converts to float32
    if pos.is_floating_point() or pos.is_complex():
        shown = (f"{pos.dtype} values {pos.reshape(-1)[:5].tolist()}"
                 if isinstance(positions, torch.Tensor) else f"{positions!r:.80}")
        raise TypeError(f"{what} must be integer row positions or a bool mask of length {n}, "
                        f"got {shown}")
    if pos.dim() > 1:
        raise ValueError(f"{what} must be 1-d, got shape {tuple(pos.shape)}")
    pos = pos.to(torch.long).reshape(-1)
    # A negative position would index from the end (-1: the last row) and one past the end
    # raised a bare IndexError; rows are named by their position in [0, n) only.
    outside = (pos < 0) | (pos >= n)
    if bool(outside.any()):
        raise IndexError(f"{what} must be row positions in [0, {n}), got {int(pos[outside][0])}"
                         f" ({int(outside.sum())} outside)")
    return pos


def task_spec_list(tasks: object, what: str) -> list[TaskSpec]:
    """``tasks`` as a list of :class:`TaskSpec`; a mapping (``{"kind": "classification"}``,
    whose keys would be taken for specs: AttributeError on a str), a string or any other
    element is refused in a ``TypeError`` starting with ``what`` (the argument's rule)."""
    if isinstance(tasks, (Mapping, str, bytes)) or not isinstance(tasks, Iterable):
        hint = (": build them, e.g. [TaskSpec(name, kind, num_classes=...)]"
                if isinstance(tasks, Mapping) else "")
        raise TypeError(f"{what}, got {type(tasks).__name__}{hint}")
    specs = list(tasks)
    for position, spec in enumerate(specs):
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"{what}, got {type(spec).__name__} {spec!r:.60} at position "
                            f"{position}")
    return specs


class MultiTaskDataset(Dataset[dict[str, object]]):
    """Tensor-backed multi-task data set.

    Args:
        inputs: ``[N, ...]``, or several inputs of one instance each: a tuple / list of
            ``[N, ...]`` tensors (the model is called ``model(*inputs)``) or a dict name ->
            ``[N, ...]`` (``model(**inputs)``); every leaf's first dimension is the instance.
        targets: task name -> ``[N, ...]`` target tensor, one per task in ``tasks``.
        tasks: the task specs, in a fixed order (the columns of ``supervision``).
        ids: ``[N]`` unique instance ids (default ``arange(N)``); requests name instances by id.
            A tensor, list or NumPy array of integers (integral floats are taken as integers).
        supervision: ``[N, T]`` bool, ``True`` where the pair carries a label (default: the rows
            :func:`labelled_rows` finds, which is every row of a fully labelled task).

    Items are dicts ``{"input", "targets": {task: t}, "supervision": [T] bool, "id": long}``
    (``"input"`` in the structure of ``inputs``, one row of each leaf), which the default
    collate function batches. Items and :meth:`batch` carry a neutral target
    (:func:`neutral_unsupervised`) on every unsupervised pair, whatever the data set stores
    there (NaN, an out-of-range label): no loss ever reads one, and none can poison a gradient.
    """

    def __init__(self, inputs: Inputs, targets: Mapping[str, torch.Tensor],
                 tasks: Sequence[TaskSpec], ids: torch.Tensor | Sequence[int] | None = None,
                 supervision: torch.Tensor | None = None) -> None:
        self._init(inputs, targets, tasks, ids, supervision, None)

    def _init(self, inputs: Inputs, targets: Mapping[str, torch.Tensor],
              tasks: Sequence[TaskSpec], ids: torch.Tensor | Sequence[int] | None,
              supervision: torch.Tensor | None,
              id_order: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The constructor; ``id_order``: :attr:`_id_order` of a set with these very ids
        (``ids`` its tensor), whose uniqueness is then known."""
        n = check_inputs(inputs, "MultiTaskDataset: `inputs`")
        self.tasks: list[TaskSpec] = task_spec_list(
            tasks, "MultiTaskDataset: `tasks` must be a sequence of TaskSpec (one per task, in "
            "column order)")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"MultiTaskDataset: duplicate task names in {names}")
        if set(targets) != set(names):
            raise ValueError(f"MultiTaskDataset: `targets` has tasks {sorted(targets)} but "
                             f"`tasks` names {names}")
        on_meta = [f"inputs{path}" for path, leaf in named_leaves(inputs) if leaf.is_meta] + [
            f"targets[{name!r}]" for name, t in targets.items()
            if isinstance(t, torch.Tensor) and t.is_meta] + [
            f"`{name}`" for name, t in (("ids", ids), ("supervision", supervision))
            if isinstance(t, torch.Tensor) and t.is_meta]
        if on_meta:  # its supervision and every check read values (torch: NotImplementedError)
            raise ValueError(f"MultiTaskDataset: {on_meta[0]} is on the meta device, which holds "
                             "no values; give the data itself")
        for name, t in targets.items():
            _check_target(name, t)
            if t.shape[0] != n:
                raise ValueError(f"MultiTaskDataset: targets[{name!r}] has {t.shape[0]} rows, "
                                 f"inputs have {n}")
        self.inputs: Inputs = inputs
        self.targets = {name: targets[name] for name in names}
        self.ids = torch.arange(n) if ids is None else _id_tensor(ids)
        if self.ids.shape != (n,):
            raise ValueError(f"MultiTaskDataset: `ids` must be N unique integers, one per row: "
                             f"expected shape [{n}], got {tuple(self.ids.shape)}")
        if id_order is None:
            # Sorted once: the order checks uniqueness here and finds ids in positions_of.
            order = torch.argsort(self.ids.to("cpu", torch.long))
            id_order = order, self.ids.to("cpu", torch.long)[order]
        #: (argsort of the ids, the ids in that order), for positions_of
        self._id_order: tuple[torch.Tensor, torch.Tensor] = id_order
        ordered = id_order[1]
        if bool((ordered[1:] == ordered[:-1]).any()):
            values, counts = torch.unique(self.ids, return_counts=True)
            repeated = values[counts > 1]
            raise ValueError(f"MultiTaskDataset: `ids` must be N unique integers: id "
                             f"{int(repeated[0])} appears {int(counts[counts > 1][0])} times "
                             f"(ids repeated: {repeated.numel()})")
        if supervision is None:
            supervision = torch.stack([labelled_rows(spec, self.targets[spec.name]).cpu()
                                       for spec in self.tasks], dim=1) if names else \
                torch.ones(n, 0, dtype=torch.bool)
        if not isinstance(supervision, torch.Tensor):
            raise TypeError(f"MultiTaskDataset: `supervision` must be a bool tensor "
                            f"[{n}, {len(names)}], got {type(supervision).__name__}")
        if supervision.shape != (n, len(names)) or supervision.dtype != torch.bool:
            wrong = " and ".join(
                what for what, bad in ((f"shape {tuple(supervision.shape)}",
                                        supervision.shape != (n, len(names))),
                                       (f"dtype {supervision.dtype}",
                                        supervision.dtype != torch.bool)) if bad)
            raise ValueError(f"MultiTaskDataset: `supervision` must be bool [{n}, {len(names)}] "
                             f"(one row per instance, one column per task: {names}), got "
                             f"{wrong}")
        self.supervision = supervision

    def __repr__(self) -> str:
        kinds = ", ".join(f"{spec.name}: {spec.kind}" for spec in self.tasks)
        pairs = ", ".join(f"{name} {int(count)}" for name, count in zip(
            self.task_names, self.supervision.sum(0).tolist()))
        return (f"MultiTaskDataset({len(self)} instances, tasks {{{kinds}}}, supervised pairs "
                f"{{{pairs}}})")

    @property
    def task_names(self) -> list[str]:
        """The task names, in the order of ``tasks`` (the columns of ``supervision``)."""
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        """The column of task ``name`` in ``supervision``; ``UnknownNameError`` (a ``KeyError``
        and a ``ValueError``) naming the data set's tasks for a name it lacks."""
        names = self.task_names
        if name not in names:
            raise UnknownNameError(f"unknown task {name!r}; this data set has tasks {names}")
        return names.index(name)

    def labelled_pairs(self, tasks: Sequence[str]) -> torch.Tensor:
        """``[N, len(tasks)]`` bool (CPU): the supervised pairs of ``tasks`` whose target
        carries a label (:func:`labelled_rows`). A supervision mask given by hand may mark a
        row whose label is all ``ignore_index`` (a map without a labelled pixel): the losses
        give it 0 and the metrics count no unit of it."""
        if not tasks:
            return torch.zeros(len(self), 0, dtype=torch.bool)
        columns = [self.task_index(t) for t in tasks]
        labelled = torch.stack([labelled_rows(self.tasks[c], self.targets[self.tasks[c].name])
                                .cpu() for c in columns], dim=1)
        return self.supervision[:, columns] & labelled

    def __len__(self) -> int:
        return num_rows(self.inputs)

    def __getitem__(self, index: int) -> dict[str, object]:
        supervision = self.supervision[index]
        return {
            "input": map_leaves(lambda x: x[index], self.inputs),
            "targets": {spec.name: neutral_unsupervised(
                spec, self.targets[spec.name][index].unsqueeze(0), supervision[c:c + 1])[0]
                for c, spec in enumerate(self.tasks)},
            "supervision": supervision,
            "id": self.ids[index],
        }

    def check_values(self, what: str = "data set") -> None:
        """Raise ``ValueError`` naming ``what``, the task and the first offending row for values
        no loss can use: non-finite values in a floating-point input (integer and bool inputs,
        token ids or masks, are never non-finite), and on *supervised* pairs (the only
        targets any loss reads) class labels outside ``[0, num_classes)`` other than
        ``ignore_index``, non-finite regression targets, and non-finite depth or normal values
        at pixels the losses count as labelled (``valid_pixel_mask``: depth ``> 0``, a normal
        not the zero vector; a NaN there reads as unlabelled).

        Clean data costs one min/max pass per tensor; only data that fails it is scanned row by
        row to name the offender."""
        if len(self) == 0:
            return
        for path, leaf in named_leaves(self.inputs):
            if _all_finite(leaf):
                continue
            bad = ~torch.isfinite(leaf.reshape(len(self), -1)).all(dim=1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten()
                raise ValueError(f"{what}: the inputs{path} hold NaN or Inf in {rows.numel()} "
                                 f"rows (first: row {int(rows[0])}, id {int(self.ids[rows[0]])})")
        for column, spec in enumerate(self.tasks):
            supervised = self.supervision[:, column]
            every_row = bool(supervised.all())
            target = self.targets[spec.name] if every_row else self.targets[spec.name][supervised]
            if target.numel() == 0:
                continue
            flat = target.reshape(target.shape[0], -1)
            hint = ""
            if spec.kind in ("classification", "segmentation"):
                assert spec.num_classes is not None
                if flat.is_floating_point() and not bool((flat == flat.round()).all()):
                    raise ValueError(f"{what}: task {spec.name!r} ({spec.kind}) needs integer "
                                     f"class labels, got {target.dtype} with fractions")
                low, high = torch.aminmax(flat)
                if 0 <= float(low) and float(high) < spec.num_classes:
                    continue
                ok = is_ignore_index(flat, spec.ignore_index) | (
                    (flat >= 0) & (flat < spec.num_classes))
                problem = (f"labels outside [0, {spec.num_classes}) other than ignore_index "
                           f"{spec.ignore_index}")
                hint = _ignore_index_hint(spec, flat[~ok])
            elif spec.kind == "regression":
                if _all_finite(flat):
                    continue
                ok = torch.isfinite(flat)
                problem = "NaN or Inf targets"
                if bool(flat.isnan().any()):
                    # NaN is how pandas and many data sets write a missing value; the mask,
                    # not a value, says which pairs are unlabelled (a NaN kept on a
                    # supervised pair would make every gradient NaN).
                    hint = (f"; if NaN marks a missing label, mark those rows unsupervised: "
                            f"a supervision mask [N, T], (inputs, targets, mask) or "
                            f"MultiTaskDataset(..., supervision=mask), whose column "
                            f"{column} (task {spec.name!r}) is "
                            f"~targets[{spec.name!r}].isnan().flatten(1).any(1)")
            elif spec.kind == "binary":
                labelled = ~is_ignore_index(flat, spec.ignore_index)
                ok = ~labelled | ((flat >= 0) & (flat <= 1))  # NaN fails both comparisons
                if bool(ok.all()):
                    continue
                problem = (f"labels outside [0, 1] (or NaN) other than ignore_index "
                           f"{spec.ignore_index}")
            else:
                if not target.is_floating_point() or _all_finite(target):
                    continue
                finite = torch.isfinite(target)
                if spec.kind == "depth":
                    ok = (~(target[:, 0] > 0) | finite[:, 0]).flatten(1)
                else:
                    ok = (~(target.abs().sum(dim=1) > 0) | finite.all(dim=1)).flatten(1)
                problem = "NaN or Inf values at labelled pixels"
            bad = ~ok.all(dim=1)
            if bool(bad.any()):
                rows = torch.arange(len(self)) if every_row else supervised.nonzero().flatten()
                row = int(rows[bad.nonzero()[0]])
                raise ValueError(f"{what}: task {spec.name!r} ({spec.kind}) has {problem} on "
                                 f"{int(bad.sum())} supervised rows (first: row {row}, id "
                                 f"{int(self.ids[row])}){hint}")
        self._check_unit_normals(what)

    def _check_unit_normals(self, what: str) -> None:
        """Refuse normals targets that are no unit vectors: normals stored as colours
        (``(n + 1) / 2`` in ``[0, 1]``, or x 255) were taken as they were, and every angle
        the loss and the metrics took of them was wrong without a word. Judged as the LibMTL
        loader judges a file (:data:`NORMAL_LENGTH_SLACK`): a labelled normal longer than
        ``1 + slack``, or most of them shorter than ``1 - slack`` (one resampled from unit
        vectors is shorter, never longer). One pass over the supervised rows, in blocks of
        about 4M values."""
        for column, spec in enumerate(self.tasks):
            target = self.targets[spec.name]
            if spec.kind != "normals" or target.numel() == 0 or not target.is_floating_point():
                continue
            rows = self.supervision[:, column].nonzero().flatten()
            per_row = target[0].numel()
            step = max(1, (1 << 22) // max(per_row, 1))
            labelled = short = 0
            first_long: int | None = None
            for start in range(0, rows.numel(), step):
                block = rows[start:start + step]
                length = torch.linalg.vector_norm(
                    target[block.to(target.device)].double(), dim=1).flatten(1)
                known = torch.isfinite(length) & (length > 0)  # zero / NaN: unlabelled
                labelled += int(known.sum())
                short += int((known & (length < 1 - NORMAL_LENGTH_SLACK)).sum())
                long_rows = (known & (length > 1 + NORMAL_LENGTH_SLACK)).any(dim=1).nonzero()
                if first_long is None and long_rows.numel():
                    first_long = int(block[int(long_rows[0])])
            if first_long is None and not 2 * short > labelled:
                continue
            where = (f"a normal of length over {1 + NORMAL_LENGTH_SLACK:g} on row {first_long} "
                     f"(id {int(self.ids[first_long])})" if first_long is not None else
                     f"{short} of its {labelled} labelled normals shorter than "
                     f"{1 - NORMAL_LENGTH_SLACK:g}")
            raise ValueError(f"{what}: task {spec.name!r} (normals) needs unit vectors (the "
                             f"zero vector: unlabelled), got {where}; map normals stored as "
                             "colours in [0, 1] or [0, 255] back to [-1, 1] first")

    def warn_of_negative_depths(self, what: str = "data set") -> None:
        """Warn (at the caller's line outside the package) with :meth:`negative_depth_note`'s
        text, if it has one: ``unlearn``'s data arguments and ``evaluate``'s data."""
        note = self.negative_depth_note(what)
        if note is not None:
            warn_at_caller(note)

    def negative_depth_note(self, what: str = "data set") -> str | None:
        """A warning's text naming ``what`` and the depth tasks whose supervised targets hold
        negative values, or ``None``: depth ``<= 0`` reads as "no label" (the depth loss and
        the depth metrics skip those pixels, also for a task with a loss of its own), so
        standardised or log depths, half of them below zero, would lose those pixels without a
        word. Not an error: a negative "unknown" marker is such data's own convention. Clean
        data costs one min pass per depth task (no copy); the counts are taken in blocks of
        about 4M values."""
        notes = []
        for column, spec in enumerate(self.tasks):
            target = self.targets[spec.name]
            if spec.kind != "depth" or target.numel() == 0:
                continue
            low = target.min()  # NaN where a NaN is anywhere: then the blocks tell
            if not (bool(low < 0) or (low.is_floating_point() and bool(low.isnan()))):
                continue
            supervised = self.supervision[:, column]
            per_row = target[0].numel()
            step = max(1, (1 << 22) // max(per_row, 1))  # ~4M values (4 MiB of bools) a block
            negative = rows = pixels = 0
            for start in range(0, len(self), step):
                block = target[start:start + step]
                below = torch.count_nonzero((block < 0).flatten(1), dim=1)
                below = below[supervised[start:start + step].to(below.device)]
                negative += int(below.sum())
                rows += int((below > 0).sum())
                pixels += below.numel() * per_row
            if negative:
                notes.append(f"task {spec.name!r}: {negative} negative values "
                             f"({negative / pixels:.1%} of its supervised pixels, on {rows} "
                             "rows)")
        if not notes:
            return None
        return (f"{what}: depth targets <= 0 count as unlabelled pixels, which the built-in "
                f"depth loss and the depth metrics skip; {'; '.join(notes)}. Depths shifted or "
                "standardised below zero lose those pixels: give depths > 0 (0 = unknown)")

    def positions_of(self, instance_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Row positions of the given instance ids (integers: a sequence, NumPy array or
        tensor); raises ``KeyError`` naming unknown ids, and ``ValueError`` for fractions, a
        bool mask, a bool among the ids or ids outside int64 (``TypeError`` for no numbers at
        all)."""
        # Not cast with torch.as_tensor(dtype=long): that truncated id 43.9 to 43 and read a
        # mask's True as id 1, finding instances never named, and raised a bare "Overflow when
        # unpacking long long" for an id >= 2**63 (through ForgetRequest.validate too).
        wanted = _id_tensor(instance_ids, "MultiTaskDataset.positions_of: `instance_ids` must "
                            "be integers").reshape(-1)
        # A sort and a binary search (the ids are unique): a dict of every id cost ~0.2 s per
        # call at a million rows, and building a problem looks ids up several times.
        known = getattr(self, "_id_order", None)  # None: a set pickled before it was kept
        if known is None:
            order = torch.argsort(self.ids.to("cpu", torch.long))
            known = order, self.ids.to("cpu", torch.long)[order]
        order, ordered = known
        at = torch.searchsorted(ordered, wanted).clamp_(max=max(len(order) - 1, 0))
        found = (ordered[at] == wanted) if len(order) else torch.zeros_like(wanted,
                                                                           dtype=torch.bool)
        if not bool(found.all()):
            missing = wanted[~found].tolist()
            raise UnknownNameError(f"instance ids not in the data set: {missing[:10]}"
                                   f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
        return order[at] if len(order) else wanted.new_empty(0)

    def subset(self, positions: torch.Tensor | Sequence[int]) -> MultiTaskDataset:
        """The rows at ``positions`` (integer row positions, or a bool mask of length ``N``
        selecting its True rows; ids and supervision kept). All rows in their order share
        this set's tensors (a partial request's retain set is every instance: no copy of the
        inputs); any other selection copies them."""
        pos = _row_positions(positions, len(self), "subset")
        if pos.numel() == len(self) and torch.equal(pos, torch.arange(len(self))):
            return self.with_supervision(self.supervision)
        ids = self.ids[pos]
        # The ids are unique, so a repeated id is a repeated position: found by the sort the
        # new set needs anyway, and refused here in the caller's terms (the constructor would
        # blame `ids`, an argument the caller never passed).
        order = torch.argsort(ids.to("cpu", torch.long))
        ordered = ids.to("cpu", torch.long)[order]
        repeated = (ordered[1:] == ordered[:-1]).nonzero().flatten()
        if repeated.numel():
            first = pos.cpu()[order[repeated[0]]]
            rows = torch.unique(pos.cpu()[order[repeated]])
            raise ValueError(f"MultiTaskDataset.subset: `positions` must name each row at most "
                             f"once: position {int(first)} (id {int(ordered[repeated[0]])}) "
                             f"appears {int((pos == first.to(pos.device)).sum())} times "
                             f"(positions repeated: {rows.numel()})")
        subset = MultiTaskDataset.__new__(MultiTaskDataset)
        subset._init(take_rows(self.inputs, pos), {k: v[pos] for k, v in self.targets.items()},
                     self.tasks, ids, self.supervision[pos], (order, ordered))
        return subset

    def with_supervision(self, supervision: torch.Tensor) -> MultiTaskDataset:
        """The same rows with another supervision mask (tensors shared, not copied)."""
        shared = MultiTaskDataset.__new__(MultiTaskDataset)
        shared._init(self.inputs, self.targets, self.tasks, self.ids, supervision,
                     self._id_order)
        return shared

    def batch(self, positions: torch.Tensor | Sequence[int]) -> dict[str, object]:
        """The rows at ``positions`` (as in :meth:`subset`) already collated: the same dict
        layout that the default collate function makes of ``[self[i] for i in positions]``,
        built by one index per tensor (the per-item path costs more than a small model's step
        on CPU)."""
        pos = _row_positions(positions, len(self), "batch")
        supervision = self.supervision[pos]
        return {
            "input": take_rows(self.inputs, pos),
            "targets": {spec.name: neutral_unsupervised(spec, self.targets[spec.name][pos],
                                                        supervision[:, c])
                        for c, spec in enumerate(self.tasks)},
            "supervision": supervision,
            "id": self.ids[pos],
        }

    def iter_batches(self, batch_size: int, shuffle: bool = False,
                     generator: torch.Generator | None = None) -> Iterator[dict[str, object]]:
        """Collated batches of ``batch_size`` rows (the last one may be smaller).

        With ``shuffle`` the order is ``torch.randperm(N, generator=generator)``, so a seeded
        generator gives the same order on every run.
        """
        if batch_size < 1:
            raise ValueError(f"iter_batches: `batch_size` must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            yield self.batch(order[start:start + batch_size])


@dataclass
class Benchmark:
    """A named train/test split of one multi-task problem, with an optional validation split:
    instances from the training distribution that no model is trained on and no evaluation
    scores on (methods may calibrate on them; see ``UnlearningProblem.held_out``)."""

    name: str
    train: MultiTaskDataset
    test: MultiTaskDataset
    tasks: list[TaskSpec] = field(default_factory=list)
    info: dict[str, object] = field(default_factory=dict)
    validation: MultiTaskDataset | None = None

    def __repr__(self) -> str:
        # A LibMTL benchmark's info holds the SHA-256 of every file it read: the dataclass repr
        # printed each one (68k characters for 795 files). A long value is named by its size.
        info = ", ".join(f"{key!r}: {_short_repr(value)}" for key, value in self.info.items())
        return (f"Benchmark(name={self.name!r}, train={self.train!r}, test={self.test!r}, "
                f"tasks={self.tasks!r}, info={{{info}}}, validation={self.validation!r})")


#: The longest repr of an ``info`` value that :meth:`Benchmark.__repr__` prints as it is.
_INFO_REPR_LIMIT = 80


def _short_repr(value: object) -> str:
    text = repr(value)
    if len(text) <= _INFO_REPR_LIMIT:
        return text
    if isinstance(value, (Mapping, Sequence)) and not isinstance(value, str):
        return f"<{type(value).__name__} of {len(value):,} entries>"
    return text[:_INFO_REPR_LIMIT - 3] + "..."


def batch_to(batch: Mapping[str, object], device: torch.device | str) -> dict[str, object]:
    """A collated batch (:meth:`MultiTaskDataset.batch`) with every tensor, targets and every
    input included, on ``device`` (tensors already there are kept). Copies to an accelerator
    do not block (the kernels that read them follow on its stream); copies to the CPU do, as
    the host may read them at once."""
    blocking = torch.device(device).type == "cpu"
    out: dict[str, object] = {}
    for key, value in batch.items():
        if key == "input":
            out[key] = inputs_to(value, device, non_blocking=not blocking)  # type: ignore[arg-type]
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=not blocking)
        elif isinstance(value, Mapping):
            out[key] = {k: v.to(device, non_blocking=not blocking)
                        if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        else:
            out[key] = value
    return out
