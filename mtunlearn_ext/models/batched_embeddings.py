"""Embedding tables that ``torch.func.vmap`` can batch: the forwards the per-sample pass runs.

Two of torch's embedding forwards do not batch under ``vmap``:

- ``nn.EmbeddingBag`` has no batching rule (``aten::_embedding_bag``): torch runs it once per
  instance and warns. The batched forward below is 1.7-2.9x faster (per-sample gradients over
  32 instances, bags of 20, 64-wide tables of 1,000 and 100,000 rows, 2 CPU cores:
  ``benchmarks/per_sample_embeddings.py``; at 100,000 rows 0.36-0.49 s by torch's loop against
  0.21 s, most of which is writing one dense gradient of the table per instance).
- ``max_norm`` (on either module) renormalises the looked-up rows of the weight in place, which
  ``vmap`` refuses for a tensor it does not batch.

Inside :func:`batchable_embeddings` such a module computes the same thing from ``F.embedding``:
a bag of a 2-D input ``[B, L]`` is the sum, mean or max of its rows (``per_sample_weights``
weighing the sum, ``padding_idx`` entries left out, an empty bag zero), and ``max_norm`` scales
the looked-up rows (``max_norm / (norm + 1e-7)`` where the norm exceeds it, as torch does)
with the gradient of the lookup itself, which is what torch's in-place renormalisation gives:
its gradient is taken at the renormalised weight, with respect to that weight. Only the weight
the module holds is left as it is (torch's forward would have renormalised those rows of it;
the next ordinary forward does). A 1-D input with ``offsets`` (bags of data-dependent lengths,
which ``vmap`` cannot slice per instance anyway) and a bag with ``scale_grad_by_freq`` but no
``max_norm`` (torch 2.13 scales its frequencies differently from 2.14, which this forward
follows) keep torch's own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batchable_embeddings"]

_NO_FORWARD = object()


def _renormed_rows(rows: torch.Tensor, max_norm: float, norm_type: float) -> torch.Tensor:
    """``rows`` with those of norm above ``max_norm`` scaled to it, as ``embedding_renorm_``
    scales the weight's rows; the gradient passes as through the lookup alone."""
    norms = torch.linalg.vector_norm(rows.detach(), ord=norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return rows + (rows * scale - rows).detach()


def _embedding_forward(module: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    rows = F.embedding(input, module.weight, module.padding_idx, None, module.norm_type,
                       module.scale_grad_by_freq, False)
    assert module.max_norm is not None
    return _renormed_rows(rows, module.max_norm, module.norm_type)


def _bag_forward(module: nn.EmbeddingBag, torch_forward: Callable[..., torch.Tensor],
                 input: torch.Tensor, offsets: torch.Tensor | None = None,
                 per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    # A bag with scale_grad_by_freq too: torch 2.13's embedding_bag scales some rows by the
    # wrong count (ids [1, 1, 2, 3] give row 2 half its gradient; 2.14 gives it all), and the
    # per-sample gradients must match the ones its other passes take, whatever the version.
    # Not with max_norm, whose in-place renormalisation torch's forward cannot run under vmap.
    if (input.dim() != 2 or offsets is not None or input.shape[1] == 0
            or (module.scale_grad_by_freq and module.max_norm is None)):
        return torch_forward(input, offsets, per_sample_weights)
    if per_sample_weights is not None and module.mode != "sum":
        # torch's own forward names what is wrong with these.
        return torch_forward(input, offsets, per_sample_weights)
    rows = F.embedding(input, module.weight, None, None, module.norm_type,
                       module.scale_grad_by_freq, False)
    if module.max_norm is not None:
        rows = _renormed_rows(rows, module.max_norm, module.norm_type)
    kept = None if module.padding_idx is None else (input != module.padding_idx)
    if module.mode == "max":
        if kept is None:
            return rows.max(dim=1).values
        top = rows.masked_fill(~kept.unsqueeze(-1), float("-inf")).max(dim=1).values
        return torch.where(kept.any(dim=1, keepdim=True), top, torch.zeros_like(top))
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(-1).to(rows.dtype)
    if kept is not None:
        rows = rows * kept.unsqueeze(-1).to(rows.dtype)
    total = rows.sum(dim=1)
    if module.mode == "sum":
        return total
    if kept is None:
        return total / input.shape[1]
    return total / kept.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)


def _batchable_forward(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The forward to run under ``vmap`` in place of ``module``'s, or None to keep its own."""
    if isinstance(module, nn.EmbeddingBag):
        torch_forward = module.forward

        def bag(input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
            return _bag_forward(module, torch_forward, input, offsets, per_sample_weights)
        return bag
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return lambda input: _embedding_forward(module, input)
    return None


@contextmanager
def batchable_embeddings(model: nn.Module) -> Iterator[None]:
    """Every ``nn.EmbeddingBag`` of ``model``, and every ``nn.Embedding`` with ``max_norm``,
    runs a forward that ``vmap`` batches inside (see the module's docstring); each has its own
    forward back after (also on an error). A model without one runs as before."""
    swapped: list[tuple[nn.Module, Any]] = []
    try:
        for module in model.modules():
            forward = _batchable_forward(module)
            if forward is not None:
                swapped.append((module, module.__dict__.get("forward", _NO_FORWARD)))
                module.forward = forward
        yield
    finally:
        for module, own in reversed(swapped):
            if own is _NO_FORWARD:
                del module.forward
            else:
                module.forward = own
