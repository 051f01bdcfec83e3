"""Gradients for unlearning steps: parameter groups, per-task gradients, per-sample gradients.

Every method here works on lists of per-parameter tensors in a fixed order, the order of
:class:`ParameterGroups` (shared backbone first, then each head), so that a gradient list, a
``.grad`` list and the ops' per-parameter stacks line up one to one.

Per-sample gradients use ``torch.func``: ``vmap(grad(loss_of_one_sample))`` over the batch, with
the model called functionally on a dict of parameters. That needs a model without batch
statistics in training mode (the project's models use GroupNorm; the step loop runs other
models in eval mode, see :mod:`~mtunlearn_ext.unlearning.norm_statistics`), and a forward that
vmap can batch: no data-dependent shapes or control flow, no in-place writes into its inputs.
The pass turns PyTorch's multi-head-attention fast path off (``_mha_fast_path_off``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from mtunlearn_ext.data.base import TaskSpec, neutral_unsupervised
from mtunlearn_ext.data.inputs import Inputs, map_leaves
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.models.batched_embeddings import batchable_embeddings
from mtunlearn_ext.models.sparse_embeddings import dense_embedding_gradients
from mtunlearn_ext.unlearning.norm_statistics import check_samples_independent

__all__ = [
    "ParameterGroups",
    "assign_grads",
    "grads_of",
    "per_sample_retain_grads",
    "per_sample_retain_grads_and_losses",
    "per_sample_task_grads_and_losses",
    "summed_pass_grads",
    "task_grads",
]

_T = TypeVar("_T")
_BatchT = TypeVar("_BatchT", bound=Mapping[str, object])


def _describe_group(group: Sequence[tuple[str, nn.Parameter]]) -> str:
    """``"3 tensors (1,234 values)"``."""
    values = sum(parameter.numel() for _, parameter in group)
    return f"{len(group)} tensor{'' if len(group) == 1 else 's'} ({values:,} values)"


@dataclass(frozen=True)
class ParameterGroups:
    """The model's trainable parameters split into the shared backbone and one group per head.

    Attributes:
        shared: ``(name, parameter)`` of ``theta_s``.
        heads: task -> ``(name, parameter)`` of ``theta_t``.
    """

    shared: tuple[tuple[str, nn.Parameter], ...]
    heads: Mapping[str, tuple[tuple[str, nn.Parameter], ...]]

    def __repr__(self) -> str:
        # The dataclass repr printed every parameter's values (9.6k characters for a 6-24-24
        # trunk and two linear heads), and again in each StepContext holding the groups.
        heads = ", ".join(f"{task}: {_describe_group(group)}" for task, group in self.heads.items())
        return f"ParameterGroups(shared: {_describe_group(self.shared)}, heads: {{{heads}}})"

    @staticmethod
    def from_model(model: nn.Module, task_names: Sequence[str] | None = None) -> ParameterGroups:
        """Read the split from ``model.parameter_split()`` (a :class:`MultiTaskModel`); a model
        without one counts as all-shared, every parameter of it in ``shared``."""
        named = dict(model.named_parameters())
        split_fn = getattr(model, "parameter_split", None)
        if split_fn is None:
            return ParameterGroups(tuple((n, p) for n, p in named.items() if p.requires_grad),
                                   {t: () for t in (task_names or [])})
        split = split_fn()
        owner: dict[str, str] = {}
        for group, names in [("shared", split.shared), *split.heads.items()]:
            for n in names:
                if n in owner:
                    where = (f"twice under {group!r}" if owner[n] == group
                             else f"under both {owner[n]!r} and {group!r}")
                    raise ValueError(
                        f"ParameterGroups: parameter {n!r} is listed {where}; each parameter "
                        "belongs to one group (one that several tasks use is shared: with "
                        "mtunlearn_ext.unlearn, list it in `shared_parameters`)")
                owner[n] = group
        shared = tuple((n, named[n]) for n in split.shared if named[n].requires_grad)
        heads = {t: tuple((n, named[n]) for n in names if named[n].requires_grad)
                 for t, names in split.heads.items()}
        return ParameterGroups(shared, heads)

    @property
    def shared_params(self) -> list[nn.Parameter]:
        """The shared backbone's parameters, in ``shared``'s order."""
        return [p for _, p in self.shared]

    def head_params(self, task: str) -> list[nn.Parameter]:
        """Task ``task``'s head parameters (``KeyError`` for a task without a group)."""
        return [p for _, p in self.heads[task]]

    @property
    def all(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter, shared first then heads in task order (the canonical order)."""
        return list(self.shared) + [item for group in self.heads.values() for item in group]

    @property
    def all_params(self) -> list[nn.Parameter]:
        """Every parameter in the canonical order of :attr:`all`."""
        return [p for _, p in self.all]

    @property
    def all_names(self) -> list[str]:
        """Every parameter's name in the canonical order of :attr:`all`."""
        return [n for n, _ in self.all]

    def split(self, values: Sequence[_T], tasks: Sequence[str] | None = None
              ) -> tuple[list[_T], dict[str, list[_T]]]:
        """Cut a list laid out as the shared parameters then the heads of ``tasks`` (default:
        every task, in canonical order) into (the shared part, task -> its head's part)."""
        shared = list(values[:len(self.shared)])
        heads: dict[str, list[_T]] = {}
        offset = len(self.shared)
        for t in (self.heads if tasks is None else tasks):
            count = len(self.heads[t])
            heads[t] = list(values[offset:offset + count])
            offset += count
        if offset != len(values):
            raise ValueError(f"ParameterGroups.split: {len(values)} values for {offset} "
                             "parameters")
        return shared, heads

    @property
    def num_shared(self) -> int:
        """How many leading entries of :attr:`all` are shared (to split a canonical list)."""
        return len(self.shared)

    def numel(self) -> int:
        """The number of trainable values over every group."""
        return sum(p.numel() for p in self.all_params)


def grads_of(loss: torch.Tensor, params: Sequence[torch.Tensor],
             retain_graph: bool = False) -> list[torch.Tensor]:
    """``d loss / d p`` for each ``p`` (zeros for a parameter the loss does not reach), dense
    (a sparse embedding table's gradient as the dense tensor it stands for:
    :mod:`~mtunlearn_ext.models.sparse_embeddings`)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
            for p, g in zip(params, grads)]


def summed_pass_grads(batches: Iterable[_BatchT],
                      loss_of: Callable[[_BatchT], tuple[torch.Tensor | None, int]],
                      params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """The gradient of ``sum_batches loss_of(batch)[0]`` with respect to ``params``, one backward
    per batch (a whole data set's gradient without holding its graph), and the total of the
    counts ``loss_of`` returns beside each loss (e.g. supervised pairs, to turn the sum into a
    mean). A batch whose loss is ``None`` or has no graph adds nothing."""
    params = list(params)
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for batch in batches:
        loss, n = loss_of(batch)
        if loss is None or not loss.requires_grad:
            continue
        count += n
        torch._foreach_add_(total, grads_of(loss, params))
    return total, count


def task_grads(losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]
               ) -> dict[str, list[torch.Tensor]]:
    """Per-task gradients ``{t: d L_t / d params}`` from one forward pass. The graph is kept
    between the tasks and freed by the last task's pass, so a later ``backward`` or
    ``autograd.grad`` through it fails ("Trying to backward through the graph a second
    time"): take what else needs the graph first. Used for the per-task forget gradients
    ``f_t`` on ``theta_s``."""
    names = list(losses)
    out: dict[str, list[torch.Tensor]] = {}
    for i, name in enumerate(names):
        out[name] = grads_of(losses[name], params, retain_graph=i < len(names) - 1)
    return out


def assign_grads(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor],
                 accumulate: bool = False) -> None:
    """Set (or add to) each parameter's ``.grad``. The tensors are stored as given (views of a
    flat vector are fine: the optimizer step reads them, and in-place clipping scales each)."""
    for p, g in zip(params, grads):
        if p.grad is None or not accumulate:
            p.grad = g.detach()
        else:
            p.grad.add_(g.detach())


def _per_sample_supervised_loss(specs: Sequence[TaskSpec], task_scale: Sequence[float] | None,
                                per_task: bool = False
                                ) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The loss of one retain sample, ``sum_t s_t m_t l_t`` over its supervised tasks
    (``s_t = 1`` unless ``task_scale`` is given), or with ``per_task`` the vector of its terms
    ``[s_t m_t l_t]_t``, and each task's masked term ``m_t l_t`` (unscaled, detached: an
    auxiliary output for the loss curves)."""
    scale = [1.0] * len(specs) if task_scale is None else [float(s) for s in task_scale]

    def loss(out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
             supervision: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = torch.zeros((), dtype=torch.float32, device=supervision.device)
        scaled: list[torch.Tensor] = []
        terms: dict[str, torch.Tensor] = {}
        for column, spec in enumerate(specs):
            value = task_loss(spec, out[spec.name], targets[spec.name])[0]
            term = torch.where(supervision[column], value, torch.zeros_like(value))
            terms[spec.name] = term.detach()
            scaled.append(term if scale[column] == 1.0 else scale[column] * term)
            if not per_task:
                total = total + scaled[-1]
        return (torch.stack(scaled) if per_task else total), terms

    return loss


@contextmanager
def _mha_fast_path_off() -> Iterator[None]:
    """PyTorch's fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` switched off
    inside, the previous setting restored after (also on an error).

    In eval mode with a padding mask, ``nn.TransformerEncoder`` (``enable_nested_tensor=True``,
    its default) tests on that path whether the mask suits a nested tensor, with an op vmap has
    no batching rule for (``aten::_nested_tensor_from_mask_left_aligned``); nested tensors and
    the fused kernels after it have none either. The ordinary path computes the same attention,
    and a model without such modules runs exactly as before.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _is_vmap_error(error: BaseException) -> bool:
    """Whether ``error`` comes from running the forward under ``torch.func.vmap``: any
    ``RuntimeError`` but running out of memory (CUDA's error, or the CPU allocator's plain
    ``RuntimeError``), since the problem's checks ran the same model
    and loss on the same inputs outside vmap. Torch's own refusals name vmap or a batching
    rule, but not all its failures there do: ``nn.GRU``'s fused kernel fails with "output
    with shape [1, 16] doesn't match the broadcast shape [20, 1, 16]"."""
    if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
        return False
    said = str(error)
    # The CPU allocator's failure is a plain RuntimeError: memory, not batching (chunk_size).
    return not ("can't allocate memory" in said or "DefaultCPUAllocator" in said
                or "out of memory" in said.lower())


def first_sentence(error: BaseException) -> str:
    """The first sentence of ``error``'s message (torch's vmap errors run to several)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _vmap_failure(caller: str, error: BaseException) -> RuntimeError:
    """The error to raise (from ``error``) when vmap could not batch the model's forward: what
    the pass does, what it cannot take, and the ways out (torch's own words name neither). Only
    torch's first sentence is repeated; the rest stays in the chained error."""
    said = first_sentence(error)
    return RuntimeError(
        f"{caller}: the per-sample gradient step runs the model under torch.func.vmap, one "
        "instance at a time (each a batch of one), and torch could not batch its forward (or "
        f"backward) there ({said}). Not supported under vmap: data-dependent shapes "
        "or control flow (`.item()`, `int(mask.sum(1).max())` to trim a batch to its longest "
        "sequence, `if x.any():`, boolean-mask indexing), in-place writes into the inputs "
        "or into buffers (a quantisation observer's running extremes), some modules' fused "
        "kernels (nn.GRU's) and module backward hooks (`register_full_backward_hook`: torch "
        "runs them through an autograd.Function without the `setup_context` vmap needs). "
        "Either turn the per-sample step off (config `instance_projection=\"off\"` of the "
        "interference-aware method, or a method without per-sample gradients: orthograd always "
        "takes them), or make the forward vmap-friendly (keep the padded length and mask "
        "instead of trimming, use torch.where instead of branching on values, copy an input "
        "before writing into it).")


def _vmap_per_sample(model: nn.Module, batch: Mapping[str, object], specs: Sequence[TaskSpec],
                     param_names: Sequence[str], chunk_size: int | None,
                     task_scale: Sequence[float] | None, per_task: bool, caller: str
                     ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """``vmap`` over the batch of the gradient (``jacrev`` with ``per_task``) of one sample's
    :func:`_per_sample_supervised_loss`, with the model called functionally. A module in
    training mode that draws randomness (dropout) draws it independently per sample."""
    check_samples_independent(model, caller)
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in param_names}
    if task_scale is not None and len(task_scale) != len(specs):
        raise ValueError(f"{caller}: `task_scale` needs one factor per task ({len(specs)}), got "
                         f"{len(task_scale)}")
    loss_fn = _per_sample_supervised_loss(specs, task_scale, per_task)
    inputs: Inputs = batch["input"]  # type: ignore[assignment]
    targets = batch["targets"]
    supervision = batch["supervision"]
    assert isinstance(targets, Mapping)
    assert isinstance(supervision, torch.Tensor)
    # Neutral targets on unsupervised pairs (the ``where`` of the loss keeps their values out of
    # the sum, not a NaN out of the gradient), also for batches not made by a data set.
    task_targets = {s.name: neutral_unsupervised(s, targets[s.name], supervision[:, c])
                    for c, s in enumerate(specs)}

    # ``vmap`` maps over the leading dimension of every input (a tuple or dict of inputs is a
    # pytree): ``one`` sees one row of each, and gives the model a batch of one of each.
    def one(p: dict[str, torch.Tensor], x: Inputs, tgt: dict[str, torch.Tensor],
            sup: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = functional_call(model, p, (map_leaves(lambda v: v.unsqueeze(0), x),),
                              strict=False)
        return loss_fn(out, {k: v.unsqueeze(0) for k, v in tgt.items()}, sup)

    differentiate = jacrev if per_task else grad
    per_sample = vmap(differentiate(one, has_aux=True), in_dims=(None, 0, 0, 0),
                      randomness="different")
    # Under no_grad, which torch.func's transforms ignore inside: the parameters outside
    # `param_names` (held fixed, not detached: functional_call reads them from the model) would
    # otherwise make every per-sample gradient require grad, and the outer autograd keep the
    # whole vmapped pass alive for as long as those gradients live.
    with torch.no_grad(), _mha_fast_path_off(), dense_embedding_gradients(model), \
            batchable_embeddings(model), _parameters_kept(model):
        try:
            grads, losses = _in_chunks(per_sample, params, inputs, task_targets, supervision,
                                       chunk_size)
        except RuntimeError as error:
            if not _is_vmap_error(error):
                raise
            raise _vmap_failure(caller, error) from error
    return [grads[n] for n in param_names], losses


_PerSampleRows = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def _in_chunks(per_sample: Callable[..., _PerSampleRows], params: dict[str, torch.Tensor],
               inputs: Inputs, targets: dict[str, torch.Tensor], supervision: torch.Tensor,
               chunk_size: int | None) -> _PerSampleRows:
    """``per_sample(params, inputs, targets, supervision)`` (gradients by parameter, losses by
    task; a row each) over ``chunk_size`` rows at a time, each chunk's rows written into
    outputs made once for all rows. ``vmap(chunk_size=...)`` keeps every chunk's outputs and
    concatenates them, holding the rows twice: for a large model's per-sample gradients, which
    outweigh the activations, that raised the peak memory ``chunk_size`` is there to bound
    (8.9M parameters, 64 rows: 4.3 GB at once, 6.1 GB in chunks of 4)."""
    rows = supervision.shape[0]
    if chunk_size is None or chunk_size >= rows:
        return per_sample(params, inputs, targets, supervision)
    whole: _PerSampleRows | None = None
    for start in range(0, rows, chunk_size):
        part = slice(start, min(start + chunk_size, rows))
        chunk = per_sample(params, map_leaves(lambda v: v[part], inputs),
                           {k: v[part] for k, v in targets.items()}, supervision[part])
        if whole is None:
            whole = ({n: g.new_empty((rows, *g.shape[1:])) for n, g in chunk[0].items()},
                     {t: v.new_empty((rows, *v.shape[1:])) for t, v in chunk[1].items()})
        for into, rows_of_chunk in zip(whole, chunk):
            for key, value in rows_of_chunk.items():
                into[key][part] = value
        del chunk
    assert whole is not None
    return whole


@contextmanager
def _parameters_kept(model: nn.Module) -> Iterator[None]:
    """Put every parameter back in its module on the way out. ``functional_call`` swaps the
    given tensors in and back, but a module reachable under two names (``self.alias =
    self.heads["a"]``, or a head also listed in a ModuleList) kept the swapped-in functorch
    wrappers: dead tensors, which no later backward reaches and which deepcopy, torch.save
    and a second request refused ("Cannot access storage of TensorWrapper")."""
    slots = [(module, name, parameter)
             for module in model.modules()
             for name, parameter in module._parameters.items()]
    try:
        yield
    finally:
        for module, name, parameter in slots:
            if module._parameters.get(name) is not parameter:
                module._parameters[name] = parameter


def per_sample_retain_grads(model: nn.Module, batch: Mapping[str, object],
                            specs: Sequence[TaskSpec], param_names: Sequence[str],
                            chunk_size: int | None = None,
                            task_scale: Sequence[float] | None = None) -> list[torch.Tensor]:
    """Per-sample gradients of each retain sample's supervised loss ``sum_t m_it l_t(i)``.

    ``r_i = d/d theta [sum_t m_it l_t(x_i)]`` for every sample ``i`` of the batch, by
    ``vmap(grad(.))`` over samples; parameters outside ``param_names`` are held fixed.

    Args:
        model: the model (called functionally; its parameters are not modified).
        batch: a collated batch whose supervision columns follow ``specs``.
        param_names: the parameters to differentiate (full names).
        chunk_size: samples per vectorised chunk (bounds memory; ``None``: all at once).
        task_scale: one factor ``s_t`` per spec: ``sum_t s_t m_it l_t(i)`` instead.

    Returns:
        One ``[B, *shape_p]`` tensor per name in ``param_names``, in that order.
    """
    return per_sample_retain_grads_and_losses(model, batch, specs, param_names, chunk_size,
                                              task_scale=task_scale)[0]


def per_sample_retain_grads_and_losses(model: nn.Module, batch: Mapping[str, object],
                                       specs: Sequence[TaskSpec], param_names: Sequence[str],
                                       chunk_size: int | None = None,
                                       task_scale: Sequence[float] | None = None
                                       ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`per_sample_retain_grads` and, from the same forward pass, each task's per-sample
    masked loss ``m_it l_t(i)`` (task -> ``[B]``, detached).

    ``task_scale`` (one factor ``s_t`` per spec) differentiates ``sum_t s_t m_it l_t(i)``
    instead: with ``s_t = B / n_t`` (``n_t`` the batch's supervised pairs of ``t``) the mean of
    the per-sample gradients is exactly the gradient of the batch's masked multi-task loss
    ``sum_t mean_{i: m_it} l_t(i)`` (:func:`~mtunlearn_ext.losses.masked_multitask_loss`), also
    when some rows lack some tasks' labels."""
    return _vmap_per_sample(model, batch, specs, param_names, chunk_size, task_scale,
                            per_task=False, caller="per_sample_retain_grads_and_losses")


def per_sample_task_grads_and_losses(model: nn.Module, batch: Mapping[str, object],
                                     specs: Sequence[TaskSpec], param_names: Sequence[str],
                                     chunk_size: int | None = None,
                                     task_scale: Sequence[float] | None = None
                                     ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Per-(sample, task) gradients: ``r_it = d/d theta [s_t m_it l_t(x_i)]`` for every sample
    ``i`` of the batch and every task ``t`` of ``specs``, one ``[B, T, *shape_p]`` stack per
    name, from one forward pass per sample (``vmap(jacrev(.))``), and each task's per-sample
    masked loss (task -> ``[B]``, detached).

    Summed over ``t`` they are :func:`per_sample_retain_grads_and_losses`'s rows; kept apart,
    a constraint ``<d, r_it> <= 0`` holds for each of an instance's tasks, where the summed row
    lets a step raise one task's loss of the instance as long as another's falls. A pair
    without supervision (``m_it = 0``) has a zero row."""
    return _vmap_per_sample(model, batch, specs, param_names, chunk_size, task_scale,
                            per_task=True, caller="per_sample_task_grads_and_losses")
