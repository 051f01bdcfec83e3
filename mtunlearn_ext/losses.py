"""Task losses: one per-sample loss per task kind, and the supervision-masked multi-task loss.

Every loss here returns one value per sample (``[B]``), so that callers can weight samples by the
supervision mask, take per-sample gradients, or feed per-sample losses to a membership attack.
Within a dense sample the loss is a mean over that sample's *valid* pixels only:

* ``classification``: ``CE(logits, y)``; a sample whose label is ``ignore_index`` has loss 0.
* ``segmentation``: ``(1 / |P|) sum_{p in P} CE(logits_p, y_p)`` with ``P`` the pixels whose label
  is not ``ignore_index``.
* ``depth``: ``(1 / |P|) sum_{p in P} |d_hat_p - d_p|`` with ``P = {p : d_p > 0}`` (0 = unknown).
* ``normals``: ``(1 / |P|) sum_{p in P} (1 - <n_hat_p / |n_hat_p|, n_p>)`` with
  ``P = {p : n_p != 0}``; the prediction is re-normalised here, so a head need not do it.
* ``regression``: ``(1 / d) |y_hat - y|^2`` (mean squared error over the target's ``d`` entries).
* ``binary``: ``(1 / |E|) sum_{e in E} BCE(z_e, y_e)``, binary cross-entropy of the logits ``z``
  over the entries ``E`` whose label is not ``ignore_index``.

A sample with no valid pixel gets loss 0 (and gradient 0) rather than NaN. An fp16 / bf16 map's
per-pixel values are summed in float32 and the mean returned in the map's type (an fp16 sum over
a 256 x 256 map overflows once the mean passes 1). A task whose spec
carries its own ``loss`` (:class:`~mtunlearn_ext.data.base.TaskSpec`) uses that instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from mtunlearn_ext._functional import unit_normalize, widened
from mtunlearn_ext.data.base import TaskSpec, labelled_pixels, neutral_unsupervised

__all__ = ["check_layout", "masked_multitask_loss", "per_sample_losses", "task_loss",
           "valid_pixel_mask"]


def valid_pixel_mask(spec: TaskSpec, target: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool: the pixels of a dense target that carry a label.

    Segmentation: label ``!= ignore_index``; depth ``[B, 1, H, W]``: ``> 0``; normals
    ``[B, 3, H, W]``: not the zero vector (the rule lives beside the data's "no label" values,
    :func:`mtunlearn_ext.data.base.labelled_pixels`, which also decides the default
    supervision mask).
    """
    return labelled_pixels(spec, target)


# Token tagging (one label per token of a sequence) is a segmentation task over an L x 1 image:
# the layout is stated in TaskSpec, but a sequence model's natural output is [B, L, C], which the
# bare layout errors leave to be translated.
def _token_tagging_hint(kind: str, pred: torch.Tensor) -> str:
    """The token tagging layout, to append to a layout error about a class-label task's
    prediction shaped like a sequence's per-token logits (3 dimensions: ``[B, L, C]`` or
    ``[B, C, L]``); empty for other predictions and kinds."""
    if pred.dim() != 3:
        return ""
    if kind == "segmentation":
        return ("; for a sequence's per-token logits [B, L, C] (token tagging), return "
                "`logits.permute(0, 2, 1).unsqueeze(-1)` ([B, C, L, 1]; logits already "
                "[B, C, L]: `logits.unsqueeze(-1)`) with targets [N, L, 1]")
    if kind == "classification":
        return ("; per-token labels (token tagging) are a `segmentation` task: return the "
                "logits [B, L, C] as `logits.permute(0, 2, 1).unsqueeze(-1)` ([B, C, L, 1]) "
                "with targets [N, L, 1]")
    return ""


def _token_targets_hint(pred: torch.Tensor, target: torch.Tensor) -> str:
    """A hint for sequence-shaped segmentation (pred ``[B, C, L, 1]``) given targets ``[B, L]``
    without the trailing 1. Empty for other layouts."""
    if pred.shape[3] != 1 or target.shape != pred.shape[:1] + pred.shape[2:3]:
        return ""
    return "; per-token targets [N, L] need a trailing 1: `tags.unsqueeze(-1)`"


def check_layout(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor, where: str) -> None:
    """Raise ``ValueError`` (prefixed ``where``) when a prediction and target do not have the
    layouts of the task's kind: the rules :func:`task_loss` and the metrics share (without them
    a head of the wrong size broadcasts against its targets)."""
    if pred.dim() == 0 or target.dim() == 0:
        raise ValueError(f"{where}: pred and target need a batch dimension, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"{where}: pred has {pred.shape[0]} samples, target {target.shape[0]}")
    kind = spec.kind
    if kind == "classification":
        if pred.dim() != 2 or target.dim() != 1:
            raise ValueError(f"{where}: classification wants pred [B, C] and target [B], got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}"
                             f"{_token_tagging_hint(kind, pred)}")
        return
    if kind in ("regression", "binary"):
        if math.prod(pred.shape[1:]) != math.prod(target.shape[1:]):
            raise ValueError(f"{where}: {kind} pred {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ")
        return
    if pred.dim() != 4:
        raise ValueError(f"{where}: {kind} wants pred [B, C, H, W], got {tuple(pred.shape)}"
                         f"{_token_tagging_hint(kind, pred)}")
    if kind == "segmentation":
        if target.shape != (pred.shape[0], *pred.shape[2:]):
            raise ValueError(f"{where}: segmentation target must be [B, H, W] = "
                             f"{(pred.shape[0], *pred.shape[2:])}, got {tuple(target.shape)}"
                             f"{_token_targets_hint(pred, target)}")
    elif target.shape != pred.shape:
        raise ValueError(f"{where}: {kind} pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} differ")


def _mean_over_valid(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``per_pixel [B, H, W]`` over ``valid [B, H, W]``; 0 where none valid.

    ``torch.where`` (not a product) keeps NaN/inf from invalid pixels out of the sum and its
    gradient. Half-precision values are summed in float32 (:func:`widened`): the mean is an
    fp16 number where the sum may not be.
    """
    wide = widened(per_pixel)
    flat = torch.where(valid, wide, torch.zeros((), dtype=wide.dtype,
                                                device=wide.device)).flatten(1)
    count = valid.flatten(1).sum(dim=1).clamp(min=1).to(wide.dtype)
    return (flat.sum(dim=1) / count).to(per_pixel.dtype)


class CustomLossShapeError(ValueError):
    """A task's own ``loss`` (:attr:`TaskSpec.loss`) returned something other than one loss
    per sample: the fault of the loss, not of the data it was given."""


def task_loss(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``[B]`` of one task (see the module docstring for the formulas).

    Args:
        spec: the task.
        pred: the head's output: logits ``[B, C]`` (classification), logits ``[B, C, H, W]``
            (segmentation), depth ``[B, 1, H, W]``, normals ``[B, 3, H, W]``, values ``[B, d]``
            (regression; ``[B]`` also accepted), logits ``[B, d]`` (binary; ``[B]`` too).
        target: the task's target batch, layout as in :class:`TaskSpec`.
    """
    if pred.dim() and target.dim() and pred.shape[0] != target.shape[0]:
        raise ValueError(f"task_loss[{spec.name}]: pred has {pred.shape[0]} samples, target "
                         f"{target.shape[0]}")
    if spec.loss is not None:
        try:
            value = spec.loss(pred, target)
        except Exception as error:  # its own message may name neither the task nor the rules
            error.add_note(
                f"(raised by the custom `loss` of task {spec.name!r}, pred "
                f"{tuple(pred.shape)}, target {tuple(target.shape)}: a task's loss must give one "
                f"loss per sample, accept the unsupervised pairs' neutral targets (the ignore "
                f"index {spec.ignore_index} for labels) and run under torch.func.vmap; see "
                "TaskSpec.loss)")
            raise
        if not isinstance(value, torch.Tensor) or value.shape != (pred.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CustomLossShapeError(f"task_loss[{spec.name}]: the task's `loss` must return "
                                       f"one loss per sample, shape ({pred.shape[0]},), got "
                                       f"{shape}")
        return value
    check_layout(spec, pred, target, f"task_loss[{spec.name}]")
    kind = spec.kind
    if kind == "classification":
        return F.cross_entropy(pred, target.long(), reduction="none",
                               ignore_index=spec.ignore_index)
    if kind == "regression":
        pred2 = pred.reshape(pred.shape[0], -1)
        target2 = target.reshape(target.shape[0], -1).to(pred.dtype)
        # Squared in float32 for half precision: an fp16 error above 256 overflows its square
        # though the mean over the entries may be an fp16 number (one error of 300 in 100: 900).
        residual = widened(pred2) - widened(target2)
        return residual.pow(2).mean(dim=1).to(pred.dtype)
    if kind == "binary":
        logits = pred.reshape(pred.shape[0], -1)
        labels = target.reshape(target.shape[0], -1)
        labelled = labels != spec.ignore_index
        # The unlabelled entries' values (anything) kept out of the kernel and its gradient.
        labels = torch.where(labelled, labels.to(logits.dtype),
                             torch.zeros((), dtype=logits.dtype, device=logits.device))
        per_entry = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return _mean_over_valid(per_entry, labelled)
    if kind == "segmentation":
        target = target.long()
        per_pixel = F.cross_entropy(pred, target, reduction="none", ignore_index=spec.ignore_index)
        return _mean_over_valid(per_pixel, valid_pixel_mask(spec, target))
    target = target.to(pred.dtype)
    valid = valid_pixel_mask(spec, target)
    # An unlabelled pixel may hold NaN (it reads as unlabelled); zeroed here, it cannot reach
    # the gradient through the product below (0 * NaN is NaN even where the mean drops it).
    target = torch.where(valid.unsqueeze(1), target, torch.zeros((), dtype=target.dtype,
                                                                 device=target.device))
    if kind == "depth":
        return _mean_over_valid((pred - target).abs()[:, 0], valid)
    if kind == "normals":
        cosine = (unit_normalize(pred, dim=1, eps=1e-8) * target).sum(dim=1)
        return _mean_over_valid(1.0 - cosine, valid)
    raise ValueError(f"task_loss: unsupported task kind {kind!r}")


def per_sample_losses(model_out: Mapping[str, torch.Tensor], batch: Mapping[str, object],
                      tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
    """Task name -> per-sample loss ``[B]`` for every task in ``tasks``, ignoring supervision."""
    targets = batch["targets"]
    assert isinstance(targets, Mapping)
    return {spec.name: task_loss(spec, model_out[spec.name], targets[spec.name]) for spec in tasks}


def masked_multitask_loss(model_out: Mapping[str, torch.Tensor], batch: Mapping[str, object],
                          tasks: Sequence[TaskSpec], supervision: torch.Tensor | None = None,
                          task_weights: Mapping[str, float] | None = None,
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over tasks of each task's mean loss over the batch's *supervised* samples.

    ``L = sum_t w_t L_t`` with ``L_t = sum_i m_it l_t(i) / sum_i m_it`` (``l_t(i)`` the per-sample
    loss of :func:`task_loss`, ``m`` the supervision mask); a task with no supervised sample in
    the batch contributes an exact zero (still attached to the graph, so ``backward`` works).
    Unsupervised pairs get neutral targets (:func:`~mtunlearn_ext.data.base.neutral_unsupervised`)
    and are dropped with ``torch.where``, so their targets may hold anything, finite or not, in
    range or not, without reaching the total or its gradient.

    Args:
        model_out: task name -> prediction (as returned by ``MultiTaskModel.forward``).
        batch: a collated batch (``{"targets": {task: [B, ...]}, "supervision": [B, T], ...}``).
        tasks: the tasks to include.
        supervision: ``[B, len(tasks)]`` bool whose columns follow ``tasks``; default
            ``batch["supervision"]``, which then must have one column per task in ``tasks`` in
            that order (pass the data set's ``tasks``, or select columns yourself).
        task_weights: optional task name -> weight ``w_t`` (default 1).

    Returns:
        ``(total, per_task)``: the scalar total and task name -> ``L_t``.
    """
    if supervision is None:
        sup = batch["supervision"]
        assert isinstance(sup, torch.Tensor)
        supervision = sup
    if supervision.dim() != 2 or supervision.shape[1] != len(tasks):
        raise ValueError(f"masked_multitask_loss: `supervision` must be [B, {len(tasks)}] "
                         f"(one column per task in `tasks`), got {tuple(supervision.shape)}")
    targets = batch["targets"]
    assert isinstance(targets, Mapping)
    # Neutral targets on unsupervised pairs: a NaN there would reach the gradient through the
    # ``where`` below (0 * NaN), an out-of-range class label would make the loss kernel raise.
    neutral = {spec.name: neutral_unsupervised(spec, targets[spec.name],
                                               supervision[:, column])
               for column, spec in enumerate(tasks)}
    losses = per_sample_losses(model_out, {"targets": neutral}, tasks)
    per_task: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for column, spec in enumerate(tasks):
        mask = supervision[:, column].to(losses[spec.name].device)
        sample_loss = losses[spec.name]
        # Half precision summed in float32: 32 fp16 losses of 2100 each already pass 65504.
        wide = widened(sample_loss)
        kept = torch.where(mask, wide, torch.zeros((), dtype=wide.dtype, device=wide.device))
        task_mean = (kept.sum() / mask.sum().clamp(min=1).to(wide.dtype)).to(sample_loss.dtype)
        per_task[spec.name] = task_mean
        weight = 1.0 if task_weights is None else float(task_weights.get(spec.name, 1.0))
        total = weight * task_mean if total is None else total + weight * task_mean
    if total is None:
        raise ValueError("masked_multitask_loss: `tasks` is empty")
    return total, per_task
