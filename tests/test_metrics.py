"""Metrics against hand-computed cases; evaluation on supervised pairs only; the membership
attack; UIS and the retrain gap."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
from mtunlearn_ext.metrics import membership as membership_module
from mtunlearn_ext.metrics import (
    METRICS,
    MembershipAttack,
    angle_errors_deg,
    confusion_matrix,
    evaluate,
    make_accumulator,
    membership_attack,
    mia_auc,
    per_sample_task_losses,
    retrain_gap,
    retrain_gap_terms,
    segmentation_scores,
    uis,
    uis_terms,
)
from mtunlearn_ext.models import MultiTaskModel

SEG = TaskSpec("seg", "segmentation", num_classes=3)
DEPTH = TaskSpec("depth", "depth")
NORMALS = TaskSpec("normals", "normals")
CLS = TaskSpec("cls", "classification", num_classes=3)


# -- per-task metrics ----------------------------------------------------------------------------

def test_confusion_matrix_and_segmentation_scores_by_hand() -> None:
    target = torch.tensor([[0, 0, 1, -1], [0, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 2], [0, 0, 2, 1]])
    cm = confusion_matrix(pred, target, num_classes=3, ignore_index=-1)
    # rows: label, columns: prediction; the ignored pixel is left out
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 1]]
    scores = segmentation_scores(cm)
    iou = [2 / (3 + 3 - 2), 1 / (2 + 3 - 1), 1 / (2 + 1 - 1)]
    assert math.isclose(scores["miou"], sum(iou) / 3)
    assert math.isclose(scores["pixel_acc"], 4 / 7)
    # A class absent from labels and predictions is not averaged in (its IoU is 0/0).
    cm4 = torch.zeros(4, 4, dtype=torch.long)
    cm4[:3, :3] = cm
    assert math.isclose(segmentation_scores(cm4)["miou"], sum(iou) / 3)


def test_segmentation_accumulator_pools_over_batches() -> None:
    acc = make_accumulator(SEG)
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[1, 2, 0, 0] = logits[1, 2, 0, 1] = 1.0
    target = torch.tensor([[[0, 1]], [[2, -1]]])
    acc.update(logits[:1], target[:1])
    acc.update(logits[1:], target[1:])
    assert acc.count == 3
    assert acc.compute() == {"miou": 1.0, "pixel_acc": 1.0}


def test_depth_metrics_by_hand() -> None:
    acc = make_accumulator(DEPTH)
    pred = torch.tensor([1.0, 2.0, 4.0, 7.0]).reshape(1, 1, 2, 2)
    gt = torch.tensor([1.0, 1.0, 5.0, 0.0]).reshape(1, 1, 2, 2)  # last pixel unknown
    acc.update(pred, gt)
    out = acc.compute()
    assert math.isclose(out["abs_err"], (0 + 1 + 1) / 3)
    assert math.isclose(out["rel_err"], (0 + 1 + 0.2) / 3)
    # ratios 1, 2, 1.25: only the first is strictly below 1.25
    assert math.isclose(out["delta_1.25"], 1 / 3)


def _unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.sin(r), 0.0, math.cos(r)]


def test_normal_metrics_by_hand() -> None:
    angles = [0.0, 20.0, 45.0, 90.0, 10.0]
    pred = torch.tensor([_unit(a) for a in angles] + [[1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 6)
    target = torch.tensor([[0.0, 0.0, 1.0]] * 5 + [[0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 6)
    errors = angle_errors_deg(pred * 3.0, target)  # predictions need not be unit length
    assert torch.allclose(errors, torch.tensor(angles, dtype=torch.double), atol=1e-6)
    acc = make_accumulator(NORMALS)
    acc.update(pred[..., :3], target[..., :3])
    acc.update(pred[..., 3:], target[..., 3:])
    out = acc.compute()
    assert math.isclose(out["mean_angle"], sum(angles) / 5, rel_tol=1e-6)  # float32 inputs
    assert abs(out["median_angle"] - 20.0) <= 0.005 + 1e-9  # half a 0.01-degree bin
    assert math.isclose(out["within_11.25"], 2 / 5)
    assert math.isclose(out["within_22.5"], 3 / 5)
    assert math.isclose(out["within_30"], 3 / 5)
    even = make_accumulator(NORMALS)
    even.update(pred[..., :4], target[..., :4])
    median = float(np.median(angles[:4]))
    assert abs(even.compute()["median_angle"] - median) <= 0.005 + 1e-9


class _OneOutput(nn.Module):
    """A regression head of 1 output, for targets of 3 entries."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, tasks: object = None) -> dict[str, torch.Tensor]:
        return {"size": self.l(x)}


def test_evaluate_refuses_a_head_whose_output_does_not_fit_its_targets() -> None:
    """Broadcast against [B, 3] targets, a [B, 1] head got an mse and an mae; its loss was
    already refused."""
    torch.manual_seed(0)
    data = MultiTaskDataset(torch.randn(10, 8), {"size": torch.randn(10, 3)},
                            [TaskSpec("size", "regression")])
    with pytest.raises(ValueError, match=r"metrics\[size\]: regression pred \(10, 1\) and "
                                         r"target \(10, 3\) differ"):
        evaluate(_OneOutput(), data)  # type: ignore[arg-type]
    # A custom loss may read another layout (training took it): the message says why the
    # metrics still refuse it.
    custom = MultiTaskDataset(torch.randn(10, 8), {"size": torch.randn(10, 3)},
                              [TaskSpec("size", "regression", loss=lambda p, t: (p - t[:, :1])
                                        .pow(2).flatten(1).mean(1))])
    with pytest.raises(ValueError, match=r"differ \(task 'size' has a custom `loss`, which may "
                                         r"read another layout"):
        evaluate(_OneOutput(), custom)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec, pred, target, message", [
    (CLS, torch.zeros(4), torch.zeros(4, dtype=torch.long), r"classification wants pred \[B, C\]"),
    (CLS, torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), r"and target \[B\]"),
    (CLS, torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), r"pred has 4 samples, target 5"),
    (SEG, torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long),
     r"segmentation target must be \[B, H, W\] = \(2, 4, 4\), got \(2, 4, 5\)"),
    (DEPTH, torch.ones(2, 1, 4, 4), torch.ones(2, 4, 4), r"depth pred \(2, 1, 4, 4\) and target"),
    (DEPTH, torch.ones(2, 4, 4), torch.ones(2, 4, 4), r"depth wants pred \[B, C, H, W\]"),
    (NORMALS, torch.ones(2, 3, 1, 1), torch.ones(2, 3, 2, 2), r"normals pred \(2, 3, 1, 1\)"),
    (TaskSpec("r", "regression"), torch.zeros(3, 1), torch.zeros(3, 2), r"regression pred"),
])
def test_accumulators_refuse_the_layouts_the_losses_refuse(spec: TaskSpec, pred: torch.Tensor,
                                                           target: torch.Tensor,
                                                           message: str) -> None:
    with pytest.raises(ValueError, match=rf"metrics\[{spec.name}\]: .*{message}"):
        make_accumulator(spec).update(pred, target)


def test_regression_accumulator_still_takes_a_flat_prediction_of_one_output() -> None:
    # task_loss takes [B] against [B, 1] (the same entries per row): so do the metrics.
    acc = make_accumulator(TaskSpec("r", "regression"))
    acc.update(torch.tensor([1.0, 2.0]), torch.tensor([[0.0], [0.0]]))
    assert acc.compute() == {"mse": 2.5, "mae": 1.5}


def test_confusion_matrix_refuses_labels_outside_the_classes() -> None:
    """A prediction of 7 was clamped into class 2 and one of -4 into class 0; a target of 5 was
    dropped."""
    with pytest.raises(ValueError, match=r"confusion_matrix: `pred_labels` has 2 predictions "
                                         r"outside \[0, 3\) at counted entries \(first: 7\)"):
        confusion_matrix(torch.tensor([7, -4]), torch.tensor([2, 0]), 3)
    with pytest.raises(ValueError, match=r"confusion_matrix: `target` has 1 labels outside "
                                         r"\[0, 3\) other than ignore_index -1 \(first: 5\)"):
        confusion_matrix(torch.tensor([1, 2]), torch.tensor([5, 0]), 3)
    with pytest.raises(ValueError, match=r"`target` has 1 labels outside \[0, 3\) other than "
                                         r"ignore_index 255 \(first: -1\)"):
        confusion_matrix(torch.tensor([1, 2]), torch.tensor([-1, 0]), 3, ignore_index=255)
    for bad, name in ((torch.tensor([0.5, 1.0]), "pred_labels"),
                      (torch.tensor([float("nan"), 1.0]), "pred_labels")):
        with pytest.raises(ValueError, match=rf"`{name}` must be integer class labels, got "
                                             r"torch.float32 values with a fraction"):
            confusion_matrix(bad, torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"`target` must be integer class labels"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0.0, 1.7]), 3)
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer >= 1, got 0"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0)
    # The ignore label stays allowed, inside [0, C) or outside, and a prediction at an ignored
    # entry is never read; integral floats are labels.
    assert confusion_matrix(torch.tensor([-1, 1, 9]), torch.tensor([255, 1, 255]), 3,
                            ignore_index=255).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert confusion_matrix(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]), 3,
                            ignore_index=0).sum() == 0
    assert confusion_matrix(torch.tensor([2.0, 1.0]), torch.tensor([1, 1]),
                            3).tolist() == [[0, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_angle_errors_refuse_shapes_that_differ() -> None:
    """Broadcast, one normal was compared with two images' pixels: 8 angles from 1 prediction."""
    with pytest.raises(ValueError, match=r"angle_errors_deg: pred \(1, 3, 1, 1\) and target "
                                         r"\(2, 3, 2, 2\) differ"):
        angle_errors_deg(torch.randn(1, 3, 1, 1), torch.randn(2, 3, 2, 2))


def test_metric_table_names_every_reported_metric() -> None:
    reported = set()
    for spec in (SEG, DEPTH, NORMALS, CLS, TaskSpec("r", "regression"), TaskSpec("b", "binary")):
        reported |= set(make_accumulator(spec).compute())
    assert reported == set(METRICS)


# -- evaluate: supervised pairs only -------------------------------------------------------------

class _Echo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _ReadLogits(nn.Module):
    """Logits of 3 classes: one-hot of the class stored in input column ``column``."""

    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.one_hot(x[:, self.column].long(), 3).float()


def _two_task_model() -> MultiTaskModel:
    tasks = [CLS, TaskSpec("aux", "classification", num_classes=3)]
    return MultiTaskModel(_Echo(), {"cls": _ReadLogits(0), "aux": _ReadLogits(1)}, tasks)


def test_evaluate_counts_only_supervised_pairs() -> None:
    model = _two_task_model()
    # Column 0 is the model's "cls" prediction, column 1 its "aux" prediction.
    inputs = torch.tensor([[0, 1], [1, 1], [2, 0], [0, 2]], dtype=torch.float32)
    targets = {"cls": torch.tensor([0, 1, 1, 1]), "aux": torch.tensor([1, 0, 0, 2])}
    sup = torch.tensor([[True, True], [True, False], [False, True], [False, True]])
    data = MultiTaskDataset(inputs, targets, model.tasks, supervision=sup)
    out = evaluate(model, data, batch_size=3)
    assert out["cls"]["accuracy"] == 1.0        # the wrong rows 2, 3 are unsupervised
    assert math.isclose(out["aux"]["accuracy"], 3 / 3)
    only_cls = data.with_supervision(torch.tensor([[True, False]] * 4))
    assert set(evaluate(model, only_cls)) == {"cls"}  # a task with no supervised pair is left out
    losses = per_sample_task_losses(model, data)
    assert torch.isnan(losses[2, 0]) and torch.isnan(losses[1, 1])
    assert losses[0, 0] < 1e-3
    model.train()
    evaluate(model, data)
    assert model.training  # mode restored
    for bad in (0, -1, 2.5, True):  # a zero batch size looped on range(0, n, 0)
        with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got "):
            evaluate(model, data, batch_size=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"per_sample_task_losses: `batch_size` must be"):
            per_sample_task_losses(model, data, batch_size=bad)  # type: ignore[arg-type]


# -- membership inference -------------------------------------------------------------------------

class _Memoriser(nn.Module):
    """Confident on inputs flagged as members (column 1 == 1), unsure otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = nn.functional.one_hot(x[:, 0].long(), 3).float()
        confidence = torch.where(x[:, 1:2] > 0, 8.0, 1.0) + x[:, 2:3]
        return confidence * label


def _mia_data(n: int, member: bool, seed: int) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    noise = torch.rand(n, generator=g)
    x = torch.stack([labels.float(), torch.full((n,), float(member)), noise], dim=1)
    return MultiTaskDataset(x, {"cls": labels}, [CLS])


def test_mia_separates_memorised_from_unseen_instances() -> None:
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test = _mia_data(200, True, 0), _mia_data(200, False, 1)
    remembered, forgotten = _mia_data(40, True, 2), _mia_data(40, False, 3)
    for attack in ("logistic", "loss"):
        result = membership_attack(model, members, test, remembered, attack=attack)
        assert result.auc > 0.99 and result.member_auc > 0.99
        assert result.num_non_members_eval == 100 and result.tasks == ("cls",)
        # A forget set that looks like unseen data gets an AUC near 0.5.
        assert 0.3 < mia_auc(model, members, test, forgotten, attack=attack) < 0.7
    with pytest.raises(ValueError, match="unknown attack"):
        membership_attack(model, members, test, remembered, attack="svm")  # type: ignore[arg-type]



def test_the_attack_fits_on_half_the_members_as_its_docstrings_say() -> None:
    """Docs audit: unlearn's docstring said the audit's attack was "fitted on up to 2000
    retain rows", and membership_attack's that `members` were the retain set, while the
    members drawn (at most `max_members`) are halved: one half fits the attack, the other half
    gives `member_auc`, as the README says."""
    import mtunlearn_ext

    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test = _mia_data(30, True, 0), _mia_data(20, False, 1)
    result = membership_attack(model, members, test, _mia_data(5, True, 2), max_members=24)
    assert result.num_members_fit == 12  # half of the 24 drawn; the other 12 give member_auc
    assert result.num_non_members_fit == result.num_non_members_eval == 10
    attack_doc = " ".join((membership_attack.__doc__ or "").split())
    assert ("at most ``max_members`` of them, split in half by ``seed``: one half fits the "
            "attack, the other is the positives of ``member_auc``") in attack_doc
    unlearn_doc = " ".join((mtunlearn_ext.unlearn.__doc__ or "").split())
    assert "fitted on up to 2000 retain rows" not in unlearn_doc
    assert "a seeded draw of at most 2000 retain rows is halved" in unlearn_doc

# -- UIS and the retrain gap ----------------------------------------------------------------------

def test_uis_by_hand() -> None:
    original = {"seg": {"miou": 0.8, "pixel_acc": 0.9}, "depth": {"abs_err": 0.5}}
    unlearned_test = {"seg": {"miou": 0.7, "pixel_acc": 0.9}, "depth": {"abs_err": 0.6}}
    unlearned_forget = {"seg": {"miou": 0.9, "pixel_acc": 0.9}, "depth": {"abs_err": 0.4}}
    # seg: miou (0.1/0.8 + 0.1/0.8)/2 = 12.5, pixel_acc 0 -> 6.25; depth (0.2 + 0.2)/2 = 20
    assert math.isclose(uis(original, unlearned_test, unlearned_forget), (6.25 + 20.0) / 2)
    terms = uis_terms(original, unlearned_test, unlearned_forget)
    assert math.isclose(terms["depth"]["abs_err"]["forget_advantage"], 20.0)  # error fell: +
    assert math.isclose(terms["seg"]["miou"]["forget_advantage"], 12.5)       # score rose: +
    # Perfect: unchanged on test and the forget set at the unseen-data level.
    assert uis(original, original, original) == 0.0
    # Partial-task forget sets have only the target tasks: named in `tasks`.
    assert math.isclose(uis(original, unlearned_test, {"depth": {"abs_err": 0.4}},
                            tasks=["depth"]), 20.0)
    with pytest.warns(RuntimeWarning, match="undefined"):
        value = uis({"a": {"accuracy": 0.0}, "b": {"accuracy": 0.5}},
                    {"a": {"accuracy": 0.1}, "b": {"accuracy": 0.5}},
                    {"a": {"accuracy": 0.1}, "b": {"accuracy": 0.25}})
    assert math.isclose(value, 25.0)
    with pytest.raises(KeyError, match="direction"):
        uis({"a": {"f1": 0.5}}, {"a": {"f1": 0.5}}, {"a": {"f1": 0.5}})
    assert uis({"a": {"f1": 0.5}}, {"a": {"f1": 0.4}}, {"a": {"f1": 0.5}},
               higher_is_better={"f1": True}) == pytest.approx(10.0)


def test_uis_skips_a_term_whose_original_score_is_not_finite() -> None:
    """A NaN original score (the original model undefined there, e.g. no labelled pixel) has no
    relative change: the term is skipped with a warning naming it. Scored, its NaN ratio made
    the whole UIS NaN."""
    original = {"seg": {"miou": float("nan"), "pixel_acc": 0.8}, "depth": {"abs_err": 0.5}}
    unlearned_test = {"seg": {"miou": 0.7, "pixel_acc": 0.6}, "depth": {"abs_err": 0.6}}
    unlearned_forget = {"seg": {"miou": 0.9, "pixel_acc": 1.0}, "depth": {"abs_err": 0.4}}
    with pytest.warns(RuntimeWarning, match=r"uis: skipping seg/miou \(O_t=nan, U_t=0\.7, "
                                            r"U_u=0\.9\): the relative change is undefined"):
        value = uis(original, unlearned_test, unlearned_forget)
    # seg: pixel_acc alone, (0.2/0.8 + 0.2/0.8)/2 = 25; depth (0.2 + 0.2)/2 = 20
    assert math.isclose(value, (25.0 + 20.0) / 2)
    # The same as the UIS of the valid terms alone.
    assert math.isclose(value, uis({"seg": {"pixel_acc": 0.8}, "depth": {"abs_err": 0.5}},
                                   {"seg": {"pixel_acc": 0.6}, "depth": {"abs_err": 0.6}},
                                   {"seg": {"pixel_acc": 1.0}, "depth": {"abs_err": 0.4}}))
    with pytest.warns(RuntimeWarning, match=r"skipping seg/miou \(O_t=nan"):
        terms = uis_terms(original, unlearned_test, unlearned_forget)
    assert set(terms["seg"]) == {"pixel_acc"}


def test_retrain_gap_by_hand() -> None:
    unlearned = {"test": {"seg": {"miou": 0.7}, "depth": {"abs_err": 0.6}},
                 "forget": {"seg": {"miou": 0.75}}}
    retrained = {"test": {"seg": {"miou": 0.8}, "depth": {"abs_err": 0.5}},
                 "forget": {"seg": {"miou": 0.75}}}
    # bounded |0.7-0.8| = 0.1, relative |0.6-0.5|/0.5 = 0.2, 0, AUC |0.6-0.5| = 0.1
    value = retrain_gap(unlearned, retrained, 0.6, 0.5)
    assert math.isclose(value, 100 * (0.1 + 0.2 + 0.0 + 0.1) / 4)
    terms = retrain_gap_terms(unlearned, retrained, 0.6, 0.5)
    assert set(terms) == {"test/seg/miou", "test/depth/abs_err", "forget/seg/miou", "mia_auc"}
    assert retrain_gap(retrained, retrained) == 0.0
    with pytest.raises(ValueError, match="both"):
        retrain_gap(unlearned, retrained, 0.6, None)


def test_uis_refuses_inputs_that_name_other_tasks_or_metrics() -> None:
    """A task or metric key in one input only was skipped: a typo in a task name of
    `unlearned_test` left out the task the model had lost and scored it ~20x better."""
    original = {"kind": {"accuracy": 0.8}, "size": {"mse": 1.0}}
    unlearned_test = {"kind": {"accuracy": 0.78}, "Size": {"mse": 9.0}}
    forget = {"kind": {"accuracy": 0.5}, "size": {"mse": 9.0}}
    with pytest.raises(ValueError, match=r"uis: the tasks of `unlearned_test` differ from those "
                                         r"of `original_test`: missing \['size'\], extra "
                                         r"\['Size'\].*pass `tasks`"):
        uis(original, unlearned_test, forget)
    with pytest.raises(ValueError, match=r"the tasks of `unlearned_forget`.*missing \['size'\], "
                                         r"extra \[\]"):
        uis(original, original, {"kind": {"accuracy": 0.5}})
    # Within a task the metrics must agree too, `tasks` given or not.
    fewer = {"kind": {"accuracy": 0.5}, "size": {"mae": 9.0}}
    for tasks in (None, ["size"]):
        with pytest.raises(ValueError, match=r"uis: the metrics of task 'size' of "
                                             r"`unlearned_forget` differ from those of "
                                             r"`original_test`: missing \['mse'\], extra "
                                             r"\['mae'\]"):
            uis_terms(original, original, fewer, tasks=tasks)
    # The keys agreeing, the score is the one computed term by term.
    fixed = {"kind": {"accuracy": 0.78}, "size": {"mse": 9.0}}
    assert math.isclose(uis(original, fixed, forget),
                        ((2.5 + 37.5) / 2 + (800.0 + 800.0) / 2) / 2)
    # An explicit subset selects the tasks named in every input.
    assert math.isclose(uis(original, unlearned_test, forget, tasks=["kind"]), (2.5 + 37.5) / 2)


def test_retrain_gap_refuses_inputs_that_name_other_keys_and_aucs_outside_0_1() -> None:
    unlearned = {"forget": {"kind": {"accuracy": 0.5}}, "test": {"kind": {"accuracy": 0.2}}}
    typo = {"forget": {"kind": {"accuracy": 0.6}}, "Test": {"kind": {"accuracy": 0.79}}}
    with pytest.raises(ValueError, match=r"retrain_gap: the splits of `retrained` differ from "
                                         r"those of `unlearned`: missing \['test'\], extra "
                                         r"\['Test'\]"):
        retrain_gap(unlearned, typo)
    other_task = {"forget": {"kind": {"accuracy": 0.6}}, "test": {"Kind": {"accuracy": 0.79}}}
    with pytest.raises(ValueError, match=r"the tasks of split 'test' of `retrained`.*missing "
                                         r"\['kind'\], extra \['Kind'\]"):
        retrain_gap_terms(unlearned, other_task)
    other_metric = {"forget": {"kind": {"accuracy": 0.6}}, "test": {"kind": {"miou": 0.79}}}
    with pytest.raises(ValueError, match=r"the metrics of test/kind of `retrained`.*missing "
                                         r"\['accuracy'\], extra \['miou'\]"):
        retrain_gap(unlearned, other_metric)
    gold = {"forget": {"kind": {"accuracy": 0.6}}, "test": {"kind": {"accuracy": 0.79}}}
    assert math.isclose(retrain_gap(unlearned, gold), 100 * (0.1 + 0.59) / 2)
    for bad in (5.0, -3.0, float("inf"), 1.0000001):
        with pytest.raises(ValueError, match=r"retrain_gap: `unlearned_mia_auc` must be a number "
                                             r"in \[0, 1\]"):
            retrain_gap(unlearned, gold, bad, 0.5)
        with pytest.raises(ValueError, match=r"`retrained_mia_auc` must be a number in \[0, 1\]"):
            retrain_gap(unlearned, gold, 0.5, bad)
    for bad in (True, "0.5"):
        with pytest.raises(TypeError, match=r"`unlearned_mia_auc` must be a number"):
            retrain_gap(unlearned, gold, bad, 0.5)  # type: ignore[arg-type]
    # The bounds themselves and NaN (an attack that could not be scored) are accepted.
    assert math.isclose(retrain_gap(unlearned, gold, 0.0, 1.0), 100 * (0.1 + 0.59 + 1.0) / 3)
    assert retrain_gap(unlearned, gold, float("nan"), 0.5) == math.inf


# -- models that diverged, and other edge cases ---------------------------------------------------

def test_normals_median_of_a_nan_prediction_is_nan_not_a_perfect_score() -> None:
    """A NaN angle cast to a histogram bin landed in bin 0: an all-NaN prediction got a median
    of 0.005 degrees, the best score there is."""
    target = torch.tensor([[0.0, 0.0, 1.0]] * 4).T.reshape(1, 3, 1, 4)
    pred = torch.full_like(target, float("nan"))
    acc = make_accumulator(NORMALS)
    acc.update(pred, target)
    out = acc.compute()
    assert math.isnan(out["median_angle"]) and math.isnan(out["mean_angle"])
    assert out["within_11.25"] == 0.0
    # Half NaN: the median is NaN as numpy's; the finite half is still binned as before.
    half = torch.tensor([_unit(10.0), _unit(30.0)] + [[float("nan")] * 3] * 2).T.reshape(1, 3, 1, 4)
    acc = make_accumulator(NORMALS)
    acc.update(half, target)
    assert math.isnan(acc.compute()["median_angle"])
    assert math.isnan(float(np.median([10.0, 30.0, np.nan, np.nan])))
    finite = make_accumulator(NORMALS)
    finite.update(half[..., :2], target[..., :2])
    assert abs(finite.compute()["median_angle"] - 20.0) <= 0.005 + 1e-9


def test_nan_logits_score_nan_not_right() -> None:
    """Review: argmax takes NaN for the largest value, so NaN logits at the label scored as
    right (accuracy 1.0, mIoU 1.0) and a diverged model could look perfect; now NaN, which the
    scores (UIS, retrain gap) read as infinitely far. NaN only at ignored units, and -inf
    logits (a log-probability of zero), still score."""
    y = torch.tensor([0, 1, 2, 0])
    at_label = torch.zeros(4, 3)
    at_label[torch.arange(4), y] = float("nan")
    acc = make_accumulator(CLS)
    acc.update(at_label, y)
    assert math.isnan(acc.compute()["accuracy"])
    ignored = TaskSpec("cls", "classification", num_classes=3, ignore_index=-100)
    logits = torch.nn.functional.one_hot(y, 3).float().log()  # -inf off the label
    logits[3] = float("nan")
    acc = make_accumulator(ignored)
    acc.update(logits, torch.tensor([0, 1, 2, -100]))
    assert acc.compute() == {"accuracy": 1.0}
    target = torch.tensor([[[0, 1, 2, 1]]])
    pred = torch.zeros(1, 3, 1, 4)
    pred[0, target[0, 0], 0, torch.arange(4)] = float("nan")
    seg = make_accumulator(SEG)
    seg.update(pred, target)
    assert all(math.isnan(v) for v in seg.compute().values()) and seg.compute()
    binary = make_accumulator(TaskSpec("flag", "binary"))
    binary.update(torch.tensor([[float("nan")], [-1.0]]), torch.tensor([[0.0], [0.0]]))
    assert all(math.isnan(v) for v in binary.compute().values())
    finite = {"cls": {"accuracy": 0.9}}
    assert uis(finite, {"cls": {"accuracy": float("nan")}}, finite) == math.inf


def test_an_ignore_index_inside_the_classes_is_no_class_of_the_miou() -> None:
    """Class 0 is the ignore label: it labels no pixel, but predictions of it gave it a union
    and an IoU of 0 in the mean."""
    spec = TaskSpec("seg", "segmentation", num_classes=3, ignore_index=0)
    target = torch.tensor([[[1, 1, 2, 2, 0]]])
    pred_labels = torch.tensor([[[1, 0, 2, 2, 1]]])  # one labelled pixel predicted as class 0
    logits = nn.functional.one_hot(pred_labels, 3).permute(0, 3, 1, 2).float()
    acc = make_accumulator(spec)
    acc.update(logits, target)
    out = acc.compute()
    # class 1: tp 1, union 2 -> 0.5; class 2: tp 2, union 2 -> 1.0 (the ignored pixel counts not)
    assert math.isclose(out["miou"], 0.75)
    assert math.isclose(out["pixel_acc"], 3 / 4)
    confusion = confusion_matrix(pred_labels, target, 3, ignore_index=0)
    assert math.isclose(segmentation_scores(confusion)["miou"], (0.0 + 0.5 + 1.0) / 3)


def test_scores_count_a_diverged_models_metrics_as_infinitely_far() -> None:
    """A NaN (or infinite) metric of the unlearned model was dropped from the retrain gap and
    the UIS, so a model that diverged on one task scored better than one that did not."""
    retrained = {"test": {"depth": {"abs_err": 0.5, "rel_err": 0.2, "delta_1.25": 0.8}}}
    broken = {"test": {"depth": {"abs_err": float("nan"), "rel_err": float("inf"),
                                 "delta_1.25": 0.8}}}
    terms = retrain_gap_terms(broken, retrained)
    assert terms["test/depth/abs_err"] == math.inf and terms["test/depth/rel_err"] == math.inf
    assert terms["test/depth/delta_1.25"] == 0.0
    assert retrain_gap(broken, retrained) == math.inf
    assert retrain_gap(broken, retrained, float("nan"), 0.6) == math.inf
    assert retrain_gap_terms(retrained, retrained, float("nan"), 0.6)["mia_auc"] == math.inf
    # Undefined for the gold model too (no labelled pixel): left out, as before.
    gold_nan = {"test": {"depth": {"abs_err": float("nan"), "rel_err": 0.2, "delta_1.25": 0.8}}}
    assert set(retrain_gap_terms(broken, gold_nan)) == {"test/depth/rel_err",
                                                        "test/depth/delta_1.25"}
    assert "mia_auc" not in retrain_gap_terms(retrained, retrained, 0.6, float("nan"))
    original = {"depth": {"abs_err": 0.5, "delta_1.25": 0.8}}
    diverged = {"depth": {"abs_err": float("nan"), "delta_1.25": 0.8}}
    assert uis(original, diverged, diverged) == math.inf
    term = uis_terms(original, diverged, original)["depth"]["abs_err"]
    assert term["uis"] == math.inf and term["forget_change"] == 0.0


class _NaNOnFlag(nn.Module):
    """Logits, NaN on the rows whose column 2 is negative (a model that diverged there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.one_hot(x[:, 0].long(), 3).float() * 4.0
        return torch.where(x[:, 2:3] < 0, torch.full_like(logits, float("nan")), logits)


def test_mia_of_a_model_with_nan_losses_is_undefined_not_computed_on_the_rest() -> None:
    """Rows of supervised pairs whose loss is NaN were dropped as if unsupervised: the attack
    then scored the model on the rows where it still worked."""
    model = MultiTaskModel(_Echo(), {"cls": _NaNOnFlag()}, [CLS])
    members, test, forget = _mia_data(60, True, 0), _mia_data(60, False, 1), _mia_data(20, True, 2)
    assert membership_attack(model, members, test, forget).num_forget == 20  # all finite
    forget.inputs[:4, 2] = -1.0
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite on 4 forget, 0 member and 0 "):
        result = membership_attack(model, members, test, forget)
    assert math.isnan(result.auc) and math.isnan(result.member_auc)
    assert result.num_forget == 20 and result.num_members_fit == 30
    # Unsupervised pairs are still left out (by the mask): 5 forget rows without a label.
    partial = MultiTaskDataset(forget.inputs[4:], {"cls": forget.targets["cls"][4:]}, [CLS],
                               supervision=torch.arange(16).unsqueeze(1) >= 5)
    assert membership_attack(model, members, test, partial).num_forget == 11


TASK_A = TaskSpec("A", "classification", num_classes=3)
TASK_B = TaskSpec("B", "classification", num_classes=3)


def _two_task_mia_data(n: int, member: bool, seed: int) -> MultiTaskDataset:
    """Tasks "A" and "B" read the same column; every 4th row lacks B's label."""
    one = _mia_data(n, member, seed)
    labels = one.targets["cls"]
    supervision = torch.stack([torch.ones(n, dtype=torch.bool), torch.arange(n) % 4 != 3], dim=1)
    return MultiTaskDataset(one.inputs, {"A": labels, "B": labels}, [TASK_A, TASK_B],
                            supervision=supervision)


def test_mia_over_two_tasks_uses_only_the_rows_labelled_for_both() -> None:
    """Rows are chosen by the supervision mask of *every* attacked task: a row missing task B's
    label has a NaN loss there, and taking it (a row with *any* label) made the attack call a
    sound model diverged (a RuntimeWarning and a NaN AUC)."""
    model = MultiTaskModel(_Echo(), {"A": _Memoriser(), "B": _Memoriser()}, [TASK_A, TASK_B])
    members = _two_task_mia_data(80, True, 0)
    test = _two_task_mia_data(80, False, 1)
    forget = _two_task_mia_data(20, True, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        # Metrics review: the forget instances left out were left out silently.
        with pytest.warns(UserWarning, match=r"^membership_attack: 5 of 20 forget instances "
                                             r"lack a label of some task of \['A', 'B'\] and "
                                             r"are left out of the attack"):
            result = membership_attack(model, members, test, forget, tasks=["A", "B"])
    assert math.isfinite(result.auc) and math.isfinite(result.member_auc)
    assert result.auc > 0.99 and result.tasks == ("A", "B")
    # 15 of the 20 forget rows and 60 of the 80 members and non-members have both labels.
    assert result.num_forget == 15
    assert result.num_members_fit == 30
    assert result.num_non_members_fit == 30 and result.num_non_members_eval == 30


def test_mia_auc_negatives_are_the_held_out_half_of_the_test_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported AUCs rank against the half of the test set the attack was *not* fitted on;
    scored against the fitting half, the negatives were data the attack had seen (with 61 test
    rows the halves differ in size too: 31 fit, 30 held out)."""
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test = _mia_data(50, True, 0), _mia_data(61, False, 1)
    forget = _mia_data(12, True, 2)
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    real = membership_module.roc_auc_score

    def capture(labels: np.ndarray, scores: np.ndarray) -> float:
        calls.append((np.asarray(labels), np.asarray(scores)))
        return float(real(labels, scores))

    monkeypatch.setattr(membership_module, "roc_auc_score", capture)
    result = membership_attack(model, members, test, forget, attack="loss", seed=0)
    assert result.num_non_members_fit == 31 and result.num_non_members_eval == 30
    # The halves as the attack draws them: the members' permutation first, then the test set's.
    rng = np.random.default_rng(0)
    member_x = np.log(per_sample_task_losses(model, members)[:, 0].numpy() + 1e-8)
    test_x = np.log(per_sample_task_losses(model, test)[:, 0].numpy() + 1e-8)
    member_x = member_x[rng.permutation(len(member_x))]
    test_x = test_x[rng.permutation(len(test_x))]
    member_fit, member_eval = np.array_split(member_x, 2)
    test_fit, test_eval = np.array_split(test_x, 2)
    fit_x = np.concatenate([member_fit, test_fit])
    mean, std = fit_x.mean(), fit_x.std() + 1e-12
    expected_negatives = -(test_eval - mean) / std
    assert len(calls) == 2  # the forget AUC, then the member AUC
    for (labels, scores), positives in zip(calls, (len(forget), len(member_eval))):
        np.testing.assert_array_equal(labels[positives:], np.zeros(len(test_eval)))
        np.testing.assert_allclose(scores[positives:], expected_negatives, rtol=1e-9, atol=1e-12)
    assert math.isclose(result.auc, float(real(*calls[0])))


class _HalfOut(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :3] * 3.0).to(torch.bfloat16)


def test_per_sample_losses_of_half_precision_outputs_are_computed_in_float32() -> None:
    """The attack ranks per-sample losses; computed in bf16 they were rounded to 3 digits and
    tied."""
    model = MultiTaskModel(_Echo(), {"cls": _HalfOut()}, [CLS])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
    data = MultiTaskDataset(x, {"cls": labels}, [CLS])
    losses = per_sample_task_losses(model, data)[:, 0]
    logits = (x * 3.0).to(torch.bfloat16).float()
    expected = nn.functional.cross_entropy(logits, labels, reduction="none").double()
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-7)
    assert len(set(losses.tolist())) == 64


def test_the_attack_takes_losses_below_zero() -> None:
    """Metrics audit: a task's custom loss may be negative (a Gaussian negative log-likelihood
    on a mean + log-variance head); the attack's feature log(l + 1e-8) was NaN there and
    sklearn raised "Input contains NaN". The scale now goes on below zero, keeping the order
    of the losses (the loss attack's AUC is theirs), and non-negative losses keep their log's
    bits."""
    losses = torch.tensor([-50.0, -1.0, -1e-9, 0.0, 1e-9, 0.5, 3.0], dtype=torch.float64)
    scaled = membership_module._log_scale(losses)
    assert bool(torch.isfinite(scaled).all()) and bool((scaled.diff() > 0).all())
    assert torch.equal(scaled[3:], torch.log(losses[3:] + 1e-8))

    def nll(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mean, log_var = pred[:, :1], pred[:, 1:2]
        return (0.5 * (log_var + (target - mean) ** 2 / log_var.exp())).mean(dim=1)

    class Head(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.cat([z[:, :1], torch.full_like(z[:, :1], -3.0)], dim=1)

    spec = TaskSpec("r", "regression", loss=nll)
    model = MultiTaskModel(nn.Identity(), {"r": Head()}, [spec])
    g = torch.Generator().manual_seed(0)

    def data(n: int, spread: float) -> MultiTaskDataset:
        return MultiTaskDataset(torch.randn(n, 1, generator=g) * spread, {"r": torch.zeros(n, 1)},
                                [spec])

    members, non_members, forget = data(40, 0.1), data(40, 0.5), data(10, 0.1)
    assert float(nll(Head()(forget.inputs), forget.targets["r"]).max()) < 0  # all below zero
    for attack in ("loss", "logistic"):
        result = membership_attack(model, members, non_members, forget, attack=attack)  # type: ignore[arg-type]
        assert 0.5 < result.auc <= 1.0, (attack, result.auc)


# -- boundaries a mutation review found unpinned ------------------------------------------------


def test_retrain_gap_of_an_error_retrained_to_zero_is_the_absolute_gap() -> None:
    """An unbounded error the retrained model has at exactly 0 has no relative gap: the
    absolute one (x100) stands in, not a ZeroDivisionError."""
    gap = retrain_gap({"test": {"d": {"abs_err": 0.3}}}, {"test": {"d": {"abs_err": 0.0}}})
    assert gap == pytest.approx(30.0)
    assert retrain_gap({"test": {"d": {"abs_err": 0.3}}},
                       {"test": {"d": {"abs_err": 0.2}}}) == pytest.approx(50.0)


def test_uis_of_a_negative_original_metric_is_a_positive_relative_change() -> None:
    """Relative changes divide by |O_t|: a custom metric below zero gives the same positive
    terms as its mirror image above zero."""
    below = uis({"a": {"m": -2.0}}, {"a": {"m": -1.0}}, {"a": {"m": -2.0}},
                higher_is_better={"m": True})
    above = uis({"a": {"m": 2.0}}, {"a": {"m": 1.0}}, {"a": {"m": 2.0}},
                higher_is_better={"m": True})
    assert below == pytest.approx(25.0) and above == pytest.approx(25.0)
    terms = uis_terms({"a": {"m": -2.0}}, {"a": {"m": -2.0}}, {"a": {"m": -3.0}},
                      higher_is_better={"m": True})["a"]["m"]
    assert terms["forget_change"] == pytest.approx(50.0) and terms["test_change"] == 0.0


def test_a_non_positive_depth_prediction_is_never_within_the_delta_threshold() -> None:
    """``max(d_hat / d, d / d_hat)`` of a negative prediction is negative (below 1.25): the
    clamp makes it infinite, a miss."""
    accumulator = make_accumulator(TaskSpec("d", "depth"))
    accumulator.update(torch.tensor([[[[-1.0, 0.0, 1.1]]]]), torch.tensor([[[[1.0, 1.0, 1.0]]]]))
    scores = accumulator.compute()
    assert scores["delta_1.25"] == pytest.approx(1 / 3)  # only the 1.1 prediction
    assert scores["abs_err"] == pytest.approx((2.0 + 1.0 + 0.1) / 3)


def test_a_prediction_equal_to_the_class_count_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`pred_labels` has 1 predictions outside \[0, 3\)"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(ValueError, match=r"`target` has 1 labels outside \[0, 3\)"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)
    assert confusion_matrix(torch.tensor([2]), torch.tensor([2]), 3)[2, 2] == 1


def test_classification_accuracy_leaves_out_an_ignore_index_that_is_a_class() -> None:
    """With ``ignore_index`` 0 (a real class id), rows labelled 0 are not counted: accuracy over
    the other rows, never above 1."""
    accumulator = make_accumulator(TaskSpec("c", "classification", num_classes=3,
                                            ignore_index=0))
    logits = nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).float()
    accumulator.update(logits, torch.tensor([0, 1, 2, 1]))
    assert accumulator.compute() == {"accuracy": pytest.approx(2 / 3)}
    assert accumulator.count == 3



def test_a_uint8_label_255_is_a_class_under_the_default_ignore_index() -> None:
    """Metrics review: ``target != -1`` compares a uint8 label with -1 as with 255, so the
    metrics left out class 255 of a 256-class task (accuracy 0.0 over 1 row instead of 0.5
    over 2; a NaN logit at a class-255 pixel went unseen and the mIoU read 1.0), while the loss
    and the supervision mask count it as a class."""
    spec = TaskSpec("c", "classification", num_classes=256)
    labels = torch.tensor([255, 3], dtype=torch.uint8)
    logits = torch.zeros(2, 256)
    logits[0, 255] = logits[1, 0] = 5.0
    accumulator = make_accumulator(spec)
    accumulator.update(logits, labels)
    assert accumulator.compute() == {"accuracy": 0.5} and accumulator.count == 2
    seg = TaskSpec("s", "segmentation", num_classes=256)
    pred = torch.zeros(1, 256, 1, 2)
    pred[0, 255, 0, 0] = float("nan")
    accumulator = make_accumulator(seg)
    accumulator.update(pred, torch.tensor([[[255, 0]]], dtype=torch.uint8))
    assert all(math.isnan(v) for v in accumulator.compute().values())

def test_mia_max_members_caps_the_members_used() -> None:
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test, forget = _mia_data(40, True, 0), _mia_data(40, False, 1), _mia_data(10, True, 2)
    assert membership_attack(model, members, test, forget).num_members_fit == 20
    assert membership_attack(model, members, test, forget, max_members=10).num_members_fit == 5



@pytest.mark.parametrize("cap", [-1, 0, 1, True, 2.5])
def test_mia_refuses_a_member_cap_that_leaves_a_half_without_members(cap: object) -> None:
    """Metrics review: ``max_members=-1`` sliced ``[:-1]`` and silently dropped one member (25
    fitted of 50, not an error); 0 and 1 left a half empty and sklearn failed with a message
    that named neither the argument nor the attack."""
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test, forget = _mia_data(50, True, 0), _mia_data(20, False, 1), _mia_data(5, True, 2)
    with pytest.raises(ValueError, match=r"`max_members` must be an integer >= 2"):
        membership_attack(model, members, test, forget, max_members=cap)  # type: ignore[arg-type]
    assert membership_attack(model, members, test, forget, max_members=2).num_members_fit == 1


def test_mia_refuses_an_unknown_attack_on_a_diverged_model_too() -> None:
    """The name was checked only after the features: a model with NaN losses returned NaN AUCs
    for ``attack="svm"`` instead of the error."""
    model = MultiTaskModel(_Echo(), {"cls": _NaNOnFlag()}, [CLS])
    members, test, forget = _mia_data(20, True, 0), _mia_data(20, False, 1), _mia_data(5, True, 2)
    forget.inputs[:1, 2] = -1.0
    with pytest.raises(ValueError, match="unknown attack 'svm'"):
        membership_attack(model, members, test, forget, attack="svm")  # type: ignore[arg-type]


def test_mia_with_no_tasks_names_the_empty_tasks_argument() -> None:
    """An empty ``tasks`` was reported as a forget set without a supervised pair."""
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test, forget = _mia_data(20, True, 0), _mia_data(20, False, 1), _mia_data(5, True, 2)
    with pytest.raises(ValueError, match=r"`tasks` is empty"):
        membership_attack(model, members, test, forget, tasks=[])


def test_mia_needs_four_members_and_non_members() -> None:
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, forget = _mia_data(40, True, 0), _mia_data(10, True, 2)
    membership_attack(model, members, _mia_data(4, False, 1), forget)
    with pytest.raises(ValueError, match=r"needs >= 4 members and non-members .* got 40 and 3"):
        membership_attack(model, members, _mia_data(3, False, 1), forget)


def test_mia_of_two_tasks_with_nan_on_one_is_undefined() -> None:
    """A row counts as diverged when *any* attacked task's loss is NaN, not only all."""
    model = MultiTaskModel(_Echo(), {"A": _Memoriser(), "B": _NaNOnFlag()}, [TASK_A, TASK_B])
    members = _two_task_mia_data(40, True, 0)
    test = _two_task_mia_data(40, False, 1)
    forget = _two_task_mia_data(12, True, 2)
    forget.inputs[:2, 2] = -1.0  # B's loss NaN on two forget rows, A's finite
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite on 2 forget, 0 member"), \
            pytest.warns(UserWarning, match=r"3 of 12 forget instances lack a label"):
        result = membership_attack(model, members, test, forget, tasks=["A", "B"])
    assert math.isnan(result.auc)


class _BadAtLabel(nn.Module):
    """Logits of the label in column 0, set to ``value`` on the rows whose column 2 is negative:
    NaN gives a NaN cross-entropy there, -inf an infinite one."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = nn.functional.one_hot(x[:, 0].long(), 3).bool()
        logits = label.float() * 4.0
        return torch.where(label & (x[:, 2:3] < 0), torch.full_like(logits, self.value), logits)


@pytest.mark.parametrize("value", [math.nan, -math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("diverged", ["member", "non-member"])
def test_mia_of_a_model_diverged_on_members_or_test_rows_is_undefined(
        diverged: str, value: float) -> None:
    """Mutation review: only NaN losses on forget rows had a test, so leaving the members' or
    the test rows' count out of the non-finite check went unnoticed (sklearn then refused the
    NaN or infinite features: a ValueError, not the warning and NaN AUCs). An infinite loss is
    as undefined as a NaN one."""
    model = MultiTaskModel(_Echo(), {"cls": _BadAtLabel(value)}, [CLS])
    members, test, forget = _mia_data(60, True, 0), _mia_data(60, False, 1), _mia_data(20, True, 2)
    (members if diverged == "member" else test).inputs[:3, 2] = -1.0
    counts = ("0 member and 3 non-member" if diverged == "non-member"
              else "3 member and 0 non-member")
    with pytest.warns(RuntimeWarning, match=rf"NaN or infinite on 0 forget, {counts} rows; the "
                                            r"AUCs are NaN"):
        result = membership_attack(model, members, test, forget)
    assert math.isnan(result.auc) and math.isnan(result.member_auc)
    assert (result.num_forget, result.num_members_fit, result.num_non_members_fit,
            result.num_non_members_eval) == (20, 30, 30, 30)


def test_mia_member_auc_ranks_the_members_the_attack_was_not_fitted_on() -> None:
    """``member_auc`` is the docstring's "held-out retain vs held-out test": the members' half
    the attack did not fit on, against the held-out test half. Mutation review: scored on the
    fitting half (or on every member) it went unnoticed, every test's members being alike.
    Here half the members are remembered (confidence 8 + noise) and half not (1 + noise): the
    loss attack ranks by loss, which falls as the confidence rises, so the expected AUC is the
    share of (member, test) pairs whose member has the higher confidence, from the inputs."""
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test = _mia_data(40, True, 0), _mia_data(40, False, 1)
    members.inputs[20:, 1] = 0.0  # not remembered
    forget = _mia_data(10, True, 2)
    result = membership_attack(model, members, test, forget, attack="loss", seed=3)

    def confidence(data: MultiTaskDataset) -> np.ndarray:
        x = data.inputs.double().numpy()
        return np.where(x[:, 1] > 0, 8.0, 1.0) + x[:, 2]

    rng = np.random.default_rng(3)  # the attack's draws: the members' order, then the test's
    member_fit, member_eval = np.array_split(confidence(members)[rng.permutation(40)], 2)
    _, test_eval = np.array_split(confidence(test)[rng.permutation(40)], 2)

    def share_above(positives: np.ndarray) -> float:
        return float((positives[:, None] > test_eval[None, :]).mean())

    expected = share_above(member_eval)
    # The data tell the halves apart: the other choices give other values.
    assert abs(share_above(member_fit) - expected) > 0.05
    assert abs(share_above(np.concatenate([member_fit, member_eval])) - expected) > 0.02
    assert result.member_auc == pytest.approx(expected, abs=1e-12)


def _with_unlabelled_rows(data: MultiTaskDataset, extra: int) -> MultiTaskDataset:
    """``data`` and ``extra`` more rows marked supervised whose label is ``ignore_index``."""
    labels = torch.cat([data.targets["cls"], torch.full((extra,), -1)])
    inputs = torch.cat([data.inputs, data.inputs[:extra]])
    return MultiTaskDataset(inputs, {"cls": labels}, [CLS],
                            supervision=torch.ones(len(labels), 1, dtype=torch.bool))


def test_mia_leaves_out_supervised_rows_without_a_label() -> None:
    """Metrics review: a supervision mask given by hand may mark rows whose label is
    ignore_index. The loss of such a row is 0 (a mean over no labelled unit), the most
    member-like loss there is: a forget set of unseen-looking instances, half of them such
    rows, had an AUC of 0.747 instead of its labelled half's 0.493, a forget set of such rows
    only scored 1.0 (evaluate measured nothing on it), and such rows among the members and
    non-members moved the AUC to 0.425. They are left out, as rows of an unsupervised pair
    are, and said to be."""
    model = MultiTaskModel(_Echo(), {"cls": _Memoriser()}, [CLS])
    members, test = _mia_data(60, True, 0), _mia_data(60, False, 1)
    forget = _mia_data(10, False, 3)
    attacks: tuple[MembershipAttack, ...] = ("logistic", "loss")
    for attack in attacks:
        expected = membership_attack(model, members, test, forget, attack=attack)
        with pytest.warns(UserWarning, match=r"10 of 20 forget instances lack a label"):
            padded = membership_attack(model, members, test, _with_unlabelled_rows(forget, 10),
                                       attack=attack)
        assert padded == expected and padded.num_forget == 10
        # Members and non-members such rows are left out too (they join no half).
        assert membership_attack(model, _with_unlabelled_rows(members, 20),
                                 _with_unlabelled_rows(test, 20), forget,
                                 attack=attack) == expected
    assert membership_module.attackable_instances(_with_unlabelled_rows(forget, 4), ["cls"]) == 10
    unlabelled = _with_unlabelled_rows(forget, 10).subset(torch.arange(10, 20))
    assert evaluate(model, unlabelled) == {}
    with pytest.raises(ValueError, match=r"forget set has no supervised pair with a label"):
        membership_attack(model, members, test, unlabelled)
    with pytest.raises(ValueError, match=r"no forget instance has every task of \['cls'\]"):
        membership_attack(model, members, test, unlabelled, ["cls"])


def test_scores_with_no_defined_term_name_the_undefined_ones() -> None:
    """Metrics review: a perfect original model (O_t = 0 for every error) leaves no UIS term,
    and the error said "no (task, metric) present in all three inputs", which they were; a
    retrained model with NaN metrics (none measurable) said "no metric present in both
    inputs". Both now say that no term is defined and which terms are undefined."""
    perfect = {"size": {"mse": 0.0, "mae": 0.0}}
    worse = {"size": {"mse": 1.0, "mae": 1.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # each skipped term's own warning
        with pytest.raises(ValueError, match=r"^uis: no term is defined: O_t is 0 or not finite "
                                             r"for every \(task, metric\) scored: \['size/mse "
                                             r"\(O_t=0\)', 'size/mae \(O_t=0\)'\]$"):
            uis(perfect, perfect, worse)
        with pytest.raises(ValueError, match=r"^uis: no term is defined: no task or metric"):
            uis(perfect, perfect, worse, tasks=[])
    nan = {"forget": {"size": {"mse": float("nan")}}}
    with pytest.raises(ValueError, match=r"^retrain_gap: no term is defined: the retrained "
                                         r"model's value is not finite for every one: "
                                         r"\['forget/size/mse', 'mia_auc'\]$"):
        retrain_gap({"forget": {"size": {"mse": 1.0}}}, nan, 0.5, float("nan"))
    with pytest.raises(ValueError, match=r"^retrain_gap: no term is defined: the inputs hold"):
        retrain_gap({}, {})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_predictions_are_scored_in_float64(dtype: torch.dtype) -> None:
    """Metrics review (found correct, pinned): a half-precision model's outputs near the top
    of its range are scored from float64 copies; squared errors of 6e4 (fp16) or 3e38 (bf16)
    would overflow in the model's type, and sums over many pixels lose their last digits."""
    g = torch.Generator().manual_seed(0)
    top = 6.0e4 if dtype == torch.float16 else 3.0e38
    pred = (torch.rand(64, 5, generator=g) * 2 - 1).mul(top).to(dtype)
    target = (torch.rand(64, 5, generator=g) * 2 - 1).mul(top).to(dtype)
    diff = pred.double() - target.double()
    regression = make_accumulator(TaskSpec("r", "regression"))
    regression.update(pred, target)
    assert regression.compute() == pytest.approx(
        {"mse": float(diff.pow(2).mean()), "mae": float(diff.abs().mean())}, rel=1e-12)
    depth_pred = (torch.rand(2, 1, 32, 32, generator=g) * top).to(dtype)
    depth = torch.rand(2, 1, 32, 32, generator=g).to(dtype) * 10 + 0.5
    d_hat, d = depth_pred.double().flatten(), depth.double().flatten()
    accumulator = make_accumulator(DEPTH)
    accumulator.update(depth_pred, depth)
    expected = {"abs_err": float((d_hat - d).abs().mean()),
                "rel_err": float(((d_hat - d).abs() / d).mean()),
                "delta_1.25": float((torch.maximum(d_hat / d, d / d_hat) < 1.25).double().mean())}
    assert accumulator.compute() == pytest.approx(expected, rel=1e-12)
    normals_pred = (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1).mul(top).to(dtype)
    normals = nn.functional.normalize(torch.randn(2, 3, 8, 8, generator=g), dim=1).to(dtype)
    unit = normals_pred.double() / normals_pred.double().norm(dim=1, keepdim=True)
    angles = torch.rad2deg(torch.arccos((unit * normals.double()).sum(dim=1).clamp(-1, 1)))
    accumulator = make_accumulator(NORMALS)
    accumulator.update(normals_pred, normals)
    assert accumulator.compute()["mean_angle"] == pytest.approx(float(angles.mean()), rel=1e-9)


def test_retrain_gap_warns_of_terms_left_out_for_a_non_finite_retrained_value() -> None:
    """A retrained value that is not finite was left out of the gap without a word: with the
    retrained model's attack AUC NaN (a diverged gold model), a gap over the metrics that
    happened to agree was 0.0, "indistinguishable from retraining"."""
    scores = {"test": {"kind": {"accuracy": 0.8}}}
    with pytest.warns(RuntimeWarning, match=re.escape(
            "retrain_gap: the retrained model's value is not finite for ['mia_auc']: left out "
            "of the gap, which is the mean over the other 1 term(s)")):
        assert retrain_gap(scores, scores, 0.9, float("nan")) == 0.0
    gold = {"test": {"kind": {"accuracy": float("nan")}, "size": {"mse": 1.0}}}
    unlearned = {"test": {"kind": {"accuracy": 0.8}, "size": {"mse": 1.5}}}
    with pytest.warns(RuntimeWarning, match=re.escape("not finite for ['test/kind/accuracy']")):
        assert math.isclose(retrain_gap(unlearned, gold), 50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every term defined: no warning
        assert math.isclose(retrain_gap(unlearned, {"test": {"kind": {"accuracy": 0.7},
                                                              "size": {"mse": 1.0}}}, 0.5, 0.5),
                            100 * (0.1 + 0.5 + 0.0) / 3)
