"""``torch.vmap`` rules for the ops that take leading batch dims.

Every one of these ops already solves a batch of independent problems over its leading dims
(``gram``: ``[..., k, n] -> [..., k, k]``; the solvers: one ``k x k`` problem per leading
index), so vmap's batch dim only has to be moved in front, and an unbatched argument expanded
to the batch: one call instead of torch's fallback, which loops over the samples one call at a
time (and warns). A sample's result is the one a loop would give (the problems are independent,
the CPU kernels cut each problem's columns into ranges as they cut it alone, and PCGrad's
orders depend on the seed and the task, not on the problem's index); the CUDA kernels size
the ranges from the whole batch, the same as alone up to 2^25 columns in all for Grams of up
to 90 rows (README).

The list ops that read (``gram_list``, ``inner_list``, ``gram_list_stacked``) take dim 0 of
each tensor as its rows, so their rule runs the batched ``gram`` / ``inner`` once per tensor of
the list and sums the terms (one launch per tensor instead of one per sample and tensor; the
sums may differ from the one-launch list op's in the last bits). The in-place ops
(``combine_``, ``combine_list_``) have no rule: torch refuses them under vmap.
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: The ops whose every tensor argument has the batch dims in front.
LEADING_BATCH_OPS = ("gram", "inner", "combine", "ridge_solve", "nonconflicting_dual",
                     "pcgrad_weights", "project_out", "project_nonconflicting", "pcgrad")


def _batch_in_front(arg: Any, dim: int | None, size: int) -> Any:
    if not isinstance(arg, torch.Tensor):
        return arg
    return arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)


def _leading_batch_rule(name: str):
    op = getattr(torch.ops.mtunlearn, name)

    def rule(info, in_dims, *args):
        result = op(*(_batch_in_front(a, d, info.batch_size) for a, d in zip(args, in_dims)))
        return result, ((0,) * len(result) if isinstance(result, tuple) else 0)

    return rule


def _rows_by_batch(tensors: list[torch.Tensor], dims: list[int | None], size: int
                   ) -> list[torch.Tensor]:
    """Each stack ``[rows, *shape_p]`` of a batched list as ``[batch, rows, prod(shape_p)]``."""
    out = []
    for t, d in zip(tensors, dims):
        t = _batch_in_front(t, d, size)
        out.append(t.reshape(size, t.shape[1], math.prod(t.shape[2:])))
    return out


def _terms(terms: list[torch.Tensor], per_tensor: bool) -> torch.Tensor:
    """Per-tensor terms ``[batch, ...]`` stacked after the batch dim, or summed in list order."""
    if per_tensor:
        return torch.stack(terms, dim=1)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _gram_list_rule(info, in_dims, xs, per_tensor=False):
    rows = _rows_by_batch(xs, in_dims[0], info.batch_size)
    return _terms([torch.ops.mtunlearn.gram(x) for x in rows], per_tensor), 0


def _inner_list_rule(info, in_dims, as_, bs, per_tensor=False):
    a_rows = _rows_by_batch(as_, in_dims[0], info.batch_size)
    b_rows = _rows_by_batch(bs, in_dims[1], info.batch_size)
    return _terms([torch.ops.mtunlearn.inner(a, b) for a, b in zip(a_rows, b_rows)],
                  per_tensor), 0


def _gram_list_stacked_rule(info, in_dims, xs, ys, per_tensor=False):
    x_rows = _rows_by_batch(xs, in_dims[0], info.batch_size)
    y_rows = _rows_by_batch(ys, in_dims[1], info.batch_size)
    return _terms([torch.ops.mtunlearn.gram(torch.cat([x, y], dim=1))
                   for x, y in zip(x_rows, y_rows)], per_tensor), 0


def _register() -> None:
    for name in LEADING_BATCH_OPS:
        torch.library.register_vmap(f"mtunlearn::{name}", _leading_batch_rule(name))
    torch.library.register_vmap("mtunlearn::gram_list", _gram_list_rule)
    torch.library.register_vmap("mtunlearn::inner_list", _inner_list_rule)
    torch.library.register_vmap("mtunlearn::gram_list_stacked", _gram_list_stacked_rule)


_register()
