"""Summary scores of an unlearned model: UIS (OrthoGrad's formula) and the gap to retraining.

Inputs are the metric dicts of :func:`~mtunlearn_ext.metrics.evaluate`: task -> metric -> value
(and split -> task -> metric -> value for the retrain gap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mtunlearn_ext._errors import UnknownNameError
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, warn_at_caller
from mtunlearn_ext.metrics.task_metrics import METRICS

__all__ = ["retrain_gap", "retrain_gap_terms", "uis", "uis_of_terms", "uis_terms"]

Scores = Mapping[str, Mapping[str, float]]


def _direction(metric: str, higher_is_better: Mapping[str, bool] | None) -> bool:
    if higher_is_better is not None and metric in higher_is_better:
        return bool(higher_is_better[metric])
    if metric in METRICS:
        return METRICS[metric].higher_is_better
    raise UnknownNameError(f"unknown metric {metric!r}: give its direction in `higher_is_better`")


def _check_same_keys(caller: str, what: str, reference: Mapping[str, Any], reference_label: str,
                     other: Mapping[str, Any], other_label: str, hint: str = "") -> None:
    """Raise ``ValueError`` when ``other`` has other keys than ``reference``, naming both
    arguments and the missing and extra keys. A key in one input only used to be skipped: a
    typo in one task name (``'Size'`` for ``'size'``) left that task out and scored a model
    that had lost it as if it had kept it."""
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        raise ValueError(f"{caller}: the {what} of `{other_label}` differ from those of "
                         f"`{reference_label}`: missing {missing}, extra {extra}{hint}")


def uis_term_defined(original_test_score: float) -> bool:
    """Whether a UIS term is defined: its normaliser ``O_t`` is finite and not 0 (else
    :func:`uis_terms` skips it with a warning)."""
    return math.isfinite(original_test_score) and original_test_score != 0.0


def uis_terms(original_test: Scores, unlearned_test: Scores, unlearned_forget: Scores,
              higher_is_better: Mapping[str, bool] | None = None,
              tasks: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per task and metric, the pieces of :func:`uis` (each x100); the inputs as in :func:`uis`.

    Returns task -> metric -> ``{"uis": (test_change + forget_change) / 2, "test_change":
    |O_t - U_t| / |O_t|, "forget_change": |O_t - U_u| / |O_t|, "forget_advantage": s (U_u - O_t)
    / |O_t|}`` with ``s = +1`` for higher-is-better metrics and ``-1`` for errors, so
    ``forget_advantage > 0`` means the forget set still scores *better* than unseen data (not yet
    forgotten) and ``< 0`` that it scores worse (over-forgotten). Terms with ``O_t == 0`` or a
    non-finite ``O_t`` are skipped with a warning (the ratio is undefined). A non-finite ``U_t``
    or ``U_u`` (a model that diverged) is an infinite change: its term's ``uis`` is ``inf``,
    never left out (leaving it out would score a broken model better).
    """
    if tasks is None:
        hint = (" (pass `tasks` to score a subset, e.g. the target tasks of a partial-task "
                "request, whose forget set has no other task)")
        _check_same_keys("uis", "tasks", original_test, "original_test", unlearned_test,
                         "unlearned_test", hint)
        _check_same_keys("uis", "tasks", original_test, "original_test", unlearned_forget,
                         "unlearned_forget", hint)
    names = tasks if tasks is not None else list(original_test)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task in names:
        for source, label in ((original_test, "original_test"), (unlearned_test, "unlearned_test"),
                              (unlearned_forget, "unlearned_forget")):
            if task not in source:
                raise UnknownNameError(f"uis: task {task!r} missing from `{label}`")
        for source, label in ((unlearned_test, "unlearned_test"),
                              (unlearned_forget, "unlearned_forget")):
            _check_same_keys("uis", f"metrics of task {task!r}", original_test[task],
                             "original_test", source[task], label)
        metrics = list(original_test[task])
        for metric in metrics:
            sign = 1.0 if _direction(metric, higher_is_better) else -1.0
            o_t = float(original_test[task][metric])
            u_t = float(unlearned_test[task][metric])
            u_u = float(unlearned_forget[task][metric])
            if not uis_term_defined(o_t):
                warn_at_caller(f"uis: skipping {task}/{metric} (O_t={o_t}, U_t={u_t}, U_u={u_u}): "
                               "the relative change is undefined", MtUnlearnRuntimeWarning)
                continue
            test_change = _change(o_t, u_t)
            forget_change = _change(o_t, u_u)
            out.setdefault(task, {})[metric] = {
                "uis": 100.0 * (test_change + forget_change) / 2.0,
                "test_change": 100.0 * test_change,
                "forget_change": 100.0 * forget_change,
                "forget_advantage": 100.0 * sign * (u_u - o_t) / abs(o_t),
            }
    return out


def _change(reference: float, value: float) -> float:
    """``|reference - value| / |reference|``; ``inf`` for a non-finite ``value``."""
    return abs(reference - value) / abs(reference) if math.isfinite(value) else math.inf


def uis(original_test: Scores, unlearned_test: Scores, unlearned_forget: Scores,
        higher_is_better: Mapping[str, bool] | None = None,
        tasks: Sequence[str] | None = None) -> float:
    """Unlearning Impact Score, OrthoGrad's formula (lower is better), x100.

    For every task ``t`` (of ``tasks``, default all) and metric ``m``, with ``O_t`` the original
    model's test score, ``U_t`` the unlearned model's test score and ``U_u`` its forget-set
    score::

        UIS_{t,m} = 100 * (|O_t - U_t| / |O_t| + |O_t - U_u| / |O_t|) / 2

    (OrthoGrad's ``/ O_t`` for the positive scores of :data:`METRICS`; ``|O_t|`` keeps a custom
    metric's negative score, an R^2 below 0 say, from giving a negative change.)

    The first half penalises any change on unseen data (utility lost), the second any distance
    of the forget-set score from the original model's level on unseen data: a forget set that
    still scores better than unseen data is under-forgotten, one that scores worse is
    over-forgotten; both count. ``UIS = mean over tasks of (mean over that task's metrics of
    UIS_{t,m})``: each task weighs the same however many metrics it has (normals report five,
    classification one).

    Error metrics (lower is better) enter unchanged: the absolute values make every term a
    direction-free relative change, so no sign flip is needed, and converting an error into a
    score first (say ``180 - angle``) would change the normaliser ``O_t`` and the value. The
    direction (``higher_is_better``: metric -> bool, default :data:`METRICS`) is checked to exist
    for every metric and used in :func:`uis_terms`' signed ``forget_advantage``.

    Args:
        original_test: the original model's test metrics, task -> metric -> value.
        unlearned_test: the unlearned model's test metrics.
        unlearned_forget: the unlearned model's forget-set metrics (only the forget pairs).
        higher_is_better: directions of metrics unknown to :data:`METRICS` (or overrides).
        tasks: tasks to include (default: every task; in partial-task unlearning pass the
            target tasks, the non-target tasks having no forget pairs).

    Raises:
        ValueError: without ``tasks``, when the three inputs do not name the same tasks; for
            every task included, when they do not name the same metrics of it (a key in one
            input only is a typo or a mismatched evaluation, never a term to skip); when no
            term is defined (``O_t`` 0 or not finite for every one), naming them.
        KeyError: a task of ``tasks`` missing from an input; a metric of unknown direction.
    """
    terms = uis_terms(original_test, unlearned_test, unlearned_forget, higher_is_better, tasks)
    if not terms:
        names = tasks if tasks is not None else list(original_test)
        undefined = [f"{t}/{m} (O_t={float(v):g})" for t in names
                     for m, v in original_test[t].items()]
        raise ValueError("uis: no term is defined: " + (
            f"O_t is 0 or not finite for every (task, metric) scored: {undefined}"
            if undefined else "no task or metric to score (`tasks` or the inputs are empty)"))
    return uis_of_terms(terms)


def uis_of_terms(terms: Mapping[str, Mapping[str, Mapping[str, float]]]) -> float:
    """:func:`uis` from its :func:`uis_terms` (for callers that keep the terms too): the mean
    over tasks of the mean over each task's metrics."""
    if not terms:
        raise ValueError("uis: no (task, metric) present in all three inputs with O_t != 0")
    per_task = [sum(v["uis"] for v in metrics.values()) / len(metrics)
                for metrics in terms.values()]
    return sum(per_task) / len(per_task)


def _normalised_gap(metric: str, unlearned: float, retrained: float,
                    bounded: Mapping[str, bool] | None) -> float:
    is_bounded = (bounded[metric] if bounded is not None and metric in bounded
                  else METRICS[metric].bounded if metric in METRICS else None)
    if is_bounded is None:
        raise UnknownNameError(f"retrain_gap: unknown metric {metric!r}: say in `bounded` whether "
                               f"it is a fraction in [0, 1]")
    gap = abs(unlearned - retrained)
    return gap if is_bounded or retrained == 0.0 else gap / abs(retrained)


def _check_auc(value: object, name: str) -> None:
    """Refuse an attack AUC that is no number in ``[0, 1]``; NaN (an attack that could not be
    scored) passes and is handled by the caller."""
    what = (f"retrain_gap: `{name}` must be a number in [0, 1] (or NaN where the attack is "
            f"undefined), got {value!r}")
    if value is None:
        return
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(what)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise TypeError(what) from error
    if not (math.isnan(number) or 0.0 <= number <= 1.0):
        raise ValueError(what)


def retrain_gap_terms(unlearned: Mapping[str, Scores], retrained: Mapping[str, Scores],
                      unlearned_mia_auc: float | None = None,
                      retrained_mia_auc: float | None = None,
                      bounded: Mapping[str, bool] | None = None) -> dict[str, float]:
    """The normalised gaps of :func:`retrain_gap`, keyed ``"split/task/metric"`` (and
    ``"mia_auc"``), each x100; the inputs as in :func:`retrain_gap`."""
    _check_auc(unlearned_mia_auc, "unlearned_mia_auc")
    _check_auc(retrained_mia_auc, "retrained_mia_auc")
    _check_same_keys("retrain_gap", "splits", unlearned, "unlearned", retrained, "retrained")
    for split, tasks in unlearned.items():
        _check_same_keys("retrain_gap", f"tasks of split {split!r}", tasks, "unlearned",
                         retrained[split], "retrained")
        for task, metrics in tasks.items():
            _check_same_keys("retrain_gap", f"metrics of {split}/{task}", metrics, "unlearned",
                             retrained[split][task], "retrained")
    terms: dict[str, float] = {}
    for split, tasks in unlearned.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                gold = float(retrained[split][task][metric])
                if not math.isfinite(gold):
                    continue  # undefined for the gold model too (e.g. no labelled pixel)
                # A non-finite value of the unlearned model (it diverged) is an infinite gap,
                # never a term left out, which would score the broken model better.
                terms[f"{split}/{task}/{metric}"] = (
                    100.0 * _normalised_gap(metric, float(value), gold, bounded)
                    if math.isfinite(float(value)) else math.inf)
    if (unlearned_mia_auc is None) != (retrained_mia_auc is None):
        raise ValueError("retrain_gap: give both MIA AUCs or neither")
    if (unlearned_mia_auc is not None and retrained_mia_auc is not None
            and math.isfinite(float(retrained_mia_auc))):
        terms["mia_auc"] = (100.0 * abs(float(unlearned_mia_auc) - float(retrained_mia_auc))
                            if math.isfinite(float(unlearned_mia_auc)) else math.inf)
    return terms


def retrain_gap(unlearned: Mapping[str, Scores], retrained: Mapping[str, Scores],
                unlearned_mia_auc: float | None = None, retrained_mia_auc: float | None = None,
                bounded: Mapping[str, bool] | None = None) -> float:
    """Mean normalised gap to the retrained (gold) model, x100; 0 = indistinguishable.

    Over every ``(split, task, metric)`` (split -> task -> metric -> value, e.g. splits forget
    / retain / test; both inputs must name the same ones, else ``ValueError`` naming the
    missing and extra keys) and the attack AUC when both are given (each in ``[0, 1]``)::

        gap = 100 * mean_k g_k,   g_k = |u_k - r_k|          for fractions in [0, 1]
                                  g_k = |u_k - r_k| / |r_k|  for unbounded errors

    Normalisation: accuracies, mIoU, pixel accuracy, ``delta_1.25``, ``within_*`` and the AUC are
    fractions, so their absolute gap is already a share of the full scale (x100: percentage
    points). Errors in metres or degrees have no common scale, so their gap is taken relative to
    the retrained model's value (x100: percent of the gold error); ``r_k == 0`` falls back to
    the absolute gap. A flat mean: every entry counts once, the AUC as one entry. An entry
    undefined for the retrained model (NaN: a diverged model) is left out with a
    ``RuntimeWarning`` naming it; a non-finite
    entry of the unlearned model makes the gap ``inf`` (a model that diverged is not close).
    With no entry defined, ``ValueError`` names the undefined ones.

    Args:
        unlearned / retrained: split -> task -> metric -> value.
        unlearned_mia_auc / retrained_mia_auc: the attack AUCs (both or neither).
        bounded: metric -> whether it is a fraction, for metrics unknown to :data:`METRICS`.
    """
    terms = retrain_gap_terms(unlearned, retrained, unlearned_mia_auc, retrained_mia_auc, bounded)
    # Every term the inputs name; those missing from `terms` had no finite retrained value.
    named = [f"{split}/{task}/{metric}" for split, tasks in retrained.items()
             for task, metrics in tasks.items() for metric in metrics]
    named += ["mia_auc"] if retrained_mia_auc is not None else []
    left_out = [key for key in named if key not in terms]
    if not terms:
        raise ValueError("retrain_gap: no term is defined: " + (
            f"the retrained model's value is not finite for every one: {left_out}"
            if left_out else "the inputs hold no metric and no attack AUC"))
    if left_out:
        # evaluate() gives no NaN of its own (a task without a labelled unit is left out), so
        # this is a retrained model that diverged; a gap over the rest alone read as close
        # (a NaN retrained attack AUC left 0.0).
        warn_at_caller(f"retrain_gap: the retrained model's value is not finite for "
                       f"{left_out}: left out of the gap, which is the mean over the other "
                       f"{len(terms)} term(s) (a retrained model that diverged?)",
                       MtUnlearnRuntimeWarning)
    return sum(terms.values()) / len(terms)
