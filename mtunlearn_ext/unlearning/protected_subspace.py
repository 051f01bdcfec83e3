"""Per-layer protected subspaces: the task-aware projection of the interference-aware method.

For every layer ``l`` of the shared backbone the subspace is spanned by the ``k`` most recent
retain-gradient snapshots of the tasks to protect, stacked as ``M_l`` (``k x n_l``). A forget
gradient is projected off it layer by layer,

    ``f_l <- f_l - M_l^T (M_l M_l^T + lambda_l I)^{-1} M_l f_l``,
    ``lambda_l = ridge * tr(M_l M_l^T) / k``,

so that, to first order, a step along the projected forget gradient leaves every snapshot's
loss unchanged *in every layer separately*: exactly with ``ridge=0``, and to within the ridge
otherwise (``M_l f_l`` becomes ``lambda_l (M_l M_l^T + lambda_l I)^{-1} M_l f_l``: a cosine with
a snapshot up to 9e-5 at the default ``ridge=1e-4`` on random float64 problems of snapshots of
similar norms; ``lambda_l`` is relative to the layer's mean snapshot, so a snapshot short
against it keeps about ``lambda_l / (G_jj + lambda_l)`` of ``f_l``'s part along it: up to
4.9e-3 of cosine in the method's own runs, docs/unlearning.md). That is a
stronger condition than orthogonality of the whole vector: it also holds when only some layers
move, e.g. after clipping or a saliency mask, and it does not let one layer's large component
hide a conflict in another. In the interference-aware
step the instance-level projection follows and adds per-sample retain-gradient components, so
there this holds for the step exactly only with ``instance_projection="off"``
(:mod:`~mtunlearn_ext.unlearning.interference_aware`, step 3).

The snapshots live in one preallocated ring buffer per parameter (``[k, *shape_p]``), so adding
a snapshot is one copy per parameter and the basis is a list of leading-dim views of those
buffers: never a flat copy of the parameters. The projection is
:func:`mtunlearn_ext.surgery.project_out_list` with per-layer ids: one
``ops.gram_list(per_tensor=True)`` pass gives the ``[L, k, k]`` Gram matrices, one batched
``ops.ridge_solve`` solves all layers, and ``ops.combine_list`` writes the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mtunlearn_ext.ops.solvers import MAX_SOLVER_K
from mtunlearn_ext.surgery import gram_list_stats, project_out_list

__all__ = ["ProtectedSubspace", "layer_ids_of"]


def layer_ids_of(names: Sequence[str]) -> list[int]:
    """Layer id of each parameter name: parameters of one module (``enc1.0.conv.weight`` and
    ``enc1.0.conv.bias``) form one layer, numbered in first-seen order.

    This is the grouping of :meth:`mtunlearn_ext.models.MultiTaskModel.shared_layers` (one
    layer per module that owns parameters), derived from names alone so it works on any
    ``nn.Module``.
    """
    ids: dict[str, int] = {}
    out: list[int] = []
    for name in names:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        out.append(ids.setdefault(module, len(ids)))
    return out


class ProtectedSubspace:
    """A ring buffer of ``k`` gradient snapshots over a list of parameters, grouped in layers.

    Args:
        params: the parameters the snapshots cover (e.g. the shared backbone, ``theta_s``);
            only their shapes, dtypes and devices are read.
        layer_ids: layer id of each parameter (:func:`layer_ids_of`); ids must cover ``0..L-1``.
        k: number of snapshots kept (the newest ``k`` win).
        ridge: relative Tikhonov term of each layer's solve (see :func:`ops.ridge_solve`).
    """

    def __init__(self, params: Sequence[torch.Tensor], layer_ids: Sequence[int], k: int,
                 ridge: float = 1e-4) -> None:
        params = list(params)
        if not params:
            raise ValueError("ProtectedSubspace: `params` is empty")
        if len(layer_ids) != len(params):
            raise ValueError(f"ProtectedSubspace: one layer id per parameter ({len(params)}), "
                             f"got {len(layer_ids)}")
        if not 1 <= k <= MAX_SOLVER_K:
            raise ValueError(f"ProtectedSubspace: `k` must be in [1, {MAX_SOLVER_K}], got {k}")
        if not ridge >= 0:
            raise ValueError(f"ProtectedSubspace: `ridge` must be >= 0, got {ridge}")
        self.layer_ids = [int(i) for i in layer_ids]
        self.num_layers = max(self.layer_ids) + 1
        if sorted(set(self.layer_ids)) != list(range(self.num_layers)):
            raise ValueError("ProtectedSubspace: `layer_ids` must cover 0..L-1 with no gap")
        self.k = int(k)
        self.ridge = float(ridge)
        self.buffers = [torch.zeros((self.k, *p.shape), dtype=p.dtype, device=p.device)
                        for p in params]
        self.count = 0  # snapshots pushed so far (the ring position is count % k)
        # The basis changes only on push: its per-layer Gram is kept until then, so each
        # projection between refreshes reads the snapshots once (cross products) instead of twice.
        self._gram: torch.Tensor | None = None

    @property
    def filled(self) -> int:
        """How many snapshots the basis holds now (``min(count, k)``)."""
        return min(self.count, self.k)

    def push(self, grads: Sequence[torch.Tensor]) -> None:
        """Store one snapshot (one tensor per parameter), replacing the oldest when full."""
        grads = list(grads)
        if len(grads) != len(self.buffers):
            raise ValueError(f"ProtectedSubspace.push: one tensor per parameter "
                             f"({len(self.buffers)}), got {len(grads)}")
        slot = self.count % self.k
        with torch.no_grad():  # one multi-tensor copy, not a launch per parameter
            torch._foreach_copy_([buffer[slot] for buffer in self.buffers], grads)
        self.count += 1
        self._gram = None

    def basis(self) -> list[torch.Tensor]:
        """The snapshots as per-parameter stacks ``[filled, *shape_p]`` (views, no copy)."""
        if self.filled == 0:
            raise RuntimeError("ProtectedSubspace: no snapshot pushed yet")
        return [b[: self.filled] for b in self.buffers]

    def project(self, g_stacks: Sequence[torch.Tensor],
                outs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Project ``m`` vectors (stacks ``[m, *shape_p]``) off the subspace, layer by layer.

        Returns new stacks (or writes ``outs``, which may be ``g_stacks`` itself). With no
        snapshot yet the vectors are returned unchanged (copied unless ``outs`` aliases them).
        """
        g_stacks = list(g_stacks)
        if self.filled == 0:
            if outs is None:
                return [g.clone() for g in g_stacks]
            outs = list(outs)
            for o, g in zip(outs, g_stacks):
                if o.data_ptr() != g.data_ptr():
                    o.copy_(g)
            return outs
        if self._gram is None:
            self._gram = gram_list_stats(self.basis(), per_layer=self.layer_ids,
                                         num_layers=self.num_layers)
        result = project_out_list(g_stacks, self.basis(), self.ridge, outs=outs,
                                  per_layer=self.layer_ids, num_layers=self.num_layers,
                                  basis_gram=self._gram)
        assert isinstance(result, list)
        return result
