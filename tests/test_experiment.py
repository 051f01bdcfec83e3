"""The experiment runner: request building, caching, the JSON results file, the table, the CLI."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import _flip_first_weight  # a weight's bits flipped inside the archive

from mtunlearn_ext import MtUnlearnRuntimeWarning
from mtunlearn_ext.data.registry import load_benchmark
from mtunlearn_ext.experiment import (
    SCHEMA,
    ExperimentConfig,
    build_request,
    _undefined_uis_terms,
    format_table,
    main,
    run_experiment,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
FAST_METHODS = {"gradient_ascent": {"steps": 5}, "neggrad_plus": {"steps": 5},
                "orthograd": {"steps": 3, "num_per_sample": 8}}
TRAIN = {"epochs": 5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread)."""


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_benchmark("digits", size="tiny", seed=0)


def _config(tmp: Path, **changes: object) -> ExperimentConfig:
    values: dict[str, object] = dict(
        benchmark="digits", size="tiny", request="partial", target_tasks=["digit"],
        forget_fraction=0.1, methods=["retrain", *FAST_METHODS], method_configs=FAST_METHODS,
        seed=0, output=str(tmp / "out.json"), cache_dir=str(tmp / "cache"),
        train_overrides=TRAIN)
    values.update(changes)
    return ExperimentConfig(**values)  # type: ignore[arg-type]


def test_build_request(digits) -> None:  # type: ignore[no-untyped-def]
    train = digits.train
    full = build_request(train, "full", seed=3, forget_fraction=0.1)
    again = build_request(train, "full", seed=3, forget_fraction=0.1)
    other = build_request(train, "full", seed=4, forget_fraction=0.1)
    assert full == again and full != other
    assert full.target_tasks is None and len(full.instance_ids) == round(0.1 * len(train))
    assert list(full.instance_ids) == sorted(full.instance_ids)
    partial = build_request(train, "partial", seed=3)
    assert partial.target_tasks == ("digit",)
    ids = [int(i) for i in train.ids[:4]]
    explicit = build_request(train, "partial", seed=0, forget_ids=ids[::-1],
                             target_tasks=["parity", "magnitude"])
    assert explicit.instance_ids == tuple(sorted(ids))
    with pytest.raises(ValueError, match="partial"):
        build_request(train, "partial", seed=0, target_tasks=train.task_names)
    with pytest.raises(ValueError, match="full request"):
        build_request(train, "full", seed=0, target_tasks=["digit"])
    with pytest.raises(KeyError):
        build_request(train, "full", seed=0, forget_ids=[10**9])


def test_run_experiment_writes_every_field(tmp_path: Path, digits,  # type: ignore[no-untyped-def]
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    results = run_experiment(config, benchmark=digits)
    assert capsys.readouterr() == ("", "")  # the table is the command line's to print
    on_disk = json.loads(Path(config.output).read_text())
    assert on_disk == results and on_disk["schema"] == SCHEMA
    # Reproducibility review: the results named torch, Python and the thread count but not
    # the code that made them (a rerun months later could not say which commit to check out).
    from mtunlearn_ext.records import code_version

    assert on_disk["code"] == code_version()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file
    # Every UIS term was defined (the original's test scores are not 0), and the table says
    # nothing left out; one that is left out is named there (metrics review: the warning that
    # said so was suppressed and nothing recorded it).
    assert on_disk["uis_left_out"] == [] and "leaves out" not in format_table(on_disk)
    assert format_table({**on_disk, "uis_left_out": ["digit/accuracy (O_t=0)"]}).endswith(
        " UIS leaves out digit/accuracy (O_t=0): the original's test score is 0 or not finite "
        "there.")
    assert _undefined_uis_terms({"a": {"accuracy": 0.0, "f1": 0.5}, "b": {"x": float("nan")},
                                 "c": {"accuracy": 0.0}}, ["a", "b"]) == [
        "a/accuracy (O_t=0)", "b/x (O_t=nan)"]

    request = on_disk["request"]
    assert request["type"] == "partial" and request["target_tasks"] == ["digit"]
    assert request["non_target_tasks"] == ["parity", "magnitude"]
    assert request["num_forget_pairs"] == request["num_forget_instances"] == 30
    # Partial: the forget instances keep their two other labels among the retain pairs.
    assert request["num_retain_pairs"] == 3 * len(digits.train) - 30

    models = on_disk["models"]
    assert list(models) == ["original", "retrained", "retrain", *FAST_METHODS]
    for label, entry in models.items():
        metrics = entry["metrics"]
        assert set(metrics) == {"forget", "retain", "test"}
        assert set(metrics["forget"]) == {"digit"}  # target task pairs only
        assert set(metrics["retain"]) == set(metrics["test"]) == {"digit", "parity", "magnitude"}
        for split in metrics.values():
            for task in split.values():
                assert 0.0 <= task["accuracy"] <= 1.0
        assert 0.0 <= entry["mia_auc"] <= 1.0
        assert entry["mia"]["tasks"] == ["digit"]
        if label not in ("original", "retrained"):
            assert entry["uis"] >= 0 and entry["retrain_gap"] >= 0
            assert entry["wall_time_s"] > 0 and "report" in entry
            assert set(entry["uis_terms"]) == {"digit"}
    assert models["retrain"]["retrain_gap"] == 0.0  # the gold model is reused, not retrained
    assert models["original"]["retrain_gap"] > 0 and models["original"]["uis"] >= 0
    assert models["original"]["cached"] is False and models["retrained"]["cached"] is False
    report = models["neggrad_plus"]["report"]
    assert report["config"]["steps"] == 5 and len(report["curves"]["forget_loss"]) == 5
    phases = on_disk["phases_seconds"]
    for key in ("load_data", "split", "original_model", "retrained_model",
                "unlearn/neggrad_plus", "evaluate/neggrad_plus", "evaluate/original"):
        assert phases[key] >= 0
    assert on_disk["recipe"]["epochs"] == 5 and on_disk["recipe"]["seed"] == 0

    table = format_table(on_disk)
    lines = table.splitlines()
    assert len({len(line) for line in lines[:-1]}) == 1  # aligned columns
    assert all(label in table for label in models)

    # A second run reuses both checkpoints and reproduces every number.
    again = run_experiment(_config(tmp_path, output=str(tmp_path / "again.json")),
                           benchmark=digits)
    assert again["models"]["original"]["cached"] is True
    assert again["models"]["retrained"]["cached"] is True
    for label in models:
        assert again["models"][label]["metrics"] == models[label]["metrics"], label
        assert again["models"][label]["mia_auc"] == models[label]["mia_auc"], label


def test_cli_full_request(tmp_path: Path) -> None:
    """``python -m mtunlearn_ext.experiment`` end to end in a fresh process: full request,
    explicit ids from a file, a method config as JSON; prints the table, writes the JSON."""
    ids_file = tmp_path / "ids.txt"
    ids = load_benchmark("digits", size="tiny", seed=1).train.ids[:12].tolist()
    ids_file.write_text("\n".join(str(i) for i in ids))
    out = tmp_path / "cli.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mtunlearn_ext.experiment", "--benchmark", "digits",
         "--size", "tiny", "--request", "full", "--forget-ids", str(ids_file),
         "--methods", "gradient_ascent,pcgrad",
         "--method-config", json.dumps({"gradient_ascent": {"steps": 4},
                                        "pcgrad": {"steps": 4}}),
         "--train", json.dumps(TRAIN), "--seed", "1", "--output", str(out),
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["request"]["type"] == "full"
    assert results["request"]["forget_ids"] == sorted(ids)
    assert results["config"]["seed"] == 1
    assert set(results["models"]) == {"original", "retrained", "gradient_ascent", "pcgrad"}
    assert set(results["models"]["pcgrad"]["metrics"]["forget"]) == {"digit", "parity",
                                                                     "magnitude"}
    assert "gradient_ascent" in proc.stdout and "MIA" in proc.stdout


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--methods", "nope", "--benchmark", "digits"]) == 2
    said = capsys.readouterr().err
    assert "unknown methods" in said
    # (extension audit: nothing said how a method of one's own gets in)
    assert "register it with @register_unlearner at the top level of a module, and pass " \
        "--import MODULE" in said
    # A setting the method does not have (extension audit: a traceback, exit 1).
    # (On a benchmark with a validation split nothing checked them before the trainings.)
    for benchmark in ("digits", "indoor"):
        assert main(["--methods", "neggrad_plus", "--benchmark", benchmark, "--size", "tiny",
                     "--method-config", '{"neggrad_plus": {"bogus": 1}}']) == 2
        said = capsys.readouterr().err
        assert "error: --method-config: NegGradPlusConfig: unknown settings ['bogus']" in said
        assert "Traceback" not in said
    with pytest.raises(SystemExit) as stopped:
        main(["--import", "no_such_plugin_module", "--benchmark", "digits"])
    assert stopped.value.code == 2
    assert "--import: expected an importable module name or .py file" in \
        capsys.readouterr().err
    # Checked before any training (these failed with a traceback, exit 1).
    assert main(["--benchmark", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main(["--benchmark", "digits", "--size", "tiny", "--request", "partial",
                 "--target-tasks", "nope"]) == 2
    assert "--target-tasks: unknown tasks ['nope']" in capsys.readouterr().err
    assert main(["--benchmark", "nyuv2", "--data-root", "/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--benchmark", "digits", "--size", "tiny", "--train", '{"nope": 1}']) == 2
    said = capsys.readouterr().err
    assert "--train: the training recipe: unknown TrainConfig field(s) ['nope']; known: " in said
    assert "'epochs'" in said
    with pytest.raises(SystemExit):
        main(["--request", "sideways"])


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": [1, 2.5, None]})
    write_json_atomic(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    with pytest.raises(ValueError):
        write_json_atomic(path, {"nan": float("nan")})
    assert json.loads(path.read_text()) == {"b": 1}  # a failed write leaves the old file


def test_experiment_config_checks_types_also_with_annotations_for_type_checkers_only() -> None:
    """``size`` is annotated with a name imported under TYPE_CHECKING only: the other fields are
    still checked (``seed=1.5`` was accepted), and ``size`` is left to its own check."""
    with pytest.raises(ValueError, match=r"ExperimentConfig: `seed` must be an integer, got 1.5"):
        ExperimentConfig(benchmark="digits", seed=1.5).validate()  # type: ignore[arg-type]
    ExperimentConfig(benchmark="digits", size="tiny").validate()


def test_the_model_cache_key_holds_the_thread_count_and_the_device(tmp_path: Path,
                                                                   digits) -> None:  # type: ignore[no-untyped-def]
    """Models trained under another intra-op thread count differ (float sums in another
    order; up to 1.6e-6 after 12 epochs) and took another time, but shared one cache key: the
    model behind a seed depended on which command filled the cache first."""
    from mtunlearn_ext.experiment import _setup

    paths = {}
    for threads in (1, 2):
        setup = _setup(_config(tmp_path, threads=threads), digits)
        paths[threads] = {which: str(entry[0]) for which, entry in setup.checkpoints.items()}
        assert setup.checkpoints["original"][1]["threads"] == threads
        assert setup.checkpoints["original"][1]["device"] == "cpu"
    assert paths[1]["original"] != paths[2]["original"]
    assert paths[1]["retrained"] != paths[2]["retrained"]
    again = _setup(_config(tmp_path, threads=1), digits)
    assert str(again.checkpoints["original"][0]) == paths[1]["original"]


def test_the_cache_key_holds_the_torch_build_and_cpu_isas(  # type: ignore[no-untyped-def]
        tmp_path: Path, digits, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models trained under AVX-512 were reused by a run under AVX2 (the key had no
    instruction set), whose results then recorded AVX2 beside AVX-512 models: weights
    8a2168f3... against 38689f82... trained cold (reproducibility review)."""
    import mtunlearn_ext.experiment as experiment
    from mtunlearn_ext.records import run_environment

    first = experiment._setup(_config(tmp_path, threads=1), digits).checkpoints
    assert first["original"][1]["cpu_isa"] == run_environment(1)["cpu_isa"]
    assert first["original"][1]["torch"] == torch.__version__
    for field, value in (("cpu_isa", {"torch": "AVX2", "mtunlearn_ext": "avx2"}),
                         ("torch", "0.0.0"), ("extension", None)):
        def other(threads: int | None, field: str = field, value: object = value
                  ) -> dict[str, object]:
            return {**run_environment(threads), field: value}

        monkeypatch.setattr(experiment, "run_environment", other)
        again = experiment._setup(_config(tmp_path, threads=1), digits).checkpoints
        for which in ("original", "retrained"):
            assert again[which][0] != first[which][0], (field, which)
    monkeypatch.undo()
    monkeypatch.setattr(experiment, "_package_version", lambda: "0.0.0")
    again = experiment._setup(_config(tmp_path, threads=1), digits).checkpoints
    assert again["original"][0] != first["original"][0]
    monkeypatch.undo()
    # Reproducibility audit: the package version stayed 0.1.0 while training.py changed in 32
    # commits, and a run at a new commit reused the old code's models. The training code's
    # own digest is in the key.
    assert first["original"][1]["training_code"] == experiment._training_code_digest()
    monkeypatch.setattr(experiment, "_training_code_digest", lambda: "0" * 64)
    again = experiment._setup(_config(tmp_path, threads=1), digits).checkpoints
    for which in ("original", "retrained"):
        assert again[which][0] != first[which][0], which


def test_the_training_code_digest_follows_code_not_comments(tmp_path: Path) -> None:
    from mtunlearn_ext.experiment import _TRAINING_CODE, _source_digest

    (tmp_path / "pkg").mkdir()
    (tmp_path / "train.py").write_text("def step(x):\n    return x * 2\n")
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    names = ("train.py", "pkg")
    first = _source_digest(tmp_path, names)
    (tmp_path / "train.py").write_text("# why it doubles\ndef step(x):\n    return x*2  # !\n")
    (tmp_path / "pkg" / "notes.txt").write_text("other text")
    assert _source_digest(tmp_path, names) == first  # comments, layout, other files
    (tmp_path / "train.py").write_text("def step(x):\n    return x * 3\n")
    assert _source_digest(tmp_path, names) != first
    (tmp_path / "train.py").write_text("def step(x):\n    return x * 2\n")
    (tmp_path / "pkg" / "b.py").write_text("B = 1\n")  # a module added to a folder
    assert _source_digest(tmp_path, names) != first
    # The package's own list names what exists: a renamed module is not silently left out.
    import mtunlearn_ext

    root = Path(mtunlearn_ext.__file__).parent
    assert all((root / name).exists() for name in _TRAINING_CODE)


def test_default_recipe_refuses_a_seed_override() -> None:
    """An override's `seed` was silently replaced by the run's seed."""
    from mtunlearn_ext.data import load_benchmark
    from mtunlearn_ext.experiment import default_recipe

    bench = load_benchmark("digits", size="tiny")
    with pytest.raises(ValueError, match=r"seed \(5\) is not a recipe override.*use --seed"):
        default_recipe(bench, 0, {"seed": 5})
    assert default_recipe(bench, 3, {"epochs": 2}).seed == 3
    # A checkpoint's stored recipe holds its seed: given back with that seed, it passes.
    assert default_recipe(bench, 3, {"epochs": 2, "seed": 3}).seed == 3


# -- the model cache: verified entries, keys, concurrent fills; checks; thread count ------------

ONE_EPOCH = {"epochs": 1}


def _cache_config(tmp: Path, **changes: object) -> ExperimentConfig:
    return _config(tmp, methods=["finetune"], method_configs={}, train_overrides=ONE_EPOCH,
                   threads=1, **changes)


def torch_threads(n: int):  # type: ignore[no-untyped-def]
    from mtunlearn_ext.experiment import experiment_threads

    return experiment_threads(n)


def test_a_corrupted_cache_entry_is_rebuilt_not_used(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    """torch.load checks no CRC: an entry with flipped bits in a weight was loaded and used
    (`cached: True`, test accuracy 0.38 -> 0.33). Entries hold their weights' hash."""
    import hashlib

    from mtunlearn_ext.experiment import train_reference_model
    from mtunlearn_ext.training import load_checkpoint

    config = _cache_config(tmp_path)
    first = train_reference_model(config, "original", digits)
    path = Path(first["checkpoint"])
    assert first["cached"] is False
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_checkpoint(path).state_sha256 == first["state_sha256"]
    _flip_first_weight(path)
    with pytest.warns(RuntimeWarning, match="unreadable or corrupt checkpoint.*retraining"):
        rebuilt = train_reference_model(config, "original", digits)
    assert rebuilt["cached"] is False and rebuilt["state_sha256"] == first["state_sha256"]
    assert rebuilt["sha256"] == first["sha256"]  # the same bytes again: no wall time inside
    again = train_reference_model(config, "original", digits)
    assert again["cached"] is True and again["sha256"] == first["sha256"]
    assert again["train_seconds"] == rebuilt["train_seconds"]  # kept beside the entry
    # An entry written before checkpoints held the hash is rebuilt too.
    checkpoint = load_checkpoint(path)
    path.unlink()
    torch.save({"format": "mtunlearn_ext.checkpoint/1", "meta": checkpoint.meta,
                "state_dict": checkpoint.state_dict}, path)
    with pytest.warns(RuntimeWarning, match="without a weights hash"):
        assert train_reference_model(config, "original", digits)["cached"] is False
    assert load_checkpoint(path).state_sha256 == first["state_sha256"]


def test_the_cache_key_holds_the_initial_weights(tmp_path: Path, indoor_tiny) -> None:  # type: ignore[no-untyped-def]
    """The model was keyed by its printed architecture: indoor's depth prior 3.0 and 8.0 (the
    depth head's initial bias) shared an entry, and the prior-8 run got the prior-3 model."""
    import copy

    from mtunlearn_ext.experiment import _setup

    other = copy.copy(indoor_tiny)
    other.info = {**indoor_tiny.info, "depth_prior": 8.0}
    config = _config(tmp_path, benchmark="indoor", request="full", target_tasks=None,
                     methods=["finetune"], method_configs={}, threads=1)
    with torch_threads(1):
        keys = [_setup(config, bench).checkpoints for bench in (indoor_tiny, other)]
    assert keys[0]["original"][0] != keys[1]["original"][0]
    assert keys[0]["retrained"][0] != keys[1]["retrained"][0]
    assert keys[0]["original"][1]["model"]["init"] != keys[1]["original"][1]["model"]["init"]
    assert (keys[0]["original"][1]["model"]["architecture"]
            == keys[1]["original"][1]["model"]["architecture"])


def _smoothed(pred, target, eps):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    return F.cross_entropy(pred, target.clamp(min=0), reduction="none", label_smoothing=eps)


def _scaled_loss(scale: float):  # type: ignore[no-untyped-def]
    def loss(pred, target):  # type: ignore[no-untyped-def]
        return _smoothed(pred, target, 0.0) * scale
    return loss


class _CallableLoss:
    def __init__(self, eps: float) -> None:
        self.eps = eps

    def __call__(self, pred, target):  # type: ignore[no-untyped-def]
        return _smoothed(pred, target, self.eps)


def test_custom_losses_are_identified_by_what_they_compute() -> None:
    """Losses were keyed by their __qualname__: partial(ls, eps=0.0) and partial(ls, eps=0.9)
    (both 'ls'), two lambdas, two closures over other values shared one cache entry."""
    import functools

    from mtunlearn_ext.experiment import loss_identity

    same = [functools.partial(_smoothed, eps=0.0), functools.partial(_smoothed, eps=0.0)]
    assert loss_identity(same[0]) == loss_identity(same[1]) is not None
    distinct = [functools.partial(_smoothed, eps=0.0), functools.partial(_smoothed, eps=0.9),
                functools.partial(_smoothed, eps=0), lambda p, t: _smoothed(p, t, 0.1),
                lambda p, t: _smoothed(p, t, 0.2), _scaled_loss(1.0), _scaled_loss(2.0),
                _smoothed]
    identities = [loss_identity(f) for f in distinct]
    assert None not in identities and len(set(identities)) == len(identities)
    assert loss_identity(_scaled_loss(2.0)) == loss_identity(_scaled_loss(2.0))
    weights = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])]
    assert len({loss_identity(functools.partial(_smoothed, eps=w)) for w in weights}) == 2
    # Library functions are named, not read; objects and bound methods are not identified.
    import torch.nn.functional as F

    assert loss_identity(F.l1_loss) is not None
    assert loss_identity(_CallableLoss(0.1)) is None
    assert loss_identity(_CallableLoss(0.1).__call__) is None
    assert loss_identity(functools.partial(_smoothed, eps=_CallableLoss(0.1))) is None


def test_models_of_a_custom_loss_are_cached_per_loss(tmp_path: Path, digits,  # type: ignore[no-untyped-def]
                                                     monkeypatch) -> None:
    """The eps=0.9 run got the cached eps=0.0 model; a loss that cannot be identified is not
    cached at all (warned once, saying why)."""
    import dataclasses
    import functools
    import warnings

    from mtunlearn_ext import experiment
    from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset

    def with_loss(loss):  # type: ignore[no-untyped-def]
        tasks = [dataclasses.replace(t, loss=loss) if t.name == "digit" else t
                 for t in digits.tasks]

        def ds(x):  # type: ignore[no-untyped-def]
            return MultiTaskDataset(x.inputs, x.targets, tasks, x.ids, x.supervision)
        return Benchmark(digits.name, ds(digits.train), ds(digits.test), tasks, dict(digits.info),
                         None if digits.validation is None else ds(digits.validation))

    config = _cache_config(tmp_path)
    with torch_threads(1):
        paths = {eps: experiment._setup(config, with_loss(functools.partial(_smoothed, eps=eps)))
                 .checkpoints["original"][0] for eps in (0.0, 0.9)}
    assert paths[0.0] is not None and paths[0.0] != paths[0.9]

    monkeypatch.setattr(experiment, "_WARNED", set())
    opaque = with_loss(_CallableLoss(0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = experiment.train_reference_model(config, "original", opaque)
        second = experiment.train_reference_model(config, "original", opaque)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "not cached" in messages[0] and "task 'digit'" in messages[0]
    assert "_CallableLoss object" in messages[0]
    assert first["cached"] is second["cached"] is False and first["checkpoint"] is None
    assert first["state_sha256"] == second["state_sha256"]
    assert not (tmp_path / "cache").exists()


def test_a_concurrently_filled_entry_is_kept_and_used(tmp_path: Path, digits,  # type: ignore[no-untyped-def]
                                                      monkeypatch) -> None:
    """Two processes filling one entry: the last writer replaced the first's file, whose
    record then named a SHA-256 no longer on disk. The entry is written only if new; a
    process that finds it written meanwhile uses that file."""
    import hashlib

    from mtunlearn_ext import experiment
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.training import save_checkpoint, state_dict_sha256

    config = _cache_config(tmp_path)
    with torch_threads(1):
        path, meta, _ = experiment._setup(config, digits).checkpoints["original"]
    assert path is not None
    # The other process's weights (different, to see whose are used), written while this
    # process trains.
    theirs = build_model(digits, seed=7)
    real_train = experiment.train

    def train_while_another_writes(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_train(*args, **kwargs)
        save_checkpoint(path, theirs, {**meta, "train_steps": 1})
        return result

    monkeypatch.setattr(experiment, "train", train_while_another_writes)
    with pytest.warns(RuntimeWarning, match="another process wrote different weights"):
        record = experiment.train_reference_model(config, "original", digits)
        written = path.read_bytes()
    assert record["sha256"] == hashlib.sha256(written).hexdigest()  # the file on disk
    assert record["state_sha256"] == state_dict_sha256(theirs)
    assert "train_seconds" not in experiment.load_checkpoint(path).meta


def test_check_experiment_refuses_task_weights_of_unknown_tasks(
        capsys: pytest.CaptureFixture[str]) -> None:
    """They were ignored (training went on with a typo'd task at weight 1)."""
    assert main(["--benchmark", "digits", "--size", "tiny",
                 "--train", '{"task_weights": {"dgit": 2.0}}']) == 2
    err = capsys.readouterr().err
    assert "--train: `task_weights` names unknown tasks ['dgit']; 'digits' has" in err
    assert main(["--benchmark", "digits", "--size", "tiny",
                 "--train", '{"optimizer": "sgd", "momentum": -1.0}']) == 2
    assert "--train: TrainConfig: `momentum` must be in [0, 1), got -1.0" in \
        capsys.readouterr().err


def test_the_experiment_functions_restore_the_thread_count(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    """prepare_experiment(threads=1) left the process at one thread for good."""
    from mtunlearn_ext.experiment import prepare_experiment, train_reference_model

    config = _cache_config(tmp_path)
    torch.set_num_threads(2)  # conftest restores the module's count after the test
    train_reference_model(config, "original", digits)
    assert torch.get_num_threads() == 2
    prepare_experiment(config, digits)
    assert torch.get_num_threads() == 2
    run_experiment(config, digits)
    assert torch.get_num_threads() == 2
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_experiment_threads_is_a_function_of_its_own() -> None:
    """It was the alias ``experiment_threads = cpu_threads``: help() and its repr showed
    ``mtunlearn_ext.training.cpu_threads`` and that function's docstring, with no word of
    ``ExperimentConfig.threads``, though the experiment module exports it."""
    import pydoc

    from mtunlearn_ext.experiment import experiment_threads

    assert experiment_threads.__name__ == "experiment_threads"
    assert experiment_threads.__module__ == "mtunlearn_ext.experiment"
    assert "experiment_threads" in repr(experiment_threads)
    assert "ExperimentConfig.threads" in (experiment_threads.__doc__ or "")
    assert pydoc.render_doc(experiment_threads).count("cpu_threads") == 0
    assert list(inspect.signature(experiment_threads).parameters) == ["num_threads"]
    torch.set_num_threads(2)  # conftest restores the module's count after the test
    with experiment_threads(num_threads=1):
        assert torch.get_num_threads() == 1
        with experiment_threads(None):  # the setting as it is
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), experiment_threads(1):  # restored on the way out of an error
        raise KeyError("raised inside the block")
    assert torch.get_num_threads() == 2


def test_the_experiment_functions_leave_the_callers_random_state(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    """Reproducibility review: the experiment seeded torch's global generator with its own
    seed and left it so, so a caller's random stream restarted at ``config.seed`` after
    every experiment (two experiments in a loop reset the caller's draws each time). Its
    numbers never depended on the caller's state, and still do not."""
    from mtunlearn_ext.experiment import prepare_experiment, train_reference_model

    config = _cache_config(tmp_path)
    runs = {"train_reference_model": lambda: train_reference_model(config, "original", digits),
            "prepare_experiment": lambda: prepare_experiment(config, digits),
            "run_experiment": lambda: run_experiment(config, digits)}
    results = []
    for seed, (name, run) in zip((11, 12, 13), runs.items()):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        results.append(run())
        assert torch.equal(torch.get_rng_state(), state), name
    torch.manual_seed(99)
    again = run_experiment(config, digits)
    for label, entry in results[-1]["models"].items():
        assert again["models"][label]["metrics"] == entry["metrics"], label


def test_a_benchmark_of_ones_own_is_checked_before_any_training(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A validation split built with default ids (the training split's too) trained and scored
    both models, then failed at the first method naming a 'held_out set' the user never passed;
    a passed benchmark whose name differed from config.benchmark ran, recording the wrong one."""
    from mtunlearn_ext.data import Benchmark, MultiTaskDataset, TaskSpec

    tasks = [TaskSpec("cls", "classification", num_classes=3), TaskSpec("reg", "regression")]

    def split(n: int, first_id: int = 0) -> MultiTaskDataset:
        return MultiTaskDataset(torch.randn(n, 6), {"cls": torch.randint(0, 3, (n,)),
                                                    "reg": torch.randn(n, 1)}, tasks,
                                ids=torch.arange(first_id, first_id + n))

    config = ExperimentConfig(benchmark="toy", methods=[], output=str(tmp_path / "r.json"),
                              cache_dir=str(tmp_path / "cache"), threads=1)
    colliding = Benchmark("toy", split(60), split(30), tasks, validation=split(20))
    with pytest.raises(ValueError, match=r"toy: the validation split shares 20 instance ids with "
                                         r"the training split \(first: \[0, 1, 2, 3, 4\]\)"):
        run_experiment(config, benchmark=colliding)
    assert not (tmp_path / "cache").exists()  # nothing trained
    renamed = Benchmark("other", split(60), split(30), tasks, validation=split(20, 1000))
    with pytest.raises(ValueError, match=r"`benchmark` is 'toy' but the benchmark passed is "
                                         r"'other'"):
        run_experiment(config, benchmark=renamed)


def test_held_out_caps_on_a_benchmark_without_validation_are_refused_before_any_training(
        tmp_path: Path) -> None:
    """User review: the memorising recipe's settings take the method's forget caps from
    held-out instances (every problem's held-out set is the benchmark's validation split);
    on digits, which has none, the run trained every model and then failed at the method,
    as a traceback from the demo's worker. Refused first now, saying what to set; 'auto'
    runs (the retain set's caps)."""
    held_out = {"interference_aware": {"steps": 1, "cap_reference": "held_out"}}
    config = _config(tmp_path, methods=["interference_aware"], method_configs=held_out)
    with pytest.raises(ValueError, match=r"^ExperimentConfig: interference_aware's settings take "
                                         r"its forget caps from held-out instances .* benchmark "
                                         r"'digits' has no validation split .* 'auto' or "
                                         r"'retain'"):
        run_experiment(config)
    assert not (tmp_path / "cache").exists()  # nothing trained
    argv = ["--benchmark", "digits", "--size", "tiny", "--methods", "interference_aware",
            "--method-config", json.dumps(held_out), "--output", str(tmp_path / "r.json"),
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 2  # one line, exit 2: the command line's bad input
    assert not (tmp_path / "cache").exists()
    uncapped = {"interference_aware": {"steps": 1, "cap_reference": "held_out",
                                       "cap_quantile": None}}
    auto = {"interference_aware": {"steps": 1, "cap_reference": "auto"}}
    for settings in (uncapped, auto):
        results = run_experiment(_config(tmp_path, methods=["interference_aware"],
                                         method_configs=settings))
        assert "interference_aware" in results["models"]


def test_forget_ids_the_attack_cannot_score_are_refused_before_any_training(
        tmp_path: Path) -> None:
    """Metrics review: forget instances lacking a target task's label are left out of the
    membership attack; with none left, the experiment failed only after training both models
    (the attack's error, at the first evaluation)."""
    from mtunlearn_ext.data import Benchmark, MultiTaskDataset, TaskSpec

    tasks = [TaskSpec("cls", "classification", num_classes=3), TaskSpec("reg", "regression")]

    def split(n: int, first_id: int, without_reg: int = 0) -> MultiTaskDataset:
        supervision = torch.ones(n, 2, dtype=torch.bool)
        supervision[:without_reg, 1] = False  # the first rows lack the regression label
        return MultiTaskDataset(torch.randn(n, 6), {"cls": torch.randint(0, 3, (n,)),
                                                    "reg": torch.randn(n, 1)}, tasks,
                                ids=torch.arange(first_id, first_id + n),
                                supervision=supervision)

    bench = Benchmark("toy", split(60, 0, without_reg=5), split(30, 100), tasks,
                      validation=split(20, 200))
    config = ExperimentConfig(benchmark="toy", methods=[], output=str(tmp_path / "r.json"),
                              cache_dir=str(tmp_path / "cache"), threads=1, request="full",
                              forget_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"^ExperimentConfig: no forget instance has a label of "
                                         r"every target task \['cls', 'reg'\]"):
        run_experiment(config, benchmark=bench)
    assert not (tmp_path / "cache").exists()  # nothing trained


def test_the_runners_forget_ids_read_as_the_commands_do(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """The experiment runner's --forget-ids takes ids as `mtunlearn` does (one parser): ASCII
    digits only, id files with a byte-order mark and '#' comments."""
    from mtunlearn_ext.experiment import build_parser

    ids = tmp_path / "ids.txt"
    ids.write_text("\ufeff# request 7\n3, 7\n", encoding="utf-8")
    assert build_parser().parse_args(["--forget-ids", str(ids)]).forget_ids == [3, 7]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--forget-ids", "7,1_3"])
    assert "got '1_3'; ids are decimal integers in ASCII digits" in capsys.readouterr().err


def test_methods_all_names_the_baselines_and_combines_with_other_methods() -> None:
    """`--methods all` runs the baselines only; its help now says so and names how to add the
    interference-aware method, which `all,interference_aware` failed to do ("unknown methods
    ['all,...']": 'all' was read only as the whole value)."""
    from mtunlearn_ext.experiment import build_parser, config_from_args
    from mtunlearn_ext.unlearning import BASELINES

    parser = build_parser()
    read = config_from_args(parser.parse_args(["--methods", "all", "--benchmark", "digits"]))
    assert read.methods == list(BASELINES) and "interference_aware" not in read.methods
    both = config_from_args(parser.parse_args(
        ["--methods", "all, interference_aware", "--benchmark", "digits"]))
    assert both.methods == [*BASELINES, "interference_aware"]
    assert config_from_args(parser.parse_args(
        ["--methods", "pcgrad,finetune", "--benchmark", "digits"])).methods == ["pcgrad",
                                                                                 "finetune"]
    assert "'all' for every baseline" in " ".join(parser.format_help().split())


def test_a_method_that_diverges_inside_a_step_is_recorded_as_diverged(
        tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    """A method whose own check stops it inside a step (the interference-aware method's ops
    refuse a NaN/Inf gradient: FloatingPointError) crashed the whole experiment, losing every
    other method's result, while a baseline that returned NaN weights was scored as diverged
    (null UIS, infinite gap). Both are now the same diverged entry, with the reason."""
    methods = {"neggrad_plus": {"steps": 5, "lr": 1e30, "grad_clip": None},
               "interference_aware": {"steps": 5, "lr": 1e30, "grad_clip": None},
               "gradient_ascent": {"steps": 2}}
    # The two diverged models' losses are NaN: the attack says its AUCs are undefined.
    with pytest.warns(MtUnlearnRuntimeWarning, match="the AUCs are NaN"):
        results = run_experiment(_config(tmp_path, methods=list(methods),
                                         method_configs=methods), benchmark=digits)
    models = results["models"]
    assert "the run diverged at step" in models["interference_aware"]["diverged"]
    for method in ("neggrad_plus", "interference_aware"):
        assert models[method]["uis"] is None and models[method]["retrain_gap"] is None
    assert "diverged" not in models["gradient_ascent"]
    assert models["gradient_ascent"]["uis"] is not None
    from mtunlearn_ext.report import write_report

    write_report(results, tmp_path / "rep")  # a diverged entry has no curves: none drawn
    assert (tmp_path / "rep" / "report.md").is_file()
