"""torch.export and torch.compile of code calling the ops: dynamic shapes, the finite check,
CUDA inputs, and the sizes a refused traced call names.

README ("The ops"): a dynamic ``k`` of a projection needs its bound; on the CPU the finite check
is an assert inside the exported graph; for CUDA tensors it is a host read that export cannot
trace, and the call says to pass ``check_finite=False`` (it was torch's
GuardOnDataDependentSymNode, which named nothing of ours). CUDA inputs are fake tensors here: the
machine that runs the suite has no GPU, and exporting needs none.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim, export

from mtunlearn_ext import ops


class _Projection(torch.nn.Module):
    def __init__(self, check_finite: bool) -> None:
        super().__init__()
        self.check_finite = check_finite

    def forward(self, g: torch.Tensor, basis: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        gram = ops.gram(basis, check_finite=self.check_finite)
        return gram, ops.project_out(g, basis, check_finite=self.check_finite)


DYNAMIC = {"g": {0: Dim("m"), 1: Dim("n")}, "basis": {0: Dim("k", max=256), 1: Dim("n")}}


def _reference(g: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g64, b64 = g.double(), basis.double()
    gram = b64 @ b64.T
    coefficients = torch.linalg.solve(gram + 1e-6 * torch.eye(len(b64), dtype=torch.float64),
                                      b64 @ g64.T)
    return gram, g64 - coefficients.T @ b64


@pytest.mark.parametrize("strict", [False, True])
def test_an_exported_program_runs_other_shapes_and_keeps_the_finite_check(strict: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    program = export(_Projection(check_finite=True),
                     (torch.randn(3, 50, generator=gen), torch.randn(4, 50, generator=gen)),
                     dynamic_shapes=DYNAMIC, strict=strict)
    for m, k, n in [(1, 1, 7), (5, 9, 333), (2, 3, 2)]:
        g, basis = torch.randn(m, n, generator=gen), torch.randn(k, n, generator=gen)
        gram, projected = program.module()(g, basis)
        expected_gram, expected_projected = _reference(g, basis)
        torch.testing.assert_close(gram.double(), expected_gram, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(projected.double(), expected_projected, rtol=1e-3, atol=1e-3)
    basis = torch.randn(4, 50, generator=gen)
    basis[2, 7] = float("nan")
    with pytest.raises(RuntimeError, match="mtunlearn_ext.ops.gram: NaN or Inf in the inputs"):
        program.module()(torch.randn(3, 50, generator=gen), basis)


@pytest.mark.skipif(not torch.backends.cuda.is_built(),
                    reason="fake CUDA tensors need a CUDA build of torch (the CPU-only leg)")
def test_exporting_cuda_inputs_with_the_finite_check_says_to_pass_check_finite_false() -> None:
    with FakeTensorMode():
        g, basis = torch.empty(3, 50, device="cuda"), torch.empty(4, 50, device="cuda")
    with pytest.raises(RuntimeError, match=r"mtunlearn_ext.ops.gram: check_finite=True on cuda "
                                           r"tensors .* pass check_finite=False"):
        export(_Projection(check_finite=True), (g, basis), dynamic_shapes=DYNAMIC, strict=False)
    program = export(_Projection(check_finite=False), (g, basis), dynamic_shapes=DYNAMIC,
                     strict=False)
    called = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert called[:2] == ["mtunlearn.gram.default", "mtunlearn.project_out.default"], called


def test_a_bad_call_exported_with_dynamic_shapes_names_its_sizes_not_their_symbols() -> None:
    """C++ user audit: traced with dynamic shapes, a refused call said ``got (s72, s75) and
    (s96, s5)``; it names the sizes of the call being traced, as eager does. (Under dynamo,
    ``torch.compile`` and strict export, the message is formatted by dynamo's own symbolic run
    of the code, which gives the symbols.)"""
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=re.escape(
            "must share leading dims and n; got (5, 60) and (2, 61)")):
        export(_Projection(check_finite=True),
               (torch.randn(5, 60, generator=gen), torch.randn(2, 61, generator=gen)),
               dynamic_shapes={"g": {0: Dim("m"), 1: Dim("n")},
                               "basis": {0: Dim("k", max=256), 1: Dim("n2")}}, strict=False)
