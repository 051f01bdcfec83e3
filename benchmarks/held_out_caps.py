"""What the forget caps' reference does on a model that memorised its training set.

    python benchmarks/held_out_caps.py            # ~10 s on 2 CPU cores

The measurement behind docs/unlearning.md's "What the defaults do": a two-layer multi-task MLP
(the docs' ``TwoHeads``) memorises 60 instances whose class labels are random, 10 of them are
forgotten (a full request), 30 unseen instances are the held-out set and 30 others the audit
set of the membership attack. Five runs of the interference-aware method from the same model:
the library's defaults, the defaults with ``cap_reference="held_out"``, the memorising
full-request preset (``tuned_settings("full", ..., recipe="memorising")``), and that preset at
a 10x learning rate for its 40 steps and for 100 (the preset's rate was selected for the
benchmarks' convolutional models). Each prints the
forget-set attack AUC before -> after (0.5: the forget instances look like unseen ones), the
forget and retain losses before -> after (class task, mean cross-entropy) and the attack AUC
of the retained members after (it should stay high: they are still members). Seeded: the
same figures on every run on one machine and thread count (one thread).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext.unlearning.presets import tuned_settings

TASKS = {"kind": "classification", "size": "regression"}


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"kind": nn.Linear(32, 3), "size": nn.Linear(32, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(n, 8, generator=gen)
    return x, {"kind": torch.randint(0, 3, (n,), generator=gen),
               "size": torch.randn(n, 1, generator=gen)}


def _memorise(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor],
              epochs: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        out = model(x)
        loss = (nn.functional.cross_entropy(out["kind"], y["kind"])
                + nn.functional.mse_loss(out["size"], y["size"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = _data(60, gen)
    x_unseen, y_unseen = _data(60, gen)
    held_out = (x_unseen[:30], {t: v[:30] for t, v in y_unseen.items()})
    audit = (x_unseen[30:], {t: v[30:] for t, v in y_unseen.items()})
    model = TwoHeads()
    final = _memorise(model, x, y, args.epochs)
    print(f"memorised: training loss {final:.4f} after {args.epochs} full-batch Adam steps")
    preset = tuned_settings("full", ["interference_aware"], recipe="memorising")
    runs = {
        "defaults": {},
        'cap_reference="held_out"': {"cap_reference": "held_out"},
        "memorising preset": preset["interference_aware"],
        "preset, lr 1e-2": {**preset["interference_aware"], "lr": 1e-2},
        "preset, lr 1e-2, 100 steps": {**preset["interference_aware"], "lr": 1e-2,
                                        "steps": 100},
    }
    print(f"{'run':<28} {'forget AUC':>14} {'forget loss':>16} {'retain loss':>16} "
          f"{'member AUC':>10}")
    for name, config in runs.items():
        _, report = mtunlearn_ext.unlearn(
            model, tasks=TASKS, train_data=(x, y),
            forget_request=mtunlearn_ext.ForgetRequest.create(range(10)),
            shared_parameters=lambda n: n.startswith("trunk."),
            held_out_data=held_out, audit_data=audit, config=config, seed=args.seed)
        s = report.extra["summary"]
        print(f"{name:<28} {s['forget_mia_auc_before']:.2f} -> {s['forget_mia_auc_after']:.2f}"
              f"  {s['forget_loss_before']['kind']:.4f} -> {s['forget_loss_after']['kind']:.3f}"
              f"  {s['retain_loss_before']['kind']:.4f} -> {s['retain_loss_after']['kind']:.4f}"
              f"  {s['member_mia_auc_after']:>10.2f}")


if __name__ == "__main__":
    main()
