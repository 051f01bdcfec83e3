"""Gradient surgery for any optimizer loop: per-task gradients in, ``.grad`` out.

``loss.backward()`` becomes ``surgery.backward(losses)``: the gradient of every task loss with
respect to the shared parameters is computed into a per-parameter stack ``[k, *shape_p]``, the
aggregator's weights come from the ``k x k`` Gram matrix of those stacks, and the weighted sum
is written straight into each shared parameter's ``.grad`` (added to what is already there, so
gradient accumulation over micro-batches works as with ``backward``). Parameters outside the
shared set that the losses reach (task heads) receive the plain sum of their task gradients,
as ``sum(losses).backward()`` would give them. No flat copy of the parameters or gradients is
ever made; the extra memory is the ``k`` stacks and, at a call's peak, one more copy of the
shared parameters (a new ``.grad``, or one task's gradients on their way into the stacks):
``k + 1`` copies in every mode (``per_task="batched"`` uses its pass's ``[k, *shape]`` outputs
as the stacks). The surgery keeps the stacks from one call to the next while they are small
(:data:`KEPT_STACKS_MAX_BYTES`; made anew when the number of tasks, the shared parameters
taking part, or one's shape, dtype or device changes); ``"batched"``'s backward() keeps none.

As with ``sum(losses).backward()``, a shared parameter that no task's loss reaches keeps its
``.grad`` as it is (``None`` stays ``None``, so optimizers skip it), and which shared parameters
take part is read from ``requires_grad`` at each call (layers frozen or unfrozen between steps).
A loss that does not require grad (a constant stand-in for a task with no labels in the batch)
counts as a zero gradient, as it does in the plain sum.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._warnings import warn_at_caller
from mtunlearn_ext.ops._checks import check_bool
from mtunlearn_ext.ops._fake_checks import sizes
from mtunlearn_ext.surgery._autograd_graph import (
    compiled_backward_donating,
    graph_nodes,
    leaves_with_tasks,
    reachable_leaves,
    sparse_fed_leaves,
)
from mtunlearn_ext.surgery._tensor_lists import (
    integer_layer_ids,
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
#: head gradients come out of the same passes. Works with eager and ``torch.compile``\\ d models
#: (with inductor, compiled with ``torch._functorch.config.donated_buffer = False`` and
#: ``torch._inductor.config.fx_graph_cache = False``: a backward that frees its saved
#: activations after one pass cannot be run once per task; docs/dropin.md),
#: and with heads whose gradients are sparse (``nn.Embedding(sparse=True)``).
#: ``"batched"``: one vmapped ``torch.autograd.grad`` over the stacked losses
#: (``is_grads_batched``); fastest for small models in eager mode, but every op on the path
#: needs a batching rule (sparse gradients have none) and inductor-compiled backward graphs do
#: not support it.
#: ``"backward"``: ``loss.backward()`` once per task, harvesting ``.grad`` after each. Needed when
#: gradient hooks of a wrapper must run (FSDP2's reduce-scatter) and for trainers built around
#: ``.backward`` (LibMTL's ``mode='backward'``); head gradients accumulate natively.
PerTaskMode = Literal["autograd", "batched", "backward"]

#: The most memory (bytes, all per-task stacks together) that ``backward()`` and ``apply()``
#: keep allocated from one step to the next (``per_task="batched"``'s ``backward()`` keeps none:
#: its pass's outputs are the stacks). Small models' stacks are kept: making them again
#: was 2-6% of their step. Larger ones are freed after the step, so that a large model does not
#: hold ``k`` copies of its shared gradients through the optimizer step and evaluation.
KEPT_STACKS_MAX_BYTES = 64 * 2**20


class GradReducer(Protocol):
    """Cross-process steps of a surgery (see :mod:`mtunlearn_ext.surgery.distributed`).

    Besides the two methods below, the hook calls these where a reducer has them (the
    package's sharded reducer the first four, its replicated one the last):
    ``agree_on_task_count(k, device)`` before ``per_task="backward"``'s passes, whose
    collectives need every process to run as many; ``agree_on_aggregator(aggregator, k,
    device)`` before each aggregation, whether the processes aggregate alike;
    ``join_stats(stats)``,
    :meth:`reduce_stats` for a process with nothing to aggregate; ``any_rank(flag,
    device)``, whether a flag holds on any process (a step every process refuses together);
    ``nonfinite_note()``, what a refused step's message adds.
    """

    def reduce_task_grads(self, stacks: list[torch.Tensor], head_grads: list[torch.Tensor], *,
                          reached: list[bool] | None = None,
                          head_tasks: Sequence[int] | None = None,
                          stack_names: Sequence[str] | None = None,
                          aggregator: Aggregator | Weighting | None = None) -> None:
        """In place, before the Gram pass: e.g. average data-parallel per-task gradients.

        ``reached`` (one flag per stack: some task's loss reached that shared parameter in this
        process) is updated in place to what the aggregation must write: a parameter whose
        averaged stack comes from other processes too is reached if any of them reached it.
        ``head_tasks``: for each head gradient, the bit mask of the tasks whose loss reached it
        (how processes that find their heads on their own can tell whether they found the
        same ones); ``None`` when not known. ``stack_names``: the shared parameters' names in
        the surgery, one per stack (how processes can tell whether they take part with the
        same ones); passed only to a reducer whose signature names it (or takes
        ``**kwargs``). ``aggregator``: the surgery's aggregator (how processes can tell whether
        they weight the task gradients alike), passed on the same terms."""

    def reduce_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """The global Gram matrix from the local one (SUM over shards, or identity)."""


@dataclass
class _SharedList:
    """The shared parameters as given, each tensor once, frozen ones included (which of them
    take part is decided at each call, from ``requires_grad`` then): ``slot[i]`` is the index
    in ``tensors`` of given entry ``i`` (a tensor listed twice has one place)."""

    names: list[str]
    tensors: list[torch.Tensor]
    slot: list[int]


@dataclass
class _Active:
    """The shared parameters taking part in one call, those requiring grad at that moment, with
    their per-layer ids (each tensor keeps the id given for it; see :func:`_active_layer_ids`)."""

    names: list[str]
    params: list[torch.Tensor]
    per_layer: bool | list[int]


#: Loss values of one batched pass, ``values[i]`` that of task ``tasks[i]`` (a stack of them
#: detached, or the losses as given): what a refused step reads to tell which tasks broke it.
_LossRecord = tuple[Sequence[int], torch.Tensor | Sequence[torch.Tensor]]


@dataclass
class _TaskPass:
    """What the per-task pass of one call (or of the micro-batches of one step) left: for each
    shared parameter whether any task's loss reached it, the heads' ``.grad`` tensors it wrote,
    for each of those the bit mask of the tasks that reached it (``None``: not collected), and
    the tasks whose loss was a constant (for the message of a refused step)."""

    reached: list[bool]
    heads: list[torch.Tensor]
    head_tasks: list[int] | None
    constants: frozenset[int] = frozenset()
    #: The number of tasks and the losses' device: what a process with no shared parameter
    #: taking part (under a reducer) needs to join the others' collectives.
    tasks: int = 0
    device: torch.device | None = None
    #: The loss values behind rows that per_task="batched" computed (``None``: rows computed
    #: one task at a time, or given to apply()), for the message of a refused step.
    batched_losses: list[_LossRecord] | None = None


@dataclass
class _HeadSums:
    """The heads' gradients of one per-task pass, summed over the tasks but not yet in
    ``.grad``: ``sums[h]`` is ``None`` where no task reached head ``h``, ``tasks[h]`` the bit
    mask of the tasks that reached it (``tasks`` is ``None`` when not collected). Kept apart so
    that a step can be refused (NaN task gradients) before any ``.grad`` is written."""

    heads: list[torch.Tensor]
    sums: list[torch.Tensor | None]
    tasks: list[int] | None

    def write(self) -> tuple[list[torch.Tensor], list[int] | None]:
        """Each sum into its head's ``.grad``; returns the ``.grad`` tensors written and the
        task mask of each (as :class:`_TaskPass` holds them)."""
        written = _write_heads(self.heads, self.sums)
        return ([grad for _, grad in written],
                None if self.tasks is None else [self.tasks[h] for h, _ in written])


def _split_named(params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                 ) -> _SharedList:
    if isinstance(params, torch.nn.Module):  # iterating a module fails, or yields submodules
        raise TypeError(f"GradientSurgery: `shared_params` must be the shared parameters, got "
                        f"the module {type(params).__name__}; pass its parameters() or "
                        "named_parameters()")
    if isinstance(params, torch.Tensor):  # iterating it yields its rows, views of it
        raise TypeError(f"GradientSurgery: `shared_params` must be an iterable of parameters, "
                        f"got a single tensor of shape {sizes(params.shape)}; pass [param], or "
                        "the model's parameters() or named_parameters()")
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
        if not t.is_leaf:  # its .grad is never filled: the surgery would silently do nothing
            raise ValueError(f"GradientSurgery: shared parameter {name!r} is not a leaf tensor "
                             "(a computed one, whose .grad autograd does not keep); pass the "
                             "model's parameters")
        if not t.requires_grad and not isinstance(t, torch.nn.Parameter):
            # A frozen parameter is an nn.Parameter; a plain tensor that does not require grad
            # is a copy (state_dict() values, .data, .detach()) that no loss can reach.
            raise ValueError(f"GradientSurgery: shared parameter {name!r} is a plain tensor "
                             "that does not require grad, a detached copy (the values of "
                             "state_dict(), .data or .detach()) that no loss reaches; pass the "
                             "model's parameters() or named_parameters()")
        if t.layout != torch.strided:  # the per-task stacks and the combination are dense
            raise ValueError(f"GradientSurgery: shared parameter {name!r} is a {t.layout} "
                             "tensor; the surgery needs dense shared parameters (leave it out "
                             "of `shared_params`: it then gets the plain sum, as a head)")
        if id(t) in listed:  # listed twice: it counts once in the Gram, not twice
            shared.slot.append(listed[id(t)])
            continue
        listed[id(t)] = len(shared.tensors)
        shared.slot.append(len(shared.tensors))
        shared.names.append(name)
        shared.tensors.append(t)
    return shared


def _checked_num_layers(num_layers: object) -> int | None:
    """``num_layers`` as the Python int it stands for (NumPy's integers too), or ``None``."""
    if num_layers is None:
        return None
    count = integer_value(num_layers)
    if count is None or count < 1:
        raise ValueError(f"GradientSurgery: `num_layers` must be an integer >= 1, got "
                         f"{num_layers!r}")
    return count


def _given_layer_ids(per_layer: bool | Sequence[int], shared: _SharedList,
                     num_layers: int | None = None) -> bool | list[int]:
    """``per_layer`` as the user gives it (one id per shared tensor as passed, frozen and
    repeated ones included) -> one id per tensor of ``shared.tensors``, checked. Which of them
    take part, and so how the ids are renumbered, is decided at each call
    (:func:`_active_layer_ids`). With ``num_layers`` the ids are global (a rank's part of a
    split list), each below ``num_layers``."""
    if num_layers is not None:
        if isinstance(per_layer, bool):
            raise ValueError("GradientSurgery: `num_layers` goes with `per_layer` ids (the "
                             "global layer id of each shared tensor), got per_layer="
                             f"{per_layer}")
    if isinstance(per_layer, bool):
        return per_layer
    ids = integer_layer_ids("GradientSurgery", per_layer)
    if any(i < 0 for i in ids):
        raise ValueError(f"GradientSurgery: `per_layer` ids must be non-negative, got {ids}")
    if len(ids) != len(shared.slot):
        raise ValueError(f"GradientSurgery: `per_layer` must give one layer id per shared tensor "
                         f"as passed ({len(shared.slot)}, frozen ones included), got {len(ids)}")
    kept: list[int | None] = [None] * len(shared.tensors)
    for layer, slot in zip(ids, shared.slot):
        if kept[slot] is not None and kept[slot] != layer:
            raise ValueError(f"GradientSurgery: shared parameter {shared.names[slot]!r} is "
                             f"listed twice, with layer ids {kept[slot]} and {layer}")
        kept[slot] = layer
    layers = [layer for layer in kept if layer is not None]  # every slot has its id by now
    if num_layers is not None:
        layer_index(layers, len(layers), "GradientSurgery", num_layers)  # range check
    return layers


def _active_layer_ids(given: bool | list[int], active: Sequence[int],
                      num_layers: int | None) -> bool | list[int]:
    """The ids of the tensors taking part in a call (``active``: their places in the given
    list), each its own given id: as given with ``num_layers`` (global ids), else renumbered
    ``0..L-1`` in id order (a layer whose tensors are all frozen drops out)."""
    if isinstance(given, bool):
        return given
    ids = [given[i] for i in active]
    if num_layers is not None:
        return ids
    renumber = {layer: new for new, layer in enumerate(sorted(set(ids)))}
    return [renumber[layer] for layer in ids]


def _member_layer_ids(per_layer: bool | list[int], count: int, members: Sequence[int],
                      num_layers: int | None) -> tuple[bool | list[int], int | None]:
    """The layer ids of ``members`` (some of the ``count`` stacks of a call) with the number of
    layers of the whole call, so that the weights keep their ``[L, k]`` shape and each layer
    its row: a layer left without members has a zero Gram, as its zero stacks gave it."""
    if per_layer is False:
        return False, num_layers
    ids = list(range(count)) if per_layer is True else per_layer
    total = num_layers if num_layers is not None else max(ids) + 1  # renumbered: 0..L-1
    return [ids[p] for p in members], total


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


def _takes_keywords(reducer: GradReducer, *names: str, unreadable: bool = True) -> bool:
    """Whether ``reducer.reduce_task_grads`` accepts every keyword of ``names`` (reducers
    written against an earlier form of the protocol lack the later ones); ``unreadable``: the
    answer for a method without an introspectable signature."""
    import inspect

    try:
        parameters = inspect.signature(reducer.reduce_task_grads).parameters
    except (TypeError, ValueError):
        return unreadable
    return all(name in parameters for name in names) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _sparse_shared_error(name: str, layout: torch.layout) -> ValueError:
    return ValueError(f"GradientSurgery: shared parameter {name!r} got a sparse gradient "
                      f"({layout}, e.g. from nn.Embedding(sparse=True)); the surgery needs "
                      "dense per-task gradients of the shared parameters: build that module "
                      "with sparse=False, or leave the parameter out of `shared_params` (it "
                      "then gets the plain sum of its gradients, as a head)")


def _store_named(active: _Active, slots: Sequence[torch.Tensor],
                 grads: Sequence[torch.Tensor | None], *, add: bool) -> None:
    """:func:`_store`, whose failure on a sparse gradient (a copy into a dense stack) names the
    parameter; looked for only once the store has failed, so the normal path pays nothing."""
    try:
        _store(slots, grads, add=add)
    except RuntimeError as error:
        for name, g in zip(active.names, grads):
            if g is not None and g.layout != torch.strided:
                raise _sparse_shared_error(name, g.layout) from error
        raise


def _store_rows(active: _Active, stacks: Sequence[torch.Tensor], tasks: Sequence[int],
                grads: Sequence[torch.Tensor | None], *, add: bool) -> None:
    """``stacks[p][tasks] = grads[p]`` (``+=`` with ``add``), ``grads[p]`` holding one row per
    entry of ``tasks``; without ``add`` the other rows (constant losses) become zero. The
    batched pass's store when some losses are constants: one op per parameter, a path taken
    only then."""
    others: list[int] = sorted(set(range(stacks[0].shape[0])) - set(tasks)) if stacks else []
    for name, stack, g in zip(active.names, stacks, grads):
        if g is None:
            if not add:
                stack.zero_()
            continue
        if g.layout != torch.strided:
            raise _sparse_shared_error(name, g.layout)
        rows = torch.tensor(tasks, device=stack.device)
        if add:
            stack.index_add_(0, rows, g)
        else:
            stack.index_fill_(0, torch.tensor(others, dtype=torch.long, device=stack.device), 0)
            stack.index_copy_(0, rows, g)


def _adopted_stacks(active: _Active, k: int, attached: Sequence[int],
                    grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """The batched pass's outputs (``grads[p]``: ``[len(attached), *shape_p]``, or ``None``) as
    the per-task stacks of one backward() call: each output that is already a contiguous
    ``[k, *shape_p]`` tensor of its own is the stack itself; copying it into a stack made
    beforehand held ``2k`` copies of the shared gradients at once. Only where it cannot serve
    is a stack made: zeros for a parameter no loss reached, a contiguous copy of a strided
    (expanded) output or of one sharing its memory with another parameter's (a reducer
    averages stacks in place), and all ``k`` rows where some losses are constants (their
    rows are zero)."""
    stacks: list[torch.Tensor] = []
    storages: set[int] = set()
    for name, param, g in zip(active.names, active.params, grads):
        local = local_tensor(param)
        if g is None:
            stacks.append(torch.zeros((k, *local.shape), dtype=local.dtype, device=local.device))
            continue
        if g.layout != torch.strided:
            raise _sparse_shared_error(name, g.layout)
        if len(attached) < k:
            stack = torch.zeros((k, *local.shape), dtype=local.dtype, device=local.device)
            stack.index_copy_(0, torch.tensor(list(attached), device=local.device), g)
        elif g.is_contiguous() and g.untyped_storage().data_ptr() not in storages:
            stack = g
        else:
            stack = g.clone(memory_format=torch.contiguous_format)
        storages.add(stack.untyped_storage().data_ptr())
        stacks.append(stack)
    return stacks


def _poison_if_not_finite(rows: list[torch.Tensor], constant: torch.Tensor) -> None:
    """A constant loss has a zero gradient, but a NaN or Inf one is a broken loss, not a task
    without labels: its rows then turn NaN, so that the check of the task gradients refuses the
    step (on every process, once a reducer has averaged the stacks) and a ``GradScaler``
    (``check_finite=False``) skips it, as for a loss whose NaN reaches its gradients.
    A constant on the CPU is read on the host (free), wherever the rows are: a finite one
    leaves them untouched. Only a constant on a device is decided there, ``rows += 0 * constant``
    (0 where finite, NaN where not), without a host sync."""
    if not rows:
        return
    value = constant.detach().reshape(())
    # By the constant's device alone: the CPU then runs the branch a GPU runs for a CPU
    # constant (torch.zeros(()) is one), and a finite one costs no pass over the rows there.
    if value.device.type == "cpu":
        if not bool(torch.isfinite(value)):
            torch._foreach_add_(rows, float("nan"))
        return
    torch._foreach_add_(rows, value.to(rows[0].device).mul(0))


def _refuse_post_accumulate_hooks(caller: str, tensors: Iterable[torch.Tensor],
                                  describe: Callable[[int, torch.Tensor], str]) -> None:
    """Refuse parameters carrying a post-accumulate-grad hook
    (``Tensor.register_post_accumulate_grad_hook``, PyTorch's optimizer step in backward).
    Autograd runs such a hook when its ``AccumulateGrad`` node has written ``.grad``; the
    surgery writes ``.grad`` itself after combining the tasks, so the hook would never run
    (``"autograd"`` / ``"batched"``: a step silently lost), or run once per task on that
    task's raw gradient (``"backward"``). Torch has no public way to list or run a tensor's
    hooks, so they cannot be fired once ``.grad`` is final: the dict they live in (the one
    torch's own FSDP2 reads) is only looked at, one attribute read per parameter and step;
    ``describe(i, tensor)`` names a hooked one (only those: this runs at every step)."""
    hooked = [describe(i, t) for i, t in enumerate(tensors)
              if getattr(t, "_post_accumulate_grad_hooks", None)]
    if hooked:
        raise RuntimeError(
            f"{caller}: {', '.join(hooked)} carr{'ies' if len(hooked) == 1 else 'y'} a "
            "post-accumulate-grad hook (Tensor.register_post_accumulate_grad_hook, e.g. an "
            "optimizer step in backward), which the surgery cannot honour: it writes .grad "
            "itself after combining the tasks' gradients, so the hook would never run "
            "(per_task='autograd' or 'batched') or would run once per task on that task's "
            "own gradient (per_task='backward'). Remove the hook and run its work (the "
            "optimizer step) after surgery.backward()")


class GradientSurgery:
    """Apply an aggregator to per-task gradients of the shared parameters, into ``.grad``.

    Args:
        shared_params: the shared (backbone) parameters, as tensors or ``(name, tensor)`` pairs
            (``model.trunk.named_parameters()``). Those that do not require grad at a call
            are left out of it: trainability is read at each call, so layers may be frozen or
            unfrozen between steps (a parameter passed here is never treated as a head).
            Under a reducer the list may be empty, or all frozen at a call (a rank without a
            shard, or whose shard is frozen): that process then takes part in the others'
            collectives with a zero Gram and nothing to update.
            FSDP2 (DTensor) parameters are handled shard-locally: use ``per_task="backward"`` and
            a sharded reducer (:func:`mtunlearn_ext.surgery.distributed.sharded_surgery`).
        aggregator: an :class:`~mtunlearn_ext.surgery.Aggregator` or a
            :class:`~mtunlearn_ext.surgery.Weighting`.
        head_params: the non-shared parameters. ``None``: every other leaf the losses reach
            (a loss that is itself a leaf, such as a learned regulariser, included), found by
            a walk of the autograd graph at each call (pass them to skip the walk).
            Those not requiring grad at a call are left out of it. With
            ``per_task="backward"`` heads accumulate natively, and the list serves only to
            refuse heads that carry a post-accumulate-grad hook (as shared parameters that do
            are refused: the surgery cannot honour such hooks).
        per_task: how per-task gradients are computed (:data:`PerTaskMode`).
        per_layer: one aggregation per layer instead of one global one (``True``: per tensor;
            or a layer id per shared tensor as passed, frozen ones included: at each call the
            layers are renumbered ``0..L-1`` in id order over the tensors that take part, and
            the rows of the returned weights follow that order).
        num_layers: the global number of layers ``L`` when each rank passes its part of a
            parameter list split across ranks with global ``per_layer`` ids (needed there:
            every rank must reduce ``[L, k, k]`` Grams of one layout); the ids are then kept
            as given, and a layer with no tensor here contributes nothing to the local Gram.
        reducer: cross-process steps (``None``: single process).
        check_finite: raise on NaN/Inf task gradients (read from the Gram matrix, for free;
            ``Mean`` / ``Sum`` compute none, so there NaN reaches ``.grad`` as with
            ``sum(losses).backward()``, unless ``True`` is given here: then they check the task
            gradients too, for one more read of them); ``None`` (the default) takes the
            aggregator's own ``check_finite`` (``True`` for a bare weighting). Set ``False`` (here or on the
            aggregator) under a ``GradScaler``
            (fp16): an overflowing step must reach ``.grad`` as Inf/NaN for the scaler to skip
            it, and the aggregators' weights are scale-invariant, so scaled losses give the
            scaled update the scaler expects.
    """

    def __repr__(self) -> str:
        tensors = self._given.tensors
        heads = "None" if self.head_params is None else f"{len(self.head_params)} tensors"
        ids = self._layer_ids
        layers = ("" if ids is False else ", per_layer: a layer per tensor" if ids is True else
                  f", per_layer: {len(set(ids))} layer{'s' if len(set(ids)) != 1 else ''}")
        return (f"GradientSurgery({self.aggregator!r}, shared: {len(tensors)} tensors "
                f"({sum(t.numel() for t in tensors):,} values), heads: {heads}, "
                f"per_task={self.per_task!r}{layers}, check_finite={self.check_finite}"
                f"{', with a reducer' if self.reducer is not None else ''})")

    def __init__(self, shared_params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 aggregator: Aggregator | Weighting, *,
                 head_params: Iterable[torch.Tensor] | None = None,
                 per_task: PerTaskMode = "autograd", per_layer: bool | Sequence[int] = False,
                 num_layers: int | None = None, reducer: GradReducer | None = None,
                 check_finite: bool | None = None) -> None:
        one_pass = isinstance(shared_params, Iterator)  # a generator, read once
        self._given = _split_named(shared_params)
        # Under a reducer an empty list is a rank without a shard (fewer tensors than ranks):
        # it still takes part in the others' collectives, contributing a zero Gram.
        if not self._given.tensors and reducer is None:
            raise ValueError("GradientSurgery: `shared_params` holds no tensor" + (
                f" (it is a {type(shared_params).__name__}, which can be read once: one that "
                "an optimizer read first, `params = model.trunk.parameters()` passed to both, "
                "is empty here; pass a list, or call .parameters() again)" if one_pass else ""))
        if per_task not in ("autograd", "batched", "backward"):
            raise ValueError(f"GradientSurgery: `per_task` must be 'autograd', 'batched' or "
                             f"'backward', got {per_task!r}")
        if per_task != "backward" and any(is_dtensor(p) for p in self._given.tensors):
            raise ValueError("GradientSurgery: DTensor (FSDP2) parameters need "
                             "per_task='backward', so that FSDP2's reduce-scatter hooks run")
        if not isinstance(aggregator, (Aggregator, Weighting)):
            raise TypeError(f"GradientSurgery: {_not_an_aggregator(aggregator)}")
        self.aggregator = aggregator
        # Each head once (listed twice, it would get its gradient twice); frozen ones are
        # filtered at each call, like the shared parameters.
        self.head_params = None if head_params is None else list(
            {id(p): p for p in head_params}.values())
        self.per_task: PerTaskMode = per_task
        num_layers = _checked_num_layers(num_layers)
        self._layer_ids = _given_layer_ids(per_layer, self._given, num_layers)
        self.num_layers = num_layers
        self.reducer = reducer
        # A reducer written against the first form of the protocol (two positional arguments)
        # is still called that way; it cannot merge which parameters the ranks reached, so
        # every shared parameter is then written, as that form of the protocol did.
        self._reducer_merges_reach = reducer is None or _takes_keywords(reducer, "reached",
                                                                        "head_tasks")
        # `stack_names` came last: only a reducer that names it gets it (one without a
        # readable signature keeps the second form, as before it existed).
        self._reducer_takes_names = reducer is not None and _takes_keywords(
            reducer, "stack_names", unreadable=False)
        # Likewise `aggregator` (how processes tell whether they aggregate alike).
        self._reducer_takes_aggregator = reducer is not None and _takes_keywords(
            reducer, "aggregator", unreadable=False)
        # None: the aggregator's own setting (UPGrad(check_finite=False) under a GradScaler
        # was overridden by this default, True, and the step refused).
        self.check_finite: bool = (getattr(aggregator, "check_finite", True)
                                   if check_finite is None else
                                   check_bool("GradientSurgery", "check_finite", check_finite))
        # Mean and Sum read no Gram matrix, where the check is made for free: asked for here
        # (not by default), it costs them one read of the task gradients (it was ignored).
        weighting = getattr(aggregator, "weighting", aggregator)
        self._check_without_gram = check_finite is True and not getattr(weighting,
                                                                         "needs_gram", True)
        # Every tensor passed as shared, frozen ones included: none is ever taken for a head.
        self._shared_ids = {id(p) for p in self._given.tensors}
        if self.head_params is not None:
            _refuse_shared_heads(self.head_params, self._given)
        self._everything = _Active(self._given.names, self._given.tensors,
                                   _active_layer_ids(self._layer_ids,
                                                     range(len(self._given.tensors)),
                                                     num_layers))
        # State of accumulate() / apply(): per-task buffers, the parameters they are for, and
        # what the pending micro-batches reached.
        self._buffers: list[torch.Tensor] | None = None
        self._buffer_rows: list[Sequence[torch.Tensor]] = []
        self._buffer_bytes = 0
        self._buffered_tasks: int | None = None
        self._buffered_for: _Active | None = None
        self._pending = False
        self._pending_reached: list[bool] = []
        self._pending_heads: dict[int, torch.Tensor] = {}
        self._pending_tasks: dict[int, int] | None = {}
        self._pending_constants: frozenset[int] = frozenset()
        self._pending_device: torch.device | None = None
        self._pending_losses: list[_LossRecord] = []
        self._pending_count = 0
        # The heads accumulate() wrote and the .grad object each then had: a .grad gone or
        # replaced before the step's apply() means the loop cleared the gradients between
        # micro-batches (a skipped step), and the buffers would carry that step into the next.
        self._pending_head_grads: list[tuple[torch.Tensor, int, int]] = []
        # Why the gradients buffered (or, per_task="backward", in the heads' .grad) can no
        # longer be trusted: an accumulate() that stopped part-way through its task passes.
        self._interrupted: str | None = None
        self._writes_begun = False
        self._listed_heads_checked = False
        # The no-reach warning is said once per surgery: its causes (parameters replaced
        # after the surgery was built, detached features) hold at every step, and a warning
        # per step floods a training log wherever warnings are not deduplicated.
        self._no_reach_warned = False

    # ------------------------------------------------------------------ public API

    @property
    def names(self) -> list[str]:
        """Names of the shared parameters that take part now (those requiring grad)."""
        return self._active_now().names

    @property
    def params(self) -> list[torch.Tensor]:
        """The shared parameters that take part now (those requiring grad), in the order of
        the stacks :meth:`apply` takes."""
        return self._active_now().params

    @property
    def per_layer(self) -> bool | list[int]:
        """The layer id of each parameter in :attr:`params` (or the ``per_layer`` flag)."""
        return self._active_now().per_layer

    @property
    def pending(self) -> int:
        """The number of micro-batches :meth:`accumulate` has buffered since the last
        :meth:`apply` (or :meth:`discard`)."""
        return self._pending_count

    def __deepcopy__(self, memo: dict[int, object]) -> GradientSurgery:
        """A copy for the copied parameters (``copy.deepcopy((model, surgery))`` copies each
        parameter once, for both): what the surgery knows of its parameters by identity is
        made again for the copies (kept, it named the originals, and the copy took its own
        shared parameters for heads: gradients 1.7 off). The per-task stacks are not copied
        (made at the next step), the reducer is shared (the same processes), and pending
        micro-batches are refused, being the originals'. A reducer with a ``__deepcopy__`` of its
        own is copied with it (:class:`~mtunlearn_ext.surgery.distributed.ReplicatedReducer`
        knows the heads it averages by tensor)."""
        import copy

        state = self._state_without_stacks("copied")
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        # A process group's steps: the same processes, shared, unless the reducer copies itself
        # (ReplicatedReducer: its head list is the model's).
        reducer = state.pop("reducer")
        own = getattr(type(reducer), "__deepcopy__", None)
        copied = copy.deepcopy(state, memo)
        copied["reducer"] = reducer if own is None else copy.deepcopy(reducer, memo)
        twin.__setstate__(copied)
        return twin

    def __getstate__(self) -> dict[str, object]:
        """Pickling (``torch.save((model, surgery))``, ``copy.copy``): as :meth:`__deepcopy__`,
        without the per-task stacks (made at the next step) and with micro-batches pending
        refused; the identities of the shared parameters are made again on loading
        (:meth:`__setstate__`), the loaded parameters being new tensors."""
        return self._state_without_stacks("pickled or copied")

    def _state_without_stacks(self, what: str) -> dict[str, object]:
        """The surgery's attributes for a copy (pickled, deep or shallow): no per-task stacks,
        no identities of this process's tensors; refused with micro-batches pending."""
        if self._pending:
            raise RuntimeError(f"GradientSurgery: cannot be {what} with {self._pending_what()}; "
                               "call apply() or discard() first")
        state = dict(self.__dict__)
        state.update(_buffers=None, _buffer_rows=[], _buffer_bytes=0, _buffered_tasks=None,
                     _buffered_for=None)
        del state["_shared_ids"]  # made again by __setstate__, for the copy's tensors
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_no_reach_warned", False)  # pickled before it existed
        self._shared_ids = {id(p) for p in self._given.tensors}

    def discard(self) -> int:
        """Drop the micro-batches accumulated since the last :meth:`apply`: for a step the
        loop skips (a NaN loss, an exception in a later micro-batch), beside
        ``optimizer.zero_grad()``, which clears the heads' ``.grad`` but not the per-task
        buffers. Returns how many micro-batches were dropped (0: nothing was pending)."""
        dropped = self._pending_count
        self._clear_pending()
        self._release_large_stacks()
        return dropped

    def backward(self, losses: Sequence[torch.Tensor], *, retain_graph: bool = False
                 ) -> torch.Tensor:
        """Per-task gradients of ``losses`` -> aggregated update added into ``.grad``.

        Args:
            losses: a sequence of ``k`` scalar task losses (scaled ones under a
                ``GradScaler``). A loss that does not require grad (a constant stand-in for a
                task with no labels in the batch) counts as a zero gradient, as in
                ``sum(losses).backward()``; a NaN or Inf constant makes its gradient NaN.
            retain_graph: keep the graph after the last task (as in ``Tensor.backward``).

        Returns:
            The aggregator's weights (``[k]``, or ``[L, k]`` per layer).
        """
        caller = "GradientSurgery.backward"
        self._refuse_interrupted(caller)
        if self._pending:
            raise RuntimeError(f"{caller}: {self._pending_what()}; call apply() to use "
                               "them first, or discard() to drop them (a skipped step)")
        losses, constants = self._check_losses(losses)
        self._check_task_count(caller, len(losses))
        active = self._take_part(caller)
        self._check_some_loss_attached(caller, len(losses), constants)
        _refuse_hooked_shared(caller, active)
        stacks: list[torch.Tensor]
        rows: list[Sequence[torch.Tensor]]
        if self.per_task == "batched":
            # Its one pass hands back each parameter's [k, *shape] gradients: those become the
            # stacks (_adopted_stacks), so none are made or kept for it.
            stacks, rows = [], []
        else:
            # Nothing is pending (refused above): accumulate()'s buffers are free to serve.
            stacks, rows = self._task_buffers(active, len(losses))
        try:
            # Inside the try: a task pass that fails (out of memory, a hook's error) frees
            # large stacks too, rather than holding them through the caller's recovery.
            reached, head_sums = self._per_task_grads(losses, constants, active, stacks, rows,
                                                      add=False, retain_graph=retain_graph,
                                                      caller=caller,
                                                      adopt=self.per_task == "batched")
            device = _losses_device(losses, constants)
            batched: list[_LossRecord] | None = (
                [(range(len(losses)), losses)] if self.per_task == "batched" else None)
            if self.reducer is None:
                # The heads' .grad are written once the aggregation has gone through: a step
                # it refuses (NaN or Inf task gradients) leaves every .grad as it was.
                weights = self._aggregate(active, stacks, _TaskPass(
                    reached, [], [], constants, len(losses), device, batched))
                head_sums.write()
                return weights
            # A reducer averages the heads' .grad across processes before the aggregation.
            heads, head_tasks = head_sums.write()
            return self._aggregate(active, stacks, _TaskPass(
                reached, heads, head_tasks, constants, len(losses), device, batched))
        finally:
            del stacks, rows
            self._release_large_stacks()

    def accumulate(self, losses: Sequence[torch.Tensor], *, retain_graph: bool = False) -> None:
        """Add the per-task gradients of ``losses`` to internal per-task buffers (one stack per
        shared parameter); heads get their gradients in ``.grad`` at once. Call :meth:`apply`
        after the last micro-batch: the surgery then sees the accumulated per-task gradients
        (large-batch semantics), not one surgery per micro-batch."""
        caller = "GradientSurgery.accumulate"
        self._refuse_interrupted(caller)
        losses, constants = self._check_losses(losses)
        k = len(losses)
        self._check_task_count(caller, k)
        active = self._take_part(caller)
        self._check_some_loss_attached(caller, k, constants)
        _refuse_hooked_shared(caller, active)
        self._refuse_cleared_heads(caller)
        if self._pending and self._buffered_tasks != k:
            raise ValueError(f"GradientSurgery.accumulate: got {k} losses, but the micro-batches "
                             f"accumulated since the last apply() have {self._buffered_tasks} "
                             "tasks; every micro-batch of one step needs the same tasks, in "
                             "the same order")
        same_params = (self._buffered_for is not None
                       and _same_tensors(self._buffered_for.params, active.params))
        if self._pending and not same_params:
            raise ValueError("GradientSurgery.accumulate: the shared parameters requiring grad "
                             "changed since the last micro-batch (a layer was frozen or "
                             "unfrozen); call apply() before changing them")
        if not self._pending:
            self._task_buffers(active, k)
            self._clear_pending()
            self._pending_reached = [False] * len(active.params)
            self._pending_constants = frozenset()
            self._pending_device = None
        self._writes_begun = False  # set by the task passes as they start writing
        try:
            assert self._buffers is not None  # the pending ones, or _task_buffers' above
            reached, head_sums = self._per_task_grads(losses, constants, active, self._buffers,
                                                      self._buffer_rows, add=self._pending,
                                                      retain_graph=retain_graph, caller=caller,
                                                      record=self._pending_losses)
            found = _TaskPass(reached, *head_sums.write())
        except BaseException as error:
            self._note_interrupted(error)
            raise
        written = [h for h, summed in zip(head_sums.heads, head_sums.sums) if summed is not None]
        self._pending = True
        self._pending_count += 1
        # Each head's .grad as this call leaves it: the object and its version (an in-place
        # zero_grad(set_to_none=False) keeps the object and bumps the version).
        heads = {id(h): h for h, _, _ in self._pending_head_grads}
        heads.update({id(h): h for h in written})
        self._pending_head_grads = [(h, id(h.grad), h.grad._version)
                                    for h in heads.values() if h.grad is not None]
        self._pending_constants |= constants
        if self._pending_device is None:
            self._pending_device = _losses_device(losses, constants)
        # Across micro-batches: a parameter any of them reached is reached.
        self._pending_reached = [a or b for a, b in zip(self._pending_reached, found.reached)]
        for i, h in enumerate(found.heads):
            self._pending_heads[id(h)] = h
            if self._pending_tasks is not None and found.head_tasks is not None:
                self._pending_tasks[id(h)] = self._pending_tasks.get(id(h), 0) | found.head_tasks[i]
        if found.head_tasks is None:
            self._pending_tasks = None

    def apply(self, per_task_grads: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Aggregate per-task gradients that already sit in buffers into ``.grad``.

        Args:
            per_task_grads: one stack ``[k, *shape_p]`` per shared parameter taking part (those
                requiring grad: :attr:`params`; the local shard's shape for FSDP2), in the order
                of :attr:`params`; they may be modified in place by a reducer. ``None``: the
                buffers filled by :meth:`accumulate`, which are then marked consumed (a shared
                parameter none of their micro-batches reached keeps its ``.grad``).

        Returns:
            The aggregator's weights.
        """
        self._refuse_interrupted("GradientSurgery.apply")
        if per_task_grads is None:
            if not self._pending or self._buffers is None or self._buffered_for is None:
                raise RuntimeError("GradientSurgery.apply: nothing accumulated; call "
                                   "accumulate(losses) first or pass `per_task_grads`")
            if not _same_tensors(self._buffered_for.params, self._active_now().params):
                # Else a layer frozen since would still get its .grad, and an optimizer steps
                # every parameter that has one. The buffers stay, for the layers as they were.
                raise ValueError("GradientSurgery.apply: the shared parameters requiring grad "
                                 "changed since accumulate() (a layer was frozen or unfrozen); "
                                 "change them only after apply()")
            _refuse_hooked_shared("GradientSurgery.apply", self._buffered_for)
            self._refuse_cleared_heads("GradientSurgery.apply")
            heads = list(self._pending_heads.values())
            tasks = (None if self._pending_tasks is None
                     else [self._pending_tasks[id(h)] for h in heads])
            found = _TaskPass(self._pending_reached, heads, tasks, self._pending_constants,
                              self._buffered_tasks or 0, self._pending_device,
                              self._pending_losses if self.per_task == "batched" else None)
            self._clear_pending()
            try:
                return self._aggregate(self._buffered_for, self._buffers, found)
            finally:
                # As after backward(): large buffers held past apply() kept k copies of the
                # shared gradients through the optimizer step and evaluation.
                self._release_large_stacks()
        # Explicit stacks tell k only through themselves: none to take part is refused here.
        # Under a reducer that refusal is this process's alone (the others wait in their
        # collective until its timeout): a rank without a shard must use backward() or
        # accumulate(), whose losses tell k.
        active = self._active_now()
        if not active.params and self.reducer is not None:
            raise ValueError("GradientSurgery.apply: this process holds no shared parameter "
                             "taking part (an empty or frozen shard), so explicit stacks cannot "
                             "tell it the number of tasks k that the other processes' "
                             "collectives need; on such a rank call backward(losses) or "
                             "accumulate(losses) + apply(), which join them")
        active = self._take_part("GradientSurgery.apply", allow_none=False)
        _refuse_hooked_shared("GradientSurgery.apply", active)
        stacks = self._check_stacks(active, per_task_grads)
        return self._aggregate(active, stacks, _TaskPass([True] * len(stacks), [], []))

    # ------------------------------------------------------------------ internals

    def _task_buffers(self, active: _Active, k: int
                      ) -> tuple[list[torch.Tensor], list[Sequence[torch.Tensor]]]:
        """The per-task stacks for ``k`` tasks of ``active``'s parameters, with no micro-batch
        pending: the last step's, kept (their every row is written again before it is read),
        or new ones where they no longer fit; and ``rows[t]``, task ``t``'s row of each stack
        (views made with the stacks). Kept, not made at every step: a tensor and a row view
        per parameter and task were 2-6% of a small model's step (6 tensors, k = 2-4), and on
        the CPU a new stack of a large model is page-faulted in again at every step. The price
        is that stacks up to :data:`KEPT_STACKS_MAX_BYTES` stay allocated between steps."""
        buffers = self._buffers
        if (buffers is None or self._buffered_tasks != k or self._buffered_for is None
                or not (self._buffered_for is active
                        or _same_tensors(self._buffered_for.params, active.params))
                or not _stacks_fit(buffers, active.params)):
            # The old ones go first: with them alive the new ones would need twice the memory.
            self._buffers, self._buffer_rows = None, []
            buffers = [torch.empty((k, *local_tensor(p).shape), dtype=p.dtype,
                                   device=local_tensor(p).device) for p in active.params]
            self._buffers = buffers
            self._buffer_rows = (list(zip(*(b.unbind(0) for b in buffers))) if buffers
                                 else [()] * k)
            # Summed once here, not at every step's release check.
            self._buffer_bytes = sum(b.numel() * b.element_size() for b in buffers)
        self._buffered_tasks = k
        self._buffered_for = active
        self._pending = False
        return buffers, self._buffer_rows

    def _release_large_stacks(self) -> None:
        """Drop the stacks after a backward() or apply() step (or a discard()) when they
        exceed :data:`KEPT_STACKS_MAX_BYTES`: kept, they would hold ``k`` times a large model's
        shared parameters through the optimizer step and evaluation, where making them again
        costs little next to the step; small ones are kept for the next step."""
        if self._buffers is not None and self._buffer_bytes > KEPT_STACKS_MAX_BYTES:
            self._buffers, self._buffer_rows = None, []
            self._buffered_tasks, self._buffered_for = None, None

    def _clear_pending(self) -> None:
        """No micro-batch pending: the buffers stay allocated, for the next step."""
        self._interrupted = None
        self._pending = False
        self._pending_count = 0
        self._pending_heads = {}
        self._pending_tasks = {}
        self._pending_head_grads = []
        self._pending_losses = []

    def _note_interrupted(self, error: BaseException) -> None:
        """An accumulate() stopped part-way (out of memory, Ctrl-C, a hook's error): the task
        passes it made before stopping are in the buffers of the pending micro-batches (and,
        per_task="backward", in the heads' .grad), and cannot be told apart from them. A first
        micro-batch in the other modes left nothing the next call would read: it overwrites
        the buffers, and the heads' .grad are written only after every pass."""
        if not self._writes_begun or (not self._pending and self.per_task != "backward"):
            return  # refused before any pass (a hook, a donated graph): nothing was written
        count = self._pending_count
        pending = f"the buffers of the {count} micro-batch{'es' if count != 1 else ''} pending"
        where = ([pending] if self._pending else []) + (
            ["the heads' .grad"] if self.per_task == "backward" else [])
        self._interrupted = (f"an accumulate() call stopped part-way ({type(error).__name__}) "
                             f"and left part of its micro-batch in {' and '.join(where)}; call "
                             "surgery.discard() and optimizer.zero_grad() to drop the step, as "
                             "for a skipped one")

    def _refuse_interrupted(self, caller: str) -> None:
        if self._interrupted is not None:
            raise RuntimeError(f"{caller}: {self._interrupted}")

    def _pending_what(self) -> str:
        count = self._pending_count
        return (f"{count} micro-batch{'es' if count != 1 else ''} accumulated since the last "
                f"apply() {'is' if count == 1 else 'are'} still pending")

    def _refuse_cleared_heads(self, caller: str) -> None:
        """Refuse to go on with pending micro-batches whose heads' ``.grad`` has been set to
        ``None``, replaced or written in place since (``optimizer.zero_grad()`` between
        micro-batches, with ``set_to_none`` either way: the loop skipped the step, and the
        per-task buffers would carry it into the next one)."""
        if not self._pending:
            return
        cleared = [h for h, grad_id, version in self._pending_head_grads
                   if h.grad is None or id(h.grad) != grad_id or h.grad._version != version]
        if cleared:
            raise RuntimeError(
                f"{caller}: {self._pending_what()}, but the .grad of {len(cleared)} head parameter"
                f"{'s' if len(cleared) != 1 else ''} (first: shape "
                f"{sizes(cleared[0].shape)}) was cleared since (optimizer.zero_grad() between "
                "micro-batches, a skipped step?): call surgery.discard() where the loop skips "
                "a step, or apply() before clearing the gradients")

    def _active_now(self) -> _Active:
        """The shared parameters requiring grad now (none left out: the one prepared list)."""
        tensors = self._given.tensors
        active = [i for i, t in enumerate(tensors) if t.requires_grad]
        if len(active) == len(tensors):
            return self._everything
        return _Active([self._given.names[i] for i in active], [tensors[i] for i in active],
                       _active_layer_ids(self._layer_ids, active, self.num_layers))

    def _take_part(self, caller: str, *, allow_none: bool = True) -> _Active:
        active = self._active_now()
        # Under a reducer a process whose shared parameters are all frozen (staged fine-tuning
        # where the layers one rank holds are frozen) still joins the others' collectives,
        # with nothing to update (as _check_some_loss_attached lets an all-constant one go
        # on): refused on one rank only, it left the others waiting in the all-reduce.
        if not active.params and (self.reducer is None or not allow_none):
            raise ValueError(f"{caller}: none of the shared parameters requires grad now "
                             "(all frozen), so there is nothing to aggregate; while the shared "
                             "part is frozen, call sum(losses).backward() instead")
        return active

    @staticmethod
    def _check_losses(losses: Sequence[torch.Tensor]
                      ) -> tuple[list[torch.Tensor], frozenset[int]]:
        """The losses as a list, and the tasks whose loss is a constant (does not require
        grad: a zero gradient)."""
        expected = "`losses` must be a sequence of k scalar losses (one per task)"
        if isinstance(losses, torch.Tensor) and losses.dim() == 0:
            raise TypeError(f"GradientSurgery: {expected}, got one 0-d tensor; for a single "
                            "task pass [loss]")
        if isinstance(losses, Mapping):  # iterating it gives its keys, not its losses
            raise TypeError(f"GradientSurgery: {expected}, got a {type(losses).__name__} (a "
                            "mapping); pass its losses as a list in a fixed task order, e.g. "
                            "list(losses.values())")
        if isinstance(losses, (str, bytes)):
            raise TypeError(f"GradientSurgery: {expected}, got a {type(losses).__name__}")
        try:
            losses = list(losses)
        except TypeError:
            raise TypeError(f"GradientSurgery: {expected}, got "
                            f"{type(losses).__name__}") from None
        if not losses:
            raise ValueError("GradientSurgery: `losses` must hold at least one loss")
        constants = []
        for t, loss in enumerate(losses):
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"GradientSurgery: losses[{t}] must be a scalar tensor, got "
                                f"a {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"GradientSurgery: losses[{t}] must be a scalar tensor, got "
                                 f"shape {sizes(loss.shape)}")
            if not loss.requires_grad:
                constants.append(t)
        return losses, frozenset(constants)

    def _check_task_count(self, caller: str, k: int) -> None:
        """Refuse more tasks than the aggregator solves for before the ``k`` backward passes
        (review: 257 losses ran every pass, then failed naming a solver op never called)."""
        weighting = (self.aggregator.weighting if isinstance(self.aggregator, Aggregator)
                     else self.aggregator)
        limit = weighting.max_tasks
        if limit is not None and k > limit:
            raise ValueError(f"{caller}: got {k} losses, but {type(self.aggregator).__name__} "
                             f"solves for at most {limit} tasks (the solvers' limit); use Mean "
                             "or Sum, or fewer tasks")

    def _check_some_loss_attached(self, caller: str, k: int, constants: frozenset[int]) -> None:
        """Refuse a call whose losses are all constants where nothing can be done with them.
        Under a reducer the call goes on with zero gradients (a process whose batch has no
        labels at all still takes part in the other processes' collectives), except with
        ``per_task="backward"``, whose collectives (FSDP2's reduce-scatters) run inside the
        backward passes that constants cannot make."""
        if len(constants) < k:
            return
        if self.reducer is None:
            raise ValueError(f"{caller}: none of the {k} losses requires grad (each is a "
                             "constant), so there is no gradient to take, as "
                             "sum(losses).backward() would also say; were they computed under "
                             "torch.no_grad(), or from detached outputs?")
        if self.per_task == "backward":
            raise ValueError(f"{caller}: none of the {k} losses requires grad (each is a "
                             "constant); per_task='backward' under a reducer runs one backward "
                             "pass per task on every process (FSDP2 reduce-scatters in them), "
                             "which needs at least one loss attached to the graph on each")

    @staticmethod
    def _check_stacks(active: _Active, per_task_grads: Sequence[torch.Tensor]
                      ) -> list[torch.Tensor]:
        """``apply``'s stacks, checked in its own words (the list ops would name their own
        arguments): one tensor ``[k, *shape]`` per parameter, one ``k``, the parameter's dtype
        and device."""
        if isinstance(per_task_grads, torch.Tensor):
            raise TypeError("GradientSurgery.apply: `per_task_grads` must be a list of stacks "
                            "(one [k, *shape] tensor per shared parameter), got one tensor")
        stacks = list(per_task_grads)
        if len(stacks) != len(active.params):
            raise ValueError(f"GradientSurgery.apply: expected {len(active.params)} stacks (one "
                             f"per shared parameter requiring grad), got {len(stacks)}")
        k: int | None = None
        for i, (name, p, s) in enumerate(zip(active.names, active.params, stacks)):
            what = f"per_task_grads[{i}] (the per-task gradients of {name!r})"
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"GradientSurgery.apply: {what} must be a tensor, got "
                                f"{type(s).__name__}")
            local = local_tensor(p)
            if s.dim() < 1 or tuple(s.shape[1:]) != tuple(local.shape):
                raise ValueError(f"GradientSurgery.apply: the stack for {name!r} must be "
                                 f"[k, *{sizes(local.shape)}], got {sizes(s.shape)}")
            if k is None:
                k = s.shape[0]
            elif s.shape[0] != k:
                raise ValueError(f"GradientSurgery.apply: {what} holds {s.shape[0]} tasks, "
                                 f"per_task_grads[0] {k}; every stack needs the same tasks")
            if s.dtype != p.dtype:
                raise TypeError(f"GradientSurgery.apply: {what} is {s.dtype}, but the "
                                f"parameter is {p.dtype}; pass the stacks in the parameters' "
                                f"dtypes (e.g. s.to({p.dtype}))")
            if s.device != local.device:
                raise ValueError(f"GradientSurgery.apply: {what} is on {s.device}, but the "
                                 f"parameter is on {local.device}")
        return stacks

    def _heads(self, losses: list[torch.Tensor], caller: str) -> list[torch.Tensor]:
        if self.head_params is not None:
            if not self._listed_heads_checked:
                self._check_listed_heads(losses, caller)
            return [p for p in self.head_params if p.requires_grad]
        return [v for v in reachable_leaves(losses)
                if v.requires_grad and id(v) not in self._shared_ids]

    def _heads_with_tasks(self, losses: list[torch.Tensor]
                          ) -> tuple[list[torch.Tensor], list[int]]:
        """The heads (walked as in ``_heads``) and the bit mask of the tasks reaching each."""
        found = [(v, mask) for v, mask in leaves_with_tasks(losses)
                 if v.requires_grad and id(v) not in self._shared_ids]
        return [v for v, _ in found], [mask for _, mask in found]

    def _check_listed_heads(self, losses: list[torch.Tensor], caller: str) -> None:
        """At the first call with ``head_params``: the losses must reach no parameter that is
        in neither list. The "autograd" and "batched" passes take gradients for the two lists
        only, so such a parameter (learned loss weights, a head left out of the list) got no
        gradient, silently, where ``sum(losses).backward()`` gives it one. One walk of the
        graph, once: the lists are fixed, and a model's structure seldom changes."""
        listed = {id(p) for p in self.head_params or ()}
        unlisted = [v for v in reachable_leaves(losses) if v.requires_grad
                    and id(v) not in self._shared_ids and id(v) not in listed]
        # Refused: parameters. Only warned of: plain tensors, which may be inputs that require
        # grad (a reentrant checkpoint's, an adversarial perturbation: they need no .grad from
        # the surgery) or learned values kept outside the model (loss weights made with
        # torch.zeros(k, requires_grad=True)), which get none.
        missing = [v for v in unlisted if isinstance(v, torch.nn.Parameter)]
        plain = [v for v in unlisted if not isinstance(v, torch.nn.Parameter)]
        if plain:
            shapes = ", ".join(str(tuple(v.shape)) for v in plain[:5])
            warn_at_caller(
                f"{caller}: the losses reach {len(plain)} plain tensor(s) requiring grad that "
                f"are in neither `shared_params` nor `head_params` (shapes {shapes}"
                f"{', ...' if len(plain) > 5 else ''}); per_task={self.per_task!r} gives them "
                "no gradient. Inputs that require grad need none; a learned value (a loss "
                "weight) does: add it to `head_params` or make it an nn.Parameter of the "
                "model")
        if not missing:
            self._listed_heads_checked = True
            return
        shapes = ", ".join(str(tuple(v.shape)) for v in missing[:5])
        message = (f"{caller}: the losses reach {len(missing)} parameter(s) requiring grad "
                   f"that are in neither `shared_params` nor `head_params` (shapes {shapes}"
                   f"{', ...' if len(missing) > 5 else ''}); per_task={self.per_task!r} takes "
                   "gradients for those two lists only, so they would get none, where "
                   "sum(losses).backward() gives them one. Add them to `head_params` (their "
                   "gradients are summed over the tasks), or leave `head_params` out (the "
                   "heads are then found at each call)")
        if self.reducer is None:
            raise ValueError(message)
        # Under a reducer the other processes may not see the same leaves (a data-dependent
        # branch): one process raising would leave the others waiting in a collective.
        self._listed_heads_checked = True
        warn_at_caller(message)

    def _per_task_grads(self, losses: list[torch.Tensor], constants: frozenset[int],
                        active: _Active, stacks: list[torch.Tensor],
                        rows: list[Sequence[torch.Tensor]], *, add: bool,
                        retain_graph: bool, caller: str,
                        record: list[_LossRecord] | None = None, adopt: bool = False
                        ) -> tuple[list[bool], _HeadSums]:
        """Fill (or add into) ``stacks[p][t]`` (``rows[t][p]``, a view) with d losses[t] /
        d active.params[p] (zero for the ``constants``); returns, per parameter, whether any
        task's loss reached it, and the head gradients summed over the tasks, not yet
        written. A batched pass appends its loss values to ``record`` when given; with
        ``adopt`` (batched only) ``stacks`` comes empty and is filled with the pass's own
        outputs (:func:`_adopted_stacks`)."""
        k = len(losses)
        attached = [t for t in range(k) if t not in constants]
        if self.per_task != "batched":
            self._refuse_donating_backward(losses, constants, attached, retain_graph)
        if self.per_task == "backward":
            if self.head_params is not None:  # the heads accumulate natively: known only so
                _refuse_post_accumulate_hooks(
                    caller, (h for h in self.head_params if h.requires_grad), _head_description)
            # The passes run the process group's collectives (FSDP2's reduce-scatters): the
            # processes must agree on k before them, not in the check after them.
            agree = getattr(self.reducer, "agree_on_task_count", None)
            if agree is not None:
                agree(k, _losses_device(losses, constants))
            self._writes_begun = True
            reached = self._per_task_by_backward(losses, constants, active, rows, add=add,
                                                 retain_graph=retain_graph)
            self._poison_constant_rows(losses, constants, stacks)
            return reached, _HeadSums([], [], [])
        # Which tasks reach each head, for reducers that match heads across processes. The
        # batched pass does not tell, so only then are the tasks told apart, in the same walk
        # that finds the heads.
        walk_tasks = (self.per_task == "batched" and self.reducer is not None
                      and self.head_params is None)
        batched_head_tasks: list[int] | None = None
        if walk_tasks:
            heads, batched_head_tasks = self._heads_with_tasks(losses)
        else:
            heads = self._heads(losses, caller)
        _refuse_post_accumulate_hooks(caller, heads, _head_description)
        inputs = [*active.params, *heads]
        n_shared = len(active.params)
        head_sums: list[torch.Tensor | None] = [None] * len(heads)
        head_tasks: list[int] | None
        if self.per_task == "batched":
            # Constants only, or nothing to differentiate (a process under a reducer with no
            # shared parameter taking part and no head): zero gradients.
            if not attached or not inputs:
                grads: Sequence[torch.Tensor | None] = [None] * len(inputs)
                stacked: torch.Tensor | None = None
            else:
                stacked = torch.stack([losses[t].reshape(()) for t in attached])
                grads = self._batched_grads(stacked, inputs, losses, active,
                                            retain_graph=retain_graph)
            if record is not None:
                # accumulate()'s step is refused at apply(), its losses gone by then: their
                # values are kept detached (no graph held), read only if it is refused.
                if stacked is not None:
                    record.append((attached, stacked.detach()))
                if constants:  # constants hold no graph: kept as they are
                    record.append((sorted(constants), [losses[t] for t in sorted(constants)]))
            reached = [g is not None for g in grads[:n_shared]]
            self._writes_begun = True
            if adopt:
                stacks.extend(_adopted_stacks(active, k, attached, grads[:n_shared]))
            elif constants:
                _store_rows(active, stacks, attached, grads[:n_shared], add=add)
            else:
                _store_named(active, stacks, grads[:n_shared], add=add)
            head_sums = [None if g is None else g.sum(0) for g in grads[n_shared:]]
            head_tasks = batched_head_tasks
        else:
            reached = [False] * n_shared
            self._writes_begun = True
            head_tasks = [0] * len(heads)
            last = attached[-1] if attached else -1
            for t, loss in enumerate(losses):
                # A zero gradient (a constant), or nothing to take it for (torch.autograd.grad
                # refuses an empty list of inputs): nothing to take.
                if t in constants or not inputs:
                    _store_named(active, rows[t], [None] * n_shared, add=add)
                    continue
                keep = retain_graph or t < last
                try:
                    grads = torch.autograd.grad(loss, inputs, retain_graph=keep,
                                                allow_unused=True)
                except RuntimeError as error:
                    explained = _explained_grad_failure(error, self.per_task)
                    if explained is error:
                        raise
                    raise explained from error
                shared = grads[:n_shared]
                for i, g in enumerate(shared):  # marked in place: no new list per task
                    if g is not None:
                        reached[i] = True
                _store_named(active, rows[t], shared, add=add)
                for h, g in enumerate(grads[n_shared:]):
                    if g is not None:
                        head_tasks[h] |= 1 << t
                        # Out of place: autograd may hand back expanded (stride-0) gradients.
                        total = head_sums[h]
                        head_sums[h] = g if total is None else total + g
                # Stored: let this task's gradients go before the next pass makes its own (held,
                # they were one more copy of the shared parameters at the peak).
                del grads, shared
        self._poison_constant_rows(losses, constants, stacks)
        return reached, _HeadSums(heads, head_sums, head_tasks)

    def _refuse_donating_backward(self, losses: list[torch.Tensor], constants: frozenset[int],
                                  attached: list[int], retain_graph: bool) -> None:
        """Refuse, before any pass, retained passes through a compiled backward that frees its
        saved activations. With torch's own check on, an "autograd" pass is refused by torch
        before anything is written; the walk is for a check turned off (the gradients would
        be wrong without an error) and for "backward" passes, which may have added into
        heads' ``.grad`` outside the compiled region before torch refuses."""
        zero_passes = self.per_task == "backward" and self.reducer is not None and bool(constants)
        passes = len(losses) if zero_passes else len(attached)
        if not (retain_graph or passes > 1):
            return
        functorch_config = sys.modules.get("torch._functorch.config")
        torch_checks = functorch_config is None or getattr(functorch_config, "donated_buffer",
                                                           True)
        if self.per_task == "autograd" and torch_checks:
            return
        if compiled_backward_donating(losses):
            raise _donated_buffers_error(self.per_task)

    def _batched_grads(self, stacked: torch.Tensor, inputs: list[torch.Tensor],
                       losses: list[torch.Tensor], active: _Active, *, retain_graph: bool
                       ) -> Sequence[torch.Tensor | None]:
        """One vmapped pass over the ``stacked`` attached losses: per input,
        ``[len(stacked), *shape]`` (``None`` where no loss reached it)."""
        eye = torch.eye(len(stacked), dtype=stacked.dtype, device=stacked.device)
        try:
            return torch.autograd.grad(stacked, inputs, grad_outputs=eye, is_grads_batched=True,
                                       retain_graph=retain_graph, allow_unused=True)
        except RuntimeError as error:
            explained = self._batched_failure(losses, active, error)
            if explained is error:  # (never `raise error from error`: a cycle of causes)
                raise
            raise explained from error

    @staticmethod
    def _poison_constant_rows(losses: list[torch.Tensor], constants: frozenset[int],
                              stacks: list[torch.Tensor]) -> None:
        for t in sorted(constants):
            _poison_if_not_finite([s[t] for s in stacks], losses[t])

    def _batched_failure(self, losses: list[torch.Tensor], active: _Active,
                         error: RuntimeError) -> Exception:
        """A failed vmapped pass in the words of the surgery when a sparse gradient (which has
        no batching rule), random numbers drawn in the backward or a compiled backward graph
        caused it; else the error as it came."""
        explained = _explained_grad_failure(error, self.per_task)
        if explained is not error:
            return explained
        if "random operations inside of vmap" in str(error):
            # vmap refuses random ops (its randomness="error"), and is_grads_batched offers no
            # other choice; the usual source is a checkpointed segment's recomputed dropout.
            return RuntimeError(
                "GradientSurgery: per_task='batched' runs the backward under vmap "
                "(is_grads_batched), which cannot draw random numbers, and this backward draws "
                "some: activation checkpointing (torch.utils.checkpoint) recomputing a segment "
                "that holds dropout (or another random op), or a custom autograd.Function "
                "sampling in its backward; use per_task='autograd' (the default) or "
                "'backward': the checkpoint restores the forward's random state when it "
                "recomputes, so every task's gradient sees the forward's dropout mask "
                f"(torch's error: {_first_line(error)})")
        sparse = sparse_fed_leaves(losses)
        names = {id(p): name for name, p in zip(active.names, active.params)}
        for leaf in sparse:
            if id(leaf) in names:
                return _sparse_shared_error(names[id(leaf)], torch.sparse_coo)
        heads = [leaf for leaf in sparse if leaf.requires_grad and id(leaf) not in self._shared_ids]
        if not heads:
            compiled = any(type(node).__name__ == "CompiledFunctionBackward"
                           for node in graph_nodes(losses))
            if compiled:
                # Inductor's compiled backward reads its inputs' storage, which the batched
                # tensors of vmap do not have ("Cannot access data pointer of Tensor that
                # doesn't have storage"); aot_eager's runs.
                first_line = _first_line(error)
                return RuntimeError(
                    "GradientSurgery: per_task='batched' failed in the backward graph of a "
                    "torch.compile'd model: the batched pass runs the backward under vmap "
                    "(is_grads_batched), which an inductor-compiled backward graph cannot run; "
                    "use per_task='autograd' (the default) or 'backward', which run the "
                    f"compiled backward once per task (torch's error: {first_line})")
            return error
        described = ", ".join(f"a head parameter of shape {sizes(h.shape)}" for h in heads)
        return ValueError(f"GradientSurgery: per_task='batched' cannot compute sparse gradients "
                          f"(vmap has no batching rule for them), and {described} gets one "
                          "(nn.Embedding(sparse=True) or alike); use per_task='autograd' (the "
                          "default), which gives a head the sparse sum of its gradients as "
                          "sum(losses).backward() does")

    def _per_task_by_backward(self, losses: list[torch.Tensor], constants: frozenset[int],
                              active: _Active, rows: list[Sequence[torch.Tensor]], *,
                              add: bool, retain_graph: bool) -> list[bool]:
        """The per-task stacks (``rows[t]``: task ``t``'s row of each) from ``loss.backward()``
        per task; returns, per parameter, whether any task's loss reached it."""
        k = len(losses)
        params = active.params
        attached = [t for t in range(k) if t not in constants]
        # Under a reducer a constant still gets a backward pass (of zero): the other processes
        # run one per task, and FSDP2 reduce-scatters inside each, so every process must run
        # as many. The zero flows through the attached losses' graph, and what the reduce-
        # scatter leaves in .grad is the other processes' gradients of that task averaged with
        # this zero, as for the rank-mean loss.
        zero_passes = self.reducer is not None and bool(constants)
        last = k - 1 if zero_passes else (attached[-1] if attached else -1)
        zero: torch.Tensor | None = None
        # .grad of the shared parameters is borrowed as scratch for one task at a time; what it
        # held before (earlier micro-batches) is put back untouched.
        stash = [p.grad for p in params]
        for p in params:
            p.grad = None
        reached = [False] * len(params)
        try:
            for t, loss in enumerate(losses):
                if t in constants:
                    if not zero_passes:  # a zero gradient: nothing to take
                        _store_named(active, rows[t], [None] * len(params), add=add)
                        continue
                    if zero is None:
                        total = losses[attached[0]].reshape(())
                        for a in attached[1:]:
                            total = total + losses[a].reshape(())
                        zero = total * 0.0
                    loss = zero
                try:
                    loss.backward(retain_graph=retain_graph or t < last)
                except RuntimeError as error:
                    explained = _explained_grad_failure(error, self.per_task)
                    if explained is error:
                        raise
                    raise explained from error
                grads = [None if p.grad is None else local_tensor(p.grad) for p in params]
                for i, g in enumerate(grads):
                    if g is not None:
                        reached[i] = True
                _store_named(active, rows[t], grads, add=add)
                for param in params:
                    param.grad = None
                # Stored: let them go before the next pass (held, one more copy at the peak).
                del grads
        finally:
            for param, g in zip(params, stash):
                param.grad = g
        if params and not any(reached) and any(is_dtensor(p) for p in params):
            # FSDP2 with gradient sync off keeps each pass's unsharded gradient and writes
            # none; the next synced pass would then hand one task the sum of every earlier
            # pass's gradients, and the step would be wrong without a word (measured: 4.5e-3
            # off, 2 gloo processes). Reach is the same on every process (the reduce-scatter
            # gives each the average), so every process raises here, before any collective of
            # the surgery's own.
            raise RuntimeError(
                f"GradientSurgery: none of the {len(params)} shared FSDP2 parameters taking "
                "part got a gradient from the task losses' backward passes. FSDP2's gradient "
                "sync is most likely off (set_requires_gradient_sync(False)): FSDP2 then keeps "
                "each pass's gradient unsharded and adds it into the next synced pass, which "
                "would mix the tasks' gradients silently. Keep the sync on in every pass and "
                "accumulate micro-batches with surgery.accumulate(losses) and surgery.apply(); "
                "if the shared parameters really get no gradient (detached features), leave "
                "them out of the surgery")
        return reached

    def _aggregate(self, active: _Active, stacks: list[torch.Tensor], found: _TaskPass
                   ) -> torch.Tensor:
        reached = list(found.reached)
        # A list of this call's own: a reducer may put its averaged stacks in the list it gets
        # (stacks[p] = ...), and the kept buffers (whose row views the next step writes) must
        # not become those, or every later step would aggregate this one's gradients.
        stacks = list(stacks)
        agree = getattr(self.reducer, "agree_on_aggregator", None)
        if agree is not None:
            # On the losses' device, where a rank without a shard runs its collectives too.
            agree(self.aggregator, stacks[0].shape[0] if stacks else found.tasks,
                  found.device or (stacks[0].device if stacks else torch.device("cpu")))
        if self.reducer is not None and self._reducer_merges_reach:
            named: dict[str, Any] = (
                {"stack_names": active.names} if self._reducer_takes_names else {})
            if self._reducer_takes_aggregator:
                named["aggregator"] = self.aggregator
            self.reducer.reduce_task_grads(stacks, [local_tensor(h) for h in found.heads],
                                           reached=reached, head_tasks=found.head_tasks,
                                           **named)
        elif self.reducer is not None:
            self.reducer.reduce_task_grads(stacks, [local_tensor(h) for h in found.heads])
            reached = [True] * len(stacks)
        if not stacks:
            return self._join_collectives(active, found)
        if not any(reached) and not self._no_reach_warned:
            # (under a reducer, every process's reach: each warns alike)
            warn_at_caller(
                f"GradientSurgery: no task's loss reached any of the {len(reached)} shared "
                "parameters taking part, so their .grad stays as it was and nothing was "
                "aggregated. If the model's parameters were replaced after the surgery was "
                "built (load_state_dict(..., assign=True), fully_shard, to_empty), build the "
                "surgery again from the new ones. A reentrant activation checkpoint "
                "(checkpoint(..., use_reentrant=True)) whose inputs do not require grad also "
                "cuts the shared part off (torch warns of it): use use_reentrant=False. If the "
                "shared part is meant to get no gradient (detached features), this warning "
                "does not apply (it is said once per surgery)")
            self._no_reach_warned = True
        # A shared parameter no task's loss reached keeps its .grad as it is (None stays None,
        # as sum(losses).backward() leaves it, so that optimizers skip it and weight decay or
        # momentum does not move it); its zero stack adds nothing to the Gram.
        members = [p for p, r in enumerate(reached) if r]
        per_layer, num_layers = active.per_layer, self.num_layers
        if len(members) < len(stacks):
            # With none reached, one zero stack (into scratch) still gives the weights and
            # takes part in the reducer's collective.
            members = members or [0]
            wide = [p for p in range(len(stacks)) if stacks[p].dtype == torch.float64]
            if (self.reducer is not None and wide
                    and all(stacks[p].dtype != torch.float64 for p in members)):
                # The Gram is float64 when a member is: with the only float64 parameter
                # unreached this step, this rank's Gram would be float32 and the others'
                # float64, a step refused (the ranks' statistics must agree) that depends on
                # the data. Its zero stack (into scratch) keeps the dtype the shard's.
                members = sorted({*members, min(wide, key=lambda p: stacks[p].numel())})
            per_layer, num_layers = _member_layer_ids(per_layer, len(stacks), members,
                                                      num_layers)
        params = [active.params[p] for p in members]
        outs, betas, allocated, copies = self._grad_outputs(params,
                                                            [reached[p] for p in members])
        try:
            if self._check_without_gram:
                _refuse_non_finite_stacks([stacks[p] for p in members],
                                          getattr(self.reducer, "any_rank", None))
            weights = aggregate_list(self.aggregator, [stacks[p] for p in members], outs, betas,
                                     per_layer=per_layer, num_layers=num_layers,
                                     reduce=None if self.reducer is None
                                     else self.reducer.reduce_stats,
                                     check_finite=self.check_finite)
        except BaseException as error:
            # The .grad buffers allocated for it (uninitialised memory) go back to None, so
            # that a caller who catches the error and goes on does not step on garbage.
            for p in allocated:
                p.grad = None
            if isinstance(error, FloatingPointError):
                raise FloatingPointError(self._non_finite_message(
                    active.names, stacks, error, found, merged=self.reducer is not None)
                    + self._reducer_note()) from error
            raise
        if copies:
            torch._foreach_copy_([grad for grad, _ in copies], [out for _, out in copies])
        return weights

    def _join_collectives(self, active: _Active, found: _TaskPass) -> torch.Tensor:
        """The aggregation of a process under a reducer with no shared parameter taking part
        (no shard, or only frozen ones): one zero-size stack in the aggregation takes it
        through the same collectives as the others (a zero Gram into the SUM, the recomputation
        of underflowed rows), with nothing to write; returns the same weights."""
        assert self.reducer is not None  # only reducers let an empty list through
        if found.tasks < 1:
            raise ValueError("GradientSurgery: no shared parameter takes part and the number "
                             "of tasks is unknown")
        device = found.device or torch.device("cpu")
        empty = torch.zeros((found.tasks, 0), dtype=torch.float32, device=device)
        # The others' dtype is not known here: a sharded reducer's join_stats takes theirs.
        reduce = getattr(self.reducer, "join_stats", self.reducer.reduce_stats)
        per_layer: bool | list[int] = False if active.per_layer is False else [0]
        try:
            if self._check_without_gram:  # the others' finite check is a collective
                _refuse_non_finite_stacks([], getattr(self.reducer, "any_rank", None), device)
            return aggregate_list(self.aggregator, [empty], [torch.empty(0, device=device)],
                                  per_layer=per_layer, num_layers=self.num_layers,
                                  reduce=reduce, check_finite=self.check_finite)
        except FloatingPointError as error:
            raise FloatingPointError(f"GradientSurgery: {error} (this process holds no shared "
                                     "parameter taking part)" + self._reducer_note()
                                     ) from error

    def _reducer_note(self) -> str:
        """What the reducer adds to a refused step's message (which process this is)."""
        note = getattr(self.reducer, "nonfinite_note", None)
        return note() if callable(note) else ""

    @staticmethod
    def _grad_outputs(params: list[torch.Tensor], reached: list[bool]
                      ) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor],
                                 list[tuple[torch.Tensor, torch.Tensor]]]:
        """The tensor to write each shared parameter's gradient into, 1 (accumulate into an
        existing gradient) or 0 (a fresh one, whose garbage contents beta=0 ignores) for each,
        the parameters whose ``.grad`` was allocated here, and the copies to make once the
        aggregation has gone through. An unreached parameter gets scratch, its ``.grad``
        untouched.

        A new ``.grad`` is laid out as autograd lays it out (a channels_last parameter's
        gradient is channels_last). The ops write contiguous outputs only, so a ``.grad`` of
        another layout (new, or already there) is computed in a contiguous stand-in and copied
        back into the same tensor afterwards (``copies``: (``.grad``'s local tensor, its
        stand-in)): the ``.grad`` object and its strides stay, at one more pass over that
        parameter, and a failed aggregation leaves it untouched."""
        outs: list[torch.Tensor] = []
        betas: list[float] = []
        allocated: list[torch.Tensor] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p, hit in zip(params, reached):
            if not hit:
                outs.append(local_tensor(new_grad_like(p)))
                betas.append(0.0)
                continue
            if p.grad is None:
                p.grad = new_grad_like(p, like_autograd=True)
                allocated.append(p)
                grad = local_tensor(p.grad)
                out = grad if grad.is_contiguous() else torch.empty(
                    grad.shape, dtype=grad.dtype, device=grad.device)
                betas.append(0.0)
            else:
                grad = local_tensor(p.grad)
                out = grad if grad.is_contiguous() else grad.contiguous()
                betas.append(1.0)
            if out is not grad:
                copies.append((grad, out))
            outs.append(out)
        return outs, betas, allocated, copies

    @staticmethod
    def _non_finite_message(names: list[str], stacks: list[torch.Tensor],
                            error: FloatingPointError, found: _TaskPass, *, merged: bool
                            ) -> str:
        """Which tasks' gradients are not finite, and in which parameter first (the ops' own
        message names only their argument, a stack of every task's gradients). Runs only
        once the check has failed, so it costs nothing on the normal path. ``merged``: a
        reducer may have mixed other processes' rows into ``stacks``."""
        tasks = stacks[0].shape[0] if stacks else 0
        first: dict[int, str] = {}
        for name, stack in zip(names, stacks):
            rows = (~torch.isfinite(stack.reshape(tasks, -1))).any(dim=1).nonzero().flatten()
            for t in rows.tolist():
                first.setdefault(t, name)
        hint = ("; if the losses are scaled by a GradScaler, pass check_finite=False so that "
                "the overflow reaches .grad and the scaler skips the step")
        if not first:  # finite gradients whose Gram overflowed
            return f"GradientSurgery: {error}{hint}"
        named, shared_pass = sorted(first), ""
        if found.batched_losses is not None and len(first) > 1:
            named, shared_pass = _batched_causes(stacks, named, found.batched_losses,
                                                 merged=merged)
        listed = ", ".join(f"losses[{t}] (first in {first[t]!r})" for t in named)
        stand_ins = [t for t in named if t in found.constants]
        if stand_ins:  # a NaN or Inf constant poisons its row (_poison_if_not_finite)
            # With accumulate() the constants are those of any micro-batch: the NaN may come
            # from another micro-batch's attached loss of the task, so "may", not "is".
            hint = (f"; {', '.join(f'losses[{t}]' for t in stand_ins)} did not require grad "
                    "in this step's call (or one of its accumulated calls): a constant, whose "
                    "gradient is zero unless the constant itself is NaN or Inf, which makes it "
                    f"NaN{hint}")
        return f"GradientSurgery: the gradients of {listed} hold NaN or Inf{shared_pass}{hint}"


def _refuse_non_finite_stacks(stacks: list[torch.Tensor],
                              any_rank: Callable[[bool, torch.device], bool] | None = None,
                              device: torch.device | None = None) -> None:
    """Raise ``FloatingPointError`` when a task-gradient stack holds NaN or Inf (the largest
    magnitude of each, one read, one host sync); the caller names the tasks and parameters.
    ``any_rank``: a sharded reducer's, whose ranks hold different stacks and must all refuse
    the step when one does (its collective runs on every rank, on ``device`` or the stacks')."""
    filled = [s for s in stacks if s.numel()]
    finite = True
    if filled:
        largest = torch._foreach_norm(filled, float("inf"))
        finite = bool(torch.stack([m.float() for m in largest]).isfinite().all())
    where = stacks[0].device if stacks else device or torch.device("cpu")
    anywhere = not finite if any_rank is None else any_rank(not finite, where)
    if not finite:
        raise FloatingPointError("task gradients hold NaN or Inf")
    if anywhere:
        raise FloatingPointError("this process's shards are finite: another process's task "
                                 "gradients hold NaN or Inf")


def _batched_causes(stacks: list[torch.Tensor], flagged: list[int],
                    records: list[_LossRecord], *, merged: bool) -> tuple[list[int], str]:
    """The tasks to name for the non-finite rows ``flagged`` of a per_task="batched" step, and
    what the message says of the others. Its one vmapped backward multiplies every task's row
    by the saved values of every task's graph, the zero rows included: one task's NaN or Inf
    makes the others' rows NaN (0 * NaN), never Inf. So a row holding an Inf is its own
    task's, and a NaN or Inf loss is taken as the cause of its row (it is, unless the NaN was
    only added to the loss, which leaves its gradient finite). Rows of finite losses holding
    only NaN (a finite loss may still have a NaN gradient) cannot be told from rows spread to,
    not without the graph, which the pass has freed: they are left out once a cause is found,
    saying so, and all named as possible causes when none is. Under a reducer the rows may
    hold other processes' passes, whose losses are not seen here: none is left out, and this
    process's non-finite losses are only pointed at."""
    flagged_set = set(flagged)
    broken_losses: set[int] = set()
    for tasks, values in records:
        for t, value in zip(tasks, values):
            if t in flagged_set and not bool(torch.isfinite(value).all()):
                broken_losses.add(t)
    spread = ("per_task='batched' backpropagates every task in one vmapped pass, where a NaN "
              "or Inf in one task's backward reaches the other tasks' rows too (zero times "
              "NaN is NaN)")
    if merged:
        local = ""
        if broken_losses:
            local = (f", and this process's {_listed(sorted(broken_losses))} "
                     f"{'is' if len(broken_losses) == 1 else 'are'} NaN or Inf itself")
        return flagged, (f"; {spread}, so any one of these may be the cause{local}: "
                         "per_task='autograd' names only the ones that are")
    holds_inf = {t for t in flagged if t not in broken_losses
                 and any(bool(torch.isinf(stack[t]).any()) for stack in stacks)}
    causes = sorted(broken_losses | holds_inf)
    if not causes:
        return flagged, (f"; {spread}, so any one of these may be the cause: "
                         "per_task='autograd' names only the ones that are")
    others = [t for t in flagged if t not in causes]
    if not others:
        return causes, ""
    return causes, (f"; the rows of {_listed(others)} hold NaN too but are left out: their "
                    f"losses are finite and {spread}; per_task='autograd' checks each task's "
                    "gradient apart")


def _listed(tasks: list[int]) -> str:
    return ", ".join(f"losses[{t}]" for t in tasks)


def _not_an_aggregator(given: object) -> str:
    """Why ``given`` is not an aggregator, with the likely fix: a class passed uninstantiated,
    or an aggregator of another library (TorchJD's share our classes' names)."""
    wanted = "`aggregator` must be a mtunlearn_ext.surgery Aggregator or Weighting"
    if isinstance(given, type):
        if issubclass(given, (Aggregator, Weighting)):
            return (f"{wanted}, got the class {given.__name__} itself; instantiate it: "
                    f"{given.__name__}()")
        return f"{wanted}, got the class {given.__module__}.{given.__qualname__}"
    kind = type(given)
    if kind.__module__.split(".")[0] not in ("builtins", "mtunlearn_ext"):
        return (f"{wanted}, got {kind.__module__}.{kind.__qualname__}; use the one of "
                "mtunlearn_ext.surgery (UPGrad, MGDA, PCGrad, Mean, Sum)")
    return f"{wanted}, got {kind.__name__}"


def _losses_device(losses: Sequence[torch.Tensor], constants: frozenset[int]
                   ) -> torch.device:
    """The device of the first loss attached to the graph (a constant stand-in may sit on the
    CPU beside a model on a device), else of the first loss."""
    attached = [loss for t, loss in enumerate(losses) if t not in constants]
    return (attached or list(losses))[0].device


def _same_tensors(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _stacks_fit(stacks: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    """Whether each stack still has its parameter's (local) shape, dtype and device: a
    parameter keeps its identity through ``module.to(dtype)``, ``.data = ...`` or a move,
    which change them."""
    for stack, param in zip(stacks, params):
        local = local_tensor(param)
        if (stack.shape[1:] != local.shape or stack.dtype != local.dtype
                or stack.device != local.device):
            return False
    return True


def _head_description(_index: int, head: torch.Tensor) -> str:
    return f"the head parameter of shape {sizes(head.shape)}"


def _explained_grad_failure(error: RuntimeError, per_task: str) -> RuntimeError:
    """torch's error for a per-task gradient pass, with what to do when the surgery's way of
    taking gradients caused it; else the error itself."""
    if "use_reentrant=True" in str(error):
        return RuntimeError(
            f"GradientSurgery: per_task={per_task!r} takes each task's gradient with "
            "torch.autograd.grad, which activation checkpointing with use_reentrant=True "
            "cannot run; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (the "
            "default PyTorch recommends), or per_task='backward', which runs loss.backward() "
            "per task")
    if "donated buffers" in str(error):
        return _donated_buffers_error(per_task, _first_line(error))
    if "expect_autograd_hooks_" in str(error):
        # DDP's reducer asserts this when a static_graph model's first backward runs under
        # no_sync(); a plain loss.backward() there fails the same way.
        return RuntimeError(
            "GradientSurgery: a backward pass through DistributedDataParallel(static_graph="
            "True) failed torch's internal assert 'expect_autograd_hooks_', which DDP raises "
            "when such a model's first backward runs under no_sync() (a plain loss.backward() "
            "fails alike). Run the first step outside no_sync(), or every step: the surgery's "
            "per-task passes (torch.autograd.grad) do not start DDP's all-reduce; or build DDP "
            f"without static_graph (torch's error: {_first_line(error)})")
    return error


def _donated_buffers_error(per_task: str, torch_error: str | None = None) -> RuntimeError:
    """The surgery's retained passes meet a compiled backward that frees what it saved after
    one pass. Measured with torch 2.14 (tests/test_surgery_compile.py): torch compiles the
    backward so at the first backward that keeps no graph (a plain step), at the forward's
    compile under dynamic shapes (a second batch size recompiles with them), and serves such
    a backward from inductor's on-disk cache to later processes whatever ``donated_buffer``
    says; setting the flag after the compile only silences torch's check (wrong gradients)."""
    said = f" (torch's error: {torch_error})" if torch_error else ""
    return RuntimeError(
        f"GradientSurgery: per_task={per_task!r} takes one backward pass per task through the "
        "same graph (keeping it between them), but this torch.compile'd model's backward was "
        "compiled with donated buffers, freed after one pass (torch compiles it so at a first "
        "plain loss.backward() through the model, under dynamic shapes, or loads it from "
        "inductor's on-disk cache). Before compiling the model set "
        "torch._functorch.config.donated_buffer = False and "
        "torch._inductor.config.fx_graph_cache = False (or compile with "
        "options={'fx_graph_cache': False}), then call torch._dynamo.reset() or start a new "
        "process: a backward compiled with donated buffers keeps them, setting the flag "
        "afterwards only hides torch's check and the gradients are then wrong, and the cache "
        f"hands such a backward to a new compile whatever the flag says{said}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _refuse_shared_heads(head_params: Sequence[torch.Tensor], shared: _SharedList) -> None:
    """Refuse heads that are shared parameters, naming them: the usual cause is a tied weight
    (an output layer sharing its embedding's weight), which ``heads.parameters()`` yields too."""
    shared_names = {id(t): name for name, t in zip(shared.names, shared.tensors)}
    both = [f"the head parameter of shape {sizes(h.shape)} is the shared parameter "
            f"{shared_names[id(h)]!r}" for h in head_params if id(h) in shared_names]
    if both:
        raise ValueError("GradientSurgery: `head_params` holds shared parameters: "
                         f"{'; '.join(both)}. A parameter is either shared (its gradient goes "
                         "through the aggregator) or a head's (its gradients are summed); a "
                         "weight tied between the trunk and a head (an output layer using the "
                         "embedding's weight) is shared: leave it out of `head_params`")


def _refuse_hooked_shared(caller: str, active: _Active) -> None:
    _refuse_post_accumulate_hooks(caller, active.params,
                                  lambda i, _: f"shared parameter {active.names[i]!r}")


def _write_heads(heads: Sequence[torch.Tensor], head_sums: Sequence[torch.Tensor | None]
                 ) -> list[tuple[int, torch.Tensor]]:
    """Each head's summed gradient into its ``.grad`` (added to one already there), as
    ``AccumulateGrad`` stores it; returns (place in ``heads``, ``.grad``) of each head written."""
    written: list[tuple[int, torch.Tensor]] = []
    fresh: list[torch.Tensor] = []
    for h, (head, summed) in enumerate(zip(heads, head_sums)):
        if summed is None:
            continue
        if head.grad is None:
            # Autograd may return one tensor for two leaves (the gradient of h1 + h2 is the
            # same object for both): stored as is, the two .grad would be one tensor, and an
            # in-place change to one (accumulation, clipping, unscaling) would hit both.
            if summed.layout != torch.strided:
                # A sparse gradient (nn.Embedding(sparse=True)) has no storage pointer nor
                # memory format: it is stored sparse, as sum(losses).backward() stores it.
                if any(summed is other for other in fresh):
                    summed = summed.clone()
            else:
                aliased = any(other.layout == torch.strided
                              and summed.data_ptr() == other.data_ptr() for other in fresh)
                if aliased or not (summed.is_contiguous() and head.is_contiguous()):
                    # Stored as AccumulateGrad stores a gradient: in the parameter's layout
                    # (channels_last, say), a copy where the sum is laid out otherwise
                    # (expanded, stride 0) or aliased.
                    laid_out = new_grad_like(head, like_autograd=True)
                    if aliased or laid_out.stride() != summed.stride():
                        summed = laid_out.copy_(summed)
            head.grad = summed
            fresh.append(summed)
        elif head.grad.layout != torch.strided and summed.layout == torch.strided:
            head.grad = summed + head.grad  # a dense sum where a sparse one cannot take it
        else:
            head.grad.add_(summed)
        written.append((h, head.grad))
    return written
