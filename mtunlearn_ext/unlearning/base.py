"""The common interface of every unlearning method: a problem, a method, a result.

An :class:`UnlearningProblem` bundles what any method may use: the trained model, the task specs,
the forget set (only the forget pairs ``F x S`` supervised) and the retain set (every other
supervised pair, including ``F x (T \\ S)`` in a partial request), the request itself, the device
and the seed; plus, for methods that retrain, the original training recipe and a factory for a
freshly initialised model.

An :class:`Unlearner` turns a problem into an :class:`UnlearningResult`. Its public
:meth:`Unlearner.unlearn` is a template: it validates the problem, seeds every generator from
``problem.seed``, deep-copies the model (the input model is never modified), times the run and
collects the per-step loss curves that the method records through a :class:`CurveRecorder`.
Subclasses implement :meth:`Unlearner._unlearn` only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypedDict

import numpy as np
import torch
from torch import nn

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext._fields import check_field_types, integer_value, unknown_fields
from mtunlearn_ext._random import forked_generators, seed_generators
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.inputs import Inputs, describe, inputs_to
from mtunlearn_ext.data.request import ForgetRequest
from mtunlearn_ext.losses import CustomLossShapeError, _token_tagging_hint, task_loss
from mtunlearn_ext.models.copies import copy_model
from mtunlearn_ext.models.modes import (BuffersKept, eval_mode, gradients_on, ignoring_compile,
                                        measuring)
from mtunlearn_ext.surgery._autograd_graph import leaves_with_tasks
from mtunlearn_ext.training import TrainConfig
from mtunlearn_ext.unlearning.gradients import first_sentence

__all__ = [
    "CurveRecorder",
    "ModelOutputError",
    "Unlearner",
    "UnlearnerConfig",
    "UnlearningProblem",
    "UnlearningReport",
    "UnlearningResult",
    "seed_everything",
]


class ModelOutputError(TypeError):
    """A model's forward ran and returned something other than a mapping task -> prediction
    (a tuple, a dataclass). Raised by wrappers that read the output inside their own forward
    (``mtunlearn_ext.unlearn``'s), so that the problem's validation can say the model ran and
    returned the wrong type, not that it "fails on the inputs". ``type_name``: what it
    returned."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"the model must return a mapping task -> output, got {type_name}")
        self.type_name = type_name


def _output_type_error(type_name: str, task_names: Sequence[str]) -> ValueError:
    """The error for a model whose forward returns a ``type_name`` (a tuple, a dataclass)
    instead of a mapping task -> prediction: which type, and the dict to return instead."""
    keys = ", ".join(f"{t!r}: ..." for t in task_names)
    return ValueError(
        f"UnlearningProblem: the model must return a mapping task -> prediction, got "
        f"{type_name}: return a dict from its forward, {{{keys}}} (a tuple or a list does not "
        "say which output is which task's; a namedtuple's or a dataclass's field names do where "
        "`unlearn` or `build_problem` wraps the model)")


def _dtype_hint(inputs: Inputs, model: nn.Module) -> str:
    """Why a forward failed, when the floating inputs' dtype is not the floating parameters'
    (a float64 model given float32 data): the inputs are passed as they are, never cast."""
    tensors = (list(inputs.values()) if isinstance(inputs, Mapping)
               else list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
    given = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    held = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(held) != 1 or not given or given == held:
        return ""
    shown = ", ".join(sorted(str(d).removeprefix("torch.") for d in given))
    (dtype,) = held
    return (f" (the inputs are {shown}, the model's parameters "
            f"{str(dtype).removeprefix('torch.')}, and inputs are passed as they are, never "
            f"cast: if that is the failure, give them in the model's dtype, e.g. "
            f"`x.to({dtype})`)")


def _keyword_only_hint(inputs: Inputs, model: nn.Module) -> str:
    """Why a forward failed, when it takes its inputs by keyword only (``forward(self, *,
    pixel_values)``) and they came positionally: inputs given as a dict are passed by
    keyword."""
    if isinstance(inputs, Mapping):
        return ""
    inner = getattr(model, "module", None)  # the user's module inside unlearn's wrapper
    module = inner if isinstance(inner, nn.Module) else model
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):  # a forward with no signature to read
        return ""
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                      p.VAR_POSITIONAL)]
    keywords = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY]
    if positional or not keywords:
        return ""
    given = ", ".join(f"{k!r}: ..." for k in keywords)
    return (f" (its forward takes keyword arguments only, {keywords}: give the inputs as a "
            f"dict, ({{{given}}}, targets), which is passed by keyword)")


def seed_everything(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """Seed Python, NumPy and torch's global generators; return a fresh CPU generator seeded with
    ``seed`` for the method's own sampling (so that sampling does not depend on what else drew
    from the global generator before). ``device``: seed only the torch generators a run there
    draws from (the CPU one, and that CUDA device's), so that the caller's others are left
    alone; ``None``: every one (``torch.manual_seed``)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    if device is None:
        torch.manual_seed(seed)
    else:
        seed_generators(seed, device)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass
class UnlearningProblem:
    """One unlearning request on one trained model.

    Attributes:
        model: the trained (original) model; methods read it and never modify it.
        tasks: every task of the model, in the data set's column order.
        forget: the forget instances with only the forget pairs ``F x S`` supervised.
        retain: every instance keeping a supervised pair, with the forget pairs cleared.
        request: the request that produced the split.
        target_tasks: ``S``, the tasks whose supervision of ``F`` is removed.
        device: where the method computes.
        seed: seeds every random choice of the method (batch order, random labels, ...).
        train_config: the original training recipe (``mtunlearn_ext.training.TrainConfig``);
            needed by methods that retrain or fine-tune with the original recipe.
        model_factory: ``() -> nn.Module``, a freshly initialised model built exactly as the
            original was (same architecture and initialisation seed); needed by retraining.
        held_out: optional instances from the training distribution that the original model
            never saw (a validation split; never the test split an evaluation scores on). A
            retrained model fits the forget instances about as well as such unseen data, so a
            method may read the original model's losses on them to know how far forgetting
            should go (:class:`~mtunlearn_ext.unlearning.interference_aware.InterferenceAware`
            calibrates its forget caps on them).
    """

    model: nn.Module
    tasks: list[TaskSpec]
    forget: MultiTaskDataset
    retain: MultiTaskDataset
    request: ForgetRequest
    target_tasks: list[str]
    device: torch.device | str = "cpu"
    seed: int = 0
    train_config: TrainConfig | None = None
    model_factory: Callable[[], nn.Module] | None = None
    held_out: MultiTaskDataset | None = None

    @classmethod
    def from_request(cls, model: nn.Module, dataset: MultiTaskDataset, request: ForgetRequest,
                     *, device: torch.device | str = "cpu", seed: int = 0,
                     train_config: TrainConfig | None = None,
                     model_factory: Callable[[], nn.Module] | None = None,
                     held_out: MultiTaskDataset | None = None) -> UnlearningProblem:
        """Validate ``request`` against the training set ``dataset`` and split it."""
        request.validate(dataset)
        forget, retain = request.split(dataset)
        return cls(model=model, tasks=list(dataset.tasks), forget=forget, retain=retain,
                   request=request, target_tasks=request.resolved_tasks(dataset), device=device,
                   seed=seed, train_config=train_config, model_factory=model_factory,
                   held_out=held_out)

    @property
    def task_names(self) -> list[str]:
        """Every task's name, in the data's column order."""
        return [t.name for t in self.tasks]

    @property
    def is_full(self) -> bool:
        """Full-task request: every task is a target."""
        return set(self.target_tasks) == set(self.task_names)

    @property
    def non_target_tasks(self) -> list[str]:
        """The tasks the request leaves supervised (empty for a full request)."""
        return [t for t in self.task_names if t not in self.target_tasks]

    def spec(self, name: str) -> TaskSpec:
        """The :class:`TaskSpec` of task ``name``; ``UnknownNameError`` (a ``KeyError`` and a
        ``ValueError``) naming the problem's tasks for a name it lacks."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise UnknownNameError(f"unknown task {name!r}; the problem has tasks {self.task_names}")

    def target_specs(self) -> list[TaskSpec]:
        """The specs of the target tasks, in the data's column order."""
        return [t for t in self.tasks if t.name in self.target_tasks]

    def validate(self) -> None:
        """Raise a clear error if the parts of the problem do not fit together (and warn when
        a model of several tasks has no ``parameter_split()``: every parameter then counts as
        shared, so no head is task-specific for the methods). Its probing forwards ignore
        ``torch.compile``, as the run does: a compile there would be thrown away."""
        with ignoring_compile():
            self._validate()

    def _validate(self) -> None:
        names = self.task_names
        if len(names) > 1 and getattr(self.model, "parameter_split", None) is None:
            warn_at_caller(
                f"UnlearningProblem: the model ({type(self.model).__name__}) has no "
                "parameter_split(), so every parameter counts as shared and no head as "
                f"task-specific for the tasks {names}; subclass MultiTaskModel, or build the "
                "problem with mtunlearn_ext.api.build_problem(..., shared_parameters=...)")
        parts = [("forget", self.forget), ("retain", self.retain)]
        if self.held_out is not None:
            parts.append(("held_out", self.held_out))
        for label, ds in parts:
            if ds.task_names != names:
                raise ValueError(f"UnlearningProblem: the {label} set has tasks {ds.task_names}, "
                                 f"the problem {names} (same tasks, same order required)")
        for label, ds in parts:
            ds.check_values(f"UnlearningProblem: the {label} set")
        unknown = [t for t in self.target_tasks if t not in names]
        if unknown or not self.target_tasks:
            raise ValueError(f"UnlearningProblem: target tasks {self.target_tasks} must be a "
                             f"non-empty subset of {names}")
        # Before the bare emptiness checks: an empty forget set is most often a request whose
        # instances have no label of the target tasks, and the error must say which tasks.
        target_cols = [self.forget.task_index(t) for t in self.target_tasks]
        if len(self.forget) == 0:
            raise ValueError(f"UnlearningProblem: the forget set is empty: no instance of the "
                             f"request has a supervised pair of the target tasks "
                             f"{self.target_tasks}, so there is nothing to forget")
        if not bool(self.forget.supervision[:, target_cols].any()):
            raise ValueError(f"UnlearningProblem: the forget set supervises no pair of the target "
                             f"tasks {self.target_tasks}: there is nothing to forget (are its "
                             "targets or its supervision mask those of other tasks?)")
        self._check_disjoint_pairs()
        if len(self.retain) == 0:
            raise ValueError("UnlearningProblem: the retain set is empty")
        if not bool(self.retain.supervision.any()):
            raise ValueError(f"UnlearningProblem: the retain set has {len(self.retain)} "
                             "instances but no supervised pair: nothing would keep the other "
                             "tasks and instances as they are (is its supervision mask all "
                             "False, or are its targets the 'no label' value?)")
        non_target_cols = [self.forget.task_index(t) for t in self.non_target_tasks]
        if non_target_cols and bool(self.forget.supervision[:, non_target_cols].any()):
            raise ValueError("UnlearningProblem: the forget set supervises a non-target task; "
                             "build it with ForgetRequest.split")
        seed = integer_value(self.seed)
        if seed is None or not 0 <= seed < 2 ** 63:
            raise ValueError(f"UnlearningProblem: `seed` must be an integer in [0, 2**63), got "
                             f"{self.seed!r}")
        self.seed = seed  # NumPy's integers too: the report holds the seed, and is JSON
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"UnlearningProblem: `device` {self.device!r} is no torch device "
                             f"({error})") from error
        if device.type == "cuda" and (not torch.cuda.is_available() or (
                device.index is not None and device.index >= torch.cuda.device_count())):
            raise ValueError(f"UnlearningProblem: `device` {str(device)!r} is not available here "
                             f"(torch.cuda.is_available() is {torch.cuda.is_available()}, "
                             f"{torch.cuda.device_count()} devices); use 'cpu'")
        if device.type not in ("cpu", "cuda", "meta"):
            try:  # mps, xpu, ...: torch says only when memory is first asked of it
                torch.empty(0, device=device)
            except Exception as error:  # RuntimeError (mps), AssertionError (xpu), ImportError
                said = first_sentence(error)
                raise ValueError(f"UnlearningProblem: `device` {str(device)!r} is not available "
                                 f"here ({said}); use 'cpu'") from error
        if self.held_out is not None:
            if len(self.held_out) == 0:
                raise ValueError("UnlearningProblem: the held_out set is empty (pass None to "
                                 "go without one)")
            self.check_unseen(self.held_out, "UnlearningProblem: the held_out set")
        self.check_model_state()
        self.check_model_on(self.retain, "the retain set")
        self.check_model_on(self.forget, "the forget set")
        if self.held_out is not None:
            self.check_model_on(self.held_out, "the held_out set")
        self.check_targets_reach_parameters(self.forget)
        self.check_heads_feed_their_tasks(self.retain)

    def check_targets_reach_parameters(self, data: MultiTaskDataset) -> None:
        """Raise when a target task's prediction depends on no trainable parameter (its head
        frozen, reading the trunk's output detached): no step can forget it, and the
        forgetting gradient failed in autograd ("element 0 of tensors does not require
        grad") or, for methods that only fine-tune, nothing was said. One eval-mode forward
        of up to :attr:`PROBE_CHUNK` rows of ``data`` (the forget set), its buffers kept."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params or len(data) == 0:  # all frozen: the unlearners name that themselves
            return
        # gradients_on, not enable_grad: under a caller's inference_mode nothing would
        # require grad (every target task would look unreached), and rows taken there would
        # be inference tensors, which autograd cannot save.
        with BuffersKept(self.model), eval_mode(self.model), gradients_on():
            rows = data.batch(torch.arange(min(self.PROBE_CHUNK, len(data))))
            inputs: Inputs = rows["input"]  # type: ignore[assignment]
            out = self.model(inputs_to(inputs, params[0].device))
        unreached = [t for t in self.target_tasks
                     if isinstance(out[t], torch.Tensor) and not out[t].requires_grad]
        if unreached:
            raise ValueError(
                f"UnlearningProblem: the model's prediction for target task(s) {unreached} "
                "depends on no trainable parameter (a frozen head reading detached features, "
                "or an output computed without grad), so no step can forget it; unfreeze the "
                "parameters that task should move (`requires_grad_(True)` on its head), or "
                "leave the task out of the request")

    #: How many retained instances :meth:`check_heads_feed_their_tasks` runs the model on,
    #: and how many at a time.
    PROBED_ROWS: ClassVar[int] = 128
    PROBE_CHUNK: ClassVar[int] = 16

    def check_heads_feed_their_tasks(self, data: MultiTaskDataset) -> None:
        """For a split built from :func:`~mtunlearn_ext.unlearn`'s arguments: read which task
        predictions each trainable parameter feeds, from the autograd graphs of eval-mode
        forwards of up to :attr:`PROBED_ROWS` instances of ``data`` (walks of the graphs:
        nothing is computed backwards), and

        - raise when a head parameter of one task does not feed that task's prediction but
          another's (heads given to the wrong tasks: each head would be stepped with the other
          task's gradients, silently); warn when one feeds other tasks' predictions besides
          its own (a module several tasks use, found as one task's head, or a cascade);
        - warn when parameters given as shared feed only one task's prediction (the heads
          counted as trunk, ``shared_parameters=lambda n: True``): the shared projections then
          move that head with directions made of the other tasks' gradients."""
        split_of = getattr(self.model, "parameter_split", None)
        if not callable(split_of):  # all shared (the validation warns of it): no head to check
            return
        if not getattr(self.model, "split_from_arguments", False):
            # A model's own parameter_split() (the library's models, a user's MultiTaskModel)
            # is its design, not a guess from names; the check (~0.2 s on the benchmarks'
            # models) is for the split `unlearn` builds from its arguments.
            return
        split = split_of()
        params = dict(self.model.named_parameters())
        if len(self.task_names) < 2 or len(data) == 0 or not params:
            return
        # Rows a chunk at a time (the graph of one chunk kept at once), until every checked
        # parameter is reached and none is suspect (one chunk for a model that runs every
        # parameter on every row), or PROBED_ROWS: a model that routes each row through some
        # experts only (a per-task top-1 gate) reaches an expert from some rows, and a few
        # rows judged it by chance. More rows only add tasks to what a parameter feeds.
        heads = [(t, n) for t in self.task_names for n in split.heads.get(t, ())
                 if n in params and params[n].requires_grad]
        shared = [n for n in split.shared if n in params and params[n].requires_grad]
        probed = min(self.PROBED_ROWS, len(data))
        device = next(iter(params.values())).device  # where check_model_on sends inputs too
        feeds: dict[int, set[str]] = {}
        walked: set[str] = set()

        def fed(name: str) -> list[str]:
            return [t for t in self.task_names if t in feeds.get(id(params[name]), ())]

        def settled() -> bool:
            return (all(t in fed(n) for t, n in heads)
                    and all(len(fed(n)) > 1 for n in shared))

        read = 0
        # gradients_on, not enable_grad: under a caller's inference_mode no prediction required
        # grad, and the check passed heads given to the wrong tasks without a word.
        with BuffersKept(self.model), gradients_on():  # one snapshot for the walk: it probes
            while read < probed and not (read and settled()):
                rows = data.batch(torch.arange(read, min(read + self.PROBE_CHUNK, probed)))
                read = min(read + self.PROBE_CHUNK, probed)
                inputs: Inputs = rows["input"]  # type: ignore[assignment]
                with eval_mode(self.model):
                    out = self.model(inputs_to(inputs, device))
                tasks = [t for t in self.task_names
                         if isinstance(out[t], torch.Tensor) and out[t].requires_grad]
                walked.update(tasks)
                for leaf, mask in leaves_with_tasks([out[t] for t in tasks]):
                    feeds.setdefault(id(leaf), set()).update(
                        t for i, t in enumerate(tasks) if mask >> i & 1)
                del out
        if len(walked) < 2:
            return
        prefix = getattr(self.model, "wrapped_prefix", "")
        given_to_heads = Counter(name for _, name in heads)
        reused: dict[str, dict[str, list[str]]] = {}
        for t, name in heads:
            tasks = fed(name)
            if tasks and t not in tasks:
                raise ValueError(
                    f"UnlearningProblem: parameter {name.removeprefix(prefix)!r} is given to "
                    f"the head of task {t!r}, but the model's prediction for {t!r} does not "
                    f"depend on it, while that for {tasks} does (read from the autograd graph "
                    f"of the first {read} retained instances): the heads are given to the "
                    "wrong tasks (check `head_parameters`, or the module names the heads are "
                    "found by)")
            if len(tasks) > 1 and given_to_heads[name] == 1:  # in several: named later
                reused.setdefault(t, {})[name.removeprefix(prefix)] = [
                    other for other in tasks if other != t]
        # Warned, not refused: a cascade (task b's head reading task a's prediction) is a
        # design, and one that runs; a module found in the wrong head is a mistake.
        for t, feeding in reused.items():
            others = sorted({o for tasks_of in feeding.values() for o in tasks_of})
            shown = ", ".join(repr(n) for n in list(feeding)[:3]) + (
                ", ..." if len(feeding) > 3 else "")
            many = len(feeding) > 1
            warn_at_caller(
                f"UnlearningProblem: {len(feeding)} parameter{'s' if many else ''} "
                f"given to the head of task {t!r} ({shown}) also feed"
                f"{'' if many else 's'} the model's predictions for {others} (read "
                f"from the autograd graph of the first {read} retained instances): the head's "
                "steps move those predictions unprotected (the projections protect other "
                "tasks only through shared parameters); if several tasks use them by design "
                "(a cascade), list them in `shared_parameters` to protect those tasks, else "
                "give each task a module of its own")
        unused = [name.removeprefix(prefix) for name in shared if not fed(name)]
        unused += [name.removeprefix(prefix) for t, name in heads if not fed(name)]
        if unused:
            shown = ", ".join(repr(n) for n in unused[:3]) + (", ..." if len(unused) > 3 else "")
            warn_at_caller(f"UnlearningProblem: {len(unused)} trainable parameter"
                           f"{'s' if len(unused) > 1 else ''} ({shown}) feed"
                           f"{'' if len(unused) > 1 else 's'} no task's prediction (read from "
                           f"the autograd graph of the first {read} retained instances): no "
                           "gradient reaches them, so the gradient methods leave them as they "
                           "are; if the model uses them only in training mode or on other "
                           "inputs, that is expected, otherwise they are left over (freeze "
                           "them: `p.requires_grad_(False)`)")
        alone: dict[str, list[str]] = {}
        for name in shared:
            if len(tasks := fed(name)) == 1:
                alone.setdefault(tasks[0], []).append(name.removeprefix(prefix))
        for t, names in alone.items():
            shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            warn_at_caller(f"UnlearningProblem: {len(names)} parameter"
                           f"{'s' if len(names) > 1 else ''} given as shared ({shown}) feed"
                           f"{'' if len(names) > 1 else 's'} only the prediction of task {t!r} "
                           f"(read from the autograd graph of the first {read} retained "
                           "instances): as shared parameters, the projections move them with "
                           "directions made of the other tasks' gradients; if they belong to "
                           f"that task, give them to it (`head_parameters={{{t!r}: [...]}}`)")

    def check_model_state(self) -> None:
        """Raise naming the first offending tensor when the model's parameters or buffers hold
        no values (the meta device) or are inference tensors (autograd refuses them), when a
        parameter holds NaN or Inf (a broken model: every loss and projection after would read
        them, and the errors would name whatever fails first), or when a trainable parameter
        is float16 / bfloat16: the steps write straight into the parameters, and in those
        formats most unlearning updates round away (a bfloat16 weight keeps 8 bits)."""
        prefix = getattr(self.model, "wrapped_prefix", "")
        named: list[tuple[str, str, torch.Tensor]] = [
            ("parameter", n, t) for n, t in self.model.named_parameters()]
        named += [("buffer", n, t) for n, t in self.model.named_buffers()]
        for kind, name, tensor in named:
            shown = name.removeprefix(prefix)
            if tensor.is_meta:
                raise ValueError(f"UnlearningProblem: the model's {kind} {shown!r} is on the "
                                 "meta device and holds no values; load the trained weights "
                                 "first")
            if tensor.is_inference():
                # Autograd refuses to save one for backward; the first op to touch it with
                # grad on failed with an unrelated message (`abs(): functions with out=...`).
                raise ValueError(f"UnlearningProblem: the model's {kind} {shown!r} is an "
                                 "inference tensor (made or loaded under "
                                 "torch.inference_mode()), which autograd cannot take gradients "
                                 "through; build or load the model outside inference_mode "
                                 "(torch.no_grad() is enough to load weights), or unlearn "
                                 "`copy.deepcopy(model)`, whose tensors are ordinary ones")
            # Buffers may hold Inf on purpose (an attention mask); weights may not.
            if kind == "parameter" and tensor.is_floating_point() \
                    and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"UnlearningProblem: the model's {kind} {shown!r} holds NaN or "
                                 "Inf: the model is broken (unlearning would read non-finite "
                                 "losses); check the checkpoint")
        low = [(n, p.dtype) for n, p in self.model.named_parameters()
               if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
        if low:
            name, dtype = low[0]
            raise ValueError(
                f"UnlearningProblem: {len(low)} trainable parameter(s) are {dtype} (first: "
                f"{name.removeprefix(prefix)!r}); the unlearning steps write into the parameters, "
                f"and in {str(dtype).removeprefix('torch.')} most updates would round away. "
                "Unlearn a float32 copy and cast the result back: "
                f"`new, report = unlearn(copy.deepcopy(model).float(), ...)` (`.float()` "
                f"alone casts the model itself), then `new.to({dtype})`")

    def check_unseen(self, data: MultiTaskDataset, what: str) -> None:
        """Raise if ``data`` shares an instance id with the training set (forget or retain):
        held-out or audit data must hold instances the model was never trained on."""
        trained = set(self.forget.ids.tolist()) | set(self.retain.ids.tolist())
        shared = sorted(trained.intersection(data.ids.tolist()))
        if shared:
            raise ValueError(f"{what} shares {len(shared)} instance ids with the training set "
                             f"(first: {shared[:5]}); it must hold instances the model was "
                             "never trained on")

    def _check_disjoint_pairs(self) -> None:
        """No (instance, task) pair may be supervised in both the forget and the retain set (an
        instance may be in both with different tasks: a partial request)."""
        if not len(self.retain):
            return
        order = torch.argsort(self.retain.ids)
        sorted_ids = self.retain.ids[order]
        pos = torch.searchsorted(sorted_ids, self.forget.ids).clamp(max=len(sorted_ids) - 1)
        f_rows = (sorted_ids[pos] == self.forget.ids).nonzero().flatten()
        if not f_rows.numel():
            return
        r_rows = order[pos[f_rows]]
        clash = self.forget.supervision[f_rows] & self.retain.supervision[r_rows]
        if bool(clash.any()):
            first, column = (int(v) for v in clash.nonzero()[0])
            raise ValueError(
                f"UnlearningProblem: {int(clash.sum())} pairs are supervised in both the forget "
                f"and the retain set (first: instance id {int(self.forget.ids[f_rows[first]])}, "
                f"task {self.task_names[column]!r}); the retain set must not hold the pairs to "
                "forget (ForgetRequest.split removes them)")

    @torch.no_grad()
    def check_model_on(self, data: MultiTaskDataset, what: str = "the data") -> None:
        """One eval-mode forward of a few rows of ``data`` (the first two and the first
        supervised row of each task): the model must run on its inputs and return a prediction
        for every task that the task's loss accepts on a supervised row (an unsupervised pair's
        target may hold anything, so it is never fed to a loss). ``what`` names the set in the
        errors (validation checks the retain, forget and held-out sets; :func:`unlearn` the
        audit set)."""
        if len(data) == 0:
            return
        supervision = data.supervision
        picks = set(range(min(2, len(data))))
        for column in range(supervision.shape[1]):
            rows_of_task = supervision[:, column].nonzero().flatten()
            if rows_of_task.numel():
                picks.add(int(rows_of_task[0]))
        positions = torch.tensor(sorted(picks))
        # By id: a position in the retain set is no row of the data the caller passed.
        checked = f"the instances of id {data.ids[positions].tolist()}"
        rows = data.batch(positions)
        inputs: Inputs = rows["input"]  # type: ignore[assignment]
        targets = rows["targets"]
        assert isinstance(targets, Mapping)
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        try:
            with measuring(self.model):
                out = self.model(inputs_to(inputs, device))
        except Exception as error:
            if isinstance(error, ModelOutputError):  # it ran: its output has the wrong type
                raise _output_type_error(error.type_name, self.task_names) from error
            raise ValueError(f"UnlearningProblem: the model fails on {what}'s inputs (a "
                             f"batch of {describe(inputs)}): {type(error).__name__}: "
                             f"{error}{_dtype_hint(inputs, self.model)}"
                             f"{_keyword_only_hint(inputs, self.model)}") from error
        if not isinstance(out, Mapping):
            raise _output_type_error(type(out).__name__, self.task_names)
        missing = [t for t in self.task_names if t not in out]
        if missing:
            others = [str(k) for k in out if k not in self.task_names]
            # Keys of its own (`kind_logits`) are no task's until the output or the tasks say
            # which: a guess by name could pair a task with another task's output.
            hint = (f"; the output's keys are read as task names: return the tasks' "
                    f"predictions under {list(self.task_names)}, or name the tasks (in `tasks` "
                    f"and the targets) as the model names its outputs" if others else "")
            raise ValueError(f"UnlearningProblem: the model's output has no prediction for "
                             f"tasks {missing} (it returns {sorted(out)}){hint}")
        for column, spec in enumerate(self.tasks):
            pred = out[spec.name]
            if not isinstance(pred, torch.Tensor):
                # Every loss, metric and gradient reads one tensor per task; a container
                # reached them as an index error from deep inside.
                raise ValueError(f"UnlearningProblem: the model's prediction for task "
                                 f"{spec.name!r} ({spec.kind}) is a {type(pred).__name__}, not "
                                 f"a tensor: return the task's prediction itself under "
                                 f"{spec.name!r} (e.g. the logits or values of a dict or tuple "
                                 f"its head returns), and other outputs under names that are "
                                 f"not tasks (ignored)")
            if spec.kind in ("classification", "segmentation") and (
                    pred.dim() < 2
                    or pred.shape[1] != spec.num_classes):
                # The metrics and the forgetting objectives count classes along dimension 1.
                hint = _token_tagging_hint(spec.kind, pred)
                raise ValueError(f"UnlearningProblem: the model's prediction for task "
                                 f"{spec.name!r} ({spec.kind}) has shape {tuple(pred.shape)}, "
                                 f"but the task "
                                 f"has num_classes {spec.num_classes}: dimension 1 must hold "
                                 f"one score per class{hint}")
            labelled = supervision[positions, column].to(device)
            if not bool(labelled.any()):
                continue
            target = targets[spec.name].to(device)[labelled]
            try:
                task_loss(spec, out[spec.name][labelled], target)
            except CustomLossShapeError as error:  # the loss's fault, not the targets'
                raise ValueError(f"UnlearningProblem: the custom `loss` of task {spec.name!r} "
                                 f"(checked on {checked} of {what}): {error}; e.g. "
                                 "`reduction='none'` and a mean over every dimension but the "
                                 "first") from error
            except ValueError as error:
                # The loss saw a few rows: name the set, its targets' whole shape and the rows.
                raise ValueError(f"UnlearningProblem: {what}'s targets for task {spec.name!r} "
                                 f"(shape {tuple(data.targets[spec.name].shape)}, "
                                 f"{len(data)} instances) do not fit the model's prediction "
                                 f"(checked on {checked}): {error}"
                                 f"{_class_target_hint(spec, target)}") from error


def _class_target_hint(spec: TaskSpec, target: torch.Tensor) -> str:
    """What a classification task's common wrong targets need: ``[N, 1]`` labels a squeeze,
    one-hot or multi-label rows a class index or a loss of their own."""
    if spec.kind != "classification" or target.dim() != 2 or spec.loss is not None:
        return ""
    if target.shape[1] == 1:
        return "; class labels are [N] integers: `labels.squeeze(1)`"
    return ("; class labels are [N] integers (one-hot rows: `labels.argmax(1)`); other "
            "targets, multi-label ones say, need the task's own loss: "
            f"TaskSpec({spec.name!r}, 'classification', num_classes=..., loss=...)")


@dataclass
class UnlearnerConfig:
    """Base of every method's configuration: a small dataclass with validated fields.

    Subclasses add fields and extend :meth:`validate`; :meth:`to_dict` is what reports record.
    """

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value of the wrong type (here: each
        field against its annotation, so that ``steps=1.5`` or ``coupled="yes"`` is refused
        rather than half-used) or, in subclasses, out of range."""
        check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict field -> value (what a report's ``config`` holds)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> UnlearnerConfig:
        """A copy with some fields changed (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)


class CurveRecorder:
    """Per-step scalar curves (``name -> [values]``) that a method records while it runs.

    ``log(step, forget_loss=..., retain_loss=..., **more)``: every call appends one point per
    named value; ``steps`` holds the step index of each point for every curve. Values are stored
    as Python floats, the tensors of one call read in one host transfer (on CUDA one sync per
    logged step, not one per value: a step logs about 9).
    """

    def __init__(self) -> None:
        self.curves: dict[str, list[float]] = {}
        self.steps: dict[str, list[int]] = {}

    def log(self, step: int, **values: float | torch.Tensor | None) -> None:
        """Append each named value to its curve at ``step``; ``None`` values are skipped,
        tensors (one element each) read to floats."""
        given = {name: value for name, value in values.items() if value is not None}
        tensors = [v for v in given.values() if isinstance(v, torch.Tensor)]
        read: dict[int, float] = {}
        if len(tensors) > 1 and len({t.device for t in tensors}) == 1 and all(
                t.numel() == 1 for t in tensors):
            # float64 holds every float32 / float16 / bfloat16 value exactly: the same numbers
            # as one .item() each.
            numbers = torch.stack([t.detach().reshape(()).to(torch.float64)
                                   for t in tensors]).tolist()
            read = {id(t): n for t, n in zip(tensors, numbers)}
        for name, value in given.items():
            if isinstance(value, torch.Tensor):
                number = read[id(value)] if id(value) in read else float(value.detach().item())
            else:
                number = float(value)
            self.curves.setdefault(name, []).append(number)
            self.steps.setdefault(name, []).append(int(step))


class EarlierRequest(TypedDict):
    """One earlier request of a chain of removals, in :class:`RequestFacts`."""

    ids_sha256: str
    num_instances: int
    target_tasks: list[str] | None


class RequestFacts(TypedDict, total=False):
    """:attr:`UnlearningReport.request`: what the request removed. :meth:`Unlearner.unlearn`
    fills the pair counts, ``target_tasks``, ``full`` and ``ids_sha256`` (SHA-256 of the sorted
    instance ids); :func:`mtunlearn_ext.unlearn` adds ``ids_named_by`` (what the ids index),
    and with ``train_data`` the chain of removals before it: ``earlier_requests`` and
    ``earlier_pairs_excluded`` (their pairs left out of the retain set)."""

    num_forget_instances: int
    num_forget_pairs: int
    num_retain_pairs: int
    target_tasks: list[str]
    full: bool
    ids_sha256: str
    ids_named_by: str
    earlier_requests: list[EarlierRequest]
    earlier_pairs_excluded: int


def resolved_settings(report: Any) -> dict[str, Any]:
    """The method's settings as the run used them, for a record: the report's ``config``, with
    the settings it left to a default (``None``) as the run resolved them
    (``report.extra["resolved_settings"]``: the forget objectives built, retraining's recipe
    seed), so that given explicitly they reproduce the run. The report's own ``config`` is
    left as the method stored it. ``report``: an :class:`UnlearningReport` (or anything with
    its ``config`` and ``extra``)."""
    settings = dict(report.config)
    resolved = report.extra.get("resolved_settings")
    if isinstance(resolved, Mapping):
        settings.update({k: v for k, v in resolved.items() if settings.get(k) is None})
    return settings


@dataclass(repr=False)
class UnlearningReport:
    """What a run did: the method, its settings, wall time and loss curves.

    Attributes:
        method: registry name of the method.
        config: the method's configuration as a dict.
        wall_time_s: wall-clock seconds of :meth:`Unlearner.unlearn`, copy included.
        steps: number of optimisation steps taken (or epochs x batches for retraining).
        curves: ``name -> values``; at least ``forget_loss`` and ``retain_loss`` for step-based
            methods (mean task loss over the target tasks on the forget batch, and over every
            task on the retain batch, measured before the step), plus per-task curves
            ``forget_loss/<task>``, ``retain_loss/<task>``.
        curve_steps: ``name -> step index`` of each point.
        request: number of forget instances, target tasks, full or partial, ids hash
            (:class:`RequestFacts`: typed keys, so that a type checker knows each value).
        extra: method-specific facts (e.g. the saliency mask's density);
            ``extra["resolved_settings"]``: settings the config left to a default, as the run
            resolved them (given explicitly, they reproduce the run).
        seed, device, threads: the problem's seed, the device and torch's intra-op CPU thread
            count of the run: with the same code and torch build, what the weights depend on
            (``None`` in a report not made by :meth:`Unlearner.unlearn`).
    """

    method: str
    config: dict[str, Any]
    wall_time_s: float = 0.0
    steps: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)
    curve_steps: dict[str, list[int]] = field(default_factory=dict)
    request: RequestFacts = field(default_factory=RequestFacts)
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    device: str | None = None
    threads: int | None = None

    def __repr__(self) -> str:
        # The curves hold a value per logged step (thousands of numbers): the dataclass repr
        # printed every one; this names them with their last values, as a REPL wants it.
        curves = ", ".join(f"{name}: {len(values)} points, last {values[-1]:.4g}"
                           if values else f"{name}: empty" for name, values in self.curves.items())
        return (f"UnlearningReport(method={self.method!r}, steps={self.steps}, "
                f"wall_time_s={self.wall_time_s:.3g}, request={self.request!r}, "
                f"seed={self.seed!r}, device={self.device!r}, threads={self.threads!r}, "
                f"curves={{{curves}}}, config: {len(self.config)} settings, extra: "
                f"{sorted(self.extra)}; to_dict() holds everything)")

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data for JSON: every NaN or infinite number (a diverged
        loss, in the curves or in ``extra``'s summary) becomes ``None``."""
        return _finite_or_none(dataclasses.asdict(self))


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, replaced
    by ``None`` (JSON has no NaN/Inf: ``json.dumps`` wrote ``NaN``, which strict parsers
    refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_finite_or_none(item) for item in value]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


@dataclass
class UnlearningResult:
    """The unlearned model (a new module, in eval mode, on the problem's device) and its report."""

    model: nn.Module
    report: UnlearningReport


class Unlearner(ABC):
    """An unlearning method.

    Subclasses set the class attributes ``name`` (registry name) and ``config_class`` (a
    :class:`UnlearnerConfig` subclass) and implement :meth:`_unlearn`, which receives a deep copy
    of the model (already on the problem's device) and edits it in place.

    Construction: ``Method(config)`` or ``Method(**fields)`` (fields override the defaults), or
    through the registry, ``get_unlearner("neggrad_plus", steps=50)``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[UnlearnerConfig]] = UnlearnerConfig
    #: Whether :meth:`_unlearn` edits a copy of the original model (``False`` for methods that
    #: build a new model, such as retraining, so no copy is made).
    edits_original: ClassVar[bool] = True

    def __init__(self, config: UnlearnerConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = self.config_class(**overrides)
        else:
            if not isinstance(config, self.config_class):
                raise TypeError(f"{type(self).__name__}: `config` must be a "
                                f"{self.config_class.__name__}, got {type(config).__name__}")
            if overrides:
                config = config.replace(**overrides)
        config.validate()
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def unlearn(self, problem: UnlearningProblem, *, validated: bool = False
                ) -> UnlearningResult:
        """Unlearn ``problem`` and return a new model; ``problem.model`` is left untouched.

        Seeds Python/NumPy/torch from ``problem.seed`` inside a forked random state (so a run is
        reproducible on one device with one thread count, and the caller's generators are left
        as they were), deep-copies the model to ``problem.device``, runs :meth:`_unlearn` and
        returns the copy in eval mode, its parameters without ``.grad``, with a report. The run
        ignores ``torch.compile`` (``torch.compiler.set_stance("force_eager")``): a compiled
        submodule runs as written, and the returned copy is compiled again at its next call.

        Args:
            problem: the request, data and model.
            validated: ``True`` for a problem whose :meth:`UnlearningProblem.validate` has just
                passed and that has not changed since (the one
                :func:`~mtunlearn_ext.api.build_problem` returns): it is not validated again,
                so its probing forwards (the model run on the retain, forget and held-out sets)
                and its warnings are not repeated.
        """
        if not isinstance(validated, bool):
            raise TypeError(f"{type(self).__name__}.unlearn: `validated` must be True or False, "
                            f"got {validated!r}")
        if not validated:
            problem.validate()
        self.check_problem(problem)
        device = torch.device(problem.device)
        # The caller's random state is left as it was: the run draws from seeded forks.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            # A torch.compile'd submodule runs eagerly: a step keeps the graph for a second
            # backward pass (or runs the model under torch.func), which a backward compiled
            # with donated buffers cannot serve, and a few steps would not repay the compile.
            with forked_generators(device), ignoring_compile(), gradients_on():
                return self._run(problem, device)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def check_problem(self, problem: UnlearningProblem) -> None:
        """Raise ``ValueError`` / ``KeyError`` if this method's settings cannot run on
        ``problem`` (a setting that names a task the problem lacks, a data set it does not
        hold), before any work; :meth:`unlearn` calls it, and so may a caller that wants to
        report such an error as bad settings. The base class accepts every problem."""

    def _run(self, problem: UnlearningProblem, device: torch.device) -> UnlearningResult:
        start = time.perf_counter()
        generator = seed_everything(problem.seed, device)  # the generators forked above
        # The input model is never handed to a method: either a private copy or nothing.
        model = copy_model(problem.model).to(problem.device) if self.edits_original else None
        recorder = CurveRecorder()
        # What a rerun must repeat besides the settings: another thread count splits the sums
        # otherwise, so the weights differ in their last bits.
        report = UnlearningReport(method=self.name, config=self.config.to_dict(),
                                  seed=problem.seed, device=str(device),
                                  threads=torch.get_num_threads())
        report.request = {
            "num_forget_instances": len(problem.forget),
            "num_forget_pairs": int(problem.forget.supervision.sum()),
            "num_retain_pairs": int(problem.retain.supervision.sum()),
            "target_tasks": list(problem.target_tasks),
            "full": problem.is_full,
            "ids_sha256": problem.request.ids_hash(),
        }
        result_model = self._unlearn(model, problem, generator, recorder, report)
        if result_model is not None:
            model = result_model
        if model is None:
            raise RuntimeError(f"{type(self).__name__}._unlearn returned no model")
        model.eval()
        # The last step's update direction is no gradient of the returned model (and a copy of
        # the original's, from the deep copy, none either): it comes back without any.
        for param in model.parameters():
            param.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()  # wall time must include the queued kernels
        report.wall_time_s = time.perf_counter() - start
        report.curves, report.curve_steps = recorder.curves, recorder.steps
        return UnlearningResult(model=model, report=report)

    @abstractmethod
    def _unlearn(self, model: nn.Module | None, problem: UnlearningProblem,
                 generator: torch.Generator, recorder: CurveRecorder,
                 report: UnlearningReport) -> nn.Module | None:
        """Edit ``model`` (a private copy of the original on ``problem.device``) in place and
        return ``None``, or, when ``edits_original`` is ``False`` (``model`` is then ``None``),
        return a new model. Record curves through ``recorder``, set ``report.steps`` and any
        method-specific ``report.extra``; draw every random choice from ``generator``."""


def config_from_mapping(config_class: type[UnlearnerConfig],
                        values: Mapping[str, Any]) -> UnlearnerConfig:
    """Build ``config_class`` from a mapping, naming unknown keys in the error (CLI overrides)."""
    unknown, known = unknown_fields(config_class, values)
    if unknown:
        raise TypeError(f"{config_class.__name__}: unknown settings {sorted(unknown)}; known: "
                        f"{sorted(known)}")
    config = config_class(**dict(values))
    config.validate()
    return config
