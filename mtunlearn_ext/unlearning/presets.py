"""Fixed hyper-parameters of every step-based method, per training recipe and request type.

Two recipes: ``"default"`` (the benchmarks' own, ``load_benchmark(...).info["train_config"]``:
10 epochs on ``indoor`` / ``street``) and ``"memorising"`` (the same with 40 epochs, after which
the original model memorises its training instances: forget-set attack AUC 0.86 / 0.74 against
0.47 for the retrained model). :func:`tuned_settings` gives a method's settings for a request.

How they were chosen (``python benchmarks/unlearning_eval.py --tune`` then ``--select``): on
seed 0 only, for each method a grid (learning rates, and for the interference-aware method also
``alpha``, update clip, forget cap, subspace size), one run per grid point scored after several
step budgets (a run of ``s`` steps is the first ``s`` steps of a longer one), by
``selection_score`` of that script: half the gap to the retrained model on the forget pairs, half
the change from the original model on a fixed subset of the retain pairs, each metric normalised
as in :func:`~mtunlearn_ext.metrics.retrain_gap`. The test split and the membership attack (which
needs test instances) were never looked at. The same settings are then used for every seed:
nothing is tuned per seed or on test data.

``DEFAULT``: baselines selected on ``indoor`` only; the interference-aware method on the mean
over ``indoor`` and ``street``: learning rate (6e-3, 1e-2), ``alpha`` (1, 3, 5), update clip
(5, 1) and step budget (10 to 25). The clip matters most there: with a clip of 5, 5 plain SGD
steps of *retain descent alone* moved the ``street`` model from score 0.35 to 2.39 (its retain
gradients are large at the AdamW-trained optimum); a clip of 1 bounds each step to ``lr`` in
parameter norm. Full requests 25 steps at ``alpha = 1`` (score 1.43 indoor / 1.04 street, vs
1.98 / 1.94 for the untouched model); partial requests 15 steps at ``alpha = 3`` (0.40 / 0.72,
vs 0.78 / 0.35).

``MEMORISING``: every method selected on the mean score over ``indoor`` and ``street`` (seed 0
of each). Baselines: learning rates 1e-3, 3e-3, 1e-2 (``finetune``, ``neggrad_plus``,
``orthograd``), 3e-4, 1e-3, 3e-3 (``gradient_ascent``, ``pcgrad``), 3e-4, 1e-3 (``random_labels``,
``salun``), budgets 10 to 60 steps. The interference-aware method: learning rate 3e-3 to 2e-2,
``alpha`` 1 / 3 / 5, clip 1 / 2 / 5, cap quantile 0.9 / 0.99 / none, ``k`` 8 / 24, budgets 10 to
40 steps (its wall-time target is 15% of retraining; 40 steps is about 13%). Selected scores
(mean of indoor and street; untouched model 5.59 full / 0.63 partial): full requests
``orthograd`` 3.62, this method 3.99 (35 steps, ``lr`` 1e-2, clip 2, no retain-quantile cap:
the model memorises, so the forget pairs' losses must rise past the retained pairs' 90th
percentile to reach the retrained model's), ``neggrad_plus`` 4.15; partial requests ``pcgrad``
0.38, ``gradient_ascent`` 0.44, ``orthograd`` 0.49, this method 0.56.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

__all__ = ["ABLATIONS", "DEFAULT", "MEMORISING", "RECIPES", "TUNED", "tuned_settings"]

#: The ablation variants of the interference-aware method (registry names).
ABLATIONS: tuple[str, ...] = ("interference_aware_no_task", "interference_aware_no_instance",
                              "interference_aware_neither")

#: request type -> method -> settings for the default recipes (the module docstring says how
#: they were chosen).
DEFAULT: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "finetune": {"lr": 3e-3, "steps": 40},
        "gradient_ascent": {"lr": 1e-3, "steps": 10},
        "neggrad_plus": {"lr": 1e-3, "steps": 60},
        "random_labels": {"lr": 1e-3, "steps": 10},
        "salun": {"lr": 1e-3, "steps": 10},
        "orthograd": {"lr": 3e-3, "steps": 40},
        "pcgrad": {"lr": 1e-3, "steps": 10},
        "interference_aware": {"lr": 6e-3, "steps": 25, "alpha": 1.0, "grad_clip": 1.0},
    },
    "partial": {
        "finetune": {"lr": 1e-3, "steps": 20},
        "gradient_ascent": {"lr": 1e-3, "steps": 10},
        "neggrad_plus": {"lr": 3e-3, "steps": 10},
        "random_labels": {"lr": 1e-3, "steps": 10},
        "salun": {"lr": 1e-3, "steps": 10},
        "orthograd": {"lr": 1e-3, "steps": 40},
        "pcgrad": {"lr": 1e-3, "steps": 10},
        "interference_aware": {"lr": 6e-3, "steps": 15, "alpha": 3.0, "grad_clip": 1.0},
    },
}


#: request type -> method -> settings for the memorising recipe (the default recipe with 40
#: epochs instead of 10), selected by mean score over ``indoor`` and ``street`` (seed 0,
#: training data only; see the module docstring).
MEMORISING: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "finetune": {"lr": 1e-3, "steps": 60},
        "gradient_ascent": {"lr": 3e-4, "steps": 10},
        "neggrad_plus": {"lr": 1e-2, "steps": 40},
        "random_labels": {"lr": 3e-4, "steps": 10},
        "salun": {"lr": 3e-4, "steps": 10},
        "orthograd": {"lr": 3e-3, "steps": 60},
        "pcgrad": {"lr": 3e-4, "steps": 60},
        "interference_aware": {"lr": 1e-2, "steps": 35, "alpha": 1.0, "grad_clip": 2.0,
                               "cap_quantile": None},
    },
    "partial": {
        "finetune": {"lr": 1e-3, "steps": 60},
        "gradient_ascent": {"lr": 3e-3, "steps": 10},
        "neggrad_plus": {"lr": 1e-2, "steps": 60},
        "random_labels": {"lr": 3e-4, "steps": 10},
        "salun": {"lr": 3e-4, "steps": 10},
        "orthograd": {"lr": 3e-3, "steps": 60},
        "pcgrad": {"lr": 3e-4, "steps": 60},
        "interference_aware": {"lr": 1e-2, "steps": 10, "alpha": 3.0, "grad_clip": 1.0},
    },
}

#: recipe -> training overrides of the benchmark's default recipe that define it.
RECIPES: dict[str, dict[str, Any]] = {"default": {}, "memorising": {"epochs": 40}}

#: recipe -> request type -> method -> settings.
TUNED: dict[str, dict[str, dict[str, dict[str, Any]]]] = {"default": DEFAULT,
                                                          "memorising": MEMORISING}


def tuned_settings(request: str, methods: Sequence[str],
                   recipe: str = "default") -> dict[str, dict[str, Any]]:
    """The settings of ``methods`` for a ``"full"`` or ``"partial"`` request on ``recipe``
    (``"default"``: the benchmarks' own training recipes; ``"memorising"``: 40 epochs). The
    ablations inherit the interference-aware method's; methods without an entry, such as
    ``retrain``, get none."""
    if recipe not in TUNED:
        raise ValueError(f"tuned_settings: recipe must be one of {sorted(TUNED)}, got "
                         f"{recipe!r}")
    if request not in TUNED[recipe]:
        raise ValueError(f"tuned_settings: request must be one of {sorted(TUNED[recipe])}, got "
                         f"{request!r}")
    table = TUNED[recipe][request]
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        source = "interference_aware" if method in ABLATIONS else method
        if source in table:
            out[method] = copy.deepcopy(table[source])
    return out
