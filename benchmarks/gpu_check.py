"""One call on a GPU machine: build the extension from source, check every op on CUDA against
float64 references, and time the ops against plain PyTorch; writes a Markdown table.

Usage (from the repository root, on the GPU machine):

    python benchmarks/gpu_check.py --out results_gpu.md [--skip-build] [--quick]

It builds with ``python setup.py build_ext --inplace`` (TORCH_CUDA_ARCH_LIST defaults to the
device's own arch), runs the CUDA tests of tests/test_ops.py, then the timings. Exit status is
non-zero if the build or any check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build() -> None:
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MTUNLEARN_CUDA", "1")
    t0 = time.time()
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                   check=True)
    print(f"[gpu_check] build: {time.time() - t0:.1f} s", flush=True)


def run_tests() -> int:
    env = dict(os.environ, MTUNLEARN_REQUIRE_EXTENSION="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_ops.py",
                           "-k", "cuda or compile or autograd"], cwd=ROOT, env=env)
    print(f"[gpu_check] CUDA op tests: rc={proc.returncode}, {time.time() - t0:.1f} s", flush=True)
    return proc.returncode


def cuda_time(fn, repeats: int = 20) -> float:  # type: ignore[no-untyped-def]
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


def timings(quick: bool) -> list[str]:
    import torch

    sys.path.insert(0, str(ROOT))
    from mtunlearn_ext import ops

    dev = "cuda"
    lines = ["| op | k | n | dtype | ours (ms) | torch (ms) | read floor (ms) | ours / floor | "
             "GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    copy_src = torch.empty(int(2e9) // 4, device=dev)
    copy_dst = torch.empty_like(copy_src)
    t_copy = cuda_time(lambda: copy_dst.copy_(copy_src), 10)
    bw = 2 * copy_src.numel() * 4 / t_copy / 1e9
    lines.insert(0, f"device copy bandwidth (read + write): {bw:.0f} GB/s\n")
    del copy_src, copy_dst
    sizes = [(8, 10**8), (16, 10**8), (64, 10**7), (256, 10**6)] if quick else [
        (2, 10**8), (8, 10**8), (8, 10**9), (16, 10**8), (64, 10**7), (256, 10**6), (256, 10**7)]
    for dtype in (torch.float32, torch.bfloat16):
        for k, n in sizes:
            if k * n * (4 if dtype == torch.float32 else 2) > 40e9:
                continue
            x = torch.randn(k, n, device=dev, dtype=dtype)
            nbytes = x.numel() * x.element_size()
            floor = cuda_time(lambda: x.sum(dim=1, dtype=torch.float32))
            cases = [
                ("gram", lambda: ops.gram(x, check_finite=False), lambda: x @ x.T),
                ("pcgrad", lambda: ops.pcgrad(x, check_finite=False), None),
                ("project_out", lambda: ops.project_out(x[:1], x[1:], check_finite=False), None),
                ("project_nonconflicting",
                 lambda: ops.project_nonconflicting(x[:1], x[1:], check_finite=False), None),
            ]
            for name, ours, plain in cases:
                t_ours = cuda_time(ours)
                t_plain = cuda_time(plain) if plain is not None else float("nan")
                lines.append(f"| {name} | {k} | {n:.0e} | {str(dtype)[6:]} | {t_ours * 1e3:.3f} | "
                             f"{t_plain * 1e3:.3f} | {floor * 1e3:.3f} | {t_ours / floor:.2f} | "
                             f"{nbytes / t_ours / 1e9:.0f} |")
                print(lines[-1], flush=True)
            del x
            torch.cuda.empty_cache()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results.md")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("[gpu_check] no CUDA device: nothing to check here", file=sys.stderr)
        return 2
    print(f"[gpu_check] {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    if not args.skip_build:
        build()
    rc = 0 if args.skip_tests else run_tests()
    lines = [f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d')}", "", f"CUDA op tests rc={rc}", ""]
    lines += timings(args.quick)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"[gpu_check] wrote {args.out}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
