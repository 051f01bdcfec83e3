"""Per-sample gradients of embedding bags: torch's per-instance ``vmap`` fallback against the
batched forward the unlearning methods' per-sample pass runs
(``mtunlearn_ext/models/batched_embeddings.py``).

``nn.EmbeddingBag`` has no ``vmap`` batching rule, so ``vmap(grad(loss))`` over a batch runs
its forward and backward once per instance (torch warns). Inside ``batchable_embeddings`` the
bag is computed from ``F.embedding`` and a sum, mean or max, which ``vmap`` batches. Each case
times ``vmap(grad(.))`` of one instance's loss over ``--batch`` instances (a bag of ``--bag``
ids each, a linear head on the bag) for both, after checking that their per-sample gradients
agree (float32, relative 1e-5). Every per-sample gradient of the table is dense (``rows x dim``
values per instance), which both pay: at large tables that write is most of the time left.

Timing: ``_bench_common.measure`` (interleaved, equal samples); "best" is the fastest sample.

Run (repository root)::

    .venv/bin/python benchmarks/per_sample_embeddings.py [--rows 1000 100000] [--dim 64]
        [--bag 20] [--batch 32] [--repeats 15] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import _bench_common as bc
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from mtunlearn_ext.models.batched_embeddings import batchable_embeddings

MODES = ("sum", "mean", "max")
#: Relative difference allowed between the two passes' per-sample gradients (float32 sums in
#: another order). ``check_agreement`` alone allows its default 1e-3: an ``agree_tol`` only
#: loosens it, so the 1e-5 this docstring states is checked here.
AGREE_TOL = 1e-5


class _BagModel(nn.Module):
    def __init__(self, rows: int, dim: int, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(rows, dim, mode=mode, padding_idx=0)
        self.head = nn.Linear(dim, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids))


def contenders(rows: int, dim: int, bag: int, batch: int, mode: str) -> list[bc.Contender]:
    torch.manual_seed(0)
    model = _BagModel(rows, dim, mode)
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, rows, (batch, bag), generator=gen)
    ids[:, bag // 2:] *= torch.rand(batch, bag - bag // 2, generator=gen) < 0.5  # padded tails
    per_sample = vmap(grad(lambda p, x: functional_call(model, p, (x[None],)).pow(2).sum()),
                      in_dims=(None, 0))

    def torch_loop() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's "performance drop" note, once per call
            return per_sample(params, ids)["bag.weight"]

    def batched() -> torch.Tensor:
        with batchable_embeddings(model):
            return per_sample(params, ids)["bag.weight"]

    return [bc.Contender("batched forward", batched),
            bc.Contender("torch fallback", torch_loop, role="baseline", vs="batched forward",
                         agree_note="float32 sums in another order")]


def checked_difference(calls: list[bc.Contender]) -> float:
    """The fallback's relative difference to the batched pass; raises
    :class:`_bench_common.Disagreement` above :data:`AGREE_TOL`."""
    row = bc.check_agreement(calls, torch.float32)["torch fallback"]
    if "error" in row or not row["rel_diff"] <= AGREE_TOL:
        raise bc.Disagreement(f"torch fallback vs batched forward: relative difference "
                              f"{row['rel_diff']:.2e} > {AGREE_TOL:.0e} {row.get('error', '')}")
    return float(row["rel_diff"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--bag", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table, record = [], []
    for rows in args.rows:
        for mode in args.modes:
            calls = contenders(rows, args.dim, args.bag, args.batch, mode)
            difference = checked_difference(calls)
            timings = {t.name: t for t in bc.measure(calls, repeats=args.repeats,
                                                     cheap_samples=args.repeats)}
            ours, theirs = timings["batched forward"], timings["torch fallback"]
            table.append([f"{rows:,}", mode, bc.fmt_ms(theirs.best), bc.fmt_ms(ours.best),
                          bc.fmt_ms(theirs.median), bc.fmt_ms(ours.median),
                          f"{theirs.best / ours.best:.1f}x",
                          f"{difference:.0e}"])
            record.append({"rows": rows, "mode": mode, "dim": args.dim, "bag": args.bag,
                           "batch": args.batch,
                           "timings": [t.as_dict() for t in timings.values()]})
    print(bc.markdown_table(["table rows", "mode", "torch fallback best (ms)",
                             "batched best (ms)", "torch fallback median (ms)",
                             "batched median (ms)", "speed-up (best)", "rel. difference"],
                            table))
    print(f"\n{bc.machine_info()['cpu']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); dim {args.dim}, bags of {args.bag}, "
          f"{args.batch} instances per pass")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
