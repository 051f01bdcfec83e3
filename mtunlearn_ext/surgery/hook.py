"""Gradient surgery for any optimizer loop: per-task gradients in, ``.grad`` out.

``loss.backward()`` becomes ``surgery.backward(losses)``: the gradient of every task loss with
respect to the shared parameters is computed into a per-parameter stack ``[k, *shape_p]``, the
aggregator's weights come from the ``k x k`` Gram matrix of those stacks, and the weighted sum
is written straight into each shared parameter's ``.grad`` (added to what is already there, so
gradient accumulation over micro-batches works as with ``backward``). Parameters outside the
shared set that the losses reach (task heads) receive the plain sum of their task gradients,
as ``sum(losses).backward()`` would give them. No flat copy of the parameters or gradients is
ever made; the only extra memory is the ``k`` stacks.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from mtunlearn_ext.surgery._tensor_lists import (
    is_dtensor,
    layer_index,
    local_tensor,
    new_grad_like,
)
from mtunlearn_ext.surgery.aggregators import Aggregator
from mtunlearn_ext.surgery.projections import aggregate_list
from mtunlearn_ext.surgery.weightings import Weighting

#: How per-task gradients are obtained.
#:
#: ``"autograd"``: ``torch.autograd.grad`` once per task (retaining the graph between tasks); the
#: head gradients come out of the same passes. Works with eager and ``torch.compile``\\ d models.
#: ``"batched"``: one vmapped ``torch.autograd.grad`` over the stacked losses
#: (``is_grads_batched``); fastest for small models in eager mode, but every op on the path
#: needs a batching rule and inductor-compiled backward graphs do not support it.
#: ``"backward"``: ``loss.backward()`` once per task, harvesting ``.grad`` after each. Needed when
#: gradient hooks of a wrapper must run (FSDP2's reduce-scatter) and for trainers built around
#: ``.backward`` (LibMTL's ``mode='backward'``); head gradients accumulate natively.
PerTaskMode = Literal["autograd", "batched", "backward"]


class GradReducer(Protocol):
    """Cross-process steps of a surgery (see :mod:`mtunlearn_ext.surgery.distributed`)."""

    def reduce_task_grads(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor]
                          ) -> None:
        """In place, before the Gram pass: e.g. average data-parallel per-task gradients."""

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """The global Gram matrix from the local one (SUM over shards, or identity)."""


@dataclass
class _SharedList:
    """The shared parameters that take part (frozen and repeated ones do not), and where each
    of the given list's entries went: ``slot[i]`` is the index in ``tensors`` of given entry
    ``i``, ``None`` for a frozen one."""

    names: list[str]
    tensors: list[torch.Tensor]
    slot: list[int | None]


def _split_named(params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                 ) -> _SharedList:
    shared = _SharedList([], [], [])
    listed: dict[int, int] = {}
    for i, item in enumerate(params):
        if isinstance(item, tuple):
            name, t = item
        else:
            name, t = f"param{i}", item
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"GradientSurgery: shared parameter {name!r} is a "
                            f"{type(t).__name__}, not a tensor")
        if not t.requires_grad:
            shared.slot.append(None)
            continue
        if not t.is_leaf:  # its .grad is never filled: the surgery would silently do nothing
            raise ValueError(f"GradientSurgery: shared parameter {name!r} is not a leaf tensor "
                             "(a computed one, whose .grad autograd does not keep); pass the "
                             "model's parameters")
        if id(t) in listed:  # listed twice: it counts once in the Gram, not twice
            shared.slot.append(listed[id(t)])
            continue
        listed[id(t)] = len(shared.tensors)
        shared.slot.append(len(shared.tensors))
        shared.names.append(name)
        shared.tensors.append(t)
    return shared


def _kept_layer_ids(per_layer: bool | Sequence[int], shared: _SharedList,
                    num_layers: int | None = None) -> bool | list[int]:
    """``per_layer`` as the user gives it (one id per shared tensor as passed, frozen and
    repeated ones included) -> one id per tensor that takes part, renumbered ``0..L-1`` in id
    order (a layer whose tensors are all frozen drops out). With ``num_layers`` the ids are
    global (a rank's part of a split list) and kept as they are, each below ``num_layers``."""
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"GradientSurgery: `num_layers` must be an integer >= 1, got "
                             f"{num_layers!r}")
        if isinstance(per_layer, bool):
            raise ValueError("GradientSurgery: `num_layers` goes with `per_layer` ids (the "
                             "global layer id of each shared tensor), got per_layer="
                             f"{per_layer}")
    if isinstance(per_layer, bool):
        return per_layer
    if isinstance(per_layer, (str, bytes)) or not isinstance(per_layer, Iterable):
        raise TypeError(f"GradientSurgery: `per_layer` must be a bool or a sequence of layer "
                        f"ids, got {type(per_layer).__name__}")
    given = list(per_layer)  # a list, tuple, NumPy array or integer tensor
    try:
        if any(isinstance(i, bool) for i in given):
            raise TypeError
        ids = [operator.index(i) for i in given]
    except TypeError:
        raise TypeError(f"GradientSurgery: `per_layer` ids must be integers, got "
                        f"{given}") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"GradientSurgery: `per_layer` ids must be non-negative, got {ids}")
    if len(ids) != len(shared.slot):
        raise ValueError(f"GradientSurgery: `per_layer` must give one layer id per shared tensor "
                         f"as passed ({len(shared.slot)}, frozen ones included), got {len(ids)}")
    kept: list[int | None] = [None] * len(shared.tensors)
    for layer, slot in zip(ids, shared.slot):
        if slot is None:
            continue
        if kept[slot] is not None and kept[slot] != layer:
            raise ValueError(f"GradientSurgery: shared parameter {shared.names[slot]!r} is "
                             f"listed twice, with layer ids {kept[slot]} and {layer}")
        kept[slot] = layer
    if num_layers is not None:
        global_ids = [layer for layer in kept if layer is not None]
        layer_index(global_ids, len(global_ids), "GradientSurgery", num_layers)  # range check
        return global_ids
    renumber = {layer: new for new, layer in enumerate(sorted({i for i in kept if i is not None}))}
    return [renumber[layer] for layer in kept if layer is not None]


def _reachable_leaves(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf tensors the losses depend on (the ``variable`` of every ``AccumulateGrad`` node)."""
    # Visited nodes are kept alive, not only their ids: a node's Python wrapper can be freed once
    # popped, and a new wrapper (of another node) can then reuse its address, so a set of bare
    # ids skipped unvisited parts of the graph (seen with Python 3.12 / torch 2.11, on the CPU
    # and on CUDA: every head left without its gradient; never with Python 3.11).
    seen: dict[int, object] = {}
    found: dict[int, torch.Tensor] = {}
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found[id(variable)] = variable
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return list(found.values())


def _store(slots: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], *,
           add: bool) -> None:
    """``slots[p] = grads[p]`` (``+=`` with ``add``; zero where a gradient is ``None``), as a
    few multi-tensor ops over the whole list instead of one op (one CUDA launch) per tensor:
    a model's parameter list has hundreds of tensors, stored ``k`` times per step."""
    present = [(slot, g) for slot, g in zip(slots, grads) if g is not None]
    if present:
        dst, src = zip(*present)
        if add:
            torch._foreach_add_(list(dst), list(src))
        else:
            torch._foreach_copy_(list(dst), list(src))
    if not add and len(present) < len(slots):
        torch._foreach_zero_([slot for slot, g in zip(slots, grads) if g is None])


class GradientSurgery:
    """Apply an aggregator to per-task gradients of the shared parameters, into ``.grad``.

    Args:
        shared_params: the shared (backbone) parameters, as tensors or ``(name, tensor)`` pairs
            (``model.trunk.named_parameters()``); those without ``requires_grad`` are skipped.
            FSDP2 (DTensor) parameters are handled shard-locally: use ``per_task="backward"`` and
            a sharded reducer (:func:`mtunlearn_ext.surgery.distributed.sharded_surgery`).
        aggregator: an :class:`~mtunlearn_ext.surgery.Aggregator` or a
            :class:`~mtunlearn_ext.surgery.Weighting`.
        head_params: the non-shared parameters. ``None``: every other leaf the losses reach,
            found by a walk of the autograd graph at each call (pass them to skip the walk).
            Ignored with ``per_task="backward"``, where heads accumulate natively.
        per_task: how per-task gradients are computed (:data:`PerTaskMode`).
        per_layer: one aggregation per layer instead of one global one (``True``: per tensor;
            or a layer id per shared tensor as passed, frozen ones included: layers are
            renumbered ``0..L-1`` in id order over the tensors that take part, and the rows of
            the returned weights follow that order).
        num_layers: the global number of layers ``L`` when each rank passes its part of a
            parameter list split across ranks with global ``per_layer`` ids (needed there:
            every rank must reduce ``[L, k, k]`` Grams of one layout); the ids are then kept
            as given, and a layer with no tensor here contributes nothing to the local Gram.
        reducer: cross-process steps (``None``: single process).
        check_finite: raise on NaN/Inf task gradients (read from the Gram matrix, so not with
            ``Mean`` / ``Sum``, which need none: there NaN reaches ``.grad`` as with
            ``sum(losses).backward()``). Set ``False`` under a ``GradScaler``
            (fp16): an overflowing step must reach ``.grad`` as Inf/NaN for the scaler to skip
            it, and the aggregators' weights are scale-invariant, so scaled losses give the
            scaled update the scaler expects.
    """

    def __init__(self, shared_params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 aggregator: Aggregator | Weighting, *,
                 head_params: Iterable[torch.Tensor] | None = None,
                 per_task: PerTaskMode = "autograd", per_layer: bool | Sequence[int] = False,
                 num_layers: int | None = None, reducer: GradReducer | None = None,
                 check_finite: bool = True) -> None:
        shared = _split_named(shared_params)
        self.names, self.params = shared.names, shared.tensors
        if not self.params:
            raise ValueError("GradientSurgery: `shared_params` holds no tensor requiring grad")
        if per_task not in ("autograd", "batched", "backward"):
            raise ValueError(f"GradientSurgery: `per_task` must be 'autograd', 'batched' or "
                             f"'backward', got {per_task!r}")
        if per_task != "backward" and any(is_dtensor(p) for p in self.params):
            raise ValueError("GradientSurgery: DTensor (FSDP2) parameters need "
                             "per_task='backward', so that FSDP2's reduce-scatter hooks run")
        if not isinstance(aggregator, (Aggregator, Weighting)):
            raise TypeError(f"GradientSurgery: `aggregator` must be a mtunlearn_ext.surgery "
                            f"Aggregator or Weighting, got {type(aggregator).__name__}")
        self.aggregator = aggregator
        self.head_params = None if head_params is None else [p for p in head_params
                                                             if p.requires_grad]
        self.per_task: PerTaskMode = per_task
        self.per_layer = _kept_layer_ids(per_layer, shared, num_layers)
        self.num_layers = num_layers
        self.reducer = reducer
        self.check_finite = check_finite
        self._shared_ids = {id(p) for p in self.params}
        if self.head_params is not None and any(id(p) in self._shared_ids
                                                for p in self.head_params):
            raise ValueError("GradientSurgery: `head_params` holds shared parameters; a "
                             "parameter is either shared (its gradient goes through the "
                             "aggregator) or a head's (its gradients are summed)")
        # State of accumulate() / apply(): per-task buffers and the heads they touched.
        self._buffers: list[torch.Tensor] | None = None
        self._buffered_tasks: int | None = None
        self._pending = False
        self._pending_heads: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ public API

    def backward(self, losses: Sequence[torch.Tensor], *, retain_graph: bool = False
                 ) -> torch.Tensor:
        """Per-task gradients of ``losses`` -> aggregated update added into ``.grad``.

        Args:
            losses: ``k`` scalar task losses (scaled ones under a ``GradScaler``).
            retain_graph: keep the graph after the last task (as in ``Tensor.backward``).

        Returns:
            The aggregator's weights (``[k]``, or ``[L, k]`` per layer).
        """
        losses = self._check_losses(losses)
        stacks = [torch.empty((len(losses), *local_tensor(p).shape), dtype=p.dtype,
                              device=local_tensor(p).device) for p in self.params]
        heads = self._per_task_grads(losses, stacks, add=False, retain_graph=retain_graph)
        return self._aggregate(stacks, heads)

    def accumulate(self, losses: Sequence[torch.Tensor], *, retain_graph: bool = False) -> None:
        """Add the per-task gradients of ``losses`` to internal per-task buffers (one stack per
        shared parameter); heads get their gradients in ``.grad`` at once. Call :meth:`apply`
        after the last micro-batch: the surgery then sees the accumulated per-task gradients
        (large-batch semantics), not one surgery per micro-batch."""
        losses = self._check_losses(losses)
        k = len(losses)
        if self._pending and self._buffered_tasks != k:
            raise ValueError(f"GradientSurgery.accumulate: got {k} losses, but the micro-batches "
                             f"accumulated since the last apply() have {self._buffered_tasks} "
                             "tasks; every micro-batch of one step needs the same tasks, in "
                             "the same order")
        if self._buffers is None or self._buffered_tasks != k:
            self._buffers = [torch.empty((k, *local_tensor(p).shape), dtype=p.dtype,
                                         device=local_tensor(p).device) for p in self.params]
            self._buffered_tasks = k
            self._pending = False
        heads = self._per_task_grads(losses, self._buffers, add=self._pending,
                                     retain_graph=retain_graph)
        self._pending = True
        for h in heads:
            self._pending_heads[id(h)] = h

    def apply(self, per_task_grads: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Aggregate per-task gradients that already sit in buffers into ``.grad``.

        Args:
            per_task_grads: one stack ``[k, *shape_p]`` per shared parameter (the local shard's
                shape for FSDP2), in the order of ``self.params``; they may be modified in place
                by a reducer. ``None``: the buffers filled by :meth:`accumulate`, which are then
                marked consumed.

        Returns:
            The aggregator's weights.
        """
        if per_task_grads is None:
            if not self._pending or self._buffers is None:
                raise RuntimeError("GradientSurgery.apply: nothing accumulated; call "
                                   "accumulate(losses) first or pass `per_task_grads`")
            heads = list(self._pending_heads.values())
            self._pending = False
            self._pending_heads = {}
            return self._aggregate(self._buffers, heads)
        stacks = list(per_task_grads)
        if len(stacks) != len(self.params):
            raise ValueError(f"GradientSurgery.apply: expected {len(self.params)} stacks (one per "
                             f"shared parameter), got {len(stacks)}")
        for name, p, s in zip(self.names, self.params, stacks):
            if tuple(s.shape[1:]) != tuple(local_tensor(p).shape):
                raise ValueError(f"GradientSurgery.apply: the stack for {name!r} must be "
                                 f"[k, *{tuple(local_tensor(p).shape)}], got {tuple(s.shape)}")
        return self._aggregate(stacks, [])

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_losses(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        losses = list(losses)
        if not losses:
            raise ValueError("GradientSurgery: `losses` must hold at least one loss")
        for t, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"GradientSurgery: losses[{t}] must be a scalar tensor")
            if not loss.requires_grad:
                raise ValueError(f"GradientSurgery: losses[{t}] does not require grad")
        return losses

    def _heads(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.head_params is not None:
            return self.head_params
        return [v for v in _reachable_leaves(losses)
                if v.requires_grad and id(v) not in self._shared_ids]

    def _per_task_grads(self, losses: list[torch.Tensor], stacks: list[torch.Tensor], *,
                        add: bool, retain_graph: bool) -> list[torch.Tensor]:
        """Fill (or add into) ``stacks[p][t]`` with d losses[t] / d params[p]; head gradients
        summed into their ``.grad``. Returns the heads' ``.grad`` tensors it wrote."""
        k = len(losses)
        if self.per_task == "backward":
            return self._per_task_by_backward(losses, stacks, add=add, retain_graph=retain_graph)
        heads = self._heads(losses)
        inputs = [*self.params, *heads]
        n_shared = len(self.params)
        head_sums: list[torch.Tensor | None] = [None] * len(heads)
        if self.per_task == "batched":
            stacked = torch.stack([loss.reshape(()) for loss in losses])
            eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
            grads = torch.autograd.grad(stacked, inputs, grad_outputs=eye, is_grads_batched=True,
                                        retain_graph=retain_graph, allow_unused=True)
            _store(stacks, grads[:n_shared], add=add)
            head_sums = [None if g is None else g.sum(0) for g in grads[n_shared:]]
        else:
            rows = [s.unbind(0) for s in stacks]  # rows[p][t]: task t's slot of parameter p
            for t, loss in enumerate(losses):
                keep = retain_graph or t < k - 1
                grads = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)
                _store([r[t] for r in rows], grads[:n_shared], add=add)
                for h, g in enumerate(grads[n_shared:]):
                    if g is not None:
                        # Out of place: autograd may hand back expanded (stride-0) gradients.
                        total = head_sums[h]
                        head_sums[h] = g if total is None else total + g
        written = []
        fresh: list[torch.Tensor] = []
        for head, summed in zip(heads, head_sums):
            if summed is None:
                continue
            if head.grad is None:
                # Autograd may return one tensor for two leaves (the gradient of h1 + h2 is the
                # same object for both): stored as is, the two .grad would be one tensor, and an
                # in-place change to one (accumulation, clipping, unscaling) would hit both.
                aliased = any(summed.data_ptr() == other.data_ptr() for other in fresh)
                if aliased or not summed.is_contiguous():
                    summed = summed.clone(memory_format=torch.contiguous_format)
                head.grad = summed
                fresh.append(summed)
            else:
                head.grad.add_(summed)
            written.append(head.grad)
        return written

    def _per_task_by_backward(self, losses: list[torch.Tensor], stacks: list[torch.Tensor], *,
                              add: bool, retain_graph: bool) -> list[torch.Tensor]:
        k = len(losses)
        # .grad of the shared parameters is borrowed as scratch for one task at a time; what it
        # held before (earlier micro-batches) is put back untouched.
        stash = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        rows = [s.unbind(0) for s in stacks]
        try:
            for t, loss in enumerate(losses):
                loss.backward(retain_graph=retain_graph or t < k - 1)
                _store([r[t] for r in rows],
                       [None if p.grad is None else local_tensor(p.grad) for p in self.params],
                       add=add)
                for param in self.params:
                    param.grad = None
        finally:
            for param, g in zip(self.params, stash):
                param.grad = g
        return []

    def _grad_outputs(self) -> tuple[list[torch.Tensor], list[float]]:
        """The local tensor of each shared ``.grad`` to write into, and 1 (accumulate into an
        existing gradient) or 0 (a fresh one, whose garbage contents beta=0 ignores)."""
        outs: list[torch.Tensor] = []
        betas: list[float] = []
        for p in self.params:
            if p.grad is None:
                p.grad = new_grad_like(p)
                betas.append(0.0)
            else:
                if not local_tensor(p.grad).is_contiguous():
                    p.grad = p.grad.contiguous()
                betas.append(1.0)
            outs.append(local_tensor(p.grad))
        return outs, betas

    def _aggregate(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor]
                   ) -> torch.Tensor:
        if self.reducer is not None:
            self.reducer.reduce_task_grads(stacks, [local_tensor(h) for h in head_grads])
        outs, betas = self._grad_outputs()
        try:
            return aggregate_list(self.aggregator, stacks, outs, betas, per_layer=self.per_layer,
                                  num_layers=self.num_layers,
                                  reduce=None if self.reducer is None
                                  else self.reducer.reduce_stats,
                                  check_finite=self.check_finite)
        except BaseException as error:
            self._drop_unwritten_grads(betas)
            if isinstance(error, FloatingPointError):
                raise FloatingPointError(self._non_finite_message(stacks, error)) from error
            raise

    def _drop_unwritten_grads(self, betas: Sequence[float]) -> None:
        """After a failed aggregation: the ``.grad`` buffers :meth:`_grad_outputs` allocated for
        it (uninitialised memory) go back to ``None``, so that a caller who catches the error
        and goes on does not step on garbage."""
        for p, beta in zip(self.params, betas):
            if beta == 0.0:
                p.grad = None

    def _non_finite_message(self, stacks: list[torch.Tensor], error: FloatingPointError) -> str:
        """Which tasks' gradients are not finite, and in which parameter first (the ops' own
        message names only their argument, a stack of every task's gradients). Runs only
        once the check has failed, so it costs nothing on the normal path."""
        tasks = stacks[0].shape[0] if stacks else 0
        first: dict[int, str] = {}
        for name, stack in zip(self.names, stacks):
            rows = (~torch.isfinite(stack.reshape(tasks, -1))).any(dim=1).nonzero().flatten()
            for t in rows.tolist():
                first.setdefault(t, name)
        hint = ("; if the losses are scaled by a GradScaler, pass check_finite=False so that "
                "the overflow reaches .grad and the scaler skips the step")
        if not first:  # finite gradients whose Gram overflowed
            return f"GradientSurgery: {error}{hint}"
        listed = ", ".join(f"losses[{t}] (first in {first[t]!r})" for t in sorted(first))
        return f"GradientSurgery: the gradients of {listed} hold NaN or Inf{hint}"
