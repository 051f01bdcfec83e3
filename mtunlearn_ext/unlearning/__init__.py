"""Unlearning: the common interface, shared step machinery, and the baseline methods.

Importing this package registers every built-in method in :data:`UNLEARNERS`; a new method
subclasses :class:`Unlearner` (or :class:`GradientUnlearner` for a step-based one) and
decorates itself with :func:`register_unlearner`: a built-in one is imported here, a method of
one's own by its own module (``--import MODULE`` on the command lines; docs/unlearning.md,
"Extending the library").
"""

from mtunlearn_ext.unlearning.base import (
    CurveRecorder,
    EarlierRequest,
    RequestFacts,
    Unlearner,
    UnlearnerConfig,
    UnlearningProblem,
    UnlearningReport,
    UnlearningResult,
    seed_everything,
)
from mtunlearn_ext.unlearning.batches import BatchStream, batch_to, child_generator
from mtunlearn_ext.unlearning.gradients import (
    ParameterGroups,
    per_sample_retain_grads,
    per_sample_retain_grads_and_losses,
    per_sample_task_grads_and_losses,
    summed_pass_grads,
    task_grads,
)
from mtunlearn_ext.unlearning.loop import (
    GradientUnlearner,
    StepConfig,
    StepContext,
    StepOptimizer,
    StepStats,
)
from mtunlearn_ext.unlearning.objectives import (
    DEFAULT_FORGET_OBJECTIVES,
    FORGET_OBJECTIVES,
    ForgetObjective,
    make_forget_objectives,
    register_forget_objective,
)
from mtunlearn_ext.unlearning.registry import (
    UNLEARNERS,
    available_unlearners,
    get_unlearner,
    register_unlearner,
)
from mtunlearn_ext.unlearning.terms import ForgetTerms, RetainTerms, forget_terms, retain_terms
from mtunlearn_ext.unlearning import baselines  # noqa: E402,F401  (registers the baselines)
from mtunlearn_ext.unlearning.baselines import BASELINES
from mtunlearn_ext.unlearning.baselines.pcgrad import PCGradGranularity
from mtunlearn_ext.unlearning.interference_aware import (  # noqa: E402  (registers the method)
    CapReference,
    InstanceProjection,
    InstanceRows,
    InterferenceAware,
    InterferenceAwareConfig,
    ProtectMode,
    RankMatchedCaps,
    SnapshotTargets,
)

__all__ = [
    "BASELINES",
    "DEFAULT_FORGET_OBJECTIVES",
    "FORGET_OBJECTIVES",
    "BatchStream",
    "CapReference",
    "CurveRecorder",
    "EarlierRequest",
    "ForgetObjective",
    "ForgetTerms",
    "GradientUnlearner",
    "InstanceProjection",
    "InstanceRows",
    "InterferenceAware",
    "InterferenceAwareConfig",
    "PCGradGranularity",
    "ParameterGroups",
    "ProtectMode",
    "RankMatchedCaps",
    "RequestFacts",
    "RetainTerms",
    "SnapshotTargets",
    "StepConfig",
    "StepContext",
    "StepOptimizer",
    "StepStats",
    "UNLEARNERS",
    "Unlearner",
    "UnlearnerConfig",
    "UnlearningProblem",
    "UnlearningReport",
    "UnlearningResult",
    "available_unlearners",
    "batch_to",
    "child_generator",
    "forget_terms",
    "get_unlearner",
    "make_forget_objectives",
    "per_sample_retain_grads",
    "per_sample_retain_grads_and_losses",
    "per_sample_task_grads_and_losses",
    "register_forget_objective",
    "register_unlearner",
    "retain_terms",
    "seed_everything",
    "summed_pass_grads",
    "task_grads",
]
