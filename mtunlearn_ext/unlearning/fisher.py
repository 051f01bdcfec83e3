"""Losses against targets drawn from the model's own predictive distribution ("Fisher samples").

Near a trained optimum the gradient of the retain loss with the *true* labels is close to zero
(that is what training did), so it says little about which directions would damage the retained
pairs: the damage of a step ``delta`` is then second order, ``1/2 delta^T H delta``, with ``H``
close to the Gauss-Newton / Fisher matrix ``F = E_x E_{y ~ p(y|x)} [g g^T]``, ``g`` the gradient
of the loss at a target ``y`` drawn from the model's prediction. Gradients at such sampled
targets do not vanish at the optimum, and the span of a few of them estimates the top of ``F``:
exactly the directions a forget step should stay out of.

For each task kind, with ``z`` the prediction:

* classification / segmentation: ``y ~ Categorical(softmax(z))`` (per pixel), loss ``CE(z, y)``;
* binary: ``y ~ Bernoulli(sigmoid(z))`` per labelled entry, loss ``BCE(z, y)``;
* depth, normals, regression: ``y = z.detach() + eps``, ``eps ~ N(0, I)``, loss
  ``|z - y|^2`` (its gradient is ``-2 J^T eps``: a random direction in the row space of the
  output Jacobian ``J``, which is what a Gaussian likelihood's Fisher samples are).

Only supervised rows and labelled pixels count (the target tensor says which), so a sampled
snapshot protects the same pairs that the labelled retain loss covers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtunlearn_ext.data.base import TaskSpec
from mtunlearn_ext.losses import valid_pixel_mask

__all__ = ["sampled_target_loss"]


def sampled_target_loss(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor,
                        rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """Mean loss over the supervised ``rows`` (bool ``[B]``) of ``pred`` against targets drawn
    from the prediction itself (see the module docstring); ``None`` when no row is supervised.

    Draws come from ``generator`` on the CPU, so they do not depend on the device.
    """
    if not bool(rows.any()):
        return None
    pred, target = pred[rows], target[rows]
    if spec.kind not in ("binary", "classification", "segmentation"):
        _check_drawable(spec, pred.detach())
    if spec.kind == "binary":
        logits = pred.reshape(pred.shape[0], -1)
        probs = torch.sigmoid(_at_least_float32(logits.detach())).cpu()
        _check_drawable(spec, probs)
        sampled = torch.bernoulli(probs, generator=generator).to(logits.device, logits.dtype)
        per_item = F.binary_cross_entropy_with_logits(logits, sampled, reduction="none")
        keep = target.reshape(target.shape[0], -1) != spec.ignore_index
        per_item, keep = per_item.reshape(-1), keep.reshape(-1)
    elif spec.kind in ("classification", "segmentation"):
        classes = pred.shape[1]
        logits = pred.movedim(1, -1).reshape(-1, classes)  # [B*H*W, C] or [B, C]
        probs = F.softmax(_at_least_float32(logits.detach()), dim=-1).cpu()
        _check_drawable(spec, probs)  # logits masked with -inf are fine: their probability is 0
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(pred.device)
        per_item = F.cross_entropy(logits, sampled, reduction="none")
        if spec.kind == "classification":
            keep = (target != spec.ignore_index).reshape(-1)
        else:
            keep = valid_pixel_mask(spec, target).reshape(-1)
    else:
        noise = torch.randn(pred.shape, generator=generator).to(pred.device, pred.dtype)
        per_item = ((pred - (pred.detach() + noise)) ** 2).sum(dim=1) if pred.dim() > 2 else \
            ((pred - (pred.detach() + noise)) ** 2).reshape(pred.shape[0], -1).mean(dim=1)
        if spec.kind == "regression":
            keep = torch.ones_like(per_item, dtype=torch.bool)
        else:
            keep = valid_pixel_mask(spec, target.to(pred.dtype))
        per_item, keep = per_item.reshape(-1), keep.reshape(-1)
    kept = torch.where(keep, per_item, torch.zeros((), dtype=per_item.dtype,
                                                   device=per_item.device))
    return kept.sum() / keep.sum().clamp(min=1).to(per_item.dtype)


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits widened for the probabilities; float64 ones kept (cast to float32,
    logits past 3.4e38 became Inf and their probabilities NaN)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _check_drawable(spec: TaskSpec, values: torch.Tensor) -> None:
    """torch's samplers fail on NaN/Inf probabilities with a message about the tensor, not the
    model; the loop reads this error as the run diverging and says at which step."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise FloatingPointError(f"task {spec.name!r}'s predictions hold NaN/Inf, so no target "
                                 "can be drawn from them")
