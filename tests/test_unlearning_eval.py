"""The evaluation script's bookkeeping: a finished run is kept, a changed preset re-runs only the
methods it changes, and merged entries replace exactly those methods."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def evaluation():
    spec = importlib.util.spec_from_file_location("unlearning_eval",
                                                  ROOT / "benchmarks" / "unlearning_eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["unlearning_eval"] = module
    spec.loader.exec_module(module)
    return module


#: The run settings of a run file made with _run_unit's default arguments (small, 10%, ...).
IDENTITY = {"size": "small", "data_root": None, "forget_fraction": 0.1, "forget_ids": None,
            "target_tasks": None, "train_overrides": {}, "mia_attack": "logistic",
            "eval_batch_size": 64, "device": "cpu"}
REFERENCES = {"original": {"uis": 2.0, "sha256": "aa"}, "retrained": {"uis": 0.0, "sha256": "bb"}}


def _run_file(path: Path, models: dict, configs: dict) -> None:
    path.write_text(json.dumps({
        "benchmark": {"name": "indoor"}, "request": {"type": "full"}, "recipe": {},
        "config": {"methods": list(models), "method_configs": configs, **IDENTITY},
        "phases_seconds": {f"unlearn/{m}": 1.0 for m in models},
        "models": {**{m: {"uis": 1.0, "marker": "old"} for m in models}, **REFERENCES}}))


def test_stale_methods(evaluation, tmp_path):
    path = tmp_path / "run.json"
    settings = {"finetune": {"lr": 1e-3}, "interference_aware": {"lr": 6e-3, "alpha": 1.0}}
    methods = ["retrain", "finetune", "interference_aware"]
    assert evaluation._stale_methods(path, methods, settings) == methods  # no file yet
    _run_file(path, {"retrain": 0, "finetune": 0, "interference_aware": 0},
              {"finetune": {"lr": 1e-3}, "interference_aware": {"lr": 6e-3, "alpha": 3.0}})
    assert evaluation._stale_methods(path, methods, settings) == ["interference_aware"]
    assert evaluation._stale_methods(path, [*methods, "pcgrad"], settings) == [
        "interference_aware", "pcgrad"]
    path.write_text("{truncated")
    assert evaluation._stale_methods(path, methods, settings) == methods


_PLUGIN = """
from mtunlearn_ext.unlearning import register_unlearner
from mtunlearn_ext.unlearning.baselines.neggrad_plus import NegGradPlus


@register_unlearner
class EvalPlugin(NegGradPlus):
    name = "eval_plugin_ascent"
"""


def test_a_kept_result_of_a_changed_plugin_is_stale(evaluation, tmp_path, monkeypatch,
                                                    registries_restored):
    """Extension audit: a kept run file's results of a method of one's own were printed as
    "(kept)" after its code changed (only --refresh re-ran it). The run file names the
    plugin's source file and digest (experiment results' ``method_sources``); another digest,
    or none stored, makes the method stale. The library's own methods are not affected."""
    from mtunlearn_ext.unlearning.registry import method_source
    from mtunlearn_ext.workflow import import_plugins

    plugin = tmp_path / "eval_plugin.py"
    plugin.write_text(_PLUGIN)
    monkeypatch.delitem(sys.modules, "eval_plugin", raising=False)
    import_plugins([str(plugin)])
    monkeypatch.setitem(sys.modules, "eval_plugin", sys.modules["eval_plugin"])  # popped after
    source = method_source("eval_plugin_ascent")
    assert source is not None and source["class"] == "eval_plugin.EvalPlugin"
    assert source["file"] == str(plugin.resolve()) and len(source["sha256"]) == 64
    assert method_source("neggrad_plus") is None and method_source("nope") is None
    path = tmp_path / "run.json"
    methods = ["finetune", "eval_plugin_ascent"]
    _run_file(path, {m: 0 for m in methods}, {})
    assert evaluation._stale_methods(path, methods, {}) == ["eval_plugin_ascent"]  # none stored
    stored = json.loads(path.read_text())
    stored["method_sources"] = {"eval_plugin_ascent": source}
    path.write_text(json.dumps(stored))
    assert evaluation._stale_methods(path, methods, {}) == []
    plugin.write_text(_PLUGIN + "# changed\n")
    assert evaluation._stale_methods(path, methods, {}) == ["eval_plugin_ascent"]
    update = json.loads(path.read_text())
    update["method_sources"] = {"eval_plugin_ascent": method_source("eval_plugin_ascent")}
    evaluation._merge_methods(path, update, ["eval_plugin_ascent"])
    assert evaluation._stale_methods(path, methods, {}) == []


def test_merge_replaces_only_the_given_methods(evaluation, tmp_path):
    path = tmp_path / "run.json"
    _run_file(path, {"finetune": 0, "interference_aware": 0},
              {"finetune": {"lr": 1e-3}, "interference_aware": {"alpha": 3.0}})
    update = {"benchmark": {"name": "indoor"}, "request": {"type": "full"}, "recipe": {},
              "config": {"method_configs": {"interference_aware": {"alpha": 1.0}}, **IDENTITY},
              "phases_seconds": {"unlearn/interference_aware": 5.0},
              "models": {"interference_aware": {"uis": 0.5, "marker": "new"},
                         "original": {"uis": 99.0, "sha256": "aa"},
                         "retrained": {"sha256": "bb"}}}
    evaluation._merge_methods(path, update, ["interference_aware"])
    merged = json.loads(path.read_text())
    assert merged["models"]["interference_aware"]["marker"] == "new"
    assert merged["models"]["finetune"]["marker"] == "old"
    assert merged["models"]["original"]["uis"] == 2.0  # the reference rows are kept
    assert merged["config"]["method_configs"]["interference_aware"] == {"alpha": 1.0}
    assert merged["phases_seconds"]["unlearn/interference_aware"] == 5.0
    # Scores of another experiment are never merged in: other run settings (a size, recipe
    # overrides, ...), another recipe, or other reference models (merged before, a 3-epoch
    # run's scores sat beside a 2-epoch run's original and gold models).
    for key, value in (("recipe", {"epochs": 3}),):
        with pytest.raises(RuntimeError, match=f"different {key}"):
            evaluation._merge_methods(path, {**update, key: value}, ["interference_aware"])
    other_size = {**update, "config": {**update["config"], "size": "tiny"}}
    with pytest.raises(RuntimeError, match="other run settings"):
        evaluation._merge_methods(path, other_size, ["interference_aware"])
    other_gold = {**update, "models": {**update["models"], "retrained": {"sha256": "cc"}}}
    with pytest.raises(RuntimeError, match="another retrained model"):
        evaluation._merge_methods(path, other_gold, ["interference_aware"])
    update["request"] = {"type": "partial"}
    with pytest.raises(RuntimeError, match="different request"):
        evaluation._merge_methods(path, update, ["interference_aware"])


def test_unlearning_time_script_compares_like_with_like(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("unlearning_time",
                                                  ROOT / "benchmarks" / "unlearning_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "t.json"
    assert module.main(["--size", "tiny", "--benchmarks", "indoor", "--requests", "partial",
                        "--cache-dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["request"] == "partial" and row["best"]["retrain"] > 0
    # Docs audit: the docstring said the ablations run beside the method; only --ablations
    # times them.
    assert set(row["best"]) == {"retrain", "interference_aware"}
    assert "with ``--ablations`` its ablations too" in " ".join((module.__doc__ or "").split())
    assert row["ratio"]["interference_aware"] == pytest.approx(
        row["best"]["interference_aware"] / row["best"]["retrain"])
    assert "| indoor | partial |" in capsys.readouterr().out
    # A variant of the preset is timed beside it, with its own step count.
    assert module.main(["--size", "tiny", "--benchmarks", "indoor", "--requests", "partial",
                        "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
                        "--variant", '{"steps": 3}']) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["steps"]["interference_aware+variant"] == 3
    assert row["steps"]["interference_aware"] != 3
    assert row["ratio"]["interference_aware+variant"] == pytest.approx(
        row["best"]["interference_aware+variant"] / row["best"]["retrain"])
    assert "| indoor | partial (variant) |" in capsys.readouterr().out


def test_unseen_interference_script_prints_unseen_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("unseen_interference",
                                                  ROOT / "benchmarks" / "unseen_interference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--size", "tiny", "--benchmarks", "indoor", "--recipe", "default",
                        "--request", "partial", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| forget row |"))
    assert header.split(" | ")[1:] == ["retain/segmentation", "retain/depth", "retain/normals",
                                       "unseen/segmentation", "unseen/depth", "unseen/normals |"]
    row = next(line for line in out.splitlines() if line.startswith("| forget/segmentation |"))
    assert len(row.split(" -> ")) == 7  # six cells of "before -> after"
    assert "forget/depth" not in out  # a partial request forgets segmentation only


def test_grid_is_the_product_of_the_method_axes(evaluation):
    import argparse

    args = argparse.Namespace(lrs=[1e-3, 3e-3], grid={"interference_aware": {"alpha": [1, 3]},
                                                      "pcgrad": {"lr": [3e-4]}})
    assert evaluation._grid("finetune", args) == [{"lr": 1e-3}, {"lr": 3e-3}]
    assert evaluation._grid("pcgrad", args) == [{"lr": 3e-4}]
    assert evaluation._grid("interference_aware", args) == [
        {"lr": 1e-3, "alpha": 1}, {"lr": 1e-3, "alpha": 3},
        {"lr": 3e-3, "alpha": 1}, {"lr": 3e-3, "alpha": 3}]
    # A list of blocks tries the union of their products, each setting once, in order.
    args.grid = {"orthograd": [{"lr": [3e-4], "optimizer": ["adam"]},
                               {"lr": [3e-3, 3e-4], "optimizer": ["sgd", "adam"]}]}
    assert evaluation._grid("orthograd", args) == [
        {"lr": 3e-4, "optimizer": "adam"}, {"lr": 3e-3, "optimizer": "sgd"},
        {"lr": 3e-3, "optimizer": "adam"}, {"lr": 3e-4, "optimizer": "sgd"}]


def _tuning_file(path: Path, original: float, records: list[tuple[str, dict, float]]) -> None:
    path.write_text(json.dumps({"records": [
        {"method": "original", "score": original},
        *[{"method": m, "settings": s, "score": v} for m, s, v in records]]}))


def test_selection_averages_over_benchmarks_and_needs_every_one(evaluation, tmp_path):
    a, b = {"lr": 1e-3, "steps": 10}, {"lr": 1e-2, "steps": 20}
    only_indoor = {"lr": 1.0, "steps": 5}
    # On indoor alone `b` wins (1.0 < 2.0), on street alone `a` (1.0 < 4.0); mean: a 1.5, b 2.5.
    _tuning_file(tmp_path / "indoor-full-seed0.json", 3.0,
                 [("finetune", a, 2.0), ("finetune", b, 1.0), ("finetune", only_indoor, 0.1)])
    _tuning_file(tmp_path / "street-full-seed0.json", 5.0,
                 [("finetune", a, 1.0), ("finetune", b, 4.0)])
    _tuning_file(tmp_path / "indoor-partial-seed0.json", 1.0, [("pcgrad", a, 0.5)])
    selected = evaluation.select_settings(tmp_path, ["full", "partial"])
    full = selected["full"]["methods"]["finetune"]
    assert full["settings"] == a  # `only_indoor` was not tried on street: it cannot compete
    assert full["score"] == pytest.approx(1.5)
    assert full["per_benchmark"] == {"indoor-full-seed0": 2.0, "street-full-seed0": 1.0}
    assert selected["full"]["original"] == {"indoor-full-seed0": 3.0, "street-full-seed0": 5.0}
    assert selected["partial"]["methods"]["pcgrad"]["settings"] == a


def test_per_benchmark_selection_picks_on_each_benchmark_alone(evaluation, tmp_path, capsys):
    a, b = {"lr": 1e-3, "steps": 10}, {"lr": 1e-2, "steps": 20}
    only_indoor = {"lr": 1.0, "steps": 5}
    _tuning_file(tmp_path / "indoor-full-seed0.json", 3.0,
                 [("finetune", a, 2.0), ("finetune", b, 1.0), ("finetune", only_indoor, 0.1),
                  ("interference_aware", a, 0.05)])
    _tuning_file(tmp_path / "street-full-seed0.json", 5.0,
                 [("finetune", a, 1.0), ("finetune", b, 4.0), ("interference_aware", a, 0.5)])
    indoor = evaluation.select_settings(tmp_path, ["full"], benchmarks=["indoor"])["full"]
    assert indoor["methods"]["finetune"]["settings"] == only_indoor  # scored on indoor only
    assert indoor["original"] == {"indoor-full-seed0": 3.0}
    street = evaluation.select_settings(tmp_path, ["full"], benchmarks=["street"])["full"]
    assert street["methods"]["finetune"]["settings"] == a
    # The command line writes both picks and prints the method against the best baseline.
    out_dir = tmp_path / "run"
    (out_dir / "tuning").mkdir(parents=True)
    for path in tmp_path.glob("*-full-seed0.json"):
        (out_dir / "tuning" / path.name).write_text(path.read_text())
    capsys.readouterr()
    assert evaluation.main(["--select", "--per-benchmark", "--requests", "full",
                            "--output-dir", str(out_dir)]) == 0
    written = json.loads((out_dir / "tuning" / "selected-per-benchmark.json").read_text())
    assert written["street"]["full"]["methods"]["finetune"]["settings"] == a
    assert written["indoor"]["full"]["methods"]["finetune"]["settings"] == only_indoor
    printed = capsys.readouterr().out
    assert "interference_aware vs best baseline (finetune): 0.050 / 0.100 = 0.50x" in printed
    assert "interference_aware vs best baseline (finetune): 0.500 / 1.000 = 0.50x" in printed


@pytest.mark.parametrize("street_score, replaced", [(1.9, True), (2.1, False)],
                         ids=["lower-everywhere", "lower-mean-only"])
def test_incumbent_rule_keeps_the_preset_unless_beaten_on_every_run(evaluation, tmp_path,
                                                                    street_score, replaced):
    preset, challenger = {"lr": 1e-3, "steps": 10}, {"lr": 3e-3, "steps": 10}
    # The challenger has the lower mean either way (1.0 + 1.9 or 1.0 + 2.1 against 3.0 + 2.0).
    _tuning_file(tmp_path / "indoor-full-seed0.json", 9.0,
                 [("finetune", preset, 3.0), ("finetune", challenger, 1.0)])
    _tuning_file(tmp_path / "street-full-seed0.json", 9.0,
                 [("finetune", preset, 2.0), ("finetune", challenger, street_score)])
    plain = evaluation.select_settings(tmp_path, ["full"])["full"]["methods"]["finetune"]
    assert plain["settings"] == challenger
    ruled = evaluation.select_settings(tmp_path, ["full"],
                                       incumbents={"full": {"finetune": preset}})
    pick = ruled["full"]["methods"]["finetune"]
    assert pick["settings"] == (challenger if replaced else preset)
    assert pick.get("kept_preset", False) is not replaced
    if not replaced:
        assert pick["score"] == pytest.approx(2.5)
        assert pick["challenger"]["settings"] == challenger
    # A preset never scored cannot be kept: the plain selection stands.
    unscored = evaluation.select_settings(tmp_path, ["full"],
                                          incumbents={"full": {"finetune": {"lr": 9.0}}})
    assert unscored["full"]["methods"]["finetune"]["settings"] == challenger


def test_beats_on_every_run_needs_a_shared_run(evaluation):
    assert evaluation.beats_on_every_run({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.5})
    assert not evaluation.beats_on_every_run({"a": 1.0, "b": 1.5}, {"a": 2.0, "b": 1.5})
    assert not evaluation.beats_on_every_run({"a": 1.0}, {"b": 2.0})


def test_aligned_selection_adds_validation_uis_and_skips_runs_without_it(evaluation, tmp_path):
    a, b, old = {"lr": 1e-3, "steps": 10}, {"lr": 1e-2, "steps": 20}, {"lr": 1.0, "steps": 5}
    for name, proxy_a, proxy_b in (("indoor", 2.0, 1.0), ("street", 2.0, 1.0)):
        (tmp_path / f"{name}-full-seed0.json").write_text(json.dumps({"records": [
            {"method": "original", "score": 5.0, "validation_uis": 0.0},
            # `b` is closer to the retrained model, `a` changes unseen-data scores less.
            {"method": "orthograd", "settings": a, "score": proxy_a, "validation_uis": 0.5},
            {"method": "orthograd", "settings": b, "score": proxy_b, "validation_uis": 3.0},
            # tuned before validation metrics were recorded: ranks by the proxy only
            {"method": "orthograd", "settings": old, "score": 0.1}]}))
    proxy = evaluation.select_settings(tmp_path, ["full"])["full"]["methods"]["orthograd"]
    assert proxy["settings"] == old and proxy["score"] == pytest.approx(0.1)
    aligned = evaluation.select_settings(tmp_path, ["full"], "aligned")["full"]
    assert aligned["methods"]["orthograd"]["settings"] == a  # 1.25 against b's 2.0
    assert aligned["methods"]["orthograd"]["score"] == pytest.approx(1.25)
    assert aligned["original"] == {"indoor-full-seed0": 2.5, "street-full-seed0": 2.5}


def test_validation_uis_is_uis_with_validation_as_test(evaluation):
    original = {"validation": {"segmentation": {"miou": 0.5}}, "forget": {}}
    unlearned = {"validation": {"segmentation": {"miou": 0.45}},
                 "forget": {"segmentation": {"miou": 0.6}}}
    # (|0.5 - 0.45| / 0.5 + |0.5 - 0.6| / 0.5) / 2 * 100 = 15
    assert evaluation.validation_uis(unlearned, original, ["segmentation"]) == pytest.approx(15.0)


def test_grid_csv_lists_every_setting_tried_on_every_benchmark(evaluation, tmp_path):
    import csv

    a, b = {"lr": 1e-3, "steps": 10}, {"lr": 1e-2, "steps": 20, "optimizer": "adam"}
    _tuning_file(tmp_path / "indoor-full-seed0.json", 3.0,
                 [("finetune", a, 2.0), ("finetune", b, 1.0), ("pcgrad", a, 0.1)])
    _tuning_file(tmp_path / "street-full-seed0.json", 5.0,
                 [("finetune", a, 1.0), ("finetune", b, 4.0)])
    out = tmp_path / "grid.csv"
    assert evaluation.write_grid_csv(tmp_path, ["full"], out) == 2
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == ["finetune", "finetune"]
    assert [json.loads(r["settings"]) for r in rows] == [a, b]  # sorted by mean: 1.5, 2.5
    assert [(float(r["indoor"]), float(r["street"]), float(r["mean"])) for r in rows] == [
        (2.0, 1.0, 1.5), (1.0, 4.0, 2.5)]
    # Tuning files of several seeds: one column per benchmark and seed.
    _tuning_file(tmp_path / "indoor-full-seed1.json", 3.0, [("finetune", a, 4.0)])
    assert evaluation.write_grid_csv(tmp_path, ["full"], out) == 1
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[3:] == ["indoor-seed0", "indoor-seed1", "street-seed0", "mean"]
    assert float(rows[0]["indoor-seed1"]) == 4.0
    assert float(rows[0]["mean"]) == pytest.approx(7 / 3, abs=1e-4)  # written to 4 decimals


def test_presets_by_recipe():
    from mtunlearn_ext.unlearning import get_unlearner
    from mtunlearn_ext.unlearning.presets import ABLATED_FIELDS, ABLATIONS, TUNED, tuned_settings

    for recipe in TUNED:
        for request in ("full", "partial"):
            settings = tuned_settings(request, ["retrain", "interference_aware", *ABLATIONS],
                                      recipe)
            assert "retrain" not in settings
            method = settings["interference_aware"]
            method_config = get_unlearner("interference_aware", method).config
            for ablation in ABLATIONS:
                fixed = ABLATED_FIELDS[ablation]
                assert settings[ablation] == {k: v for k, v in method.items() if k not in fixed}
                config = get_unlearner(ablation, settings[ablation]).config
                for name, off in (("task_projection", False), ("instance_projection", "off")):
                    expected = off if name in fixed else getattr(method_config, name)
                    assert getattr(config, name) == expected, (recipe, request, ablation, name)
    # A setting cannot switch an ablated component back on.
    with pytest.raises(ValueError, match="fixes `task_projection`"):
        get_unlearner("interference_aware_no_task", {"task_projection": True})
    with pytest.raises(ValueError, match="fixes `instance_projection`"):
        get_unlearner("interference_aware_neither", {"instance_projection": "orthogonal"})
    with pytest.raises(ValueError, match="recipe must be one of"):
        tuned_settings("full", ["finetune"], "unknown")
    with pytest.raises(ValueError, match="request must be one of"):
        tuned_settings("everything", ["finetune"])


def test_tuning_files_accumulate_grids(evaluation, tmp_path):
    path = tmp_path / "indoor-full-seed0.json"
    a, b = {"lr": 1e-3, "steps": 10}, {"lr": 1e-2, "steps": 10}
    _tuning_file(path, 3.0, [("finetune", a, 2.0), ("finetune", b, 1.0)])
    new = [{"method": "original", "score": 3.0},
           {"method": "finetune", "settings": b, "score": 0.5},
           {"method": "pcgrad", "settings": a, "score": 0.7}]
    merged = evaluation._merge_records(path, new)
    assert merged[0]["method"] == "original"
    assert [(r["method"], r["settings"], r["score"]) for r in merged[1:]] == [
        ("finetune", a, 2.0), ("finetune", b, 0.5), ("pcgrad", a, 0.7)]
    assert evaluation._merge_records(tmp_path / "missing.json", new) == new


def test_summary_leaves_out_runs_with_other_settings(evaluation, tmp_path, capsys, monkeypatch):
    from mtunlearn_ext.unlearning.presets import tuned_settings

    runs = tmp_path / "runs"
    runs.mkdir()
    methods = ["retrain", "finetune"]
    current = tuned_settings("full", methods)
    for seed, configs in ((0, current), (1, {"finetune": {"lr": 123.0}})):
        (runs / f"indoor-full-seed{seed}.json").write_text(json.dumps({
            "config": {"seed": seed, "methods": methods, "method_configs": configs},
            "request": {"target_tasks": ["a"]}, "recipe": {},
            "models": {m: {"uis": 1.0 + seed, "retrain_gap": 2.0, "mia_auc": 0.5,
                           "wall_time_s": 1.0, "metrics": {}} for m in ("finetune",)}
            | {"retrained": {"uis": 0.0, "mia_auc": 0.5, "wall_time_s": 10.0, "metrics": {}},
               "original": {"uis": 3.0, "mia_auc": 0.6, "metrics": {}}, "retrain": {}}}))
    monkeypatch.setattr(evaluation, "_original_uis", lambda result: 3.0)
    monkeypatch.setattr(evaluation, "_original_gap", lambda result: 4.0)
    summary = evaluation.summarize(tmp_path, ["indoor"], ["full"], methods)
    assert summary["indoor/full"]["seeds"] == [0]
    assert summary["indoor/full"]["methods"]["finetune"]["uis"][0] == 1.0
    assert "indoor-full-seed1.json" in capsys.readouterr().err


def _full_run(tmp_path: Path, seed: int, methods: list[str],
              models: dict[str, tuple[float, float, float]]) -> None:
    """One indoor full-request run file with the current presets; ``models`` maps each method
    to its (UIS, retrain gap, attack AUC)."""
    from mtunlearn_ext.unlearning.presets import tuned_settings

    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    (runs / f"indoor-full-seed{seed}.json").write_text(json.dumps({
        "config": {"seed": seed, "methods": methods,
                   "method_configs": tuned_settings("full", methods)},
        "request": {"target_tasks": ["a"]}, "recipe": {},
        "models": {m: {"uis": u, "retrain_gap": g, "mia_auc": a, "wall_time_s": 1.0,
                       "metrics": {}} for m, (u, g, a) in models.items()}
        | {"retrained": {"uis": 0.0, "mia_auc": 0.5, "wall_time_s": 10.0, "metrics": {}},
           "original": {"uis": 3.0, "mia_auc": 0.6, "metrics": {}}}}))


def _summarize_full_runs(evaluation, tmp_path: Path, monkeypatch, methods: list[str]) -> dict:
    monkeypatch.setattr(evaluation, "_original_uis", lambda result: 3.0)
    monkeypatch.setattr(evaluation, "_original_gap", lambda result: 4.0)
    return evaluation.summarize(tmp_path, ["indoor"], ["full"], methods)


@pytest.mark.parametrize("other_gap, lowest", [(2.0, True), (1.503, False), (1.0, False)],
                         ids=["lower", "tie", "higher"])
def test_lowest_gap_target_does_not_count_a_tie(evaluation, tmp_path, monkeypatch,
                                                other_gap, lowest):
    methods = ["orthograd", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, other_gap, 0.5),
                                     "interference_aware": (1.0, 1.5, 0.5)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    targets = summary["indoor/full"]["targets"]
    assert targets["gap_ok"] is lowest
    assert targets["lowest_gap_other"] == "orthograd"
    assert "does not count" in evaluation.to_markdown(summary)


def test_the_gap_difference_is_printed_on_its_verdicts_side(evaluation, tmp_path, monkeypatch):
    """The gap target (lower than every other by more than 0.005) printed only the two gaps
    to 3 decimals: 0.830 vs 0.835 read as a 0.005 difference while the verdict, on the
    unrounded 0.0047, was a tie (the held-out indoor partial cell). The difference is printed
    with the digits that put it on its verdict's side."""
    methods = ["orthograd", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, 0.8350, 0.5),
                                     "interference_aware": (1.0, 0.8303, 0.5)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    assert summary["indoor/full"]["targets"]["gap_ok"] is False
    text = evaluation.to_markdown(summary)
    assert "0.830 vs 0.835 for `orthograd`, the lowest of the others (difference -0.0047 [" in text


def test_gap_against_the_baselines_alone_is_reported_beside_the_target(evaluation, tmp_path,
                                                                        monkeypatch):
    """An ablation that is the method's own configuration ties it; the summary then says the
    target is not met as stated and that the method is the lowest against the baselines."""
    methods = ["orthograd", "interference_aware", "interference_aware_no_task"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, 2.0, 0.5),
                                     "interference_aware": (1.0, 1.5, 0.5),
                                     "interference_aware_no_task": (1.0, 1.5, 0.5)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    targets = summary["indoor/full"]["targets"]
    assert targets["gap_ok"] is False
    assert targets["lowest_gap_other"] == "interference_aware_no_task"
    assert targets["gap_below_baselines"] is True
    assert targets["lowest_gap_baseline"] == "orthograd"
    assert "against the baselines alone (lowest `orthograd`, 2.000): lowest" in \
        evaluation.to_markdown(summary)


def test_seed_interval_enumerates_every_resample(evaluation):
    # Two seeds with values 0 and 1: resample means 0, 0.5, 0.5, 1 (all four resamples).
    low, high = evaluation.seed_interval(lambda idx: sum([0.0, 1.0][i] for i in idx) / 2, 2)
    assert (low, high) == pytest.approx((0.075, 0.925))
    # A statistic that does not depend on the resample has a zero-width interval.
    assert evaluation.seed_interval(lambda idx: 3.0, 5) == (3.0, 3.0)
    # Beyond six seeds: seeded draws, the same interval on every call.
    draws = evaluation.seed_interval(lambda idx: float(sum(idx)), 8)
    assert draws == evaluation.seed_interval(lambda idx: float(sum(idx)), 8)
    assert draws[0] < 28.0 < draws[1]


def test_summary_targets_carry_paired_seed_intervals(evaluation, tmp_path, monkeypatch):
    """The UIS ratio's interval pairs the seeds: a method at 0.6x the baseline on every seed
    has a zero-width interval however much the seeds' levels differ."""
    methods = ["orthograd", "interference_aware"]
    for seed, level in enumerate((1.0, 3.0, 2.0)):
        attack = 0.5 + 0.01 * seed
        _full_run(tmp_path, seed, methods, {"orthograd": (level, 2.0, attack),
                                            "interference_aware": (0.6 * level, 1.0 + seed,
                                                                   attack)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    intervals = summary["indoor/full"]["targets"]["intervals_90"]
    assert intervals["uis_ratio"] == pytest.approx((0.6, 0.6))
    low, high = intervals["gap_difference"]  # seeds' gap differences -1, 0, 1
    assert -1.0 < low < 0.0 < high < 1.0
    low, high = intervals["mia_distance"]  # distances 0, 0.01, 0.02
    assert 0.0 <= low < 0.01 < high <= 0.02
    assert "[seeds 90%: 0.60 to 0.60]" in evaluation.to_markdown(summary)


def test_refresh_reruns_methods_whose_settings_did_not_change(evaluation, tmp_path, monkeypatch):
    from argparse import Namespace

    from mtunlearn_ext.unlearning.presets import tuned_settings

    methods = ["finetune", "pcgrad"]
    runs = tmp_path / "runs"
    runs.mkdir()
    path = runs / "indoor-full-seed0.json"
    _run_file(path, {m: 0 for m in methods}, tuned_settings("full", methods))
    ran = []

    def fake_run(config):  # type: ignore[no-untyped-def]
        ran.append(list(config.methods))
        return {"benchmark": {"name": "indoor"}, "request": {"type": "full"}, "recipe": {},
                "config": {"method_configs": config.method_configs,
                           **evaluation._run_identity(dataclasses.asdict(config))},
                "phases_seconds": {f"unlearn/{m}": 2.0 for m in config.methods},
                "models": {**{m: {"uis": 0.5, "marker": "new"} for m in config.methods},
                           **REFERENCES}}

    monkeypatch.setattr(evaluation, "run_experiment", fake_run)
    args = Namespace(requests=["full"], methods=methods, recipe="default", rerun=False,
                     output_dir=str(tmp_path), refresh=[], size="small", forget_fraction=0.1,
                     partial_task="segmentation", cache_dir=None, train={}, threads=1)
    assert evaluation._run_unit("indoor", 0, args)[0].endswith("(kept)")
    assert ran == []
    args.refresh = ["pcgrad", "salun"]  # salun is not evaluated here: ignored
    evaluation._run_unit("indoor", 0, args)
    assert ran == [["pcgrad"]]
    models = json.loads(path.read_text())["models"]
    assert models["pcgrad"]["marker"] == "new" and models["finetune"]["marker"] == "old"
    # Other run settings (here recipe overrides): the file is another experiment, run afresh
    # (it was kept: "(kept)", no work, the old scores reported as the new setting's).
    ran.clear()
    args.refresh, args.train = [], {"epochs": 3}
    evaluation._run_unit("indoor", 0, args)
    assert ran == [methods]


def test_a_seed_on_which_a_method_diverged_is_not_averaged_away(evaluation, tmp_path,
                                                               monkeypatch):
    """A diverged method's run stores a null UIS and AUC and an infinite gap: the summary
    crashed on the AUC distance, and the mean left the seed out (a broken method then scored
    better on the seeds it survived)."""
    methods = ["finetune"]
    _full_run(tmp_path, 0, methods, {"finetune": (1.0, 2.0, 0.55)})
    _full_run(tmp_path, 1, methods, {"finetune": (None, float("inf"), None)})  # type: ignore[dict-item]
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    row = summary["indoor/full"]["methods"]["finetune"]
    assert summary["indoor/full"]["seeds"] == [0, 1]
    assert row["uis"][0] == float("inf") and row["retrain_gap"][0] == float("inf")
    assert row["mia_distance"][0] == float("inf")
    assert evaluation._mean_std([1.0, 3.0]) == (2.0, pytest.approx(1.4142135623730951))


@pytest.mark.parametrize("refit", [0, 2])
def test_tuning_scores_each_budget_as_a_run_of_that_length(evaluation, tmp_path, refit):
    """With the heads refitted at the end, an s-step run is not the first s steps of a longer
    one: each budget is then its own run. Either way a record's metrics are those of the model
    an s-step run returns."""
    import torch

    from mtunlearn_ext.experiment import prepare_experiment
    from mtunlearn_ext.metrics import evaluate
    from mtunlearn_ext.unlearning import get_unlearner

    threads = torch.get_num_threads()
    argv = ["--tune", "--benchmarks", "digits", "--requests", "partial", "--partial-task",
            "digit", "--seeds", "0", "--size", "tiny", "--methods", "finetune",
            "--grid", json.dumps({"finetune": {"lr": [1e-2], "head_refit_steps": [refit]}}),
            "--checkpoints", "2,3", "--retain-eval", "50", "--output-dir", str(tmp_path),
            "--cache-dir", str(tmp_path / "cache")]
    try:
        assert evaluation.main(argv) == 0
        records = json.loads((tmp_path / "tuning" / "digits-partial-seed0.json").read_text())
        scored = {r["steps"]: r for r in records["records"] if r["method"] == "finetune"}
        assert sorted(scored) == [2, 3]
        args = types.SimpleNamespace(  # what main() makes of argv, for the same experiment
            methods=["finetune"], size="tiny", forget_fraction=0.1, partial_task="digit",
            recipe="default", cache_dir=str(tmp_path / "cache"), threads=1,
            train=dict(evaluation.RECIPES["default"]))
        config = evaluation._config("digits", "partial", 0, args, tmp_path / "unused.json")
        config.methods, config.method_configs = [], {}
        prepared = prepare_experiment(config)
        problem = prepared.problem(config)
        rows = torch.randperm(len(prepared.retain),
                              generator=torch.Generator().manual_seed(0))[:50]
        for steps, record in scored.items():
            assert record["settings"]["head_refit_steps"] == refit
            model = get_unlearner("finetune", record["settings"]).unlearn(problem).model
            assert record["metrics"] == {
                "forget": evaluate(model, prepared.forget, None, 64),
                "retain": evaluate(model, prepared.retain.subset(rows), None, 64)}
    finally:
        torch.set_num_threads(threads)


def test_a_seed_on_which_the_method_diverged_fails_its_targets(evaluation, tmp_path,
                                                              monkeypatch):
    """The method's null UIS, gap and AUC on one seed crashed the per-seed intervals
    (float(None)); now its targets are not met and no interval is given (the resamples
    without the diverged seed would hide it)."""
    methods = ["orthograd", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, 2.0, 0.5),
                                     "interference_aware": (0.5, 1.0, 0.5)})
    diverged: dict = {"orthograd": (1.0, 2.0, 0.5), "interference_aware": (None, None, None)}
    _full_run(tmp_path, 1, methods, diverged)
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    targets = summary["indoor/full"]["targets"]
    assert targets["uis_ratio"] == float("inf") and targets["uis_ok"] is False
    assert targets["gap_ok"] is False and targets["mia_ok"] is False
    for key in ("uis_ratio", "gap_difference", "mia_distance"):
        assert all(math.isnan(v) for v in targets["intervals_90"][key])
    assert "seeds 90%" not in evaluation.to_markdown(summary)


def test_every_baseline_diverged_is_no_uis_ratio_of_0(evaluation, tmp_path, monkeypatch):
    """When every step baseline diverged on a seed (null UIS: mean inf), the method's finite
    UIS over inf gave a ratio of 0 and "met" (0.00 <= 0.7): a comparison with no baseline
    result was reported as the best possible win. The ratio is undefined (NaN) and the
    target not met, the table says why."""
    methods = ["orthograd", "pcgrad", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, 2.0, 0.5), "pcgrad": (1.2, 2.0, 0.5),
                                     "interference_aware": (0.5, 1.0, 0.5)})
    _full_run(tmp_path, 1, methods, {"orthograd": (None, None, None),
                                     "pcgrad": (None, None, None),
                                     "interference_aware": (0.5, 1.0, 0.5)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    targets = summary["indoor/full"]["targets"]
    assert math.isnan(targets["uis_ratio"]) and targets["uis_ok"] is False
    text = evaluation.to_markdown(summary)
    assert "no baseline finished on every seed" in text
    assert "UIS ratio to the best baseline (`orthograd`): 0.00" not in text
    assert evaluation.uis_ratio(0.5, math.inf) != evaluation.uis_ratio(0.5, math.inf)  # NaN
    # The tuning summary's line: "0.500 / inf = 0.00x" before.
    line = evaluation._ratio_line({"interference_aware": {"score": 0.5},
                                   "orthograd": {"score": math.inf}})
    assert "0.00x" not in line and "no baseline has a finite score" in line


@pytest.mark.parametrize("ours, ratio, met", [(0.5, float("inf"), False), (0.0, None, True)],
                         ids=["method-above", "both-zero"])
def test_a_best_baseline_at_uis_zero(evaluation, tmp_path, monkeypatch, ours, ratio, met):
    """A best baseline whose mean UIS is 0 raised ZeroDivisionError; no method can be below
    it, and one also at 0 is within 0.7x of it (the ratio itself is undefined: NaN)."""
    methods = ["orthograd", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (0.0, 2.0, 0.5),
                                     "interference_aware": (ours, 1.0, 0.5)})
    targets = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)[
        "indoor/full"]["targets"]
    assert targets["uis_ok"] is met
    if ratio is None:
        assert math.isnan(targets["uis_ratio"])
    else:
        assert targets["uis_ratio"] == ratio


def test_summary_takes_one_run_file_per_seed_in_seed_order(evaluation, tmp_path, monkeypatch,
                                                           capsys):
    """The glob ``seed*.json`` took a merge's leftover ``seed0.update.json`` as a second seed 0
    (seeds [0, 0, 1], its UIS averaged in) and listed seed 10 before seed 2."""
    methods = ["orthograd", "interference_aware"]
    for seed in (2, 10):
        _full_run(tmp_path, seed, methods, {"orthograd": (1.0, 2.0, 0.5),
                                            "interference_aware": (0.5, 1.0, 0.5)})
    runs = tmp_path / "runs"
    leftover = json.loads((runs / "indoor-full-seed2.json").read_text())
    leftover["models"]["interference_aware"]["uis"] = 9.0
    (runs / "indoor-full-seed2.update.json").write_text(json.dumps(leftover))
    (runs / "indoor-full-seed02.json").write_text(json.dumps(leftover))
    (runs / "indoor-full-seed3.json").write_text(json.dumps(leftover))  # records seed 2
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    block = summary["indoor/full"]
    assert block["seeds"] == [2, 10]
    assert block["methods"]["interference_aware"]["uis"] == (0.5, 0.0)
    err = capsys.readouterr().err
    assert "seed2.update.json (not named" in err and "seed02.json (not named" in err
    assert "seed3.json (it records seed 2)" in err


def test_printed_targets_fall_on_their_verdicts_side(evaluation, tmp_path, monkeypatch):
    """Verdicts are taken on unrounded means; a ratio of 0.7004 printed "0.70 (target <= 0.7):
    NOT met" (an AUC distance of 0.0504 "0.050", a time ratio 0.1504 "0.150"). The printed
    number now carries the digits that put it on its verdict's side; others are unchanged."""
    methods = ["orthograd", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, 2.0, 0.5),
                                     "interference_aware": (0.7004, 1.0, 0.5504)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    targets = summary["indoor/full"]["targets"]
    assert not targets["uis_ok"] and not targets["mia_ok"]
    text = evaluation.to_markdown(summary)
    assert "the best baseline (`orthograd`): 0.7004 [" in text
    assert "(mean UIS 0.70 vs 1.00; target <= 0.7): NOT met" in text
    assert "abs(MIA AUC - retrained's) = 0.0504 [" in text
    assert "wall time / retraining time = 0.100 (" in text  # 0.1: two digits would do
    side = evaluation.on_the_verdicts_side
    assert side(0.1504, 0.15, 3) == "0.1504" and side(0.6996, 0.7, 2) == "0.6996"
    assert side(0.7, 0.7, 2) == "0.70" and side(0.6, 0.7, 2) == "0.60"
    assert side(float("inf"), 0.7, 2) == "inf"
    # The gap's verdict is strict (below -0.005): -0.00501 meets it, printed -0.005 would not.
    assert side(-0.00501, -0.005, 3) == "-0.00501"


def test_one_seed_has_no_standard_deviation(evaluation, tmp_path, monkeypatch):
    """The standard deviation is the sample one (n - 1); with one seed it printed "± 0.00",
    a spread never measured, now none (NaN in the summary, the mean alone in the table)."""
    methods = ["orthograd", "interference_aware"]
    _full_run(tmp_path, 0, methods, {"orthograd": (1.0, 2.0, 0.5),
                                     "interference_aware": (0.5, 1.0, 0.5)})
    summary = _summarize_full_runs(evaluation, tmp_path, monkeypatch, methods)
    mean, std = summary["indoor/full"]["methods"]["interference_aware"]["uis"]
    assert mean == 0.5 and math.isnan(std)
    assert "| **interference_aware** | 0.50 | 1.00 | 0.500 |" in evaluation.to_markdown(summary)
    assert evaluation._mean_std([1.0, 2.0, 4.0])[1] == pytest.approx(1.5275252316519468)


def test_time_table_prints_a_ratio_on_its_verdicts_side():
    """benchmarks/unlearning_time.py printed a recorded ratio of 0.15037
    (replication_avx512_time_after_sweep.json, indoor full) as "0.150 | NOT met"."""
    spec = importlib.util.spec_from_file_location("unlearning_time",
                                                  ROOT / "benchmarks" / "unlearning_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = {"benchmark": "indoor", "request": "full", "best": {"retrain": 68.6,
                                                            "interference_aware": 10.3},
           "ratio": {"interference_aware": 0.1503738668792887},
           "steps": {"interference_aware": 50}}
    assert module.time_table([row])[-1] == "| indoor | full | 68.6 | 10.3 | 50 | 0.1504 | NOT met |"
    row["ratio"]["interference_aware"] = 0.1471
    assert module.time_table([row])[-1].endswith("| 0.147 | met |")
