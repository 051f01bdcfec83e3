"""Checks of round 41 on the test split (not tuning): the strongest full-request baseline with
the same head refit, and the method's round-40 preset (no refit) on the same machine.

    python benchmarks/results/unlearning/baseline_refit.py --recipe memorising --jobs 2 \
        --seeds 0,1,2,3,4,5,6 --requests full --methods _orthograd_refit \
        --output-dir runs/baseline_refit
    python benchmarks/results/unlearning/baseline_refit.py --recipe memorising --jobs 2 \
        --seeds 0,1,2,3,4,5,6 --requests full --methods _interference_aware_round40 \
        --output-dir runs/round40_preset

``head_refit_steps`` is a setting of every step-based method, not of the interference-aware
one alone: refitting the heads after any forget steps might lower any method's UIS. This
registers ``_orthograd_refit``, OrthoGrad with its memorising full-request preset plus the
method's 10 refit steps (the baselines' presets were selected without refit, and this is no
selection: the same 10 steps, run once on the test splits), so that the results file can say
how much of the method's lead over OrthoGrad the refit alone accounts for.
``_interference_aware_round40`` is the method with the preset before round 41 (no refit), so
that the round's effect on the test split is measured on one machine's models.
"""

from __future__ import annotations

# First: importing _experiments puts the repository on sys.path.
from _experiments import run_evaluation

from mtunlearn_ext.unlearning.baselines.orthograd import OrthoGrad
from mtunlearn_ext.unlearning.interference_aware import InterferenceAware
from mtunlearn_ext.unlearning.presets import MEMORISING
from mtunlearn_ext.unlearning.registry import register_unlearner


@register_unlearner
class OrthoGradRefit(OrthoGrad):
    name = "_orthograd_refit"


MEMORISING["full"]["_orthograd_refit"] = {
    **MEMORISING["full"]["orthograd"],
    "head_refit_steps": MEMORISING["full"]["interference_aware"]["head_refit_steps"]}



@register_unlearner
class InterferenceAwareRound40(InterferenceAware):
    name = "_interference_aware_round40"


MEMORISING["full"]["_interference_aware_round40"] = {
    **MEMORISING["full"]["interference_aware"], "head_refit_steps": 0}


if __name__ == "__main__":
    run_evaluation()
