"""torch.compile with the surgery: a compiled model under the hook (the k backward passes
through AOTAutograd's compiled backward with retained graphs), and a compiled aggregator. Kept
apart from the other hook tests because inductor's first compile takes ~20 s on 2 cores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from mtunlearn_ext.surgery import MGDA, GradientSurgery, UPGrad
from surgery_helpers import F64, MultiTaskNet, _batch, _losses, _reference


@contextlib.contextmanager
def _advised_compile_settings() -> Iterator[None]:
    """What the surgery's error and docs/dropin.md advise for inductor: no donated buffers
    (a backward that frees its saved activations after one pass) and no FX graph cache (which
    can hand another process's donating backward to this compile), from a fresh dynamo."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with functorch_config.patch(donated_buffer=False), \
            inductor_config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def _check_grads(model: MultiTaskNet, shared_ref: list[torch.Tensor],
                 heads_ref: list[torch.Tensor]) -> None:
    for p, ref in zip(model.trunk.parameters(), shared_ref):
        torch.testing.assert_close(p.grad.to(F64), ref, rtol=2e-5, atol=2e-6)
    for p, ref in zip(model.heads.parameters(), heads_ref):
        torch.testing.assert_close(p.grad.to(F64), ref, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("per_task", ["autograd", "backward"])
def test_torch_compiled_model(backend: str, per_task: str) -> None:
    """Two batch sizes: the second recompiles with dynamic shapes, whose backward is compiled
    with the forward (with donated buffers unless they are turned off)."""
    with _advised_compile_settings():
        model = MultiTaskNet(torch.float32)
        compiled = torch.compile(model, backend=backend)
        x, y = _batch(torch.float32)
        for rows in (10, 7):
            shared_ref, heads_ref, _ = _reference(model, x[:rows], y[:, :rows], UPGrad())
            model.zero_grad(set_to_none=True)
            GradientSurgery(model.trunk.parameters(), UPGrad(), per_task=per_task).backward(
                _losses(compiled, x[:rows], y[:, :rows]))
            _check_grads(model, shared_ref, heads_ref)


_REFUSED = (r"(?s)per_task='{}' takes one backward pass per task.*donated buffers.*"
            r"donated_buffer = False and torch\._inductor\.config\.fx_graph_cache = False.*"
            r"torch\._dynamo\.reset\(\)")


@pytest.mark.parametrize("per_task", ["autograd", "backward"])
def test_backward_compiled_for_a_plain_pass_is_refused_with_what_to_do(per_task: str) -> None:
    """A plain step through an inductor-compiled model first compiles its backward with donated
    buffers: the surgery's retained passes are refused with what to do, nothing written. The
    donated_buffer flag set only then (as torch's own error suggests) silences torch's check
    while the backward still frees its buffers (wrong gradients): the surgery still refuses."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    model = MultiTaskNet(torch.float32)
    compiled = torch.compile(model, backend="inductor", options={"fx_graph_cache": False})
    x, y = _batch(torch.float32)
    shared_ref, heads_ref, _ = _reference(model, x, y, UPGrad())
    sum(_losses(compiled, x, y)).backward()
    model.zero_grad(set_to_none=True)
    surgery = GradientSurgery(model.trunk.parameters(), UPGrad(), per_task=per_task)
    with pytest.raises(RuntimeError, match=_REFUSED.format(per_task)):
        surgery.backward(_losses(compiled, x, y))
    assert all(p.grad is None for p in model.parameters())
    with functorch_config.patch(donated_buffer=False):
        with pytest.raises(RuntimeError, match=_REFUSED.format(per_task)):
            surgery.backward(_losses(compiled, x, y))
    assert all(p.grad is None for p in model.parameters())

    with _advised_compile_settings():
        compiled = torch.compile(model, backend="inductor")
        sum(_losses(compiled, x, y)).backward()  # a plain step first is fine then
        model.zero_grad(set_to_none=True)
        surgery.backward(_losses(compiled, x, y))
    _check_grads(model, shared_ref, heads_ref)


def test_backward_mode_refuses_before_heads_outside_the_compiled_region_get_grads() -> None:
    """Review: with only the trunk compiled, loss.backward() per task wrote task 0's head
    gradients before torch refused the retained pass through the trunk's donating backward
    (added into .grad under gradient accumulation). Refused before any pass now."""
    torch._dynamo.reset()
    model = MultiTaskNet(torch.float32)
    eager_trunk = model.trunk
    model.trunk = torch.compile(eager_trunk, backend="inductor",  # type: ignore[assignment]
                                options={"fx_graph_cache": False})
    x, y = _batch(torch.float32)
    sum(_losses(model, x, y)).backward()
    model.zero_grad(set_to_none=True)
    surgery = GradientSurgery(eager_trunk.parameters(), UPGrad(), per_task="backward")
    with pytest.raises(RuntimeError, match=_REFUSED.format("backward")):
        surgery.backward(_losses(model, x, y))
    assert all(p.grad is None for p in model.parameters())
    torch._dynamo.reset()


_FILL_CACHE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from surgery_helpers import MultiTaskNet, _batch, _losses
x, y = _batch(torch.float32)
sum(_losses(torch.compile(MultiTaskNet(torch.float32), backend="inductor"), x, y)).backward()
"""

_SURGERY_ON_CACHED = """
import sys, torch
import torch._functorch.config, torch._inductor.config
sys.path.insert(0, sys.argv[1])
from mtunlearn_ext.surgery import GradientSurgery, UPGrad
from surgery_helpers import F64, MultiTaskNet, _batch, _losses, _reference
model = MultiTaskNet(torch.float32)
x, y = _batch(torch.float32)
shared_ref, _, _ = _reference(model, x, y, UPGrad())
try:
    GradientSurgery(model.trunk.parameters(), UPGrad()).backward(
        _losses(torch.compile(model, backend="inductor"), x, y))
    print("default compile: ran")
except RuntimeError as error:
    print("default compile:", " ".join(str(error).split()))
torch._dynamo.reset()
model.zero_grad(set_to_none=True)
torch._functorch.config.donated_buffer = False
torch._inductor.config.fx_graph_cache = False
compiled = torch.compile(model, backend="inductor")
GradientSurgery(model.trunk.parameters(), UPGrad()).backward(_losses(compiled, x, y))
error = max((p.grad.to(F64) - r).abs().max().item()
            for p, r in zip(model.trunk.parameters(), shared_ref))
print(f"advised compile: max error {error:.1e}")
"""


def test_advised_compile_is_right_with_a_cache_another_process_filled(tmp_path) -> None:
    """The case the cache advice is for: another process compiled the same model for plain
    passes and its backward sits in inductor's cache. A default compile loads it (refused,
    explained); the advised settings do not, and the gradients match the float64 reference."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    for script in (_FILL_CACHE, _SURGERY_ON_CACHED):
        done = subprocess.run([sys.executable, "-c", script, tests], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("default compile: GradientSurgery: per_task='autograd' takes one "
                               "backward pass per task"), lines
    assert "torch._inductor.config.fx_graph_cache = False" in lines[0], lines
    assert lines[1].startswith("advised compile: max error "), lines
    assert float(lines[1].rsplit(" ", 1)[1]) < 1e-5, lines


def test_compiled_aggregator_matches_eager() -> None:
    j = torch.randn(3, 40, generator=torch.Generator().manual_seed(14))
    compiled = torch.compile(lambda m: MGDA(iterations=20)(m), backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(j), MGDA(iterations=20)(j))


def test_mgda_traces_whole_on_the_cpu_and_keeps_the_exact_answers() -> None:
    """Review: MGDA's CPU solver branched on values (is the compiled QP's answer optimal?),
    so `fullgraph=True` failed on the CPU; traced, the CPU solve is one opaque custom op, so
    badly scaled tasks (norms 1e3 apart: the branch-free iterative budget alone was 0.19 off)
    and a hull holding the origin (the QP unbounded: the budget alone left a norm of 0.24)
    get the eager answers."""
    from mtunlearn_ext.surgery.min_norm import min_norm_simplex

    gen = torch.Generator().manual_seed(5)
    j = torch.randn(4, 10, 30, generator=gen, dtype=torch.float64)
    j[:, 0] *= 1e3
    j[3, :, 3:] = 0  # ten points in a plane of three dimensions: the hull holds the origin
    gram = j @ j.transpose(-1, -2)
    compiled = torch.compile(min_norm_simplex, backend="aot_eager", fullgraph=True)
    got, want = compiled(gram), min_norm_simplex(gram)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert float((want[3] @ j[3]).norm()) < 1e-9
    from mtunlearn_ext.surgery.min_norm import _host_min_norm

    torch.library.opcheck(_host_min_norm, (gram, 200, True, 0.0))
    x = torch.randn(4, 50, generator=gen)
    aggregator = torch.compile(MGDA(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(aggregator(x), MGDA()(x), rtol=1e-6, atol=1e-7)


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


def test_a_compiled_pcgrad_with_a_fixed_order_compiles_once() -> None:
    """PCGrad(reshuffle=False) counted its calls all the same, and torch.compile takes a
    module's int attributes for constants: every call recompiled, and the 9th failed under
    fullgraph=True (the README's advice for compiled steps was this very setting)."""
    from mtunlearn_ext.surgery import PCGrad

    torch._dynamo.reset()
    aggregator = PCGrad(reshuffle=False)
    compiled = torch.compile(aggregator, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        matrix = torch.randn(3, 10, generator=g, dtype=F64)
        torch.testing.assert_close(compiled(matrix), PCGrad(reshuffle=False)(matrix))
    torch._dynamo.reset()
