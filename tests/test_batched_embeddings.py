"""Embedding tables in the per-sample pass: ``nn.EmbeddingBag`` (no vmap batching rule: torch
ran it once per instance and warned) and ``max_norm`` tables (in-place renormalisation, which
vmap refused) run forwards that vmap batches, with torch's values and per-sample gradients."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.models.batched_embeddings import batchable_embeddings
from mtunlearn_ext.unlearning.gradients import per_sample_retain_grads_and_losses

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 3
_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _bag_cases() -> list[tuple[str, int | None, bool, float | None, bool]]:
    cases = []
    for mode, padding_idx, weighted, max_norm, by_freq in itertools.product(
            ("sum", "mean", "max"), (None, PAD), (False, True), (None, 1.5), (False, True)):
        # torch takes per-sample weights in sum mode only, and no frequency scaling with max
        if (weighted and mode != "sum") or (by_freq and mode == "max"):
            continue
        cases.append((mode, padding_idx, weighted, max_norm, by_freq))
    return cases


def _bags(n: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (n, length), generator=g)
    ids[0] = PAD  # with padding_idx an empty bag; without it one id repeated (tied maxima)
    ids[1, :2] = PAD
    return ids


def _per_sample_against_torch(module: nn.Module, inputs: torch.Tensor,
                              extra: torch.Tensor | None = None, batched: bool = True) -> None:
    """vmap(grad) of one instance's loss inside ``batchable_embeddings`` against torch's own
    module run instance by instance (each on a fresh copy of the weight, which a ``max_norm``
    forward renormalises in place), float64, values and gradients."""
    weights = torch.arange(1, module.embedding_dim + 1, dtype=torch.float64)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor | None
             ) -> torch.Tensor:
        kwargs = {} if w is None else {"per_sample_weights": w.unsqueeze(0)}
        return (functional_call(module, p, (x.unsqueeze(0),), kwargs) * weights).sin().sum()

    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    want_grads, want_losses = [], []
    for i in range(inputs.shape[0]):
        fresh = {k: v.clone().requires_grad_() for k, v in params.items()}
        value = loss(fresh, inputs[i], None if extra is None else extra[i])
        want_grads.append(torch.autograd.grad(value, fresh["weight"])[0])
        want_losses.append(value.detach())
    with batchable_embeddings(module), warnings.catch_warnings(record=True) as seen:
        # torch's per-instance fallback warns: only where torch's forward is kept
        warnings.simplefilter("always" if not batched else "error")
        got = vmap(grad(loss, has_aux=False), in_dims=(None, 0, None if extra is None else 0))(
            params, inputs, extra)["weight"]
    assert batched or any("performance drop" in str(w.message) for w in seen)
    with batchable_embeddings(module), warnings.catch_warnings():
        warnings.simplefilter("ignore" if not batched else "error")
        with torch.no_grad():
            losses = vmap(loss, in_dims=(None, 0, None if extra is None else 0))(
                params, inputs, extra)
    assert torch.equal(params["weight"], dict(module.named_parameters())["weight"])
    torch.testing.assert_close(got, torch.stack(want_grads), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, torch.stack(want_losses), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode, padding_idx, weighted, max_norm, by_freq", _bag_cases())
def test_a_bag_batches_with_torchs_values_and_gradients(
        mode: str, padding_idx: int | None, weighted: bool, max_norm: float | None,
        by_freq: bool) -> None:
    torch.manual_seed(0)
    module = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx, max_norm=max_norm,
                             scale_grad_by_freq=by_freq).double()
    inputs = _bags(6, 5)
    extra = torch.rand(6, 5, dtype=torch.float64) if weighted else None
    if by_freq and max_norm is not None and _TORCH < (2, 14):
        pytest.skip("torch before 2.14 scales an embedding bag's frequencies wrongly (ids "
                    "[1, 1, 2, 3] give row 2 half its gradient), and with max_norm its own "
                    "forward cannot run under vmap: the batched forward follows 2.14")
    # Frequency scaling without max_norm keeps torch's forward (2.13 scales it differently).
    _per_sample_against_torch(module, inputs, extra,
                              batched=not (by_freq and max_norm is None))


@pytest.mark.parametrize("padding_idx, by_freq", [(None, False), (PAD, False), (None, True)])
def test_a_max_norm_table_batches_with_torchs_values_and_gradients(
        padding_idx: int | None, by_freq: bool) -> None:
    torch.manual_seed(0)
    module = nn.Embedding(10, 4, padding_idx=padding_idx, max_norm=1.0,
                          scale_grad_by_freq=by_freq).double()
    _per_sample_against_torch(module, _bags(6, 5))


def test_bags_given_by_offsets_or_of_length_zero_keep_torchs_forward() -> None:
    torch.manual_seed(0)
    module = nn.EmbeddingBag(10, 4, mode="mean")
    flat, offsets = torch.tensor([1, 2, 4, 5, 6]), torch.tensor([0, 2])
    empty = torch.zeros(3, 0, dtype=torch.long)
    want = module(flat, offsets)
    with pytest.raises(RuntimeError) as torchs:
        module(empty)
    with batchable_embeddings(module):
        assert "forward" in vars(module)
        assert torch.equal(module(flat, offsets), want)
        with pytest.raises(RuntimeError) as ours:
            module(empty)
    assert str(ours.value) == str(torchs.value)


def test_each_module_has_its_own_forward_back_also_after_an_error() -> None:
    plain, bag, renormed = nn.Embedding(5, 2), nn.EmbeddingBag(5, 2), nn.Embedding(5, 2,
                                                                                  max_norm=1.0)
    patched = nn.EmbeddingBag(5, 2)
    own = patched.forward
    patched.forward = own  # type: ignore[method-assign]  # a user's instance attribute
    model = nn.ModuleList([plain, bag, renormed, patched])
    with pytest.raises(RuntimeError, match="inside"):
        with batchable_embeddings(model):
            assert "forward" not in vars(plain)
            assert all(vars(m)["forward"] is not own for m in (bag, renormed, patched))
            raise RuntimeError("inside")
    assert "forward" not in vars(bag) and "forward" not in vars(renormed)
    assert vars(patched)["forward"] is own


# -- in the method's per-sample pass ----------------------------------------------------------

SPECS = [TaskSpec("click", "classification", num_classes=2), TaskSpec("watch", "regression")]


class _Recommender(nn.Module):
    """A user's bag of watched items (mean, 0 = no item), a category table renormalised to
    unit norm and a mixing trunk."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.history = nn.EmbeddingBag(40, 6, mode="mean", padding_idx=0)
        self.category = nn.Embedding(12, 6, max_norm=1.0)
        self.trunk = nn.Linear(12, 12)
        self.heads = nn.ModuleDict({"click": nn.Linear(12, 2), "watch": nn.Linear(12, 1)})

    def forward(self, history: torch.Tensor, category: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        z = torch.tanh(self.trunk(torch.cat([self.history(history),
                                             self.category(category)], 1)))
        return {t: h(z) for t, h in self.heads.items()}


def _data(n: int = 40) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, 40, (n, 7), generator=g)
    history[:, 4:] *= torch.rand(n, 3, generator=g) < 0.5  # padded tails
    category = torch.randint(0, 12, (n,), generator=g)
    return (history, category), {"click": torch.randint(0, 2, (n,), generator=g),
                                 "watch": torch.randn(n, 1, generator=g)}


def test_per_sample_gradients_of_a_recommender_match_a_loop_without_a_fallback() -> None:
    inputs, labels = _data()
    model = _Recommender().double()
    with torch.no_grad():  # rows above the norm, so that the renormalisation does something
        model.category.weight.mul_(3.0)
    data = MultiTaskDataset(inputs, labels, SPECS)
    problem = build_problem(model, tasks=SPECS, train_data=data,
                            forget_request=ForgetRequest.create([0]),
                            shared_parameters=lambda n: not n.startswith("heads."))
    wrapped = problem.model
    batch = data.batch(torch.arange(16))
    names = [n for n, _ in wrapped.named_parameters()]
    before = model.category.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads, losses = per_sample_retain_grads_and_losses(wrapped, batch, SPECS, names)
    assert torch.equal(model.category.weight, before)
    batch_inputs, targets = batch["input"], batch["targets"]
    assert isinstance(batch_inputs, tuple) and isinstance(targets, dict)
    for i in range(16):
        copy = _Recommender().double()
        copy.load_state_dict(model.state_dict())
        out = copy(*(x[i:i + 1] for x in batch_inputs))
        terms = [task_loss(s, out[s.name], targets[s.name][i:i + 1])[0] for s in SPECS]
        want = torch.autograd.grad(sum(terms), list(copy.parameters()))
        for name, g, w in zip(names, grads, want, strict=True):
            torch.testing.assert_close(g[i], w, rtol=0, atol=1e-12, msg=name)
        for s, term in zip(SPECS, terms):
            assert float(losses[s.name][i]) == pytest.approx(float(term.detach()), rel=1e-12)


@pytest.mark.parametrize("method", ["interference_aware", "orthograd"])
@pytest.mark.parametrize("targets", [None, ["click"]])
def test_unlearn_runs_on_bags_and_max_norm_tables(method: str, targets: list[str] | None
                                                  ) -> None:
    original = _Recommender()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, report = mtunlearn_ext.unlearn(
            original, tasks={"click": "classification", "watch": "regression"},
            train_data=_data(), forget_request=ForgetRequest.create(range(6), targets),
            shared_parameters=lambda n: not n.startswith("heads."), method=method,
            config={"steps": 3})
    assert "forward" not in vars(model.history) and "forward" not in vars(model.category)
    assert not torch.equal(model.history.weight, original.history.weight)
    assert report.method == method
