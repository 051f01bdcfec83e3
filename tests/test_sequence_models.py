"""Sequence models (token ids and a padding mask in, per-sequence and per-token outputs): the
per-sample pass on PyTorch's own ``nn.TransformerEncoder`` (whose eval-mode fast path vmap
cannot batch), a forward vmap cannot batch named with the ways out, and the layout hints for
per-token outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import ForgetRequest, MultiTaskDataset, TaskSpec
from mtunlearn_ext.losses import task_loss
from mtunlearn_ext.unlearning.gradients import per_sample_retain_grads_and_losses

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # torch's notes: nested tensors are a prototype (the encoder's eval passes outside vmap);
    # attention under vmap runs through torch's per-sample fallback loop (correct, slower)
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
]

N, L, VOCAB, D = 12, 6, 20, 8
SPECS = [TaskSpec("sent", "classification", num_classes=3),
         TaskSpec("tag", "segmentation", num_classes=4, ignore_index=-1)]


class Encoder(nn.Module):
    """Embeddings, PyTorch's ``nn.TransformerEncoder`` with its defaults (nested tensors on, so
    in eval mode with a padding mask it takes the fast path), a sentence head on the mean of
    the real tokens and a tagging head laid out ``[B, C, L, 1]``. ``trim``: the forward cuts
    the batch to its longest sequence (``int(...)`` of a tensor: data-dependent). ``per_token``:
    the tagging head's logits as they come, ``[B, L, C]``."""

    def __init__(self, trim: bool = False, per_token: bool = False) -> None:
        super().__init__()
        self.trim, self.per_token = trim, per_token
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on nested tensors
            self.encoder = nn.TransformerEncoder(layer, 1)
        self.heads = nn.ModuleDict({"sent": nn.Linear(D, 3), "tag": nn.Linear(D, 4)})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        length = input_ids.shape[1]
        if self.trim:
            n = int(attention_mask.sum(1).max())
            input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=~attention_mask)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        tag = self.heads["tag"](h)  # [B, L, C]
        if not self.per_token:
            tag = tag.transpose(1, 2).unsqueeze(-1)  # [B, C, L, 1]
            tag = nn.functional.pad(tag, (0, 0, 0, length - tag.shape[2]))
        return {"sent": self.heads["sent"](pooled), "tag": tag}


def _text() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Padded token ids with their mask (every row shorter than ``L``: the trimming forward
    really trims), a sentence label and per-token tags ``[N, L, 1]`` (-1 on padding)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, L, (N,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(1, VOCAB, (N, L), generator=g).masked_fill(~mask, 0)
    tags = torch.randint(0, 4, (N, L), generator=g).masked_fill(~mask, -1)
    labels = {"sent": torch.randint(0, 3, (N,), generator=g), "tag": tags.unsqueeze(-1)}
    return {"input_ids": ids, "attention_mask": mask}, labels


def _model(trim: bool = False, per_token: bool = False) -> Encoder:
    torch.manual_seed(0)
    return Encoder(trim, per_token).eval()


def _batch_and_wrapped(model: nn.Module) -> tuple[dict[str, object], nn.Module]:
    inputs, labels = _text()
    data = MultiTaskDataset(inputs, labels, SPECS)  # type: ignore[arg-type]
    problem = build_problem(model, tasks=SPECS, train_data=data,
                            forget_request=ForgetRequest.create([0], ["tag"]),
                            shared_parameters=lambda n: not n.startswith("heads."))
    return data.batch(torch.arange(N)), problem.model


# -- the MHA fast path ----------------------------------------------------------------------------


def test_per_sample_gradients_of_a_default_transformer_encoder_match_a_loop() -> None:
    # In eval mode with a padding mask the encoder's fast path packs the batch into a nested
    # tensor, which vmap cannot batch; the pass turns that path off and restores it after.
    model = _model()
    batch, wrapped = _batch_and_wrapped(model)
    names = [n for n, _ in wrapped.named_parameters()]
    assert torch.backends.mha.get_fastpath_enabled()
    grads, losses = per_sample_retain_grads_and_losses(wrapped, batch, SPECS, names)
    assert torch.backends.mha.get_fastpath_enabled()
    inputs, targets = batch["input"], batch["targets"]
    assert isinstance(inputs, dict) and isinstance(targets, dict)
    params = list(wrapped.parameters())
    for i in range(N):
        out = model(inputs["input_ids"][i:i + 1], inputs["attention_mask"][i:i + 1])
        terms = [task_loss(s, out[s.name], targets[s.name][i:i + 1])[0] for s in SPECS]
        want = torch.autograd.grad(sum(terms), params)
        for g, w in zip(grads, want):
            torch.testing.assert_close(g[i], w, rtol=1e-4, atol=1e-6)
        for s, term in zip(SPECS, terms):
            assert float(losses[s.name][i]) == pytest.approx(float(term.detach()), rel=1e-5)


def test_the_pass_leaves_the_fast_path_setting_as_it_found_it() -> None:
    batch, wrapped = _batch_and_wrapped(_model())
    names = [n for n, _ in wrapped.named_parameters()]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        per_sample_retain_grads_and_losses(wrapped, batch, SPECS, names)
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_unlearn_runs_on_a_default_transformer_encoder() -> None:
    inputs, labels = _text()
    _, report = mtunlearn_ext.unlearn(
        _model(), tasks=SPECS, train_data=(inputs, labels),
        forget_request=ForgetRequest.create(range(3), ["tag"]),
        shared_parameters=lambda n: not n.startswith("heads."), config={"steps": 2})
    assert report.extra["summary"]["forget_loss_after"]["tag"] > 0
    assert torch.backends.mha.get_fastpath_enabled()


# -- a forward vmap cannot batch ------------------------------------------------------------------


def test_a_forward_vmap_cannot_batch_is_named_with_the_ways_out() -> None:
    batch, wrapped = _batch_and_wrapped(_model(trim=True))
    names = [n for n, _ in wrapped.named_parameters()]
    with pytest.raises(RuntimeError) as caught:
        per_sample_retain_grads_and_losses(wrapped, batch, SPECS, names)
    message = str(caught.value)
    assert message.startswith("per_sample_retain_grads_and_losses: the per-sample gradient step "
                              "runs the model under torch.func.vmap, one instance at a time")
    assert "calling .item() on a Tensor" in message  # torch's first sentence
    assert "data-dependent shapes" in message and "in-place writes into the inputs" in message
    assert 'instance_projection="off"' in message and "vmap-friendly" in message
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert str(caught.value.__cause__).startswith("vmap: It looks like you're")
    assert torch.backends.mha.get_fastpath_enabled()  # restored on the error too


def test_instance_projection_off_runs_a_forward_vmap_cannot_batch() -> None:
    # The way out the error names: without the per-sample step nothing runs under vmap.
    inputs, labels = _text()
    _, report = mtunlearn_ext.unlearn(
        _model(trim=True), tasks=SPECS, train_data=(inputs, labels),
        forget_request=ForgetRequest.create(range(3), ["tag"]),
        shared_parameters=lambda n: not n.startswith("heads."),
        config={"steps": 2, "instance_projection": "off"})
    assert report.extra["summary"]["forget_loss_after"]["tag"] > 0


class _Recurrent(nn.Module):
    """A GRU trunk: torch's fused kernel fails under vmap with a shape error that names no
    vmap, as no refusal of torch's does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.rnn = nn.GRU(D, D, batch_first=True)
        self.heads = nn.ModuleDict({"topic": nn.Linear(D, 3), "score": nn.Linear(D, 1)})

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        states, _ = self.rnn(self.embed(ids))
        return {t: head(states[:, -1]) for t, head in self.heads.items()}


def test_a_gru_trunk_vmap_fails_on_is_named_with_the_ways_out() -> None:
    """Review: a GRU trunk failed with torch's bare "output with shape [1, 8] doesn't match
    the broadcast shape [...]" from the per-sample pass, which was explained only for errors
    whose text named vmap or a batching rule."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N, L), generator=g)
    labels = {"topic": torch.randint(0, 3, (N,), generator=g), "score": torch.randn(N, 1,
                                                                                    generator=g)}
    common = dict(tasks={"topic": "classification", "score": "regression"},
                  train_data=(ids, labels), forget_request=ForgetRequest.create(range(3), "topic"),
                  shared_parameters=lambda n: not n.startswith("heads."))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no held-out data: the caps come from the retain set
        with pytest.raises(RuntimeError, match=r"runs the model under torch\.func\.vmap.*"
                                               r"doesn't match the broadcast shape.*some modules' "
                                               r"fused kernels \(nn\.GRU's\).*"
                                               r'instance_projection="off"') as caught:
            mtunlearn_ext.unlearn(_Recurrent().eval(), **common,  # type: ignore[arg-type]
                                  config={"steps": 2})
        assert isinstance(caught.value.__cause__, RuntimeError)
        _, report = mtunlearn_ext.unlearn(_Recurrent().eval(), **common,  # type: ignore[arg-type]
                                          config={"steps": 2, "instance_projection": "off"})
    assert report.steps == 2


# -- token tagging layouts ------------------------------------------------------------------------

TOKEN_LOGITS = (r"; for a sequence's per-token logits \[B, L, C\] \(token tagging\), return "
                r"`logits.permute\(0, 2, 1\).unsqueeze\(-1\)` \(\[B, C, L, 1\]; logits already "
                r"\[B, C, L\]: `logits.unsqueeze\(-1\)`\) with targets \[N, L, 1\]$")


@pytest.mark.parametrize("spec, pred, target, message", [
    (SPECS[1], torch.zeros(2, L, 4), torch.zeros(2, L, 1, dtype=torch.long),
     r"segmentation wants pred \[B, C, H, W\], got \(2, 6, 4\)" + TOKEN_LOGITS),
    (SPECS[1], torch.zeros(2, 4, L), torch.zeros(2, L, dtype=torch.long),
     r"segmentation wants pred \[B, C, H, W\], got \(2, 4, 6\)" + TOKEN_LOGITS),
    (SPECS[1], torch.zeros(2, 4, L, 1), torch.zeros(2, L, dtype=torch.long),
     r"segmentation target must be \[B, H, W\] = \(2, 6, 1\), got \(2, 6\); per-token targets "
     r"\[N, L\] need a trailing 1: `tags.unsqueeze\(-1\)`$"),
    (TaskSpec("tag", "classification", num_classes=4), torch.zeros(2, L, 4),
     torch.zeros(2, L, dtype=torch.long),
     r"classification wants pred \[B, C\] and target \[B\], got \(2, 6, 4\) and \(2, 6\); "
     r"per-token labels \(token tagging\) are a `segmentation` task: return the logits "
     r"\[B, L, C\] as `logits.permute\(0, 2, 1\).unsqueeze\(-1\)` \(\[B, C, L, 1\]\) with "
     r"targets \[N, L, 1\]$"),
])
def test_sequence_layouts_get_the_token_tagging_layout(spec: TaskSpec, pred: torch.Tensor,
                                                        target: torch.Tensor,
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=rf"^task_loss\[{spec.name}\]: {message}"):
        task_loss(spec, pred, target)


@pytest.mark.parametrize("spec, pred, target", [
    (SPECS[1], torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long)),  # an image
    (TaskSpec("d", "depth"), torch.zeros(2, 4, 4), torch.zeros(2, 1, 4, 4)),
    (SPECS[0], torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.long)),
])
def test_other_layout_errors_get_no_token_hint(spec: TaskSpec, pred: torch.Tensor,
                                               target: torch.Tensor) -> None:
    with pytest.raises(ValueError) as caught:
        task_loss(spec, pred, target)
    assert "token" not in str(caught.value)


@pytest.mark.parametrize("tasks, message", [
    # a spec: the class count check sees dimension 1 (L) is not the 4 classes
    (SPECS, r"UnlearningProblem: the model's prediction for task 'tag' \(segmentation\) has "
            r"shape \(\d+, 6, 4\), but the task has num_classes 4: dimension 1 must hold one "
            r"score per class"),
    # by kind: the class count is read from dimension 1, and the loss refuses the layout
    ({"sent": "classification", "tag": "segmentation"},
     r"task_loss\[tag\]: segmentation wants pred \[B, C, H, W\], got \(\d+, 6, 4\)"),
])
def test_unlearn_names_the_token_tagging_layout_for_per_token_logits(tasks: object,
                                                                     message: str) -> None:
    inputs, labels = _text()
    with pytest.raises(ValueError, match=message + TOKEN_LOGITS):
        mtunlearn_ext.unlearn(_model(per_token=True), tasks=tasks,  # type: ignore[arg-type]
                              train_data=(inputs, labels),
                              forget_request=ForgetRequest.create(range(3), ["tag"]),
                              shared_parameters=lambda n: not n.startswith("heads."),
                              config={"steps": 1})
