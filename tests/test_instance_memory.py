"""Per-sample gradients remembered across steps (``instance_memory`` of the interference-aware
unlearner): the ring buffer's contents, and a step that respects every remembered row."""

from __future__ import annotations

import warnings

import pytest
import torch

from mtunlearn_ext import ops
from mtunlearn_ext.data import ForgetRequest
from mtunlearn_ext.unlearning import UnlearningProblem, get_unlearner
from mtunlearn_ext.unlearning.instance_memory import PerSampleMemory
from mtunlearn_ext.unlearning.interference_aware import InterferenceAware, InterferenceAwareConfig

from unlearning_helpers import step_context

warnings.filterwarnings("ignore", category=RuntimeWarning)

NAMES = ("a", "b")


def _stacks(rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, 2, generator=g), torch.randn(rows, 5, generator=g)]


def _rows_as_set(stacks: list[torch.Tensor]) -> set[tuple[float, ...]]:
    flat = torch.cat([s.reshape(s.shape[0], -1) for s in stacks], dim=1)
    return {tuple(round(v, 6) for v in row.tolist()) for row in flat}


def test_no_memory_returns_the_step_rows_themselves() -> None:
    memory = PerSampleMemory(0)
    stacks = _stacks(4, 0)
    out = memory.add(NAMES, stacks)
    assert all(o is s for o, s in zip(out, stacks))
    assert memory.filled == 0


def test_ring_keeps_the_current_and_last_steps_rows() -> None:
    memory = PerSampleMemory(2)
    batches = [_stacks(3, seed) for seed in range(5)]
    for step, stacks in enumerate(batches):
        out = memory.add(NAMES, stacks)
        kept = batches[max(0, step - 2):step + 1]
        assert out[0].shape == (3 * len(kept), 3, 2) and out[1].shape == (3 * len(kept), 5)
        expected = set().union(*(_rows_as_set(b) for b in kept))
        assert _rows_as_set(out) == expected
    assert memory.capacity == 9 and memory.filled == 9


def test_ring_wraps_a_smaller_batch_across_its_end() -> None:
    memory = PerSampleMemory(1)
    first, second, third = _stacks(4, 0), _stacks(3, 1), _stacks(3, 2)
    memory.add(NAMES, first)
    out = memory.add(NAMES, second)  # rows 4..6 of 8
    assert out[0].shape[0] == 7
    out = memory.add(NAMES, third)  # rows 7, 0, 1: wraps
    assert out[0].shape[0] == 8
    assert _rows_as_set(third) <= _rows_as_set(out)
    assert _rows_as_set(second) <= _rows_as_set(out)
    # Two of the first batch's rows were overwritten, the other two are still there.
    assert len(_rows_as_set(first) & _rows_as_set(out)) == 2


def test_memory_keeps_the_newest_rows_not_the_last_steps() -> None:
    """The ring counts rows: ``(steps + 1) * B`` of them, ``B`` the first batch's rows. After a
    short batch (the last of a pass over the retain set) it keeps rows of more than ``steps``
    earlier steps, the oldest in part (its last rows). The docstring said "the current step and
    the last ``steps`` steps"; it now says this, with this example (behaviour unchanged: it
    decides every result)."""
    memory = PerSampleMemory(1, track_gram=True)
    origins = []
    for step, rows in enumerate([16, 16, 6, 16]):
        stacks = [torch.full((rows, 3, 2), float(step)), torch.arange(rows).float()[:, None]
                  .expand(rows, 5).clone()]
        stored = memory.add(NAMES, stacks)
        origins.append(sorted((int(a), int(b)) for a, b in zip(stored[0][:, 0, 0].tolist(),
                                                                stored[1][:, 0].tolist())))
    assert memory.capacity == 32
    # After the third add: its 6 rows, the 16 of the second, the last 10 of the first (rows
    # 6-15: its rows 0-5 were overwritten).
    assert origins[2] == ([(0, r) for r in range(6, 16)] + [(1, r) for r in range(16)]
                          + [(2, r) for r in range(6)])
    # After the fourth: its 16, the 6 of the third and the last 10 of the second, so rows of
    # two earlier steps with steps=1.
    assert origins[3] == ([(1, r) for r in range(6, 16)] + [(2, r) for r in range(6)]
                          + [(3, r) for r in range(16)])
    doc = PerSampleMemory.__doc__ or ""
    assert doc.splitlines()[0] == "The newest per-sample gradient rows, up to ``(steps + 1) * B`` of them."
    assert "16, 16, 6 and 16 rows" in doc and "last 10 of the first" in doc


def test_other_parameters_or_a_larger_batch_start_afresh() -> None:
    memory = PerSampleMemory(2)
    memory.add(NAMES, _stacks(3, 0))
    memory.add(NAMES, _stacks(3, 1))
    fresh = _stacks(3, 2)
    out = memory.add(("a", "c"), fresh)
    assert _rows_as_set(out) == _rows_as_set(fresh)
    larger = _stacks(5, 3)
    out = memory.add(("a", "c"), larger)
    assert _rows_as_set(out) == _rows_as_set(larger) and memory.capacity == 15


def test_an_add_of_no_rows_stores_nothing() -> None:
    """Review: a first add of no rows (an empty batch) sized a ring of 0 rows and failed with
    ZeroDivisionError; it now stores nothing, and the next add with rows sizes the ring."""
    for track_gram in (False, True):
        memory = PerSampleMemory(1, track_gram=track_gram)
        out = memory.add(NAMES, _stacks(0, 0))
        assert [tuple(o.shape) for o in out] == [(0, 3, 2), (0, 5)] and memory.filled == 0
        first = _stacks(3, 1)
        assert _rows_as_set(memory.add(NAMES, first)) == _rows_as_set(first)
        assert memory.capacity == 6
        # Once sized, an add of no rows returns the stored rows.
        out = memory.add(NAMES, _stacks(0, 2))
        assert _rows_as_set(out) == _rows_as_set(first) and memory.filled == 3
        if track_gram:
            torch.testing.assert_close(memory.gram(), ops.gram_list(out))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="`steps` must be >= 0"):
        PerSampleMemory(-1)
    memory = PerSampleMemory(1)
    with pytest.raises(ValueError, match="one stack per name"):
        memory.add(NAMES, _stacks(3, 0)[:1])
    with pytest.raises(ValueError, match="same number of rows"):
        memory.add(NAMES, [torch.zeros(3, 2), torch.zeros(4, 2)])


def test_config_bounds_the_remembered_constraints() -> None:
    with pytest.raises(ValueError, match="`instance_memory`"):
        get_unlearner("interference_aware", {"instance_memory": -1})
    with pytest.raises(ValueError, match="`instance_memory`"):
        get_unlearner("interference_aware", {"instance_memory": 7, "num_per_sample": 32,
                                             "num_coupled_per_sample": 8})
    assert get_unlearner("interference_aware", {"instance_memory": 3, "num_per_sample": 32,
                                                "num_coupled_per_sample": 0}
                         ).config.instance_memory == 3


@pytest.mark.parametrize("mode", ["orthogonal", "nonconflicting"])
def test_step_respects_every_remembered_instance(indoor_tiny, indoor_tiny_model, one_thread,  # type: ignore[no-untyped-def]
                                                 mode: str) -> None:
    bench = indoor_tiny
    ids = bench.train.ids[:8]
    problem = UnlearningProblem.from_request(indoor_tiny_model, bench.train,
                                             ForgetRequest.create(ids), seed=0)
    method = InterferenceAware(InterferenceAwareConfig(
        steps=3, lr=1e-3, forget_batch_size=6, retain_batch_size=6, num_per_sample=6,
        instance_memory=2, instance_projection=mode, task_projection=False, ridge=1e-8))
    ctx = step_context(problem, method)
    groups = ctx.groups
    memory: PerSampleMemory = ctx.state["instance_memory"]
    names = list(groups.all_names)
    forget = problem.forget.batch(torch.arange(6))
    out = ctx.forward(forget)
    terms = method.forget_step_terms(ctx, forget)
    total = terms.total()
    assert total is not None
    step_dir = [-g for g in torch.autograd.grad(total, groups.all_params, allow_unused=True)]
    del out
    remembered: list[list[torch.Tensor]] = []
    d: list[torch.Tensor] = []
    for step in range(3):
        batch = problem.retain.batch(torch.arange(6 * step, 6 * step + 6))
        d, rows = method.instance_project(ctx, [s.clone() for s in step_dir], names, batch,
                                          memory=memory)
        remembered.append([r.clone() for r in rows])
        assert memory.filled == 6 * (step + 1)
    d_norm = sum(float((x.double() ** 2).sum()) for x in d) ** 0.5
    assert d_norm > 0
    for rows in remembered:  # the first two batches' rows as well as the last one's
        inner = sum((r.reshape(r.shape[0], -1).double() @ x.reshape(-1).double())
                    for r, x in zip(rows, d))
        norms = sum((r.reshape(r.shape[0], -1).double() ** 2).sum(1) for r in rows) ** 0.5
        cosine = inner / (norms * d_norm)
        assert float(cosine.max()) <= 1e-4
        if mode == "orthogonal":
            assert float(cosine.abs().max()) <= 1e-4


def test_a_run_with_memory_reports_the_constraint_count(indoor_tiny, indoor_tiny_model,  # type: ignore[no-untyped-def]
                                                       one_thread) -> None:
    bench = indoor_tiny
    problem = UnlearningProblem.from_request(indoor_tiny_model, bench.train,
                                             ForgetRequest.create(bench.train.ids[:8]), seed=0)
    method = get_unlearner("interference_aware", {
        "steps": 4, "lr": 1e-3, "forget_batch_size": 6, "retain_batch_size": 6,
        "num_per_sample": 6, "instance_memory": 1, "task_projection": False})
    report = method.unlearn(problem).report
    assert report.curves["instance_constraints"] == [6.0, 12.0, 12.0, 12.0]


def test_tracked_gram_matches_a_fresh_one_across_wraps() -> None:
    memory = PerSampleMemory(2, track_gram=True)
    for seed, rows in enumerate([4, 4, 3, 4, 2, 4, 4]):
        stored = memory.add(NAMES, [s.double() for s in _stacks(rows, seed)])
        torch.testing.assert_close(memory.gram(), ops.gram_list(stored))
    with pytest.raises(RuntimeError, match="track_gram"):
        PerSampleMemory(2).gram()


def test_a_larger_batch_resizes_the_ring_and_its_gram() -> None:
    """Mutation review: a later batch with more rows re-sizes the ring; the kept Gram matrix
    must be re-sized with it (it stayed at the old capacity: a shape error)."""
    memory = PerSampleMemory(1, track_gram=True)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 3, 3):
        stored = memory.add(["w"], [torch.randn(rows, 5, generator=generator)])
        flat = stored[0].double()
        torch.testing.assert_close(memory.gram().double(), flat @ flat.T, rtol=1e-6, atol=1e-6)
    assert memory.capacity == 6 and memory.filled == 6


def test_rows_of_another_dtype_start_the_memory_afresh() -> None:
    """As documented: float64 rows after float32 ones are not cast into the old buffers and
    mixed with the old rows."""
    memory = PerSampleMemory(1)
    memory.add(["w"], [torch.randn(2, 5)])
    stored = memory.add(["w"], [torch.randn(2, 5, dtype=torch.float64)])
    assert stored[0].dtype == torch.float64 and memory.filled == 2
