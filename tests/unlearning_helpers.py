"""Shared set-up of the interference-aware unlearner's tests: a method's step context on a
problem, as its own loop would build it (a copy of the model in train mode, parameter groups,
seeded forget objectives, the method's ``setup``)."""

from __future__ import annotations

import copy

import torch

from mtunlearn_ext.unlearning import (
    ParameterGroups,
    UnlearningProblem,
    UnlearningReport,
    make_forget_objectives,
)
from mtunlearn_ext.unlearning.interference_aware import InterferenceAware
from mtunlearn_ext.unlearning.loop import StepContext


def step_context(problem: UnlearningProblem, method: InterferenceAware) -> StepContext:
    model = copy.deepcopy(problem.model).train()
    groups = ParameterGroups.from_model(model, problem.task_names)
    generator = torch.Generator().manual_seed(0)
    objectives = make_forget_objectives(problem.target_specs(), problem.retain, generator, "cpu",
                                        method.config.forget_objective
                                        or method.default_forget_objective)
    ctx = StepContext(model, problem, groups, objectives, generator)
    method.setup(ctx, UnlearningReport(method=method.name, config={}))
    return ctx
