"""Our aggregators against TorchJD's own (test-only dependency:
``torchjd[quadprog-projector]==0.18.0``; skipped when it is not installed).

How each is compared, and why:

- Mean: identical definition, float64, to rounding.
- UPGrad: TorchJD solves each dual-cone projection with quadprog on ``G / tr(G) + 1e-4 I``.
  ``UPGrad(reg_eps=1e-4)`` solves the same regularised problem and must agree to solver
  precision; ``UPGrad()`` (exact cone) must agree with TorchJD run with ``reg_eps=0``.
- MGDA: TorchJD runs Frank-Wolfe until the step falls below ``epsilon`` (default 1e-3, at most
  100 iterations); ours is solved to optimality. So ours must have a norm no larger than
  TorchJD's, and TorchJD's must approach ours as its tolerance tightens.
- PCGrad: TorchJD draws each task's order with ``torch.randperm`` (global RNG); ours uses the
  ops' seeded orders (identical on every process). With ``k = 2`` there is only one other task
  and no order, so they must agree to rounding. For ``k > 2`` TorchJD is replayed under a fixed
  RNG seed: the same ``randperm`` draws give its orders, and a textbook loop in those orders
  must reproduce it, while ours reproduces the same textbook loop in its own orders
  (test_surgery_aggregators.py): same algorithm, different order source.
- Interop, as docs/dropin.md states it: ``jac_to_grad`` with ours writes ``.grad`` but returns
  ``None`` (not the weights) and refuses ``optimize_gramian_computation=True`` (TorchJD checks
  for its own classes); ``GradientSurgery.apply`` on the ``.jac`` stacks gives the same
  ``.grad`` and the weights; TorchJD's aggregators are refused by ``GradientSurgery`` by name.
"""

from __future__ import annotations

import os

import pytest
import torch

# A dev requirement (requirements-dev.txt): the suite's own runs (./test.sh, CI) install it and
# must not skip these comparisons silently; elsewhere they are skipped, saying why.
if os.environ.get("MTUNLEARN_REQUIRE_EXTENSION", "") not in ("", "0"):
    import torchjd
else:
    torchjd = pytest.importorskip(
        "torchjd", reason="TorchJD (requirements-dev.txt) is not installed: these tests compare "
                          "the aggregators with its own")
from torchjd import aggregation as tja  # noqa: E402

from mtunlearn_ext import surgery  # noqa: E402

F64 = torch.float64


def _jacobian(k: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(k, n, generator=gen, dtype=F64)
    j[1] = -0.6 * j[0] + 0.4 * j[1]  # a certain conflict
    return j


def _exact_projector():  # TorchJD's projector without its regularisation
    from torchjd.linalg import QuadprogProjector

    return QuadprogProjector(norm_eps=0.0, reg_eps=0.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_mean(seed: int, k: int) -> None:
    j = _jacobian(k, 30, seed)
    torch.testing.assert_close(surgery.Mean()(j), tja.Mean()(j), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_upgrad_regularised_like_torchjd_default(seed: int, k: int) -> None:
    j = _jacobian(k, 40, seed)
    ours = surgery.UPGrad(reg_eps=1e-4)(j)
    theirs = tja.UPGrad()(j)
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-10)
    weights = surgery.UPGrad(reg_eps=1e-4).weighting(j @ j.T)
    torch.testing.assert_close(weights, tja.UPGradWeighting()(j @ j.T), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_upgrad_exact_cone(seed: int, k: int) -> None:
    j = _jacobian(k, 40, seed)
    theirs = tja.UPGrad(projector=_exact_projector())(j)
    torch.testing.assert_close(surgery.UPGrad()(j), theirs, rtol=1e-8, atol=1e-10)


def test_upgrad_pref_vector() -> None:
    j = _jacobian(3, 20, 0)
    pref = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    theirs = tja.UPGrad(pref_vector=pref, projector=_exact_projector())(j)
    torch.testing.assert_close(surgery.UPGrad(pref_vector=pref)(j), theirs, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 4, 6])
def test_mgda_at_least_as_good_and_torchjd_converges_to_it(seed: int, k: int) -> None:
    j = _jacobian(k, 30, seed)
    ours = surgery.MGDA()(j)
    default = tja.MGDA()(j)
    tight = tja.MGDA(epsilon=1e-9, max_iters=2000)(j)
    # Never worse than TorchJD (to rounding), whatever its settings.
    assert ours.norm() <= default.norm() * (1 + 1e-12)
    assert ours.norm() <= tight.norm() * (1 + 1e-12)
    # Frank-Wolfe without away steps closes its objective gap like O(1/t) when the optimum lies
    # on a face. Measured on these 18 problems (relative gap of squared norms / of the points):
    # defaults 3.4e-2 / 1.8e-1, 2000 iterations 3.0e-3 / 4.3e-2, 20000 iterations 4.7e-4 / 1.2e-2.
    assert tight.norm() ** 2 - ours.norm() ** 2 <= 1e-2 * ours.norm() ** 2 + 1e-12
    assert (tight - ours).norm() <= 1e-1 * ours.norm() + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_two_tasks_has_no_order(seed: int) -> None:
    j = _jacobian(2, 30, seed)
    torch.testing.assert_close(surgery.PCGrad()(j), tja.PCGrad()(j), rtol=1e-12, atol=1e-14)


def _textbook(j: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    total = torch.zeros_like(j[0])
    for i in range(j.shape[0]):
        v = j[i].clone()
        for other in orders[i]:
            dot = v @ j[other]
            if dot < 0:
                v = v - dot / (j[other] @ j[other]) * j[other]
        total += v
    return total


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [3, 5])
def test_pcgrad_same_algorithm_as_torchjd_in_its_orders(seed: int, k: int) -> None:
    j = _jacobian(k, 30, seed)
    torch.manual_seed(1000 + seed)
    theirs = tja.PCGrad()(j)
    torch.manual_seed(1000 + seed)  # replay TorchJD's draws: one randperm(k) per task, in order
    orders = [[int(o) for o in torch.randperm(k) if int(o) != i] for i in range(k)]
    torch.testing.assert_close(theirs, _textbook(j, orders), rtol=1e-12, atol=1e-14)
    # And ours is that loop in the ops' orders.
    ours_orders = [surgery_order(k, i, seed) for i in range(k)]
    torch.testing.assert_close(surgery.PCGrad(seed=seed, reshuffle=False)(j),
                               _textbook(j, ours_orders), rtol=1e-10, atol=1e-12)


def surgery_order(k: int, i: int, seed: int) -> list[int]:
    from mtunlearn_ext import ops

    return ops.pcgrad_order(k, i, seed)


@pytest.mark.parametrize("make", [surgery.Mean, surgery.UPGrad, surgery.MGDA])
def test_drop_in_for_torchjd_autojac(make) -> None:
    """``torchjd.autojac.backward`` + ``jac_to_grad`` only call the aggregator: ours plugs in."""
    from torchjd.autojac import backward, jac_to_grad

    torch.manual_seed(0)
    param = torch.randn(6, dtype=F64, requires_grad=True)
    losses = [(param * torch.arange(6.0, dtype=F64)).sum(), (param ** 2).sum() - param.sum() * 3]
    backward(losses)
    jacobian = param.jac.clone()
    jac_to_grad([param], make())
    torch.testing.assert_close(param.grad, make()(jacobian))


def _jac_problem() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    params = [torch.randn(6, dtype=F64, requires_grad=True),
              torch.randn(3, 2, dtype=F64, requires_grad=True)]
    p, q = params
    losses = [(p * torch.arange(6.0, dtype=F64)).sum() + q.sum(),
              (p ** 2).sum() - p.sum() * 3 + (q ** 3).sum()]
    return params, losses


@pytest.mark.parametrize("make", [surgery.Mean, surgery.UPGrad, surgery.MGDA])
def test_jac_to_grad_works_but_returns_no_weights_and_no_gramian_option(make) -> None:
    """What docs/dropin.md says of TorchJD 0.18's ``jac_to_grad`` with our aggregators: the
    update reaches ``.grad``, the weights are not returned (TorchJD returns them only for its
    own WeightedAggregator classes), and ``optimize_gramian_computation=True`` is refused; the
    surgery's ``apply`` on the ``.jac`` stacks gives the same ``.grad`` and the weights."""
    from torchjd.autojac import backward, jac_to_grad

    params, losses = _jac_problem()
    backward(losses, retain_graph=True)
    jacobians = [p.jac.clone() for p in params]
    assert jac_to_grad(params, make()) is None
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    backward(losses, retain_graph=True)
    with pytest.raises(ValueError, match="optimize_gramian_computation=True"):
        jac_to_grad(params, make(), optimize_gramian_computation=True)
    for p in params:
        p.grad = None
    backward(losses)
    weights = surgery.GradientSurgery(params, make()).apply([p.jac for p in params])
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-13)
    matrix = torch.cat([j.reshape(2, -1) for j in jacobians], dim=1)
    torch.testing.assert_close(weights, make().weighting(matrix @ matrix.T), rtol=1e-12,
                               atol=1e-13)


@pytest.mark.parametrize("make", [surgery.UPGrad, surgery.MGDA, surgery.PCGrad])
def test_jac_to_grad_under_a_grad_scaler(make: type[surgery.Aggregator]) -> None:
    """A TorchJD user under a GradScaler: an overflowing step must reach ``.grad`` as NaN/Inf
    so that ``scaler.step`` skips it. By default the aggregator refuses the matrix, naming
    itself and the way out; built with ``check_finite=False`` it writes a NaN update, the
    scaler skips the step and lowers its scale, and a finite step goes through unscaled."""
    from torchjd.autojac import backward, jac_to_grad

    params, losses = _jac_problem()
    reference = [p.detach().clone() for p in params]
    backward(losses)
    jacobian = torch.cat([p.jac.reshape(2, -1) for p in params], dim=1)
    expected = make()(jacobian)  # the float64 update of the unscaled losses
    params, losses = _jac_problem()  # fresh parameters, equal to the first ones
    optimizer = torch.optim.SGD(params, lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    backward([scaler.scale(loss) for loss in losses])
    jac_to_grad(params, make(check_finite=False))
    scaler.unscale_(optimizer)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected,
                               rtol=1e-12, atol=1e-12)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 8
    moved = [p.detach().clone() for p in params]
    assert not all(torch.equal(a, b) for a, b in zip(moved, reference))

    optimizer.zero_grad()
    p, q = params
    losses = [(p * torch.arange(6.0, dtype=F64)).sum() + q.sum(),
              ((p ** 2).sum() - p.sum() * 3 + (q ** 3).sum()) * float("inf")]  # overflowing
    backward([scaler.scale(loss) for loss in losses], retain_graph=True)
    with pytest.raises(FloatingPointError, match=rf"^{make.__name__}: `matrix` contains NaN or "
                                                 rf"Inf.*{make.__name__}\(\.\.\., "
                                                 r"check_finite=False\)"):
        jac_to_grad(params, make())
    assert all(t.grad is None for t in params)
    for t in params:
        if hasattr(t, "jac"):
            del t.jac
    backward([scaler.scale(loss) for loss in losses])
    jac_to_grad(params, make(check_finite=False))
    assert all(torch.isnan(t.grad).all() for t in params)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 8  # detected and skipped
    for t, before in zip(params, moved):
        torch.testing.assert_close(t.detach(), before, rtol=0, atol=0)


def test_a_torchjd_aggregator_is_refused_naming_ours() -> None:
    params, _ = _jac_problem()
    with pytest.raises(TypeError, match=r"got torchjd\.aggregation\.\w+\.UPGrad; use the one of "
                                        r"mtunlearn_ext\.surgery"):
        surgery.GradientSurgery(params, tja.UPGrad())
