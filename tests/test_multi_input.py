"""Several inputs per instance (a tuple or dict of tensors): the row helpers, the data set, the
batches, per-sample gradients, and ``mtunlearn_ext.unlearn`` end to end on a model taking
``(ids, mask)``, which must give exactly what the old packing wrapper gave."""

from __future__ import annotations

import copy
from collections.abc import Callable
import warnings

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import api
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import ForgetRequest, MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.inputs import (
    call_with,
    cat_rows,
    check_inputs,
    describe,
    inputs_to,
    leaves,
    map_leaves,
    num_rows,
    slice_rows,
    take_rows,
)
from mtunlearn_ext.experiment import dataset_fingerprint
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.unlearning.batches import BatchStream, batch_rows, batch_to
from mtunlearn_ext.unlearning.gradients import (
    per_sample_retain_grads_and_losses,
    per_sample_task_grads_and_losses,
)
from mtunlearn_ext.unlearning.interference_aware import _concat_batches

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"topic": "classification", "score": "regression"}
SPECS = [TaskSpec("topic", "classification", num_classes=4), TaskSpec("score", "regression")]
N, L, VOCAB = 80, 6, 30


# -- the row helpers ------------------------------------------------------------------------------


def _structures() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, generator=g)
    b = torch.randint(0, 9, (7, 2, 2), generator=g)
    return {"tensor": a, "tuple": (a, b), "list": [a, b], "dict": {"x": a, "y": b}}


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict"])
def test_row_helpers_apply_the_tensor_operation_to_every_input(kind: str) -> None:
    inputs = _structures()[kind]
    pos = torch.tensor([4, 0, 4, 6])
    assert num_rows(inputs) == check_inputs(inputs, "x") == 7  # type: ignore[arg-type]
    cases = [
        (take_rows(inputs, pos), lambda x: x[pos]),  # type: ignore[arg-type]
        (take_rows(inputs, 2), lambda x: x[2]),  # type: ignore[arg-type]
        (slice_rows(inputs, 2, 5), lambda x: x[2:5]),  # type: ignore[arg-type]
        (inputs_to(inputs, "cpu"), lambda x: x.to("cpu")),  # type: ignore[arg-type]
        (cat_rows([inputs, slice_rows(inputs, 0, 2)]),  # type: ignore[list-item, arg-type]
         lambda x: torch.cat([x, x[:2]])),
        (map_leaves(lambda x: x * 2, inputs), lambda x: x * 2),  # type: ignore[arg-type]
    ]
    for got, op in cases:
        assert type(got) is type(inputs)  # a tuple stays a tuple, a list a list
        want = [op(x) for x in leaves(inputs)]  # type: ignore[arg-type]
        assert len(leaves(got)) == len(want)
        assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(leaves(got), want))
    if kind == "dict":
        assert list(take_rows(inputs, pos)) == ["x", "y"]  # type: ignore[arg-type]


def test_call_with_unpacks_and_describe_names_the_shapes() -> None:
    def f(*args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[int, list[str]]:
        return len(args), sorted(kwargs)

    s = _structures()
    assert call_with(f, s["tensor"]) == (1, [])  # type: ignore[arg-type]
    assert call_with(f, s["tuple"]) == (2, [])  # type: ignore[arg-type]
    assert call_with(f, s["list"]) == (2, [])  # type: ignore[arg-type]
    assert call_with(f, s["dict"]) == (0, ["x", "y"])  # type: ignore[arg-type]
    assert describe(s["tensor"]) == "shape (7, 3)"  # type: ignore[arg-type]
    assert describe(s["tuple"]) == "(shape (7, 3) float32, shape (7, 2, 2) int64)"  # type: ignore[arg-type]
    assert describe(s["dict"]) == "{'x': shape (7, 3) float32, 'y': shape (7, 2, 2) int64}"  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, error, message", [
    ((torch.zeros(4, 2), torch.zeros(5)), ValueError,
     r"`inputs`: every input needs one row per instance \(the same leading size\), got "
     r"leading sizes \[0\]: 4, \[1\]: 5"),
    ({"ids": torch.zeros(3), "mask": torch.zeros(2, 1)}, ValueError,
     r"`inputs`: every input .* got leading sizes \['ids'\]: 3, \['mask'\]: 2"),
    ((), ValueError, r"`inputs` must hold at least one tensor, got an empty tuple"),
    ({}, ValueError, r"`inputs` must hold at least one tensor, got an empty dict"),
    ((torch.zeros(3), [1, 2, 3]), TypeError,
     r"`inputs`\[1\] must be a tensor \(nested structures are not supported\), got list"),
    ({"a": torch.zeros(3), "b": 1.0}, TypeError, r"`inputs`\['b'\] must be a tensor"),
    ((torch.zeros(3), torch.tensor(1.0)), ValueError,
     r"`inputs`\[1\] must have a leading instance dimension \[N, \.\.\.\], got a "
     r"0-dimensional tensor"),
    (torch.tensor(2.0), ValueError, r"`inputs` must have a leading instance dimension"),
    ({0: torch.zeros(3)}, TypeError, r"`inputs` must have string keys"),
    ([[1, 2], [3, 4]], TypeError, r"`inputs`\[0\] must be a tensor"),
    ("tokens", TypeError, r"`inputs` must be a tensor, a tuple or list of tensors, or a dict "
                          r"str -> tensor, got str"),
])
def test_check_inputs_names_the_argument(bad: object, error: type[Exception],
                                         message: str) -> None:
    with pytest.raises(error, match=message):
        check_inputs(bad, "`inputs`")
    with pytest.raises(error, match=message.replace("`inputs`", "MultiTaskDataset: `inputs`", 1)):
        MultiTaskDataset(bad, {"score": torch.zeros(3, 1)}, [SPECS[1]])  # type: ignore[arg-type]


def test_cat_rows_refuses_parts_of_different_structures() -> None:
    a, b = torch.zeros(2, 3), torch.zeros(2, 1)
    with pytest.raises(ValueError, match=r"every part needs the keys \['x', 'y'\]"):
        cat_rows([{"x": a, "y": b}, {"x": a}])
    with pytest.raises(ValueError, match=r"every part needs 2 inputs"):
        cat_rows([(a, b), (a,)])
    with pytest.raises(TypeError, match=r"the parts mix structures"):
        cat_rows([a, (a, b)])


# -- data set and batches -------------------------------------------------------------------------


def _text_data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                   dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, L), generator=g)
    mask = torch.rand(n, L, generator=g) > 0.3
    mask[:, 0] = True
    labels = {"topic": torch.randint(0, 4, (n,), generator=g),
              "score": torch.randn(n, 1, generator=g)}
    return ids, mask, labels


def _as_kind(kind: str, ids: torch.Tensor, mask: torch.Tensor) -> object:
    return (ids, mask) if kind == "tuple" else {"ids": ids, "mask": mask}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_dataset_with_several_inputs(kind: str) -> None:
    ids, mask, labels = _text_data(12)
    values = torch.randn(12, 3)
    inputs = (ids, values) if kind == "tuple" else {"ids": ids, "values": values}
    data = MultiTaskDataset(inputs, labels, SPECS, ids=torch.arange(100, 112))  # type: ignore[arg-type]
    assert len(data) == 12
    pos = torch.tensor([5, 1, 7])
    batch = data.batch(pos)
    assert type(batch["input"]) is type(inputs)
    assert all(torch.equal(got, x[pos]) for got, x in zip(leaves(batch["input"]), (ids, values)))  # type: ignore[arg-type]
    assert torch.equal(batch["id"], torch.tensor([105, 101, 107]))  # type: ignore[arg-type]
    item = data[3]
    assert all(torch.equal(got, x[3]) for got, x in zip(leaves(item["input"]), (ids, values)))  # type: ignore[arg-type]
    sub = data.subset([2, 9])
    assert len(sub) == 2 and sub.ids.tolist() == [102, 109]
    assert all(torch.equal(got, x[[2, 9]]) for got, x in zip(leaves(sub.inputs), (ids, values)))
    everything = data.subset(torch.arange(12))  # every row in order: shared, not copied
    assert all(a is b for a, b in zip(leaves(everything.inputs), leaves(data.inputs)))
    data.check_values("clean set")
    # The default collate function batches items into the same layout (a tuple as a list).
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    first = next(iter(loader))
    assert all(torch.equal(got, x[:4]) for got, x in zip(leaves(first["input"]), (ids, values)))

    values[7, 2] = float("nan")  # a float input: named with row and id
    path = r"\[1\]" if kind == "tuple" else r"\['values'\]"
    with pytest.raises(ValueError, match=rf"test set: the inputs{path} hold NaN or Inf in 1 rows "
                                         r"\(first: row 7, id 107\)"):
        data.check_values("test set")
    values[7, 2] = 0.0
    ids[3, 0] = torch.iinfo(ids.dtype).max  # integer inputs (token ids, masks) are not checked
    data.check_values("test set")


def test_dataset_inputs_must_match_the_targets_rows() -> None:
    ids, mask, labels = _text_data(12)
    with pytest.raises(ValueError, match=r"targets\['topic'\] has 12 rows, inputs have 11"):
        MultiTaskDataset((ids[:11], mask[:11]), labels, SPECS)


def test_batches_slice_concat_and_move_every_input() -> None:
    ids, mask, labels = _text_data(10)
    data = MultiTaskDataset({"ids": ids, "mask": mask}, labels, SPECS)
    batch = data.batch(torch.arange(10))
    part = batch_rows(batch, 2, 5)
    assert torch.equal(part["input"]["ids"], ids[2:5]) and torch.equal(part["input"]["mask"], mask[2:5])  # type: ignore[index]
    joined = _concat_batches(batch_rows(batch, 0, 3), batch_rows(batch, 6, 8))
    assert torch.equal(joined["input"]["mask"], torch.cat([mask[:3], mask[6:8]]))  # type: ignore[index]
    assert torch.equal(joined["id"], torch.tensor([0, 1, 2, 6, 7]))  # type: ignore[arg-type]
    moved = batch_to(batch, "cpu")
    assert torch.equal(moved["input"]["ids"], ids)  # type: ignore[index]
    tuple_data = MultiTaskDataset((ids, mask), labels, SPECS)
    tuple_batch = tuple_data.batch(torch.arange(10))
    joined = _concat_batches(batch_rows(tuple_batch, 0, 3), batch_rows(tuple_batch, 6, 8))
    assert isinstance(joined["input"], tuple)
    assert torch.equal(joined["input"][0], torch.cat([ids[:3], ids[6:8]]))
    # Every input moves with the batch (the meta device stands in for an accelerator here);
    # training moves its batches with the same function.
    moved = batch_to(tuple_batch, "meta")
    assert isinstance(moved["input"], tuple)
    assert [x.device.type for x in moved["input"]] == ["meta", "meta"]
    assert [x.dtype for x in moved["input"]] == [torch.int64, torch.bool]
    stream = BatchStream(tuple_data, 4, torch.Generator().manual_seed(0))
    drawn = stream.next()
    rows = drawn["id"]
    assert torch.equal(drawn["input"][0], ids[rows]) and torch.equal(drawn["input"][1], mask[rows])  # type: ignore[index]


def test_dataset_fingerprint_covers_every_input() -> None:
    ids, mask, labels = _text_data(10)
    base = dataset_fingerprint(MultiTaskDataset((ids, mask), labels, SPECS))
    assert base == dataset_fingerprint(MultiTaskDataset((ids.clone(), mask.clone()), labels, SPECS))
    changed = mask.clone()
    changed[4, 3] = ~changed[4, 3]
    assert base != dataset_fingerprint(MultiTaskDataset((ids, changed), labels, SPECS))
    assert base != dataset_fingerprint(MultiTaskDataset({"ids": ids, "mask": mask}, labels, SPECS))


# -- models ---------------------------------------------------------------------------------------


class TokensAndMask(nn.Module):
    """A user's text model taking ``(ids, mask)``: embedding, masked mean, a BatchNorm'd linear
    layer (running statistics to recompute) and two heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.ModuleDict({"embed": nn.Embedding(VOCAB, 8),
                                    "mix": nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16),
                                                         nn.Tanh())})
        self.heads = nn.ModuleDict({"topic": nn.Linear(16, 4), "score": nn.Linear(16, 1)})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        m = mask.unsqueeze(-1).to(self.heads["score"].weight.dtype)
        pooled = (self.trunk["embed"](ids) * m).sum(1) / m.sum(1).clamp(min=1)
        z = self.trunk["mix"](pooled)
        return {t: h(z) for t, h in self.heads.items()}


class Packed(nn.Module):
    """The packing wrapper users had to write before: one ``[N, 2, L]`` long tensor in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(packed[:, 0], packed[:, 1].bool())


def _fresh() -> TokensAndMask:
    torch.manual_seed(1)
    return TokensAndMask()


@pytest.fixture(scope="module")
def text_setup():  # type: ignore[no-untyped-def]
    """A model fitted (memorising a little) on ``(ids, mask)`` data, and unseen data."""
    ids, mask, labels = _text_data()
    model = _fresh()
    optimizer = torch.optim.Adam(model.parameters(), 2e-2)
    for _ in range(120):
        out = model(ids, mask)
        loss = nn.functional.cross_entropy(out["topic"], labels["topic"]) + \
            ((out["score"] - labels["score"]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, ids, mask, labels, _text_data(24, seed=5)


def _packed_state(packed: nn.Module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in packed.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# -- per-sample gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_per_sample_gradients_of_a_two_input_model_match_a_loop(text_setup, kind: str) -> None:  # type: ignore[no-untyped-def]
    model, ids, mask, labels, _ = text_setup
    model = copy.deepcopy(model).double()
    rows = 9
    float_mask = mask[:rows].double()  # a float mask: it must reach the model row by row too
    supervision = torch.ones(rows, 2, dtype=torch.bool)
    supervision[[1, 4], 0] = False
    supervision[6, 1] = False
    data = MultiTaskDataset(_as_kind(kind, ids[:rows], float_mask),  # type: ignore[arg-type]
                            {"topic": labels["topic"][:rows],
                             "score": labels["score"][:rows].double()}, SPECS,
                            supervision=supervision)
    problem = build_problem(model, tasks=SPECS, train_data=data,
                            forget_request=ForgetRequest.create([0], ["topic"]),
                            shared_parameters=lambda n: n.startswith("trunk."))
    wrapped = problem.model
    # The wrapper build_problem hands out is public, as docs/unlearning.md says.
    assert isinstance(wrapped, api.SplitModel) and "SplitModel" in api.__all__
    assert wrapped.module is model
    names = [n for n, _ in wrapped.named_parameters()]
    batch = data.batch(torch.arange(rows))
    grads, losses = per_sample_retain_grads_and_losses(wrapped, batch, SPECS, names)
    task_grads, _ = per_sample_task_grads_and_losses(wrapped, batch, SPECS, names)
    for chunk_size in (1, 2, 4, 9, 20):  # rows written chunk by chunk: the same rows
        chunked, chunked_losses = per_sample_retain_grads_and_losses(wrapped, batch, SPECS, names,
                                                                     chunk_size=chunk_size)
        chunked_task, _ = per_sample_task_grads_and_losses(wrapped, batch, SPECS, names,
                                                           chunk_size=chunk_size)
        for got, want in zip([*chunked, *chunked_task, *chunked_losses.values()],
                             [*grads, *task_grads, *losses.values()]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    params = list(wrapped.parameters())
    for i in range(rows):
        out = model(ids[i:i + 1], float_mask[i:i + 1])
        terms = [task_loss(spec, out[spec.name], batch["targets"][spec.name][i:i + 1])[0]  # type: ignore[index]
                 * supervision[i, c] for c, spec in enumerate(SPECS)]
        want = torch.autograd.grad(sum(terms), params, retain_graph=True)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g[i], w, rtol=1e-12, atol=1e-12)
        for c, spec in enumerate(SPECS):
            assert float(losses[spec.name][i]) == pytest.approx(float(terms[c].detach()), rel=1e-12,
                                                                    abs=1e-12)
            want_t = torch.autograd.grad(terms[c], params, retain_graph=True, allow_unused=True)
            for g, w in zip(task_grads, want_t):
                torch.testing.assert_close(g[i, c], torch.zeros_like(g[i, c]) if w is None else w,
                                           rtol=1e-12, atol=1e-12)


# -- unlearn end to end ---------------------------------------------------------------------------


Text = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _unlearn_both(model: nn.Module, kind: str, train: Text, data: dict[str, Text] | None = None,
                  **kwargs: object) -> tuple[tuple[nn.Module, object], tuple[nn.Module, object]]:
    """The same request natively (``kind`` inputs) and through :class:`Packed`; ``train`` and
    the sets in ``data`` (argument name -> ``(ids, mask, labels)``) laid out for each."""
    sets = {"train_data": train, **(data or {})}
    native = mtunlearn_ext.unlearn(
        model, tasks=TASKS, shared_parameters=lambda n: n.startswith("trunk."),
        **{k: (_as_kind(kind, i, m), y) for k, (i, m, y) in sets.items()}, **kwargs)  # type: ignore[arg-type]
    if "fresh_model" in kwargs:
        fresh = kwargs["fresh_model"]
        assert callable(fresh)
        kwargs = {**kwargs, "fresh_model": lambda: Packed(fresh())}
    packed = mtunlearn_ext.unlearn(
        Packed(model), tasks=TASKS, shared_parameters=lambda n: n.startswith("model.trunk."),
        **{k: (torch.stack([i, m.long()], dim=1), y) for k, (i, m, y) in sets.items()},
        **kwargs)  # type: ignore[arg-type]
    return native, packed


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("method", ["interference_aware", "neggrad_plus", "orthograd"])
@pytest.mark.parametrize("full", [True, False])
def test_unlearn_on_a_two_input_model_equals_the_packing_wrapper(text_setup, kind: str,
                                                                 method: str, full: bool) -> None:  # type: ignore[no-untyped-def]
    model, ids, mask, labels, (u_ids, u_mask, u_labels) = text_setup
    before = copy.deepcopy(model.state_dict())
    request = ForgetRequest.create(range(8), None if full else ["topic"])
    config: dict[str, object] = {"steps": 6, "lr": 2e-2, "forget_batch_size": 8,
                                 "retain_batch_size": 16}
    if method == "interference_aware":  # the cap from unseen data's losses: held-out inputs
        config.update(num_per_sample=8, num_coupled_per_sample=4, cap_reference="held_out")
    if method == "orthograd":  # fewer per-sample rows than the retain batch: a cut of each input
        config.update(num_per_sample=4)
    # Only interference_aware reads the held-out inputs; the baselines get them too (the same
    # call for every method), and unlearn says they were not used.
    data = {"held_out_data": (u_ids, u_mask, u_labels)} if method == "interference_aware" else {}
    (new, report), (packed, packed_report) = _unlearn_both(
        model, kind, (ids, mask, labels), data,
        forget_request=request, method=method, config=config, seed=2)
    assert type(new) is TokensAndMask and new is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    summary = report.extra["summary"]  # type: ignore[attr-defined]
    assert summary["forget_loss_after"]["topic"] > summary["forget_loss_before"]["topic"]
    assert ("score" in summary["forget_loss_after"]) == full
    # The packing wrapper computed the same arithmetic on the same rows: the same weights.
    _assert_same_state(new.state_dict(), _packed_state(packed))
    assert summary == packed_report.extra["summary"]  # type: ignore[attr-defined]


def test_unlearn_names_badly_laid_out_inputs(text_setup) -> None:  # type: ignore[no-untyped-def]
    model, ids, mask, labels, _ = text_setup
    with pytest.raises(TypeError, match=r"`train_data`\[1\] must be the targets, a mapping task "
                                        r"-> \[N, \.\.\.\] tensor, got Tensor; several inputs "
                                        r"go in one tuple or dict: \(\(ids, mask\), targets\)"):
        mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=(ids, mask, labels),  # type: ignore[arg-type]
                              forget_request=ForgetRequest.create(range(4)),
                              shared_parameters=lambda n: n.startswith("trunk."))
    with pytest.raises(ValueError, match=r"the inputs of `train_data`: every input needs one row "
                                         r"per instance"):
        mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=((ids, mask[:-1]), labels),
                              forget_request=ForgetRequest.create(range(4)),
                              shared_parameters=lambda n: n.startswith("trunk."))
    with pytest.raises(ValueError, match=r"the model fails on the retain set's inputs \(a batch of "
                                         r"\{'ids': shape \(\d+, 6\) int64, 'tokens': shape "
                                         r"\(\d+, 6\) bool\}\): TypeError"):
        mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=({"ids": ids, "tokens": mask}, labels),
                              forget_request=ForgetRequest.create(range(4)),
                              shared_parameters=lambda n: n.startswith("trunk."))


def test_retrain_on_a_two_input_model_equals_the_packing_wrapper(text_setup) -> None:  # type: ignore[no-untyped-def]
    model, ids, mask, labels, _ = text_setup
    fresh: Callable[[], nn.Module] = _fresh
    (new, report), (packed, packed_report) = _unlearn_both(
        model, "tuple", (ids, mask, labels),
        forget_request=ForgetRequest.create(range(8), ["topic"]), method="retrain",
        fresh_model=fresh, train_config={"epochs": 3, "lr": 1e-2, "seed": 0})
    assert type(new) is TokensAndMask
    summary = report.extra["summary"]  # type: ignore[attr-defined]
    assert summary["forget_loss_after"]["topic"] > summary["forget_loss_before"]["topic"]
    assert not torch.equal(new.trunk["embed"].weight, model.trunk["embed"].weight)
    _assert_same_state(new.state_dict(), _packed_state(packed))
    assert summary == packed_report.extra["summary"]  # type: ignore[attr-defined]


def test_audit_data_with_several_inputs(text_setup) -> None:  # type: ignore[no-untyped-def]
    model, ids, mask, labels, (u_ids, u_mask, u_labels) = text_setup
    config = {"steps": 4, "lr": 2e-2}
    (new, report), (packed, packed_report) = _unlearn_both(
        model, "tuple", (ids, mask, labels), {"audit_data": (u_ids, u_mask, u_labels)},
        forget_request=ForgetRequest.create(range(8)), config=config)
    summary = report.extra["summary"]  # type: ignore[attr-defined]
    assert summary == packed_report.extra["summary"]  # type: ignore[attr-defined]
    _assert_same_state(new.state_dict(), _packed_state(packed))
    for key in ("forget_mia_auc_before", "forget_mia_auc_after", "member_mia_auc_before",
                "member_mia_auc_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["forget_loss_after"]["topic"] > summary["forget_loss_before"]["topic"]
    with pytest.raises(ValueError, match=r"`audit_data` needs at least 8 instances"):
        mtunlearn_ext.unlearn(model, tasks=TASKS, train_data=((ids, mask), labels),
                              forget_request=ForgetRequest.create(range(8)), config=config,
                              shared_parameters=lambda n: n.startswith("trunk."),
                              audit_data=((u_ids[:5], u_mask[:5]),
                                          {k: v[:5] for k, v in u_labels.items()}))


def test_forget_rows_equal_to_retain_rows_are_refused_on_every_input(text_setup) -> None:  # type: ignore[no-untyped-def]
    model, ids, mask, labels, _ = text_setup
    common = dict(tasks=TASKS, shared_parameters=lambda n: n.startswith("trunk."),
                  config={"steps": 1}, target_tasks="topic")
    forget_mask = mask[:10].clone()
    forget_mask[:, 1:5] = torch.tensor([False, True, True, False])
    forget = ((ids[:10], forget_mask), {"topic": labels["topic"][:10]})
    same_mask = mask.clone()
    same_mask[:10] = forget_mask
    with pytest.raises(ValueError, match=r"`forget_data` row 0 is also `retain_data` row 0 "
                                         r"\(same input\), which still supervises task 'topic'"):
        mtunlearn_ext.unlearn(model, forget_data=forget, retain_data=((ids, same_mask), labels),  # type: ignore[arg-type]
                              **common)
    # Equal token ids under another mask are another input: nothing to refuse. (The masks have
    # the same sum, first and last values, so only the exact comparison tells them apart.)
    other_mask = mask.clone()
    other_mask[:10, 1:5] = torch.tensor([True, False, False, True])
    with pytest.warns(UserWarning, match=r"no retained pair of the forget instances"):
        _, report = mtunlearn_ext.unlearn(model, forget_data=forget,  # type: ignore[arg-type]
                                          retain_data=((ids, other_mask), labels), **common)
    assert report.request["target_tasks"] == ["topic"]
    # Dict inputs, the forget rows' topic labels taken out of the retain data: a partial request,
    # each forget row linked to the retain row with both its inputs (its retained pair is
    # protected; none is when one input differs, above).
    supervision = torch.ones(N, 2, dtype=torch.bool)
    supervision[:10, 0] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, report = mtunlearn_ext.unlearn(
            model, forget_data=({"ids": ids[:10], "mask": mask[:10]},  # type: ignore[arg-type]
                                {"topic": labels["topic"][:10]}),
            retain_data=({"ids": ids, "mask": mask}, labels, supervision), **common)
    assert not report.request["full"]
    assert report.extra["interference_aware"]["coupled_instances"] == 10
