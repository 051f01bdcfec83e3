"""The loss terms of one unlearning step (:mod:`mtunlearn_ext.unlearning.terms`)."""

from __future__ import annotations

import pytest
import torch

from mtunlearn_ext.data import TaskSpec
from mtunlearn_ext.unlearning import forget_terms, retain_terms
from mtunlearn_ext.unlearning.objectives import (
    AscentObjective,
    CappedAscentObjective,
    ForgetObjective,
)

_SPECS = [TaskSpec("kind", "classification", num_classes=3), TaskSpec("size", "regression")]


def _objective(kind: type[ForgetObjective], spec: TaskSpec) -> ForgetObjective:
    objective = kind(spec)
    if isinstance(objective, CappedAscentObjective):
        objective.cap = 5.0  # above every loss here: the capped objective is the ascent one
    return objective


@pytest.mark.parametrize("kind", [AscentObjective, CappedAscentObjective],
                         ids=["ascent", "capped_ascent"])
def test_forget_terms_ignore_whatever_unsupervised_pairs_hold(kind: type[ForgetObjective]
                                                              ) -> None:
    """Review: a hand-made forget batch with a NaN target on an unsupervised pair gave a finite
    forget objective but a NaN gradient (``0 * NaN`` through the ``where``), and one with an
    out-of-range class label there raised in the loss kernel; the retain terms ignored both.
    The terms and their gradients are now those of the batch with neutral targets there."""
    generator = torch.Generator().manual_seed(0)
    supervision = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    clean = {"kind": torch.tensor([0, 1, -1, 2]), "size": torch.tensor([[0.5], [0.0], [1.0],
                                                                        [0.2]])}
    dirty = {"kind": torch.tensor([0, 1, 7, 2]),
             "size": torch.tensor([[0.5], [float("nan")], [1.0], [0.2]])}
    logits = torch.randn(4, 3, generator=generator)
    sizes = torch.randn(4, 1, generator=generator)
    results = []
    for targets in (clean, dirty):
        outputs = {"kind": logits.clone().requires_grad_(),
                   "size": sizes.clone().requires_grad_()}
        batch = {"targets": targets, "supervision": supervision, "id": torch.arange(4)}
        objectives = {spec.name: _objective(kind, spec) for spec in _SPECS}
        terms = forget_terms(outputs, batch, _SPECS, objectives)
        total = terms.total()
        assert total is not None
        grads = torch.autograd.grad(total, [outputs["kind"], outputs["size"]])
        assert all(bool(torch.isfinite(g).all()) for g in grads)
        results.append((terms, grads))
        # The retain terms of the same batch ignore them as well.
        assert all(bool(torch.isfinite(v)) for v in retain_terms(outputs, batch,
                                                                 _SPECS).loss.values())
    (clean_terms, clean_grads), (dirty_terms, dirty_grads) = results
    assert clean_terms.count == dirty_terms.count == {"kind": 3, "size": 3}
    for task in ("kind", "size"):
        assert torch.equal(clean_terms.objective[task].detach(),
                           dirty_terms.objective[task].detach())
        assert torch.equal(clean_terms.loss[task], dirty_terms.loss[task])
    assert all(torch.equal(a, b) for a, b in zip(clean_grads, dirty_grads))
