"""Leakage and split hygiene of the evaluation harness: the numbers of
``benchmarks/UNLEARNING_RESULTS.md`` are honest only if no split reaches a phase it must not.

Each test would fail if its rule broke: (1) the benchmark splits, and the forget / retain /
held-out sets made of them, are disjoint where they must be, in ids and in samples, also after
a chained request and in partial requests (whose forget instances stay in the retain set for
their other tasks); (2) the gold retrained model is never given a removed label; (3) tuning
reads no test data (every access to the test split is recorded); (4) the membership attack
fits and scores disjoint samples, its non-members all unseen; (5) seeds; (6) no input
statistic pools test or forget data.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import mtunlearn_ext.experiment as experiment
import mtunlearn_ext.metrics.membership as membership
import mtunlearn_ext.training as training
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec
from mtunlearn_ext.data.base import Benchmark
from mtunlearn_ext.data.digits import make_digits
from mtunlearn_ext.data.indoor import make_indoor
from mtunlearn_ext.data.registry import UNSEEN_ID_OFFSET, load_benchmark, unseen_instances
from mtunlearn_ext.experiment import ExperimentConfig, build_request
from mtunlearn_ext.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _ids(dataset: MultiTaskDataset) -> set[int]:
    return {int(i) for i in dataset.ids.tolist()}


def _samples(dataset: MultiTaskDataset) -> set[bytes]:
    """Each input row's bytes: two splits holding the same sample under two ids share one."""
    assert isinstance(dataset.inputs, torch.Tensor)
    return {row.numpy().tobytes() for row in dataset.inputs.contiguous()}


def _pairs(dataset: MultiTaskDataset) -> set[tuple[int, str]]:
    """The supervised (instance id, task) pairs."""
    rows, columns = dataset.supervision.nonzero(as_tuple=True)
    return {(int(dataset.ids[r]), dataset.task_names[c])
            for r, c in zip(rows.tolist(), columns.tolist())}


@pytest.fixture(scope="module")
def digits() -> Benchmark:
    return load_benchmark("digits", size="tiny", seed=0)


# -- (1) disjoint splits ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["indoor", "street", "digits"])
@pytest.mark.parametrize("seed", [0, 1])
def test_benchmark_splits_share_no_id_and_no_sample(name: str, seed: int) -> None:
    bench = load_benchmark(name, size="tiny", seed=seed, use_cache=False)
    splits = {"train": bench.train, "test": bench.test}
    if bench.validation is not None:
        splits["validation"] = bench.validation
    if name != "digits":
        assert bench.validation is not None  # the held-out set the presets calibrate on
        splits["unseen"] = unseen_instances(name, 4, seed=seed, size="tiny")
        assert min(_ids(splits["unseen"])) == UNSEEN_ID_OFFSET
    names = list(splits)
    for i, a in enumerate(names):
        assert len(_ids(splits[a])) == len(splits[a])
        for b in names[i + 1:]:
            assert not _ids(splits[a]) & _ids(splits[b]), (a, b)
            assert not _samples(splits[a]) & _samples(splits[b]), (a, b)


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_forget_and_retain_pairs_partition_the_training_pairs(digits: Benchmark,
                                                              kind: str) -> None:
    train = digits.train
    request = build_request(train, kind, seed=0, forget_fraction=0.1)  # type: ignore[arg-type]
    forget, retain = request.split(train)
    targets = set(request.resolved_tasks(train))
    forget_pairs, retain_pairs = _pairs(forget), _pairs(retain)
    assert not forget_pairs & retain_pairs
    assert forget_pairs | retain_pairs == _pairs(train)
    assert forget_pairs == {(i, t) for i in request.instance_ids for t in targets}
    # The forget and retain sets are training instances, none of the test split.
    assert not (_ids(forget) | _ids(retain)) & _ids(digits.test)
    assert not (_samples(forget) | _samples(retain)) & _samples(digits.test)
    if kind == "full":
        assert not _ids(forget) & _ids(retain)
        assert not _samples(forget) & _samples(retain)
    else:
        # The forget instances stay for their other tasks, with every one of those labels.
        others = set(train.task_names) - targets
        assert _ids(forget) <= _ids(retain)
        assert {(i, t) for i in request.instance_ids for t in others} <= retain_pairs


def test_a_chained_request_keeps_the_earlier_removals_out_of_both_sets(digits: Benchmark
                                                                       ) -> None:
    train = digits.train
    ids = sorted(_ids(train))
    earlier = [ForgetRequest.create(ids[:6], ["digit"]), ForgetRequest.create(ids[6:9])]
    request = ForgetRequest.create(ids[3:12])  # overlaps both earlier requests
    with pytest.warns(UserWarning, match="were removed already"):
        problem = build_problem(build_model(digits, seed=0), train_data=train,
                                forget_request=request, earlier_requests=earlier)
    removed = {(i, "digit") for i in ids[:6]} | {(i, t) for i in ids[6:9]
                                                 for t in train.task_names}
    forget_pairs, retain_pairs = _pairs(problem.forget), _pairs(problem.retain)
    assert not removed & forget_pairs and not removed & retain_pairs
    assert not forget_pairs & retain_pairs
    assert forget_pairs | retain_pairs | removed == _pairs(train)
    # The first request was partial: its instances outside this one keep their other labels.
    assert {(i, t) for i in ids[:3] for t in ("parity", "magnitude")} <= retain_pairs


def test_the_command_lines_chained_request_keeps_the_earlier_removals_out(digits: Benchmark
                                                                          ) -> None:
    """The sets ``mtunlearn unlearn`` builds on a checkpoint that carries earlier removals
    (the same calls, in the same order, as the command)."""
    from mtunlearn_ext.workflow import (
        build_user_request,
        exclude_removed,
        removal_entry,
        without_removed,
    )

    train = digits.train
    ids = sorted(_ids(train))
    earlier = [removal_entry(ForgetRequest.create(ids[:6], ["digit"])),
               removal_entry(ForgetRequest.create(ids[6:9]))]
    remaining = without_removed(train, earlier)
    request, _ = build_user_request(remaining, forget_ids=ids[3:12], forget_fraction=None,
                                    target_tasks=None, request_type=None, seed=0)
    forget, _ = request.split(remaining)
    _, retain = request.split(train)
    retain, _ = exclude_removed(retain, earlier)
    removed = {(i, "digit") for i in ids[:6]} | {(i, t) for i in ids[6:9]
                                                 for t in train.task_names}
    forget_pairs, retain_pairs = _pairs(forget), _pairs(retain)
    assert not removed & forget_pairs and not removed & retain_pairs
    assert not forget_pairs & retain_pairs
    assert forget_pairs | retain_pairs | removed == _pairs(train)


# -- (2) the gold model ------------------------------------------------------------------------


def _tiny_config(tmp_path: Path, request: str, **fields: Any) -> ExperimentConfig:
    return ExperimentConfig(benchmark="digits", size="tiny",
                            request=request,  # type: ignore[arg-type]
                            methods=[], seed=0, cache_dir=str(tmp_path / "cache"),
                            output=str(tmp_path / "run.json"),
                            train_overrides={"epochs": 1}, threads=1, **fields)


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_the_retrained_model_is_never_given_a_removed_label(tmp_path: Path, kind: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Every batch the gold model's training computes a loss on is recorded: its supervised
    pairs are exactly the retain pairs, and a removed pair's target is the "no label" value,
    so the removed label itself never reaches the loss. The cache holds a gold model of
    another request of the same seed beforehand, which must not stand in for this one."""
    seen: set[tuple[int, str]] = set()
    removed_values: set[int] = set()
    config = _tiny_config(tmp_path, kind)
    bench = load_benchmark("digits", size="tiny", seed=0)
    request = build_request(bench.train, kind, 0, config.forget_fraction)  # type: ignore[arg-type]
    targets = request.resolved_tasks(bench.train)
    forget_ids = set(request.instance_ids)
    original_loss = training.masked_multitask_loss

    def recording_loss(out: Any, batch: dict[str, Any], specs: Any, supervision: torch.Tensor,
                       weights: Any) -> Any:
        for row, instance in enumerate(batch["id"].tolist()):
            for column, spec in enumerate(specs):
                if bool(supervision[row, column]):
                    seen.add((int(instance), spec.name))
                elif instance in forget_ids and spec.name in targets:
                    removed_values.add(int(batch["targets"][spec.name][row]))
        return original_loss(out, batch, specs, supervision, weights)

    monkeypatch.setattr(training, "masked_multitask_loss", recording_loss)
    # A gold model of another request of the same seed, cached first, is not the one used.
    other = sorted(_ids(bench.train) - forget_ids)[:len(forget_ids)]
    experiment.train_reference_model(_tiny_config(tmp_path, kind, forget_ids=other),
                                     "retrained", bench)
    seen.clear()
    removed_values.clear()
    experiment.train_reference_model(config, "retrained", bench)
    train_pairs = _pairs(bench.train)
    removed = {(i, t) for i in forget_ids for t in targets}
    assert seen == train_pairs - removed
    if kind == "partial":  # the forget instances' other labels are all trained on
        assert {(i, t) for i in forget_ids for t in bench.train.task_names
                if t not in targets} <= seen
    else:
        assert not {i for i, _ in seen} & forget_ids
    assert removed_values <= {-1}  # only the ignore index, never a class


# -- (3) tuning reads no test data --------------------------------------------------------------


_DATA_ATTRIBUTES = frozenset({"inputs", "targets", "supervision", "ids", "batch", "subset",
                              "with_supervision", "iter_batches", "labelled_pairs",
                              "__getitem__", "positions_of"})


class _RecordedDataset(MultiTaskDataset):
    """A data set that logs every read of its rows (the attribute names, to ``reads``)."""

    reads: list[str]

    def __getattribute__(self, name: str) -> Any:
        if name in _DATA_ATTRIBUTES:
            object.__getattribute__(self, "reads").append(name)
        return object.__getattribute__(self, name)


def _recorded(dataset: MultiTaskDataset) -> _RecordedDataset:
    copy = _RecordedDataset.__new__(_RecordedDataset)
    copy.__dict__.update(dataset.__dict__)
    copy.reads = []
    return copy


@pytest.fixture(scope="module")
def indoor_recorded() -> Iterator[Benchmark]:
    bench = load_benchmark("indoor", size="tiny", seed=0, use_cache=False)
    assert bench.validation is not None
    yield Benchmark(bench.name, bench.train, _recorded(bench.test), bench.tasks, bench.info,
                    _recorded(bench.validation))


def test_the_tuning_grid_reads_no_test_data(tmp_path: Path, indoor_recorded: Benchmark
                                            ) -> None:
    from mtunlearn_ext.tuning import tune

    config = ExperimentConfig(benchmark="indoor", size="tiny", request="partial",
                              methods=["finetune"], seed=0, cache_dir=str(tmp_path / "cache"),
                              output=str(tmp_path / "tune.json"),
                              train_overrides={"epochs": 1}, threads=1)
    test = indoor_recorded.test
    assert isinstance(test, _RecordedDataset)
    test.reads.clear()
    result = tune(config, [1e-3], [1, 2], retain_eval=8, benchmark=indoor_recorded)
    assert test.reads == []
    assert {r["method"] for r in result["records"]} == {"original", "finetune"}
    assert set(result["gold"]) == {"forget", "retain"}


def test_the_benchmark_tuning_reads_validation_but_no_test_data(
        tmp_path: Path, indoor_recorded: Benchmark, monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/unlearning_eval.py --tune``, whose files ``--select`` ranks: the
    validation split is read (the recorder works), the test split never, and the records
    hold the metrics of the forget, retain and validation sets alone."""
    spec = importlib.util.spec_from_file_location("unlearning_eval_leakage",
                                                  ROOT / "benchmarks" / "unlearning_eval.py")
    assert spec is not None and spec.loader is not None
    evaluation = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = evaluation
    spec.loader.exec_module(evaluation)
    monkeypatch.setattr(experiment, "_load_benchmark", lambda config: indoor_recorded)
    test, validation = indoor_recorded.test, indoor_recorded.validation
    assert isinstance(test, _RecordedDataset) and isinstance(validation, _RecordedDataset)
    test.reads.clear()
    validation.reads.clear()
    threads = torch.get_num_threads()
    try:
        assert evaluation.main([
            "--tune", "--benchmarks", "indoor", "--requests", "partial", "--seeds", "0",
            "--size", "tiny", "--methods", "finetune", "--grid",
            json.dumps({"finetune": {"lr": [1e-3]}}), "--checkpoints", "1,2",
            "--retain-eval", "8", "--train", json.dumps({"epochs": 1}),
            "--output-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert test.reads == [] and validation.reads
    records = json.loads((tmp_path / "tuning" / "indoor-partial-seed0.json").read_text())
    scored = [r for r in records["records"] if r["method"] == "finetune"]
    assert scored and all(set(r["metrics"]) == {"forget", "retain", "validation"}
                          for r in scored)
    assert set(records["gold"]) == set(records["original"]) == {"forget", "retain",
                                                                  "validation"}


# -- (4) the membership attack -----------------------------------------------------------------


def _id_dataset(ids: range) -> MultiTaskDataset:
    n = len(ids)
    return MultiTaskDataset(torch.zeros(n, 2), {"a": torch.zeros(n, dtype=torch.long)},
                            [TaskSpec("a", "classification", num_classes=2)],
                            ids=torch.tensor(list(ids)))


def _record_halves(monkeypatch: pytest.MonkeyPatch) -> list[list[np.ndarray]]:
    """Make each instance's loss its id + 1 (every feature row of the attack names its
    instance, :func:`_ids_of_features`) and record the halves the attack splits its members
    and non-members into (fit, evaluation), in that order."""
    monkeypatch.setattr(membership, "per_sample_task_losses",
                        lambda model, data, tasks, batch_size: (
                            data.ids.double() + 1)[:, None].expand(-1, len(tasks)))
    halves: list[list[np.ndarray]] = []
    numpy_seen_by_attack = types.ModuleType("numpy_seen_by_attack")
    numpy_seen_by_attack.__dict__.update(np.__dict__)

    def recording_split(rows: np.ndarray, parts: int) -> list[np.ndarray]:
        halves.append(np.array_split(rows, parts))
        return halves[-1]

    numpy_seen_by_attack.array_split = recording_split  # type: ignore[attr-defined]
    monkeypatch.setattr(membership, "np", numpy_seen_by_attack)
    return halves


def _ids_of_features(log_losses: np.ndarray) -> list[int]:
    """The instance ids of the attack's feature rows under :func:`_record_halves`."""
    return [int(round(v)) for v in np.exp(log_losses[:, 0] if log_losses.ndim == 2
                                          else log_losses) - 1]


@pytest.mark.parametrize("attack", ["logistic", "loss"])
def test_the_attack_fits_and_scores_disjoint_samples(attack: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each instance's loss is made its id + 1, so every feature row names its instance. The
    halves the attack draws, the rows it is fitted and standardised on, and the rows each AUC
    scores are recorded and mapped back to ids."""
    members, non_members = _id_dataset(range(0, 40)), _id_dataset(range(100, 131))
    forget = _id_dataset(range(200, 210))
    halves = _record_halves(monkeypatch)
    fitted: list[np.ndarray] = []
    scored: list[tuple[np.ndarray, np.ndarray]] = []

    class RecordingRegression(membership.LogisticRegression):
        def fit(self, x: np.ndarray, y: np.ndarray) -> Any:
            fitted.append(x.copy())
            return super().fit(x, y)

    def recording_auc(labels: np.ndarray, scores: np.ndarray) -> float:
        scored.append((labels.copy(), scores.copy()))
        return float(roc_auc_score(labels, scores))

    monkeypatch.setattr(membership, "LogisticRegression", RecordingRegression)
    monkeypatch.setattr(membership, "roc_auc_score", recording_auc)
    result = membership.membership_attack(
        None, members, non_members, forget, ["a"],  # type: ignore[arg-type]
        attack=attack, seed=3)  # type: ignore[arg-type]

    ids_of = _ids_of_features
    (member_fit, member_eval), (test_fit, test_eval) = halves
    assert set(ids_of(member_fit)) | set(ids_of(member_eval)) <= set(range(40))
    assert set(ids_of(test_fit)) | set(ids_of(test_eval)) == set(range(100, 131))
    assert not set(ids_of(member_fit)) & set(ids_of(member_eval))
    assert not set(ids_of(test_fit)) & set(ids_of(test_eval))
    fit_rows = np.concatenate([member_fit, test_fit])
    if attack == "logistic":  # fitted on the fit halves alone, standardised by them alone
        (x,) = fitted
        np.testing.assert_allclose(x, (fit_rows - fit_rows.mean(0)) / (fit_rows.std(0) + 1e-12))
    # The scores are an affine function of the one feature: found from the forget rows
    # (the positives of the first AUC, in the data set's order), then inverted.
    (forget_labels, forget_scores), (member_labels, member_scores) = scored
    forget_features = np.log(np.arange(200, 210, dtype=np.float64) + 1 + 1e-8)
    slope, offset = np.polyfit(forget_features, forget_scores[forget_labels == 1], 1)

    def scored_ids(scores: np.ndarray) -> list[int]:
        return ids_of((scores - offset) / slope)

    evaluated = sorted(ids_of(test_eval))
    assert sorted(scored_ids(forget_scores[forget_labels == 0])) == evaluated
    assert sorted(scored_ids(member_scores[member_labels == 0])) == evaluated
    assert sorted(scored_ids(member_scores[member_labels == 1])) == sorted(ids_of(member_eval))
    assert not set(evaluated) & set(ids_of(fit_rows))
    assert (result.num_members_fit, result.num_non_members_fit,
            result.num_non_members_eval) == (20, 16, 15)


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_the_attacks_members_and_non_members_in_the_experiment(digits: Benchmark, kind: str,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """As the experiment attacks (the retain set as members, the test split as non-members):
    no non-member is a training instance of the original or the gold model, and in a partial
    request the forget instances, retain rows for their other tasks, are no members."""
    request = build_request(digits.train, kind, 0)  # type: ignore[arg-type]
    forget, retain = request.split(digits.train)
    halves = _record_halves(monkeypatch)
    membership.membership_attack(None, retain, digits.test, forget,  # type: ignore[arg-type]
                                 request.resolved_tasks(digits.train), seed=0)
    (member_fit, member_eval), (test_fit, test_eval) = halves
    member_ids = set(_ids_of_features(member_fit)) | set(_ids_of_features(member_eval))
    non_member_ids = set(_ids_of_features(test_fit)) | set(_ids_of_features(test_eval))
    assert member_ids <= _ids(retain) and not member_ids & set(request.instance_ids)
    assert non_member_ids == _ids(digits.test)
    assert not non_member_ids & _ids(digits.train)
    assert not _samples(digits.test) & _samples(digits.train)


# -- (5) seeds ---------------------------------------------------------------------------------


def test_forget_sets_follow_the_seed_and_nothing_else(digits: Benchmark) -> None:
    train = digits.train
    first = [build_request(train, "full", s).instance_ids for s in range(4)]
    assert len(set(first)) == 4  # distinct seeds, distinct forget sets
    torch.manual_seed(123)  # what a method or a training run leaves in the global generators
    np.random.seed(5)
    again = [build_request(train, "full", s).instance_ids for s in range(4)]
    assert again == first


def test_data_splits_follow_the_seed() -> None:
    same = [load_benchmark("indoor", size="tiny", seed=0, use_cache=False) for _ in range(2)]
    other = load_benchmark("indoor", size="tiny", seed=1, use_cache=False)
    for split in ("train", "test", "validation"):
        inputs = [getattr(b, split).inputs for b in (*same, other)]
        assert torch.equal(inputs[0], inputs[1]) and not torch.equal(inputs[0], inputs[2])
    digit_tests = [make_digits(seed=s).test.ids for s in (0, 0, 1)]
    assert torch.equal(digit_tests[0], digit_tests[1])
    assert not torch.equal(digit_tests[0], digit_tests[2])


def test_inits_follow_the_seed(digits: Benchmark) -> None:
    def weights(seed: int) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in build_model(digits,
                                                                    seed=seed).parameters()])

    torch.manual_seed(7)
    a = weights(0)
    torch.manual_seed(8)
    assert torch.equal(a, weights(0))
    assert not torch.equal(a, weights(1))


def test_the_split_does_not_depend_on_the_methods_or_their_settings(tmp_path: Path,
                                                                    digits: Benchmark) -> None:
    """The experiment's forget and retain sets (and the gold model's cache key, its
    training data) are the same whatever methods run and however they are set, their seeds
    included; another experiment seed draws another forget set."""
    def split(seed: int, methods: list[str], settings: dict[str, Any]) -> tuple[Any, ...]:
        config = _tiny_config(tmp_path, "full")
        config.seed, config.methods, config.method_configs = seed, methods, settings
        setup = experiment._setup(config, make_digits(seed=seed, num_samples=400))
        return (setup.data.request.instance_ids, tuple(setup.data.retain.ids.tolist()),
                setup.checkpoints["retrained"][1]["key"])

    plain = split(0, [], {})
    assert split(0, ["finetune", "scrub"], {"finetune": {"lr": 0.5, "steps": 3},
                                            "scrub": {"forget_steps": 1}}) == plain
    assert split(1, [], {})[0] != plain[0]


# -- (6) input statistics -------------------------------------------------------------------


def test_rendered_inputs_pool_no_statistic_over_other_splits() -> None:
    """The training images are bit for bit the same whatever the test and validation splits
    hold: their normalisation is a constant, not a statistic of the pooled data."""
    small = make_indoor(8, 2, size=(12, 16), seed=0)
    large = make_indoor(8, 9, size=(12, 16), seed=0, num_validation=5)
    assert torch.equal(small.train.inputs, large.train.inputs)  # type: ignore[arg-type]
    assert small.info["rgb_normalisation"] == [0.5, 0.25]


def test_digit_inputs_are_scaled_by_a_constant() -> None:
    from sklearn.datasets import load_digits

    raw, _ = load_digits(return_X_y=True)
    for fraction in (0.25, 0.5):
        bench = make_digits(seed=0, test_fraction=fraction)
        for split in (bench.train, bench.test):
            expected = torch.from_numpy((raw[split.ids.numpy()] / 16.0).astype(np.float32))
            assert torch.equal(split.inputs, expected)  # type: ignore[arg-type]


class _BatchNormNet(torch.nn.Module):
    """A model with running statistics (the library's own models have GroupNorm only)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                         torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict({"digit": torch.nn.Linear(16, 10),
                                          "parity": torch.nn.Linear(16, 2),
                                          "magnitude": torch.nn.Linear(16, 2)})

    def forward(self, x: torch.Tensor, task_names: list[str]) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: self.heads[t](z) for t in task_names}


def test_measuring_the_test_and_forget_data_leaves_no_statistic_behind(digits: Benchmark
                                                                       ) -> None:
    """The evaluation and the attack read the test split and the forget set through a model
    left in training mode: its running statistics are not updated from them."""
    from mtunlearn_ext.metrics import evaluate

    torch.manual_seed(0)
    model = _BatchNormNet().train()
    request = build_request(digits.train, "full", 0)
    forget, retain = request.split(digits.train)
    before = {k: v.clone() for k, v in model.named_buffers()}
    evaluate(model, digits.test, None, 32)  # type: ignore[arg-type]
    evaluate(model, forget, None, 32)  # type: ignore[arg-type]
    membership.membership_attack(model, retain, digits.test,  # type: ignore[arg-type]
                                 forget, seed=0)
    assert model.training
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
