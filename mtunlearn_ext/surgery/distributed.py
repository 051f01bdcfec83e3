"""Gradient surgery across processes (``torch.distributed``): sharded and replicated parameters.

Why one ``k x k`` all-reduce suffices for sharded parameters: every statistic the surgery needs is
a sum over parameter coordinates, ``G_ij = sum_c g_i[c] g_j[c]``. When each process holds a
disjoint shard of the coordinates (FSDP2's ``fully_shard``, or any manual split of a parameter
list), ``G = sum_ranks G_local``: each rank runs ``gram_list`` over its local shards, one
``all_reduce(SUM)`` of the ``k x k`` matrix gives every rank the global Gram, every rank solves
the same small problem (bit-identical input, deterministic solvers: identical weights) and
combines its own shards. Communication per step: ``k^2`` numbers, against ``k x n`` to gather
the per-task gradients themselves.

FSDP2: the per-task gradients must be the global (data-averaged) ones restricted to the shard,
which is what FSDP2's reduce-scatter leaves in each sharded ``.grad`` after a ``backward``; so
the surgery runs ``per_task="backward"`` and reads ``.grad.to_local()``. The ``k`` backward
passes reduce-scatter ``k`` times (the inherent ``k x n`` cost of per-task gradients under data
parallelism); the aggregation itself then only adds the ``k x k`` all-reduce.

Replicated parameters (DDP): each rank computes per-task gradients on its own data, and the
global per-task gradient is the average over ranks, ``gbar_i = (1/R) sum_r g_i^r``. Its Gram is
``<gbar_i, gbar_j> = (1/R^2) sum_{r,s} <g_i^r, g_j^s>``: the cross-rank terms are not in any
local Gram, so averaging local Grams would be wrong (it is the Gram of a different, noisier
problem). :class:`ReplicatedReducer` therefore averages the per-task gradient stacks themselves
(``k x n`` per step, the volume of ``k`` DDP all-reduces) and then every rank aggregates
locally with no further collective. Use it with a plain module (parameters broadcast once) or
with a DDP module whose forward runs under ``ddp_model.no_sync()`` (DDP's own hooks cannot
handle ``k`` backward passes per forward).

Backend: collectives go to the backend of the tensors' device; initialise with
:func:`default_backend` (``"cpu:gloo,cuda:nccl"`` when CUDA is present) so that CUDA Grams use
NCCL and CPU ones gloo.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.distributed as dist

from mtunlearn_ext.surgery._tensor_lists import StatsReduce, is_dtensor, local_tensor
from mtunlearn_ext.surgery.aggregators import Aggregator
from mtunlearn_ext.surgery.hook import GradientSurgery
from mtunlearn_ext.surgery.weightings import Weighting

ProcessGroup = dist.ProcessGroup


def default_backend() -> str:
    """Backend string for ``init_process_group``: NCCL for CUDA tensors where CUDA exists, gloo
    for CPU tensors (and for everything on a CPU-only machine)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def local_shards(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor (``to_local()`` of a DTensor; plain tensors unchanged)."""
    return [local_tensor(t) for t in tensors]


def _supports_avg(t: torch.Tensor, group: ProcessGroup | None) -> bool:
    # ReduceOp.AVG exists on NCCL only; gloo needs SUM and a division.
    return t.is_cuda and "nccl" in str(dist.get_backend(group))


def _all_reduce_mean(tensors: list[torch.Tensor], group: ProcessGroup | None) -> None:
    world = dist.get_world_size(group)
    pending: list[tuple[dist.Work, torch.Tensor | None]] = []
    for t in tensors:
        if t.numel() == 0:
            continue
        if _supports_avg(t, group):
            pending.append((dist.all_reduce(t, op=dist.ReduceOp.AVG, group=group, async_op=True),
                            None))
        else:
            pending.append((dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True),
                            t))
    # Issued together, waited together: the backend may overlap them.
    for work, to_scale in pending:
        work.wait()
        if to_scale is not None:
            to_scale.div_(world)


def stats_all_reduce(group: ProcessGroup | None = None) -> StatsReduce:
    """The ``reduce`` argument of the list projections for shards spread over ``group``:
    an in-place ``all_reduce(SUM)`` of the packed coefficient-space statistics."""

    def reduce(stats: torch.Tensor) -> torch.Tensor:
        stats = stats.contiguous()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        return stats

    return reduce


class ShardedReducer:
    """Each rank holds a disjoint shard of the shared parameters (FSDP2 or a manual split) and
    the per-task gradients of its shard: only the ``k x k`` Gram is summed across ranks."""

    def __init__(self, group: ProcessGroup | None = None) -> None:
        self.group = group
        self._reduce = stats_all_reduce(group)

    def reduce_task_grads(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor], *,
                          reached: list[bool] | None = None,
                          head_tasks: Sequence[int] | None = None) -> None:
        """Nothing to do: shard-local per-task gradients are already the global ones (and
        whether a task reached a shard is this rank's own business: it writes only its
        shards)."""

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Global Gram matrix = SUM over ranks of the shard Grams (one ``k x k`` all-reduce)."""
        return self._reduce(stats)


class ReplicatedReducer:
    """Each rank holds all shared parameters and per-task gradients of its own data: the stacks
    (and head gradients) are averaged across ranks before the surgery (see the module text for
    why the Gram cannot be reduced instead). A shared parameter that some rank's losses reached
    gets the average on every rank; one that no rank's losses reached keeps its ``.grad``
    everywhere (the flags travel with the collective that is there anyway).

    Heads: the ranks must average the same head tensors in the same order. With ``head_params``
    (every task-specific parameter) each rank reduces all of them (those requiring grad), a
    head that no loss reached on a rank counting as a zero gradient there (a task without
    labels in that rank's batch, say): its ``.grad`` is then the same average on every rank,
    and stays ``None`` only if no rank reached it. Without them the heads are found per rank
    from the losses' graphs, each known by which tasks' losses reach it, its shape and dtype;
    every rank puts them in the order of those (the order a rank meets them in depends on its
    data: with accumulation, a head whose task has no labels in one micro-batch is met in a
    later one), and a small all-reduce checks that every rank found the same ones: if not,
    every rank raises, saying which heads differ (instead of pairing different tensors across
    ranks, or waiting forever). Heads that the same tasks reach with the same shapes cannot be
    told apart that way (a data-dependent choice between two such heads): pass
    ``head_params`` there.
    """

    def __init__(self, group: ProcessGroup | None = None,
                 head_params: Iterable[torch.Tensor] | None = None) -> None:
        self.group = group
        self.head_params: list[torch.Tensor] | None = None
        if head_params is not None:  # frozen ones are left out at each call
            unique = {id(p): p for p in head_params}
            self.head_params = list(unique.values())

    def reduce_task_grads(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor], *,
                          reached: list[bool] | None = None,
                          head_tasks: Sequence[int] | None = None) -> None:
        """Average of every per-task stack and head gradient over the ranks, in place;
        ``reached`` (per stack) becomes whether any rank reached the parameter."""
        device = stacks[0].device if stacks else torch.device("cpu")
        flags = [] if reached is None else reached
        if self.head_params is None:
            heads, tasks = _canonical_order(head_grads, head_tasks)
            anywhere = _check_same_heads(heads, tasks, flags, device, self.group)
            _all_reduce_mean([*stacks, *heads], self.group)
            flags[:] = anywhere
            return
        heads = [p for p in self.head_params if p.requires_grad]
        fillers = {id(p): torch.zeros_like(local_tensor(p), memory_format=torch.contiguous_format)
                   for p in heads if p.grad is None}
        grads = [fillers[id(p)] if id(p) in fillers else local_tensor(cast(torch.Tensor, p.grad))
                 for p in heads]
        hits = torch.tensor([float(id(p) not in fillers) for p in heads]
                            + [float(r) for r in flags], device=device)
        _all_reduce_mean([*stacks, *grads, hits], self.group)
        somewhere = [share > 0 for share in hits.tolist()]
        for p, grad, anywhere_ in zip(heads, grads, somewhere):
            if id(p) in fillers and anywhere_:
                p.grad = grad
        flags[:] = somewhere[len(heads):]

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Identity: the Gram of averaged gradients is already global on every rank."""
        return stats


#: What a process knows of a head found in its losses' graphs, the same on every process for
#: the same head: the bit mask of the tasks whose loss reaches it (``None``: not known), its
#: shape and its dtype.
_HeadDescription = tuple[int | None, tuple[int, ...], str]


def _describe(head_grads: Sequence[torch.Tensor], head_tasks: Sequence[int] | None
              ) -> list[_HeadDescription]:
    tasks: Sequence[int | None] = ([None] * len(head_grads) if head_tasks is None
                                   else head_tasks)
    return [(t, tuple(g.shape), str(g.dtype)) for t, g in zip(tasks, head_grads)]


def _canonical_order(head_grads: Sequence[torch.Tensor], head_tasks: Sequence[int] | None
                     ) -> tuple[list[torch.Tensor], list[int] | None]:
    """The heads sorted by their description (tasks, shape, dtype), the order they were found
    in kept among equal ones: the same order on every process that found the same heads,
    whatever order its graph walks and micro-batches met them in."""
    described = _describe(head_grads, head_tasks)
    order = sorted(range(len(head_grads)),
                   key=lambda h: (-1 if described[h][0] is None else described[h][0],
                                  described[h][1], described[h][2]))
    return ([head_grads[h] for h in order],
            None if head_tasks is None else [head_tasks[h] for h in order])


def _heads_digest(head_grads: Sequence[torch.Tensor], head_tasks: Sequence[int] | None) -> int:
    """A 62-bit digest of the heads in order (:func:`_canonical_order`): which tasks reach each
    (when known), its shape and dtype. The same on every process for the same heads (no
    per-process salt, unlike ``hash``); two ranks that reached different heads of one shape
    differ in the tasks."""
    described = repr(_describe(head_grads, head_tasks))
    return int.from_bytes(hashlib.blake2b(described.encode(), digest_size=8).digest(),
                          "big") >> 2


def _check_same_heads(head_grads: list[torch.Tensor], head_tasks: Sequence[int] | None,
                      reached: Sequence[bool], device: torch.device,
                      group: ProcessGroup | None) -> list[bool]:
    """Raise on every rank if the ranks found different head gradients to average (their
    count, or which tasks reach them and their shapes, in order, differ), saying which;
    returns, per flag of ``reached``, whether any rank set it. One all-reduce (MAX) of 4
    integers and one flag per shared parameter; on a mismatch, one gather of every rank's
    heads for the message."""
    count = len(head_grads)
    digest = _heads_digest(head_grads, head_tasks)
    mine = torch.tensor([count, digest, -count, -digest, *(int(r) for r in reached)],
                        dtype=torch.int64, device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    most, high, fewest, low, *anywhere = mine.tolist()
    fewest, low = -fewest, -low
    if most != fewest or high != low:
        # Every rank sees the same reduced numbers, so every rank takes this branch and its
        # gather: no rank is left waiting in a collective.
        per_rank: list[list[_HeadDescription] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, _describe(head_grads, head_tasks), group=group)
        raise ValueError(
            "replicated_surgery: the ranks' losses reached different task-specific parameters "
            f"({_head_differences(per_rank)}), so their gradients cannot be averaged tensor "
            "by tensor. Pass `head_params` (every task-specific parameter): a head that no loss "
            "reaches on a rank then counts as a zero gradient there")
    return [flag > 0 for flag in anywhere]


def _head_differences(per_rank: Sequence[Sequence[_HeadDescription] | None]) -> str:
    """What the ranks' heads differ in, each rank against rank 0: how many each has and the
    heads (tasks, shape, dtype) that only one of the two has."""
    counts = [len(heads or ()) for heads in per_rank]
    if len(set(counts)) > 1:
        said = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        parts = [f"tensors with a gradient per rank: {said}"]
    else:
        parts = [f"{counts[0]} tensors with a gradient on every rank"]
    first = Counter(per_rank[0] or ())
    for r, heads in enumerate(per_rank[1:], start=1):
        theirs = Counter(heads or ())
        only_first, only_theirs = first - theirs, theirs - first
        if only_first or only_theirs:
            parts.append(f"rank 0 has {_listed(only_first)} where rank {r} has "
                         f"{_listed(only_theirs)}")
    return "; ".join(parts)


def _listed(heads: Counter[_HeadDescription], most: int = 6) -> str:
    """``heads`` in words (``a (1, 4) float64 tensor reached by losses[2]``), the first
    ``most`` of them (a model has hundreds of parameters)."""
    if not heads:
        return "nothing else"
    described = []
    for (tasks, shape, dtype), times in sorted(heads.items(), key=lambda item: repr(item[0])):
        reach = ("" if not tasks else " reached by " +
                 ", ".join(f"losses[{t}]" for t in range(tasks.bit_length()) if tasks >> t & 1))
        count = "" if times == 1 else f"{times} x "
        described.append(f"{count}a {shape} {dtype.removeprefix('torch.')} tensor{reach}")
    shown = ", ".join(described[:most])
    return shown if len(described) <= most else f"{shown} and {len(described) - most} more"


def _require_process_group(caller: str, group: ProcessGroup | None) -> None:
    """Refuse at construction, not at the first ``backward``, when there is no process group
    to reduce over."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{caller}: torch.distributed has no default process group; call "
                           "torch.distributed.init_process_group first, pass `group`, or use "
                           "GradientSurgery in a single process")


def sharded_surgery(shared_params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                    aggregator: Aggregator | Weighting, *, group: ProcessGroup | None = None,
                    **kwargs: object) -> GradientSurgery:
    """A :class:`GradientSurgery` for sharded shared parameters (FSDP2 ``fully_shard`` modules,
    or parameter lists split across ranks). Defaults to ``per_task="backward"`` when the
    parameters are DTensors (FSDP2 reduce-scatters inside ``backward``); other keyword
    arguments go to :class:`GradientSurgery`. Per-layer ids (``per_layer=[...]``) are global
    layer ids and need ``num_layers``; ``per_layer=True`` (one layer per tensor) only with
    DTensor parameters, where every rank holds a shard of every tensor."""
    _require_process_group("sharded_surgery", group)
    # list() keeps the kind of the iterable (bare tensors or (name, tensor) pairs).
    params = cast("list[torch.Tensor] | list[tuple[str, torch.Tensor]]", list(shared_params))
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    per_layer = kwargs.get("per_layer", False)
    if not isinstance(per_layer, bool) and kwargs.get("num_layers") is None:
        # Without it each rank would number its own layers 0..L_r-1, and the all-reduce would
        # add the Grams of different layers together.
        raise ValueError("sharded_surgery: `per_layer` ids need `num_layers` (the global "
                         "number of layers), so that every rank reduces [L, k, k] Grams of one "
                         "layout")
    if per_layer is True and not all(is_dtensor(t) for t in tensors):
        # One layer per tensor lines the ranks' Grams up only when every rank holds a shard of
        # every tensor (DTensors); a split list has other tensors, or another number of them,
        # per rank: the all-reduce added unrelated Grams, or failed on mismatched sizes.
        raise ValueError("sharded_surgery: per_layer=True (one problem per tensor) needs every "
                         "shared parameter to be a DTensor (FSDP2: each rank holds a shard of "
                         "every tensor); for a parameter list split across ranks pass global "
                         "`per_layer` ids (one per tensor here) and `num_layers`, so that every "
                         "rank reduces [L, k, k] Grams of one layout")
    if "per_task" not in kwargs:
        kwargs["per_task"] = "backward" if any(is_dtensor(t) for t in tensors) else "autograd"
    return GradientSurgery(params, aggregator, reducer=ShardedReducer(group),
                           **kwargs)  # type: ignore[arg-type]


def replicated_surgery(shared_params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       aggregator: Aggregator | Weighting, *, group: ProcessGroup | None = None,
                       **kwargs: object) -> GradientSurgery:
    """A :class:`GradientSurgery` for data-parallel replicas (DDP-style): per-task gradients and
    head gradients are averaged across ``group`` before the aggregation. Needs
    ``per_task="autograd"`` or ``"batched"`` (the default ``"autograd"``): with ``"backward"`` a
    DDP module would reduce on its own.

    Pass ``head_params`` (every task-specific parameter) when a task's loss may not reach its
    head on some rank (no labels of that task in the rank's batch): the head then counts as a
    zero gradient there and every rank gets the same average. Without them the ranks must reach
    the same heads (each known by which tasks reach it and its shape); if they do not, every
    rank raises a ValueError saying so (:class:`ReplicatedReducer`)."""
    _require_process_group("replicated_surgery", group)
    if kwargs.get("per_task", "autograd") == "backward":
        raise ValueError("replicated_surgery: per_task='backward' is not supported (DDP's hooks "
                         "cannot run k backward passes per forward); use 'autograd' or 'batched'")
    surgery = GradientSurgery(shared_params, aggregator, reducer=ReplicatedReducer(group),
                              **kwargs)  # type: ignore[arg-type]
    # With the surgery's own head list (an iterator given as head_params is consumed by now).
    surgery.reducer = ReplicatedReducer(group, surgery.head_params)
    return surgery
