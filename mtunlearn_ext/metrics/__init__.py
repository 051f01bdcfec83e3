"""Metrics: per-task metrics per split, membership inference, UIS (and its sampling floor), the
gap to retraining, and the check that an unlearned model kept its performance."""

from mtunlearn_ext.metrics.evaluate import evaluate, evaluate_splits, per_sample_task_losses
from mtunlearn_ext.metrics.membership import (
    MIAResult,
    MembershipAttack,
    auc_chance_spread,
    membership_attack,
    mia_auc,
)
from mtunlearn_ext.metrics.retained import (
    DEFAULT_TOLERANCE,
    KEPT_SPLITS,
    MetricChange,
    RetainedCheck,
    check_retained,
    retained_changes,
)
from mtunlearn_ext.metrics.scores import retrain_gap, retrain_gap_terms, uis, uis_terms
from mtunlearn_ext.metrics.task_metrics import (
    METRICS,
    MetricAccumulator,
    MetricInfo,
    angle_errors_deg,
    confusion_matrix,
    make_accumulator,
    segmentation_scores,
)
from mtunlearn_ext.metrics.uis_floor import UISFloor, uis_floor

__all__ = ["DEFAULT_TOLERANCE", "KEPT_SPLITS", "METRICS", "MIAResult", "MembershipAttack",
           "MetricAccumulator", "MetricChange", "MetricInfo", "RetainedCheck", "UISFloor",
           "angle_errors_deg", "auc_chance_spread", "check_retained", "confusion_matrix", "evaluate",
           "evaluate_splits", "make_accumulator", "membership_attack", "mia_auc",
           "per_sample_task_losses", "retained_changes",
           "retrain_gap", "retrain_gap_terms", "segmentation_scores", "uis", "uis_floor",
           "uis_terms"]
