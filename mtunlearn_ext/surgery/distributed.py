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
the surgery runs ``per_task="backward"`` and reads ``.grad.to_local()``. That needs gradient sync
on in every pass: under ``set_requires_gradient_sync(False)`` FSDP2 keeps each pass's unsharded
gradient and adds it into the next synced pass, mixing the tasks (the surgery refuses a call
whose passes wrote no gradient on the shared FSDP2 parameters, naming the sync). The ``k``
backward passes reduce-scatter ``k`` times (the inherent ``k x n`` cost of per-task gradients
under data parallelism); the aggregation itself then only adds the ``k x k`` all-reduce.

Replicated parameters (DDP): each rank computes per-task gradients on its own data, and the
global per-task gradient is the average over ranks, ``gbar_i = (1/R) sum_r g_i^r``. Its Gram is
``<gbar_i, gbar_j> = (1/R^2) sum_{r,s} <g_i^r, g_j^s>``: the cross-rank terms are not in any
local Gram, so averaging local Grams would be wrong (it is the Gram of a different, noisier
problem). :class:`ReplicatedReducer` therefore averages the per-task gradient stacks themselves
(``k x n`` per step, the volume of ``k`` DDP all-reduces, small tensors bucketed as DDP does)
and then every rank aggregates locally with no further collective. Use it with a plain module
(parameters broadcast once) or with a DDP module, preferably under ``ddp_model.no_sync()``: the per-task gradients come from
``torch.autograd.grad``, which runs none of DDP's hooks, so DDP never reduces them itself
(``per_task="backward"``, which would, is refused); ``no_sync`` skips DDP's preparation of a
reduction that never comes.

What the ranks must agree on (the number of losses, the shared parameters and heads taking
part, the aggregator and its settings, the Gram's layout and dtype) is checked in small integer
all-reduces, each value beside its negation so that one MAX gives the largest and the smallest:
on a mismatch every rank raises the same ``ValueError``, instead of aborting (gloo) or hanging
(NCCL) in a collective of mismatched sizes, or combining different weights without an error.

Backend: collectives go to the backend of the tensors' device; initialise with
:func:`default_backend` (``"cpu:gloo,cuda:nccl"`` when CUDA is present) so that CUDA Grams use
NCCL and CPU ones gloo.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from mtunlearn_ext.surgery._tensor_lists import StatsReduce, is_dtensor, local_tensor
from mtunlearn_ext.surgery.aggregators import Aggregator
from mtunlearn_ext.surgery.hook import GradientSurgery, PerTaskMode
from mtunlearn_ext.surgery.weightings import Weighting

ProcessGroup = dist.ProcessGroup


def default_backend() -> str:
    """Backend string for ``init_process_group``: NCCL for CUDA tensors where CUDA exists, gloo
    for CPU tensors (and for everything on a CPU-only machine)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def _has_nccl(group: ProcessGroup | None) -> bool:
    """Whether the group's backend is (or, for a mixed ``cpu:gloo,cuda:nccl``, includes) NCCL."""
    return "nccl" in str(dist.get_backend(group)).lower()


def _supports_avg(t: torch.Tensor, group: ProcessGroup | None) -> bool:
    # ReduceOp.AVG exists on NCCL only; gloo needs SUM and a division.
    return t.is_cuda and _has_nccl(group)


#: Dense tensors below this many bytes are all-reduced together, copied into flat buckets of at
#: most this size (DDP's bucket size): one collective per tensor cost ~0.2 ms each on gloo, and a
#: 40-layer trunk's 80 stacks took 17 ms where one all-reduce of the same bytes took 1.2 ms.
_BUCKET_BYTES = 25 * 2**20


def _all_reduce_mean(tensors: list[torch.Tensor], group: ProcessGroup | None) -> None:
    """The average of each tensor over the ranks, in place (gloo's sparse all-reduce writes
    its input too). Small dense tensors go in flat buckets (:data:`_BUCKET_BYTES`), one per
    dtype and device in order, the same on every rank (the ranks agreed on the tensors'
    shapes and dtypes before); larger ones and sparse ones go alone, without a copy."""
    world = dist.get_world_size(group)
    pending: list[tuple[dist.Work, torch.Tensor, bool, list[torch.Tensor]]] = []

    def issue(flat: torch.Tensor, members: list[torch.Tensor]) -> None:
        avg = _supports_avg(flat, group)
        op = dist.ReduceOp.AVG if avg else dist.ReduceOp.SUM
        pending.append((dist.all_reduce(flat, op=op, group=group, async_op=True), flat,
                        not avg, members))

    buckets: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], int]] = {}

    def flush(key: tuple[torch.dtype, torch.device]) -> None:
        members, _ = buckets.pop(key)
        if len(members) == 1:
            issue(members[0], [])
        else:
            issue(torch.cat([m.reshape(-1) for m in members]), members)

    for t in tensors:
        if t.numel() == 0:
            continue
        size = t.numel() * t.element_size()
        if t.layout != torch.strided or size >= _BUCKET_BYTES:
            issue(t, [])
            continue
        key = (t.dtype, t.device)
        members, filled = buckets.get(key, ([], 0))
        if filled + size > _BUCKET_BYTES:
            flush(key)
            members, filled = [], 0
        buckets[key] = ([*members, t], filled + size)
    for key in list(buckets):
        flush(key)
    # Issued together, waited together: the backend may overlap them.
    for work, flat, to_scale, members in pending:
        work.wait()
        if to_scale:
            flat.div_(world)
        offset = 0
        for m in members:
            m.copy_(flat[offset:offset + m.numel()].view_as(m))
            offset += m.numel()


def _check_device(tensors: Sequence[torch.Tensor], group: ProcessGroup | None) -> torch.device:
    """Where this rank's small check and flag tensors live: with its gradients, or on a rank
    that holds none (every shared parameter frozen, as on every replica when only the heads
    train, and no head reached) where the backend takes them: NCCL only takes CUDA tensors,
    and the CPU tensors this fell back to before could not take part."""
    if tensors:
        return tensors[0].device
    if _has_nccl(group) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: Gram / statistics dtypes in the header of a statistics all-reduce (0: none, a rank that holds
#: no shard and takes whatever the others have).
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}
_OTHER_DTYPE = 9
#: A joining rank's negated dtype code: below any real one, so it never decides the minimum.
_NO_DTYPE = -(1 << 62)


def _stats_header(stats: torch.Tensor, joining: bool) -> list[int]:
    """What every rank must agree on before the statistics all-reduce: ``k`` (the last
    dimension), the number of layers (the first of an ``[L, ., k]`` tensor, else 1), the dtype
    and the number of elements (anything else that makes the sizes differ)."""
    k = stats.shape[-1] if stats.dim() else 1
    layers = stats.shape[0] if stats.dim() >= 3 else 1
    code = 0 if joining else _DTYPE_CODES.get(stats.dtype, _OTHER_DTYPE)
    return [k, layers, code, stats.numel()]


def _agreed_stats(stats: torch.Tensor, group: ProcessGroup | None, joining: bool
                  ) -> torch.Tensor:
    """``stats`` once every rank has checked that the ranks reduce statistics of one size and
    dtype, in the dtype they agree on (``joining``: this rank holds no shard, its zero
    statistics take the others' dtype). One all-reduce (MAX) of 8 integers, each value beside
    its negation, so that one call gives the largest and the smallest over the ranks: a
    mismatch raises on every rank (collectives of different sizes abort gloo with an
    uncatchable SIGABRT, and hang NCCL)."""
    mine = _stats_header(stats, joining)
    negated = [-v for v in mine]
    if joining:
        negated[2] = _NO_DTYPE
    header = torch.tensor([*mine, *negated], dtype=torch.int64, device=stats.device)
    dist.all_reduce(header, op=dist.ReduceOp.MAX, group=group)
    values = header.tolist()
    most, fewest = values[:4], [-v for v in values[4:]]
    if most[2] == 0:
        # Every rank joining: no rank holds a shared parameter taking part. Each sees this
        # header, so each raises (a single process raises the same).
        raise ValueError("sharded surgery: no rank holds a shared parameter taking part (every "
                         "shard empty or frozen), so there is nothing to aggregate; while the "
                         "shared part is frozen, call sum(losses).backward() instead")
    if most != fewest:
        # Every rank sees the same reduced header, so every rank gathers here and raises.
        per_rank: list[list[int] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, mine, group=group)
        raise ValueError(_header_mismatch(per_rank))
    if joining and most[2] in _DTYPE_NAMES:
        stats = stats.to(next(d for d, c in _DTYPE_CODES.items() if c == most[2]))
    return stats


def _header_mismatch(per_rank: Sequence[Sequence[int] | None]) -> str:
    """The first of k, the number of layers, the dtype and the size that the ranks disagree
    on, with each rank's value."""
    headers = [list(h or (0, 0, 0, 0)) for h in per_rank]

    def each(place: int, show: Callable[[int], str] = str) -> str:
        return ", ".join(f"rank {r}: {show(h[place])}" for r, h in enumerate(headers))

    def differ(place: int) -> bool:
        seen = {h[place] for h in headers if place != 2 or h[2] != 0}
        return len(seen) > 1

    prefix = "sharded surgery (stats_all_reduce): the ranks' Gram statistics differ in"
    if differ(0):
        return (f"{prefix} the number of losses k ({each(0)}); every rank must pass the same "
                "k losses in the same task order (a task without labels in a rank's batch: "
                "a zero stand-in loss there), so that the k x k Grams line up")
    if differ(1):
        return (f"{prefix} num_layers ({each(1)}); pass the same global `num_layers` (and "
                "global `per_layer` ids) on every rank, so that every rank reduces [L, k, k] "
                "Grams of one layout")
    if differ(2):
        names = each(2, lambda c: _DTYPE_NAMES.get(c, "no shard" if c == 0 else "other"))
        return (f"{prefix} dtype ({names}); the Gram is float64 where a rank's shard holds a "
                "float64 tensor and float32 otherwise: give the shared parameters one "
                "floating dtype class on every rank (all float64, or none)")
    return (f"{prefix} size ({each(3)} elements); every rank must reduce statistics of one "
            "layout")


def stats_all_reduce(group: ProcessGroup | None = None) -> StatsReduce:
    """The ``reduce`` argument of the list projections for shards spread over ``group``:
    an in-place ``all_reduce(SUM)`` of the packed coefficient-space statistics, after a check
    (one 8-integer all-reduce) that every rank reduces statistics of one size and dtype: ranks
    that disagree on ``k``, the number of layers or the dtype all raise a ValueError saying
    which, instead of aborting (gloo) or hanging (NCCL) in a collective of mismatched sizes."""

    def reduce(stats: torch.Tensor) -> torch.Tensor:
        stats = _agreed_stats(stats.contiguous(), group, joining=False)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        return stats

    return reduce


def _joining_all_reduce(group: ProcessGroup | None) -> StatsReduce:
    """:func:`stats_all_reduce` for a rank that holds no shard (or only frozen ones): its zero
    statistics take the dtype of the others' before the SUM."""

    def reduce(stats: torch.Tensor) -> torch.Tensor:
        stats = _agreed_stats(stats.contiguous(), group, joining=True).contiguous()
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        return stats

    return reduce


class ShardedReducer:
    """Each rank holds a disjoint shard of the shared parameters (FSDP2 or a manual split) and
    the per-task gradients of its shard: only the ``k x k`` Gram is summed across ranks."""

    def __init__(self, group: ProcessGroup | None = None) -> None:
        self.group = group
        self._reduce = stats_all_reduce(group)
        self._join = _joining_all_reduce(group)

    def reduce_task_grads(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor], *,
                          reached: list[bool] | None = None,
                          head_tasks: Sequence[int] | None = None,
                          stack_names: Sequence[str] | None = None,
                          aggregator: Aggregator | Weighting | None = None) -> None:
        """Nothing to do: shard-local per-task gradients are already the global ones (and
        whether a task reached a shard is this rank's own business: it writes only its
        shards). The aggregator is agreed on in :meth:`agree_on_aggregator`, on the losses'
        device."""

    def agree_on_aggregator(self, aggregator: Aggregator | Weighting, k: int,
                            device: torch.device) -> None:
        """Before the aggregation: raise on every rank if the ranks aggregate differently
        (:func:`_aggregator_description`) or pass different numbers of losses ``k`` (0: a rank
        that cannot tell). Each rank weights its own shards, so different aggregators (or
        settings) gave an update whose shards disagree, without an error, and a rank with a
        Gram-free one (Mean, Sum) left the others waiting in the Gram's all-reduce. One
        all-reduce (MAX) of 4 integers on ``device``, the losses' (where a rank without a
        shard runs its other collectives too); on a mismatch, one gather for the message."""
        agreed = [k, _digest(_aggregator_description(aggregator))]
        mine = torch.tensor([*agreed, *(-v for v in agreed)], dtype=torch.int64, device=device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group)
        values = mine.tolist()
        if _losses_differ(values[0], -values[2]):
            raise ValueError(_losses_mismatch(k, self.group, "sharded_surgery",
                                              "the ranks' Grams cannot be added up"))
        if values[1] != -values[3]:
            raise ValueError(_aggregator_mismatch("sharded_surgery", aggregator, self.group))

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Global Gram matrix = SUM over ranks of the shard Grams (one ``k x k`` all-reduce,
        after the 8-integer header that checks the ranks agree on its size and dtype)."""
        return self._reduce(stats)

    def join_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """:meth:`reduce_stats` for a rank with nothing to aggregate (no shard, or only frozen
        ones): its zero ``stats`` take the other ranks' dtype, so that it can still take part
        in every collective of theirs."""
        return self._join(stats)

    def agree_on_task_count(self, k: int, device: torch.device) -> None:
        """Before ``per_task="backward"``'s passes: raise on every rank if the ranks pass
        different numbers of losses. Each pass runs FSDP2's reduce-scatters, so ranks with
        different ``k`` waited in each other's passes until the process group's timeout (then
        gloo's "Timed out waiting" named nothing; with the default 30 minutes, a hang), never
        reaching the check before the Gram's all-reduce. One all-reduce (MAX) of 2 integers on
        ``device``; on a mismatch, one gather for the message."""
        value = torch.tensor([k, -k], dtype=torch.int64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        most, fewest = value.tolist()
        if most != -fewest:
            raise ValueError(_losses_mismatch(
                k, self.group, "sharded_surgery",
                "per_task='backward' runs one backward pass per loss, and FSDP2 "
                "reduce-scatters in each, so the ranks' passes cannot pair up"))

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce MAX of one integer on
        ``device``): a verdict that every rank must act on together, such as refusing a step
        for NaN in one rank's shard, which a rank alone would refuse while the others went
        on to their next collective and waited there."""
        value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())


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

    Every rank must train the same parameters: the same small all-reduce checks that the ranks
    take part with the same shared parameters (by name, shape and dtype) and, with
    ``head_params``, train the same listed heads; a parameter frozen on some ranks only is
    refused on every rank, naming it.
    """

    def __init__(self, group: ProcessGroup | None = None,
                 head_params: Iterable[torch.Tensor] | None = None) -> None:
        self.group = group
        self.head_params: list[torch.Tensor] | None = None
        if head_params is not None:  # frozen ones are left out at each call
            unique = {id(p): p for p in head_params}
            self.head_params = list(unique.values())

    def __deepcopy__(self, memo: dict[int, object]) -> ReplicatedReducer:
        """A copy for copied heads (``copy.deepcopy((model, surgery))``): the same process
        group (shared: the same processes), ``head_params`` copied through ``memo``, so
        that the copy averages the copied model's heads, not the original's."""
        import copy

        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            setattr(twin, name, value if name == "group" else copy.deepcopy(value, memo))
        return twin

    def reduce_task_grads(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor], *,
                          reached: list[bool] | None = None,
                          head_tasks: Sequence[int] | None = None,
                          stack_names: Sequence[str] | None = None,
                          aggregator: Aggregator | Weighting | None = None) -> None:
        """Average of every per-task stack and head gradient over the ranks, in place;
        ``reached`` (per stack) becomes whether any rank reached the parameter.
        ``stack_names`` (the shared parameters', one per stack) tell the ranks whether they
        take part with the same ones: one frozen on some ranks only is refused on every rank.
        ``aggregator`` (the surgery's) likewise: ranks aggregating with different ones (or
        settings) are refused, in the same check (no collective of its own)."""
        device = _check_device([*stacks, *head_grads, *(self.head_params or [])], self.group)
        flags = [] if reached is None else reached
        # k: a rank without shared stacks (all frozen, as on every replica) has nothing of k
        # to pair up, and says 0.
        k = stacks[0].shape[0] if stacks else 0
        shared = _describe_shared(stacks, stack_names)
        # Which ranks reached each shared parameter travels with the average itself.
        hits = torch.tensor([float(r) for r in flags], device=device)
        if self.head_params is None:
            heads, tasks = _canonical_order(head_grads, head_tasks)
            _check_same_heads(heads, tasks, shared, device, self.group, k, aggregator)
            _all_reduce_mean([*stacks, *heads, hits], self.group)
            flags[:] = [share > 0 for share in hits.tolist()]
            return
        trainable = [p.requires_grad for p in self.head_params]
        layouts = _agreed_head_layouts(self.head_params, trainable, shared, k, device,
                                       self.group, aggregator)
        heads = [p for p, t in zip(self.head_params, trainable) if t]
        layouts = [layout for layout, t in zip(layouts, trainable) if t]
        fillers = {id(p): _zero_grad(p, sparse_dims)
                   for p, sparse_dims in zip(heads, layouts) if p.grad is None}
        for p, sparse_dims in zip(heads, layouts):
            if p.grad is not None and _sparse_dims(p.grad) != sparse_dims:
                # Reached here in another layout than on some other rank (a dense sum of
                # sparse and dense micro-batches): gloo pairs a sparse all-reduce only with
                # sparse ones.
                grad = p.grad
                # (the layout code is 1 + the number of sparse dimensions)
                p.grad = (grad.to_dense() if sparse_dims == 0
                          else grad.to_sparse(sparse_dims - 1))
        grads = [fillers[id(p)] if id(p) in fillers else local_tensor(cast(torch.Tensor, p.grad))
                 for p in heads]
        hits = torch.cat([torch.tensor([float(id(p) not in fillers) for p in heads],
                                       device=device), hits])
        _all_reduce_mean([*stacks, *grads, hits], self.group)
        somewhere = [share > 0 for share in hits.tolist()]
        for p, grad, anywhere_ in zip(heads, grads, somewhere):
            if id(p) in fillers and anywhere_:
                p.grad = grad
        flags[:] = somewhere[len(heads):]

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Identity: the Gram of averaged gradients is already global on every rank."""
        return stats

    def nonfinite_note(self) -> str:
        """Which process refused the step: the per-task gradients it read are the averages
        over the ranks, so the NaN or Inf may come from any rank's batch."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        return (f" [rank {rank} of {world}: the task gradients are averaged over the ranks "
                "before the check, so every rank refuses this step alike and the NaN or Inf "
                "may come from any rank's batch]")


def _sparse_dims(grad: torch.Tensor) -> int:
    """0 for a dense gradient, else 1 + its number of sparse dimensions (a sparse COO one,
    as ``nn.Embedding(sparse=True)`` gives: 1 + 1)."""
    return 0 if grad.layout == torch.strided else 1 + grad.sparse_dim()


def _zero_grad(head: torch.Tensor, sparse_dims: int) -> torch.Tensor:
    """The gradient of a head no loss reached here: dense zeros, or an empty sparse tensor of
    the head's shape (``sparse_dims``: as :func:`_sparse_dims`) where another rank's is
    sparse."""
    local = local_tensor(head)
    if sparse_dims == 0:
        return torch.zeros_like(local, memory_format=torch.contiguous_format)
    dims = sparse_dims - 1
    indices = torch.empty((dims, 0), dtype=torch.int64, device=local.device)
    values = torch.empty((0, *local.shape[dims:]), dtype=local.dtype, device=local.device)
    return torch.sparse_coo_tensor(indices, values, local.shape, check_invariants=True,
                                   is_coalesced=True)


def _agreed_head_layouts(listed: Sequence[torch.Tensor], trainable: Sequence[bool],
                         shared: Sequence[_SharedDescription], k: int, device: torch.device,
                         group: ProcessGroup | None,
                         aggregator: Aggregator | Weighting | None = None) -> list[int]:
    """Before the average of the stacks and the listed heads: every rank checks that the ranks
    passed the same number of losses (else the stacks' all-reduce pairs different sizes), take
    part with the same shared parameters, aggregate with the same aggregator
    (``aggregator``: :func:`_aggregator_description`) and train the same listed heads (a
    parameter frozen on some ranks only gave collectives of different sizes, and gloo aborted
    every process), and learns each listed head's layout (:func:`_sparse_dims`, the largest over the ranks:
    sparse where some rank's gradient is sparse). A head no loss reached here gets a zero of
    that layout: a dense zero beside another rank's sparse gradient made the two ranks run
    different collectives (a sparse all-reduce against a dense one), and both waited forever.
    One all-reduce (MAX) of 10 integers and one per listed head; on a mismatch, one gather for
    the message."""
    shared_digest = _digest(shared)
    trained = [i for i, t in enumerate(trainable) if t]
    heads_digest = _digest(trained)
    agreed = [k, len(shared), shared_digest, _digest(_aggregator_description(aggregator)),
              heads_digest]
    mine = [*agreed, *(-v for v in agreed),
            *(0 if not t or p.grad is None else _sparse_dims(p.grad)
              for p, t in zip(listed, trainable))]
    header = torch.tensor(mine, dtype=torch.int64, device=device)
    dist.all_reduce(header, op=dist.ReduceOp.MAX, group=group)
    values = header.tolist()
    most, fewest, layouts = values[:5], [-v for v in values[5:10]], values[10:]
    if _losses_differ(most[0], fewest[0]):
        raise ValueError(_losses_mismatch(k, group))
    if most[1:3] != fewest[1:3]:
        raise ValueError(_shared_mismatch(shared, group))
    if most[3] != fewest[3]:
        raise ValueError(_aggregator_mismatch("replicated_surgery", aggregator, group))
    if most[4] != fewest[4]:
        per_rank: list[list[int] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, trained, group=group)
        said = "; ".join(f"rank {r}: {_indices(t or [])}" for r, t in enumerate(per_rank))
        raise ValueError(
            "replicated_surgery: the ranks train different parameters of `head_params` (the "
            f"positions in it of those requiring grad: {said}), so their gradients cannot be "
            "averaged tensor by tensor; every rank must freeze and unfreeze the same heads at "
            "the same step")
    return layouts


def _indices(positions: Sequence[int], most: int = 12) -> str:
    shown = ", ".join(str(i) for i in positions[:most])
    return f"[{shown}{', ...' if len(positions) > most else ''}] ({len(positions)})"


def _losses_differ(most: int, fewest: int) -> bool:
    """Whether the ranks' ``k`` (largest, smallest) show different numbers of losses. A rank
    with every shared parameter frozen has no stack to tell ``k`` and says 0: beside ranks
    with stacks that is a difference in the shared parameters, which the next check names
    (reported as "different numbers of losses k (rank 0: 3, rank 1: 0)", it sent the user
    looking at losses that were the same on every rank)."""
    return most != fewest and fewest > 0


def _losses_mismatch(k: int, group: ProcessGroup | None, caller: str = "replicated_surgery",
                     why: str = "their per-task gradients cannot be averaged task by task"
                     ) -> str:
    """Each rank's number of losses, for the message of ranks that disagree on it (every rank
    takes this gather, having seen the same reduced header)."""
    per_rank: list[int | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(per_rank, k, group=group)
    said = ", ".join(f"rank {r}: {c}" for r, c in enumerate(per_rank))
    return (f"{caller}: the ranks passed different numbers of losses k ({said}), so {why}; "
            "every rank must pass the same k losses in the same task order (a task without "
            "labels in a rank's batch: a zero stand-in loss there)")


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
    return _digest(_describe(head_grads, head_tasks))


def _check_same_heads(head_grads: list[torch.Tensor], head_tasks: Sequence[int] | None,
                      shared: Sequence[_SharedDescription], device: torch.device,
                      group: ProcessGroup | None, k: int = 0,
                      aggregator: Aggregator | Weighting | None = None) -> None:
    """Raise on every rank if the ranks passed different numbers of losses ``k``, take part
    with different shared parameters (one frozen on some ranks only), aggregate with
    different aggregators (``aggregator``: :func:`_aggregator_description`) or found
    different head gradients to average (their count, or which tasks reach them and their
    shapes, in order, differ), saying which. One all-reduce (MAX) of 12 integers, of the same
    size on every rank whatever it found (collectives of different sizes abort gloo); on a
    mismatch, one gather for the message."""
    agreed = [k, len(shared), _digest(shared), _digest(_aggregator_description(aggregator)),
              len(head_grads), _heads_digest(head_grads, head_tasks)]
    mine = torch.tensor([*agreed, *(-v for v in agreed)], dtype=torch.int64, device=device)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=group)
    values = mine.tolist()
    most, fewest = values[:6], [-v for v in values[6:]]
    if _losses_differ(most[0], fewest[0]):
        # k first: with another number of losses the heads differ too (the tasks reaching
        # them), and "pass head_params" would not help.
        raise ValueError(_losses_mismatch(k, group))
    if most[1:3] != fewest[1:3]:
        raise ValueError(_shared_mismatch(shared, group))
    if most[3] != fewest[3]:
        raise ValueError(_aggregator_mismatch("replicated_surgery", aggregator, group))
    if most[4:] != fewest[4:]:
        # Every rank sees the same reduced numbers, so every rank takes this branch and its
        # gather: no rank is left waiting in a collective.
        per_rank: list[list[_HeadDescription] | None] = [None] * dist.get_world_size(group)
        dist.all_gather_object(per_rank, _describe(head_grads, head_tasks), group=group)
        raise ValueError(
            "replicated_surgery: the ranks' losses reached different task-specific parameters "
            f"({_head_differences(per_rank)}), so their gradients cannot be averaged tensor "
            "by tensor. Pass `head_params` (every task-specific parameter): a head that no loss "
            "reaches on a rank then counts as a zero gradient there")


#: A shared parameter taking part in a replicated step, the same on every process for the same
#: parameter: its name in the surgery (``None`` where the reducer was not told), shape, dtype.
_SharedDescription = tuple[str | None, tuple[int, ...], str]


def _describe_shared(stacks: Sequence[torch.Tensor], names: Sequence[str] | None
                     ) -> list[_SharedDescription]:
    named: Sequence[str | None] = [None] * len(stacks) if names is None else names
    return [(n, tuple(s.shape[1:]), str(s.dtype)) for n, s in zip(named, stacks)]


def _shared_mismatch(shared: Sequence[_SharedDescription], group: ProcessGroup | None) -> str:
    """The shared parameters each rank takes part with, against rank 0's, for the message of
    ranks that disagree on them (every rank takes this gather, having seen the same reduced
    header)."""
    per_rank: list[list[_SharedDescription] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(per_rank, list(shared), group=group)
    counts = ", ".join(f"rank {r}: {len(d or ())}" for r, d in enumerate(per_rank))
    parts = [f"shared parameters requiring grad per rank: {counts}",
             *_against_rank_0(per_rank, _listed_shared)]
    return ("replicated_surgery: the ranks take part with different shared parameters "
            f"({'; '.join(parts)}), so their per-task gradients cannot be averaged tensor by "
            "tensor; every rank must freeze and unfreeze the same shared parameters "
            "(requires_grad) at the same step")


def _listed_shared(shared: Counter[_SharedDescription], most: int = 6) -> str:
    if not shared:
        return "nothing else"
    described = []
    for (name, shape, dtype), times in sorted(shared.items(), key=lambda item: repr(item[0])):
        count = "" if times == 1 else f"{times} x "
        named = "" if name is None else f"{name!r}: "
        described.append(f"{count}{named}a {shape} {dtype.removeprefix('torch.')} tensor")
    shown = ", ".join(described[:most])
    return shown if len(described) <= most else f"{shown} and {len(described) - most} more"


def _digest(described: object) -> int:
    """A 62-bit digest of ``repr(described)``: the same on every process for equal
    descriptions (no per-process salt, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(described).encode(), digest_size=8).digest(),
                          "big") >> 2


def _aggregator_description(aggregator: Aggregator | Weighting | None) -> str:
    """What every rank's aggregator must agree on, in words: the class and the public
    attributes of each of its modules (settings such as ``reg_eps`` and ``seed``, PCGrad's call
    count, which picks the task orders), tensors by their values in float64 (a float32
    ``pref_vector`` is the float64 one it is cast to; a tensor's ``repr`` showed 4 digits and
    its dtype and device, which refused equal preferences and let 0.5 and 0.50001 pass).
    Equal on every process for equal aggregators; ``""`` when not known."""
    if aggregator is None:
        return ""
    parts = []
    for name, module in aggregator.named_modules():
        kind = type(module)
        settings = {key: _plain(value) for key, value in sorted(vars(module).items())
                    if not key.startswith("_") and key != "training"}
        parts.append(f"{name or '.'}={kind.__module__}.{kind.__qualname__}{settings}")
    return "; ".join(parts)


def _plain(value: object) -> object:
    """``value`` as process-independent data: numbers and strings as they are, tensors as
    their float64 values and shape, containers element by element (sets sorted), anything
    else by its type's name (an object's default repr names its address)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), tuple(value.detach().double().flatten().tolist()))
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(repr(_plain(v)) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((repr(k), repr(_plain(v))) for k, v in value.items()))
    kind = type(value)
    return f"<{kind.__module__}.{kind.__qualname__}>"


def _aggregator_mismatch(caller: str, aggregator: Aggregator | Weighting | None,
                         group: ProcessGroup | None) -> str:
    """Each rank's aggregator in words (its ``repr``, and its modules' extra state where they
    have one: PCGrad's call count), for the message of ranks that disagree on it (every rank
    takes this gather, having seen the same reduced header)."""
    shown = "not known"
    if aggregator is not None:
        states = {name or type(module).__name__: module.get_extra_state()
                  for name, module in aggregator.named_modules()
                  if type(module).get_extra_state is not torch.nn.Module.get_extra_state}
        shown = f"{aggregator!r}" + (f" with state {states!r}" if states else "")
    per_rank: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(per_rank, shown, group=group)
    said = "; ".join(f"rank {r}: {text}" for r, text in enumerate(per_rank))
    return (f"{caller}: the ranks aggregate with different aggregators ({said}), so each "
            "weights the same task gradients differently and the ranks' updates disagree; "
            "build every rank's surgery with the same aggregator and settings (a seed drawn "
            "per rank, such as PCGradWeighting(seed=rank), gives every rank other task orders)")


def _head_differences(per_rank: Sequence[Sequence[_HeadDescription] | None]) -> str:
    """What the ranks' heads differ in, each rank against rank 0: how many each has and the
    heads (tasks, shape, dtype) that only one of the two has."""
    counts = [len(heads or ()) for heads in per_rank]
    if len(set(counts)) > 1:
        said = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        parts = [f"tensors with a gradient per rank: {said}"]
    else:
        parts = [f"{counts[0]} tensors with a gradient on every rank"]
    return "; ".join([*parts, *_against_rank_0(per_rank, _listed)])


_Described = TypeVar("_Described", bound=Hashable)


def _against_rank_0(per_rank: Sequence[Sequence[_Described] | None],
                    listed: Callable[[Counter[_Described]], str]) -> list[str]:
    """For each rank whose described tensors differ from rank 0's, what only rank 0 has and
    what only that rank has, in words (``listed``)."""
    first = Counter(per_rank[0] or ())
    parts = []
    for r, described in enumerate(per_rank[1:], start=1):
        theirs = Counter(described or ())
        only_first, only_theirs = first - theirs, theirs - first
        if only_first or only_theirs:
            parts.append(f"rank 0 has {listed(only_first)} where rank {r} has "
                         f"{listed(only_theirs)}")
    return parts


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
    to reduce over, or when this process is not in ``group``: torch's collectives then only
    warn and do nothing, so such a process went on with its own gradients or Gram (results
    1e-2 off, with no error) or failed on a missing work handle (``'NoneType' object has no
    attribute 'wait'``)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{caller}: torch.distributed has no default process group; call "
                           "torch.distributed.init_process_group first, pass `group`, or use "
                           "GradientSurgery in a single process")
    if group is not None:
        ranks = dist.get_process_group_ranks(group)
        if dist.get_rank() not in ranks:
            raise ValueError(f"{caller}: this process (rank {dist.get_rank()}) is not in "
                             f"`group` (ranks {_indices(sorted(ranks))}), so the group's "
                             "collectives would not include it; build the surgery only on "
                             "the group's processes, or pass a group that holds this one")


def _require_shards_in_group(tensors: Sequence[torch.Tensor], group: ProcessGroup | None
                             ) -> None:
    """Refuse DTensor parameters sharded over processes outside ``group``: each process's Gram
    covers its own shards only, so the sum over ``group`` missed the other shards, and every
    process solved for different weights (one-process subgroups of a 2-process FSDP2 mesh:
    weights 0.05 apart, gradients 8e-3 off, no error)."""
    within = set(dist.get_process_group_ranks(group) if group is not None
                 else range(dist.get_world_size()))
    for i, tensor in enumerate(tensors):
        if not is_dtensor(tensor):
            continue
        mesh = tensor.device_mesh
        for dim, placement in enumerate(tensor.placements):
            if not placement.is_shard():
                continue
            sharded_over = sorted(dist.get_process_group_ranks(mesh.get_group(dim)))
            if not set(sharded_over) <= within:
                raise ValueError(
                    f"sharded_surgery: shared parameter {i} is sharded over ranks "
                    f"{_indices(sharded_over)} (mesh dimension {dim}), not all in `group` "
                    f"(ranks {_indices(sorted(within))}), so the Gram summed over `group` "
                    "would miss the other ranks' shards; pass the mesh's group (or none, "
                    "the default group)")


def sharded_surgery(shared_params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                    aggregator: Aggregator | Weighting, *, group: ProcessGroup | None = None,
                    head_params: Iterable[torch.Tensor] | None = None,
                    per_task: PerTaskMode | None = None, per_layer: bool | Sequence[int] = False,
                    num_layers: int | None = None,
                    check_finite: bool | None = None) -> GradientSurgery:
    """A :class:`GradientSurgery` for sharded shared parameters (FSDP2 ``fully_shard`` modules,
    or parameter lists split across ranks). ``per_task=None`` (the default) is ``"backward"``
    when the parameters are DTensors (FSDP2 reduce-scatters inside ``backward``), else
    ``"autograd"``; the other keyword arguments are :class:`GradientSurgery`'s. Per-layer ids
    (``per_layer=[...]``) are global layer ids and need ``num_layers``; ``per_layer=True`` (one
    layer per tensor) only with DTensor parameters, where every rank holds a shard of every
    tensor."""
    _require_process_group("sharded_surgery", group)
    # list() keeps the kind of the iterable (bare tensors or (name, tensor) pairs).
    params = cast("list[torch.Tensor] | list[tuple[str, torch.Tensor]]", list(shared_params))
    tensors = [p[1] if isinstance(p, tuple) else p for p in params]
    if not isinstance(per_layer, bool) and num_layers is None:
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
    if per_task is None:
        per_task = "backward" if any(is_dtensor(t) for t in tensors) else "autograd"
    _require_shards_in_group(tensors, group)
    return GradientSurgery(params, aggregator, head_params=head_params, per_task=per_task,
                           per_layer=per_layer, num_layers=num_layers,
                           reducer=ShardedReducer(group), check_finite=check_finite)


def replicated_surgery(shared_params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       aggregator: Aggregator | Weighting, *, group: ProcessGroup | None = None,
                       head_params: Iterable[torch.Tensor] | None = None,
                       per_task: PerTaskMode = "autograd",
                       per_layer: bool | Sequence[int] = False, num_layers: int | None = None,
                       check_finite: bool | None = None) -> GradientSurgery:
    """A :class:`GradientSurgery` for data-parallel replicas (DDP-style): per-task gradients and
    head gradients are averaged across ``group`` before the aggregation. Needs
    ``per_task="autograd"`` or ``"batched"`` (the default ``"autograd"``): with ``"backward"`` a
    DDP module would reduce on its own.

    Pass ``head_params`` (every task-specific parameter) when a task's loss may not reach its
    head on some rank (no labels of that task in the rank's batch): the head then counts as a
    zero gradient there and every rank gets the same average. Without them the ranks must reach
    the same heads (each known by which tasks reach it and its shape); if they do not, every
    rank raises a ValueError saying so (:class:`ReplicatedReducer`). The other keyword
    arguments are :class:`GradientSurgery`'s."""
    _require_process_group("replicated_surgery", group)
    if per_task == "backward":
        raise ValueError("replicated_surgery: per_task='backward' is not supported (DDP's hooks "
                         "cannot run k backward passes per forward); use 'autograd' or 'batched'")
    params = cast("list[torch.Tensor] | list[tuple[str, torch.Tensor]]", list(shared_params))
    if not params:
        # Replicas hold the same list: every rank raises alike (GradientSurgery lets an empty
        # list through under a reducer, for a sharded rank without a shard).
        raise ValueError("replicated_surgery: `shared_params` holds no tensor")
    surgery = GradientSurgery(params, aggregator, head_params=head_params, per_task=per_task,
                              per_layer=per_layer, num_layers=num_layers,
                              reducer=ReplicatedReducer(group), check_finite=check_finite)
    # With the surgery's own head list (an iterator given as head_params is consumed by now).
    surgery.reducer = ReplicatedReducer(group, surgery.head_params)
    return surgery
