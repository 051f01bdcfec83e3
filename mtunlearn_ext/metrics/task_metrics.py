"""Per-task metrics, accumulated over batches and pooled over a whole split.

Every metric is pooled over the split's labelled units (samples or valid pixels), not averaged
over per-batch means, so the value does not depend on the batch size. Fractions are reported in
``[0, 1]``, depth errors in the data's depth unit (metres for the generated benchmarks), angles in
degrees.

* classification: ``accuracy = #(argmax logits == y) / #samples``.
* segmentation, from the confusion matrix ``M[g, p]`` (count of valid pixels with label ``g``
  predicted ``p``): ``IoU_c = M[c,c] / (sum_p M[c,p] + sum_g M[g,c] - M[c,c])``;
  ``miou`` = mean of ``IoU_c`` over the classes with a non-empty union (present in the labels or
  the predictions; a class absent from both carries no information and would be 0/0);
  ``pixel_acc = trace(M) / sum(M)``.
* depth, over valid pixels ``d > 0``: ``abs_err = mean |d_hat - d|``, ``rel_err = mean |d_hat - d|
  / d``, ``delta_1.25 = mean[max(d_hat / d, d / d_hat) < 1.25]``.
* normals, over valid pixels ``n != 0``: the angle ``e = arccos(clamp(<n_hat/|n_hat|, n>, -1, 1))``
  in degrees; ``mean_angle``, ``median_angle``, and ``within_11.25`` / ``within_22.5`` /
  ``within_30`` = fraction of pixels with ``e < 11.25 / 22.5 / 30`` degrees. The median (numpy's
  definition) is read from a 0.01-degree histogram: within 0.005 degrees, in constant memory.
* regression: ``mse`` and ``mae`` over all target entries.
* binary, over the labelled entries (label not ``ignore_index``), with ``p = sigmoid(z)``:
  ``accuracy = mean[(z > 0) == (y >= 0.5)]`` and the Brier score ``brier = mean (p - y)^2``
  (a proper score, defined on any labelled set; an AUC is not on a set of one class, such as a
  small forget set, and would leave a score of the request undefined).

A NaN logit of a scored unit (a labelled sample or valid pixel) makes the classification,
segmentation and binary metrics NaN: ``argmax`` takes NaN for the largest value, so a diverged
model's NaN logits would otherwise score as right wherever they sat at the label (an accuracy
of 1.0). Infinite logits are predictions (``-inf``: a log-probability of zero). A NaN depth,
normal or regression prediction makes the error metrics NaN (``abs_err``, ``mean_angle``,
``median_angle``, ``mse``, ...) and counts as a miss in the threshold fractions
(``delta_1.25``, ``within_*``), the worst score, never a good one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._functional import unit_normalize
from mtunlearn_ext.data.base import TaskSpec, is_ignore_index
from mtunlearn_ext.losses import check_layout

__all__ = ["METRICS", "MetricAccumulator", "MetricInfo", "angle_errors_deg", "confusion_matrix",
           "make_accumulator", "segmentation_scores"]


@dataclass(frozen=True)
class MetricInfo:
    """How to read a metric: ``higher_is_better``; ``bounded``: a fraction in ``[0, 1]`` (else an
    unbounded error such as metres or degrees)."""

    higher_is_better: bool
    bounded: bool


METRICS: dict[str, MetricInfo] = {
    "accuracy": MetricInfo(True, True),
    "miou": MetricInfo(True, True),
    "pixel_acc": MetricInfo(True, True),
    "abs_err": MetricInfo(False, False),
    "rel_err": MetricInfo(False, False),
    "delta_1.25": MetricInfo(True, True),
    "mean_angle": MetricInfo(False, False),
    "median_angle": MetricInfo(False, False),
    "within_11.25": MetricInfo(True, True),
    "within_22.5": MetricInfo(True, True),
    "within_30": MetricInfo(True, True),
    "mse": MetricInfo(False, False),
    "brier": MetricInfo(False, True),
    "mae": MetricInfo(False, False),
}
"""Every metric name this module reports, with its direction and scale."""


def confusion_matrix(pred_labels: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = -1) -> torch.Tensor:
    """``[C, C]`` int64 ``M[g, p]``: pixels (or samples) with label ``g`` predicted ``p``.

    Entries whose target is ``ignore_index`` are left out. Every other target, and the
    prediction of every entry counted, must be a class in ``[0, C)``, and both tensors must
    hold integers (an integer or bool dtype, or floats without a fraction): ``ValueError``
    otherwise, naming the argument.
    """
    classes = integer_value(num_classes)
    if classes is None or classes < 1:
        raise ValueError(f"confusion_matrix: `num_classes` must be an integer >= 1, got "
                         f"{num_classes!r}")
    num_classes = classes
    if pred_labels.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred_labels.shape)} and target "
                         f"{tuple(target.shape)} differ")
    _check_integer_labels(pred_labels, "pred_labels")
    _check_integer_labels(target, "target")
    t = target.reshape(-1).long()
    p = pred_labels.reshape(-1).long()
    in_range = (t >= 0) & (t < num_classes)
    keep = (t != ignore_index) & in_range
    # An out-of-range label used to be dropped (target) or clamped into the first or last
    # class (prediction): counted as a class it is not, or not at all, without a word.
    bad_target = (t != ignore_index) & ~in_range
    if bool(bad_target.any()):
        raise ValueError(f"confusion_matrix: `target` has {int(bad_target.sum())} labels "
                         f"outside [0, {num_classes}) other than ignore_index {ignore_index} "
                         f"(first: {int(t[bad_target][0])})")
    bad_pred = keep & ((p < 0) | (p >= num_classes))
    if bool(bad_pred.any()):
        raise ValueError(f"confusion_matrix: `pred_labels` has {int(bad_pred.sum())} "
                         f"predictions outside [0, {num_classes}) at counted entries (first: "
                         f"{int(p[bad_pred][0])})")
    index = t[keep] * num_classes + p[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def _check_integer_labels(labels: torch.Tensor, name: str) -> None:
    """Refuse labels with a fraction, NaN or Inf (``.long()`` would truncate them into another
    class) and complex ones; integer and bool dtypes, and integral floats, pass."""
    if labels.is_complex():
        raise ValueError(f"confusion_matrix: `{name}` must be integer class labels, got "
                         f"{labels.dtype}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        flat = labels.reshape(-1)
        first = flat[flat != flat.round()][0]
        raise ValueError(f"confusion_matrix: `{name}` must be integer class labels, got "
                         f"{labels.dtype} values with a fraction or NaN/Inf (first: "
                         f"{float(first)})")


def segmentation_scores(confusion: torch.Tensor, ignore_index: int = -1) -> dict[str, float]:
    """``miou`` and ``pixel_acc`` of a confusion matrix (see the module docstring). An
    ``ignore_index`` inside ``[0, C)`` labels no pixel and is no class of the mean: predictions
    of it on labelled pixels count as errors of their own class only."""
    m = confusion.double()
    tp = m.diag()
    union = m.sum(dim=1) + m.sum(dim=0) - tp
    present = union > 0
    if 0 <= ignore_index < len(present):
        present[ignore_index] = False
    total = m.sum()
    miou = (tp[present] / union[present]).mean().item() if present.any() else float("nan")
    pixel_acc = (tp.sum() / total).item() if total > 0 else float("nan")
    return {"miou": miou, "pixel_acc": pixel_acc}


def angle_errors_deg(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between predicted and target normals ``[B, 3, H, W]``, at the valid
    pixels (target not the zero vector), as a flat tensor. ``pred`` and ``target`` must have
    the same shape (``ValueError``): broadcast, one image's normals were compared with
    another's pixels."""
    if pred.shape != target.shape:
        raise ValueError(f"angle_errors_deg: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} differ; both must be normals [B, 3, H, W]")
    valid = target.abs().sum(dim=1) > 0
    cosine = (unit_normalize(pred.double(), dim=1, eps=1e-12) * target.double()).sum(dim=1)
    return torch.rad2deg(torch.arccos(cosine[valid].clamp(-1.0, 1.0)))


def _check_metric_shapes(spec: TaskSpec, pred: torch.Tensor, target: torch.Tensor) -> None:
    """:func:`~mtunlearn_ext.losses.check_layout`, saying so when the task has a custom
    ``loss``: such a loss may read another layout (a mean and a log-variance per target) that
    training accepted, while the kind's metrics score the kind's own."""
    try:
        check_layout(spec, pred, target, f"metrics[{spec.name}]")
    except ValueError as error:
        if spec.loss is None:
            raise
        raise ValueError(f"{error} (task {spec.name!r} has a custom `loss`, which may read "
                         f"another layout; the {spec.kind} metrics score the kind's own: map "
                         "the prediction to it before evaluating)") from None


class MetricAccumulator:
    """Pools one task's metric statistics over batches; :meth:`compute` gives the metrics.
    :meth:`update` takes the task's prediction and target batch in the layouts of
    :func:`~mtunlearn_ext.losses.task_loss` (``ValueError`` naming the task otherwise)."""

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Pool one batch: the task's predictions and targets, ``[B, ...]`` each."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """Metric name -> value over every batch pooled so far; NaN where a metric is
        undefined (nothing labelled yet; for class, segmentation and binary tasks, a NaN
        prediction seen)."""
        raise NotImplementedError

    @property
    def count(self) -> int:
        """Labelled units seen so far (samples or valid pixels)."""
        raise NotImplementedError


class _Classification(MetricAccumulator):
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.ignore_index = spec.ignore_index
        self.correct = 0
        self.total = 0
        self.saw_nan = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_metric_shapes(self.spec, pred, target)
        # As the loss and the supervision mask read it: ``!=`` wraps the index into a uint8
        # label's range (-1 as 255), which left out class 255 of a uint8-labelled task.
        keep = ~is_ignore_index(target, self.ignore_index)
        self.correct += int((pred.argmax(dim=1)[keep] == target[keep]).sum())
        self.total += int(keep.sum())
        self.saw_nan = self.saw_nan or bool(torch.isnan(pred).any(dim=1)[keep].any())

    def compute(self) -> dict[str, float]:
        if self.saw_nan or not self.total:
            return {"accuracy": float("nan")}
        return {"accuracy": self.correct / self.total}

    @property
    def count(self) -> int:
        return self.total


class _Segmentation(MetricAccumulator):
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        assert spec.num_classes is not None
        self.num_classes = spec.num_classes
        self.ignore_index = spec.ignore_index
        self.confusion = torch.zeros(spec.num_classes, spec.num_classes, dtype=torch.long)
        self.saw_nan = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_metric_shapes(self.spec, pred, target)
        self.confusion += confusion_matrix(pred.argmax(dim=1).cpu(), target.cpu(),
                                           self.num_classes, self.ignore_index)
        valid = ~is_ignore_index(target, self.ignore_index)
        self.saw_nan = self.saw_nan or bool(torch.isnan(pred).any(dim=1)[valid].any())

    def compute(self) -> dict[str, float]:
        scores = segmentation_scores(self.confusion, self.ignore_index)
        return {name: float("nan") for name in scores} if self.saw_nan else scores

    @property
    def count(self) -> int:
        return int(self.confusion.sum())


class _Depth(MetricAccumulator):
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.delta_hits = 0
        self.total = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_metric_shapes(self.spec, pred, target)
        valid = target > 0
        d_hat = pred[valid].double()
        d = target[valid].double()
        err = (d_hat - d).abs()
        self.abs_sum += float(err.sum())
        self.rel_sum += float((err / d).sum())
        # A non-positive prediction has an infinite ratio, so it is never within 1.25.
        ratio = torch.maximum(d_hat / d, d / d_hat.clamp(min=1e-12))
        self.delta_hits += int((ratio < 1.25).sum())
        self.total += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if not self.total:
            return {"abs_err": float("nan"), "rel_err": float("nan"), "delta_1.25": float("nan")}
        return {"abs_err": self.abs_sum / self.total, "rel_err": self.rel_sum / self.total,
                "delta_1.25": self.delta_hits / self.total}

    @property
    def count(self) -> int:
        return self.total


class _Normals(MetricAccumulator):
    _BIN_DEG = 0.01
    _THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.bins = int(round(180.0 / self._BIN_DEG))
        self.histogram = torch.zeros(self.bins, dtype=torch.long)
        self.angle_sum = 0.0
        self.within = [0, 0, 0]
        self.total = 0
        self.undefined = 0  # angles of non-finite predictions (NaN)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_metric_shapes(self.spec, pred, target)
        errors = angle_errors_deg(pred, target).cpu()
        finite = torch.isfinite(errors)
        # A NaN angle has no bin (cast to an integer it would land in bin 0, a perfect score);
        # it makes the median NaN, as in numpy, and the mean through the sum.
        self.undefined += int((~finite).sum())
        index = (errors[finite] / self._BIN_DEG).long().clamp(0, self.bins - 1)
        self.histogram += torch.bincount(index, minlength=self.bins)
        self.angle_sum += float(errors.sum())
        for k, threshold in enumerate(self._THRESHOLDS):
            self.within[k] += int((errors < threshold).sum())
        self.total += int(errors.numel())

    def _order_statistic(self, k: int) -> float:
        """The ``k``-th smallest error (1-based), as the centre of its histogram bin."""
        cumulative = self.histogram.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor([k], dtype=torch.long))[0])
        return (b + 0.5) * self._BIN_DEG

    def _median(self) -> float:
        # As numpy's median: the middle order statistic, or the mean of the two middle ones.
        n = self.total
        if n % 2:
            return self._order_statistic((n + 1) // 2)
        return 0.5 * (self._order_statistic(n // 2) + self._order_statistic(n // 2 + 1))

    def compute(self) -> dict[str, float]:
        if not self.total:
            return {k: float("nan") for k in ("mean_angle", "median_angle", "within_11.25",
                                              "within_22.5", "within_30")}
        return {
            "mean_angle": self.angle_sum / self.total,
            "median_angle": float("nan") if self.undefined else self._median(),
            "within_11.25": self.within[0] / self.total,
            "within_22.5": self.within[1] / self.total,
            "within_30": self.within[2] / self.total,
        }

    @property
    def count(self) -> int:
        return self.total


class _Regression(MetricAccumulator):
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.sq_sum = 0.0
        self.abs_sum = 0.0
        self.total = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_metric_shapes(self.spec, pred, target)
        diff = pred.reshape(pred.shape[0], -1).double() - target.reshape(
            target.shape[0], -1).double()
        self.sq_sum += float(diff.pow(2).sum())
        self.abs_sum += float(diff.abs().sum())
        self.total += int(diff.numel())

    def compute(self) -> dict[str, float]:
        if not self.total:
            return {"mse": float("nan"), "mae": float("nan")}
        return {"mse": self.sq_sum / self.total, "mae": self.abs_sum / self.total}

    @property
    def count(self) -> int:
        return self.total


class _Binary(MetricAccumulator):
    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.correct = 0
        self.squared = 0.0
        self.total = 0
        self.saw_nan = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_metric_shapes(self.spec, pred, target)
        logits = pred.reshape(pred.shape[0], -1).double()
        labels = target.reshape(target.shape[0], -1).to(logits.device).double()
        keep = labels != self.spec.ignore_index
        logits, labels = logits[keep], labels[keep]
        self.correct += int(((logits > 0) == (labels >= 0.5)).sum())
        self.squared += float((torch.sigmoid(logits) - labels).pow(2).sum())
        self.total += int(keep.sum())
        self.saw_nan = self.saw_nan or bool(torch.isnan(logits).any())

    def compute(self) -> dict[str, float]:
        if self.saw_nan or not self.total:
            return {"accuracy": float("nan"), "brier": float("nan")}
        return {"accuracy": self.correct / self.total, "brier": self.squared / self.total}

    @property
    def count(self) -> int:
        return self.total


_ACCUMULATORS: dict[str, type[MetricAccumulator]] = {
    "classification": _Classification,
    "segmentation": _Segmentation,
    "depth": _Depth,
    "normals": _Normals,
    "regression": _Regression,
    "binary": _Binary,
}


def make_accumulator(spec: TaskSpec) -> MetricAccumulator:
    """A fresh accumulator of the metrics of ``spec``'s task kind."""
    return _ACCUMULATORS[spec.kind](spec)  # type: ignore[call-arg]
