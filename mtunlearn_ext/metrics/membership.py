"""Loss-based membership inference: does the model treat the forget set like training data?

The attack (after Shokri et al. / Yeom et al.: training samples have lower loss):

1. Features of an instance: ``phi(x) = (log(l_t(x) + 1e-8))_{t in S}``, its per-sample loss on
   each attacked task ``t in S`` (default: the tasks supervised in the forget set), for the
   instances with a label of every one of them.
2. The attack model is fitted on members = one half of the retain instances (label 1; a seeded
   draw of at most ``max_members`` of them, halved) against non-members = one half of the test
   instances (label 0): a class-balanced logistic regression on standardised
   features (``attack="logistic"``), or no fitting at all, ``score = -mean_t z_t(x)`` with
   ``z_t`` the standardised feature (``attack="loss"``, the plain low-loss threshold attack).
3. **Reported AUC**: the ROC AUC of the attack score separating the forget instances (positives)
   from the *other*, held-out half of the test instances (negatives), which the attack never saw.

So ``auc = P(score(forget) > score(unseen test))`` (ties count 1/2): 0.5 means the forget set looks
exactly like unseen data, 1.0 means every forget instance looks more like a member than every
test instance. A perfectly unlearned model is *not* expected to reach 0.5 but the retrained
model's AUC (forget instances may be easier or harder than test ones); compare the two.
``member_auc`` is the same AUC for the other, held-out half of the retain instances, a check that
the attack works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, warn_at_caller
from mtunlearn_ext.data.base import MultiTaskDataset, TaskSpec
from mtunlearn_ext.metrics.evaluate import per_sample_task_losses
from mtunlearn_ext.models.base import MultiTaskModel

__all__ = ["ATTACKS", "ATTACK_AT_CHANCE", "MIAResult", "MembershipAttack", "attack_at_chance",
           "attackable_instances", "auc_chance_spread", "membership_attack", "mia_auc"]

#: The attacks of :func:`membership_attack` (the module docstring describes them).
MembershipAttack = Literal["logistic", "loss"]
ATTACKS: tuple[MembershipAttack, ...] = get_args(MembershipAttack)

#: A ``member_auc`` at or below this: the attack tells training members from unseen data no
#: better than chance on the model, so its forget-set AUC says nothing about forgetting there
#: (the command line and the reports say so beside it).
ATTACK_AT_CHANCE = 0.55


def attack_at_chance(member_auc: object) -> bool:
    """Whether a measured ``member_auc`` (a number; ``None`` when not measured) is at or below
    :data:`ATTACK_AT_CHANCE`."""
    return isinstance(member_auc, (int, float)) and member_auc <= ATTACK_AT_CHANCE


def auc_chance_spread(num_forget: int, num_unseen: int) -> float:
    """The forget AUC's standard deviation were the forget rows drawn from the unseen data
    (Mann-Whitney: ``sqrt((n_f + n_u + 1) / (12 n_f n_u))``), against which differences of
    forget AUCs are read; ``inf`` when either set is empty."""
    if num_forget < 1 or num_unseen < 1:
        return math.inf
    return math.sqrt((num_forget + num_unseen + 1) / (12 * num_forget * num_unseen))


@dataclass(frozen=True)
class MIAResult:
    """Result of :func:`membership_attack`.

    ``auc``: forget (positives) vs held-out test (negatives); ``member_auc``: held-out retain vs
    held-out test; ``tasks``: the attacked tasks; the sizes of the sets used.
    """

    auc: float
    member_auc: float
    tasks: tuple[str, ...]
    num_forget: int
    num_members_fit: int
    num_non_members_fit: int
    num_non_members_eval: int


def _features(model: MultiTaskModel, dataset: MultiTaskDataset, tasks: Sequence[str],
              batch_size: int) -> tuple[np.ndarray, int]:
    """``[n, |S|]`` log-losses of the rows with every attacked task supervised and labelled,
    and how many of those rows have a non-finite loss (a model that diverged on them). A loss
    below zero (a Gaussian negative log-likelihood, say) continues the scale monotonically
    below ``log(eps)`` (its log was NaN, and the attack failed on it)."""
    losses = per_sample_task_losses(model, dataset, list(tasks), batch_size)
    # Rows by the supervision mask and the labels, not by NaN losses: a NaN loss of a
    # supervised pair is the model's, and dropping its row would attack the model on the rest
    # only.
    complete = dataset.labelled_pairs(tasks).all(dim=1)
    chosen = losses[complete]
    undefined = int((~torch.isfinite(chosen)).any(dim=1).sum())
    return _log_scale(chosen).numpy(), undefined


def attackable_instances(dataset: MultiTaskDataset, tasks: Sequence[str]) -> int:
    """How many instances of ``dataset`` the attack on ``tasks`` can score: those with a
    supervised label of every one of them (a check before any model is trained, as the
    experiment makes)."""
    return int(dataset.labelled_pairs(tasks).all(dim=1).sum())


def _partly_labelled(dataset: MultiTaskDataset, tasks: Sequence[str]) -> int:
    """Rows with a supervised pair of some task of ``tasks`` but no label of every one."""
    columns = [dataset.task_index(t) for t in tasks]
    supervised = dataset.supervision[:, columns].any(dim=1)
    return int((supervised & ~dataset.labelled_pairs(tasks).all(dim=1)).sum())


def _log_scale(losses: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``log(l + eps)`` for ``l >= 0``; below zero ``log(eps) - log1p(-l / eps)``, which meets
    it at 0 and keeps the order of the losses (the loss attack ranks them; the logistic one
    fits on this scale)."""
    below = math.log(eps) - torch.log1p(-losses / eps)
    return torch.where(losses >= 0, torch.log(losses + eps), below)


def membership_attack(model: MultiTaskModel, members: MultiTaskDataset,
                      non_members: MultiTaskDataset, forget: MultiTaskDataset,
                      tasks: Sequence[TaskSpec | str] | None = None, *, batch_size: int = 64,
                      attack: MembershipAttack = "logistic", max_members: int = 2000,
                      seed: int = 0) -> MIAResult:
    """Run the loss-based attack of this module and report its AUCs.

    Args:
        model: the model under attack.
        members: the retain set (training data the model should still fit); at most
            ``max_members`` of them, split in half by ``seed``: one half fits the attack, the
            other is the positives of ``member_auc``.
        non_members: unseen data (the test set); split in half by ``seed``: one half fits the
            attack, the other is the negatives of the reported AUCs.
        forget: the forget set (its supervised pairs are the forget pairs).
        tasks: the attacked tasks (default: tasks with a supervised, labelled pair in
            ``forget``). An instance is attacked when every one of them is supervised and
            labelled on it: a supervised pair whose label is all ``ignore_index`` (no labelled
            pixel) has no loss to attack (the losses give it 0).
        batch_size: evaluation batch size.
        attack: ``"logistic"`` or ``"loss"`` (see the module docstring).
        max_members: at most this many members are used (a random, seeded subset); an
            integer >= 2.
        seed: seeds the member subset and the halving of both sets.
    """
    if attack not in ATTACKS:
        raise ValueError(f"membership_attack: unknown attack {attack!r} (one of {ATTACKS})")
    cap = integer_value(max_members)
    if cap is None or cap < 2:
        # A negative cap sliced members off the end ([:-1] kept all but one); 0 or 1 left a
        # half empty, and sklearn failed on it with a message that names neither.
        raise ValueError(f"membership_attack: `max_members` must be an integer >= 2 (half fit "
                         f"the attack, half are the member AUC's positives), got "
                         f"{max_members!r}")
    max_members = cap
    if tasks is None:
        labelled = forget.labelled_pairs(forget.task_names).any(dim=0)
        names = [t for j, t in enumerate(forget.task_names) if bool(labelled[j])]
    else:
        names = [t if isinstance(t, str) else t.name for t in tasks]
    if not names:
        if tasks is not None:
            raise ValueError("membership_attack: `tasks` is empty; pass the tasks to attack, "
                             "or None for every task with a supervised forget pair")
        raise ValueError("membership_attack: the forget set has no supervised pair with a "
                         "label (every supervised label is ignore_index, or none is set)")
    rng = np.random.default_rng(seed)
    forget_x, forget_bad = _features(model, forget, names, batch_size)
    member_x, member_bad = _features(model, members, names, batch_size)
    test_x, test_bad = _features(model, non_members, names, batch_size)
    if len(forget_x) == 0:
        raise ValueError(f"membership_attack: no forget instance has every task of {names}")
    partly = _partly_labelled(forget, names)
    if partly:
        # Their loss on a task they lack is no feature: the attack leaves them out, and says so
        # (the AUC would otherwise describe fewer instances than the request forgets).
        warn_at_caller(f"membership_attack: {partly} of {partly + len(forget_x)} forget "
                       f"instances lack a label of some task of {names} and are left out of "
                       "the attack (its features are every attacked task's loss); pass "
                       "`tasks` to attack fewer tasks")
    if len(test_x) < 4 or len(member_x) < 4:
        raise ValueError(f"membership_attack: needs >= 4 members and non-members with tasks "
                         f"{names}; got {len(member_x)} and {len(test_x)}")
    member_x = member_x[rng.permutation(len(member_x))[:max_members]]
    test_x = test_x[rng.permutation(len(test_x))]
    member_fit, member_eval = np.array_split(member_x, 2)
    test_fit, test_eval = np.array_split(test_x, 2)
    if forget_bad or member_bad or test_bad:
        # A diverged model: no attack can rank a NaN loss, and the AUC is undefined (NaN);
        # the retrain gap counts an undefined AUC of an unlearned model as infinitely far.
        warn_at_caller(f"membership_attack: the model's loss on tasks {names} is NaN or infinite "
                       f"on {forget_bad} forget, {member_bad} member and {test_bad} non-member "
                       "rows; the AUCs are NaN", MtUnlearnRuntimeWarning)
        nan = float("nan")
        return MIAResult(auc=nan, member_auc=nan, tasks=tuple(names), num_forget=len(forget_x),
                         num_members_fit=len(member_fit), num_non_members_fit=len(test_fit),
                         num_non_members_eval=len(test_eval))

    fit_x = np.concatenate([member_fit, test_fit])
    mean, std = fit_x.mean(axis=0), fit_x.std(axis=0) + 1e-12
    if attack == "logistic":
        fit_y = np.concatenate([np.ones(len(member_fit)), np.zeros(len(test_fit))])
        classifier = LogisticRegression(class_weight="balanced", max_iter=1000)
        classifier.fit((fit_x - mean) / std, fit_y)

        def score(x: np.ndarray) -> np.ndarray:
            return classifier.decision_function((x - mean) / std)
    else:
        def score(x: np.ndarray) -> np.ndarray:
            return -((x - mean) / std).mean(axis=1)

    def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
        labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
        return float(roc_auc_score(labels, np.concatenate([score(positives), score(negatives)])))

    return MIAResult(auc=auc(forget_x, test_eval), member_auc=auc(member_eval, test_eval),
                     tasks=tuple(names), num_forget=len(forget_x),
                     num_members_fit=len(member_fit), num_non_members_fit=len(test_fit),
                     num_non_members_eval=len(test_eval))


def mia_auc(model: MultiTaskModel, members: MultiTaskDataset, non_members: MultiTaskDataset,
            forget: MultiTaskDataset, tasks: Sequence[TaskSpec | str] | None = None, *,
            batch_size: int = 64, attack: MembershipAttack = "logistic", max_members: int = 2000,
            seed: int = 0) -> float:
    """The attack AUC on the forget set vs held-out unseen data; see :func:`membership_attack`
    (the arguments are its own)."""
    result = membership_attack(model, members, non_members, forget, tasks,
                               batch_size=batch_size, attack=attack, max_members=max_members,
                               seed=seed)
    return result.auc
