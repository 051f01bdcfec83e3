"""One call on a GPU machine: build the extension from source, check everything that runs on CUDA,
and time the ops against plain PyTorch; writes a Markdown report.

Usage (from the repository root, on the GPU machine):

    python benchmarks/gpu_check.py --out gpu_results.md [--budget 520] [--quick] [--one-thread-solvers]
    python benchmarks/gpu_check.py --out tc.md --tensor-cores-only   # the opt-in tensor-core Gram

Stages, in order of importance, each in its own process with its own time limit, so that one
failing or hanging stage still leaves the others' results:

1. build: ``python setup.py build_ext --inplace`` for the device's own arch (TORCH_CUDA_ARCH_LIST
   defaults to it), ninja with every core.
2. op tests: tests/test_ops.py's CUDA, compile and autograd tests (every op against float64
   references, poisoned outputs, ``opcheck``) and tests/test_cuda.py (surgery lists, aggregators,
   the hook, solvers, ``unlearn`` and the CLI on CUDA against the CPU path); then the solver
   tests again with the one-thread-per-problem solvers (``MTUNLEARN_CUDA_BLOCK_SOLVERS=0``; the
   block-per-problem solvers for k >= 32 are the default), and the Gram, inner-product and
   projection tests with the tensor-core Gram on (``MTUNLEARN_CUDA_TENSOR_CORES=1``; opt-in
   until it has passed here), after stages 3 and 4.
3. fuzz: scripts/fuzz_ops.py on CUDA (random shapes, strides, dtypes, NaN/Inf: a right answer or
   a clear error).
4. memcheck: the fuzz cases under ``compute-sanitizer --tool memcheck`` with PyTorch's caching
   allocator off (each tensor its own allocation, so an out-of-bounds access is seen).
5. timings: every op at k x n sizes from 2 x 1e8 to 256 x 1e7 against ``torch`` (timed only
   when one call of each gives the same values, :data:`AGREEMENT_TOL`) and against the
   time to read the input once (Grams of more than 8 rows in bfloat16, 16 in float32, also on
   tensor cores); a whole aggregation step over ResNet-50 / ViT-B/16 parameter lists against
   ``cat`` + the same aggregation on the flat matrix + split; then one unlearning step on an
   86M-parameter backbone
   (``benchmarks/large_model.py --device cuda``, B = 8 / k = 6 and B = 16 / k = 32, the latter
   also with the tensor-core Gram; its tables go beside ``--out``).
6. racecheck: a few fuzz cases under ``compute-sanitizer --tool racecheck`` (shared-memory races
   in the tiled reductions), then the block-per-problem solvers (k >= 32) and the tensor-core
   Gram under memcheck and racecheck.

``--budget`` (seconds) bounds the whole run: a stage that no longer fits is skipped and marked so
in the report. Exit status is non-zero if any stage that ran failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


TENSOR_CORES_ON = {"MTUNLEARN_CUDA_TENSOR_CORES": "1"}


class Stages:
    """Runs stages under one deadline and keeps a line per stage for the report."""

    def __init__(self, budget: float) -> None:
        self.deadline = time.monotonic() + budget
        self.summary: list[str] = ["| stage | result | seconds |", "|---|---|---|"]
        self.failed = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, name: str, argv: list[str], limit: float, *, need: float = 20.0,
                env: dict[str, str] | None = None) -> bool:
        """Run ``argv``; ``limit`` is capped by the time left; skipped below ``need`` seconds."""
        limit = min(limit, self.left())
        if limit < need:
            self.summary.append(f"| {name} | skipped: {self.left():.0f} s left | 0 |")
            return False
        print(f"\n[gpu_check] === {name} (limit {limit:.0f} s) ===", flush=True)
        t0 = time.monotonic()
        path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"),
                                             os.environ.get("PYTHONPATH")]))
        # SIGINT at its default in the stage: a job started in the background (nohup ... &, a
        # CI runner) inherits it ignored, and Python then installs no KeyboardInterrupt, so the
        # interrupt below would not give pytest its summary.
        proc = subprocess.Popen(argv, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": path, **(env or {})},
                                preexec_fn=_default_sigint)
        # The limit holds the grace a stopped stage gets to print its summary.
        grace = min(15.0, limit / 4)
        try:
            returncode = proc.wait(timeout=limit - grace)
            result = "ok" if returncode == 0 else f"FAILED (rc={returncode})"
        except subprocess.TimeoutExpired:
            interrupt(proc, grace)
            result = f"FAILED (timed out after {limit:.0f} s)"
        seconds = time.monotonic() - t0
        print(f"[gpu_check] {name}: {result}, {seconds:.1f} s", flush=True)
        self.summary.append(f"| {name} | {result} | {seconds:.0f} |")
        self.failed |= result != "ok"
        return result == "ok"


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Stop a stage that ran out of time: SIGINT first, so that pytest still prints its summary
    (which tests failed, which were running), then SIGKILL after ``grace`` seconds."""
    import signal

    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BLOCK_SOLVER_CASES = """
import torch
from mtunlearn_ext import ops
g = torch.Generator().manual_seed(0)
for k in (32, 45):
    r = torch.randn(k, 3 * k, generator=g).cuda()
    x = torch.randn(2, 3 * k, generator=g).cuda() - r.mean(0)
    ops.project_out(x, r)
    ops.project_nonconflicting(x, r)
    ops.pcgrad(r)
torch.cuda.synchronize()
print("block solvers ran at k = 32, 45")
"""

# The tensor-core Gram (MTUNLEARN_CUDA_TENSOR_CORES=1; float16 / bfloat16 past 8 rows, float32
# past 16): both tile widths, diagonal and off-diagonal tiles, unaligned rows, a ragged list, an
# inner product, a batch read in place. fuzz_ops.py's k <= 6 never reaches it.
TENSOR_CORE_CASES = """
import torch
from mtunlearn_ext import ops
g = torch.Generator().manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    for k, n in ((17, 515), (33, 4099), (130, 1000)):
        x = torch.randn(k, n + 3, generator=g).to(dtype).cuda()[:, 3:]
        ops.gram(x)
    ops.gram_list([torch.randn(40, 7, 5, generator=g).to(dtype).cuda(),
                   torch.randn(40, 300, generator=g).to(dtype).cuda()])
    ops.inner(torch.randn(20, 999, generator=g).to(dtype).cuda(),
              torch.randn(70, 999, generator=g).to(dtype).cuda())
    # A batch read in place (matrix_offsets): leading dims that do not merge, matrices that
    # start at odd elements.
    step = 17 * 520 + 1
    flat = torch.randn(12 * step + 1, generator=g).to(dtype).cuda()
    ops.gram(flat.as_strided((4, 3, 17, 520), (step, 4 * step, 520, 1), 1))
torch.cuda.synchronize()
print("tensor-core Grams ran")
"""


# A C++ error raised by an op, on the CPU and on CUDA, each in its own process: a library that
# carries a private C++ runtime (setup.py refuses to build one) killed the process here.
ERROR_PATH_CASES = r"""
import subprocess, sys
calls = {  # name: (call, the end of its complete message)
    "combine_list_ cpu": ("torch.ops.mtunlearn.combine_list_([torch.zeros(2, 3)], "
                          "torch.zeros(2, 2, 5), [torch.zeros(5, 3)], 0.0, True)", "[2, 2, 5]"),
    "combine_list_ cuda": ("torch.ops.mtunlearn.combine_list_([torch.zeros(2, 3, device='cuda')], "
                           "torch.zeros(2, 2, 5, device='cuda'), "
                           "[torch.zeros(5, 3, device='cuda')], 0.0, True)", "[2, 2, 5]"),
    "inner cuda": ("torch.ops.mtunlearn.inner(torch.zeros(2, 3, device='cuda'), "
                   "torch.zeros(2, 4, device='cuda'))", "[2, 4]"),
}
failed = 0
for name, (call, tail) in calls.items():
    code = ("import torch, mtunlearn_ext\ntry:\n    " + call + "\nexcept ValueError as e:\n"
            "    print('ValueError:', e)\nelse:\n    print('no error raised')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = proc.stdout.strip()
    ok = proc.returncode == 0 and out.startswith("ValueError:") and out.endswith(tail)
    failed += not ok
    print(f"{name}: {'ok' if ok else 'FAILED'} rc={proc.returncode} "
          f"{(out or proc.stderr.strip())[-160:]}")
sys.exit(1 if failed else 0)
"""


def fallback_compiler_env() -> dict[str, str] | None:
    """The system g++ when ``$CXX`` is another compiler (a retry after a failed build)."""
    if os.path.exists("/usr/bin/g++") and os.environ.get("CXX", "/usr/bin/g++") != "/usr/bin/g++":
        return {"CXX": "/usr/bin/g++", "CC": "/usr/bin/gcc"}
    return None


def pytest_parallel_args() -> list[str]:
    """pytest-xdist where installed: a test that crashes its worker is then reported as failed
    (named) and the rest still run; each worker with few threads, so that the CPU references
    are not slowed by oversubscription; a per-test limit where pytest-timeout is installed."""
    import importlib.util

    args = ["-rfE", "--durations=10", "-p", "_failures_as_they_happen"]
    if importlib.util.find_spec("xdist") is not None:
        args += ["-n", "8", "--max-worker-restart", "100"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "120"]
    return args


def build_env() -> dict[str, str]:
    import torch

    env = {"MTUNLEARN_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    return env


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/compute-sanitizer",
                      "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if os.path.exists(candidate):
            return candidate
    return None


def cuda_time(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median seconds of ``fn`` over ``repeats`` launches, timed with CUDA events."""
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _torch_project_out(g, basis, ridge: float = 1e-6):  # type: ignore[no-untyped-def]
    import torch

    gram = (basis @ basis.T).float()
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-30))
    coeffs = torch.linalg.solve(gram, (basis @ g.T).float())
    return g - coeffs.T.to(g.dtype) @ basis


#: Relative difference ours vs ``torch`` allowed before a row's torch time is reported: float32
#: products over rows of up to 1e9 values (both sides sum in float32 on the device), bf16 inputs.
AGREEMENT_TOL = {"float32": 1e-3, "bfloat16": 3e-2}


def relative_difference(ours: object, theirs: object) -> float:
    """``||ours - theirs|| / ||theirs||`` over every value, in float32 (a float64 copy of a
    ``[1, 1e9]`` result would take 8 GB of the device's memory)."""
    import torch

    assert isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor)
    a, b = ours.detach().float().reshape(-1), theirs.detach().float().reshape(-1)
    if a.shape != b.shape:
        return float("inf")
    scale = float(b.norm())
    return float((a - b).norm()) / (scale if scale > 0 else 1.0)


def agreeing_time(ours: Callable[[], object], plain: Callable[[], object], dtype: str
                  ) -> tuple[float, str]:
    """The torch call's time and its relative difference to ours (one call of each first): a
    torch time only when both give the same values (a fast wrong answer is no win), else NaN
    and the difference, which the table shows instead of a time."""
    diff = relative_difference(ours(), plain())
    if not diff <= AGREEMENT_TOL[dtype]:  # NaN disagrees too
        return float("nan"), f"differs by {diff:.1e}"
    return cuda_time(plain), f"{diff:.1e}"


def op_timings(quick: bool, stages: Stages, only: set[str] | None = None) -> list[str]:
    import torch

    from mtunlearn_ext import ops

    dev = "cuda"
    lines = ["| op | k | n | dtype | ours (ms) | torch (ms) | torch vs ours: rel. diff | "
             "read floor (ms) | ours / floor | GB/s read |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    copy_src = torch.empty(int(2e9) // 4, device=dev)
    copy_dst = torch.empty_like(copy_src)
    t_copy = cuda_time(lambda: copy_dst.copy_(copy_src), 10)
    bandwidth = 2 * copy_src.numel() * 4 / t_copy / 1e9
    del copy_src, copy_dst
    header = [f"device copy bandwidth (read + write): {bandwidth:.0f} GB/s", ""]
    sizes = [(2, 10**8), (8, 10**8), (16, 10**8), (64, 10**7), (256, 10**6)] if quick else [
        (2, 10**8), (8, 10**8), (8, 10**9), (16, 10**8), (64, 10**7), (256, 10**6),
        (256, 10**7)]
    for dtype in (torch.float32, torch.bfloat16):
        for k, n in sizes:
            if stages.left() < 30:
                lines.append("| (out of time) | | | | | | | | | |")
                return header + lines
            x = torch.randn(k, n, device=dev, dtype=dtype)
            nbytes = x.numel() * x.element_size()
            floor = cuda_time(lambda: x.sum(dim=1, dtype=torch.float32))
            g, basis = x[:1], x[1:]
            cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
                ("gram", lambda: ops.gram(x, check_finite=False), lambda: x @ x.T),
                # The same call, timed with the variable set (read at every call).
                *([("gram, tensor cores", lambda: ops.gram(x, check_finite=False),
                    lambda: x @ x.T)] if k > (8 if dtype == torch.bfloat16 else 16) else []),
                ("project_out", lambda: ops.project_out(g, basis, check_finite=False),
                 lambda: _torch_project_out(g, basis)),
                ("project_nonconflicting",
                 lambda: ops.project_nonconflicting(g, basis, check_finite=False), None),
                ("pcgrad", lambda: ops.pcgrad(x, check_finite=False), None),
            ]
            for name, ours, plain in cases:
                if only is not None and name not in only:
                    continue
                with mock.patch.dict(os.environ, TENSOR_CORES_ON if "tensor cores" in name else {}):
                    t_ours = cuda_time(ours)
                    t_plain, agree = (agreeing_time(ours, plain, str(dtype)[6:])
                                      if plain is not None else (float("nan"), "-"))
                lines.append(f"| {name} | {k} | {n:.0e} | {str(dtype)[6:]} | {t_ours * 1e3:.3f} | "
                             f"{t_plain * 1e3:.3f} | {agree} | {floor * 1e3:.3f} | "
                             f"{t_ours / floor:.2f} | {nbytes / t_ours / 1e9:.0f} |")
                print(lines[-1], flush=True)
            del x, g, basis
            torch.cuda.empty_cache()
    return header + lines


def kernel_breakdown() -> list[str]:
    """Device time of each kernel behind one call (torch.profiler), against the call's event
    time: a gap between the two is host work the GPU waits for, not kernel time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mtunlearn_ext import ops

    lines = ["| call | event time (ms) | kernels: device time (ms) |", "|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for k in (2, 8):
            x = torch.randn(k, 10**8, device="cuda", dtype=dtype)
            event = cuda_time(lambda: ops.gram(x, check_finite=False))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    ops.gram(x, check_finite=False)
                torch.cuda.synchronize()
            kernels = ", ".join(
                f"{e.key[:48]} {e.device_time_total / 5e3:.3f}" for e in prof.key_averages()
                if e.device_time_total > 0)
            lines.append(f"| gram {str(dtype)[6:]} k={k} n=1e8 | {event * 1e3:.3f} | {kernels} |")
            print(lines[-1], flush=True)
            del x
    # Where a whole list step's time goes (host and device), printed to the log only.
    from _bench_common import MODEL_SHAPES

    from mtunlearn_ext.surgery import UPGrad, aggregate_list

    shapes = MODEL_SHAPES["resnet50"]()
    stacks = [torch.randn(8, *s, device="cuda") for s in shapes]
    outs = [torch.empty(s, device="cuda") for s in shapes]
    aggregator = UPGrad()
    aggregate_list(aggregator, stacks, outs, check_finite=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            aggregate_list(aggregator, stacks, outs, check_finite=False)
        torch.cuda.synchronize()
    print("[gpu_check] UPGrad step over ResNet-50 shapes, k = 8, 5 calls:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    return lines


def host_overhead_timings(stages: Stages) -> list[str]:
    """The per-call host work of the list ops over a model's parameter count
    (``benchmarks/host_overhead.py --device cuda``: each call synchronised)."""
    if stages.left() < 30:
        return ["(host overhead: out of time)"]
    try:
        proc = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--device", "cuda",
                               "--models", "resnet50"], cwd=ROOT, capture_output=True,
                              text=True, timeout=min(60.0, stages.left()))
    except subprocess.TimeoutExpired:
        return ["(host overhead: timed out)"]
    print(proc.stdout + proc.stderr, flush=True)
    return proc.stdout.splitlines() if proc.returncode == 0 else [
        f"(host overhead: failed, rc={proc.returncode})"]


def list_timings(stages: Stages) -> list[str]:
    """A whole UPGrad step over a model's parameter list: ours in place against flatten + split.

    Both sides run with ``check_finite=False`` (no NaN/Inf check, so no device -> host sync for
    it on either side): ours through ``aggregate_list(..., check_finite=False)``, the flat
    baseline as the aggregator's own forward (Gram, weighting, combine) on the concatenated
    matrix with the ops' ``check_finite=False``. Until 2026-11-30 the baseline called
    ``aggregator(matrix)``, whose ops check by default (two syncs per step that ours did not
    pay); the speed-ups of runs 1-5 were measured that way.
    """
    import torch
    from _bench_common import MODEL_SHAPES

    from mtunlearn_ext import ops
    from mtunlearn_ext.surgery import UPGrad, aggregate_list

    lines = ["Both sides with check_finite=False (no NaN/Inf sync on either side).", "",
             "| model | k | dtype | values | ours, lists (ms) | cat + flat + split (ms) | "
             "speed-up |", "|---|---|---|---|---|---|---|"]
    for model in ("resnet50", "vitb16"):
        shapes = MODEL_SHAPES[model]()
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for dtype in (torch.float32, torch.bfloat16):
            for k in (2, 8):
                if stages.left() < 20:
                    lines.append("| (out of time) | | | | | | |")
                    return lines
                stacks = [torch.randn(k, *s, device="cuda", dtype=dtype) for s in shapes]
                outs = [torch.empty(s, device="cuda", dtype=dtype) for s in shapes]
                aggregator = UPGrad()

                def ours() -> None:
                    aggregate_list(aggregator, stacks, outs, check_finite=False)

                def flat() -> None:
                    matrix = torch.cat([t.flatten(1) for t in stacks], dim=1)
                    # aggregator(matrix) with the same check_finite=False as ours
                    weights = aggregator.weighting(ops.gram(matrix, check_finite=False))
                    update = ops.combine(weights.unsqueeze(0), matrix,
                                         check_finite=False).squeeze(0)
                    for out, piece in zip(outs, update.split([o.numel() for o in outs]),
                                          strict=True):
                        out.copy_(piece.view_as(out))

                t_ours, t_flat = cuda_time(ours, 10), cuda_time(flat, 10)
                lines.append(f"| {model} | {k} | {str(dtype)[6:]} | {numel:,} | "
                             f"{t_ours * 1e3:.3f} | {t_flat * 1e3:.3f} | {t_flat / t_ours:.2f}x |")
                print(lines[-1], flush=True)
                del stacks, outs
                torch.cuda.empty_cache()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--out", default="gpu_results.md")
    parser.add_argument("--budget", type=float, default=520.0,
                        help="seconds for the whole run; stages that no longer fit are skipped")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-sanitizer", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer timing sizes")
    parser.add_argument("--skip-timings", action="store_true",
                        help="leave out the op, list and host-overhead timings")
    parser.add_argument("--fuzz-cases", type=int, default=2000)
    parser.add_argument("--skip-large-model", action="store_true",
                        help="leave out benchmarks/large_model.py --device cuda")
    parser.add_argument("--tensor-cores-only", action="store_true",
                        help="after the build, only what checks and times the opt-in "
                             "tensor-core Gram (MTUNLEARN_CUDA_TENSOR_CORES=1) and the CUDA-graph "
                             "test: its op tests, memcheck and racecheck, Gram timings with and "
                             "without it, the large-model many-row step with and without it")
    parser.add_argument("--one-thread-solvers", action="store_true",
                        help="time with the one-thread-per-problem solvers instead of the "
                             "block-per-problem ones (MTUNLEARN_CUDA_BLOCK_SOLVERS=0 for the "
                             "whole run)")
    args = parser.parse_args()
    if args.one_thread_solvers:
        os.environ["MTUNLEARN_CUDA_BLOCK_SOLVERS"] = "0"
    import torch

    if not torch.cuda.is_available():
        print("[gpu_check] no CUDA device: nothing to check here", file=sys.stderr)
        return 2
    stages = Stages(args.budget)
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Python " \
             f"{sys.version.split()[0]}"
    print(f"[gpu_check] {device}", flush=True)
    py = sys.executable
    if not args.skip_build:
        built = stages.command("build", [py, "setup.py", "-q", "build_ext", "--inplace"], 300,
                               env=build_env())
        fallback = fallback_compiler_env()
        if not built and fallback is not None:
            # setup.py refuses a library that carries a private C++ runtime (the machine's
            # $CXX wrapper links one in); the system compiler does not.
            built = stages.command("build, system g++", [py, "setup.py", "-q", "build_ext",
                                                         "--inplace"], 300,
                                   env={**build_env(), **fallback})
        if not built:
            args.skip_tests = args.skip_sanitizer = True
    checked = {"MTUNLEARN_REQUIRE_EXTENSION": "1"}
    # Eight xdist workers on the machine's cores: two threads each for the CPU references.
    tests_env = {**checked, "OMP_NUM_THREADS": "2"} if "-n" in pytest_parallel_args() else checked
    if args.tensor_cores_only:
        lines: list[str] = []
        if not args.skip_tests:
            lines = tensor_core_stages(stages, py, tests_env,
                                       None if args.skip_sanitizer else sanitizer(),
                                       Path(args.out).resolve().parent, args.quick)
        return write_report(stages, device, lines, args.out)
    if not args.skip_tests:
        stages.command("error path", [py, "-c", ERROR_PATH_CASES], 60, env=checked)
        stages.command("op tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    *pytest_parallel_args(), "tests/test_ops.py", "-k",
                                    "cuda or compile or autograd", "tests/test_cuda.py"], 240,
                       env=tests_env)
        stages.command("fuzz", [py, "scripts/fuzz_ops.py", "--device", "cuda", "--cases",
                                str(args.fuzz_cases)], 90, env=checked)
    tool = None if args.skip_sanitizer else sanitizer()
    # Caching off: each tensor its own allocation, so out-of-bounds accesses are not hidden
    # inside a cached block.
    no_cache = {**checked, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    if tool is not None:
        stages.command("memcheck", [tool, "--tool", "memcheck", "--error-exitcode", "1", py,
                                    "scripts/fuzz_ops.py", "--device", "cuda", "--cases", "150"],
                       150, need=60, env=no_cache)
    elif not args.skip_sanitizer:
        stages.summary.append("| memcheck | skipped: no compute-sanitizer found | 0 |")
    if not args.skip_tests:
        # The one-thread-per-problem solvers (the default below k = 32, opt-in above): the
        # solver tests again with them, after the checks of the default path ("dual": rows
        # walked grid-stride over fewer workspace slots, on the thread kernel at k = 256).
        stages.command("op tests, one-thread solvers", [
            py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_parallel_args(),
            "tests/test_ops.py", "tests/test_cuda.py", "-k",
            "cuda and (ridge or project or singular or solvers or unlearn or dual)"], 120,
            env={**tests_env, "MTUNLEARN_CUDA_BLOCK_SOLVERS": "0"})
        tensor_core_tests(stages, py, tests_env)
    timing_lines: list[str] = []
    if args.skip_timings:
        stages.summary.append("| timings | skipped: --skip-timings | 0 |")
    elif stages.left() > 40:
        t0 = time.monotonic()
        timing_lines = (op_timings(args.quick, stages) + [""] + kernel_breakdown() + [""]
                        + list_timings(stages) + [""] + host_overhead_timings(stages))
        stages.summary.append(f"| timings | ok | {time.monotonic() - t0:.0f} |")
    else:
        stages.summary.append(f"| timings | skipped: {stages.left():.0f} s left | 0 |")
    if not args.skip_large_model:
        # One unlearning step on an 86M-parameter ViT-B-like backbone, compiled ops against the
        # usual cat + mm + QR way, at the default sizes and at many rows (k = 32, B = 16: at
        # B = 32 torch's QR of the [86M, 32] matrix fails on CUDA asking for "more than 1EB").
        # The many-row case again with the tensor-core Gram (float32 per-sample gradients:
        # the 3xTF32 kernel), the case it was written for.
        out_dir = Path(args.out).resolve().parent
        large_model_step(stages, py, "b8-k6", checked, out_dir)
        large_model_step(stages, py, "b16-k32", checked, out_dir)
        large_model_step(stages, py, "b16-k32", {**checked, **TENSOR_CORES_ON}, out_dir)
    if tool is not None:
        stages.command("racecheck", [tool, "--tool", "racecheck", "--error-exitcode", "1", py,
                                     "scripts/fuzz_ops.py", "--device", "cuda", "--cases", "40"],
                       120, need=60, env=no_cache)
        # The block-per-problem solvers (k >= 32) share memory between threads; fuzz's k <= 6
        # never reaches them, nor the tensor-core Gram (more than 8 rows).
        for check in ("memcheck", "racecheck"):
            stages.command(f"{check}, block solvers", [
                tool, "--tool", check, "--error-exitcode", "1", py, "-c", BLOCK_SOLVER_CASES],
                90, need=30, env={**no_cache, "MTUNLEARN_CUDA_BLOCK_SOLVERS": "1"})
            tensor_core_sanitizer(stages, tool, check, py, no_cache)
    return write_report(stages, device, timing_lines, args.out)


def write_report(stages: Stages, device: str, timing_lines: list[str], out: str) -> int:
    report = [f"# GPU check: {device}, {time.strftime('%Y-%m-%d')}", "", *stages.summary, "",
              *timing_lines]
    Path(out).write_text("\n".join(report) + "\n")
    print("\n".join(stages.summary))
    print(f"[gpu_check] wrote {out}")
    return 1 if stages.failed else 0


LARGE_MODEL_SIZES = {"b8-k6": [], "b16-k32": ["--per-sample", "16", "--snapshots", "32"]}


def tensor_core_tests(stages: Stages, py: str, tests_env: dict[str, str]) -> None:
    """The tensor-core Gram (opt-in until it has passed here): every Gram, inner-product,
    projection and CUDA-graph test with it on."""
    stages.command("op tests, tensor-core Gram", [
        py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_parallel_args(),
        "tests/test_ops.py", "tests/test_cuda.py", "-k",
        "cuda and (gram or inner or project or tensor_core or graph)"], 150,
        env={**tests_env, **TENSOR_CORES_ON})


def tensor_core_sanitizer(stages: Stages, tool: str, check: str, py: str,
                          no_cache: dict[str, str]) -> None:
    """``check`` (memcheck or racecheck) over TENSOR_CORE_CASES with the tensor-core Gram on."""
    stages.command(f"{check}, tensor-core Gram", [
        tool, "--tool", check, "--error-exitcode", "1", py, "-c", TENSOR_CORE_CASES],
        90, need=30, env={**no_cache, **TENSOR_CORES_ON})


def large_model_step(stages: Stages, py: str, sizes: str, env: dict[str, str],
                     out_dir: Path) -> None:
    """benchmarks/large_model.py at LARGE_MODEL_SIZES[sizes] (tagged "-tensor-cores" when the
    tensor-core Gram is on), its table beside the report."""
    tag = sizes + ("-tensor-cores" if env.get("MTUNLEARN_CUDA_TENSOR_CORES") == "1" else "")
    stages.command(f"large model step ({tag})", [
        py, "benchmarks/large_model.py", "--device", "cuda", "--repeats", "5",
        *LARGE_MODEL_SIZES[sizes], "--markdown", str(out_dir / f"large_model_{tag}.md")], 120,
        need=40, env=env)


def tensor_core_stages(stages: Stages, py: str, tests_env: dict[str, str], tool: str | None,
                       out_dir: Path, quick: bool) -> list[str]:
    """``--tensor-cores-only``: the opt-in tensor-core Gram's checks and timings, most telling
    first, for a short GPU session; returns the timing table."""
    tensor_core_tests(stages, py, tests_env)
    if tool is not None:
        no_cache = {**tests_env, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
        for check in ("memcheck", "racecheck"):
            tensor_core_sanitizer(stages, tool, check, py, no_cache)
    lines: list[str] = []
    if stages.left() > 40:
        lines = op_timings(quick, stages, only={"gram", "gram, tensor cores"})
    large_model_step(stages, py, "b16-k32", tests_env, out_dir)
    large_model_step(stages, py, "b16-k32", {**tests_env, **TENSOR_CORES_ON}, out_dir)
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
