"""Progress of long calls (mtunlearn_ext._progress): the demo's stage bar moved only when a
whole stage ended, its first minutes four trainings at 0/6. Training steps, unlearning steps and
the experiment's models report fractions; nested work maps onto its caller's slice."""

from __future__ import annotations

import pytest

from mtunlearn_ext import _progress
from mtunlearn_ext.data import ForgetRequest, load_benchmark
from mtunlearn_ext.demo import _StageProgress
from mtunlearn_ext.models import build_model
from mtunlearn_ext.training import TrainConfig, train
from mtunlearn_ext.unlearning import UnlearningProblem, get_unlearner


def test_nested_work_reports_within_its_callers_slice():
    seen: list[float] = []
    _progress.report(0.5)  # no callback installed: nothing happens, nothing raises
    with _progress.reporting_to(seen.append):
        _progress.report(-1.0)  # clamped
        with _progress.within(0.5, 1.0):
            with _progress.within(0.0, 0.5):
                _progress.report(0.5)
                _progress.report(2.0)  # clamped
            # the inner block reported its end (0.5 of this one) when it finished
            _progress.report(0.75)
    assert seen == pytest.approx([0.0, 0.625, 0.75, 0.75, 0.875, 1.0])
    with pytest.raises(RuntimeError), _progress.reporting_to(seen.append):
        with _progress.within(0.0, 0.5):
            raise RuntimeError  # a failed block does not claim its end
    assert seen[-1] == 1.0 and len(seen) == 6
    _progress.report(0.1)  # the callback is gone with its block
    assert len(seen) == 6


def test_training_and_unlearning_report_each_step_up_to_one():
    bench = load_benchmark("digits", size="tiny", seed=0)
    model = build_model(bench, seed=0)
    seen: list[float] = []
    with _progress.reporting_to(seen.append):
        result = train(model, bench.train, None,
                       TrainConfig(epochs=2, batch_size=64, seed=0, num_threads=1))
    assert len(seen) == result.steps > 2
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert seen[0] == pytest.approx(1 / result.steps)

    request = ForgetRequest.create(bench.train.ids[:20], None)
    problem = UnlearningProblem.from_request(model, bench.train, request, seed=0)
    seen.clear()
    with _progress.reporting_to(seen.append), _progress.within(0.5, 1.0):
        get_unlearner("neggrad_plus", {"steps": 4}).unlearn(problem)
    assert seen == pytest.approx([0.625, 0.75, 0.875, 1.0, 1.0])  # 4 steps, the block's end


class _Bar:
    def __init__(self) -> None:
        self.n: float = 0
        self.drawn: list[float] = []

    def refresh(self) -> None:
        self.drawn.append(self.n)


class _Messages:
    def __init__(self, *items: tuple[str, float]) -> None:
        self.items = list(items)

    def get_nowait(self) -> tuple[str, float]:
        import queue

        if not self.items:
            raise queue.Empty
        return self.items.pop(0)


def test_the_stage_bar_counts_running_stages_by_their_fraction():
    bar = _Bar()
    stages = _StageProgress(bar)
    stages.reported(_Messages(("original", 0.25), ("retrained (full)", 0.5)))
    assert bar.n == pytest.approx(0.8)  # 0.75, shown to one decimal
    stages.reported(_Messages(("original", 0.1)))  # late, out of order: never backwards
    assert bar.drawn == [pytest.approx(0.8)]  # unchanged count: no redraw
    stages.reported(_Messages(("original", 1.0)))
    assert bar.n == pytest.approx(1.5)  # a running stage stays below its whole unit
    stages.finish("original")
    stages.reported(_Messages(("original", 0.3)))  # after its end: ignored
    assert bar.n == pytest.approx(1.5)
    stages.finish("retrained (full)")
    assert bar.n == 2 and isinstance(bar.n, int)  # "2/6", not "2.0/6"
