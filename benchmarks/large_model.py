"""Large-model unlearning where the projections cost most: one step of the interference-aware
update on a ViT-B-like shared backbone (12 blocks, d=768, MLP 3072: 85.7M parameters), split into
backward passes and surgery, with the compiled ops against two ways of writing it in plain torch:
the same algorithm (ridge-regularised Gram solves throughout) and OrthoGrad's QR for the instance
projection.

The step (the method of ``mtunlearn_ext.unlearning.interference_aware``, full-task request, every
task protected):

1. backward passes (common to both ways, timed once per repeat):
   - retain batch: one forward, one ``autograd.grad`` per task -> ``r_t`` (``T`` tasks);
   - forget batch: one forward and one ``autograd.grad`` of the summed forgetting losses ->
     ``f = sum_t f_t``, as the library's unlearner does (the task projection is linear and the
     same for every target task, so projecting the sum once equals summing the projections);
     ``--per-task-forget`` takes one gradient per target task instead and projects each;
   - ``B`` per-sample retain gradients ``r_1..r_B`` (``vmap(grad)`` over ``functional_call``);
2. surgery:
   - push the ``r_t`` into the per-layer snapshot ring (``k`` snapshots per parameter, shared
     by both ways: the same copies, timed once and added to both);
   - task-aware projection: every layer ``l`` (75 of them: the parameters of one module),
     ``f_l <- f_l - M_l^T (M_l M_l^T + lambda_l I)^{-1} M_l f_l``;
   - ``u = -sum_t f_t``; instance-level projection off the per-sample gradients,
     ``d = u - R^T (R R^T + lambda I)^{-1} R u`` (OrthoGrad's projection);
   - update: ``.grad = sum_t r_t + alpha * (-d)``.

Three ways of running the surgery:

- compiled: ``gram_list_stacked(per_tensor=True)`` gives every layer's ``k x k`` Gram matrix and
  ``k x m`` cross terms in one pass over the snapshots and the forget stacks, one batched
  ``ridge_solve`` solves all layers, one ``combine_list(per_tensor=True)`` updates the forget
  stacks in place; the instance step is ``gram_list_stacked`` (one pass over the per-sample
  gradients and ``u``) + ``ridge_solve`` + ``combine_list``; nothing is flattened.
- usual, same algorithm (``usual-gram``): ``torch.cat`` of the gradients into ``[m, n]`` /
  ``[B, n]`` matrices, a Python loop over layers with ``torch.mm`` on the layer's columns of the
  snapshot ring (stored flat, ``[k, n]``: a view, no copy) and ``torch.linalg.solve``; the
  instance step is the same ridge-regularised projection as the compiled one (``torch.mm``
  Gram ``R R^T`` and ``R u``, ``torch.linalg.solve``, ``u - a^T R``); the result is split back
  into ``.grad``. This is the like-for-like comparison: the same arithmetic, in plain torch.
- usual, OrthoGrad (``usual-qr``): the same, but the instance projection is a reduced QR of
  the per-sample gradients (``[n, B]``) and ``u - Q (Q^T u)``, as OrthoGrad does: an exact
  projection by another (and, at large ``n``, much slower) algorithm.

All three run on the same gradients in the same process, in an order rotated every step, after
one untimed warm-up step (first-call allocations and page faults of each way); the script checks
that they give the same ``.grad`` (relative differences printed: 1e-3 to 7e-3 on CPU at full
size, the rounding of float32 ``torch.mm`` Grams over rows of millions of values and the ridge
against the exact QR) and prints the split table with best and median over ``--repeats``
steps. Targets: surgery <= 15% of the step with the compiled ops, and >= 4x less surgery time
than the usual way (judged against the same algorithm; the QR ratio is reported beside it).

Usage (repository root; ~13 GB of RAM at the default B=8; 5 steps took ~4 min on 2 loaded
cores)::

    .venv/bin/python benchmarks/large_model.py [--per-sample 8] [--snapshots 6] [--repeats 3]
        [--device cuda] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _bench_common as bc
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mtunlearn_ext import ops
from mtunlearn_ext.unlearning.protected_subspace import layer_ids_of


@dataclass(frozen=True)
class StepConfig:
    """Sizes of the benchmark step (all validated in :meth:`validate`)."""

    depth: int = 12
    dim: int = 768
    mlp: int = 3072
    heads: int = 12
    image: int = 64  # 64x64 images, 16x16 patches: 16 tokens + the class token
    patch: int = 16
    tasks: int = 3
    classes: int = 10
    retain_batch: int = 8
    forget_batch: int = 8
    per_sample: int = 8  # B: per-sample retain gradients of the instance projection
    snapshots: int = 6  # k: snapshots per layer of the task projection
    ridge: float = 1e-6
    alpha: float = 1.0
    seed: int = 0
    forget_sum: bool = True  # one forget gradient of the summed losses (as the library does)

    def validate(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if self.image % self.patch:
            raise ValueError(f"image={self.image} must be a multiple of patch={self.patch}")
        for name in ("depth", "tasks", "retain_batch", "forget_batch", "per_sample", "snapshots"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.snapshots > 256 or self.per_sample > 256:
            raise ValueError("`snapshots` and `per_sample` must be <= 256 (the solvers' limit)")

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1


# -- the model -------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block (attention written out, so that ``vmap`` batches it)."""

    def __init__(self, dim: int, mlp: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [b, heads, t, d_head]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class MultiTaskViT(nn.Module):
    """ViT-B-like shared backbone (``backbone.*``) with one linear head per task (``heads.*``)."""

    def __init__(self, cfg: StepConfig) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.dim, cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.mlp, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, cfg.classes) for _ in range(cfg.tasks))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, 3, H, W]`` -> logits ``[tasks, b, classes]``."""
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        features = self.norm(x[:, 0])
        return torch.stack([head(features) for head in self.heads])

    def shared_named(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("heads.")]


def task_losses(logits: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy per task (``logits: [T, b, C]``, ``targets: [T, b]``)."""
    return [F.cross_entropy(logits[t], targets[t]) for t in range(logits.shape[0])]


# -- timing ----------------------------------------------------------------------------------------


class PhaseTimer:
    """Wall time per named phase, one list of samples per phase (one sample per repeat).

    On CUDA each phase synchronises the device at its start and end, so that a phase is charged
    for its own kernels and not for those queued before it."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._current: dict[str, float] = {}
        self._sync: Callable[[], None] = (
            torch.cuda.synchronize if device is not None and device.type == "cuda"
            else (lambda: None))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start

    def end_repeat(self) -> None:
        for name, seconds in self._current.items():
            self.samples[name].append(seconds)
        self._current = {}


# -- the step, both ways ---------------------------------------------------------------------------


@dataclass
class StepInputs:
    """Everything the surgery reads: per-task and per-sample gradients of the shared params."""

    retain: list[list[torch.Tensor]]  # [T][P]
    forget: list[list[torch.Tensor]]  # [S][P]
    per_sample: list[torch.Tensor]  # [P] of [B, *shape_p]


def backward_passes(model: MultiTaskViT, cfg: StepConfig, gen: torch.Generator,
                    timer: PhaseTimer) -> StepInputs:
    shared = [p for _, p in model.shared_named()]
    names = [n for n, _ in model.shared_named()]

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(b, 3, cfg.image, cfg.image, generator=gen)
        return images, torch.randint(cfg.classes, (cfg.tasks, b), generator=gen)

    images, targets = batch(cfg.retain_batch)
    with timer("backward: retain fwd + per-task grads"):
        losses = task_losses(model(images), targets)
        retain = [list(torch.autograd.grad(loss, shared, retain_graph=t < cfg.tasks - 1))
                  for t, loss in enumerate(losses)]
    images, targets = batch(cfg.forget_batch)
    with timer("backward: forget fwd + grads"):
        losses = task_losses(model(images), targets)
        if cfg.forget_sum:
            forget = [list(torch.autograd.grad(sum(losses, torch.zeros(())), shared))]
        else:
            forget = [list(torch.autograd.grad(loss, shared, retain_graph=t < cfg.tasks - 1))
                      for t, loss in enumerate(losses)]
    images, targets = batch(cfg.per_sample)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return sum(task_losses(logits, y.unsqueeze(1)), torch.zeros(()))

    def shared_loss(shared_p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                    ) -> torch.Tensor:
        return one({**params, **shared_p}, x, y)

    with timer("backward: per-sample retain grads (vmap)"):
        grads = vmap(grad(shared_loss), in_dims=(None, 0, 1))(
            {n: params[n] for n in names}, images, targets)
        per_sample = [grads[n] for n in names]
    return StepInputs(retain, forget, per_sample)


class SnapshotRing:
    """``k`` retain-gradient snapshots per parameter (``[k, *shape_p]``), pre-filled so that the
    benchmark sees the steady state (a full ring).

    The stacks are views of one flat ``[k, n]`` buffer (``flat``), each row a snapshot of every
    parameter in order: the compiled ops read the stacks from their strides, and the usual way
    takes a layer's basis as a column slice of ``flat`` with no copy, as plain-torch code that
    keeps its own ring would store it. (It used to ``torch.cat`` every layer's stacks at every
    step: a copy of the whole ring that the usual way charged to itself.)"""

    def __init__(self, params: Sequence[torch.Tensor], k: int, gen: torch.Generator) -> None:
        n = sum(p.numel() for p in params)
        self.flat = torch.randn((k, n), generator=gen) * 1e-3
        self.buffers = []
        offset = 0
        for p in params:
            self.buffers.append(self.flat[:, offset:offset + p.numel()].view(k, *p.shape))
            offset += p.numel()
        self.k = k
        self.count = k

    def push(self, grads: Sequence[torch.Tensor]) -> None:
        # One multi-tensor copy, as the library's ProtectedSubspace pushes (a copy per tensor
        # was 450 launches a step here: 12 ms of the H200's 27 ms compiled surgery, run 7).
        slot = self.count % self.k
        torch._foreach_copy_([buffer[slot] for buffer in self.buffers], list(grads))
        self.count += 1


def compiled_surgery(inputs: StepInputs, ring: SnapshotRing, layer_ids: list[int],
                     num_layers: int, grads_out: list[torch.Tensor], cfg: StepConfig,
                     timer: PhaseTimer) -> None:
    """The surgery on per-parameter lists with the compiled ops (``grads_out`` already holds
    ``sum_t r_t``; this adds ``alpha * (-d)``)."""
    m = len(inputs.forget)
    ids = torch.tensor(layer_ids)
    with timer("stack forget grads [m, *shape]"):
        if m == 1:  # a view: nothing to copy
            stacks = [g.unsqueeze(0) for g in inputs.forget[0]]
        else:
            stacks = [torch.stack([f[p] for f in inputs.forget]) for p in range(len(grads_out))]
    with timer("task: gram_list_stacked (per tensor)"):
        # [f; M] [f; M]^T per tensor: the snapshots' Gram and their cross products with the
        # forget stack, in one pass over both.
        full_p = ops.gram_list_stacked(stacks, ring.buffers, per_tensor=True)  # [P, m+k, m+k]
        gram_p, cross_p = full_p[:, m:, m:], full_p[:, m:, :m]  # [P, k, k], [P, k, m]
    with timer("task: per-layer sums + ridge_solve"):
        gram_l = torch.zeros(num_layers, ring.k, ring.k).index_add_(0, ids, gram_p)
        cross_l = torch.zeros(num_layers, ring.k, m).index_add_(0, ids, cross_p)
        coeffs_l = ops.ridge_solve(gram_l, cross_l, cfg.ridge)  # [L, k, m]
        coeffs_p = (-coeffs_l.transpose(-1, -2))[ids].contiguous()  # [P, m, k]
    with timer("task: combine_list (per tensor, in place)"):
        if m == 1:
            # beta = -1 negates as it projects: the stack becomes u = -(f - a M) in the same
            # pass, and the separate u = -f pass below disappears.
            ops.combine_list(-coeffs_p, ring.buffers, stacks, beta=-1.0, per_tensor=True)
        else:
            ops.combine_list(coeffs_p, ring.buffers, stacks, beta=1.0, per_tensor=True)
    with timer("u = -sum_t f_t: combine_list"):
        if m == 1:
            u = stacks
        else:
            u = [torch.empty((1, *s.shape[1:])) for s in stacks]
            ops.combine_list(-torch.ones(1, m), stacks, u)
        del stacks
    with timer("instance: gram_list_stacked"):
        full_b = ops.gram_list_stacked(u, inputs.per_sample)  # [1+B, 1+B], one pass
        gram_b, cross_b = full_b[1:, 1:].contiguous(), full_b[1:, :1].contiguous()
    with timer("instance: ridge_solve"):
        a = ops.ridge_solve(gram_b, cross_b, cfg.ridge)  # [B, 1]
    with timer("instance: combine_list (in place)"):
        ops.combine_list(-a.T.contiguous(), inputs.per_sample, u, beta=1.0)
    with timer("update: .grad += alpha * (-d)"):
        ops.combine_list(torch.full((1,), -cfg.alpha), u, grads_out, beta=1.0)


def usual_surgery(inputs: StepInputs, ring: SnapshotRing, layer_slices: list[slice],
                  grads_out: list[torch.Tensor], cfg: StepConfig, timer: PhaseTimer,
                  instance: str = "gram") -> None:
    """The surgery written the usual way: flat copies, a loop over layers with ``torch.mm`` and
    ``torch.linalg.solve``; the instance projection as the compiled way does it
    (``instance="gram"``: ``torch.mm`` Gram + ridge solve) or with a QR of the per-sample
    gradients (``instance="qr"``, OrthoGrad)."""
    k = ring.k
    with timer("cat forget grads [m, n]"):
        f = torch.stack([torch.cat([g.reshape(-1) for g in fl]) for fl in inputs.forget])
    with timer("task: per-layer loop (mm, solve, mm)"):
        eye = torch.eye(k)
        for cols in layer_slices:
            basis = ring.flat[:, cols]  # a view: BLAS reads its rows at the ring's stride
            f_l = f[:, cols]
            gram = basis @ basis.T
            lam = cfg.ridge * gram.diagonal().sum() / k
            a = torch.linalg.solve(gram + lam * eye, basis @ f_l.T)  # [k, m]
            f_l.sub_(a.T @ basis)
    with timer("u = -sum_t f_t"):
        # f is this way's own copy: negate in place (m = 1: no temporary at all).
        u = (f[0] if f.shape[0] == 1 else f.sum(dim=0)).neg_()
        del f
    with timer("instance: cat per-sample grads [B, n]"):
        b = inputs.per_sample[0].shape[0]
        r = torch.cat([g.reshape(b, -1) for g in inputs.per_sample], dim=1)
    if instance == "qr":
        with timer("instance: QR of [n, B] (OrthoGrad)"):
            q, _ = torch.linalg.qr(r.T)
            del r
        with timer("instance: u - Q (Q^T u)"):
            d = u - q @ (q.T @ u)
            del q, u
    else:
        with timer("instance: Gram R R^T and R u (mm)"):
            gram = r @ r.T
            cross = r @ u
        with timer("instance: ridge solve"):
            lam = cfg.ridge * gram.diagonal().sum() / b
            a = torch.linalg.solve(gram + lam * torch.eye(b), cross)  # [B]
        with timer("instance: u - a^T R (mm)"):
            d = u - a @ r
            del r, u
    with timer("update: split into .grad"):
        offset = 0
        for g in grads_out:
            g.add_(d[offset:offset + g.numel()].view_as(g), alpha=-cfg.alpha)
            offset += g.numel()


def layer_layout(names: Sequence[str], params: Sequence[torch.Tensor]
                 ) -> tuple[list[int], int, list[slice], list[list[int]]]:
    """Layer id per parameter (one layer per module), and for the flat layout each layer's
    column range and member parameters (members of a module are adjacent in the flat order)."""
    ids = layer_ids_of(names)
    num_layers = max(ids) + 1
    members: list[list[int]] = [[] for _ in range(num_layers)]
    for p, layer in enumerate(ids):
        members[layer].append(p)
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    slices = []
    for group in members:
        if group != list(range(group[0], group[-1] + 1)):
            raise ValueError("a layer's parameters are not adjacent in the flat order")
        slices.append(slice(offsets[group[0]], offsets[group[-1] + 1]))
    return ids, num_layers, slices, members


def estimate_peak_bytes(n: int, cfg: StepConfig) -> int:
    """Peak during the usual way's surgery: parameters, snapshot ring, three ``.grad`` sets, the
    forget and per-sample gradients, and its flat copies (forget ``[m, n]``, per-sample
    ``[B, n]``, the QR's copy of it, ``u``)."""
    vec = 4 * n
    persistent = vec * (1 + cfg.snapshots + 3)  # parameters, ring, one .grad set per way
    step = vec * (cfg.tasks + cfg.per_sample)
    usual = vec * (cfg.tasks + 2 * cfg.per_sample + 1)
    return persistent + step + usual


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-sample", type=int, default=StepConfig.per_sample,
                        help="B, per-sample retain gradients")
    parser.add_argument("--snapshots", type=int, default=StepConfig.snapshots,
                        help="k, snapshots per layer")
    parser.add_argument("--depth", type=int, default=StepConfig.depth)
    parser.add_argument("--per-task-forget", action="store_true",
                        help="one forget gradient per target task, each projected (default: "
                             "the gradient of the summed forgetting losses, as the library)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (every tensor there)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    cfg = StepConfig(per_sample=args.per_sample, snapshots=args.snapshots, depth=args.depth,
                     forget_sum=not args.per_task_forget)
    cfg.validate()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    # Every tensor the step makes (model, batches, ring, solver buffers) lands on the device.
    torch.set_default_device(device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    meta = bc.machine_info()
    meta["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    meta["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")

    model = MultiTaskViT(cfg)
    named = model.shared_named()
    names, params = [n for n, _ in named], [p for _, p in named]
    n = sum(p.numel() for p in params)
    peak = estimate_peak_bytes(n, cfg)
    available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else mem_available()
    print(f"# large_model.py {meta['date']}: backbone {n / 1e6:.1f}M parameters in {len(params)} "
          f"tensors, {cfg.tasks} tasks, k={cfg.snapshots} snapshots, B={cfg.per_sample} "
          f"per-sample grads, {cfg.tokens} tokens; estimated peak {bc.human_bytes(peak)} "
          f"(available {bc.human_bytes(available)}) on {device}; load {meta['loadavg']}",
          flush=True)
    if peak > 0.9 * available:
        print("not enough memory for this size: lower --per-sample or --snapshots",
              file=sys.stderr)
        return 2
    layer_ids, num_layers, layer_slices, _ = layer_layout(names, params)
    ring = SnapshotRing(params, cfg.snapshots, gen)
    way_names = ("compiled", "usual-gram", "usual-qr")
    grads = {name: [torch.zeros_like(p) for p in params] for name in way_names}

    def one_step(common: PhaseTimer, timers: dict[str, PhaseTimer], repeat: int) -> list[float]:
        """One step: backward passes, then the three surgeries in an order rotated by
        ``repeat``; returns the relative differences of .grad (usual-gram, usual-qr against
        compiled)."""
        inputs = backward_passes(model, cfg, gen, common)
        with common("surgery (each way): push snapshots into the ring"):
            for r in inputs.retain:
                ring.push(r)
        # Every way starts from .grad = sum_t r_t: timed once (one set) and added to each way;
        # the other sets get an untimed copy.
        first = grads[way_names[0]]
        with common("update (each way): .grad = sum_t r_t"):
            torch._foreach_copy_(first, inputs.retain[0])
            for r in inputs.retain[1:]:
                torch._foreach_add_(first, r)
        for name in way_names[1:]:
            for o, src in zip(grads[name], first):
                o.copy_(src)
        inputs.retain = []
        # The compiled way projects the forget gradients in place (in a real step the step owns
        # them); the usual ways copy them into flat matrices first, so they see the raw ones.
        compiled_inputs = StepInputs([], [[g.clone() for g in f] for f in inputs.forget],
                                     inputs.per_sample)
        runs: list[tuple[str, Callable[[], None]]] = [
            ("compiled", lambda: compiled_surgery(compiled_inputs, ring, layer_ids, num_layers,
                                                  grads["compiled"], cfg, timers["compiled"])),
            ("usual-gram", lambda: usual_surgery(inputs, ring, layer_slices,
                                                 grads["usual-gram"], cfg, timers["usual-gram"],
                                                 instance="gram")),
            ("usual-qr", lambda: usual_surgery(inputs, ring, layer_slices,
                                               grads["usual-qr"], cfg, timers["usual-qr"],
                                               instance="qr")),
        ]
        shift = repeat % len(runs)
        for _, run in runs[shift:] + runs[:shift]:
            run()
        del inputs, compiled_inputs

        def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
            den = sum(float(y.double().pow(2).sum()) for y in b)
            return math.sqrt(num / den)

        return [rel(grads["usual-gram"], grads["compiled"]),
                rel(grads["usual-qr"], grads["compiled"])]

    # One untimed warm-up step: first-call allocations, page faults and lazy initialisation of
    # every way, which the timed steps would otherwise carry (the first of them in the median).
    warm = one_step(PhaseTimer(device), {name: PhaseTimer(device) for name in way_names}, 0)
    print(f"[warm-up step, untimed] load {os.getloadavg()[0]:.1f}, relative difference of "
          f".grad against compiled: usual-gram {warm[0]:.2e}, usual-qr {warm[1]:.2e}",
          flush=True)
    timer_common = PhaseTimer(device)
    timers = {name: PhaseTimer(device) for name in way_names}
    rel_gram: list[float] = []
    rel_qr: list[float] = []
    for repeat in range(args.repeats):
        diff_gram, diff_qr = one_step(timer_common, timers, repeat)
        rel_gram.append(diff_gram)
        rel_qr.append(diff_qr)
        for t in (timer_common, *timers.values()):
            t.end_repeat()
        print(f"[repeat {repeat + 1}/{args.repeats}] load {os.getloadavg()[0]:.1f}, "
              f"relative difference of .grad against compiled: usual-gram {diff_gram:.2e}, "
              f"usual-qr {diff_qr:.2e}", flush=True)

    report = build_report(cfg, n, len(params), num_layers, timer_common, timers["compiled"],
                          timers["usual-gram"], timers["usual-qr"], rel_gram, rel_qr, meta)
    print(report["markdown"])
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in report.items() if k != "markdown"},
                                        indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(report["markdown"] + "\n")
    return 0


def build_report(cfg: StepConfig, n: int, num_tensors: int, num_layers: int,
                 common: PhaseTimer, compiled: PhaseTimer, usual_gram: PhaseTimer,
                 usual_qr: PhaseTimer, rel_gram: list[float], rel_qr: list[float],
                 meta: dict[str, Any]) -> dict[str, Any]:
    def best(samples: list[float]) -> float:
        return min(samples)

    def med(samples: list[float]) -> float:
        return statistics.median(samples)

    def totals(timer: PhaseTimer, prefix: str | None = None) -> list[float]:
        names = [k for k in timer.samples if prefix is None or k.startswith(prefix)]
        return [sum(timer.samples[k][i] for k in names)
                for i in range(len(next(iter(timer.samples.values()))))]

    backward = totals(common, "backward")
    push = common.samples["surgery (each way): push snapshots into the ring"]
    r_sum = common.samples["update (each way): .grad = sum_t r_t"]

    def surgery(timer: PhaseTimer) -> list[float]:
        return [a + b + c for a, b, c in zip(totals(timer), push, r_sum)]

    surg_c, surg_g, surg_q = surgery(compiled), surgery(usual_gram), surgery(usual_qr)
    step_c, step_g, step_q = ([a + b for a, b in zip(backward, s)]
                              for s in (surg_c, surg_g, surg_q))
    share_c = [s / t for s, t in zip(surg_c, step_c)]
    speedup_g = [u / c for u, c in zip(surg_g, surg_c)]
    speedup_q = [u / c for u, c in zip(surg_q, surg_c)]

    def row(name: str, samples: list[float], ref: list[float] | None = None) -> list[str]:
        share = "" if ref is None else f"{100 * med(samples) / med(ref):.1f}%"
        return [name, f"{best(samples):.3f}", f"{med(samples):.3f}", share]

    lines = [f"# Large-model unlearning step ({meta['date']})", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['host_cpus']} CPUs ({meta['cpu']}), device {meta['device']}, "
             f"torch {meta['torch']} with "
             f"{meta['torch_threads']} threads, load average {meta['loadavg']} at start, "
             f"{[round(v, 2) for v in os.getloadavg()]} at end; git {meta['git']['head']}.", "",
             f"Backbone: ViT-B-like, {cfg.depth} blocks, d={cfg.dim}, MLP {cfg.mlp}, "
             f"{cfg.tokens} tokens ({cfg.image}x{cfg.image} images, {cfg.patch}x{cfg.patch} "
             f"patches): **{n:,} shared parameters** in {num_tensors} tensors, {num_layers} "
             f"layers; {cfg.tasks} tasks (all targets, all protected; forget gradient: "
             f"{'one, of the summed losses' if cfg.forget_sum else 'one per task'}), batches "
             f"{cfg.retain_batch}/{cfg.forget_batch}, k={cfg.snapshots} snapshots per layer, "
             f"B={cfg.per_sample} per-sample gradients, fp32. Seconds, best and median of "
             f"{len(backward)} timed steps after one untimed warm-up step, the three ways in an "
             f"order rotated every step. .grad against the compiled ops: the same algorithm in "
             f"plain torch agrees to a relative {max(rel_gram):.1e}, the QR way to "
             f"{max(rel_qr):.1e} (ridge {cfg.ridge:g} vs exact QR).", "",
             "## Split of one step", ""]
    split = [
        row("backward passes (common)", backward, step_c),
        *[row(f"  {k.removeprefix('backward: ')}", v, step_c) for k, v in common.samples.items()
          if k.startswith("backward")],
        row("surgery, compiled ops", surg_c, step_c),
        row("surgery, usual way, same algorithm (cat + mm Gram + solve)", surg_g, step_g),
        row("surgery, usual way, OrthoGrad (cat + mm + QR)", surg_q, step_q),
        row("step, compiled ops", step_c, step_c),
        row("step, usual way, same algorithm", step_g, step_g),
        row("step, usual way, OrthoGrad", step_q, step_q),
    ]
    lines.append(bc.markdown_table(["phase", "best s", "median s", "share of its step (median)"],
                                   split))
    lines += ["", "## Surgery sub-steps", ""]
    sub = [row("(each way) push snapshots into the ring", push),
           row("(each way) .grad = sum_t r_t", r_sum)]
    sub += [row(f"compiled: {k}", v) for k, v in compiled.samples.items()]
    sub += [row(f"usual, same algorithm: {k}", v) for k, v in usual_gram.samples.items()]
    sub += [row(f"usual, OrthoGrad: {k}", v) for k, v in usual_qr.samples.items()]
    lines.append(bc.markdown_table(["sub-step", "best s", "median s", ""], sub))
    share_c_best = best(surg_c) / best(step_c)
    targets = [
        ["surgery <= 15% of the step (compiled ops)",
         "met" if med(share_c) <= 0.15 else "NOT met",
         f"{100 * med(share_c):.1f}% (median; {100 * share_c_best:.1f}% from best times)"],
        [">= 4x less surgery time than the usual way (same algorithm)",
         "met" if med(speedup_g) >= 4 else "NOT met",
         f"{med(speedup_g):.2f}x (median of per-step ratios; best/best "
         f"{best(surg_g) / best(surg_c):.2f}x)"],
        ["(for reference) usual way with OrthoGrad's QR / compiled", "-",
         f"{med(speedup_q):.2f}x (median of per-step ratios; best/best "
         f"{best(surg_q) / best(surg_c):.2f}x)"],
    ]
    lines += ["", "## Targets", "",
              bc.markdown_table(["target", "verdict", "measured"], targets)]
    return {
        "meta": meta, "config": asdict(cfg), "shared_params": n, "tensors": num_tensors,
        "layers": num_layers, "common": dict(common.samples), "compiled": dict(compiled.samples),
        "usual_gram": dict(usual_gram.samples), "usual_qr": dict(usual_qr.samples),
        "surgery_compiled": surg_c, "surgery_usual_gram": surg_g, "surgery_usual_qr": surg_q,
        "step_compiled": step_c, "step_usual_gram": step_g, "step_usual_qr": step_q,
        "share_compiled": share_c, "surgery_speedup_gram": speedup_g,
        "surgery_speedup_qr": speedup_q, "rel_diff_gram": rel_gram, "rel_diff_qr": rel_qr,
        "targets": targets, "markdown": "\n".join(lines),
    }


if __name__ == "__main__":
    raise SystemExit(main())
