"""torch.compile with the surgery: a compiled model under the hook (the k backward passes
through AOTAutograd's compiled backward with retained graphs), and a compiled aggregator. Kept
apart from the other hook tests because inductor's first compile takes ~20 s on 2 cores."""

from __future__ import annotations

import pytest
import torch

from mtunlearn_ext.surgery import MGDA, GradientSurgery, UPGrad
from surgery_helpers import F64, MultiTaskNet, _batch, _losses, _reference


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compiled_model(backend: str) -> None:
    model = MultiTaskNet(torch.float32)
    compiled = torch.compile(model, backend=backend)
    x, y = _batch(torch.float32)
    shared_ref, heads_ref, _ = _reference(model, x, y, UPGrad())
    GradientSurgery(model.trunk.parameters(), UPGrad()).backward(_losses(compiled, x, y))
    for p, ref in zip(model.trunk.parameters(), shared_ref):
        torch.testing.assert_close(p.grad.to(F64), ref, rtol=2e-5, atol=2e-6)
    for p, ref in zip(model.heads.parameters(), heads_ref):
        torch.testing.assert_close(p.grad.to(F64), ref, rtol=2e-5, atol=2e-6)


def test_compiled_aggregator_matches_eager() -> None:
    j = torch.randn(3, 40, generator=torch.Generator().manual_seed(14))
    compiled = torch.compile(lambda m: MGDA(iterations=20)(m), backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(j), MGDA(iterations=20)(j))
