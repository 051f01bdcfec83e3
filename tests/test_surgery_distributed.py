"""Distributed surgery on 2 CPU processes over gloo, against the single-process computation.

One ``torch.multiprocessing.spawn`` (module-scoped fixture) runs every scenario on both ranks
(process start-up dominates the cost); each rank records per scenario whether it matched the
single-process result and its largest error, and each test asserts on one scenario. The
single-process reference is computed inside every rank from the same seeds.

Scenarios:
- sharded parameter lists: the per-task stacks are cut across the ranks (whole tensors and a
  split of one tensor's coordinates); aggregate_list / project_out_list /
  project_nonconflicting_list with ``reduce=stats_all_reduce()`` (one k x k all-reduce) must
  reproduce the single-process result on every shard, globally and per layer;
- FSDP2 (``fully_shard`` on CPU / gloo): the hook in ``per_task="backward"`` mode on DTensor
  shards, two SGD steps (also with two accumulated micro-batches per step), parameters equal to
  single-process training on the full batch;
- DDP: ``replicated_surgery`` (per-task stacks averaged) under ``no_sync``, same check;
- a task whose loss reaches its head on one rank only (its loss on the other an attached zero,
  or a constant ``torch.zeros(())``): with ``head_params`` the single-process gradients of the
  rank-mean losses, without them a ValueError on every rank that says which heads differ (also
  when the ranks reached as many heads of one shape, but different ones);
- accumulate() / apply() where one rank meets a head only in its second micro-batch (the task
  has no labels in its first): the single-process gradients, with or without ``head_params``;
- FSDP2 with only the trunk sharded and a constant loss on one rank: every rank still runs one
  backward pass per task, and the trunk gets the gradients of the rank-mean losses;
- a shared parameter reached on one rank only gets the average on every rank, one reached on
  none keeps ``.grad`` None on every rank;
- ``sharded_surgery(per_layer=True)``: per tensor on FSDP2 shards, refused on a split list;
- a NaN in one rank's shard of a sharded list op: every rank raises (none waits in the
  all-reduce), and the next call's collectives still pair up;
- a task's tiny float32 gradient (1e-24) in one rank's shards only: every rank recomputes
  (or joins the recomputation of) the underflowed Gram row alike, against float64 references.

A second spawn, with a 15 s collective timeout (a regression there hangs or aborts), runs the
scenarios where ranks must agree before a collective: a sparse head one rank does not reach
(the sparse rank average on both), a rank whose shard is frozen or empty (it takes part; the
single-process result), ranks disagreeing on k (also under FSDP2, before its per-task passes),
num_layers, the Gram's dtype, or (replicated) which shared parameters or listed heads they train
(a ValueError naming it on every rank, the group still in step afterwards), and a ``group`` that
does not hold a process or an FSDP2 parameter's shards (refused when built).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mtunlearn_ext.surgery import (
    MGDA,
    Aggregator,
    Mean,
    PCGrad,
    UPGrad,
    aggregate_list,
    project_nonconflicting_list,
    project_out_list,
)

WORLD = 2
F64 = torch.float64
AGGREGATORS: dict[str, Callable[[], object]] = {
    "mean": Mean, "upgrad": UPGrad, "mgda": MGDA, "pcgrad": lambda: PCGrad(seed=3),
}
DTYPES = {"fp32": torch.float32, "fp64": F64, "bf16": torch.bfloat16}
SHAPES = [(4, 3), (6,), (5, 2), (3,)]
# Rank 0 holds params 0 and 1 and the first 4 rows of param 2; rank 1 the rest.
SPLIT_ROWS = 4
TOL = {"fp32": 2e-5, "fp64": 1e-11, "bf16": 2e-2}

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is required")


# ----------------------------------------------------------------------------- sharded lists


def _full_stacks(k: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    stacks = [torch.randn(k, *s, generator=gen, dtype=F64) for s in SHAPES]
    stacks[1] = -0.5 * stacks[0].reshape(k, -1)[:, :6] + 0.5 * stacks[1]  # some conflict
    return [s.to(dtype) for s in stacks]


def _local(stacks: list[torch.Tensor], rank: int) -> tuple[list[torch.Tensor], list[int]]:
    """This rank's shards and the index of the parameter (= layer) each came from."""
    if rank == 0:
        return [stacks[0], stacks[1], stacks[2][:, :SPLIT_ROWS].contiguous()], [0, 1, 2]
    return [stacks[2][:, SPLIT_ROWS:].contiguous(), stacks[3]], [2, 3]


def _scenario_sharded_aggregate(rank: int, agg: str, dtype_name: str, per_layer: bool) -> float:
    from mtunlearn_ext.surgery import stats_all_reduce

    dtype = DTYPES[dtype_name]
    stacks = _full_stacks(4, dtype, seed=1)
    full_outs = [torch.empty(s.shape[1:], dtype=dtype) for s in stacks]
    layer_all = list(range(len(SHAPES))) if per_layer else False
    expected = aggregate_list(AGGREGATORS[agg](), stacks, full_outs, per_layer=layer_all)
    local, owners = _local(stacks, rank)
    local_outs = [torch.empty(s.shape[1:], dtype=dtype) for s in local]
    weights = aggregate_list(AGGREGATORS[agg](), local, local_outs,
                             per_layer=owners if per_layer else False,
                             num_layers=len(SHAPES) if per_layer else None,
                             reduce=stats_all_reduce())
    torch.testing.assert_close(weights, expected, rtol=TOL[dtype_name], atol=TOL[dtype_name])
    reference, _ = _local([o.unsqueeze(0) for o in full_outs], rank)
    err = 0.0
    for got, ref in zip(local_outs, reference):
        torch.testing.assert_close(got, ref[0], rtol=TOL[dtype_name], atol=TOL[dtype_name])
        err = max(err, (got.to(F64) - ref[0].to(F64)).abs().max().item())
    return err


def _scenario_sharded_aggregate_tiny_task(rank: int, agg: str, per_layer: bool) -> float:
    """A task whose float32 gradient is tiny (1e-24) and lives in rank 1's shards only (zero
    in rank 0's): its Gram row underflowed in float32. The summed Gram tells every rank alike
    to recompute that row; rank 1 does from rescaled copies, rank 0 finds nothing to recompute,
    and both take part in the second (float64) all-reduce. Every shard gets the float64 update
    of the float32 gradients, the weights stay float32."""
    from mtunlearn_ext.surgery import stats_all_reduce

    stacks = _full_stacks(3, F64, seed=4)
    for p, stack in enumerate(stacks):
        flat = stack.reshape(3, -1)
        flat[2] = -(flat[0] + flat[1]) * 0.7 + 0.3 * flat[2] if p == 3 else 0.0
        if p == 3:
            flat[2] *= 1e-24
    stacks = [s.to(torch.float32) for s in stacks]
    layer_all = list(range(len(SHAPES))) if per_layer else [0] * len(SHAPES)
    expected_outs: list[torch.Tensor] = [torch.empty(0)] * len(SHAPES)
    expected_weights = []
    for layer in sorted(set(layer_all)):
        members = [p for p, ell in enumerate(layer_all) if ell == layer]
        j = torch.cat([stacks[p].to(F64).reshape(3, -1) for p in members], dim=1)
        w = AGGREGATORS[agg]().weighting(j @ j.T)
        expected_weights.append(w)
        for p in members:
            expected_outs[p] = (w @ stacks[p].to(F64).reshape(3, -1)).reshape(SHAPES[p])
    local, owners = _local(stacks, rank)
    local_outs = [torch.empty(s.shape[1:]) for s in local]
    weights = aggregate_list(AGGREGATORS[agg](), local, local_outs,
                             per_layer=owners if per_layer else False,
                             num_layers=len(SHAPES) if per_layer else None,
                             reduce=stats_all_reduce())
    assert weights.dtype == torch.float32
    reference_weights = torch.stack(expected_weights) if per_layer else expected_weights[0]
    torch.testing.assert_close(weights.to(F64), reference_weights, rtol=1e-5, atol=1e-7)
    reference, _ = _local([o.unsqueeze(0) for o in expected_outs], rank)
    err = 0.0
    for got, ref in zip(local_outs, reference):
        torch.testing.assert_close(got.to(F64), ref[0], rtol=1e-5, atol=1e-6)
        err = max(err, (got.to(F64) - ref[0]).abs().max().item())
    return err


def _scenario_sharded_projections(rank: int, dtype_name: str) -> float:
    from mtunlearn_ext.surgery import stats_all_reduce

    dtype = DTYPES[dtype_name]
    g, basis = _full_stacks(2, dtype, seed=2), _full_stacks(3, dtype, seed=3)
    err = 0.0
    for project in (lambda a, b, **kw: project_out_list(a, b, ridge=1e-6, **kw),
                    lambda a, b, **kw: project_nonconflicting_list(a, b, sign=-1, **kw)):
        expected = project(g, basis)
        local_g, _ = _local(g, rank)
        local_b, _ = _local(basis, rank)
        got = project(local_g, local_b, reduce=stats_all_reduce())
        reference, _ = _local(expected, rank)
        for a, b in zip(got, reference):
            torch.testing.assert_close(a, b, rtol=TOL[dtype_name], atol=TOL[dtype_name])
            err = max(err, (a.to(F64) - b.to(F64)).abs().max().item())
    return err


def _scenario_sharded_nonfinite(rank: int, call: str) -> float:
    """A NaN in one rank's shard: every rank raises FloatingPointError at the same step (the
    check reads the summed statistics), the rank holding it naming the tensor, the other saying
    that its own shards are finite; no rank is left waiting in the all-reduce. A second call
    with finite shards afterwards still pairs the ranks' collectives."""
    import re

    from mtunlearn_ext.surgery import gram_list_stats, stats_all_reduce

    def run(g: list[torch.Tensor], basis: list[torch.Tensor]) -> list[torch.Tensor]:
        if call == "aggregate":
            outs = [torch.empty(t.shape[1:], dtype=F64) for t in g]
            aggregate_list(UPGrad(), g, outs, reduce=stats_all_reduce())
            return outs
        if call == "project_out":
            return project_out_list(g, basis, ridge=1e-6, reduce=stats_all_reduce())
        if call == "project_out_kept_gram":
            kept = stats_all_reduce()(gram_list_stats(basis))
            return project_out_list(g, basis, ridge=1e-6, reduce=stats_all_reduce(),
                                    basis_gram=kept)
        return project_nonconflicting_list(g, basis, sign=-1, reduce=stats_all_reduce())

    g, _ = _local(_full_stacks(3, F64, seed=5), rank)
    basis, _ = _local(_full_stacks(2, F64, seed=6), rank)
    poisoned = [t.clone() for t in g]
    if rank == 0:
        poisoned[1][2, 3] = float("nan")
    try:
        run(poisoned, basis)
    except FloatingPointError as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {rank}: no FloatingPointError for a NaN on rank 0")
    wanted = (r"`(grads_list|g_list)\[1\]` contains NaN or Inf on this process" if rank == 0
              else r"this process's shards are finite: another process's shards contain NaN")
    assert re.search(wanted, message), message
    clean = run(g, basis)  # the ranks' collectives still pair up
    assert all(bool(torch.isfinite(t).all()) for t in clean)
    return 0.0


def _scenario_replicated_reducer(rank: int, dtype_name: str) -> float:
    """ReplicatedReducer averages per-task stacks (bf16 included) over the ranks."""
    from mtunlearn_ext.surgery import ReplicatedReducer

    dtype = DTYPES[dtype_name]
    mine = [s * (rank + 1) for s in _full_stacks(3, dtype, seed=4)]
    expected = [s.to(F64) * 1.5 for s in _full_stacks(3, dtype, seed=4)]  # mean of x1 and x2
    ReplicatedReducer().reduce_task_grads(mine, [])
    err = 0.0
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a.to(F64), b, rtol=TOL[dtype_name], atol=TOL[dtype_name])
        err = max(err, (a.to(F64) - b).abs().max().item())
    return err


# ----------------------------------------------------------------------------- models


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(3)])
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(-1) for h in self.heads]


def _data(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(2 * WORLD, 5, generator=gen, dtype=F64).to(dtype)
    y = torch.randn(3, 2 * WORLD, generator=gen, dtype=F64).to(dtype)
    y[1] = -y[0]  # conflicting tasks
    return x, y


def _losses(outs: list[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    return [((o - y[t]) ** 2).mean() for t, o in enumerate(outs)]


def _single_process_training(agg: str, dtype: torch.dtype, steps: int,
                             micro_batches: int = 1, per_layer: bool = False
                             ) -> list[torch.Tensor]:
    from mtunlearn_ext.surgery import GradientSurgery

    model = _Net(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    surgery = GradientSurgery(model.trunk.parameters(), AGGREGATORS[agg](), per_layer=per_layer)
    for step in range(steps):
        opt.zero_grad()
        for micro in range(micro_batches):
            x, y = _data(step * micro_batches + micro, dtype)
            surgery.backward(_losses(model(x), y))
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _rank_batch(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    per = x.shape[0] // WORLD
    return x[rank * per:(rank + 1) * per], y[:, rank * per:(rank + 1) * per]


def _scenario_fsdp2(rank: int, agg: str, dtype_name: str, micro_batches: int = 1,
                    per_layer: bool = False) -> float:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from mtunlearn_ext.surgery import sharded_surgery

    dtype = DTYPES[dtype_name]
    steps = 2
    expected = _single_process_training(agg, dtype, steps, micro_batches, per_layer)
    model = _Net(dtype)
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    # per_layer=True: every rank holds a shard of every tensor, so one layer per tensor lines
    # the ranks' [L, k, k] Grams up.
    surgery = sharded_surgery(model.trunk.parameters(), AGGREGATORS[agg](), per_layer=per_layer)
    assert surgery.per_task == "backward"
    for step in range(steps):
        opt.zero_grad()
        for micro in range(micro_batches):  # later micro-batches accumulate into DTensor .grad
            x, y = _rank_batch(*_data(step * micro_batches + micro, dtype), rank)
            surgery.backward(_losses(model(x), y))
        opt.step()
    err = 0.0
    for p, ref in zip(model.parameters(), expected):
        full = p.full_tensor().detach()
        torch.testing.assert_close(full, ref, rtol=TOL[dtype_name], atol=TOL[dtype_name])
        err = max(err, (full.to(F64) - ref.to(F64)).abs().max().item())
    return err


def _scenario_ddp(rank: int, agg: str, dtype_name: str, bucket_bytes: int | None = None
                  ) -> float:
    """DDP with the replicated surgery: the single-process parameters. ``bucket_bytes``: the
    averages' bucket size (distributed review: one all-reduce per tensor made the step of a
    40-layer trunk 2x slower); the default puts every stack, head and flag of a step into one
    bucket, beside the one check: 2 all-reduces a step."""
    from torch.nn.parallel import DistributedDataParallel

    from mtunlearn_ext.surgery import distributed, replicated_surgery

    dtype = DTYPES[dtype_name]
    steps = 2
    expected = _single_process_training(agg, dtype, steps)
    model = DistributedDataParallel(_Net(dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    surgery = replicated_surgery(model.module.trunk.parameters(), AGGREGATORS[agg]())
    default_bytes, all_reduce = distributed._BUCKET_BYTES, dist.all_reduce
    calls: list[int] = []

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    if bucket_bytes is not None:
        distributed._BUCKET_BYTES = bucket_bytes
    dist.all_reduce = counted  # type: ignore[assignment]
    try:
        for step in range(steps):
            x, y = _rank_batch(*_data(step, dtype), rank)
            opt.zero_grad()
            with model.no_sync():  # DDP's own all-reduce is replaced by the surgery's
                losses = _losses(model(x), y)
                surgery.backward(losses)
            opt.step()
    finally:
        distributed._BUCKET_BYTES, dist.all_reduce = default_bytes, all_reduce
    averaged = sum(3 * p.numel() for p in model.module.trunk.parameters())  # k = 3 stacks
    if bucket_bytes is None:
        assert len(calls) == 2 * steps and calls[1] > averaged, calls
    else:  # buckets of a few tensors and tensors alone, every value averaged once
        assert len(calls) > 2 * steps + 2 and sum(calls[1:len(calls) // 2]) > averaged, calls
    err = 0.0
    for p, ref in zip(model.module.parameters(), expected):
        torch.testing.assert_close(p.detach(), ref, rtol=TOL[dtype_name], atol=TOL[dtype_name])
        err = max(err, (p.detach().to(F64) - ref.to(F64)).abs().max().item())
    return err


def _scenario_replicated_unreached_head(rank: int, per_task: str, standin: str) -> float:
    """Task 2 has no labels in rank 1's batch, whose loss for it is a zero that reaches no
    head (``standin``: "attached", a zero computed from head 0's output, or "constant", a
    ``torch.zeros(())`` that does not require grad, which rank 1 refused alone while rank 0
    waited in the all-reduce). With ``head_params`` every rank gets the single-process
    gradients of the rank-mean losses (task 2's: rank 0's loss / 2), head 2 included; without
    them every rank raises, saying which heads differ (before the fix the ranks paired
    different tensors in the all-reduce, and rank 0 waited for a partner until the peer
    left)."""
    from mtunlearn_ext.surgery import GradientSurgery, replicated_surgery

    def rank_losses(model: _Net, r: int) -> list[torch.Tensor]:
        x, y = _rank_batch(*_data(7, F64), r)
        outs = model(x)
        losses = _losses(outs, y)
        if r == 1:
            losses[2] = outs[0].sum() * 0.0 if standin == "attached" else torch.zeros(())
        return losses

    reference = _Net(F64)
    per_rank = [rank_losses(reference, r) for r in range(WORLD)]
    GradientSurgery(reference.trunk.parameters(), UPGrad()).backward(
        [sum(ls[t] for ls in per_rank) / WORLD for t in range(3)])
    expected = [p.grad for p in reference.parameters()]

    model = _Net(F64)
    try:
        replicated_surgery(model.trunk.parameters(), UPGrad(), per_task=per_task).backward(
            rank_losses(model, rank))
    except ValueError as error:
        assert "reached different task-specific parameters" in str(error), error
        if standin == "constant":  # rank 1 reached heads 0 and 1 only, each by its own task
            assert ("(tensors with a gradient per rank: rank 0: 6, rank 1: 4; rank 0 has a "
                    "(1, 4) float64 tensor reached by losses[2], a (1,) float64 tensor reached "
                    "by losses[2] where rank 1 has nothing else)") in str(error), error
    else:
        raise AssertionError("ranks reaching different heads were not refused")
    model.zero_grad(set_to_none=True)
    surgery = replicated_surgery(model.trunk.parameters(), UPGrad(), per_task=per_task,
                                 head_params=iter(list(model.heads.parameters())))
    surgery.backward(rank_losses(model, rank))
    err = 0.0
    for p, ref in zip(model.parameters(), expected):
        assert p.grad is not None and ref is not None
        torch.testing.assert_close(p.grad, ref, rtol=1e-12, atol=1e-12)
        err = max(err, (p.grad - ref).abs().max().item())
    return err


def _scenario_replicated_same_shape_heads(rank: int, per_task: str) -> float:
    """Rank 0's batch has no labels for task 2, rank 1's none for task 1 (zero stand-in losses
    reaching only the trunk): both ranks reach two heads of one shape, heads 0 and 1 on rank
    0, heads 0 and 2 on rank 1. A check of their number and sizes passed, and head 1 of one
    rank was averaged with head 2 of the other, silently; every rank must raise."""
    from mtunlearn_ext.surgery import replicated_surgery

    model = _Net(F64)
    x, y = _rank_batch(*_data(8, F64), rank)
    z = model.trunk(x)
    missing = 2 if rank == 0 else 1
    losses = [z.sum() * 0.0 if t == missing else ((head(z).squeeze(-1) - y[t]) ** 2).mean()
              for t, head in enumerate(model.heads)]
    surgery = replicated_surgery(model.trunk.parameters(), UPGrad(), per_task=per_task)
    try:
        surgery.backward(losses)
    except ValueError as error:
        assert ("reached different task-specific parameters (4 tensors with a gradient on "
                "every rank; rank 0 has a (1, 4) float64 tensor reached by losses[1], a (1,) "
                "float64 tensor reached by losses[1] where rank 1 has a (1, 4) float64 tensor "
                "reached by losses[2], a (1,) float64 tensor reached by losses[2])"
                ) in str(error), error
    else:
        raise AssertionError("ranks reaching different heads of one shape were not refused")
    return 0.0


def _scenario_replicated_accumulate_head_met_late(rank: int, per_task: str) -> float:
    """accumulate() over two micro-batches; task 2 has no labels in rank 1's first one, whose
    loss for it there is a zero stand-in, so rank 1 meets head 2 only in its second
    micro-batch while rank 0 meets it in its first. Both ranks reach the same heads with the
    same tasks over the step, yet without ``head_params`` they listed them in the order they
    met them, and the check reported different heads on every rank. Against one process
    accumulating the rank-mean losses of each micro-batch: with a stand-in attached to the
    trunk (the reported case), with a constant one, and with ``head_params``."""
    from mtunlearn_ext.surgery import GradientSurgery, replicated_surgery

    def rank_losses(model: _Net, r: int, micro: int, standin: str) -> list[torch.Tensor]:
        x, y = _rank_batch(*_data(20 + micro, F64), r)
        z = model.trunk(x)
        losses = _losses([h(z).squeeze(-1) for h in model.heads], y)
        if r == 1 and micro == 0:
            losses[2] = z.sum() * 0.0 if standin == "attached" else torch.zeros(())
        return losses

    err = 0.0
    for standin, with_heads in (("attached", False), ("constant", False), ("constant", True)):
        reference = _Net(F64)
        single = GradientSurgery(reference.trunk.parameters(), UPGrad())
        for micro in range(2):
            per_rank = [rank_losses(reference, r, micro, standin) for r in range(WORLD)]
            single.accumulate([sum(ls[t] for ls in per_rank) / WORLD for t in range(3)])
        expected_weights = single.apply()
        model = _Net(F64)
        heads = {"head_params": model.heads.parameters()} if with_heads else {}
        surgery = replicated_surgery(model.trunk.parameters(), UPGrad(), per_task=per_task,
                                     **heads)
        for micro in range(2):
            surgery.accumulate(rank_losses(model, rank, micro, standin))
        weights = surgery.apply()
        torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12)
        for p, ref in zip(model.parameters(), reference.parameters()):
            assert p.grad is not None and ref.grad is not None
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-12, atol=1e-12)
            err = max(err, (p.grad - ref.grad).abs().max().item())
    return err


def _scenario_fsdp2_trunk_constant_standin(rank: int) -> float:
    """FSDP2 on the trunk only; task 2 has no labels on rank 1, whose loss for it is a
    constant. FSDP2 reduce-scatters inside each backward pass, so rank 1 must run one for task
    2 too (of zero): skipping it left rank 0 waiting. The trunk gets the single-process
    gradients of the rank-mean losses (the heads, not sharded, are each rank's own)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mtunlearn_ext.surgery import GradientSurgery, sharded_surgery

    def rank_losses(model: _Net, r: int) -> list[torch.Tensor]:
        x, y = _rank_batch(*_data(30, F64), r)
        losses = _losses(model(x), y)
        if r == 1:
            losses[2] = torch.zeros(())
        return losses

    reference = _Net(F64)
    per_rank = [rank_losses(reference, r) for r in range(WORLD)]
    GradientSurgery(reference.trunk.parameters(), UPGrad()).backward(
        [sum(ls[t] for ls in per_rank) / WORLD for t in range(3)])
    model = _Net(F64)
    fully_shard(model.trunk, mesh=init_device_mesh("cpu", (WORLD,)))
    surgery = sharded_surgery(model.trunk.parameters(), UPGrad())
    assert surgery.per_task == "backward"
    surgery.backward(rank_losses(model, rank))
    err = 0.0
    for p, ref in zip(model.trunk.parameters(), reference.trunk.parameters()):
        assert p.grad is not None and ref.grad is not None
        full = p.grad.full_tensor()
        torch.testing.assert_close(full, ref.grad, rtol=1e-12, atol=1e-12)
        err = max(err, (full - ref.grad).abs().max().item())
    return err


def _scenario_replicated_unreached_shared(rank: int, per_task: str) -> float:
    """Shared parameters no loss reaches keep ``.grad`` None (as with sum(losses).backward()),
    but the replicas must agree: ``spare`` is reached on rank 1 only, so its averaged stack is
    not zero and every rank writes it; ``idle`` is reached nowhere and stays None everywhere.
    Against one process on the rank-mean losses."""
    from mtunlearn_ext.surgery import GradientSurgery, replicated_surgery

    def build() -> tuple[_Net, nn.Linear, nn.Linear]:
        model = _Net(F64)
        return model, nn.Linear(4, 4).to(F64), nn.Linear(4, 4).to(F64)

    def rank_losses(model: _Net, spare: nn.Linear, r: int) -> list[torch.Tensor]:
        x, y = _rank_batch(*_data(9, F64), r)
        z = model.trunk(x)
        if r == 1:
            z = z + torch.tanh(spare(z))
        return _losses([h(z).squeeze(-1) for h in model.heads], y)

    model, spare, idle = build()
    shared = [*model.trunk.parameters(), *spare.parameters(), *idle.parameters()]
    per_rank = [rank_losses(model, spare, r) for r in range(WORLD)]
    GradientSurgery(shared, UPGrad()).backward(
        [sum(ls[t] for ls in per_rank) / WORLD for t in range(3)])
    expected = [None if p.grad is None else p.grad.clone() for p in shared]
    assert expected[-1] is None and expected[-3] is not None

    err = 0.0
    for with_heads in (False, True):  # the flags travel with either path's collectives
        model, spare, idle = build()
        shared = [*model.trunk.parameters(), *spare.parameters(), *idle.parameters()]
        heads = {"head_params": model.heads.parameters()} if with_heads else {}
        replicated_surgery(shared, UPGrad(), per_task=per_task, **heads).backward(
            rank_losses(model, spare, rank))
        for p, ref in zip(shared, expected):
            if ref is None:
                assert p.grad is None
                continue
            assert p.grad is not None
            torch.testing.assert_close(p.grad, ref, rtol=1e-12, atol=1e-12)
            err = max(err, (p.grad - ref).abs().max().item())
    return err


def _scenario_sharded_per_layer_true_on_a_split(rank: int) -> float:
    """``per_layer=True`` on a list split across ranks (rank 0 two tensors, rank 1 one): each
    rank numbered its own tensors as layers, and the all-reduce of Grams of other layouts
    aborted a process in gloo ("Received data size doesn't match"), or with as many tensors
    added the Grams of unrelated tensors. Refused on every rank, before any collective."""
    from mtunlearn_ext.surgery import sharded_surgery

    first, second = nn.Linear(3, 4).to(F64), nn.Linear(4, 2).to(F64)
    mine = list(first.parameters()) if rank == 0 else [second.weight]
    try:
        sharded_surgery(mine, UPGrad(), per_layer=True)
    except ValueError as error:
        assert "per_layer=True (one problem per tensor) needs every shared parameter to be a " \
               "DTensor" in str(error), error
    else:
        raise AssertionError("per_layer=True on a split parameter list was accepted")
    return 0.0


def _tanh_chain(seed: int, conflict: float = 0.0
                ) -> tuple[list[nn.Parameter], Callable[[], list[torch.Tensor]]]:
    """Four seeded 3x3 float64 layers of a tanh chain and its two task losses (the second
    minus ``conflict`` times the first: conflicting tasks), for the hook on a split list."""
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(3, 3, dtype=F64, generator=gen)) for _ in range(4)]
    x = torch.randn(5, 3, dtype=F64, generator=gen)

    def losses() -> list[torch.Tensor]:
        z = x
        for p in params:
            z = torch.tanh(z @ p)
        first, second = (z[:, 0] ** 2).mean(), ((z[:, 1] - 1) ** 2).mean()
        return [first, second - conflict * first if conflict else second]

    return params, losses


def _scenario_sharded_surgery_split_per_layer(rank: int) -> float:
    """The hook on a parameter list split across ranks (rank 0 holds layers 0-1, rank 1 layers
    2-3), one problem per layer, against the hook on the whole list in one process. With
    global ids and ``num_layers`` every rank reduces one [L, k, k] layout; without
    ``num_layers`` each rank would have numbered its own layers from 0 (the all-reduce then
    added Grams of different layers: wrong weights, silently), so it is refused."""
    from mtunlearn_ext.surgery import GradientSurgery, sharded_surgery

    params, losses = _tanh_chain(seed=7, conflict=0.7)
    expected_weights = GradientSurgery(params, UPGrad(), per_layer=[0, 1, 2, 3]).backward(
        losses())
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    mine = [0, 1] if rank == 0 else [2, 3]
    try:
        sharded_surgery([params[i] for i in mine], UPGrad(), per_layer=mine)
    except ValueError as error:
        assert "need `num_layers`" in str(error)
    else:
        raise AssertionError("per_layer ids without num_layers were accepted")
    surgery = sharded_surgery([params[i] for i in mine], UPGrad(), per_layer=mine, num_layers=4)
    weights = surgery.backward(losses())
    torch.testing.assert_close(weights, expected_weights, rtol=1e-11, atol=1e-11)
    err = 0.0
    for i in mine:
        torch.testing.assert_close(params[i].grad, expected[i], rtol=1e-11, atol=1e-11)
        err = max(err, (params[i].grad - expected[i]).abs().max().item())
    return err


def _scenario_sharded_surgery_nonfinite_on_one_rank(rank: int, how: str = "upgrad") -> float:
    """The hook on a split parameter list where rank 0's gradient of one layer turns NaN: both
    ranks' ``backward`` raise FloatingPointError in the same step (rank 0 naming the losses, rank
    1 saying its own shards are finite), no ``.grad`` is written, and the next step runs on
    both ranks. Also with ``Mean`` and ``check_finite=True`` (``how="mean"``), which reads no
    Gram, the collective where the others learn of the NaN: rank 1 went on alone (mutation
    review), and with rank 1 holding no shard taking part (``"mean_joining"``)."""
    from mtunlearn_ext.surgery import Mean, sharded_surgery

    params, losses = _tanh_chain(seed=8)
    joining = how == "mean_joining"
    if joining:  # rank 1 holds no shard: only layers 0-1 take part, on rank 0
        for p in params[2:]:
            p.requires_grad_(False)
    mine = [0, 1] if rank == 0 else ([] if joining else [2, 3])
    surgery = (sharded_surgery([params[i] for i in mine], UPGrad()) if how == "upgrad" else
               sharded_surgery([params[i] for i in mine], Mean(), check_finite=True))
    if joining and rank == 1:
        for p in params[:2]:
            p.requires_grad_(False)
    hook = (params[1].register_hook(lambda g: torch.full_like(g, float("nan"))) if rank == 0
            else None)
    try:
        surgery.backward(losses())
    except FloatingPointError as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {rank}: a NaN gradient on rank 0 was not refused")
    finally:
        if hook is not None:
            hook.remove()
    wanted = ("the gradients of losses[0] (first in 'param1'), losses[1] (first in 'param1') "
              "hold NaN" if rank == 0 else "this process's shards are finite")
    assert wanted in message, message
    assert all(params[i].grad is None for i in mine)
    surgery.backward(losses())
    assert all(params[i].grad is not None and bool(torch.isfinite(params[i].grad).all())
               for i in mine)
    return 0.0


# ------------------------------------------- ranks that must agree (own spawn, short timeout)


def _rank_mean_reference(build: Callable[[], Any], rank_losses: Callable[[Any, int],
                                                                      list[torch.Tensor]]
                         ) -> Any:
    """Modules from ``build()`` with the single-process surgery's gradients (UPGrad over the
    first module's parameters) of the rank-mean losses: what every rank must get."""
    from mtunlearn_ext.surgery import GradientSurgery

    reference = build()
    per_rank = [rank_losses(reference, r) for r in range(WORLD)]
    k = len(per_rank[0])
    GradientSurgery(reference[0].parameters(), UPGrad()).backward(
        [sum(ls[t] for ls in per_rank) / WORLD for t in range(k)])
    return reference


def _scenario_replicated_sparse_head_unreached(rank: int) -> float:
    """A sparse head (``nn.Embedding(sparse=True)``, listed in ``head_params``) that rank 1
    does not reach (its task has no labels there: a constant stand-in). Rank 1 filled it with
    a dense zero while rank 0 held a sparse gradient: a dense all-reduce against a sparse one,
    and both ranks waited until the timeout. Every rank must get the sparse rank average (the
    single-process gradients of the rank-mean losses)."""
    from mtunlearn_ext.surgery import replicated_surgery

    def build() -> tuple[nn.Linear, nn.Embedding, nn.Linear]:
        torch.manual_seed(0)
        return (nn.Linear(4, 4).double(), nn.Embedding(10, 4, sparse=True).double(),
                nn.Linear(4, 1).double())

    def rank_losses(parts: tuple[nn.Linear, nn.Embedding, nn.Linear], r: int
                    ) -> list[torch.Tensor]:
        trunk, emb, head = parts
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(r), dtype=F64)
        f = trunk(x)
        first = ((f * emb(torch.tensor([1, 2, 3]))).sum() if r == 0
                 else torch.zeros((), dtype=F64))
        return [first, head(f).pow(2).mean()]

    reference = _rank_mean_reference(build, rank_losses)
    parts = build()
    surgery = replicated_surgery(parts[0].parameters(), UPGrad(),
                                 head_params=[*parts[1].parameters(), *parts[2].parameters()])
    surgery.backward(rank_losses(parts, rank))
    got_emb, ref_emb = parts[1].weight.grad, reference[1].weight.grad
    assert got_emb is not None and ref_emb is not None
    assert got_emb.layout == torch.sparse_coo, got_emb.layout
    err = 0.0
    pairs = [(got_emb.to_dense(), ref_emb.to_dense())]
    pairs += [(p.grad, q.grad) for m, n in ((parts[0], reference[0]), (parts[2], reference[2]))
              for p, q in zip(m.parameters(), n.parameters())]
    for got, ref in pairs:
        assert got is not None and ref is not None
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        err = max(err, (got - ref).abs().max().item())
    return err


def _scenario_sharded_shard_frozen_or_empty(rank: int, how: str) -> float:
    """Rank 0 holds layers 0-1 of a split list and rank 1 layers 2-3, which are frozen on
    every rank this step (``how="frozen"``: staged fine-tuning), or rank 1 holds no shard at
    all (``how="empty"``, fewer tensors than ranks; its layers frozen too, so that the list
    is all the surgery reaches), also with global per-layer ids (``"empty_per_layer"``).
    Rank 1 raised alone ("none of the shared parameters requires grad" / "holds no tensor")
    and rank 0 waited in the all-reduce. It must take part with a zero Gram (in rank 0's
    float64, from its own float32 stand-in): both ranks get the weights of the single-process
    surgery over layers 0-1, rank 0 its update, rank 1's layers keep ``.grad`` None."""
    from mtunlearn_ext.surgery import GradientSurgery, sharded_surgery

    params, losses = _tanh_chain(seed=9, conflict=0.6)
    for p in params[2:]:
        p.requires_grad_(False)
    per_layer = how == "empty_per_layer"
    expected_weights = GradientSurgery(params[:2], UPGrad(),
                                       per_layer=[0, 1] if per_layer else False).backward(
        losses())
    expected = [p.grad.clone() for p in params[:2]]
    for p in params:
        p.grad = None
    mine = [0, 1] if rank == 0 else ([] if how.startswith("empty") else [2, 3])
    kwargs: dict[str, object] = {"per_layer": mine, "num_layers": 2} if per_layer else {}
    surgery = sharded_surgery([params[i] for i in mine], UPGrad(), **kwargs)
    current = losses()
    if rank == 1:  # nothing of its own to update: its copies of layers 0-1 are not its shard
        for p in params[:2]:
            p.requires_grad_(False)
        current = losses()
    weights = surgery.backward(current)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-11, atol=1e-11)
    assert all(p.grad is None for p in params[2:])
    err = 0.0
    if rank == 0:
        for p, ref in zip(params[:2], expected):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, ref, rtol=1e-11, atol=1e-11)
            err = max(err, (p.grad - ref).abs().max().item())
    return err


def _scenario_disagreeing_ranks(rank: int, what: str) -> float:
    """Ranks that disagree on k (the number of losses), on ``num_layers``, on the Gram's
    dtype, or on which shared parameters or listed heads they train (replicated): the
    collectives got different sizes, and gloo aborted both processes (SIGABRT, uncatchable;
    NCCL hangs). Every rank must raise a ValueError naming what differs with each rank's
    value, and the next collective must still pair up."""
    from mtunlearn_ext.surgery import replicated_surgery, sharded_surgery

    params, losses = _tanh_chain(seed=10, conflict=0.5)
    current = losses()
    if what == "dtype" and rank == 1:  # float32 shards here: a float32 Gram
        params = [nn.Parameter(p.detach().float()) for p in params]
        z = torch.ones(5, 3)
        for p in params:
            z = torch.tanh(z @ p)
        current = [(z[:, 0] ** 2).mean(), ((z[:, 1] - 1) ** 2).mean()]
    mine = [0, 1] if rank == 0 else [2, 3]
    if what.startswith("k"):
        k = 2 + rank
        current = [*current, current[0] * 0.5][:k]
    if what == "k_replicated" or what == "k_replicated_heads":
        heads = {"head_params": params[2:]} if what.endswith("heads") else {}
        surgery = replicated_surgery(params[:2], UPGrad(), **heads)  # type: ignore[arg-type]
        wanted = ("replicated_surgery: the ranks passed different numbers of losses k "
                  "(rank 0: 2, rank 1: 3)")
    elif what.startswith("frozen_shared"):
        # One shared layer frozen on rank 1 only ("count": the header sizes differed and gloo
        # aborted), or a different one of the same shape on each rank ("swapped": the
        # averages paired layer 0's gradients with layer 1's, silently).
        # ("all": every shared layer frozen on rank 1, which has no stack to tell k and said
        # 0: the ranks were told they passed different numbers of losses.)
        frozen = 0 if what.endswith("count") else rank
        if what.endswith("swapped") or rank == 1:
            params[frozen].requires_grad_(False)
        if "all" in what and rank == 1:
            for p in params[:2]:
                p.requires_grad_(False)
        heads = {"head_params": params[2:]} if "heads" in what else {}
        surgery = replicated_surgery(params[:2], UPGrad(), **heads)  # type: ignore[arg-type]
        current = losses()
        wanted = ("replicated_surgery: the ranks take part with different shared parameters "
                  "(shared parameters requiring grad per rank: "
                  + ("rank 0: 2, rank 1: 0; rank 0 has 'param0': a (3, 3) float64 tensor, "
                     "'param1': a (3, 3) float64 tensor where rank 1 has nothing else)"
                     if "all" in what else
                     "rank 0: 2, rank 1: 1; rank 0 has 'param0': a (3, 3) float64 tensor "
                     "where rank 1 has nothing else)" if what.endswith("count") else
                     "rank 0: 1, rank 1: 1; rank 0 has 'param1': a (3, 3) float64 tensor "
                     "where rank 1 has 'param0': a (3, 3) float64 tensor)"))
    elif what == "frozen_head":  # a listed head frozen on rank 1 only: gloo aborted
        if rank == 1:
            params[3].requires_grad_(False)
        surgery = replicated_surgery(params[:2], UPGrad(), head_params=params[2:])
        current = losses()
        wanted = ("replicated_surgery: the ranks train different parameters of `head_params` "
                  "(the positions in it of those requiring grad: rank 0: [0, 1] (2); rank 1: "
                  "[0] (1))")
    elif what.startswith("aggregator"):
        # Each rank its own aggregator: the replicas' updates drifted apart (replicated), the
        # shards' weights disagreed (sharded), and a rank with a Gram-free one (Mean) left
        # the other in the Gram's all-reduce, with no error.
        if what.endswith("seed"):  # a seed drawn per rank: each rank other task orders
            chosen: Aggregator = PCGrad(seed=rank)
            said = ("rank 0: PCGrad(seed=0, reshuffle=True) with state {'weighting': "
                    "{'calls': 0}}; rank 1: PCGrad(seed=1, reshuffle=True) with state "
                    "{'weighting': {'calls': 0}}")
        else:
            chosen = UPGrad() if rank == 0 else Mean()
            said = "rank 0: UPGrad(pref_vector=None, reg_eps=0.0); rank 1: Mean()"
        if "sharded" in what:
            surgery = sharded_surgery([params[i] for i in mine], chosen)
            caller = "sharded_surgery"
        else:
            heads = {"head_params": params[2:]} if what.endswith("heads") else {}
            surgery = replicated_surgery(params[:2], chosen, **heads)  # type: ignore[arg-type]
            caller = "replicated_surgery"
        wanted = f"{caller}: the ranks aggregate with different aggregators ({said})"
    elif what == "num_layers":
        surgery = sharded_surgery([params[i] for i in mine], UPGrad(), per_layer=mine,
                                  num_layers=4 + rank)
        wanted = "differ in num_layers (rank 0: 4, rank 1: 5)"
    else:
        surgery = sharded_surgery([params[i] for i in mine], UPGrad())
        wanted = ("sharded_surgery: the ranks passed different numbers of losses k (rank 0: 2, "
                  "rank 1: 3), so the ranks' Grams cannot be added up" if what == "k"
                  else "differ in dtype (rank 0: float64, rank 1: float32)")
    try:
        surgery.backward(current)
    except ValueError as error:
        assert wanted in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: ranks disagreeing on {what} were not refused")
    check = torch.ones(1)
    dist.all_reduce(check)  # still in step
    assert check.item() == WORLD
    return 0.0


def _scenario_fsdp_sync_off(rank: int, how: str) -> float:
    """Distributed review: under ``set_requires_gradient_sync(False)`` FSDP2 keeps each pass's
    gradient unsharded and adds it into the next synced pass, so the tasks' gradients mixed and
    the parameters ended 4.5e-3 off the single-process run, with no error (2 micro-batches, sync
    off in the first). Every rank now refuses the micro-batch whose passes wrote no gradient,
    naming the sync, through ``backward`` and ``accumulate`` alike, and stays in step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mtunlearn_ext.surgery import sharded_surgery

    model = _Net(F64)
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    surgery = sharded_surgery(model.trunk.parameters(), UPGrad())
    model.set_requires_gradient_sync(False)
    x, y = _rank_batch(*_data(0, F64), rank)
    losses = _losses(model(x), y)
    try:
        if how == "backward":
            surgery.backward(losses)
        else:
            surgery.accumulate(losses)
    except RuntimeError as error:
        assert "FSDP2's gradient sync is most likely off" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: passes with gradient sync off were not refused")
    assert all(p.grad is None for p in model.trunk.parameters())
    check = torch.ones(1)
    dist.all_reduce(check)  # still in step
    assert check.item() == WORLD
    return 0.0


def _scenario_fsdp2_disagreeing_k(rank: int) -> float:
    """Distributed review: under FSDP2 (``per_task="backward"``) rank 0 passed 3 losses and
    rank 1 2; each pass runs FSDP2's reduce-scatters, so rank 0 waited in its third pass and
    rank 1 in the check after its passes: a hang until the group's timeout, then gloo's "Timed
    out waiting" naming nothing. Every rank must raise a ValueError naming each rank's k before
    the passes, leave no gradient written, and stay in step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mtunlearn_ext.surgery import sharded_surgery

    model = _Net(F64)
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    surgery = sharded_surgery(model.trunk.parameters(), UPGrad())
    x, y = _rank_batch(*_data(0, F64), rank)
    losses = _losses(model(x), y)[:3 - rank]
    try:
        surgery.backward(losses)
    except ValueError as error:
        assert ("sharded_surgery: the ranks passed different numbers of losses k (rank 0: 3, "
                "rank 1: 2)") in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: ranks passing different k were not refused")
    assert all(p.grad is None for p in model.parameters())
    check = torch.ones(1)
    dist.all_reduce(check)  # still in step
    assert check.item() == WORLD
    return 0.0


def _scenario_group_without_this_rank(rank: int, how: str) -> float:
    """Distributed review: a surgery given a ``group`` that does not hold this process went on
    alone (torch's collectives only warn there): a split list's rank 1 used its local Gram
    (results 1.5e-2 off, no error), a replicated one failed on a missing work handle. It is
    refused when built, on that process only (the group's members go on among themselves);
    FSDP2 parameters sharded over ranks outside ``group`` (one-process subgroups of a
    2-process mesh) are refused on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mtunlearn_ext.surgery import replicated_surgery, sharded_surgery

    if how == "fsdp2_subgroup":
        own, _ = dist.new_subgroups(group_size=1)
        model = _Net(F64)
        mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.trunk, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            sharded_surgery(model.trunk.parameters(), UPGrad(), group=own)
        except ValueError as error:
            assert "is sharded over ranks [0, 1] (2) (mesh dimension 0), not all in `group` " \
                   f"(ranks [{rank}] (1))" in str(error), str(error)
        else:
            raise AssertionError(f"rank {rank}: shards outside `group` were not refused")
        return 0.0
    only_rank_0 = dist.new_group([0])
    params, losses = _tanh_chain(seed=10, conflict=0.5)
    build = {"sharded": sharded_surgery, "replicated": replicated_surgery}[how]
    try:
        surgery = build(params[:2], UPGrad(), group=only_rank_0)  # type: ignore[operator]
    except ValueError as error:
        assert rank == 1, f"rank {rank} is in the group: {error}"
        assert (f"{how}_surgery: this process (rank 1) is not in `group` (ranks [0] (1))"
                in str(error)), str(error)
    else:
        assert rank == 0, "rank 1 is not in the group, and was not refused"
        surgery.backward(losses())  # a group of one: its own step, no peer to wait for
    check = torch.ones(1)
    dist.all_reduce(check)  # the default group still in step
    assert check.item() == WORLD
    return 0.0


def _scenario_replicated_sparse_head_mixed_layout(rank: int) -> float:
    """Review of the fix above: a head sparse on one rank (``emb(idx)``) and dense on the
    other (``F.embedding(idx, emb.weight)``) was converted with the wrong number of sparse
    dimensions (2 for 1), and the sparse all-reduces aborted both processes. Every rank must
    get the rank average (the single-process gradient of the rank-mean losses)."""
    from mtunlearn_ext.surgery import replicated_surgery

    def build() -> tuple[nn.Linear, nn.Embedding]:
        torch.manual_seed(1)
        return nn.Linear(4, 4).double(), nn.Embedding(10, 4, sparse=True).double()

    def rank_losses(parts: tuple[nn.Linear, nn.Embedding], r: int) -> list[torch.Tensor]:
        trunk, emb = parts
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(r), dtype=F64)
        f = trunk(x)
        idx = torch.tensor([1, 2, 3])
        rows = emb(idx) if r == 0 else nn.functional.embedding(idx, emb.weight)
        return [(f * rows).sum(), f.pow(2).mean()]

    reference = _rank_mean_reference(build, rank_losses)
    parts = build()
    surgery = replicated_surgery(parts[0].parameters(), UPGrad(),
                                 head_params=list(parts[1].parameters()))
    surgery.backward(rank_losses(parts, rank))
    got, ref = parts[1].weight.grad, reference[1].weight.grad
    assert got is not None and ref is not None and got.layout == torch.sparse_coo
    torch.testing.assert_close(got.to_dense(), ref.to_dense(), rtol=1e-12, atol=1e-12)
    return (got.to_dense() - ref.to_dense()).abs().max().item()


def _scenario_sharded_unreached_float64(rank: int) -> float:
    """Review of the fix above: rank 0 holds A (float32, reached) and B (float64, not reached
    this step), rank 1 holds C (float64). Rank 0's Gram, over the reached A alone, was float32
    and rank 1's float64: the step was refused although the shard holds a float64 tensor and
    the whole list aggregates fine in one process. It must give the single-process weights."""
    from mtunlearn_ext.surgery import GradientSurgery, sharded_surgery

    gen = torch.Generator().manual_seed(4)
    a = nn.Parameter(torch.randn(3, 3, generator=gen))
    b = nn.Parameter(torch.randn(3, 3, dtype=F64, generator=gen))
    c = nn.Parameter(torch.randn(3, 3, dtype=F64, generator=gen))
    x = torch.randn(5, 3, dtype=F64, generator=gen)

    def losses() -> list[torch.Tensor]:
        z = torch.tanh(torch.tanh(x @ a.double()) @ c)  # b: not reached this step
        return [(z[:, 0] ** 2).mean(), ((z[:, 1] - 1) ** 2).mean() - 0.5 * (z[:, 0] ** 2).mean()]

    expected = GradientSurgery([a, b, c], UPGrad()).backward(losses())
    for p in (a, b, c):
        p.grad = None
    weights = sharded_surgery([a, b] if rank == 0 else [c], UPGrad()).backward(losses())
    torch.testing.assert_close(weights.double(), expected.double(), rtol=1e-5, atol=1e-6)
    assert b.grad is None
    return (weights.double() - expected.double()).abs().max().item()


def _scenario_sharded_every_shard_frozen(rank: int) -> float:
    """Every rank's shard frozen: each rank joined with a zero Gram and the step passed with
    made-up weights and no word. Every rank must raise, as one process does."""
    from mtunlearn_ext.surgery import sharded_surgery

    params, losses = _tanh_chain(seed=11, conflict=0.5)
    for p in params:
        p.requires_grad_(False)
    params[0].requires_grad_(True)  # something for the losses to reach, outside the shards
    surgery = sharded_surgery(params[2:] if rank == 0 else params[3:], UPGrad(),
                              head_params=[params[0]])
    try:
        surgery.backward(losses())
    except ValueError as error:
        assert "no rank holds a shared parameter taking part" in str(error), str(error)
    else:
        raise AssertionError(f"rank {rank}: a step with every shard frozen was not refused")
    check = torch.ones(1)
    dist.all_reduce(check)
    assert check.item() == WORLD
    return 0.0


def _scenario_apply_on_a_rank_without_a_shard(rank: int) -> float:
    """``apply(stacks)`` on a rank without a shard cannot know k: it raised "all frozen",
    which misled. It says so and names the calls that join (the other rank does not call
    here: it would wait for this one until the timeout)."""
    from mtunlearn_ext.surgery import sharded_surgery

    params, _ = _tanh_chain(seed=12)
    if rank == 1:
        try:
            sharded_surgery([], UPGrad()).apply([])
        except ValueError as error:
            assert "explicit stacks cannot tell it the number of tasks k" in str(error)
        else:
            raise AssertionError("apply([]) on a rank without a shard was not refused")
    check = torch.ones(1)
    dist.all_reduce(check)
    assert check.item() == WORLD
    return 0.0


def _agreement_scenarios() -> dict[str, Callable[[int], float]]:
    table: dict[str, Callable[[int], float]] = {
        "replicated_sparse_head_unreached-upgrad-fp64": _scenario_replicated_sparse_head_unreached,
        "replicated_sparse_head_mixed_layout-upgrad-fp64":
            _scenario_replicated_sparse_head_mixed_layout,
        "sharded_unreached_float64-upgrad": _scenario_sharded_unreached_float64,
        "sharded_every_shard_frozen-upgrad": _scenario_sharded_every_shard_frozen,
        "sharded_apply_without_a_shard": _scenario_apply_on_a_rank_without_a_shard,
    }
    for how in ("backward", "accumulate"):
        table[f"fsdp_sync_off-{how}"] = lambda r, h=how: _scenario_fsdp_sync_off(r, h)
    for how in ("frozen", "empty", "empty_per_layer"):
        table[f"sharded_shard_{how}-upgrad-fp64"] = (
            lambda r, h=how: _scenario_sharded_shard_frozen_or_empty(r, h))
    table["disagreeing_ranks-k_fsdp2"] = _scenario_fsdp2_disagreeing_k
    for how in ("sharded", "replicated", "fsdp2_subgroup"):
        table[f"group_without_this_rank-{how}"] = (
            lambda r, h=how: _scenario_group_without_this_rank(r, h))
    for what in ("k", "num_layers", "dtype", "k_replicated", "k_replicated_heads",
                 "frozen_shared_count", "frozen_shared_swapped", "frozen_shared_heads_count",
                 "frozen_shared_heads_swapped", "frozen_shared_all", "frozen_shared_all_heads",
                 "frozen_head", "aggregator_replicated", "aggregator_replicated_heads",
                 "aggregator_replicated_seed", "aggregator_sharded", "aggregator_sharded_seed"):
        table[f"disagreeing_ranks-{what}"] = lambda r, w=what: _scenario_disagreeing_ranks(r, w)
    return table


# ----------------------------------------------------------------------------- harness


def _scenarios() -> dict[str, Callable[[int], float]]:
    table: dict[str, Callable[[int], float]] = {}
    for agg in AGGREGATORS:
        for dt in ("fp32", "fp64", "bf16"):
            table[f"sharded_aggregate-{agg}-{dt}"] = (
                lambda r, a=agg, d=dt: _scenario_sharded_aggregate(r, a, d, per_layer=False))
        table[f"sharded_aggregate_per_layer-{agg}-fp64"] = (
            lambda r, a=agg: _scenario_sharded_aggregate(r, a, "fp64", per_layer=True))
    for agg in ("upgrad", "pcgrad", "mgda"):
        for per_layer in (False, True):
            table[f"sharded_aggregate_tiny_task-{agg}-{'per_layer' if per_layer else 'global'}"] = (
                lambda r, a=agg, pl=per_layer: _scenario_sharded_aggregate_tiny_task(r, a, pl))
    for dt in ("fp32", "fp64"):
        table[f"sharded_projections-{dt}"] = lambda r, d=dt: _scenario_sharded_projections(r, d)
    for call in ("aggregate", "project_out", "project_out_kept_gram", "nonconflicting"):
        table[f"sharded_nonfinite-{call}"] = lambda r, c=call: _scenario_sharded_nonfinite(r, c)
    for dt in ("fp32", "bf16"):
        table[f"replicated_reducer-{dt}"] = lambda r, d=dt: _scenario_replicated_reducer(r, d)
    for agg in ("upgrad", "pcgrad", "mgda"):
        table[f"fsdp2-{agg}-fp32"] = lambda r, a=agg: _scenario_fsdp2(r, a, "fp32")
        table[f"ddp-{agg}-fp32"] = lambda r, a=agg: _scenario_ddp(r, a, "fp32")
    table["ddp_small_buckets-upgrad-fp64"] = lambda r: _scenario_ddp(r, "upgrad", "fp64", 200)
    table["fsdp2-upgrad-fp64"] = lambda r: _scenario_fsdp2(r, "upgrad", "fp64")
    table["fsdp2_accumulate-upgrad-fp32"] = lambda r: _scenario_fsdp2(r, "upgrad", "fp32", 2)
    table["sharded_surgery_split_per_layer-upgrad-fp64"] = (
        _scenario_sharded_surgery_split_per_layer)
    table["fsdp2_per_layer-upgrad-fp32"] = lambda r: _scenario_fsdp2(r, "upgrad", "fp32",
                                                                        per_layer=True)
    table["sharded_per_layer_true_on_a_split"] = _scenario_sharded_per_layer_true_on_a_split
    for how in ("upgrad", "mean", "mean_joining"):
        table[f"sharded_surgery_nonfinite_on_one_rank-{how}"] = (
            lambda r, h=how: _scenario_sharded_surgery_nonfinite_on_one_rank(r, h))
    table["fsdp2_trunk_constant_standin-upgrad-fp64"] = _scenario_fsdp2_trunk_constant_standin
    for mode in ("autograd", "batched"):
        for standin in ("attached", "constant"):
            table[f"replicated_unreached_head-{standin}-{mode}-fp64"] = (
                lambda r, m=mode, s=standin: _scenario_replicated_unreached_head(r, m, s))
        table[f"replicated_accumulate_head_met_late-{mode}-fp64"] = (
            lambda r, m=mode: _scenario_replicated_accumulate_head_met_late(r, m))
        table[f"replicated_same_shape_heads-{mode}-fp64"] = (
            lambda r, m=mode: _scenario_replicated_same_shape_heads(r, m))
        table[f"replicated_unreached_shared-{mode}-fp64"] = (
            lambda r, m=mode: _scenario_replicated_unreached_shared(r, m))
    return table


#: Each table runs in its own spawn. The agreement scenarios, whose regressions hang (a
#: collective no other rank joins) or abort a process, get a short collective timeout, so that a
#: regression fails in seconds instead of holding CI, and cannot leave the main table's process
#: group out of step.
_TABLES: dict[str, tuple[Callable[[], dict[str, Callable[[int], float]]], int]] = {
    "main": (_scenarios, 60),
    "agreement": (_agreement_scenarios, 15),
}


def _worker(rank: int, init_file: str, out_dir: str, table: str = "main") -> None:
    import warnings

    # The process's own stderr (C++ aborts included) goes to a file the fixture can quote.
    log = os.open(Path(out_dir, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 2)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # two processes on two cores
    scenarios, timeout_s = _TABLES[table]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))
    results: dict[str, dict[str, object]] = {}
    try:
        for name, run in scenarios().items():
            try:
                results[name] = {"ok": True, "max_err": run(rank)}
            except Exception:  # recorded per scenario; the other rank runs the same collectives
                results[name] = {"ok": False, "error": traceback.format_exc()}
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
        Path(out_dir, f"rank{rank}.destroyed").touch()
    # Past this point CI showed a worker abort in the interpreter's exit, after
    # destroy_process_group had returned: "terminate called without an active exception" (a
    # C++ thread of torch's still joinable when static objects are destroyed; the extension
    # starts no threads). Everything is recorded, so the worker leaves without that exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _teardown_report(out_dir: str | os.PathLike[str]) -> str:
    """Where each rank got to in its teardown, and the end of its stderr."""
    lines = []
    for r in range(WORLD):
        stage = ("after destroy_process_group (interpreter exit)"
                 if Path(out_dir, f"rank{r}.destroyed").exists() else
                 "before destroy_process_group returned")
        try:
            tail = Path(out_dir, f"rank{r}.stderr").read_text(errors="replace")[-1500:].strip()
        except OSError:
            tail = "(no stderr file)"
        lines.append(f"rank {r}: {stage}; stderr: {tail or '(empty)'}")
    return "\n".join(lines)


def _recorded_results(out_dir: str | os.PathLike[str], table: str = "main"
                      ) -> list[dict[str, dict]] | None:
    """Both ranks' outcomes when each wrote one for every scenario, else None."""
    names = set(_TABLES[table][0]())
    results = []
    for r in range(WORLD):
        path = Path(out_dir, f"rank{r}.json")
        try:
            outcome = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if set(outcome) != names:
            return None
        results.append(outcome)
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    return _spawn_table(tmp_path_factory, "main")


@pytest.fixture(scope="module")
def agreement_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    return _spawn_table(tmp_path_factory, "agreement")


def _spawn_table(tmp_path_factory: pytest.TempPathFactory, table: str
                 ) -> list[dict[str, dict]]:
    # A scenario's own failure is recorded in the rank's JSON and never raises; an exception out
    # of spawn is the process group failing to form or to tear down (seen once in ~12 full runs
    # on the shared 2-core machine). That gets one retry in a fresh directory, and a warning
    # with the first failure; a second failure is an error.
    # A worker that aborts after both ranks wrote every scenario's outcome failed in the process
    # group's teardown: its results stand, no retry. CI showed such a SIGABRT in 5 of ~10 full
    # runs (never in 80 runs of this file alone, loaded or not); the quoted stderr placed it in
    # the interpreter's exit, which the workers now skip (see _worker). Either warning says
    # whether each rank got past destroy_process_group and quotes its stderr.
    first_failure: Exception | None = None
    for attempt in range(2):
        out_dir = tmp_path_factory.mktemp("dist")
        init_file = os.path.join(out_dir, "init")
        try:
            mp.spawn(_worker, args=(init_file, str(out_dir), table), nprocs=WORLD, join=True)
        except Exception as error:  # noqa: BLE001 - re-raised below on the second attempt
            recorded = _recorded_results(out_dir, table)
            if recorded is not None:
                warnings.warn(f"distributed workers failed after recording every scenario "
                              f"(teardown): {error!r}\n{_teardown_report(out_dir)}",
                              stacklevel=1)
                return recorded
            if attempt == 1:
                raise RuntimeError(f"the gloo workers failed twice; first: {first_failure!r}"
                                   ) from error
            first_failure = error
            warnings.warn(f"distributed workers failed, retrying once: {error!r}\n"
                          f"{_teardown_report(out_dir)}", stacklevel=1)
            continue
        recorded = _recorded_results(out_dir, table)
        assert recorded is not None, "a worker exited cleanly without recording every scenario"
        return recorded
    raise AssertionError("unreachable")


@pytest.mark.parametrize("scenario", sorted(_scenarios()))
def test_distributed_equals_single_process(distributed_results: list[dict[str, dict]],
                                          scenario: str) -> None:
    for rank, results in enumerate(distributed_results):
        outcome = results[scenario]
        assert outcome["ok"], f"rank {rank}:\n{outcome.get('error')}"


@pytest.mark.parametrize("scenario", sorted(_agreement_scenarios()))
def test_ranks_agree_or_all_raise(agreement_results: list[dict[str, dict]],
                                  scenario: str) -> None:
    """Each rank's own outcome: a rank left waiting or aborted fails, as does one that raised
    alone or said something else."""
    for rank, results in enumerate(agreement_results):
        outcome = results[scenario]
        assert outcome["ok"], f"rank {rank}:\n{outcome.get('error')}"


def test_backend_choice() -> None:
    from mtunlearn_ext.surgery import default_backend

    expected = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    assert default_backend() == expected


def test_surgery_without_a_process_group_is_refused_when_built() -> None:
    """In a process without ``init_process_group`` (this one) the distributed surgeries refuse at
    construction, naming themselves, instead of failing inside the first ``backward``."""
    from mtunlearn_ext.surgery import replicated_surgery, sharded_surgery

    assert not dist.is_initialized()
    trunk = nn.Linear(4, 4)
    for build in (sharded_surgery, replicated_surgery):
        with pytest.raises(RuntimeError, match=rf"{build.__name__}: torch.distributed has no "
                                               r"default process group"):
            build(trunk.parameters(), UPGrad())


@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl", "gloo"])
def test_a_rank_holding_no_gradient_puts_its_checks_where_the_backend_takes_them(
        monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Distributed review: a replica with every shared parameter frozen and no head reached
    (only the heads train, and this rank's batch had no labels) made its check tensors on the
    CPU, which an NCCL group does not take. They now go with the rank's gradients, else to the
    current CUDA device under NCCL (simulated here: no GPU and no process group needed)."""
    from mtunlearn_ext.surgery import distributed

    head_grad = torch.zeros(3, device="meta")
    assert distributed._check_device([head_grad], None) == torch.device("meta")
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    expected = torch.device("cpu") if backend == "gloo" else torch.device("cuda", 1)
    assert distributed._check_device([], None) == expected


def test_the_aggregator_description_is_by_value_not_by_repr() -> None:
    """Diff review: the ranks' aggregators were compared by ``repr``, which prints a tensor
    with 4 digits and its dtype: equal preferences in float64 and float32 were refused, and
    0.5 against 0.50001 (other weights) passed. Now by the float64 values, settings and
    state; an object's address (which differs between processes) is not part of it."""
    from mtunlearn_ext.surgery import UPGradWeighting
    from mtunlearn_ext.surgery.distributed import _aggregator_description as described

    half = [0.5, 0.5]
    assert described(UPGrad(pref_vector=torch.tensor(half, dtype=F64))) == described(
        UPGrad(pref_vector=torch.tensor(half, dtype=torch.float32)))
    assert described(UPGrad(pref_vector=half)) != described(UPGrad(pref_vector=[0.5, 0.50001]))
    assert described(UPGrad()) != described(UPGrad(reg_eps=1e-4)) != described(MGDA())
    counted = PCGrad(seed=0)
    before = described(counted)
    counted.weighting(torch.eye(2, dtype=F64))  # one call: other task orders next time
    assert described(counted) != before == described(PCGrad(seed=0))
    assert described(PCGrad(seed=1)) != before

    class Hooked(UPGradWeighting):
        def __init__(self) -> None:
            super().__init__()
            self.callback = object()  # its repr names an address

    assert described(Hooked()) == described(Hooked()) and " at 0x" not in described(Hooked())
