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


@pytest.mark.parametrize("in_place", [False, True], ids=["new-outputs", "in-place"])
def test_compiled_list_projection_matches_eager(in_place: bool) -> None:
    """The list projection under torch.compile (fullgraph, aot_eager): its combine pass reads g
    as the base of the outputs, which in place are g itself (a mutated list aliasing a read one)."""
    from mtunlearn_ext.surgery import project_nonconflicting_list, project_out_list

    gen = torch.Generator().manual_seed(15)
    g = [torch.randn(2, 5, 3, generator=gen), torch.randn(2, 7, generator=gen)]
    basis = [torch.randn(4, 5, 3, generator=gen), torch.randn(4, 7, generator=gen)]

    def project(g: list[torch.Tensor], basis: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = g if in_place else None
        first = project_out_list(g, basis, outs=outs, check_finite=False)
        return project_nonconflicting_list(first, basis, outs=first if in_place else None,
                                           check_finite=False)

    expected = project([t.clone() for t in g], basis)
    compiled_g = [t.clone() for t in g]
    got = torch.compile(project, backend="aot_eager", fullgraph=True)(compiled_g, basis)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if in_place:
        for a, b in zip(compiled_g, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
