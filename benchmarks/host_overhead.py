"""What a list op costs per call apart from the arithmetic: the host work of handling a model's
parameter list (argument checks, one row view per tensor, grouping by dtype, the launch).

On a GPU the arithmetic of a step is often shorter than this host work (ResNet-50, k = 8 on the
H200: 0.66 ms of kernels inside a 2.0-3.5 ms step), so it sets the step time. The inputs here
have the parameter *count* of the model but four values per tensor, so the times below are that
per-call cost alone, the same on any device up to the speed of the host. Each of our calls is
shown beside the raw registered op (``torch.ops.mtunlearn``: the dispatcher and the C++ entry
without the Python wrapper, the least a Python caller can pay) and beside the plain-PyTorch code
it replaces (concatenate, compute on the flat matrix, split back).

On CUDA (``--device cuda``) each call is followed by a synchronisation, so a time there is the
host work plus the launches' latency: what a training step waits for.

Timing (``_bench_common.measure``): every call of the table gets the same number of samples
(60 when every call is under 50 ms, as here), interleaved; a call shorter than 1 ms is repeated
back to back within a sample and the sample is the mean of those calls (the ``samples`` column:
``60x4`` is 60 samples of 4 calls each). "best" is the fastest sample, "median" the median one.

Agreement: before the timing, every plain-PyTorch call and the call of ours it is paired with
run once on the same inputs and their results are compared (``_bench_common.check_agreement``,
the last column: ``||ours - theirs|| / ||theirs||``); the script stops if a pair differs by more
than 1e-3, so that a pair is only timed if both compute the same values (the projection's
baseline adds the same ridge as ``project_out_list``).

Run (repository root)::

    .venv/bin/python benchmarks/host_overhead.py [--models resnet50 vitb16] [--k 8]
        [--device cuda] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import _bench_common as bc
import torch

from mtunlearn_ext import ops, surgery

VALUES_PER_TENSOR = 4
RIDGE = 1e-6


def contenders(model: str, k: int, device: str) -> list[bc.Contender]:
    count = len(bc.MODEL_SHAPES[model]())
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(k, VALUES_PER_TENSOR, generator=gen).to(device) for _ in range(count)]
    outs = [torch.zeros(VALUES_PER_TENSOR, device=device) for _ in range(count)]
    forget = [x[:1] for x in xs]
    retain = [x[1:] for x in xs]
    projected = [torch.zeros(1, VALUES_PER_TENSOR, device=device) for _ in range(count)]
    weights = torch.linspace(0.5, 1.5, k, device=device)
    upgrad = surgery.UPGrad()
    raw = torch.ops.mtunlearn

    def cat_mm() -> torch.Tensor:
        j = torch.cat([x.reshape(k, -1) for x in xs], dim=1)
        return j @ j.T

    def cat_mv_split() -> None:
        bc.split_copy_(weights @ bc.flat_cat(xs), outs)

    def cat_upgrad_split() -> None:
        bc.split_copy_(upgrad(bc.flat_cat(xs)), outs)

    def cat_project_split() -> None:
        g, r = bc.flat_cat(forget), bc.flat_cat(retain)
        gram = r @ r.T
        # The ridge project_out_list adds (RIDGE tr(G) / k): the same quantity on both sides.
        ridge = RIDGE * gram.diagonal().sum() / (k - 1)
        coeffs = torch.linalg.solve(gram + ridge * torch.eye(k - 1, device=device), r @ g.T)
        bc.split_copy_((g - coeffs.T @ r)[0], projected)

    def aggregate_list() -> None:
        surgery.aggregate_list(upgrad, xs, outs)

    def project_out_list() -> None:
        surgery.project_out_list(forget, retain, RIDGE, outs=projected)

    def combine_list() -> None:
        ops.combine_list(weights, xs, outs)

    calls = [
        bc.Contender("ops.gram_list", lambda: ops.gram_list(xs)),
        bc.Contender("raw mtunlearn::gram_list", lambda: raw.gram_list(xs, False),
                     role="reference"),
        bc.Contender("cat + mm", cat_mm, role="baseline", vs="ops.gram_list"),
        bc.Contender("ops.combine_list", combine_list, result=bc.returning(outs, combine_list)),
        bc.Contender("raw mtunlearn::combine_list_",
                     lambda: raw.combine_list_(outs, weights, xs, 0.0, False), role="reference"),
        bc.Contender("cat + mv + split-copy", cat_mv_split, role="baseline",
                     vs="ops.combine_list", result=bc.returning(outs, cat_mv_split)),
        bc.Contender("surgery.aggregate_list(UPGrad)", aggregate_list,
                     result=bc.returning(outs, aggregate_list)),
        bc.Contender("cat + UPGrad + split-copy", cat_upgrad_split, role="baseline",
                     vs="surgery.aggregate_list(UPGrad)",
                     result=bc.returning(outs, cat_upgrad_split)),
        bc.Contender("surgery.project_out_list", project_out_list,
                     result=bc.returning(projected, project_out_list)),
        bc.Contender("cat + solve + split-copy", cat_project_split, role="baseline",
                     vs="surgery.project_out_list",
                     result=bc.returning(projected, cat_project_split)),
    ]
    if device == "cpu":
        return calls
    return [replace(c, fn=_synchronised(c.fn)) for c in calls]


def _synchronised(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        fn()
        torch.cuda.synchronize()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--models", nargs="+", default=["resnet50", "vitb16"],
                        choices=sorted(bc.MODEL_SHAPES))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: the host work is serial anyway)")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, record = [], []
    for model in args.models:
        count = len(bc.MODEL_SHAPES[model]())
        calls = contenders(model, args.k, args.device)
        # A fast wrong answer is no win: each pair computes the same values before it is timed
        # (raises bc.Disagreement otherwise).
        agreement = bc.check_agreement(calls, torch.float32)
        timings = bc.measure(calls, repeats=30)
        by_name = {t.name: t for t in timings}
        for t in timings:
            versus = ""
            if t.vs is not None and t.vs in by_name:
                versus = f"{t.best / by_name[t.vs].best:.1f}x ours"
            agree = agreement.get(t.name)
            rows.append([model, str(count), t.name, f"{t.best * 1e6:.0f}",
                         f"{t.median * 1e6:.0f}", f"{len(t.samples)}x{t.calls_per_sample}",
                         versus, f"{agree['rel_diff']:.1e}" if agree else ""])
            record.append({"model": model, "tensors": count, "k": args.k, **t.as_dict(),
                           "agreement": agree})
    print(bc.markdown_table(["model", "tensors", "call", "best (us)", "median (us)",
                             "samples x calls", "baseline / ours (best)",
                             "rel. diff to ours"], rows))
    where = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "host"
    print(f"\n{bc.machine_info()['cpu']} ({where}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), k = {args.k}, {VALUES_PER_TENSOR} values per "
          "tensor")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
