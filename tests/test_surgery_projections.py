"""List projections of mtunlearn_ext.surgery against the same computation on the flattened
matrix (float64 textbook formulas), per layer, in place, low precision, NaN policy."""

from __future__ import annotations

import math
import re

import numpy
import pytest
import torch

from mtunlearn_ext.surgery import (
    Mean,
    UPGrad,
    aggregate_list,
    gram_list_stats,
    inner_list_stats,
    project_nonconflicting_list,
    project_out_list,
)

# The outputs the ops allocate are NaN-filled: a value left unwritten shows (test review).
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

F64 = torch.float64
SHAPES = [(3, 4), (7,), (2, 1, 3), (5,)]


def _stacks(rows: int, seed: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, *s, generator=gen, dtype=F64).to(dtype) for s in SHAPES]


def _flat(stacks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.reshape(s.shape[0], -1).to(F64) for s in stacks], dim=1)


def _project_out_textbook(g: torch.Tensor, basis: torch.Tensor, ridge: float) -> torch.Tensor:
    gram = basis @ basis.T
    lam = ridge * torch.diagonal(gram).mean()
    coeffs = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=F64), basis @ g.T)
    return g - coeffs.T @ basis


@pytest.mark.parametrize("m,k", [(1, 3), (2, 5), (3, 1)])
def test_project_out_list_equals_flat_textbook(m: int, k: int) -> None:
    g, basis = _stacks(m, 0), _stacks(k, 1)
    out = project_out_list(g, basis, ridge=1e-8)
    assert [o.shape for o in out] == [x.shape for x in g]
    expected = _project_out_textbook(_flat(g), _flat(basis), 1e-8)
    torch.testing.assert_close(_flat(out), expected, rtol=1e-9, atol=1e-10)
    # Orthogonal to the basis, and projecting twice changes nothing (idempotent).
    assert (_flat(basis) @ _flat(out).T).abs().max() < 1e-6
    again = project_out_list(out, basis, ridge=1e-8)
    torch.testing.assert_close(_flat(again), _flat(out), rtol=1e-7, atol=1e-8)


def test_project_out_list_per_layer_equals_layer_by_layer() -> None:
    g, basis = _stacks(2, 2), _stacks(4, 3)
    layer_of = [0, 1, 1, 2]
    out, coeffs = project_out_list(g, basis, ridge=1e-6, per_layer=layer_of, return_coeffs=True)
    assert coeffs.shape == (3, 2, 4)
    for layer in range(3):
        members = [p for p, l_ in enumerate(layer_of) if l_ == layer]
        expected = _project_out_textbook(_flat([g[p] for p in members]),
                                         _flat([basis[p] for p in members]), 1e-6)
        torch.testing.assert_close(_flat([out[p] for p in members]), expected, rtol=1e-9,
                                   atol=1e-10)
    # per_layer=True is one layer per tensor.
    out_t = project_out_list(g, basis, ridge=1e-6, per_layer=True)
    torch.testing.assert_close(_flat([out_t[1]]),
                               _project_out_textbook(_flat([g[1]]), _flat([basis[1]]), 1e-6))


def test_project_out_list_in_place_and_order_independent() -> None:
    g, basis = _stacks(2, 4), _stacks(3, 5)
    expected = project_out_list(g, basis)
    work = [x.clone() for x in g]
    result = project_out_list(work, basis, outs=work)
    assert all(r is w for r, w in zip(result, work))
    for a, b in zip(work, expected):
        torch.testing.assert_close(a, b)
    perm = [3, 1, 0, 2]
    shuffled = project_out_list([g[i] for i in perm], [basis[i] for i in perm])
    for pos, i in enumerate(perm):
        torch.testing.assert_close(shuffled[pos], expected[i], rtol=1e-12, atol=1e-13)


def test_project_out_rank_deficient_basis_is_stable() -> None:
    g, basis = _stacks(1, 6), _stacks(2, 7)
    duplicated = [torch.cat([b, b[:1]]) for b in basis]  # 3 rows spanning 2 directions
    out = project_out_list(g, duplicated, ridge=1e-6)
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(_flat(out), _project_out_textbook(_flat(g), _flat(basis), 1e-6),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("seed", range(3))
def test_project_nonconflicting_list_properties(sign: int, seed: int) -> None:
    g, r = _stacks(2, 10 + seed), _stacks(4, 20 + seed)
    r[0] = -r[0]  # make some conflicts certain
    out, w = project_nonconflicting_list(g, r, sign=sign, return_coeffs=True)
    d, rr, gg = _flat(out), _flat(r), _flat(g)
    assert (w >= 0).all()
    # The constraint holds: sign * <d, r_j> >= 0 for every j (up to rounding).
    assert (sign * (d @ rr.T) >= -1e-9 * d.norm() * rr.norm()).all()
    # d = g + sign * w @ R, and complementary slackness: w_j > 0 only where <d, r_j> = 0.
    torch.testing.assert_close(d, gg + sign * w.to(F64) @ rr, rtol=1e-12, atol=1e-12)
    active = w > 1e-9
    assert ((d @ rr.T)[active].abs() <= 1e-7 * d.norm() * rr.norm()).all()
    # A vector already in the cone is left alone.
    inside = project_nonconflicting_list(out, r, sign=sign)
    torch.testing.assert_close(_flat(inside), d, rtol=1e-7, atol=1e-8)


def test_project_nonconflicting_list_per_layer() -> None:
    g, r = _stacks(1, 30), _stacks(3, 31)
    out = project_nonconflicting_list(g, r, sign=-1, per_layer=True)
    for p in range(len(SHAPES)):
        single = project_nonconflicting_list([g[p]], [r[p]], sign=-1)
        torch.testing.assert_close(out[p], single[0], rtol=1e-12, atol=1e-12)


def test_inner_list_stats_equals_flat_products() -> None:
    a, b = _stacks(2, 40), _stacks(5, 41)
    torch.testing.assert_close(inner_list_stats(a, b), _flat(a) @ _flat(b).T, rtol=1e-12,
                               atol=1e-12)
    per_layer = inner_list_stats(a, b, per_layer=[0, 1, 1, 0])
    assert per_layer.shape == (2, 2, 5)
    torch.testing.assert_close(per_layer.sum(0), _flat(a) @ _flat(b).T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="b_list"):
        inner_list_stats(a, b[:2])


@pytest.mark.parametrize("per_layer", [False, [0, 1, 1, 0]])
@pytest.mark.parametrize("sign", [1, -1])
def test_nonconflicting_with_a_kept_basis_gram_is_the_same_projection(per_layer, sign: int  # type: ignore[no-untyped-def]
                                                                      ) -> None:
    g, r = _stacks(2, 50), _stacks(6, 51)
    r[0] = -r[0]
    ref, w_ref = project_nonconflicting_list(g, r, sign=sign, per_layer=per_layer,
                                             return_coeffs=True)
    kept = gram_list_stats(r, per_layer=per_layer)
    out, w = project_nonconflicting_list(g, r, sign=sign, per_layer=per_layer,
                                         return_coeffs=True, basis_gram=kept)
    assert bool((w_ref > 0).any())  # something conflicted: the solve matters
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="basis_gram"):
        project_nonconflicting_list(g, r, sign=sign, per_layer=per_layer, basis_gram=kept[..., :5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_projection_within_twice_plain_error(dtype: torch.dtype) -> None:
    """The result is rounded once from fp32 accumulation: its error against the float64
    computation on the same (rounded) inputs is at most ~2x plain PyTorch at that precision."""
    g, basis = _stacks(1, 40, dtype), _stacks(3, 41, dtype)
    ours = _flat(project_out_list(g, basis, ridge=1e-6))
    exact = _project_out_textbook(_flat(g), _flat(basis), 1e-6)
    gl, bl = _flat(g).to(dtype), _flat(basis).to(dtype)
    gram = (bl @ bl.T).to(F64)
    coeffs = torch.linalg.solve(gram + 1e-6 * torch.diagonal(gram).mean() * torch.eye(3, dtype=F64),
                                (bl @ gl.T).to(F64))
    plain = (gl - coeffs.T.to(dtype) @ bl).to(F64)
    scale = exact.abs().max()
    assert (ours - exact).abs().max() <= 2 * (plain - exact).abs().max() + 1e-6 * scale


def test_nonfinite_policy() -> None:
    g, basis = _stacks(1, 50), _stacks(2, 51)
    basis[1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        project_out_list(g, basis)
    out = project_out_list(g, basis, check_finite=False)
    assert all(torch.isnan(o).all() for o in out)  # poisoned, not silently wrong
    with pytest.raises(FloatingPointError):
        project_nonconflicting_list(g, basis)
    out = project_nonconflicting_list(g, basis, check_finite=False)
    assert all(torch.isnan(o).all() for o in out)
    # Per layer, only the layer holding the NaN is poisoned.
    out = project_out_list(g, basis, check_finite=False, per_layer=True)
    assert torch.isnan(out[1]).all() and all(torch.isfinite(out[p]).all() for p in (0, 2, 3))


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_g_whose_squared_norm_overflows_is_still_projected(per_layer: bool) -> None:
    """Numerical audit: the finite check read the whole [g; B] Gram, whose g g^T block no
    solve uses, so a float32 g of norm 1e20 (|g|^2 beyond float32's range) against an
    ordinary basis was refused as an overflow, where the single-tensor ops project it. A NaN
    in g is still refused, naming g_list."""
    from mtunlearn_ext import ops

    gen = torch.Generator().manual_seed(3)
    g = [1e18 * torch.randn(1, 10_000, generator=gen)]
    basis = [torch.randn(3, 10_000, generator=gen)]
    assert not math.isfinite(float((g[0].double() ** 2).sum().float()))
    for project, single in ((project_out_list, ops.project_out),
                            (project_nonconflicting_list, ops.project_nonconflicting)):
        (out,) = project(g, basis, per_layer=per_layer)
        expected = single(g[0], basis[0])[0]
        assert torch.isfinite(out).all()
        error = float((out[0].double() - expected.double()).norm() / expected.double().norm())
        assert error < 1e-6, (project.__name__, error)
        poisoned = [g[0].clone()]
        poisoned[0][0, 5] = float("nan")
        with pytest.raises(FloatingPointError, match="g_list"):
            project(poisoned, basis, per_layer=per_layer)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("per_layer", [False, True, [0, 1, 1, 0]])
def test_projections_solve_on_the_blocks_without_joining_them(
        dtype: torch.dtype, per_layer: bool | list[int]) -> None:
    """Without a reduce the solvers take the basis' Gram and the cross products as the two
    blocks of the stacked pass, no longer joined into one matrix first (a torch.cat per call,
    12-20% of a projection over six small tensors). The answers are those of the joined
    matrix, which a reduce still builds (its one collective), to the bit; and with
    check_finite=False a NaN in the cross products alone (in g, not the basis) still poisons
    its problem, whose guard reads both blocks."""
    from surgery_helpers import OpLog

    g, basis = _stacks(2, 80, dtype), _stacks(3, 81, dtype)
    basis[0] = -basis[0]
    for project in (project_out_list, project_nonconflicting_list):
        with OpLog() as logged:
            out, coeffs = project(g, basis, per_layer=per_layer, return_coeffs=True)
        assert "aten.cat" not in logged.ops
        joined, joined_coeffs = project(g, basis, per_layer=per_layer, return_coeffs=True,
                                        reduce=lambda t: t.clone())
        assert torch.equal(coeffs, joined_coeffs)
        assert all(torch.equal(a, b) for a, b in zip(out, joined))
        bad = [x.clone() for x in g]
        bad[1][0, 2] = float("nan")
        out = project(bad, basis, per_layer=per_layer, check_finite=False)
        poisoned = [1] if per_layer is True else [1, 2] if per_layer else range(len(SHAPES))
        for p, o in enumerate(out):
            assert bool(torch.isnan(o).all()) == (p in poisoned)


def test_reduce_hook_sees_all_statistics_once() -> None:
    calls: list[tuple[int, ...]] = []

    def reduce(stats: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(stats.shape))
        return stats

    g, basis = _stacks(2, 60), _stacks(3, 61)
    project_out_list(g, basis, reduce=reduce)
    project_nonconflicting_list(g, basis, reduce=reduce, per_layer=True)
    assert calls == [(3, 3 + 2), (len(SHAPES), 3 + 2, 3)]


def test_argument_errors() -> None:
    g, basis = _stacks(1, 70), _stacks(2, 71)
    with pytest.raises(ValueError, match="same length"):
        project_out_list(g[:2], basis)
    with pytest.raises(ValueError, match="parameter shape"):
        project_out_list(g, basis[::-1])
    with pytest.raises(TypeError, match="dtype|float32"):
        project_out_list([x.float() for x in g], basis)
    with pytest.raises(ValueError, match="ridge"):
        project_out_list(g, basis, ridge=-1.0)
    with pytest.raises(ValueError, match="sign"):
        project_nonconflicting_list(g, basis, sign=0)
    with pytest.raises(ValueError, match="empty"):
        project_out_list([], [])
    with pytest.raises(ValueError, match="outs"):
        project_out_list(g, basis, outs=[torch.empty(1)])


def test_per_layer_ids_must_lie_below_num_layers() -> None:
    """With ``num_layers`` (a rank's shards) the ids may skip layers but must lie in
    ``0..num_layers-1``: id 2 of 2 layers indexed a ``[2, k, k]`` Gram out of range (an
    IndexError from deep inside, or a layer silently dropped) instead of naming ``per_layer``."""
    g, basis = _stacks(1, 72)[:2], _stacks(3, 73)[:2]
    calls = {
        "project_out_list": lambda ids: project_out_list(g, basis, per_layer=ids, num_layers=2),
        "project_nonconflicting_list": lambda ids: project_nonconflicting_list(
            g, basis, per_layer=ids, num_layers=2),
        "gram_list_stats": lambda ids: gram_list_stats(basis, per_layer=ids, num_layers=2),
        "inner_list_stats": lambda ids: inner_list_stats(g, basis, per_layer=ids, num_layers=2),
    }
    for name, call in calls.items():
        for ids, said in (([0, 2], r"\[0, 2\]"), ([2, 2], r"\[2\]"), ([-1, 1], r"\[-1, 1\]")):
            with pytest.raises(ValueError, match=rf"{name}: `per_layer` ids must lie in 0\.\.1, "
                                                 rf"got {said}$"):
                call(ids)
        call([1, 1])  # the largest id allowed; layer 0 has no tensor on this rank
    stats = gram_list_stats(basis, per_layer=[1, 1], num_layers=2)
    assert stats.shape == (2, 3, 3) and not bool(stats[0].any())


def test_list_functions_refuse_a_single_tensor() -> None:
    """Review: a tensor passed for a list was iterated into its rows: `project_out_list(g, b)`
    with g, b of shape [2, 4] projected each row off one scalar and returned zeros. Every list
    argument refuses one tensor, naming the function and itself, and writes nothing."""
    g, basis = torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    outs = [torch.full((2, 4), 7.0, dtype=F64)]
    grads, grad_outs = torch.randn(3, 5, dtype=F64), [torch.full((5,), 7.0, dtype=F64)]
    calls = [
        ("project_out_list", "g_list", lambda: project_out_list(g, [basis], outs=outs)),
        ("project_out_list", "basis_list", lambda: project_out_list([g], basis, outs=outs)),
        ("project_out_list", "outs", lambda: project_out_list([g], [basis], outs=outs[0])),
        ("project_nonconflicting_list", "g_list",
         lambda: project_nonconflicting_list(g, [basis], outs=outs)),
        ("project_nonconflicting_list", "r_list",
         lambda: project_nonconflicting_list([g], basis, outs=outs)),
        ("project_nonconflicting_list", "outs",
         lambda: project_nonconflicting_list([g], [basis], outs=outs[0])),
        ("aggregate_list", "grads_list", lambda: aggregate_list(UPGrad(), grads, grad_outs)),
        ("aggregate_list", "grads_list", lambda: aggregate_list(Mean(), grads, grad_outs)),
        ("aggregate_list", "outs", lambda: aggregate_list(Mean(), [grads], grad_outs[0])),
        ("gram_list_stats", "basis_list", lambda: gram_list_stats(basis)),
        ("inner_list_stats", "a_list", lambda: inner_list_stats(g, [basis])),
        ("inner_list_stats", "b_list", lambda: inner_list_stats([g], basis)),
    ]
    for function, name, call in calls:
        with pytest.raises(TypeError, match=rf"^mtunlearn_ext\.surgery\.{function}: `{name}` "
                                            r"must be a list of tensors \(one per parameter\), "
                                            r"got a torch\.Tensor of shape"):
            call()
    assert bool((outs[0] == 7.0).all()) and bool((grad_outs[0] == 7.0).all())


def test_project_out_list_names_itself_for_a_bad_ridge() -> None:
    """Review: an infinite ridge was refused by `mtunlearn_ext.ops.ridge_solve`, a function
    the caller never called (the surgery's own check let inf through)."""
    g, basis = _stacks(1, 90), _stacks(2, 91)
    for ridge in (math.inf, math.nan, -1.0, "1e-3"):
        with pytest.raises(ValueError, match=r"^mtunlearn_ext\.surgery\.project_out_list: "
                                             r"`ridge` must be a finite number >= 0, got "):
            project_out_list(g, basis, ridge=ridge)  # type: ignore[arg-type]


def test_aggregate_list_refuses_a_non_finite_beta_while_checking() -> None:
    """A NaN or infinite `beta` turned every output into NaN/Inf although check_finite was on;
    it is refused by name (one per parameter too) and nothing is written. check_finite=False
    lets it through."""
    grads = [torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)]
    for make in (Mean, UPGrad):
        for beta, name in ((math.nan, "beta"), (math.inf, "beta"), ([0.0, -math.inf], "beta[1]"),
                           ([1.0, math.nan], "beta[1]")):
            outs = [torch.full((3,), 7.0, dtype=F64), torch.full((4,), 7.0, dtype=F64)]
            with pytest.raises(ValueError, match=rf"^mtunlearn_ext\.surgery\.aggregate_list: "
                                                 rf"`{re.escape(name)}` must be a finite number"):
                aggregate_list(make(), grads, outs, beta)
            assert all(bool((o == 7.0).all()) for o in outs)
    outs = [torch.full((3,), 7.0, dtype=F64), torch.full((4,), 7.0, dtype=F64)]
    aggregate_list(Mean(), grads, outs, [1.0, math.nan], check_finite=False)
    assert bool(torch.isfinite(outs[0]).all()) and bool(outs[1].isnan().all())


def _bad_projection_calls() -> tuple[dict[str, tuple[str, object]], list[torch.Tensor]]:
    """(argument the error must name, call) per case: one thing wrong in each, all of them
    found by the ops' C++ checks first and then named by the surgery layer's own checks; and the
    outputs (filled with 7) that the calls are given."""
    g, basis = _stacks(1, 80), _stacks(3, 81)
    outs = [torch.full_like(x, 7.0) for x in g]

    def with_item(stacks: list[torch.Tensor], p: int, value: object) -> list[object]:
        changed: list[object] = list(stacks)
        changed[p] = value
        return changed

    cases: dict[str, tuple[str, object]] = {}
    for name, fn in (("out", project_out_list), ("nonconflicting", project_nonconflicting_list)):
        b_name = "basis_list" if name == "out" else "r_list"
        cases |= {
            f"{name}: g not a tensor": ("g_list[2]", lambda fn=fn: fn(with_item(g, 2, 1.0), basis,
                                                                      outs=outs)),
            f"{name}: basis not a tensor": (f"{b_name}[1]", lambda fn=fn: fn(
                g, with_item(basis, 1, "x"), outs=outs)),
            f"{name}: basis 0-d": (f"{b_name}[3]", lambda fn=fn: fn(
                g, with_item(basis, 3, torch.tensor(1.0, dtype=F64)), outs=outs)),
            f"{name}: m differs": ("g_list[1]", lambda fn=fn: fn(
                with_item(g, 1, torch.zeros(2, 7, dtype=F64)), basis, outs=outs)),
            f"{name}: k differs": (f"{b_name}[2]", lambda fn=fn: fn(
                g, with_item(basis, 2, torch.zeros(2, 2, 1, 3, dtype=F64)), outs=outs)),
            f"{name}: parameter shape": ("g_list[1]", lambda fn=fn: fn(
                g, with_item(basis, 1, torch.zeros(3, 8, dtype=F64)), outs=outs)),
            f"{name}: dtype": ("g_list[0]", lambda fn=fn: fn(
                with_item(g, 0, g[0].float()), basis, outs=with_item(outs, 0, outs[0].float()))),
            f"{name}: out shape": ("outs[3]", lambda fn=fn: fn(
                g, basis, outs=with_item(outs, 3, torch.zeros(1, 6, dtype=F64)))),
            f"{name}: out dtype": ("outs[0]", lambda fn=fn: fn(
                g, basis, outs=with_item(outs, 0, outs[0].float()))),
            f"{name}: out strided": ("outs[0]", lambda fn=fn: fn(
                g, basis, outs=with_item(outs, 0, torch.zeros(1, 4, 3, dtype=F64).transpose(1, 2)))),
            f"{name}: out not a tensor": ("outs[2]", lambda fn=fn: fn(
                g, basis, outs=with_item(outs, 2, None))),
        }
    grads = _stacks(3, 82)
    grads_outs = [torch.full(x.shape[1:], 7.0, dtype=F64) for x in grads]
    cases |= {
        "aggregate: k differs": ("grads_list[2]", lambda: aggregate_list(
            UPGrad(), with_item(grads, 2, torch.zeros(2, 2, 1, 3, dtype=F64)), grads_outs)),
        "aggregate: not a tensor": ("grads_list[0]", lambda: aggregate_list(
            UPGrad(), with_item(grads, 0, [1.0]), grads_outs)),
        "aggregate: out shape": ("outs[1]", lambda: aggregate_list(
            UPGrad(), grads, with_item(grads_outs, 1, torch.zeros(6, dtype=F64)))),
        "aggregate: mean, k differs": ("grads_list[3]", lambda: aggregate_list(
            Mean(), with_item(grads, 3, torch.zeros(4, 5, dtype=F64)), grads_outs)),
    }
    return cases, outs + grads_outs


@pytest.mark.parametrize("case", sorted(_bad_projection_calls()[0]))
def test_bad_lists_are_named_and_write_nothing(case: str) -> None:
    """The per-tensor checks of the list projections run only after an op has refused the
    arguments (they cost more than the step on a model's parameter list): every such refusal
    must still name the wrong argument, and no output may have been written."""
    cases, outputs = _bad_projection_calls()
    argument, call = cases[case]
    with pytest.raises((TypeError, ValueError)) as error:
        call()  # type: ignore[operator]
    message = str(error.value)
    assert message.startswith("mtunlearn_ext."), message
    assert argument in message, message
    assert all(bool((o == 7.0).all()) for o in outputs)


def test_mixed_dtype_lists_write_nothing_when_an_output_is_wrong() -> None:
    """A list of two dtypes is combined in two calls; a wrong output in the second group was
    refused after the first group had been written, and named by its place in its group."""
    bf = torch.bfloat16
    grads = [torch.randn(3, 4), torch.randn(3, 5).to(bf), torch.randn(3, 6)]
    for bad in (1, 2):
        outs = [torch.full((4,), 7.0), torch.full((5,), 7.0, dtype=bf), torch.full((6,), 7.0)]
        outs[bad] = torch.full((7,), 7.0, dtype=outs[bad].dtype)
        shape = tuple(grads[bad].shape[1:])
        with pytest.raises(ValueError, match=re.escape(f"outs[{bad}] must have shape {shape}")):
            aggregate_list(UPGrad(), grads, outs)
        assert all(bool((o == 7).all()) for o in outs)
    outs = [torch.zeros(4), torch.zeros(5, dtype=bf), torch.zeros(6, dtype=bf)]
    with pytest.raises(TypeError, match=r"^mtunlearn_ext.surgery.aggregate_list: `outs\[2\]` has "
                                        r"dtype torch.bfloat16 but `grads_list\[0\]` has "
                                        r"torch.float32"):
        aggregate_list(UPGrad(), grads, outs)


def test_mixed_dtype_lists_name_a_non_finite_tensor_by_its_place_in_the_list() -> None:
    """The Gram pass runs once per dtype class; its NaN error named the tensor by its place in
    its class (`xs[1]` for the third tensor), and by the op's name for the list."""
    grads = [torch.randn(3, 4), torch.randn(3, 5).to(torch.bfloat16), torch.randn(3, 6)]
    grads[2][1, 0] = float("nan")
    outs = [torch.zeros(4), torch.zeros(5, dtype=torch.bfloat16), torch.zeros(6)]
    with pytest.raises(FloatingPointError, match=r"^mtunlearn_ext.surgery.aggregate_list: "
                                                 r"`grads_list\[2\]` contains NaN or Inf"):
        aggregate_list(UPGrad(), grads, outs)


def test_errors_of_the_list_ops_name_the_callers_arguments() -> None:
    """The surgery functions call the ops' list passes on their own arguments; an error of such
    a pass named the op and its argument (`mtunlearn_ext.ops.gram_list: `xs[2]``), not the
    function the user called and the list the user passed."""
    def stacks(rows: int, bad: int | None = None) -> list[torch.Tensor]:
        out = [torch.randn(rows, 3), torch.randn(rows, 2, 2), torch.randn(rows, 5)]
        if bad is not None:
            out[bad][0, 0] = float("inf")
        return out

    cases = [
        (lambda: aggregate_list(UPGrad(), stacks(2, bad=1), [torch.zeros(3), torch.zeros(2, 2),
                                                              torch.zeros(5)]),
         "aggregate_list", "grads_list[1]"),
        (lambda: project_out_list(stacks(1, bad=2), stacks(2)), "project_out_list", "g_list[2]"),
        (lambda: project_out_list(stacks(1), stacks(2, bad=0)), "project_out_list",
         "basis_list[0]"),
        (lambda: project_nonconflicting_list(stacks(1), stacks(2, bad=2)),
         "project_nonconflicting_list", "r_list[2]"),
        (lambda: gram_list_stats(stacks(2, bad=1)), "gram_list_stats", "basis_list[1]"),
        (lambda: inner_list_stats(stacks(1), stacks(2, bad=2)), "inner_list_stats",
         "b_list[2]"),
    ]
    for call, function, tensor in cases:
        with pytest.raises(FloatingPointError) as caught:
            call()
        assert str(caught.value).startswith(f"mtunlearn_ext.surgery.{function}: `{tensor}` "
                                            "contains NaN or Inf"), str(caught.value)
    basis_gram = gram_list_stats(stacks(2))
    with pytest.raises(FloatingPointError, match=r"^mtunlearn_ext.surgery.project_out_list: "
                                                 r"`g_list\[1\]` contains NaN"):
        project_out_list(stacks(1, bad=1), stacks(2), basis_gram=basis_gram)


def test_list_surgery_reads_stacks_that_require_grad_as_values() -> None:
    """They write in place and run under no_grad, as an optimizer step does: stacks that
    require grad were refused mid-call (after earlier dtype groups' outputs were written) once
    combine_list began refusing arguments that require grad while autograd records."""
    from mtunlearn_ext import surgery

    stacks = [torch.randn(2, 4), torch.randn(2, 3, dtype=torch.float64).requires_grad_()]
    outs = [torch.zeros(4), torch.zeros(3, dtype=torch.float64)]
    surgery.aggregate_list(surgery.Mean(), stacks, outs)
    for out, stack in zip(outs, stacks):
        torch.testing.assert_close(out, stack.detach().mean(0))
        assert not out.requires_grad
    projected = surgery.project_out_list([s[:1] for s in stacks], [s[1:] for s in stacks])
    assert not any(p.requires_grad for p in projected)


def test_a_sign_given_as_a_flag_is_refused() -> None:
    """Safety audit: sign=True (== 1) was taken as 1; a flag is not a sign."""
    g, r = [torch.randn(1, 5)], [torch.randn(2, 5)]
    for sign in (True, False, 0, 2, numpy.bool_(True), torch.tensor(True), torch.tensor([1]),
                 numpy.array([-1]), 1.5):
        with pytest.raises(ValueError, match=rf"`sign` must be 1 or -1, got {re.escape(repr(sign))}$"):
            project_nonconflicting_list(g, r, sign=sign)
    assert project_nonconflicting_list(g, r, sign=-1)[0].shape == (1, 5)
    for sign in (numpy.int64(-1), torch.tensor(1), -1.0, numpy.float64(1.0)):  # numbers are
        assert project_nonconflicting_list(g, r, sign=sign)[0].shape == (1, 5)


@pytest.mark.parametrize("project", [project_out_list, project_nonconflicting_list])
def test_a_non_finite_basis_gram_is_named(project) -> None:  # type: ignore[no-untyped-def]
    """Ops review: a NaN in a kept `basis_gram` was reported as "`coeffs` contains NaN or Inf",
    an argument neither function has."""
    g, basis = [torch.randn(2, 5)], [torch.randn(3, 5)]
    kept = gram_list_stats(basis)
    kept[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"^mtunlearn_ext.surgery.{project.__name__}: "
                                                 r"`basis_gram` contains NaN or Inf"):
        project(g, basis, basis_gram=kept)
    # Unchecked, it propagates as the other inputs do.
    assert not torch.isfinite(project(g, basis, basis_gram=kept, check_finite=False)[0]).all()


@pytest.mark.parametrize("per_layer, error", [
    ([0.9, 0.2, 1.7, 1.1], r"`per_layer` ids must be integers, got \[0.9, 0.2, 1.7, 1.1\]"),
    ([True, False, True, False], r"`per_layer` ids must be integers, got \[True, False"),
    (torch.tensor([False, False, True, True]), r"`per_layer` ids must be integers, got "
                                               r"\[tensor\(False\)"),
    (0, r"`per_layer` must be a bool or a sequence of layer ids \(one per tensor\), got int"),
    ("0011", r"`per_layer` must be a bool or a sequence of layer ids \(one per tensor\), got "
             r"str"),
])
def test_per_layer_ids_must_be_integers(per_layer: object, error: str) -> None:
    """Ops review: the list functions took `int()` of each id: [0.9, 0.2, 1.7, 1.1] ran as
    layers [0, 0, 1, 1], booleans and the string "0011" as ids; `per_layer=0` failed with
    "'int' object is not iterable". Integer ids of any kind still pass."""
    g = [torch.randn(2, 3) for _ in range(4)]
    basis = [torch.randn(3, 3) for _ in range(4)]
    with pytest.raises(TypeError, match=r"^mtunlearn_ext.surgery.project_out_list: " + error):
        project_out_list(g, basis, per_layer=per_layer)  # type: ignore[arg-type]
    expected = project_out_list(g, basis, per_layer=[0, 0, 1, 1])
    for ids in (numpy.array([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]), (0, 0, 1, 1)):
        for got, want in zip(project_out_list(g, basis, per_layer=ids), expected):  # type: ignore[arg-type]
            assert torch.equal(got, want)


@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("returned", ["none", "wrong shape"])
@pytest.mark.parametrize("call", ["project_out_list", "project_nonconflicting_list",
                                  "aggregate_list"])
def test_a_reduce_that_does_not_return_the_sum_is_named(call: str, returned: str,
                                                        check_finite: bool) -> None:
    """``reduce=lambda t: dist.all_reduce(t)`` sums in place and returns None: the result was
    read as the sum, an AttributeError on None that named no argument."""
    from mtunlearn_ext import surgery

    def reduce(t: torch.Tensor) -> torch.Tensor | None:
        return None if returned == "none" else t[:1]

    g = [torch.randn(2, 4, 3), torch.randn(2, 5)]
    basis = [torch.randn(3, 4, 3), torch.randn(3, 5)]
    with pytest.raises(TypeError, match=rf"^mtunlearn_ext\.surgery\.{call}: `reduce` must "
                                        r"return the summed statistics, a tensor of shape "
                                        r"\[\d+, \d+\] like its argument, got "
                                        + ("NoneType" if returned == "none" else "a tensor")):
        if call == "aggregate_list":
            outs = [torch.zeros(4, 3), torch.zeros(5)]
            surgery.aggregate_list(surgery.UPGrad(), basis, outs, check_finite=check_finite,
                                   reduce=reduce)  # type: ignore[arg-type]
        else:
            getattr(surgery, call)(g, basis, reduce=reduce, check_finite=check_finite)


def test_none_for_a_required_tensor_list_is_named() -> None:
    """``combine_list(coeffs, xs, None)`` failed as "'NoneType' object is not iterable",
    naming no argument (a tensor in its place was named)."""
    from mtunlearn_ext import ops
    from mtunlearn_ext.surgery import aggregate_list, gram_list_stats, inner_list_stats
    g, basis = torch.randn(2, 5), torch.randn(3, 5)
    calls = [
        ("ops.combine_list", "outs", lambda: ops.combine_list(torch.randn(3), [basis], None)),
        ("ops.combine_list", "xs", lambda: ops.combine_list(torch.randn(3), None, [g[0]])),
        ("ops.gram_list", "xs", lambda: ops.gram_list(None)),
        ("ops.inner_list", "bs", lambda: ops.inner_list([g], None)),
        ("surgery.project_out_list", "basis_list", lambda: project_out_list([g], None)),
        ("surgery.project_nonconflicting_list", "g_list",
         lambda: project_nonconflicting_list(None, [basis])),
        ("surgery.aggregate_list", "grads_list", lambda: aggregate_list(UPGrad(), None, [g[0]])),
        ("surgery.gram_list_stats", "basis_list", lambda: gram_list_stats(None)),
        ("surgery.inner_list_stats", "a_list", lambda: inner_list_stats(None, [basis])),
    ]
    for function, name, call in calls:
        with pytest.raises(TypeError, match=rf"^mtunlearn_ext\.{re.escape(function)}: `{name}` "
                                            r"must be a list of tensors \(one per parameter\), "
                                            r"got None$"):
            call()


def _conflict_free_textbook(g: torch.Tensor, r: torch.Tensor, sign: int) -> torch.Tensor:
    """Rows of ``g`` projected onto ``{d : sign <d, r_j> >= 0}`` in float64 (the same dual on
    the float64 Gram, whose solver the float64 references of test_solver_references check)."""
    from mtunlearn_ext import ops
    return ops.project_nonconflicting(g, r, sign)


def _tiny_problem(g_scale: float, basis_scale: float, row_scales: tuple[float, ...] = (1, 1, 1)
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Float32 stacks of g (2 rows, leaning on the basis) and a 3-row basis, scaled."""
    g, basis = _stacks(2, 40), _stacks(3, 41)
    for gs, bs in zip(g, basis):
        gs -= 0.5 * bs[0] + 0.3 * bs[2]
        for j, row_scale in enumerate(row_scales):
            bs[j] *= row_scale
    return ([(x * g_scale).to(torch.float32) for x in g],
            [(x * basis_scale).to(torch.float32) for x in basis])


# (g, basis) scales: both tiny (the documented case: at 1e-25 the output came back
# unprojected), only g, only the basis, and g beyond float32's squared range with a normal
# basis; the last two rows of products would be subnormal or zero in float32.
TINY_SCALES = [(1e-30, 1e-30), (1e-22, 1e-22), (1e-30, 1.0), (1.0, 1e-30), (1e-36, 1.0)]


@pytest.mark.parametrize("g_scale, basis_scale", TINY_SCALES)
@pytest.mark.parametrize("per_layer", [False, [0, 1, 0, 1]], ids=["global", "per_layer"])
@pytest.mark.parametrize("check_finite", [True, False])
@pytest.mark.parametrize("ridge", [1e-6, 0.0])
def test_project_out_list_keeps_the_projection_of_tiny_float32_inputs(
        g_scale: float, basis_scale: float, per_layer: bool | list[int], check_finite: bool,
        ridge: float) -> None:
    """Review: the Gram kernels multiply in float32, so inputs whose products fall below
    float32's normal range lost the projection (both scaled by 1e-30: 0.48 relative error; at
    1e-25 the output came back unprojected). The rows that underflowed are now recomputed
    from power-of-two scaled copies (as the aggregators do), the problem is solved scaled
    into float32's range and the coefficients scaled back: the float64 projection of the
    same float32 values, coefficients included."""
    g, basis = _tiny_problem(g_scale, basis_scale)
    outs, coeffs = project_out_list(g, basis, ridge, per_layer=per_layer,
                                    check_finite=check_finite, return_coeffs=True)
    assert coeffs.dtype == torch.float32
    groups = [[0, 1, 2, 3]] if per_layer is False else [[0, 2], [1, 3]]
    for layer, members in enumerate(groups):
        g64 = _flat([g[p] for p in members])
        basis64 = _flat([basis[p] for p in members])
        expected = _project_out_textbook(g64, basis64, ridge)
        got = _flat([outs[p] for p in members])
        assert float((got - expected).norm() / expected.norm()) < 1e-6
        expected_coeffs = torch.linalg.lstsq(basis64.T, (g64 - expected).T).solution.T
        got_coeffs = (coeffs if per_layer is False else coeffs[layer]).to(F64)
        assert float((got_coeffs - expected_coeffs).norm() / expected_coeffs.norm()) < 1e-5
        if ridge == 0:  # else the ridge leaves ~1e-7 of the basis' directions
            assert float((basis64 @ got.T).abs().max()) < 1e-6 * float(
                basis64.norm(dim=1).max() * got.norm(dim=1).max())


@pytest.mark.parametrize("g_scale, basis_scale", TINY_SCALES)
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("per_layer", [False, [0, 1, 0, 1]], ids=["global", "per_layer"])
def test_project_nonconflicting_list_keeps_tiny_float32_constraints(
        g_scale: float, basis_scale: float, sign: int, per_layer: bool | list[int]) -> None:
    """The same review for the nonconflicting projection (1e-30: 1.4e-2 relative error, the
    constraints of the lost rows dropped): now the float64 projection of the float32 values,
    conflicting with no row."""
    g, r = _tiny_problem(g_scale, basis_scale)
    outs = project_nonconflicting_list(g, r, sign, per_layer=per_layer)
    groups = [[0, 1, 2, 3]] if per_layer is False else [[0, 2], [1, 3]]
    for members in groups:
        g64, r64 = _flat([g[p] for p in members]), _flat([r[p] for p in members])
        expected = _conflict_free_textbook(g64, r64, sign)
        got = _flat([outs[p] for p in members])
        assert float((got - expected).norm() / expected.norm()) < 1e-6
        cosines = sign * (got @ r64.T) / (got.norm(dim=1)[:, None] * r64.norm(dim=1))
        assert float(cosines.min()) > -1e-6


def test_a_basis_row_below_floats_squared_range_beside_normal_ones_is_kept() -> None:
    """One basis row 1e-30 times the others (its squared norm beyond float32 beside theirs):
    without a ridge the span, and in the nonconflicting projection the cone, do not depend on
    the rows' norms, so each row is scaled on its own and that row's direction is projected
    out / its constraint kept, as in float64 (the float32 Gram lost it: 6.6e-2 relative error
    without a ridge). With the relative ridge, which the tiny row cannot outweigh, the
    float64 answer leaves its direction and so does this."""
    g, basis = _tiny_problem(1.0, 1.0, row_scales=(1.0, 1.0, 1e-30))
    g64, basis64 = _flat(g), _flat(basis)
    for ridge in (0.0, 1e-6):
        got = _flat(project_out_list(g, basis, ridge))
        if ridge:
            expected = _project_out_textbook(g64, basis64, ridge)
        else:  # the span from normalised rows (a pseudo-inverse's cut-off drops the tiny one)
            q = torch.linalg.qr((basis64 / basis64.norm(dim=1, keepdim=True)).T).Q
            expected = g64 - (g64 @ q) @ q.T
        assert float((got - expected).norm() / expected.norm()) < 1e-6
    for sign in (1, -1):
        got = _flat(project_nonconflicting_list(g, basis, sign))
        expected = _conflict_free_textbook(g64, basis64, sign)
        assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_normal_range_projections_take_no_rescue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rescue costs nothing where it is not needed: float32 inputs down to norm 1e-8, a
    zero row of g beside normal ones, and float64 inputs at 1e-30 never reach the
    recomputation."""
    from mtunlearn_ext.surgery import _tensor_lists

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr(_tensor_lists, "_rescaled_rows", refused)
    for scale in (1.0, 1e-8):
        g, basis = _tiny_problem(scale, scale)
        for x in g:
            x[1] = 0.0
        project_out_list(g, basis)
        project_nonconflicting_list(g, basis)
    g64, basis64 = _stacks(2, 42), _stacks(3, 43)
    project_out_list([x * 1e-30 for x in g64], [x * 1e-30 for x in basis64])
