"""Sparse embedding tables (a recommender's ``nn.Embedding(sparse=True)``): every method steps
them with dense gradients and gives them back sparse. Before, the interference-aware method
failed in its snapshots (``copy_() between dense and sparse Tensors``), the per-sample pass
under ``vmap`` and Adam (``Adam does not support sparse gradients``), retraining too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.models.sparse_embeddings import dense_embedding_gradients

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch has no vmap batching rule for embedding_bag; the per-sample pass runs a batched
    # forward of the bag instead of torch's per-instance fallback, which would warn.
    pytest.mark.filterwarnings("error:There is a performance drop"),
]

TASKS = {"a": "classification", "b": "regression"}


class _Recommender(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.items = nn.Embedding(50, 8, sparse=sparse)
        self.users = nn.EmbeddingBag(30, 8, mode="sum", sparse=sparse)
        self.trunk = nn.Linear(16, 16)
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 2), "b": nn.Linear(16, 1)})

    def forward(self, items: torch.Tensor, users: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.trunk(torch.cat([self.items(items).mean(1), self.users(users)], 1)))
        return {t: h(z) for t, h in self.heads.items()}


def _data():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randint(0, 50, (80, 4), generator=g),
              torch.randint(0, 30, (80, 3), generator=g))
    return inputs, {"a": torch.randint(0, 2, (80,), generator=g),
                    "b": torch.randn(80, 1, generator=g)}


@pytest.mark.parametrize("method, settings", [
    ("interference_aware", {"steps": 3}),
    ("interference_aware", {"steps": 3, "optimizer": "adam", "head_refit_steps": 1}),
    ("orthograd", {"steps": 3}),
    ("neggrad_plus", {"steps": 3, "optimizer": "adam"}),
    ("pcgrad", {"steps": 3}),
    ("salun", {"steps": 3}),
    ("retrain", {}),
])
def test_a_sparse_table_unlearns_as_the_dense_one_and_stays_sparse(
        method: str, settings: dict[str, object]) -> None:
    results = {}
    for sparse in (False, True):
        original = _Recommender(sparse)
        before = {k: v.clone() for k, v in original.state_dict().items()}
        extra = ({"fresh_model": lambda sparse=sparse: _Recommender(sparse),
                  "train_config": {"epochs": 1, "optimizer": "adam"}} if method == "retrain"
                 else {})
        model, _ = mtunlearn_ext.unlearn(
            original, tasks=TASKS, train_data=_data(), forget_request=ForgetRequest.create(
                range(8)), shared_parameters=lambda n: not n.startswith("heads."),
            method=method, config=settings, **extra)
        assert model.items.sparse is sparse and model.users.sparse is sparse
        assert original.items.sparse is sparse and original.users.sparse is sparse
        assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
        results[sparse] = model.state_dict()
    changed = [k for k, v in results[True].items() if not torch.equal(v, _Recommender(
        True).state_dict()[k])]
    assert "items.weight" in changed or method == "salun"  # salun moves its salient weights
    for name, value in results[True].items():
        assert torch.equal(value, results[False][name]), name


def test_the_tables_are_sparse_again_after_an_error() -> None:
    model = _Recommender(True)
    with pytest.raises(RuntimeError, match="inside"):
        with dense_embedding_gradients(model):
            assert not model.items.sparse and not model.users.sparse
            raise RuntimeError("inside")
    assert model.items.sparse and model.users.sparse
