"""The formulas and properties the docstrings and docs state, evaluated as written (float64,
small random problems: k tasks 2-6, n 5-50) against what the functions compute.

Each test names the text it checks; a formula or a property broken in the code (or a text
that drifted from it) fails here."""

from __future__ import annotations

import pytest
import torch

from mtunlearn_ext import ops
from mtunlearn_ext.metrics.scores import uis
from mtunlearn_ext.surgery import (
    MGDA,
    PCGrad,
    UPGrad,
    project_nonconflicting_list,
    project_out_list,
)
from mtunlearn_ext.surgery.weightings import (
    MeanWeighting,
    MGDAWeighting,
    PCGradWeighting,
    SumWeighting,
    UPGradWeighting,
    Weighting,
)
from mtunlearn_ext.unlearning.protected_subspace import ProtectedSubspace, layer_ids_of

F64 = torch.float64
SEEDS = range(6)


def _problem(seed: int, rows: int | None = None) -> tuple[torch.Tensor, int, int]:
    """A ``[k, n]`` float64 matrix with ``2 <= k <= 6`` and ``k < n <= 50``."""
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, 7, (), generator=gen)) if rows is None else rows
    n = int(torch.randint(max(5, k + 1), 51, (), generator=gen))
    return torch.randn(k, n, generator=gen, dtype=F64), k, n


def _split(matrix: torch.Tensor) -> list[torch.Tensor]:
    """Rows as per-parameter stacks of two parameters (a ``[rows, a]`` and a ``[rows, b]``)."""
    first = matrix.shape[1] // 3
    return [part.contiguous() for part in matrix.split([first, matrix.shape[1] - first], 1)]


def _cat(stacks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.reshape(s.shape[0], -1) for s in stacks], 1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ridge", [0.0, 1e-4, 0.3])
def test_project_out_is_g_minus_the_ridge_solve_with_lambda_relative_to_the_mean_diagonal(
        seed: int, ridge: float) -> None:
    """project_out_list: ``out = g - a^T B``, ``(B B^T + lambda I) a = B g^T``,
    ``lambda = ridge * tr(B B^T) / k``."""
    basis, k, n = _problem(seed)
    g = torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    gram = basis @ basis.T
    lam = ridge * torch.trace(gram) / k
    coeffs = torch.linalg.solve(gram + lam * torch.eye(k, dtype=F64), basis @ g.T)
    out = _cat(project_out_list(_split(g), _split(basis), ridge))
    torch.testing.assert_close(out, g - coeffs.T @ basis, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_project_out_without_ridge_is_the_pseudo_inverse_projection(seed: int) -> None:
    """project_out_list / ops.ridge_solve: with ``ridge=0`` a rank-deficient basis (more rows
    than dimensions, or dependent rows) gives ``(I - B^T (B B^T)^+ B) g`` exactly."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 8, (), generator=gen))
    wide = torch.randn(n + 2, n, generator=gen, dtype=F64)  # k > n
    narrow = torch.randn(3, 20, generator=gen, dtype=F64)
    dependent = torch.cat([narrow, 2 * narrow[:1], narrow[1:2] + narrow[2:3]])
    for basis in (wide, dependent):
        g = torch.randn(2, basis.shape[1], generator=gen, dtype=F64)
        complement = (torch.eye(basis.shape[1], dtype=F64)
                      - basis.T @ torch.linalg.pinv(basis @ basis.T) @ basis)
        out = project_out_list([g], [basis], 0.0)[0]
        torch.testing.assert_close(out, g @ complement, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sign", [1, -1])
def test_nonconflicting_projection_solves_the_stated_dual(seed: int, sign: int) -> None:
    """project_nonconflicting_list: ``d = g + sign * w @ R``, ``w >= 0`` minimising
    ``1/2 w^T (R R^T) w + sign * (R g)^T w`` (its KKT conditions), and ``sign <d, r_j> >= 0``;
    a second projection changes nothing (idempotent)."""
    r, k, n = _problem(seed)
    g = torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    d_stacks, w = project_nonconflicting_list(_split(g), _split(r), sign, return_coeffs=True)
    d = _cat(d_stacks)
    torch.testing.assert_close(d, g + sign * w @ r, rtol=1e-12, atol=1e-12)
    scale = float(g.norm() * r.norm(dim=1).max())
    assert float(w.min()) >= 0.0
    dual_gradient = w @ (r @ r.T) + sign * g @ r.T
    assert float(dual_gradient.min()) >= -1e-12 * scale
    assert float((w * dual_gradient).abs().max()) <= 1e-12 * scale
    assert float((sign * d @ r.T).min()) >= -1e-12 * scale
    again = _cat(project_nonconflicting_list(_split(d), _split(r), sign))
    torch.testing.assert_close(again, d, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_aware_instance_step_subtracts_nonnegative_multiples_of_the_retain_rows(
        seed: int) -> None:
    """docs/unlearning.md: ``"nonconflicting"`` subtracts ``w_j r_j``, ``w_j >= 0``, from the
    forget step ``u`` (``sign=-1``), and what it subtracts lowers the ``w``-weighted sum of the
    retained losses to first order, while the result ``d`` raises none of them."""
    r, k, n = _problem(seed)
    u = torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    d_stacks, w = project_nonconflicting_list([u], [r], -1, return_coeffs=True)
    d = d_stacks[0]
    assert float(w.min()) >= 0.0
    torch.testing.assert_close(d - u, -(w @ r), rtol=1e-12, atol=1e-12)
    scale = float(u.norm() * r.norm(dim=1).max())
    assert float(((d - u) @ r.T @ w.T).squeeze()) <= 1e-12 * scale
    assert float((d @ r.T).max()) <= 1e-12 * scale


def test_what_the_sign_aware_step_subtracts_can_raise_a_single_retained_loss() -> None:
    """docs/unlearning.md: the subtracted ``w @ R`` lowers the weighted sum, "not each of them":
    on these random problems some row's loss rises under ``d - u`` (``<d - u, r_j> > 0``)."""
    raised = 0
    for seed in range(20):
        r, _, n = _problem(seed)
        u = torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
        d = project_nonconflicting_list([u], [r], -1)[0]
        raised += int(float(((d - u) @ r.T).max()) > 1e-9 * float(u.norm() * r.norm()))
    assert 0 < raised < 20


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_aware_projection_keeps_at_least_the_orthogonal_ones_norm(seed: int) -> None:
    """interference_aware step 3: the sign-aware projection removes only the conflicting
    components, so less of the forget direction is lost than with the orthogonal complement
    (``|d_nonconflicting| >= |d_orthogonal|``, both the projections of the same ``u``)."""
    r, _, n = _problem(seed)
    u = torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    kept = project_nonconflicting_list([u], [r], -1)[0]
    orthogonal = project_out_list([u], [r], 0.0)[0]
    assert float(kept.norm()) >= float(orthogonal.norm()) * (1 - 1e-12)


def _upgrad_weights_as_written(gram: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """``sum_i v*_i`` with ``v*_i = u_i + argmin_{w >= 0} 1/2 w^T G w + (G u_i)^T w``,
    ``u_i = pref_i e_i``."""
    k = gram.shape[0]
    total = torch.zeros(k, dtype=F64)
    for i in range(k):
        u_i = pref[i] * torch.eye(k, dtype=F64)[i]
        total += u_i + ops.nonconflicting_dual(gram, (gram @ u_i).unsqueeze(0))[0]
    return total


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reg_eps", [0.0, 1e-2])
def test_upgrad_weights_follow_the_docstring(seed: int, reg_eps: float) -> None:
    """UPGradWeighting: the dual with right-hand side ``G u``, on ``G / tr(G) + reg_eps I``
    when ``reg_eps > 0``; the update conflicts with no row (``<update, g_j> >= 0``)."""
    matrix, k, _ = _problem(seed)
    gram = matrix @ matrix.T
    pref = torch.rand(k, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 0.1
    solved_on = gram / torch.trace(gram) + reg_eps * torch.eye(k, dtype=F64) if reg_eps else gram
    weights = UPGradWeighting(pref_vector=pref, reg_eps=reg_eps)(gram)
    torch.testing.assert_close(weights, _upgrad_weights_as_written(solved_on, pref),
                               rtol=1e-10, atol=1e-12)
    update = UPGrad()(matrix)
    assert float((matrix @ update).min()) >= -1e-12 * float(matrix.norm() ** 2)
    # aggregators.UPGrad: each row times its preference (1/k), projected onto the dual cone,
    # and the projections summed.
    rows = _split(matrix)
    projections = [_cat(project_nonconflicting_list([r[i:i + 1] / k for r in rows], rows))
                   for i in range(k)]
    torch.testing.assert_close(update, torch.cat(projections).sum(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_without_conflict_upgrad_is_the_mean_and_pcgrad_the_sum(seed: int) -> None:
    """UPGrad projects each row onto the dual cone, which holds every row when no two rows
    conflict: the update is then the mean; PCGrad then removes nothing: the sum."""
    matrix, _, _ = _problem(seed)
    agreeing = matrix.abs()  # every pairwise inner product > 0
    torch.testing.assert_close(UPGrad()(agreeing), agreeing.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(PCGrad()(agreeing), agreeing.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_pcgrad_weights_follow_the_docstring_loop(seed: int) -> None:
    """ops.pcgrad_weights: from ``e_i``, for each other task ``j`` in ``pcgrad_order``, if
    ``<v_i, x_j> < 0`` then ``v_i -= <v_i, x_j> / |x_j|^2 x_j``; the weights of ``sum_i v_i``."""
    matrix, k, _ = _problem(seed)
    gram = matrix @ matrix.T
    eye = torch.eye(k, dtype=F64)
    expected = torch.zeros(k, dtype=F64)
    for i in range(k):
        v = eye[i].clone()
        for j in ops.pcgrad_order(k, i, seed):
            if j != i and float(v @ gram[:, j]) < 0:
                v = v - float(v @ gram[:, j]) / float(gram[j, j]) * eye[j]
        expected += v
    torch.testing.assert_close(ops.pcgrad_weights(gram, seed=seed), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_mgda_is_the_min_norm_point_of_the_hull(seed: int) -> None:
    """MGDAWeighting: ``argmin_{w in simplex} w^T G w`` (KKT: ``(G w)_i >= w^T G w`` with
    equality on the support); so ``<d, g_j> >= |d|^2`` for the update ``d``; the bounded form
    ``G + 1 1^T`` (docs/dropin.md) has the same minimiser; a zero row gives a zero update."""
    matrix, k, _ = _problem(seed)
    gram = matrix @ matrix.T
    weights = MGDAWeighting()(gram)
    assert abs(float(weights.sum()) - 1.0) <= 1e-12 and float(weights.min()) >= 0.0
    value = float(weights @ gram @ weights)
    assert float((gram @ weights).min()) >= value * (1 - 1e-9)
    support = weights > 1e-9
    torch.testing.assert_close((gram @ weights)[support],
                               torch.full((int(support.sum()),), value, dtype=F64),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(MGDAWeighting()(gram + 1.0), weights, rtol=1e-9, atol=1e-12)
    update = MGDA()(matrix)
    assert float((matrix @ update).min()) >= float(update @ update) * (1 - 1e-9)
    zero_row = matrix.clone()
    zero_row[seed % k] = 0.0
    assert float(MGDA()(zero_row).abs().max()) <= 1e-12 * float(matrix.abs().max())


WEIGHTINGS = [MeanWeighting(), SumWeighting(), PCGradWeighting(seed=3, reshuffle=False),
              UPGradWeighting(), UPGradWeighting(reg_eps=1e-4), MGDAWeighting()]


@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=lambda w: repr(w))
@pytest.mark.parametrize("seed", SEEDS)
def test_weightings_are_homogeneous_of_degree_zero(weighting: Weighting, seed: int) -> None:
    """surgery.weightings: scaling every gradient by ``s > 0`` (``G`` by ``s^2``) leaves the
    weights unchanged."""
    matrix, _, _ = _problem(seed)
    gram = matrix @ matrix.T
    for scale in (1e-3, 37.0):
        torch.testing.assert_close(weighting(gram * scale ** 2), weighting(gram),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ridge", [0.0, 1e-4])
def test_protected_subspace_projects_each_layer_off_its_own_snapshots(seed: int,
                                                                      ridge: float) -> None:
    """protected_subspace: ``f_l <- f_l - M_l^T (M_l M_l^T + lambda_l I)^-1 M_l f_l``,
    ``lambda_l = ridge tr(M_l M_l^T) / k``, over the ``k`` newest snapshots; the projected
    ``f_l`` is orthogonal to every snapshot's layer ``l`` exactly with ``ridge=0``, and to
    within the ridge otherwise (``M_l f_l' = lambda_l (G_l + lambda_l I)^-1 M_l f_l``)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (7,), (4, 7), (4,)]
    layer_ids = layer_ids_of(["a.weight", "a.bias", "b.weight", "b.bias"])
    k = int(torch.randint(2, 7, (), generator=gen))
    subspace = ProtectedSubspace([torch.zeros(s, dtype=F64) for s in shapes], layer_ids, k, ridge)
    snapshots = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(k + 2)]
    for snapshot in snapshots:
        subspace.push(snapshot)
    kept = snapshots[2:]  # the two oldest were overwritten
    forget = [torch.randn((1, *s), generator=gen, dtype=F64) for s in shapes]
    projected = subspace.project(forget)
    for layer in range(2):
        members = [p for p, lid in enumerate(layer_ids) if lid == layer]
        m_l = torch.stack([torch.cat([snap[p].flatten() for p in members]) for snap in kept])
        f_l = torch.cat([forget[p].flatten() for p in members])
        gram = m_l @ m_l.T
        lam = ridge * torch.trace(gram) / k
        shifted = gram + lam * torch.eye(k, dtype=F64)
        expected = f_l - m_l.T @ torch.linalg.solve(shifted, m_l @ f_l)
        out = torch.cat([projected[p][0].flatten() for p in members])
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m_l @ out, lam * torch.linalg.solve(shifted, m_l @ f_l),
                                   rtol=1e-8, atol=1e-12)


def test_uis_is_the_mean_over_tasks_of_the_mean_over_metrics_of_the_relative_changes() -> None:
    """metrics.uis: ``UIS_{t,m} = 100 (|O_t - U_t| / |O_t| + |O_t - U_u| / |O_t|) / 2``, averaged
    over each task's metrics, then over tasks (so a task weighs the same whatever its number of
    metrics); ``|O_t|``: a negative custom score still gives a non-negative change."""
    original = {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "fit": {"r2": -2.0}}
    test = {"seg": {"miou": 0.4, "pixel_acc": 0.8}, "fit": {"r2": -1.0}}
    forget = {"seg": {"miou": 0.6, "pixel_acc": 0.6}, "fit": {"r2": -3.0}}
    seg = ((0.1 / 0.5 + 0.1 / 0.5) / 2 + (0.0 + 0.2 / 0.8) / 2) / 2
    fit = (1.0 / 2.0 + 1.0 / 2.0) / 2
    value = uis(original, test, forget, higher_is_better={"r2": True})
    assert value == pytest.approx(100 * (seg + fit) / 2, rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sign", [1, -1])
def test_fused_ops_follow_their_docstrings(seed: int, sign: int) -> None:
    """ops.project_out: ``g - a^T B``, ``(B B^T + lambda I) a = B g^T``, ``lambda = ridge
    tr(B B^T) / k``; ops.project_nonconflicting: ``d = g + sign * w @ r``, ``w >= 0``, with
    ``sign <d, r_j> >= 0``; ops.pcgrad: the sum of the PCGrad loop on the rows."""
    basis, k, n = _problem(seed)
    g = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(seed + 100))
    ridge = 1e-2
    gram = basis @ basis.T
    shifted = gram + ridge * torch.trace(gram) / k * torch.eye(k, dtype=F64)
    torch.testing.assert_close(ops.project_out(g, basis, ridge),
                               g - torch.linalg.solve(shifted, basis @ g.T).T @ basis,
                               rtol=1e-10, atol=1e-12)
    d, w = ops.project_nonconflicting(g, basis, sign, return_coeffs=True)
    torch.testing.assert_close(d, g + sign * w @ basis, rtol=1e-12, atol=1e-12)
    assert float(w.min()) >= 0.0
    assert float((sign * d @ basis.T).min()) >= -1e-12 * float(g.norm() * basis.norm())
    rows = [basis[i].clone() for i in range(k)]
    for i in range(k):
        for j in ops.pcgrad_order(k, i, seed):
            inner = float(rows[i] @ basis[j])
            if j != i and inner < 0:
                rows[i] = rows[i] - inner / float(basis[j] @ basis[j]) * basis[j]
    torch.testing.assert_close(ops.pcgrad(basis, seed=seed), torch.stack(rows).sum(0),
                               rtol=1e-12, atol=1e-12)
