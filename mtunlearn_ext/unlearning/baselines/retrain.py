"""Retraining from scratch on the retain pairs: the gold standard of exact unlearning.

A freshly initialised model (``problem.model_factory``, the same architecture and initialisation
seed as the original) is trained on the retain set with the original recipe
(``problem.train_config``, same seed). Because training minimises the supervision-masked loss,
the forget pairs contribute nothing, while in a partial request the forget instances' non-target
labels still do, exactly as the definition of the retain pairs requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtunlearn_ext._random import TORCH_SEED_LIMIT
from mtunlearn_ext.training import TrainConfig, train
from mtunlearn_ext.unlearning.base import (
    CurveRecorder,
    Unlearner,
    UnlearnerConfig,
    UnlearningProblem,
    UnlearningReport,
)
from mtunlearn_ext.unlearning.registry import register_unlearner

__all__ = ["Retrain", "RetrainConfig"]


@dataclass
class RetrainConfig(UnlearnerConfig):
    """``epochs``: override of the recipe's epochs (``None``: the original recipe, the gold
    standard; fewer epochs give a cheaper, weaker "retrain with a budget"). ``seed``: override
    of the recipe's seed, which orders the training batches (``None``: the original's, the gold
    standard; another seed gives a second model retrained on the same retain pairs from the
    same initialisation, whose distance to the gold model is the run-to-run noise of
    retraining itself). ``progress``: show a progress bar."""

    epochs: int | None = None
    seed: int | None = None
    progress: bool = False

    def validate(self) -> None:
        super().validate()
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"RetrainConfig: `epochs` must be >= 1 or None, got {self.epochs}")
        # torch's generators take 64 bits: a larger seed passed here and failed inside the
        # retraining with "Overflow when unpacking long long". TrainConfig's seed, which this
        # overrides, takes the same range.
        if self.seed is not None and not 0 <= self.seed < TORCH_SEED_LIMIT:
            raise ValueError(f"RetrainConfig: `seed` must be an int in [0, 2**64) or None, got "
                             f"{self.seed!r}")


@register_unlearner
class Retrain(Unlearner):
    """Train a fresh model on the retain pairs with the original recipe and seed."""

    name = "retrain"
    config_class = RetrainConfig
    edits_original = False
    config: RetrainConfig

    def _unlearn(self, model: nn.Module | None, problem: UnlearningProblem,
                 generator: torch.Generator, recorder: CurveRecorder,
                 report: UnlearningReport) -> nn.Module | None:
        if problem.model_factory is None or problem.train_config is None:
            raise ValueError("retrain: the problem needs `model_factory` and `train_config` "
                             "(the original architecture/initialisation and recipe): pass "
                             "`fresh_model` (a function returning a new, untrained model) and "
                             "`train_config` to unlearn / build_problem")
        overrides = {k: v for k, v in (("epochs", self.config.epochs),
                                       ("seed", self.config.seed)) if v is not None}
        recipe = TrainConfig(**{**problem.train_config.to_dict(), **overrides})
        fresh = problem.model_factory().to(problem.device)
        # A MultiTaskModel, or the API's SplitModel around a user's module: not a subclass,
        # but it has what train() uses (``heads``, ``forward(x, tasks)``).
        result = train(fresh, problem.retain, None, recipe,  # type: ignore[arg-type]
                       progress=self.config.progress)
        steps_per_epoch = result.steps // max(len(result.epoch_losses), 1)
        for epoch, loss in enumerate(result.epoch_losses):
            recorder.log((epoch + 1) * steps_per_epoch - 1, retain_loss=loss)
            for task, losses in result.task_epoch_losses.items():
                recorder.log((epoch + 1) * steps_per_epoch - 1,
                             **{f"retain_loss/{task}": losses[epoch]})
        report.steps = result.steps
        report.extra["recipe"] = recipe.to_dict()
        report.extra["train_seconds"] = result.seconds
        if recipe.num_threads is not None:  # train() ran at the recipe's count, not the caller's
            report.threads = recipe.num_threads
        # The recipe's epochs and seed where the settings left them to it (--seed is not it).
        report.extra["resolved_settings"] = {name: getattr(recipe, name) for name in
                                             ("epochs", "seed")
                                             if getattr(self.config, name) is None}
        return fresh
