"""Did an unlearned model keep its performance on what it was asked to keep?

An unlearning run is meant to move the forget pairs and nothing else. A run that wrecks the model
(too high a learning rate, a baseline that diverged without a NaN) forgets perfectly, and every
forgetting score praises it; only the kept splits show it. This module compares each task's
metrics on those splits (by default the retain pairs and the test set) before and after a run,
and measures how much each got worse, relative to its value before::

    w = (b - a) / |b|    where higher is better (an accuracy, an mIoU)
    w = (a - b) / |b|    where lower is better (an error in metres or degrees)

``b`` the metric before and ``a`` after: ``w = 0.1`` is a metric 10% worse than it was, and an
improvement is negative. A metric that was 0 before counts ``inf`` if it got worse at all (``0``
otherwise); one that is no longer finite after (a NaN prediction) counts ``inf``; one that was
not finite before cannot be compared and is listed with ``w = nan``, never failing the check.

Every metric of every task counts, not only the primary one: a model can keep its pixel
accuracy, which the frequent classes dominate, and lose its mIoU on the rare ones.
:data:`DEFAULT_TOLERANCE` is wide on purpose: on the project's memorising benchmarks, the
*retrained* model (the gold standard) worsens some kept metric by up to 18% against the
original (street, retain depth relative error, seed 5), as forgetting 10% of a small training
set moves what the rest of it taught; the check is a guard against a ruined model, not a
ranking of methods (UIS and the gap to retraining are, :mod:`mtunlearn_ext.metrics.scores`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mtunlearn_ext.metrics.scores import _check_same_keys, _direction

__all__ = ["DEFAULT_TOLERANCE", "KEPT_SPLITS", "MetricChange", "RetainedCheck",
           "check_retained", "retained_changes"]

#: The default largest relative worsening of a kept metric (25%); see the module docstring.
DEFAULT_TOLERANCE = 0.25

#: The splits whose performance an unlearning run must keep, as :func:`check_retained` reads
#: them by default: the retain pairs and the test set (the forget pairs are meant to change).
KEPT_SPLITS: tuple[str, ...] = ("retain", "test")

SplitMetrics = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class MetricChange:
    """One kept metric before and after a run.

    Attributes:
        split, task, metric: where it was measured and what.
        before, after: its values (``None`` for a value that was not finite, as records keep
            NaN/Inf).
        worsening: the relative worsening ``w`` of the module docstring (positive: worse).
    """

    split: str
    task: str
    metric: str
    before: float | None
    after: float | None
    worsening: float

    def describe(self) -> str:
        """``test/depth/abs_err 0.2895 -> 0.4102 (+41.7%)``."""
        return (f"{self.split}/{self.task}/{self.metric} {_value(self.before)} -> "
                f"{_value(self.after)} ({_percent(self.worsening)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (``worsening`` ``None`` where it is NaN or infinite, as JSON has
        neither; ``before``/``after`` say which)."""
        return {"split": self.split, "task": self.task, "metric": self.metric,
                "before": self.before, "after": self.after,
                "worsening": self.worsening if math.isfinite(self.worsening) else None}


@dataclass(frozen=True)
class RetainedCheck:
    """The outcome of :func:`check_retained`.

    Attributes:
        tolerance: the largest relative worsening a kept metric may have.
        splits: the splits compared.
        changes: every metric compared, in the order of the inputs.
    """

    tolerance: float
    splits: tuple[str, ...]
    changes: tuple[MetricChange, ...]

    @property
    def exceeded(self) -> tuple[MetricChange, ...]:
        """The metrics that worsened by more than ``tolerance``, worst first."""
        over = [c for c in self.changes if c.worsening > self.tolerance]
        return tuple(sorted(over, key=lambda c: -c.worsening))

    @property
    def passed(self) -> bool:
        """No kept metric worsened by more than ``tolerance``."""
        return not self.exceeded

    @property
    def worst(self) -> MetricChange | None:
        """The comparable metric that worsened most (``None`` when none is comparable)."""
        comparable = [c for c in self.changes if not math.isnan(c.worsening)]
        return max(comparable, key=lambda c: c.worsening, default=None)

    def summary(self, shown: int = 3) -> str:
        """One line: passed with the worst change, or failed with the first ``shown`` metrics
        over the tolerance."""
        limit = _percent(self.tolerance).lstrip("+")
        where = ", ".join(self.splits)
        if self.passed:
            worst = self.worst
            detail = ("no metric comparable" if worst is None
                      else "none got worse" if worst.worsening <= 0
                      else f"worst {worst.describe()}")
            return f"kept metrics ({where}) within {limit} of the input model's: {detail}"
        over = self.exceeded
        listed = "; ".join(c.describe() for c in over[:shown])
        more = f"; and {len(over) - shown} more" if len(over) > shown else ""
        return (f"{len(over)} kept metric(s) ({where}) worsened by more than {limit}: "
                f"{listed}{more}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, as unlearning records keep it."""
        worst = self.worst
        return {"tolerance": self.tolerance, "splits": list(self.splits),
                "passed": self.passed,
                "worst": None if worst is None else worst.to_dict(),
                "exceeded": [c.to_dict() for c in self.exceeded],
                "changes": [c.to_dict() for c in self.changes]}


def _value(value: float | None) -> str:
    return "NaN/Inf" if value is None else f"{value:.4g}"


def _percent(fraction: float) -> str:
    if math.isnan(fraction):
        return "not comparable"
    if math.isinf(fraction):
        return "+inf%" if fraction > 0 else "-inf%"
    return f"{100 * fraction:+.1f}%"


def _finite(value: Any, where: str) -> float | None:
    """A metric value as a float, ``None`` when missing or not finite; a non-number is a
    ``TypeError`` naming where it was found."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"check_retained: {where} must be a number, got "
                        f"{type(value).__name__} {value!r}")
    value = float(value)
    return value if math.isfinite(value) else None


def _worsening(before: float | None, after: float | None, higher_is_better: bool) -> float:
    if before is None:
        return math.nan
    if after is None:
        return math.inf
    worse_by = before - after if higher_is_better else after - before
    if before == 0.0:
        return math.inf if worse_by > 0 else 0.0
    return worse_by / abs(before)


def _split_names(splits: Iterable[str]) -> tuple[str, ...]:
    """``splits`` as a tuple (one name given as a string is one split), refused when empty."""
    names = (splits,) if isinstance(splits, str) else tuple(splits)
    if not names:
        raise ValueError("check_retained: `splits` must name at least one split, got none")
    return names


def retained_changes(before: SplitMetrics, after: SplitMetrics, *,
                     splits: Iterable[str] = KEPT_SPLITS,
                     higher_is_better: Mapping[str, bool] | None = None) -> list[MetricChange]:
    """Every metric of every task on ``splits``, before and after, with its relative worsening
    (the module docstring).

    Args:
        before, after: ``split -> task -> metric -> value``, e.g. ``{"test":
            mtunlearn_ext.evaluate(model, test_data, tasks=...)}`` for each model, or the
            ``"metrics"`` of an unlearning record's ``before`` and ``after``. Both must hold the
            same tasks and metrics on each split compared.
        splits: the splits to compare (default :data:`KEPT_SPLITS`); each must be in both.
        higher_is_better: directions of metrics unknown to
            :data:`~mtunlearn_ext.metrics.METRICS` (or overrides).

    Raises:
        ValueError: a split missing from an input; tasks or metrics that differ between them.
        KeyError: a metric of unknown direction.
        TypeError: a value that is not a number (or ``None``).
    """
    changes: list[MetricChange] = []
    for split in _split_names(splits):
        for label, metrics in (("before", before), ("after", after)):
            if split not in metrics:
                raise ValueError(f"check_retained: `{label}` has no split {split!r} (it has "
                                 f"{sorted(metrics)}); pass the splits both hold as `splits`")
        tasks_before, tasks_after = before[split], after[split]
        _check_same_keys("check_retained", f"tasks of split {split!r}", tasks_before, "before",
                         tasks_after, "after")
        for task, values_before in tasks_before.items():
            values_after = tasks_after[task]
            _check_same_keys("check_retained", f"metrics of {split}/{task}", values_before,
                             "before", values_after, "after")
            for metric, value in values_before.items():
                higher = _direction(metric, higher_is_better)
                b = _finite(value, f"before[{split!r}][{task!r}][{metric!r}]")
                a = _finite(values_after[metric], f"after[{split!r}][{task!r}][{metric!r}]")
                changes.append(MetricChange(split, task, metric, b, a,
                                            _worsening(b, a, higher)))
    return changes


def check_retained(before: SplitMetrics, after: SplitMetrics,
                   tolerance: float = DEFAULT_TOLERANCE, *,
                   splits: Sequence[str] = KEPT_SPLITS,
                   higher_is_better: Mapping[str, bool] | None = None) -> RetainedCheck:
    """Whether every kept metric stayed within ``tolerance`` (a fraction: 0.25 allows each
    metric to get 25% worse than it was) of its value before the run.

    ``before``, ``after``, ``splits`` and ``higher_is_better`` as in :func:`retained_changes`.
    ``tolerance`` must be a finite number >= 0 (``ValueError`` naming it otherwise).

    Example::

        before = {"test": mtunlearn_ext.evaluate(model, test, tasks=tasks)}
        new_model, report = mtunlearn_ext.unlearn(model, tasks=tasks, ...)
        after = {"test": mtunlearn_ext.evaluate(new_model, test, tasks=tasks)}
        check = check_retained(before, after, splits=["test"])
        if not check.passed:
            print(check.summary())
    """
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
            or not math.isfinite(tolerance) or tolerance < 0):
        raise ValueError(f"check_retained: `tolerance` must be a finite number >= 0 (a "
                         f"fraction of each metric's value), got {tolerance!r}")
    names = _split_names(splits)
    changes = retained_changes(before, after, splits=names, higher_is_better=higher_is_better)
    return RetainedCheck(float(tolerance), names, tuple(changes))
