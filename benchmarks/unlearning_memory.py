"""Memory and time of ``unlearn`` against the shared parameters' count (large-model review).

    python benchmarks/unlearning_memory.py                     # 5M, 20M, 50M trunks, 7 methods
    python benchmarks/unlearning_memory.py --sizes 1 --methods interference_aware pcgrad

Each run is a fresh process (``--one``): an MLP trunk of five layers (four square ones of width
``sqrt(P / 4)``) and three heads (two classifications, one regression), 48 instances, a full
request of 6, ``steps`` steps with batches of 4 forget and 8 retain rows; the interference-aware
methods with 4 snapshots and 4 per-sample rows, so that the plan (``gradient_memory_bytes``) is
8 trunk copies. Printed per run: the peak of torch's CPU allocator during the call (the running
sum of the profiler's allocation events: a count, the same on any machine and under any load),
in MiB and in copies of the model, the plan in copies, the resident peak's growth over the call
(``ru_maxrss``: the C library's reuse of freed pages and the set-up's own allocations show
here), and seconds per step (the report's ``wall_time_s`` / steps; the profiler slows the step
down, so ``--no-profile`` times it without). Timings on a shared machine vary by 2x and more;
the allocator figures do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings

METHODS = ("interference_aware", "interference_aware_no_task", "interference_aware_no_instance",
           "interference_aware_neither", "finetune", "neggrad_plus", "pcgrad")


def one_run(params_millions: float, method: str, steps: int, profiled: bool) -> dict[str, object]:
    import torch
    from torch import nn

    from _bench_common import peak_allocated_bytes

    import mtunlearn_ext
    from mtunlearn_ext.data import ForgetRequest
    from mtunlearn_ext.unlearning import UnlearningReport

    torch.set_num_threads(1)
    width = int((params_millions * 1e6 / 4) ** 0.5)

    class WideTrunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
            for _ in range(4):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.trunk = nn.Sequential(*layers)
            self.heads = nn.ModuleDict({"a": nn.Linear(width, 3), "b": nn.Linear(width, 3),
                                        "c": nn.Linear(width, 1)})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = self.trunk(x)
            return {t: head(z) for t, head in self.heads.items()}

    model = WideTrunk()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=g)
    y = {"a": torch.randint(0, 3, (48,), generator=g), "b": torch.randint(0, 3, (48,), generator=g),
         "c": torch.randn(48, 1, generator=g)}
    config: dict[str, object] = {"steps": steps, "forget_batch_size": 4, "retain_batch_size": 8}
    if method.startswith("interference_aware"):
        config.update(num_snapshots=4, num_per_sample=4, cap_rows=16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run() -> UnlearningReport:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mtunlearn_ext.unlearn(
                model, tasks={"a": "classification", "b": "classification", "c": "regression"},
                train_data=(x, y), forget_request=ForgetRequest.create(range(6)), method=method,
                config=config, shared_parameters=lambda name: name.startswith("trunk."))[1]

    reports: list[UnlearningReport] = []
    peak = peak_allocated_bytes(lambda: reports.append(run())) if profiled else None
    report = reports[0] if reports else run()
    plan = report.extra.get("interference_aware", {}).get("gradient_memory_bytes", {})
    return {"params_M": model_bytes / 4e6, "method": method, "model_MiB": model_bytes / 2**20,
            "alloc_peak_MiB": None if peak is None else peak / 2**20,
            "alloc_peak_copies": None if peak is None else peak / model_bytes,
            "plan_copies": plan.get("total", 0) / model_bytes,
            "rss_growth_MiB": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                               - rss_before) / 1024,
            "s_per_step": report.wall_time_s / max(report.steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[5, 20, 50],
                        help="shared parameters, in millions")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true",
                        help="time the steps without the profiler (no allocator peak)")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(float(args.one[0]), args.one[1], args.steps,
                                 not args.no_profile)))
        return
    print(f"{'params':>7} {'method':32} {'alloc peak':>12} {'copies':>7} {'plan':>5} "
          f"{'RSS growth':>11} {'s/step':>7}")
    for size in args.sizes:
        for method in args.methods:
            command = [sys.executable, __file__, "--one", str(size), method,
                       "--steps", str(args.steps)] + (["--no-profile"] if args.no_profile else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            alloc = ("-" if row["alloc_peak_MiB"] is None
                     else f"{row['alloc_peak_MiB']:.0f} MiB")
            copies = ("-" if row["alloc_peak_copies"] is None
                      else f"{row['alloc_peak_copies']:.1f}")
            print(f"{row['params_M']:6.1f}M {method:32} {alloc:>12} {copies:>7} "
                  f"{row['plan_copies']:5.1f} {row['rss_growth_MiB']:7.0f} MiB "
                  f"{row['s_per_step']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
