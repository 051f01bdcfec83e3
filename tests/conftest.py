"""Test configuration: the compiled extension is mandatory (no silent fallback), and every test
runs with PyTorch's deterministic mode, which fills each freshly allocated tensor (including the
outputs our ops allocate in C++) with NaN: an output element a kernel forgets to write shows."""

from __future__ import annotations

import os
import signal
from pathlib import Path

os.environ.setdefault("MTUNLEARN_REQUIRE_EXTENSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mtunlearn_ext  # noqa: E402

if os.environ["MTUNLEARN_REQUIRE_EXTENSION"] not in ("", "0"):
    assert mtunlearn_ext.has_extension(), "the compiled extension must be built for the tests"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "end_to_end: runs our scripts or command line whole (demo, benchmarks, "
        "reports, CLI files and printing); scripts/test_matrix.sh's legs leave these out "
        "unless MTUNLEARN_MATRIX_ALL=1, the main suite runs them")


@pytest.fixture
def poisoned_outputs():  # type: ignore[no-untyped-def]
    """Deterministic mode + NaN-filled uninitialised memory for the duration of a test."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _restore_thread_count():  # type: ignore[no-untyped-def]
    """Every test leaves torch's intra-op thread count as it found it. Code under test sets it
    (``mtunlearn ... --threads 1``, ``ExperimentConfig.threads``); leaked into the later modules,
    a single-threaded run hid thread-count dependence from the determinism tests and never ran
    the kernels' multi-chunk ``at::parallel_for`` paths."""
    previous = torch.get_num_threads()
    yield
    if torch.get_num_threads() != previous:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _signal_handlers_put_back():  # type: ignore[no-untyped-def]
    """Every test leaves the SIGINT / SIGTERM handlers as it found them, or fails. A handler
    left changed (an interrupt hold's note-taker, say) would silently swallow the interrupts of
    every later test in the process, and the test that failed would be far from the cause.
    They are put back either way, so the one test at fault is the one that fails."""
    signals = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.getsignal(signum) for signum in signals}
    yield
    changed = {signal.Signals(s).name: h for s in signals
               if (h := signal.getsignal(s)) is not before[s]}
    if changed:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        pytest.fail(f"the test left signal handlers changed: {changed} (they were "
                    f"{ {signal.Signals(s).name: h for s, h in before.items()} })")


@pytest.fixture(scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    """One intra-op thread for a module of tiny-model tests: on a shared 2-core machine
    OpenMP's spin-waiting threads make them up to 10x slower than one thread (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def indoor_tiny():  # type: ignore[no-untyped-def]
    """The ``indoor`` benchmark at size ``tiny`` (seed 0)."""
    from mtunlearn_ext.data import load_benchmark

    return load_benchmark("indoor", size="tiny", seed=0)


@pytest.fixture(scope="session")
def indoor_tiny_model(indoor_tiny):  # type: ignore[no-untyped-def]
    """A model trained 4 epochs on ``indoor_tiny`` (one thread; shared by every test that only
    reads it: unlearning methods work on a copy)."""
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.training import TrainConfig, train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(indoor_tiny, seed=0)
        train(model, indoor_tiny.train, None,
              TrainConfig(epochs=4, batch_size=16, lr=3e-3, seed=0), progress=False)
    finally:
        torch.set_num_threads(previous)
    return model.eval()


@pytest.fixture(scope="session")
def digits_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mtunlearn train`` of digits/tiny (3 epochs, seed 0, one thread), run once per session.
    Nine CLI modules each trained this same command for their ``trained`` checkpoint; they now
    get byte-identical copies of this one (test_cli.trained), in a folder of their own."""
    from mtunlearn_ext import cli

    checkpoint = tmp_path_factory.mktemp("cli-trained-once") / "orig.pt"
    assert cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--epochs", "3",
                     "--output", str(checkpoint), "--quiet", "--threads", "1"]) == 0
    return checkpoint


@pytest.fixture(params=["compiled", "reference"])
def op_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each op through the compiled kernels, and through the pure-PyTorch references that
    ``import mtunlearn_ext`` falls back to without a built extension (the same contract)."""
    if request.param == "reference":
        import importlib

        # By module path: `mtunlearn_ext.ops.combine` and `.gram` are also the ops' names.
        for name in ("_checks", "combine", "gram", "projections", "solvers"):
            module = importlib.import_module(f"mtunlearn_ext.ops.{name}")
            monkeypatch.setattr(module, "has_extension", lambda: False)
    return str(request.param)


@pytest.fixture
def registries_restored():  # type: ignore[no-untyped-def]
    """The method, forgetting-objective and benchmark registries as they were before the test
    (their public names are read-only views; the dicts behind them are restored)."""
    from mtunlearn_ext.data import registry as benchmarks
    from mtunlearn_ext.unlearning import objectives, registry as methods

    saved = [(d, dict(d)) for d in (methods._unlearners, objectives._forget_objectives,
                                    benchmarks._REGISTERED)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)
