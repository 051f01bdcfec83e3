"""Communication cost of distributed gradient surgery: one k x k all-reduce vs moving gradients.

Each of ``--world-size`` processes holds a shard of ``n / R`` coordinates of ``k`` per-task
gradients (as a few per-parameter stacks, as FSDP2 would). Three ways to aggregate them:

- ``sharded``: local Gram over the shards (``gram_list``), ``all_reduce`` of the ``k x k`` Gram,
  solve, combine into the local shard (this package's sharded path). Payload: ``k^2`` floats.
  Its step is timed twice: as the package runs it (``stats_all_reduce``, whose reduce first
  checks in one all-reduce of 8 integers that every rank reduces statistics of one size and
  dtype, and reads the result on the host) and with a bare ``all_reduce(SUM)`` as ``reduce``
  (no check: what the step cost before the check; the two steps' outputs are compared
  bitwise before either is timed).
- ``gather``: ``all_gather`` of the per-task shards so every rank holds the ``k x n`` Jacobian
  and runs a flat-matrix aggregator (what a non-sharded implementation must do). Payload:
  ``k x n`` floats.
- ``replicated``: ``all_reduce`` of full ``k x n`` per-task stacks (DDP-style replicas, this
  package's replicated path; shown for scale).

"payload" is the size of the collective's result on each rank; "sent/rank" is the ring-algorithm
volume each rank sends (all-gather: ``(R-1)/R`` of the result; all-reduce: ``2 (R-1)/R``). Times
are the median over ``--reps`` runs of the slowest rank, collective only and whole step. Both
steps run the ops with ``check_finite=False`` (no NaN/Inf check, so no device -> host sync for
it): the sharded one through ``aggregate_list(..., check_finite=False)``, the gather one as the
aggregator's forward on the gathered matrix with the ops' ``check_finite=False`` (until
2026-11-30 it called ``aggregator(matrix)``, which checks: two syncs per step more than the
sharded step).

A second table times a whole replicated step (``replicated_surgery``) on a deep trunk of many
small tensors (``--trunk-layers`` ``Linear(w, w)`` layers, ``k`` heads, 32 rows a rank, as
``no_sync`` DDP training runs it): the package's step, whose average of the stacks, heads and
flags goes in 25 MiB buckets (one all-reduce each), against the same step with one all-reduce
per tensor (the bucket size set to 0: what the step did before bucketing, its gradients
compared bitwise first), and plain DDP's ``sum(losses).backward()`` for scale.

Run: ``python benchmarks/bench_comm.py [--world-size 2] [--tasks 2 4 8] [--numel 1e5 1e6 4e6]
[--trunk-layers 40]`` (gloo on CPU; NCCL is used for CUDA tensors with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PIECES = 4  # per-task gradients are held as this many per-parameter stacks per rank


def _timed(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``reps`` runs, of the slowest rank (seconds)."""
    samples = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    median = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median.item())


def _bench_one(k: int, n: int, reps: int, device: torch.device) -> dict[str, float]:
    from mtunlearn_ext import ops
    from mtunlearn_ext.surgery import UPGrad, aggregate_list, stats_all_reduce

    world = dist.get_world_size()
    local_n = n // world
    sizes = [local_n // PIECES] * (PIECES - 1)
    sizes.append(local_n - sum(sizes))
    gen = torch.Generator().manual_seed(dist.get_rank())
    stacks = [torch.randn(k, s, generator=gen).to(device) for s in sizes]
    outs = [torch.empty(s, device=device) for s in sizes]
    aggregator = UPGrad()
    reduce = stats_all_reduce()
    gram = torch.randn(k, k, device=device)
    gathered = [[torch.empty(k, s, device=device) for _ in range(world)] for s in sizes]

    def gram_all_reduce() -> None:
        dist.all_reduce(gram)

    def sharded_step() -> None:
        aggregate_list(aggregator, stacks, outs, reduce=reduce, check_finite=False)

    def unchecked_reduce(stats: torch.Tensor) -> torch.Tensor:
        stats = stats.contiguous()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        return stats

    def unchecked_sharded_step() -> None:
        aggregate_list(aggregator, stacks, outs, reduce=unchecked_reduce, check_finite=False)

    sharded_step()
    checked_outs = [o.clone() for o in outs]
    unchecked_sharded_step()
    if not all(torch.equal(a, b) for a, b in zip(checked_outs, outs)):
        raise RuntimeError("the sharded step without the agreement check gave other outputs")

    def gather_only() -> None:
        for dst, src in zip(gathered, stacks):
            dist.all_gather(dst, src)

    def gather_step() -> None:
        gather_only()
        jacobian = torch.cat([torch.cat(parts, dim=1) for parts in gathered], dim=1)
        # aggregator(jacobian) with check_finite=False, as the sharded step (no NaN/Inf check,
        # so no device -> host sync for it on either side)
        weights = aggregator.weighting(ops.gram(jacobian, check_finite=False))
        ops.combine(weights.unsqueeze(0), jacobian, check_finite=False)

    def replicated_all_reduce() -> None:
        for s in stacks:
            dist.all_reduce(s)
        for s in stacks:  # keep the values bounded across repetitions
            s.div_(world)

    float_bytes = 4
    return {
        "k": k, "n": n,
        "sharded_payload": k * k * float_bytes,
        "sharded_sent": 2 * (world - 1) / world * k * k * float_bytes,
        "sharded_comm_s": _timed(gram_all_reduce, reps, device),
        "sharded_step_s": _timed(sharded_step, reps, device),
        "sharded_unchecked_step_s": _timed(unchecked_sharded_step, reps, device),
        "gather_payload": k * n * float_bytes,
        "gather_sent": (world - 1) / world * k * n * float_bytes,
        "gather_comm_s": _timed(gather_only, reps, device),
        "gather_step_s": _timed(gather_step, reps, device),
        "replicated_payload": k * n * float_bytes,
        "replicated_sent": 2 * (world - 1) / world * k * n * float_bytes,
        "replicated_comm_s": _timed(replicated_all_reduce, reps, device),
    }


def _bench_replicated_trunk(layers: int, width: int, k: int, reps: int, device: torch.device
                            ) -> dict[str, float]:
    """One replicated-surgery step on a trunk of ``layers`` ``Linear(width, width)`` layers:
    bucketed (the package's), one all-reduce per tensor, and plain DDP."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from mtunlearn_ext.surgery import UPGrad, distributed, replicated_surgery

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh())
                                         for _ in range(layers)])
            self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            z = self.trunk(x)
            return [h(z).squeeze(-1) for h in self.heads]

    torch.manual_seed(0)  # the same replicas on every rank
    model = DistributedDataParallel(Net().to(device))
    trunk = model.module.trunk
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(32, width, generator=gen).to(device)
    y = torch.randn(k, 32, generator=gen).to(device)
    surgery = replicated_surgery(trunk.parameters(), UPGrad())

    def losses() -> list[torch.Tensor]:
        return [((out - t) ** 2).mean() for out, t in zip(model(x), y)]

    def surgery_step() -> None:
        model.zero_grad()
        with model.no_sync():  # the surgery averages; DDP's own reduction is not wanted
            surgery.backward(losses())

    def per_tensor_step() -> None:
        default, distributed._BUCKET_BYTES = distributed._BUCKET_BYTES, 0
        try:
            surgery_step()
        finally:
            distributed._BUCKET_BYTES = default

    def ddp_step() -> None:
        model.zero_grad()
        sum(losses()).backward()

    surgery_step()
    bucketed = [p.grad.clone() for p in trunk.parameters()]  # type: ignore[union-attr]
    per_tensor_step()
    for a, p in zip(bucketed, trunk.parameters()):
        # Two ranks add the same two numbers either way; more ranks may sum a bucket's values
        # in another order than a tensor's alone.
        if dist.get_world_size() == 2 and not torch.equal(a, p.grad):
            raise RuntimeError("the per-tensor average gave other gradients than the "
                               "bucketed one")
        torch.testing.assert_close(p.grad, a)
    return {"layers": layers, "width": width, "k": k,
            "tensors": 2 * layers,
            "bucketed_step_s": _timed(surgery_step, reps, device),
            "per_tensor_step_s": _timed(per_tensor_step, reps, device),
            "ddp_step_s": _timed(ddp_step, reps, device)}


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    warnings.filterwarnings("ignore")  # the ops' fallback warning, once per process
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    from mtunlearn_ext.surgery import default_backend

    dist.init_process_group(default_backend(), init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=5))
    rows = [_bench_one(k, int(n), args.reps, device) for n in args.numel for k in args.tasks]
    trunk_rows = [_bench_replicated_trunk(args.trunk_layers, args.trunk_width, k,
                                          max(args.reps, 3), device) for k in args.tasks]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"rows": rows, "trunk_rows": trunk_rows}, f)
    dist.destroy_process_group()


def _human_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"


def _table(rows: list[dict[str, float]], world: int, backend: str) -> str:
    header = ["k", "n", "sharded payload", "sent/rank", "all_reduce(kxk)", "sharded step",
              "w/o check",
              "gather payload", "sent/rank", "all_gather", "gather step", "replicated comm",
              "bytes ratio"]
    lines = [f"world size {world}, backend {backend}; times: median of the slowest rank"]
    body = []
    for r in rows:
        body.append([
            str(int(r["k"])), f"{int(r['n']):,}",
            _human_bytes(r["sharded_payload"]), _human_bytes(r["sharded_sent"]),
            f"{r['sharded_comm_s'] * 1e3:.3f} ms", f"{r['sharded_step_s'] * 1e3:.2f} ms",
            f"{r['sharded_unchecked_step_s'] * 1e3:.2f} ms",
            _human_bytes(r["gather_payload"]), _human_bytes(r["gather_sent"]),
            f"{r['gather_comm_s'] * 1e3:.2f} ms", f"{r['gather_step_s'] * 1e3:.2f} ms",
            f"{r['replicated_comm_s'] * 1e3:.2f} ms",
            f"{r['gather_payload'] / r['sharded_payload']:,.0f}x",
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body)
    return "\n".join(lines)


def _trunk_table(rows: list[dict[str, float]]) -> str:
    header = ["k", "trunk tensors", "replicated step (bucketed)", "one all-reduce per tensor",
              "plain DDP step"]
    body = [[str(int(r["k"])), f"{int(r['tensors'])} ({int(r['layers'])} x Linear"
             f"({int(r['width'])}, {int(r['width'])}))",
             f"{r['bucketed_step_s'] * 1e3:.2f} ms", f"{r['per_tensor_step_s'] * 1e3:.2f} ms",
             f"{r['ddp_step_s'] * 1e3:.2f} ms"] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    lines = ["replicated surgery on a deep trunk, 32 rows a rank; times: median of the "
             "slowest rank",
             "  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--numel", type=float, nargs="+", default=[1e5, 1e6, 4e6],
                        help="total coordinates n of each task gradient (split over the ranks)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--trunk-layers", type=int, default=40,
                        help="layers of the replicated step's trunk (its second table)")
    parser.add_argument("--trunk-width", type=int, default=64)
    parser.add_argument("--json", help="also write the raw rows to this file")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 1:
        parser.error("--device cuda needs a CUDA device")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.world_size, os.path.join(tmp, "init"), args, out),
                 nprocs=args.world_size, join=True)
        with open(out) as f:
            result = json.load(f)
    backend = "nccl" if args.device == "cuda" else "gloo"
    print(_table(result["rows"], args.world_size, backend))
    print()
    print(_trunk_table(result["trunk_rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
