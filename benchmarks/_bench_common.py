"""Shared helpers of the benchmark scripts: interleaved timing, the memory floor, peak memory,
realistic parameter shapes, task-gradient generators, the LibMTL-style PCGrad loop, tables.

Timing rules (the machine is shared, timings are noisy): every contender of a case, the floor
candidates included, runs in the same process on the same tensors, interleaved (one sample of
each in turn, the order rotated every round, so that a burst of load from a neighbour hits all
of them alike); every timed contender of a case gets the same number of samples in the same
rounds (the floor candidates at least as many; see :func:`measure`); each reports its best and
median sample, and the tables say which statistic a ratio uses.

Agreement: before timing, :func:`check_agreement` runs every baseline and the op it is paired
with once and raises :class:`Disagreement` when their results differ by more than a stated
relative tolerance, so that a table never times two different quantities against each other.

The memory floor of a case is the time to read its inputs once: the fastest of a few plain
reductions over the very same tensors (each reads every byte once and writes ``O(k)`` bytes):

- ``sum(dim=-1, dtype=float32)``: vectorised and memory-bound for float32, but for bfloat16 on
  CPU torch converts element by element and is compute-bound (about 10x slower than a read);
- ``view(int).amax(dim=-1)``: the bits reinterpreted as integers of the same width (int16 for
  16-bit floats, int32 / int64 otherwise), an integer max that vectorises at any width and has
  no NaN handling: the cheapest honest read for 16-bit dtypes;
- ``sum()`` and ``amax()`` over the whole tensor (different parallel splits).

Taking the fastest of them keeps the floor a *read*, not the speed of one reduction kernel.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import hashlib
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts benchmark this checkout, not an installed copy
    sys.path.insert(0, str(ROOT))
# Timing the pure-PyTorch fallback would be meaningless: a missing extension is an error here.
os.environ.setdefault("MTUNLEARN_REQUIRE_EXTENSION", "1")

import torch  # noqa: E402

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
}
_INT_VIEW: dict[int, torch.dtype] = {2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- machine ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Where and on what the numbers were taken: load, threads, versions, extension build."""
    import mtunlearn_ext

    info: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "extension": mtunlearn_ext.has_extension(),
    }
    build = mtunlearn_ext.build_info()
    info["build"] = {key: build.get(key) for key in ("cuda", "openmp", "threads", "compiler",
                                                      "extension")}
    so = sorted((ROOT / "mtunlearn_ext").glob("_C*.so"))
    if so:
        data = so[0].read_bytes()
        info["extension_so"] = {
            "sha256": hashlib.sha256(data).hexdigest()[:16],
            "mtime": datetime.datetime.fromtimestamp(so[0].stat().st_mtime).isoformat(
                timespec="seconds"),
        }
    info["git"] = _git_state()
    try:
        from importlib.metadata import version

        info["torchjd"] = version("torchjd")
    except Exception:  # pragma: no cover - torchjd is a dev dependency
        info["torchjd"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:  # no git on the machine (a GPU machine gets the tree without it)
            return ""

    dirty = git("status", "--porcelain", "--", "csrc", "mtunlearn_ext/ops")
    return {"head": git("rev-parse", "--short", "HEAD"), "ops_or_csrc_modified": bool(dirty)}


# -- timing --------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One implementation of a case.

    Attributes:
        name: label in the tables.
        fn: the call to time (no arguments; its result is dropped).
        role: ``"floor"`` (a read-once candidate), ``"ours"`` or ``"baseline"``.
        vs: for a baseline, the name of our contender it is compared with.
        extra_bytes: estimate of the extra memory it allocates (skipped above the cap).
        est_s: estimate of one call in seconds, or ``None`` (skipped above the budget).
        note: shown in the tables (e.g. what the baseline computes).
        scale: factor applied to its times (a floor measured on a sample of the bytes).
        result: for the agreement check, a call returning the value to compare (a tensor or a
            list of tensors), when ``fn``'s return value is not it (``fn`` writes into buffers,
            or its task order must be aligned with the op it is compared with); default ``fn``.
        agree_tol: relative tolerance of a baseline's agreement check, when looser than
            :func:`default_tolerance` (say why in ``agree_note``).
        agree_note: why this pair agrees less closely (shown beside the difference).
    """

    name: str
    fn: Callable[[], object]
    role: str = "ours"
    vs: str | None = None
    extra_bytes: float = 0.0
    est_s: float | None = None
    note: str = ""
    scale: float = 1.0
    result: Callable[[], object] | None = None
    agree_tol: float | None = None
    agree_note: str = ""


def returning(buffers: object, fn: Callable[[], object]) -> Callable[[], object]:
    """A :attr:`Contender.result` for a call that writes into ``buffers``: run ``fn``, then
    return ``buffers`` for the agreement check."""
    def run() -> object:
        fn()
        return buffers
    return run


@dataclass
class Timing:
    """Samples of one contender (seconds per call)."""

    name: str
    role: str
    vs: str | None
    note: str
    samples: list[float] = field(default_factory=list)
    calls_per_sample: int = 1
    skipped: str | None = None
    error: str | None = None
    note_sampling: str = ""

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["best_s"] = self.best
        out["median_s"] = self.median
        return out


def _call_time(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def case_samples(costs: Sequence[float], repeats: int, budget_s: float, cheap_samples: int,
                 cheap_s: float) -> int:
    """Samples for sample costs ``costs`` (seconds): ``repeats``, or ``cheap_samples`` when even
    the slowest costs under ``cheap_s``; fewer (at least one) when the slowest one's samples
    would exceed ``budget_s``. (The floor candidates' own count; :func:`measure` decides the
    timed contenders' count as it measures.)"""
    finite = [c for c in costs if math.isfinite(c)]
    if not finite:
        return 0
    slowest = max(finite)
    target = max(repeats, cheap_samples) if slowest < cheap_s else repeats
    return max(1, min(target, int(budget_s / max(slowest, 1e-9))))


def measure(contenders: Sequence[Contender], repeats: int = 15, min_sample_s: float = 0.001,
            budget_s: float = 20.0, max_extra_bytes: float = math.inf,
            cheap_samples: int = 60, cheap_s: float = 0.05, slow_s: float = 1.0
            ) -> list[Timing]:
    """Time every contender, interleaved, in this process.

    Equal samples: every contender of the case whose role is ``"ours"`` or ``"baseline"`` gets
    the same number of samples, taken in the same rounds (one sample of each per round, the
    order rotated every round). On a noisy machine the best of more samples is lower, so a
    contender sampled more often than another would look faster for that reason alone (a
    reviewer measured an ``x faster`` inflated by ~19% when ours had 60 samples and the
    baseline 5). The count is decided for the whole case while it is measured: rounds go on to
    ``repeats``, or to ``cheap_samples`` when the slowest contender's mean sample so far is
    under ``cheap_s``, and stop earlier (at least one round) when one more round would take the
    slowest contender's time past ``budget_s``.

    Cost estimate: each contender is called once to warm up (a cold call: page faults, lazy
    initialisation, caches; never kept as a sample), then, when that call took under
    ``slow_s``, once or (under 0.1 s) twice more, timed: the least warm call is the estimate
    (one cold call says little about the next). Only calls shorter than ``min_sample_s`` are
    repeated inside a sample (timer resolution; ``calls_per_sample`` then says how many, and the
    sample is their mean: back-to-back calls find warmer caches than a single call between
    other contenders, so a ratio between contenders with different ``calls_per_sample`` can
    lean either way for calls under ``min_sample_s``); anything longer is timed call by call,
    because on a loaded machine a parallel region whose second thread is not scheduled stalls
    for a whole scheduler slice (~4-12 ms): single calls let the best sample show the op's own
    time.

    Floor candidates and references get a sample in each of those rounds and then more rounds
    of their own up to their own count (:func:`case_samples`: ``cheap_samples`` when their
    samples are cheap): a floor sampled less often would look slower and flatter the ops'
    ratios to it; sampled more often it can only make them look worse.

    Exceptions, flagged in :attr:`Timing.note_sampling`: a contender whose single call exceeds
    ``budget_s`` keeps its cold warm-up call as its only sample (and takes no part in the
    rounds). Contenders whose ``est_s`` exceeds the budget or whose ``extra_bytes`` exceed
    ``max_extra_bytes`` are skipped.
    """
    timings = [Timing(c.name, c.role, c.vs, c.note) for c in contenders]
    sample_cost: list[float] = []  # seconds per sample estimated from the warm calls
    gc.collect()
    for c, t in zip(contenders, timings):
        sample_cost.append(math.inf)
        if c.est_s is not None and c.est_s > budget_s:
            t.skipped = f"estimated {c.est_s:.0f} s per call > budget {budget_s:.0f} s"
            continue
        if c.extra_bytes > max_extra_bytes:
            t.skipped = (f"needs ~{c.extra_bytes / 2**30:.1f} GiB extra > cap "
                         f"{max_extra_bytes / 2**30:.1f} GiB")
            continue
        try:
            cold = _call_time(c.fn, 1)
            gc.collect()
            if cold > budget_s:
                t.samples.append(c.scale * cold)
                t.note_sampling = "1 cold call only (one call exceeds the budget)"
                continue
            if cold > slow_s:
                warm = cold
            else:  # the least of two warm calls (one alone can be a stall), one if slow
                warm = min(_call_time(c.fn, 1) for _ in range(2 if cold < 0.1 else 1))
        except Exception as exc:  # report, do not abort the whole table
            t.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        gc.collect()
        t.calls_per_sample = max(1, min(1000, math.ceil(min_sample_s / max(warm, 1e-7))))
        sample_cost[-1] = warm * t.calls_per_sample

    timed = [i for i, c in enumerate(contenders)
             if c.role in ("baseline", "ours") and math.isfinite(sample_cost[i])]
    others = [i for i, c in enumerate(contenders)
              if c.role not in ("baseline", "ours") and math.isfinite(sample_cost[i])]
    # Floor candidates and references: their own count (``cheap_samples`` when cheap), and at
    # least as many as the timed contenders (extended below once that count is known).
    own = {i: case_samples([sample_cost[i]], repeats, budget_s, cheap_samples, cheap_s)
           for i in others}
    spent = {i: 0.0 for i in timed}
    order = list(range(len(contenders)))
    gc_was_enabled = gc.isenabled()

    def sample(i: int) -> None:
        gc.disable()
        seconds = _call_time(contenders[i].fn, timings[i].calls_per_sample)
        gc.enable()
        timings[i].samples.append(contenders[i].scale * seconds)
        if i in spent:
            spent[i] += seconds * timings[i].calls_per_sample

    try:
        # Rounds of every timed contender (and the floors), until the case's count: `repeats`,
        # raised to `cheap_samples` once the slowest contender's mean sample is seen to be
        # under `cheap_s`, lowered when one more round would take the slowest contender past
        # `budget_s`. Measured as it goes, so one slow warm-up call cannot set the count.
        target, rounds = repeats, 0
        while timed:
            rotated = order[rounds % len(order):] + order[:rounds % len(order)]
            for i in rotated:
                if i in spent or i in own:
                    sample(i)
            gc.collect()
            rounds += 1
            slowest = max(spent[i] / rounds for i in timed)
            if rounds >= target:
                if target < cheap_samples and slowest < cheap_s:
                    target = cheap_samples
                else:
                    break
            if max(spent.values()) + slowest > budget_s:
                break
        # Floor candidates and references: the rest of their own count, in further rounds.
        for r in range(rounds, max([own[i] for i in others], default=0)):
            rotated = order[r % len(order):] + order[:r % len(order)]
            for i in rotated:
                if i in own and r < own[i]:
                    sample(i)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


# -- agreement -----------------------------------------------------------------------------------


class Disagreement(AssertionError):
    """A baseline's result differs from the op it is timed against by more than the tolerance."""


#: Relative rounding allowance per value of the row length for float32 / 16-bit products: the
#: baselines' ``torch.mm`` (MKL) accumulates long rows in float32 and loses accuracy with the
#: length. Its Gram of ``[8, n]`` task gradients against float64, measured here: 4.6e-5 at
#: n = 1e6, 1.4e-3 at 1e7, 7.3e-3 at 3e7, 2.8e-2 at 8e7 (ours: 2e-8, float64 tile sums).
ROUNDING_PER_VALUE = 1e-9


def default_tolerance(dtype: torch.dtype, row_length: int = 0) -> float:
    """Relative tolerance of an agreement check: 1e-3 for float32 / float64 results (the same
    quantity by different code: summation order, a ridge of 1e-6 against an exact solve), 3e-2
    for 16-bit inputs (every product's inputs and outputs rounded), plus, below float64,
    :data:`ROUNDING_PER_VALUE` per value of the row length (a float32 ``torch.mm`` over rows of
    ``1e7`` values is off by ~1e-3). Different quantities differ far more: PCGrad in other task
    orders 0.1-0.2, ``project_nonconflicting`` against TorchJD's UPGrad 0.7-2.2."""
    base = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    return base + (0.0 if dtype == torch.float64 else ROUNDING_PER_VALUE * row_length)


def _as_flat64(value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).to(torch.float64)
    if isinstance(value, (list, tuple)):
        return torch.cat([_as_flat64(v) for v in value])
    raise TypeError(f"cannot compare a {type(value).__name__}")


def relative_difference(actual: object, expected: object) -> float:
    """``||a - b|| / ||b||`` in float64 over every value (tensors or lists of tensors)."""
    a, b = _as_flat64(actual), _as_flat64(expected)
    if a.shape != b.shape:
        raise Disagreement(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    scale = b.norm().item()
    return (a - b).norm().item() / (scale if scale > 0 else 1.0)


def _result_of(c: Contender) -> object:
    value = (c.result or c.fn)()
    # Clone: a contender that writes into shared buffers must not see the next one's output.
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [v.detach().clone() for v in value]
    raise TypeError(f"{c.name}: its result is a {type(value).__name__}, not tensors; give the "
                    "contender a `result` call")


def check_agreement(contenders: Sequence[Contender], dtype: torch.dtype, row_length: int = 0
                    ) -> dict[str, dict[str, Any]]:
    """One call of every baseline and of the op it is paired with (``vs``): their relative
    difference (:func:`relative_difference`, the baseline as reference) against the pair's
    tolerance (its ``agree_tol`` or :func:`default_tolerance` of the dtype and ``row_length``,
    the values per task, whichever is larger). Returns
    ``{baseline: {"vs", "rel_diff", "tol", "note"}}``; raises
    :class:`Disagreement` naming every pair that differs by more than its tolerance. A pair
    whose side fails to run (an error the timing reports too) is recorded with
    ``rel_diff = nan`` and an ``error``."""
    by_name = {c.name: c for c in contenders}
    cache: dict[str, object] = {}
    out: dict[str, dict[str, Any]] = {}
    bad = []
    for c in contenders:
        if c.role != "baseline" or c.vs is None or c.vs not in by_name:
            continue
        tol = max(c.agree_tol or 0.0, default_tolerance(dtype, row_length))
        row: dict[str, Any] = {"vs": c.vs, "tol": tol, "note": c.agree_note}
        try:
            if c.vs not in cache:
                cache[c.vs] = _result_of(by_name[c.vs])
            row["rel_diff"] = relative_difference(cache[c.vs], _result_of(c))
        except Disagreement:
            raise
        except Exception as exc:  # the timing reports the error too
            row["rel_diff"] = math.nan
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        out[c.name] = row
        if "error" not in row and not row["rel_diff"] <= tol:  # NaN results disagree too
            bad.append(f"{c.name} vs {c.vs}: relative difference {row['rel_diff']:.2e} > "
                       f"tolerance {tol:.0e}")
    cache.clear()
    gc.collect()
    if bad:
        raise Disagreement("results disagree, so the timings would compare different "
                           "quantities: " + "; ".join(bad))
    return out


#: Largest flat buffer a list floor is measured on; above it the time is scaled by bytes (a read
#: of >= 1 GiB, 32x the L3 cache, is linear in its size).
FLAT_FLOOR_MAX_BYTES = 1 << 30


def floor_contenders(tensors: Sequence[torch.Tensor]) -> list[Contender]:
    """Read-once candidates over ``tensors`` (see the module docstring for the choice).

    For a list of several tensors, the per-tensor reductions pay one parallel region per tensor;
    on a loaded machine each can stall for a scheduler slice (~12 ms measured here, for ~50 of
    ResNet-50's 159 tensors: ten times the read itself), which says nothing about memory. So a
    list also gets the same reductions on one flat buffer holding the same number of bytes
    (up to :data:`FLAT_FLOOR_MAX_BYTES`, the time scaled to the full size beyond), and the floor
    is the fastest of all.
    """
    tensors = list(tensors)
    int_dtype = _INT_VIEW[tensors[0].element_size()]
    if len(tensors) > 1:
        total = sum(t.numel() for t in tensors)
        rows = tensors[0].shape[0] if tensors[0].dim() > 0 else 1
        keep = min(total, FLAT_FLOOR_MAX_BYTES // tensors[0].element_size())
        keep -= keep % rows
        buffer = torch.ones(rows, keep // rows, dtype=tensors[0].dtype)
        scale = total / keep
        flat_read = [
            Contender("floor: same bytes, one buffer: view(int).amax(dim=-1)",
                      lambda: buffer.view(int_dtype).amax(dim=-1), role="floor", scale=scale),
            Contender("floor: same bytes, one buffer: sum(dim=-1, fp32)",
                      lambda: buffer.sum(dim=-1, dtype=torch.float32), role="floor",
                      scale=scale),
        ]
    else:
        flat_read = []

    def over_all(read: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for t in tensors:
                read(t)
        return run

    flat = [t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1) for t in tensors]

    def over_flat(read: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def run() -> None:
            for t in flat:
                read(t)
        return run

    return [
        Contender("floor: sum(dim=-1, fp32)", over_flat(
            lambda t: t.sum(dim=-1, dtype=torch.float32)), role="floor"),
        Contender("floor: view(int).amax(dim=-1)", over_flat(
            lambda t: t.view(int_dtype).amax(dim=-1)), role="floor"),
        Contender("floor: sum()", over_all(lambda t: t.sum()), role="floor"),
        Contender("floor: amax()", over_all(lambda t: t.amax()), role="floor"),
    ] + flat_read


class threads:
    """``with threads(1): ...`` runs the body with that many intra-op threads (torch, OpenMP)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.previous = torch.get_num_threads()

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


def floor_of(timings: Sequence[Timing]) -> Timing:
    """The fastest floor candidate (by best sample)."""
    floors = [t for t in timings if t.role == "floor" and t.samples]
    return min(floors, key=lambda t: t.best)


# -- memory --------------------------------------------------------------------------------------


def prepare_memory_measurement() -> None:
    """Make glibc return every freed block above 64 KiB to the OS at once (mmap), so that a
    temporary allocated during the measured call shows in the peak resident set instead of
    reusing a cached heap block. Call once, at the start of a process that only measures
    memory (it slows small allocations, so never in a timing process)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory added by one call of ``fn`` (result included), in bytes.

    Linux's ``/proc/self/clear_refs`` (``5``) resets the peak resident set size (``VmHWM``) to the
    current one; after the call ``VmHWM - VmRSS(before)`` is the most memory the call had
    resident at once beyond what existed before: its temporaries and its result, whoever
    allocated them (torch, MKL, quadprog's NumPy arrays). Untouched allocations do not count
    (they hold no pages). Needs :func:`prepare_memory_measurement` in this process.
    """
    libc = ctypes.CDLL("libc.so.6")
    gc.collect()
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024



def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most bytes torch's CPU allocator held at once during ``fn()`` beyond what it held
    when ``fn`` began: the running sum of the profiler's allocation and free events, a count
    that does not depend on timing, the machine's other processes or the C library's reuse of
    freed pages (:func:`peak_extra_bytes`, the resident set, does)."""
    from torch.profiler import ProfilerActivity, profile

    # One cycle: acc_events changes nothing here but torch 2.11's warning that it is off.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 acc_events=True) as prof:
        fn()
    # Frees first on a tie of timestamps: the peak is never overstated.
    events = sorted((event.start_ns(), event.nbytes())
                    for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak

# -- inputs --------------------------------------------------------------------------------------


def conflict_scales(k: int) -> torch.Tensor:
    """Per-task weights ``c_i`` of a shared direction: alternating signs, so about half of the
    task pairs conflict (``<g_i, g_j> < 0`` when ``c_i c_j < 0``), as in real multi-task runs."""
    i = torch.arange(k, dtype=torch.float32)
    return torch.where(i % 2 == 0, 1.0, -1.0) * (0.5 + 0.5 * i / max(k - 1, 1))


def task_gradients(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[k, n]`` synthetic task gradients ``g_i = z_i + c_i s`` (independent noise ``z_i``, one
    shared direction ``s``, :func:`conflict_scales`)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=gen, dtype=torch.float32)
    shared = torch.randn(n, generator=gen, dtype=torch.float32)
    for i, c in enumerate(conflict_scales(k).tolist()):
        x[i].add_(shared, alpha=c)
    del shared
    return x if dtype == torch.float32 else x.to(dtype)


def task_gradient_stacks(shapes: Sequence[tuple[int, ...]], k: int, dtype: torch.dtype,
                         seed: int = 0) -> list[torch.Tensor]:
    """Per-parameter stacks ``[k, *shape_p]`` (separate allocations, as autograd returns them)
    with the same conflict structure as :func:`task_gradients`."""
    gen = torch.Generator().manual_seed(seed)
    scales = conflict_scales(k).tolist()
    stacks = []
    for shape in shapes:
        x = torch.randn(k, *shape, generator=gen, dtype=torch.float32)
        shared = torch.randn(shape, generator=gen, dtype=torch.float32)
        for i, c in enumerate(scales):
            x[i].add_(shared, alpha=c)
        stacks.append(x if dtype == torch.float32 else x.to(dtype))
    return stacks


def resnet50_backbone_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of a ResNet-50 backbone (torchvision's layout, classifier excluded):
    159 tensors, 23,508,032 values."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes


def vit_b16_backbone_shapes(tokens: int = 197) -> list[tuple[int, ...]]:
    """Parameter shapes of a ViT-B/16 backbone (torchvision's layout, classifier excluded):
    150 tensors, 85,798,656 values at 224x224 input (197 tokens)."""
    d, mlp = 768, 3072
    shapes: list[tuple[int, ...]] = [(1, 1, d), (d, 3, 16, 16), (d,), (1, tokens, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,)]
    return shapes


MODEL_SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_backbone_shapes,
    "vitb16": vit_b16_backbone_shapes,
}


# -- baselines written the usual way -------------------------------------------------------------


def libmtl_orders(k: int, seed: int = 0) -> list[list[int]]:
    """The task orders :func:`libmtl_style_pcgrad` uses for a seed: for each task ``i``, the
    other tasks shuffled by ``random.Random(seed)`` (one generator, drawn task after task)."""
    rng = random.Random(seed)
    orders = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        rng.shuffle(others)
        orders.append(others)
    return orders


def libmtl_style_pcgrad(grads: torch.Tensor, seed: int = 0,
                        orders: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """PCGrad as a LibMTL-style weighting computes it: a per-pair Python loop on ``[k, n]``.

    For each task ``i``: copy its gradient, visit the other tasks in a shuffled order
    (:func:`libmtl_orders`, or ``orders[i]`` when given: the agreement check aligns it with the
    op it is compared with, PCGrad's result depending on the order) and, when the running
    gradient conflicts with ``g_j`` (negative dot product, read on the host), remove its
    component along ``g_j`` (with ``|g_j|^2`` recomputed each time, as such loops do); the
    update is the sum of the projected gradients. Up to ``k (k - 1)`` dot products and axpys,
    each a pass over ``n`` values.
    """
    k = grads.shape[0]
    if orders is None:
        orders = libmtl_orders(k, seed)
    projected = grads.clone()
    for i in range(k):
        for j in orders[i]:
            dot = torch.dot(projected[i], grads[j])
            if dot < 0:
                projected[i] -= dot * grads[j] / grads[j].norm().pow(2)
    return projected.sum(dim=0)


class randperm_orders:
    """``with randperm_orders(orders): torchjd_pcgrad(x)`` makes TorchJD's PCGrad visit, for task
    ``i``, the other tasks in ``orders[i]``, for an agreement check against an op that uses
    those orders (PCGrad's result depends on the order; TorchJD draws one ``torch.randperm(k)``
    per task, in task order, and skips ``i`` in it). Raises if TorchJD did not draw exactly
    ``k`` permutations (its way of drawing them changed: the check could not align them)."""

    def __init__(self, orders: Sequence[Sequence[int]]) -> None:
        self.orders = [list(o) for o in orders]
        self.calls = 0
        self._real = torch.randperm

    def _fake(self, n: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        i = self.calls
        self.calls += 1
        if i >= len(self.orders) or n != len(self.orders):
            raise RuntimeError("torch.randperm called more often, or with another size, than "
                               "the PCGrad orders being aligned")
        return torch.tensor([i, *self.orders[i]], dtype=torch.long)

    def __enter__(self) -> None:
        self.calls = 0
        torch.randperm = self._fake  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        torch.randperm = self._real
        if exc[0] is None and self.calls != len(self.orders):
            raise RuntimeError(f"TorchJD's PCGrad drew {self.calls} permutations for "
                               f"{len(self.orders)} tasks: its orders could not be aligned")


def flat_cat(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[k, n]`` copy of per-parameter stacks ``[k, *shape_p]`` (what a user builds for mm)."""
    k = stacks[0].shape[0]
    return torch.cat([s.reshape(k, -1) for s in stacks], dim=1)


def split_copy_(flat: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
    """Copy a flat ``[n]`` vector back into per-parameter tensors (e.g. each ``.grad``)."""
    offset = 0
    for o in outs:
        o.copy_(flat[offset:offset + o.numel()].view_as(o))
        offset += o.numel()


# -- tables --------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table, columns padded for reading as plain text too."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


def fmt_ms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"
