"""Per-task forgetting objectives: what to minimise on a forget pair to remove its supervision.

Every objective maps a task's prediction on a batch of forget samples to a per-sample value
``[B]`` to *minimise*. One object per target task; :meth:`ForgetObjective.prepare` may look at
the retain set once (to build a reference prediction) before any step.

The objectives, for a sample with prediction ``p`` (class probabilities ``softmax(z)`` or a
dense/vector value ``y_hat``), target ``y`` and task loss ``l`` (:func:`mtunlearn_ext.losses.task_loss`):

``ascent`` (any kind; unbounded): ``-l(y_hat, y)``. Plain gradient ascent. Its infimum is
    ``-inf``: cross-entropy ascent keeps growing the logit gap away from ``y`` and regression
    ascent pushes outputs without limit, so the shared backbone is eventually destroyed; only a
    small step budget keeps it usable.
``capped_ascent`` (any kind; bounded; the default): ``-min(l, c)``. For a class task under its
    kind's cross-entropy ``c = log C``, the loss of the uniform prediction (no retain data
    needed); for any other kind, and for a task with its own ``TaskSpec.loss``, ``c`` is that
    loss of ``mean_target``'s input-independent reference (below) averaged over the retain
    pairs: for classes the retain label frequencies ``pi`` as logits, so cross-entropy given
    as a custom loss caps at the labels' entropy ``H(pi)``, below ``log C`` unless the classes
    are balanced. Ascent stops, per sample, once the sample is fitted no better than by a
    predictor that has seen no instance, so its infimum is ``-c`` and it cannot diverge. (The
    interference-aware method replaces ``c`` by default with a quantile of the original
    model's own per-sample losses: its ``cap_quantile``.)
``capped_depth_weighted_ascent`` (depth; bounded): ``capped_ascent`` on the depth-weighted
    absolute error ``sum_p d_p |d_hat_p - d_p| / sum_p d_p`` instead of the plain mean. L1 ascent
    adds the same error at every pixel, so near pixels gain the most *relative* error; a model's
    error on unseen data grows with depth instead, and the weighting makes the added error
    proportional to depth. Measured against ``capped_ascent`` (interference-aware method,
    memorising recipe, full requests, validation splits of seeds 0 and 1): worse, aligned
    selection score 2.42 against 1.75 at the same step. On ``street`` the forget pairs' relative
    error stayed 6% *below* the original's unseen-data level (plain L1 ascent: 5% above) while
    the validation depth error rose more (+4.5% against +2.4%): the near pixels' error is what
    memorisation had lowered, and weighting by depth leaves it there.
``uniform`` (classification, segmentation, binary; bounded): ``KL(U || p) = -log C - (1/C)
    sum_c log p_c`` (per labelled pixel, averaged; for binary labels ``BCE(z, 1/2) - log 2``
    per labelled entry). ``>= 0``, zero exactly at the uniform prediction, and the gradient
    vanishes there, so it cannot diverge.
``mean_target`` (any kind; bounded): pull the prediction toward the best *input-independent*
    prediction learned from the retain set, i.e. what a model that carries no information about
    the instance would output: for classification the retain class prior ``pi``
    (``KL(pi || p)``), for segmentation the per-pixel class frequencies, for binary labels each
    entry's positive rate (BCE against it), for depth/regression the
    per-pixel (per-entry) mean of the retain targets, for normals the normalised per-pixel mean
    normal (each under the task's own loss, restricted to the sample's labelled pixels).
    Minimum at the reference, gradient zero there.
``random_target`` (any kind; bounded below by 0): the task loss against a random target drawn
    afresh at each call: a uniformly random *other* class for classification, the target map of
    a random retain instance for dense tasks and regression (the "random labels" of SalUn, with
    regression targets drawn from the retain targets' own distribution).

Why ``capped_ascent`` is the default. A retrained model does not predict the uniform or mean
target on a forget instance: it predicts it about as well as it predicts unseen data, whose loss is
far below the reference predictor's. So the objective should raise the forget loss from the
fitted level toward the unseen level and not drag the output to an input-agnostic reference. On
``indoor`` / ``small`` (full request, 10% of instances, seed 0), NegGrad+ at one fixed setting
(lr 3e-3, 40 steps, forget weight 0.5), scored by the gap to the retrained model on the forget
pairs and 150 retain instances (``python -m mtunlearn_ext.tuning``; lower is better, the untouched
model scores 2.89): ``ascent`` 0.826, ``capped_ascent`` 0.828, ``random_target`` 4.77 (its best
budget, 10 steps), ``mean_target`` 6.48 (10 steps; 13.8 at 20). Capped ascent matches plain ascent
where ascent is at its best, and unlike it stays bounded when the budget is overshot. ``ascent``
remains the objective of the classic baselines (gradient ascent, NegGrad+, OrthoGrad, PCGrad),
whose definitions use it.

Scale across tasks. Each objective is in its task's loss units, and a step sums the target
tasks' objectives unweighted (``forget_weight`` scales them all), so a full request's forget
direction follows the task with the largest gradient. Cross-entropies and L1 depth have
gradients (in the head's output) bounded independently of the targets' units; the normals'
cosine loss has one of size about ``1 / |n_hat|`` (0.2 per map at unit-norm raw outputs, 226
at norm 1e-3); regression's squared error grows with the error, i.e. with the targets' scale.
Measured on a four-head MLP (classification with 10 classes, 3-class segmentation, 2-d
regression, depth; 400 Adam steps; ``capped_ascent`` on 16 forget pairs), the trunk gradient
norms per task were 1.48 / 0.41 / 0.29 / 0.20 with unit-scale regression targets, but the
regression one was 1.9e3 at scale 100 and 1.0e7 at scale 1e4, while the others stayed below 5.
Express such targets in comparable units (standardise them, or give the task a
``TaskSpec.loss`` divided by their variance): ``retain_task_weights`` balances the retain terms
only.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F

from mtunlearn_ext._definitions import defined_name, same_definition
from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext._functional import widened
from mtunlearn_ext.data.base import TASK_KINDS, MultiTaskDataset, TaskSpec
from mtunlearn_ext.losses import task_loss, valid_pixel_mask
from mtunlearn_ext.unlearning.batches import child_generator

__all__ = [
    "DEFAULT_FORGET_OBJECTIVES",
    "FORGET_OBJECTIVES",
    "ForgetObjective",
    "check_objective_keys",
    "depth_weighted_abs_error",
    "make_forget_objectives",
    "objective_names",
    "register_forget_objective",
]


def _supervised_targets(spec: TaskSpec, retain: MultiTaskDataset) -> torch.Tensor:
    """The retain set's targets of ``spec`` on its supervised rows."""
    column = retain.task_index(spec.name)
    rows = retain.supervision[:, column].nonzero().flatten()
    return retain.targets[spec.name][rows]


class ForgetObjective(ABC):
    """A forgetting objective for one task. Subclasses set ``name``, ``bounded`` and ``kinds``.

    Call :meth:`prepare` once before :meth:`per_sample`.
    """

    name: ClassVar[str] = ""
    bounded: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = TASK_KINDS

    def __init__(self, spec: TaskSpec) -> None:
        if spec.kind not in self.kinds:
            raise ValueError(f"forget objective {self.name!r} does not apply to task "
                             f"{spec.name!r} of kind {spec.kind}; it supports {self.kinds}")
        self.spec = spec

    def prepare(self, retain: MultiTaskDataset, generator: torch.Generator,
                device: torch.device | str) -> None:
        """Build whatever reference the objective needs from the retain set (default: none)."""

    @abstractmethod
    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B]`` values to minimise for the batch's predictions and (forget) targets."""

    def per_pair(self, pred: torch.Tensor, target: torch.Tensor,
                 ids: torch.Tensor | None) -> torch.Tensor:
        """:meth:`per_sample` for rows whose instance ids are ``ids`` (``[B]``); objectives
        with a per-instance parameter override it (default: the ids are not needed)."""
        return self.per_sample(pred, target)


class AscentObjective(ForgetObjective):
    """``-task_loss``: plain gradient ascent (unbounded)."""

    name = "ascent"
    bounded = False

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -task_loss(self.spec, pred, target)


class _ReferenceObjective(ForgetObjective):
    """Shared machinery: an input-independent reference prediction built from the retain set."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.reference: torch.Tensor | None = None

    def prepare(self, retain: MultiTaskDataset, generator: torch.Generator,
                device: torch.device | str) -> None:
        targets = _supervised_targets(self.spec, retain)
        if targets.shape[0] == 0:
            raise ValueError(f"forget objective {self.name!r}: the retain set has no supervised "
                             f"pair of task {self.spec.name!r} to build a reference from "
                             f"{_no_retain_pairs(self.spec)}; choose an objective that needs "
                             f"none: {needs_no_retain_pair(self.spec)}")
        self.reference = self._reference_from(targets).to(device)

    def _reference_from(self, targets: torch.Tensor) -> torch.Tensor:
        """The reference: class probabilities (``[C]`` / ``[C, H, W]``) for classification and
        segmentation, each entry's rate of positive labels for binary labels, a target-shaped
        value (``[1|3, H, W]`` / ``[d]``) otherwise."""
        spec = self.spec
        if spec.kind == "binary":
            labels = targets.double()
            labelled = targets != spec.ignore_index
            summed = torch.where(labelled, labels, 0.0).sum(dim=0)
            count = labelled.sum(dim=0)
            # An entry never labelled in the retain set falls back to the overall rate.
            overall = summed.sum() / count.sum().clamp(min=1)
            return torch.where(count > 0, summed / count.clamp(min=1), overall).float()
        # Set for the class tasks (TaskSpec.__post_init__ refuses them without it).
        num_classes = spec.num_classes
        if spec.kind == "classification":
            assert num_classes is not None
            labels = targets[targets != spec.ignore_index].long()
            counts = torch.bincount(labels, minlength=num_classes).double()
            return (counts / counts.sum().clamp(min=1)).float()
        if spec.kind == "segmentation":
            # Per-pixel class counts as one bincount over (class, pixel) codes: the counts of a
            # one-hot sum without its [N, H, W, C] int64 tensor (230 MB for 540 images of
            # 64 x 64 with 13 classes).
            assert num_classes is not None
            valid = targets != spec.ignore_index
            pixels = targets[0].numel()
            codes = (targets.long() * pixels + torch.arange(pixels, device=targets.device)
                     .view_as(targets[0]))[valid]
            counts = torch.bincount(codes, minlength=num_classes * pixels).view(
                num_classes, *targets.shape[1:]).double()
            total = counts.sum(dim=0, keepdim=True)
            # A pixel never labelled in the retain set falls back to the global class prior.
            global_prior = counts.sum(dim=(1, 2)) / counts.sum().clamp(min=1)
            freq = torch.where(total > 0, counts / total.clamp(min=1),
                               global_prior[:, None, None].expand_as(counts))
            return freq.float()
        if spec.kind == "regression":
            return targets.float().mean(dim=0)
        valid = valid_pixel_mask(spec, targets.float()).unsqueeze(1)  # [N, 1, H, W]
        # torch.where, not a product: an unlabelled pixel may hold NaN (NaN * 0 is NaN).
        summed = torch.where(valid, targets.float(), 0.0).sum(dim=0)
        count = valid.sum(dim=0).clamp(min=1)
        mean = summed / count
        if spec.kind == "normals":
            # Zero where no retain pixel is labelled: such pixels then count as unlabelled.
            mean = F.normalize(mean, dim=0, eps=1e-8)
        return mean

    def _reference_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B]``: the task's loss of ``pred`` against the reference, on the labelled pixels of
        ``target`` (``KL(reference || softmax(pred))`` for class outputs)."""
        assert self.reference is not None, "call prepare() first"
        spec = self.spec
        ref = self.reference.to(pred.dtype)
        if spec.kind == "classification":
            kl = _kl_from(ref, F.log_softmax(pred, dim=1))
            return torch.where(target != spec.ignore_index, kl, torch.zeros_like(kl))
        if spec.kind == "segmentation":
            kl = _kl_from(ref, F.log_softmax(pred, dim=1))  # [B, H, W]
            return _mean_over(kl, valid_pixel_mask(spec, target))
        if spec.kind == "regression":
            return task_loss(spec, pred, ref.expand(pred.shape[0], *ref.shape))
        if spec.kind == "binary":  # the rates as soft labels, on the sample's labelled entries
            labelled = target.reshape(target.shape[0], -1) != spec.ignore_index
            soft = torch.where(labelled, ref.reshape(1, -1),
                               torch.full((), float(spec.ignore_index), dtype=pred.dtype,
                                          device=pred.device))
            return task_loss(spec, pred, soft.reshape(target.shape))
        valid = valid_pixel_mask(spec, target.to(pred.dtype)).unsqueeze(1)
        masked_ref = torch.where(valid, ref.unsqueeze(0), torch.zeros((), dtype=pred.dtype,
                                                                      device=pred.device))
        return task_loss(spec, pred, masked_ref)


def _kl_from(ref: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``KL(ref || p) = sum_c ref_c (log ref_c - log p_c)`` along dimension 1 of ``log_p``
    (``ref`` broadcast against it), a class absent from ``ref`` adding exactly 0. Not
    ``ref * log(max(ref, 1e-12))``: 1e-12 is 0 in fp16, and 0 * log 0 made every value NaN."""
    log_ratio = ref.clamp(min=torch.finfo(ref.dtype).tiny).log() - log_p
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    return torch.where(ref > 0, ref * log_ratio, zero).sum(dim=1)


def _no_retain_pairs(spec: TaskSpec) -> str:
    """The usual reason a retain set has no pair of ``spec``'s task."""
    return (f"(a `forget_request` that removes task {spec.name!r} from every instance leaves "
            "none there)")


def needs_no_retain_pair(spec: TaskSpec) -> str:
    """The objectives that need no retain pair of ``spec``'s task, as a setting to choose."""
    other = (" (or 'uniform')" if spec.kind in ("classification", "segmentation", "binary")
             else "")
    return f"forget_objective={{{spec.name!r}: 'ascent'}}{other}"


def _mean_over(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``[B, H, W]`` values over ``valid`` pixels (0 where none), summed in
    float32 for half-precision values (their sum over a map overflows fp16, their mean not)."""
    wide = widened(per_pixel)
    kept = torch.where(valid, wide, torch.zeros((), dtype=wide.dtype, device=wide.device))
    mean = kept.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1).to(wide.dtype)
    return mean.to(per_pixel.dtype)


class MeanTargetObjective(_ReferenceObjective):
    """Pull the prediction toward the retain set's input-independent reference."""

    name = "mean_target"

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._reference_loss(pred, target)


class CappedAscentObjective(_ReferenceObjective):
    """``-min(task_loss, c)``: ascent that stops once a sample's loss reaches ``c``: ``log C``
    for a class task under its kind's cross-entropy (the uniform prediction's loss), else the
    mean loss of the input-independent reference prediction on the retain set (under a custom
    loss also for classes: there the retain label frequencies, so a custom cross-entropy caps
    at the labels' entropy, not at ``log C``).

    The retain set's reference prediction serves only to measure ``c``: a class task under its
    kind's own loss needs none (``c = log C``). Where ``c`` needs it and the retain set has no
    pair of the task (a partial request removing the task from every instance), :meth:`prepare`
    leaves ``cap`` NaN and :attr:`cap_missing` says why: a caller may set ``cap`` itself (the
    interference-aware method calibrates it on a held-out set), and the objective refuses to
    run without one.

    :meth:`set_pair_caps` gives chosen instances their own cap ``c_i`` (rows of other
    instances keep ``c``)."""

    name = "capped_ascent"

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.cap: float = math.nan
        self._no_cap = "call prepare() first"
        self._pair_ids: torch.Tensor | None = None  # sorted
        self._pair_caps: torch.Tensor | None = None  # aligned with _pair_ids

    @property
    def cap_missing(self) -> str | None:
        """``None`` once the objective has a cap (``cap`` not NaN), else why it has none."""
        if not math.isnan(self.cap):
            return None
        return f"forget objective {self.name!r} of task {self.spec.name!r} has no cap: " \
            f"{self._no_cap}"

    def set_pair_caps(self, ids: torch.Tensor, caps: torch.Tensor) -> None:
        """Cap the loss of instance ``ids[i]`` at ``caps[i]`` (1-D, same length, distinct
        ids, finite caps); replaces any earlier per-instance caps."""
        if ids.dim() != 1 or caps.shape != ids.shape:
            raise ValueError(f"set_pair_caps: `ids` and `caps` must be 1-D of the same length, "
                             f"got {tuple(ids.shape)} and {tuple(caps.shape)}")
        if not bool(torch.isfinite(caps).all()):
            raise ValueError("set_pair_caps: `caps` must be finite")
        order = torch.argsort(ids)
        sorted_ids = ids[order]
        if sorted_ids.numel() > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise ValueError("set_pair_caps: `ids` must be distinct")
        self._pair_ids = sorted_ids
        self._pair_caps = caps[order].float()

    def caps_for(self, ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
        """The cap of each row (``[B]``, dtype and device of ``like``), or the scalar cap when
        no instance has its own."""
        if ids is None or self._pair_ids is None or self._pair_caps is None:
            return self.cap
        if self._pair_ids.device != ids.device:  # once: the lookup stays on the batch's device
            self._pair_ids = self._pair_ids.to(ids.device)
            self._pair_caps = self._pair_caps.to(ids.device)
        keys = ids.to(torch.long)
        pos = torch.searchsorted(self._pair_ids, keys).clamp(max=self._pair_ids.numel() - 1)
        found = self._pair_ids[pos] == keys
        caps = torch.where(found, self._pair_caps[pos],
                           torch.full_like(self._pair_caps[pos], self.cap))
        largest = torch.finfo(like.dtype).max if like.is_floating_point() else math.inf
        if largest < torch.finfo(caps.dtype).max:  # a cap beyond like's range: its largest
            caps = caps.clamp(max=largest)
        return caps.to(device=like.device, dtype=like.dtype)

    def prepare(self, retain: MultiTaskDataset, generator: torch.Generator,
                device: torch.device | str) -> None:
        class_kind = self.spec.kind in ("classification", "segmentation")
        own_loss = class_kind and self.spec.loss is None
        targets = _supervised_targets(self.spec, retain)
        if targets.shape[0] == 0:
            self.reference = None
            if own_loss:
                assert self.spec.num_classes is not None
                self.cap = math.log(self.spec.num_classes)
                return
            self.cap = math.nan
            self._no_cap = (
                f"its cap is the loss of an input-independent prediction built from the retain "
                f"set's pairs of {self.spec.name!r} (its {'custom ' if class_kind else ''}"
                f"loss against the retain {'class frequencies' if class_kind else 'mean'}), "
                f"and the retain set has none {_no_retain_pairs(self.spec)}")
            return
        super().prepare(retain, generator, device)
        if own_loss:
            assert self.spec.num_classes is not None
            self.cap = math.log(self.spec.num_classes)
            return
        targets = targets.to(device)
        losses = []
        assert self.reference is not None
        # The reference as a prediction (class frequencies as logits, their logarithms;
        # binary rates as logits, log(r / (1 - r)); normals: a unit vector field; regression:
        # a row). A class task's custom loss is measured against the label frequencies, not
        # the uniform prediction that gives log C under the kind's own loss: its cap is that
        # loss's value for a predictor knowing only the retain label distribution.
        reference = (self.reference.clamp(min=1e-12).log() if class_kind else
                     torch.logit(self.reference, eps=1e-6) if self.spec.kind == "binary" else
                     self.reference)
        for start in range(0, targets.shape[0], 256):
            chunk = targets[start:start + 256]
            chunk = chunk if class_kind else chunk.float()
            pred = reference.unsqueeze(0).expand(chunk.shape[0], *reference.shape)
            losses.append(self.loss(pred, chunk))
        self.cap = float(torch.cat(losses).mean())

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``[B]``: the per-sample loss that the ascent raises and the cap bounds (here the task
        loss; caps calibrated elsewhere must be measured with this same function)."""
        return task_loss(self.spec, pred, target)

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_pair(pred, target, None)

    def per_pair(self, pred: torch.Tensor, target: torch.Tensor,
                 ids: torch.Tensor | None) -> torch.Tensor:
        loss = self.loss(pred, target)
        caps = self.caps_for(ids, loss)
        if isinstance(caps, float) and math.isnan(caps):
            raise ValueError(f"{self.cap_missing}. Choose an objective that needs no retain "
                             f"pair: {needs_no_retain_pair(self.spec)}; or give the objective a "
                             "cap from elsewhere (the interference-aware method calibrates it "
                             "on held-out data with cap_reference='held_out')")
        if isinstance(caps, float) and loss.is_floating_point():
            # A cap beyond the loss type's range (a regression cap of 1e8 against an fp16
            # loss) made clamp raise; the type's largest value is the same bound there.
            caps = min(caps, torch.finfo(loss.dtype).max)
        return -loss.clamp(max=caps)


def depth_weighted_abs_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``sum_p d_p |d_hat_p - d_p| / sum_p d_p`` over the valid pixels ``d_p > 0`` of
    ``[B, 1, H, W]`` depth maps (0 for a sample without one): the absolute error, each pixel
    weighted by its true depth."""
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
        raise ValueError(f"depth_weighted_abs_error: pred and target must both be [B, 1, H, W], "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    # Half precision computed in float32: a product d_p e_p and the per-sample sums overflow
    # fp16 at depths in the thousands (NaN, inf / inf); the ratio is an fp16 number again.
    wide = widened(pred)
    depth = target.to(wide.dtype)[:, 0]
    valid = depth > 0
    zero = torch.zeros((), dtype=wide.dtype, device=wide.device)
    # An unlabelled pixel's depth may be NaN: zeroed first, or 0 * NaN reaches the gradient.
    depth = torch.where(valid, depth, zero)
    # torch.where, not a product with the mask: a prediction at an unlabelled pixel may be
    # anything, NaN included, and must not reach the sum.
    weighted = torch.where(valid, (wide[:, 0] - depth).abs() * depth, zero).flatten(1).sum(1)
    total = torch.where(valid, depth, zero).flatten(1).sum(1)
    return (weighted / total.clamp(min=torch.finfo(wide.dtype).tiny)).to(pred.dtype)


class DepthWeightedCappedAscentObjective(CappedAscentObjective):
    """Capped ascent on the *depth-weighted* absolute error (:func:`depth_weighted_abs_error`)
    of a depth task: ``-min(sum_p d_p e_p / sum_p d_p, c)``.

    Plain L1 ascent pushes every pixel's prediction with the same force, so the error it adds
    is the same at near and far pixels and the *relative* error of near pixels grows most,
    whereas a model's error on unseen data grows with depth. Weighting each pixel by its depth
    makes the added error proportional to depth, so absolute and relative error rise together.
    The cap (and any rank-matched per-pair caps) is measured in the same weighted loss."""

    name = "capped_depth_weighted_ascent"
    kinds = ("depth",)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return depth_weighted_abs_error(pred, target)


class UniformObjective(ForgetObjective):
    """``KL(U || softmax(z))``: push class posteriors to uniform (classification,
    segmentation); for binary labels each labelled entry's ``sigmoid(z)`` to 1/2
    (``BCE(z, 1/2) - log 2``, zero at ``z = 0``)."""

    name = "uniform"
    kinds = ("classification", "segmentation", "binary")

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.spec.kind == "binary":
            logits = pred.reshape(pred.shape[0], -1)
            labelled = target.reshape(target.shape[0], -1) != self.spec.ignore_index
            half = torch.full_like(logits, 0.5)
            kl = F.binary_cross_entropy_with_logits(logits, half, reduction="none") - math.log(2)
            return _mean_over(kl, labelled)
        num_classes = pred.shape[1]
        kl = -math.log(num_classes) - F.log_softmax(pred, dim=1).mean(dim=1)
        if self.spec.kind == "classification":
            return torch.where(target != self.spec.ignore_index, kl, torch.zeros_like(kl))
        return _mean_over(kl, valid_pixel_mask(self.spec, target))


class RandomTargetObjective(ForgetObjective):
    """Task loss against random targets drawn at every call (random labels)."""

    name = "random_target"

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__(spec)
        self.pool: torch.Tensor | None = None
        self.generator: torch.Generator | None = None

    def prepare(self, retain: MultiTaskDataset, generator: torch.Generator,
                device: torch.device | str) -> None:
        self.generator = generator
        if self.spec.kind != "classification":
            pool = _supervised_targets(self.spec, retain)
            if pool.shape[0] == 0:
                raise ValueError(f"forget objective 'random_target': the retain set has no "
                                 f"supervised pair of task {self.spec.name!r} to draw from "
                                 f"{_no_retain_pairs(self.spec)}; choose an objective that "
                                 f"needs none: {needs_no_retain_pair(self.spec)}")
            self.pool = pool  # stays on CPU; only the drawn rows move

    def random_targets(self, target: torch.Tensor) -> torch.Tensor:
        """Random targets shaped like ``target`` (drawn on CPU from the objective's generator,
        so the draw does not depend on the device)."""
        assert self.generator is not None, "call prepare() first"
        batch = target.shape[0]
        if self.spec.kind == "classification":
            assert self.spec.num_classes is not None
            # A uniformly random class other than y: y + U{1..C-1} mod C.
            shift = torch.randint(1, self.spec.num_classes, (batch,), generator=self.generator)
            labels = (target.cpu().long() + shift) % self.spec.num_classes
            labels = torch.where(target.cpu() == self.spec.ignore_index, target.cpu().long(),
                                 labels)
            return labels.to(target.device)
        assert self.pool is not None
        rows = torch.randint(0, self.pool.shape[0], (batch,), generator=self.generator)
        drawn = self.pool[rows].to(target.device, non_blocking=True)
        if self.spec.kind == "binary":  # the sample's unlabelled entries stay unlabelled
            drawn = torch.where(target == self.spec.ignore_index, target.to(drawn.dtype), drawn)
        return drawn

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return task_loss(self.spec, pred, self.random_targets(target))


_forget_objectives: dict[str, type[ForgetObjective]] = {}

#: Objective name -> class: the built-in objectives and those added by
#: :func:`register_forget_objective`. A read-only view: a write would skip that function's
#: checks (and could silently replace the default ``capped_ascent``).
FORGET_OBJECTIVES: Mapping[str, type[ForgetObjective]] = MappingProxyType(_forget_objectives)

O = TypeVar("O", bound=type[ForgetObjective])


def register_forget_objective(cls: O) -> O:
    """Class decorator: add the forgetting objective ``cls`` to :data:`FORGET_OBJECTIVES`
    under ``cls.name``, so that every method's ``forget_objective`` setting can name it.

    ``cls`` must be a concrete :class:`ForgetObjective` subclass (``per_sample`` defined) with
    a non-empty ``name`` and ``kinds``, a non-empty tuple of task kinds
    (:data:`~mtunlearn_ext.data.base.TASK_KINDS`) it applies to. A name taken by another
    class (a built-in one included) is refused; the same definition run again (equal module
    and qualified name: a reloaded module) replaces its entry.
    """
    if not isinstance(cls, type) or not issubclass(cls, ForgetObjective):
        raise TypeError(f"register_forget_objective: expected a subclass of ForgetObjective, "
                        f"got {cls!r}")
    what = f"register_forget_objective: {cls.__module__}.{cls.__qualname__}"
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} has no `name` (a non-empty str), got {name!r}")
    kinds = cls.kinds
    if not isinstance(kinds, tuple) or not kinds or not all(isinstance(k, str) for k in kinds):
        raise ValueError(f"{what}: `kinds` must be a non-empty tuple of task kinds (of "
                         f"{TASK_KINDS}), got {kinds!r}")
    unknown = [k for k in kinds if k not in TASK_KINDS]
    if unknown:
        raise ValueError(f"{what}: `kinds` has unknown task kinds {unknown}; known: "
                         f"{TASK_KINDS}")
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise TypeError(f"{what} is abstract: define {missing}")
    existing = FORGET_OBJECTIVES.get(name)
    if existing is not None and not same_definition(existing, cls):
        raise ValueError(f"{what}: the name {name!r} is taken by {defined_name(existing)}; "
                         "choose another name")
    _forget_objectives[name] = cls
    return cls


for _builtin in (AscentObjective, CappedAscentObjective, DepthWeightedCappedAscentObjective,
                 MeanTargetObjective, UniformObjective, RandomTargetObjective):
    register_forget_objective(_builtin)
del _builtin

#: The default objective of each task kind (see the module docstring for the measurement).
DEFAULT_FORGET_OBJECTIVES: dict[str, str] = {kind: "capped_ascent" for kind in TASK_KINDS}


def check_objective_keys(choice: Mapping[str, str], task_names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``forget_objective`` and the offending keys when a key of
    the mapping ``choice`` is neither one of ``task_names`` (every task of the problem) nor a
    task kind (:data:`~mtunlearn_ext.data.base.TASK_KINDS`)."""
    unknown = [key for key in choice if key not in task_names and key not in TASK_KINDS]
    if unknown:
        raise ValueError(f"`forget_objective` has key(s) {unknown} that are neither a task of the "
                         f"problem nor a task kind; valid keys: the tasks {list(task_names)} "
                         f"or the kinds {list(TASK_KINDS)}")


def objective_names(specs: Sequence[TaskSpec], task_names: Sequence[str],
                    choice: str | Mapping[str, str] | None = None) -> dict[str, str]:
    """The objective name of each target task in ``specs`` for ``choice`` (as in
    :func:`make_forget_objectives`, which builds them), checking a mapping's keys against
    ``task_names`` (every task of the problem) and every name against
    :data:`FORGET_OBJECTIVES`: what a run would refuse, without building anything."""
    if isinstance(choice, Mapping):
        check_objective_keys(choice, task_names)
    names: dict[str, str] = {}
    for spec in specs:
        if choice is None:
            name = DEFAULT_FORGET_OBJECTIVES[spec.kind]
        elif isinstance(choice, str):
            name = choice
        else:
            name = choice.get(spec.name, choice.get(spec.kind, DEFAULT_FORGET_OBJECTIVES[spec.kind]))
        if name not in FORGET_OBJECTIVES:
            raise UnknownNameError(f"unknown forget objective {name!r} for task {spec.name!r}; "
                                   f"known: {sorted(FORGET_OBJECTIVES)}")
        names[spec.name] = name
    return names


def make_forget_objectives(specs: Sequence[TaskSpec], retain: MultiTaskDataset,
                           generator: torch.Generator, device: torch.device | str,
                           choice: str | Mapping[str, str] | None = None,
                           forget: MultiTaskDataset | None = None,
                           ) -> dict[str, ForgetObjective]:
    """Prepared objectives for the target tasks ``specs``.

    Args:
        choice: one objective name for every task, or a mapping from task name *or* task kind
            to a name (task name wins), or ``None`` for :data:`DEFAULT_FORGET_OBJECTIVES`. A
            mapping's every key must be a task of the problem (``retain``'s tasks, targets or
            not) or a task kind (:data:`~mtunlearn_ext.data.base.TASK_KINDS`); any other key
            (a misspelt task or kind, which would silently leave its task at the default) is
            refused with a ``ValueError`` naming it.
        generator: parent generator; each objective gets its own seeded child stream.
        forget: the forget set, when known: a target task with no supervised pair there is
            never ascended (the forget terms skip a task without a pair in the batch), so an
            objective that cannot be prepared for it (``random_target`` without a retain pair
            to draw from) is no reason to refuse the request.
    """
    names = objective_names(specs, retain.task_names, choice)
    objectives: dict[str, ForgetObjective] = {}
    for spec in specs:
        objective = FORGET_OBJECTIVES[names[spec.name]](spec)
        try:
            objective.prepare(retain, child_generator(generator), device)
        except ValueError:
            if forget is None or bool(forget.supervision[:, forget.task_index(spec.name)].any()):
                raise
        objectives[spec.name] = objective
    return objectives
