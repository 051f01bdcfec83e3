"""Sparse embedding tables (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``)
stepped with dense gradients.

Recommender models keep their tables sparse so that an optimizer built for it
(``torch.optim.SparseAdam``) touches only the rows a batch reads. Their forward is the same
either way; only the gradient's layout differs. The library's optimizers (Adam, SGD with
momentum), gradient clipping, the projections and ``torch.func.vmap`` take no sparse
gradients, so training, retraining and unlearning run such tables with dense ones and give
them back sparse.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["dense_embedding_gradients"]


@contextmanager
def dense_embedding_gradients(model: nn.Module) -> Iterator[None]:
    """Every sparse ``nn.Embedding`` / ``nn.EmbeddingBag`` of ``model`` gives dense gradients
    inside; each is sparse again after (also on an error). Without one, nothing changes."""
    switched = [m for m in model.modules()
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for module in switched:
        module.sparse = False
    try:
        yield
    finally:
        for module in switched:
            module.sparse = True
