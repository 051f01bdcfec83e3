"""The experiment runner: request building, caching, the JSON results file, the table, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtunlearn_ext.data.registry import load_benchmark
from mtunlearn_ext.experiment import (
    SCHEMA,
    ExperimentConfig,
    build_request,
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


def test_run_experiment_writes_every_field(tmp_path: Path, digits) -> None:  # type: ignore[no-untyped-def]
    config = _config(tmp_path)
    results = run_experiment(config, benchmark=digits)
    on_disk = json.loads(Path(config.output).read_text())
    assert on_disk == results and on_disk["schema"] == SCHEMA
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file

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
    assert "unknown methods" in capsys.readouterr().err
    # Checked before any training (these failed with a traceback, exit 1).
    assert main(["--benchmark", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main(["--benchmark", "digits", "--size", "tiny", "--request", "partial",
                 "--target-tasks", "nope"]) == 2
    assert "--target-tasks: unknown tasks ['nope']" in capsys.readouterr().err
    assert main(["--benchmark", "nyuv2", "--data-root", "/nonexistent"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--benchmark", "digits", "--size", "tiny", "--train", '{"nope": 1}']) == 2
    assert "--train: TrainConfig.__init__() got an unexpected keyword argument 'nope'" in \
        capsys.readouterr().err
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


def test_default_recipe_refuses_a_seed_override() -> None:
    """An override's `seed` was silently replaced by the run's seed."""
    from mtunlearn_ext.data import load_benchmark
    from mtunlearn_ext.experiment import default_recipe

    bench = load_benchmark("digits", size="tiny")
    with pytest.raises(ValueError, match=r"seed \(5\) is not a recipe override.*use --seed"):
        default_recipe(bench, 0, {"seed": 5})
    assert default_recipe(bench, 3, {"epochs": 2}).seed == 3
