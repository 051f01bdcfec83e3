"""Behaviour a second mutation review found unpinned, in the modules the first
(``test_mutation_review.py``) did not reach: the interference-aware method and its building
blocks (protected subspace, instance memory, terms, batches, loop, interference matrix,
objectives), the baselines, the membership attack and UIS floor, and the list projections.
Each test here fails on a one-line change of the code that the rest of the suite let pass (a
review making 98 such changes; 23 survived the tests that exercise their module, all of them
with an observable effect, each pinned here). The expected values are worked out by hand or
from a float64 reference, not read off the code's output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
from mtunlearn_ext.metrics.membership import ATTACK_AT_CHANCE, attack_at_chance
from mtunlearn_ext.ops.solvers import MAX_SOLVER_K
from mtunlearn_ext.surgery import project_out_list
from mtunlearn_ext.unlearning import UnlearningProblem, forget_terms, get_unlearner
from mtunlearn_ext.unlearning.baselines import pcgrad as pcgrad_module
from mtunlearn_ext.unlearning.batches import BatchStream
from mtunlearn_ext.unlearning.instance_memory import PerSampleMemory
from mtunlearn_ext.unlearning.interference import interference_matrix
from mtunlearn_ext.unlearning.interference_aware import InterferenceAware, _split_rows
from mtunlearn_ext.unlearning.objectives import (
    AscentObjective,
    MeanTargetObjective,
    RandomTargetObjective,
)
from mtunlearn_ext.unlearning.protected_subspace import ProtectedSubspace


def test_a_forget_term_averages_over_its_supervised_pairs_only() -> None:
    """``O_t = (1 / n_t) sum_i m_it o_t(i)``: a forget batch whose rows do not all supervise
    the task (a partial request's forget set) divides by its supervised pairs, not its rows;
    every other test's forget batch supervised each target task on every row."""
    spec = TaskSpec("size", "regression")
    outputs = {"size": torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)}
    batch = {"targets": {"size": torch.zeros(3, 1)},
             "supervision": torch.tensor([[True], [False], [True]]), "id": torch.arange(3)}
    terms = forget_terms(outputs, batch, [spec], {"size": AscentObjective(spec)})
    # Squared errors 1 and 9 on the two supervised rows; the unsupervised row's 4 is left out.
    assert terms.count == {"size": 2}
    assert float(terms.objective["size"].detach()) == pytest.approx(-5.0)
    assert float(terms.loss["size"]) == pytest.approx(5.0)


def test_a_subspace_holds_up_to_the_solvers_largest_k() -> None:
    """``k`` may be the solver's bound itself (``1 <= k <= MAX_SOLVER_K``)."""
    subspace = ProtectedSubspace([torch.zeros(3)], [0], k=MAX_SOLVER_K)
    assert subspace.k == MAX_SOLVER_K


def test_the_default_ridge_shrinks_a_snapshot_component_by_one_part_in_ten_thousand() -> None:
    """``f - b (b.f) / (b.b + lambda)``, ``lambda = ridge |b|^2`` at the documented default
    ``ridge=1e-4``: a vector along its only snapshot keeps ``ridge / (1 + ridge)`` of itself."""
    subspace = ProtectedSubspace([torch.zeros(2, dtype=torch.float64)], [0], k=1)
    subspace.push([torch.tensor([3.0, 0.0], dtype=torch.float64)])
    out = subspace.project([torch.tensor([[2.0, 5.0]], dtype=torch.float64)])[0]
    assert out[0, 0].item() == pytest.approx(2.0 * 1e-4 / (1 + 1e-4), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(5.0)


def test_a_pass_counts_its_last_short_batch_unless_dropped() -> None:
    """7 rows in batches of 3: a pass is 3 batches (3, 3 and 1 rows), 2 with ``drop_last``
    (SalUn's saliency pass draws ``batches_per_pass`` batches and must see every row)."""
    spec = TaskSpec("size", "regression")
    data = MultiTaskDataset(torch.zeros(7, 2), {"size": torch.zeros(7, 1)}, [spec])
    kept = BatchStream(data, 3, torch.Generator().manual_seed(0), shuffle=False)
    dropped = BatchStream(data, 3, torch.Generator().manual_seed(0), drop_last=True)
    assert kept.batches_per_pass == 3
    assert dropped.batches_per_pass == 2
    rows = [int(kept.next()["id"].numel()) for _ in range(kept.batches_per_pass)]
    assert rows == [3, 3, 1]


def test_a_skipped_batch_moves_the_stream_on_as_a_drawn_one_does() -> None:
    """``skip`` draws the rows ``next`` would have given without building them: an ablation
    that skips keeps the other consumers of the stream on the full method's rows."""
    spec = TaskSpec("size", "regression")
    data = MultiTaskDataset(torch.zeros(10, 2), {"size": torch.zeros(10, 1)}, [spec])
    drawn = BatchStream(data, 4, torch.Generator().manual_seed(3))
    skipped = BatchStream(data, 4, torch.Generator().manual_seed(3))
    drawn.next()
    skipped.skip()
    for _ in range(3):  # across the end of the first pass as well
        assert torch.equal(drawn.next()["id"], skipped.next()["id"])


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _two_task_problem() -> tuple[UnlearningProblem, torch.Tensor, dict[str, torch.Tensor]]:
    """A float64 :class:`_TwoHeads` on 20 random rows, the first 4 forgotten from both tasks;
    (the problem, the inputs, the targets)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = {"a": torch.randint(0, 3, (20,), generator=g),
         "b": torch.randn(20, 1, generator=g, dtype=torch.float64)}
    problem = build_problem(_TwoHeads().double(),
                            tasks=[TaskSpec("a", "classification", num_classes=3),
                                   TaskSpec("b", "regression")],
                            train_data=(x, y), forget_request=ForgetRequest.create(range(4)),
                            shared_parameters=lambda n: n.startswith("trunk."))
    return problem, x, y


def test_orthograds_retain_term_descends_the_retain_loss() -> None:
    """OrthoGrad's update is ``w_f P(f) + w_r r``: with the forget term off, one plain SGD step
    over the whole retain set moves every parameter by ``-lr`` times the gradient of the retain
    objective (mean cross-entropy plus mean squared error), computed here apart."""
    problem, x, y = _two_task_problem()
    lr = 0.1
    result = get_unlearner("orthograd", steps=1, lr=lr, momentum=0.0, grad_clip=None,
                           forget_weight=0.0, retain_batch_size=16).unlearn(problem)
    reference = _TwoHeads().double()
    out = reference(x[4:])
    loss = F.cross_entropy(out["a"], y["a"][4:]) + F.mse_loss(out["b"], y["b"][4:])
    names = [n for n, _ in reference.named_parameters()]
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    prefix = getattr(result.model, "wrapped_prefix", "")  # the API's wrapper of a user's model
    moved = {n.removeprefix(prefix): p for n, p in result.model.named_parameters()}
    assert sorted(moved) == sorted(names)
    for name, p, grad in zip(names, reference.parameters(), grads):
        torch.testing.assert_close(moved[name].detach(), p.detach() - lr * grad, msg=name)


def test_pcgrad_draws_a_fresh_projection_order_at_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PCGrad shuffles the order in which the gradients are projected at every step, seeded by
    the run's seed and the step; one order for the whole run is another method (the order
    matters from three gradients on: granularity ``"task"`` here has four)."""
    seeds: list[int | None] = []

    class Recorded(pcgrad_module.PCGradWeighting):
        def __init__(self, seed: int | None = 0, reshuffle: bool = True) -> None:
            seeds.append(seed)
            super().__init__(seed=seed, reshuffle=reshuffle)

    monkeypatch.setattr(pcgrad_module, "PCGradWeighting", Recorded)
    problem, x, y = _two_task_problem()
    get_unlearner("pcgrad", steps=3, granularity="task").unlearn(problem)
    assert len(seeds) == 3 and len(set(seeds)) == 3


def test_pcgrads_forget_row_is_weighted() -> None:
    """``forget_weight`` scales PCGrad's forget row: alone (the retain term off) a row is its
    own PCGrad, so one plain SGD step at weight 1/2 moves every parameter half as far as at
    weight 1 (every other test ran at the default weight 1)."""
    half, full = (_one_sgd_step("pcgrad", lr=0.1, grad_clip=None, forget_weight=weight,
                                retain_weight=0.0) for weight in (0.5, 1.0))
    assert any(bool(m.abs().max() > 0) for m in full)
    for a, b in zip(half, full):
        torch.testing.assert_close(a, 0.5 * b)


def test_a_conflict_is_a_positive_inner_product_only() -> None:
    """The ``instance_conflicts`` curve counts the retain rows a forget step would hurt to
    first order, ``<u, r_j> > 0``: a row orthogonal to the step (a zero gradient) is none."""
    step_dir = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    per_sample = [torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]]),
                  torch.tensor([[0.0], [0.0], [0.0], [0.0]])]
    assert InterferenceAware._conflicts(step_dir, per_sample) == 1


def test_a_subnormal_gradient_is_projected_exactly() -> None:
    """float32 underflow loses a Gram row of tiny vectors; the rescue rescales each row by a
    power of two near ``1 / |g|`` (of the norm, not of its square, whose power of two took a
    subnormal ``g``'s cross products past float32's largest: inf coefficients, an error). Off
    the unit row ``e_1`` the projection of ``(s, 2s)`` is ``(0, 2s)``."""
    g = torch.tensor([[3e-42, 6e-42]], dtype=torch.float32)
    basis = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    out = project_out_list([g], [basis], 0.0)[0]
    assert out[0, 0].item() == 0.0
    assert out[0, 1].item() == g[0, 1].item()


def test_a_memorys_gram_takes_the_dtype_of_rows_that_restart_it() -> None:
    """Rows of another dtype start the memory afresh, its kept Gram matrix too: float64 rows
    after float32 ones get a float64 Gram (the ring's capacity is the same, and the old float32
    matrix was kept, rounding every new product to float32)."""
    memory = PerSampleMemory(steps=1, track_gram=True)
    memory.add(["w"], [torch.ones(2, 3, dtype=torch.float32)])
    rows = torch.tensor([[1.0 + 2.0 ** -40, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    memory.add(["w"], [rows])
    gram = memory.gram()
    assert gram.dtype == torch.float64
    assert torch.equal(gram, rows @ rows.T)


def test_project_out_lists_default_ridge_is_one_part_in_a_million() -> None:
    """``project_out_list``'s documented default ``ridge=1e-6``: a vector along its only basis
    row keeps ``ridge / (1 + ridge)`` of itself (``lambda = ridge |b|^2``)."""
    basis = torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    out = project_out_list([torch.tensor([[1.0, 3.0]], dtype=torch.float64)], [basis])[0]
    assert out[0, 0].item() == 1.0
    assert out[0, 1].item() == pytest.approx(3.0 * 1e-6 / (1 + 1e-6), rel=1e-6)


def _one_sgd_step(method: str, **settings: object) -> list[torch.Tensor]:
    """How far one plain SGD step of ``method`` moves each parameter of
    :func:`_two_task_problem`'s model."""
    problem, _, _ = _two_task_problem()
    before = [p.detach().clone() for p in problem.model.parameters()]
    result = get_unlearner(method, steps=1, momentum=0.0, **settings).unlearn(problem)
    return [p.detach() - b for p, b in zip(result.model.parameters(), before)]


def test_the_forget_weight_scales_a_weighted_updates_forget_term() -> None:
    """``.grad = d/d theta [w_f sum_t O_t + w_r sum_t L_t]``: with the retain term off, NegGrad+
    at ``forget_weight`` 1/2 (its default) moves every parameter half as far as at 1."""
    half = _one_sgd_step("neggrad_plus", lr=0.1, grad_clip=None, forget_weight=0.5,
                         retain_weight=0.0)
    full = _one_sgd_step("neggrad_plus", lr=0.1, grad_clip=None, forget_weight=1.0,
                         retain_weight=0.0)
    assert any(bool(m.abs().max() > 0) for m in full)
    for a, b in zip(half, full):
        torch.testing.assert_close(a, 0.5 * b)


def test_grad_clip_bounds_the_whole_update_heads_included() -> None:
    """``grad_clip`` is the largest global norm of the update over every parameter the step
    moves, the heads' too: one SGD step of ``lr`` 1 moves the model by exactly ``grad_clip``
    when the gradient is longer."""
    moved = _one_sgd_step("finetune", optimizer="sgd", lr=1.0, grad_clip=1e-3)
    norm = torch.sqrt(sum((m.double() ** 2).sum() for m in moved))
    assert norm.item() == pytest.approx(1e-3, rel=1e-5)  # torch divides by the norm + 1e-6
    heads = sum(float(m.abs().sum()) for m in moved[2:])  # the trunk is the first two
    assert heads > 0


def test_salun_sums_its_saliency_gradient_over_every_forget_pair() -> None:
    """The saliency is the gradient of the forget loss summed over the forget pairs (each
    task's mean times its pairs), whatever the batches: 4 forget rows in batches of 3 and 1
    give the threshold of the whole set's summed gradient, computed here apart (a mean per
    batch weighed the lone row 3 times as much as each other); half of the entries are kept."""
    problem, x, y = _two_task_problem()
    report = get_unlearner("salun", steps=0, saliency_fraction=0.5,
                           saliency_batch_size=3).unlearn(problem).report
    reference = _TwoHeads().double()
    out = reference(x[:4])
    loss = F.cross_entropy(out["a"], y["a"][:4], reduction="sum") + \
        F.mse_loss(out["b"], y["b"][:4], reduction="sum")
    flat = torch.cat([g.abs().reshape(-1) for g in torch.autograd.grad(
        loss, list(reference.parameters()))])
    keep = round(0.5 * flat.numel())
    expected = flat.sort(descending=True).values[keep - 1]  # the keep-th largest
    assert report.extra["saliency"]["threshold"] == pytest.approx(expected.item(), rel=1e-5)


def test_salun_reports_each_parts_density_of_its_own_entries() -> None:
    """``density_heads``: the heads' kept entries over the heads' 36 entries, and
    ``density_shared`` the trunk's over its 40, so that ``density``, over all 76, is their
    entry-weighted mean (the heads' count over all 76 broke it)."""
    problem, _, _ = _two_task_problem()
    report = get_unlearner("salun", steps=0, saliency_fraction=0.5).unlearn(problem).report
    saliency = report.extra["saliency"]
    assert 0 < saliency["density_heads"] <= 1 and 0 < saliency["density_shared"] <= 1
    assert 76 * saliency["density"] == pytest.approx(
        40 * saliency["density_shared"] + 36 * saliency["density_heads"])


def test_a_member_auc_at_the_chance_bound_itself_is_at_chance() -> None:
    """``attack_at_chance``: at or below :data:`ATTACK_AT_CHANCE` (0.55), the bound included."""
    assert attack_at_chance(ATTACK_AT_CHANCE)
    assert not attack_at_chance(math.nextafter(ATTACK_AT_CHANCE, 1.0))
    assert not attack_at_chance(None)


def test_the_interference_matrix_shows_retain_rows_the_snapshots_did_not_see() -> None:
    """The displayed retain gradients come from a second retain batch, so that "after" shows
    how the protection generalises beyond its snapshots. Taken on the snapshots' own batch
    (with labelled snapshots of one group, the displayed rows themselves) every projected
    forget row is orthogonal to them up to the ridge (cosines ~1e-6 on one shared layer); on
    a disjoint batch they stay at the size of the raw ones (0.05 to 0.2 here)."""
    problem, _, _ = _two_task_problem()
    matrix = interference_matrix(problem, {"snapshot_targets": "labels", "snapshot_groups": 1,
                                           "instance_projection": "off", "protect": "all"},
                                 batch_size=8)
    assert matrix.labels == ["forget/a", "forget/b", "retain/a", "retain/b"]
    assert float(matrix.after[:2, 2:].abs().max()) > 1e-2


def test_a_refresh_cuts_its_batch_into_the_groups_asked_for() -> None:
    """``snapshot_groups`` contiguous groups covering the batch (fewer only when it has fewer
    rows): 5 rows in 2 groups are rows 0-1 and 2-4, in 1 group all 5, in 8 groups 5 of one."""
    batch = {"input": torch.arange(5.0).reshape(5, 1), "id": torch.arange(5)}

    def sizes(groups: int) -> list[int]:
        parts = _split_rows(batch, groups)
        assert torch.equal(torch.cat([p["id"] for p in parts]), torch.arange(5))
        return [int(p["id"].numel()) for p in parts]

    assert sizes(2) == [2, 3]
    assert sizes(1) == [5]
    assert sizes(8) == [1] * 5


def test_a_class_absent_from_the_retain_set_adds_nothing_to_the_mean_target_kl() -> None:
    """``KL(pi || p)`` sums over the classes with ``pi_c > 0``: retain labels 0, 0, 1, 1 of 3
    classes give ``pi = (1/2, 1/2, 0)``, and uniform predictions a KL of
    ``2 * 1/2 log((1/2) / (1/3)) = log 1.5``, and a model that masks class 2 (logit
    ``-inf``) a KL of 0, where ``0 * (log 0 - log 0)`` taken into the sum was NaN."""
    spec = TaskSpec("kind", "classification", num_classes=3)
    retain = MultiTaskDataset(torch.zeros(4, 2), {"kind": torch.tensor([0, 0, 1, 1])}, [spec])
    objective = MeanTargetObjective(spec)
    objective.prepare(retain, torch.Generator().manual_seed(0), "cpu")
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf]])
    kl = objective.per_pair(logits, torch.tensor([0, 2]), None)
    torch.testing.assert_close(kl, torch.tensor([math.log(1.5), 0.0]))


def test_a_random_label_is_never_the_true_one() -> None:
    """``random_target`` draws each label uniformly from the *other* classes
    (``y + U{1..C-1} mod C``), so no draw repeats the label being forgotten."""
    spec = TaskSpec("kind", "classification", num_classes=3)
    retain = MultiTaskDataset(torch.zeros(3, 2), {"kind": torch.tensor([0, 1, 2])}, [spec])
    objective = RandomTargetObjective(spec)
    objective.prepare(retain, torch.Generator().manual_seed(0), "cpu")
    target = torch.tensor([0, 1, 2]).repeat(100)
    drawn = objective.random_targets(target)
    assert not bool((drawn == target).any())
    assert set(drawn[target == 0].tolist()) == {1, 2}


def test_a_binary_entry_never_labelled_in_the_retain_set_takes_the_overall_rate() -> None:
    """The mean-target reference of binary labels is each entry's rate of positives; an entry
    no retain row labels falls back to the rate over every labelled entry: entry 0 labelled
    1, 0, 1, 1 and entry 1 never give ``(3/4, 3/4)``, not a 0 read as "always negative"."""
    spec = TaskSpec("tags", "binary")
    labels = torch.tensor([[1, -1], [0, -1], [1, -1], [1, -1]])
    retain = MultiTaskDataset(torch.zeros(4, 2), {"tags": labels}, [spec])
    objective = MeanTargetObjective(spec)
    objective.prepare(retain, torch.Generator().manual_seed(0), "cpu")
    assert objective.reference is not None
    torch.testing.assert_close(objective.reference, torch.tensor([0.75, 0.75]))


def test_an_instance_projection_that_keeps_the_forget_rows_keeps_their_cosines() -> None:
    """The instance step projects the descent direction ``-f``; the matrix shows the forget
    gradient again, ``-d``. Where the one constraint row conflicts with neither forget step
    (each keeps all of its norm) the projection is the identity and "after" is "before"
    (showing ``d`` itself flipped the sign of every forget/retain cosine)."""
    problem, _, _ = _two_task_problem()
    matrix = interference_matrix(problem, {"task_projection": False, "num_per_sample": 1,
                                           "instance_memory": 0}, batch_size=8)
    assert matrix.forget_kept == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert bool((matrix.before[:2, 2:].abs() > 0.05).all())
    torch.testing.assert_close(matrix.after, matrix.before)
