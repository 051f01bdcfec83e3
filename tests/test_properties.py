"""Property-based tests (hypothesis) of the ops and of forget-request parsing.

Ops are compared with float64 references; tolerances scale with the dtype's epsilon and the
size of the reduction. Inputs come in random shapes (including empty ones), random strides
(slices and transposes) and dtypes float32 / float64 / float16 / bfloat16.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mtunlearn_ext import ops
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.request import ForgetRequest
from mtunlearn_ext.workflow import UserInputError, build_user_request

# The outputs the ops allocate are NaN-filled: a value left unwritten shows (test review).
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,  # reproducible in CI
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative rounding of one accumulation step. The inputs are exact low-precision values and every
# dtype below float64 is accumulated in float32 (the reference sees the same values in float64),
# so the bound is float32's for all of them, never the input dtype's own (bfloat16's 8e-3 let a
# 10% error pass).
EPS = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Single-threaded for this module only (conftest.one_thread restores the count after it);
    never set at import, which would make the rest of a `pytest tests` run single-threaded."""


@st.composite
def matrices(draw: st.DrawFn, k_max: int = 6, n_max: int = 40, allow_empty: bool = True
             ) -> torch.Tensor:
    """A ``[k, n]`` tensor with random layout: contiguous, a column slice, or a transpose."""
    k = draw(st.integers(0 if allow_empty else 1, k_max))
    n = draw(st.integers(0 if allow_empty else 1, n_max))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "slice", "transpose"]))
    g = torch.Generator().manual_seed(seed)
    if layout == "slice":
        base = torch.randn(k, 2 * n + 1, generator=g, dtype=torch.float64)
        x = base[:, ::2][:, :n]
    elif layout == "transpose":
        x = torch.randn(n, k, generator=g, dtype=torch.float64).t()
    else:
        x = torch.randn(k, n, generator=g, dtype=torch.float64)
    return x.to(dtype) if layout != "transpose" else x.t().to(dtype).t()


def _tol(x: torch.Tensor, n: int) -> float:
    """Bound on |G_ij - ref_ij| / max_i |x_i|^2 for a reduction over ``n`` columns."""
    return 20 * EPS[x.dtype] * max(1, n)


def _fixed(dtype: torch.dtype, k: int = 4, n: int = 37) -> torch.Tensor:
    """An explicit example per low-precision dtype, whatever hypothesis happens to draw."""
    return torch.randn(k, n, generator=torch.Generator().manual_seed(k * n),
                       dtype=torch.float64).to(dtype)


@SETTINGS
@given(matrices())
@example(_fixed(torch.bfloat16))
@example(_fixed(torch.float16))
def test_gram_symmetric_psd_matches_float64(x: torch.Tensor) -> None:
    g = ops.gram(x)
    k, n = x.shape
    assert g.shape == (k, k)
    ref = x.double() @ x.double().T
    scale = float(x.double().pow(2).sum(dim=1).max()) if x.numel() else 1.0
    assert torch.allclose(g.double(), ref, atol=_tol(x, n) * max(scale, 1.0), rtol=0)
    assert torch.equal(g, g.T) or torch.allclose(g, g.T, atol=1e-6 * max(scale, 1.0))
    if k:
        eig = torch.linalg.eigvalsh(g.double())
        assert float(eig.min()) >= -_tol(x, n) * max(scale, 1.0) * k


@SETTINGS
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 5)), min_size=1, max_size=5),
       st.integers(1, 5), st.sampled_from(DTYPES), st.randoms(use_true_random=False))
@example([(3, 5), (2, 4), (1, 3)], 4, torch.bfloat16, random.Random(0))
@example([(3, 5), (2, 4), (1, 3)], 4, torch.float16, random.Random(0))
def test_gram_list_independent_of_parameter_order(shapes: list[tuple[int, int]], k: int,
                                                  dtype: torch.dtype, rnd: object) -> None:
    g = torch.Generator().manual_seed(len(shapes) * 31 + k)
    xs = [torch.randn(k, a, b, generator=g, dtype=torch.float64).to(dtype) for a, b in shapes]
    order = list(range(len(xs)))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    forward = ops.gram_list(xs).double()
    shuffled = ops.gram_list([xs[i] for i in order]).double()
    ref = sum((x.double().reshape(k, -1) @ x.double().reshape(k, -1).T for x in xs),
              torch.zeros(k, k, dtype=torch.float64))
    n = sum(a * b for a, b in shapes)
    scale = max(1.0, float(ref.diagonal().max()))
    assert torch.allclose(forward, shuffled, atol=_tol(xs[0], n) * scale, rtol=0)
    assert torch.allclose(forward, ref, atol=_tol(xs[0], n) * scale, rtol=0)


@st.composite
def pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """``g: [m, n]`` and a basis ``r: [k, n]`` of one dtype, random layouts, n >= 1."""
    m, k, n = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    r = torch.randn(n, k, generator=gen, dtype=torch.float64).t()  # transposed layout
    if draw(st.booleans()) and k > 1:  # a rank-deficient (singular Gram) basis
        r = torch.cat([r[:1], r[:1] * 2.0, r[2:]])
    return g.to(dtype), r.to(dtype)


@SETTINGS
@given(pairs())
def test_project_out_idempotent_and_orthogonal(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    g, basis = pair
    out = ops.project_out(g, basis)
    assert torch.isfinite(out).all()
    # ridge=0 stays finite on singular Grams too (dependent rows are dropped).
    assert torch.isfinite(ops.project_out(g, basis, ridge=0.0)).all()
    scale = float(g.double().norm()) * float(basis.double().norm()) + 1e-12
    tol = 1e-3 if g.dtype == torch.float32 else 1e-5
    # Orthogonal to the span (also with a singular Gram matrix: the ops regularise it).
    if g.shape[1] <= basis.shape[0]:
        return  # the span may be the whole space: out is the ridge's residual, no fixed point
    eig = torch.linalg.eigvalsh(basis.double() @ basis.double().T)
    if float(eig.min()) < 1e-4 * float(eig.max()):
        return  # ill-conditioned: the relative ridge legitimately perturbs the projection
    assert float((out.double() @ basis.double().T).abs().max()) <= tol * scale
    again = ops.project_out(out, basis)
    assert torch.allclose(again.double(), out.double(), atol=tol * (1 + float(g.norm())), rtol=0)


@SETTINGS
@given(pairs(), st.sampled_from([1, -1]))
def test_project_nonconflicting_never_conflicts(pair: tuple[torch.Tensor, torch.Tensor],
                                                sign: int) -> None:
    g, r = pair
    # k > n (more constraints than dimensions, a singular Gram) included: hypothesis found
    # conflicting results there before the solver stopped polishing singular active sets.
    d = ops.project_nonconflicting(g, r, sign)
    dots = sign * (d.double() @ r.double().T)
    scale = (float(g.double().norm()) + 1) * (float(r.double().norm()) + 1)
    tol = 2e-4 if g.dtype == torch.float32 else 1e-8
    assert float(dots.min()) >= -tol * scale
    # Already non-conflicting rows are left alone.
    ok = (sign * (g.double() @ r.double().T) >= 0).all(dim=1)
    if bool(ok.any()):
        assert torch.allclose(d[ok].double(), g[ok].double(), atol=tol * scale, rtol=0)


def test_ops_refuse_mixed_dtypes_and_nonfinite() -> None:
    a, b = torch.randn(2, 5), torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        ops.inner(a, b)
    with pytest.raises(TypeError, match="dtype"):
        ops.project_out(a, b)
    bad = torch.randn(2, 5)
    bad[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="`x` contains NaN"):
        ops.gram(bad)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            ops.inner(a, a.cuda())


# -- request parsing -------------------------------------------------------------------------------

TASKS = [TaskSpec("a", "classification", num_classes=3), TaskSpec("b", "regression"),
         TaskSpec("c", "classification", num_classes=2)]


def _dataset(n: int, seed: int) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(5 * n, generator=g)[:n]
    sup = torch.rand(n, 3, generator=g) > 0.2
    sup[:, 0] |= ~sup.any(dim=1)  # every row supervises something
    return MultiTaskDataset(torch.randn(n, 4, generator=g),
                            {"a": torch.randint(0, 3, (n,), generator=g),
                             "b": torch.randn(n, 1, generator=g),
                             "c": torch.randint(0, 2, (n,), generator=g)},
                            TASKS, ids, sup)


@SETTINGS
@given(st.integers(4, 30), st.integers(0, 10_000), st.data())
def test_valid_requests_split_disjoint_and_cover(n: int, seed: int, data: st.DataObject) -> None:
    ds = _dataset(n, seed)
    all_ids = ds.ids.tolist()
    forget = data.draw(st.lists(st.sampled_from(all_ids), min_size=1, max_size=n - 1,
                                unique=True))
    tasks = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(["a", "b", "c"]),
                                                    min_size=1, max_size=3, unique=True)))
    request = ForgetRequest.create(forget, tasks)
    request.validate(ds)
    forget_set, retain_set = request.split(ds)
    pairs_f = {(int(i), t) for i, row in zip(forget_set.ids.tolist(), forget_set.supervision)
               for t, s in zip(ds.task_names, row.tolist()) if s}
    pairs_r = {(int(i), t) for i, row in zip(retain_set.ids.tolist(), retain_set.supervision)
               for t, s in zip(ds.task_names, row.tolist()) if s}
    pairs_all = {(int(i), t) for i, row in zip(ds.ids.tolist(), ds.supervision)
                 for t, s in zip(ds.task_names, row.tolist()) if s}
    assert not pairs_f & pairs_r
    assert pairs_f | pairs_r == pairs_all
    targets = set(request.resolved_tasks(ds))
    assert all(i in forget and t in targets for i, t in pairs_f)


@SETTINGS
@given(st.integers(4, 20), st.integers(0, 10_000), st.data())
def test_invalid_requests_raise_documented_errors(n: int, seed: int,
                                                  data: st.DataObject) -> None:
    ds = _dataset(n, seed)
    all_ids = ds.ids.tolist()
    kind = data.draw(st.sampled_from(["empty", "unknown_id", "unknown_task", "partial_all",
                                      "duplicate", "every_id"]))
    ids_: list[int] = data.draw(st.lists(st.sampled_from(all_ids), min_size=1, max_size=3,
                                         unique=True))
    tasks: list[str] | None = None
    rtype: str | None = None
    if kind == "empty":
        ids_ = []
    elif kind == "unknown_id":
        ids_ = ids_ + [10 * n + data.draw(st.integers(0, 100))]
    elif kind == "unknown_task":
        tasks = ["a", data.draw(st.text("xyz", min_size=1, max_size=4))]
    elif kind == "partial_all":
        tasks, rtype = ["c", "a", "b"], "partial"
    elif kind == "every_id":  # nothing left to retain (CLI review: the error named "request")
        ids_ = list(all_ids)
    else:
        ids_ = ids_ + ids_[:1]
    argument = {"empty": "--forget-ids", "unknown_id": "--forget-ids", "duplicate": "--forget-ids",
                "unknown_task": "--target-tasks", "partial_all": "--target-tasks",
                "every_id": "--forget-ids"}[kind]
    with pytest.raises(UserInputError) as info:
        build_user_request(ds, forget_ids=ids_, forget_fraction=None, target_tasks=tasks,
                           request_type=rtype, seed=seed)
    assert info.value.argument == argument and "expected" in str(info.value)


def test_duplicate_forget_ids_are_found_in_one_pass() -> None:
    """``list(ids).count(i)`` for every id: 40k ids took 17 s, 100k minutes (quadratic)."""
    import time

    n = 120_000
    ds = MultiTaskDataset(torch.zeros(n, 1), {"a": torch.zeros(n, dtype=torch.long)},
                          [TaskSpec("a", "classification", num_classes=2)])
    ids_ = list(range(0, n, 2)) + [6, 8]
    start = time.perf_counter()
    with pytest.raises(UserInputError, match=r"--forget-ids: expected distinct ids, got "
                                             r"'duplicates \[6, 8\]'"):
        build_user_request(ds, forget_ids=ids_, forget_fraction=None, target_tasks=None,
                           request_type=None, seed=0)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("forget_ids, tasks", [([10, 11, 13], None), ([10, 11, 13], ["a"])])
def test_a_request_leaving_only_unlabelled_pairs_is_refused(forget_ids: list[int],
                                                            tasks: list[str] | None) -> None:
    """validate() refuses a request naming every instance and every task; one that leaves out
    only an instance without a label (12) or a task labelled nowhere else passed, and
    `mtunlearn unlearn` then failed late: "--method-config: expected settings of 'finetune'
    that fit this request, got {'steps': 1}; UnlearningProblem: the retain set is empty"."""
    specs = [TaskSpec("a", "classification", num_classes=2), TaskSpec("b", "regression")]
    targets = {"a": torch.tensor([0, 1, -1, 1]), "b": torch.zeros(4, 1)}
    supervision = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    if tasks is not None:
        supervision[:, 1] = False  # only task a is labelled: forgetting a takes every pair
    ds = MultiTaskDataset(torch.zeros(4, 2), targets, specs, torch.arange(10, 14), supervision)
    with pytest.raises(UserInputError, match=r"^--forget-ids: expected a request that leaves "
                                             r"something to retain, got '(full|partial) "
                                             r"request'; every training pair outside it is "
                                             r"unlabelled \(or removed by an earlier request\)"):
        build_user_request(ds, forget_ids=forget_ids, forget_fraction=None, target_tasks=tasks,
                           request_type=None, seed=0)
    request, _ = build_user_request(ds, forget_ids=[10, 11], forget_fraction=None,
                                    target_tasks=tasks, request_type=None, seed=0)
    assert bool(request.split(ds)[1].supervision.any())
