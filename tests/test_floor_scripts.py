"""The tables of benchmarks/uis_floor.py and benchmarks/retrain_noise.py from run files: which
figures they put beside the floors, and how they average them."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    if str(ROOT / "benchmarks") not in sys.path:  # the scripts import their _eval_common
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _eval_run(path: Path, uis: dict[str, float], gaps: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    models = {name: {"uis": value, "retrain_gap": gaps.get(name, 9.0)}
              for name, value in uis.items()}
    path.write_text(json.dumps({"models": models}))


def test_uis_floor_table_puts_the_evaluation_beside_its_own_forget_size(tmp_path: Path) -> None:
    script = _script("uis_floor")
    floor = {"mean": 0.3, "q05": 0.1, "q95": 0.6, "forget_change": {}}
    results = {"indoor": {s: {"evaluation_forget_size": 60,
                              "full": {"60": floor, "120": floor},
                              "partial": {"60": floor, "120": floor}} for s in (0, 1)}}
    uis = {"full": [1.0, 2.0], "partial": [0.4, 0.2]}
    for request in ("full", "partial"):
        for seed in (0, 1):
            u = uis[request][seed]
            _eval_run(tmp_path / "eval" / "runs" / f"indoor-{request}-seed{seed}.json",
                      {"interference_aware": u, "orthograd": 2 * u, "neggrad_plus": 3 * u,
                       "original": 5.0, "retrained": 1.5}, {})
    args = argparse.Namespace(seeds=[0, 1], recipe="memorising", draws=5, pool=10,
                              eval_dir=str(tmp_path / "eval"))
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in script.table(results, args).splitlines() if line.startswith("| indoor")}
    # Targets: 0.7x / 0.5x the best baseline's mean (orthograd: 3.0 full, 0.6 partial).
    assert "| 2.10 | 1.50 | 3.00 (orthograd) | 1.50 | 5.00 |" in rows[("indoor / full", "60")]
    assert "| 0.30 | 0.30 | 0.60 (orthograd) |" in rows[("indoor / partial", "60")]
    assert rows[("indoor / full", "120")].endswith("| - | - | - | - | - |")
    assert "0.30 [0.10, 0.60]" in rows[("indoor / partial", "120")]


def test_uis_floor_counts_a_diverged_seed_and_names_a_missing_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A baseline's null UIS (a diverged seed) raised TypeError; it now makes that baseline's
    mean inf, as in unlearning_eval's summary, so it is not the best; a baseline missing from
    a seed is named when left out."""
    script = _script("uis_floor")
    for seed in (0, 1):
        models = {"interference_aware": 1.0, "orthograd": 2.0 if seed == 0 else None,
                  "neggrad_plus": 3.0, "original": 5.0, "retrained": 1.5}
        if seed == 0:
            models["finetune"] = 0.1
        _eval_run(tmp_path / "eval" / "runs" / f"indoor-full-seed{seed}.json", models, {})
    args = argparse.Namespace(seeds=[0, 1], eval_dir=str(tmp_path / "eval"))
    known = script.measured(args, "indoor", "full")
    assert known is not None
    assert known["best_name"] == "neggrad_plus" and known["target"] == 0.7 * 3.0
    assert "finetune left out (not on every seed)" in capsys.readouterr().err


def test_retrain_noise_summary(tmp_path: Path) -> None:
    script = _script("retrain_noise")
    for seed, (gap, auc) in enumerate([(1.0, 0.55), (2.0, 0.45)]):
        for request in ("full", "partial"):
            run = tmp_path / "noise" / f"street-{request}-seed{seed}.json"
            run.parent.mkdir(parents=True, exist_ok=True)
            run.write_text(json.dumps({"models": {
                "retrain": {"retrain_gap": gap, "uis": 0.5, "mia_auc": auc},
                "retrained": {"uis": 0.7, "mia_auc": 0.5}}}))
            _eval_run(tmp_path / "eval" / "runs" / f"street-{request}-seed{seed}.json",
                      {"interference_aware": 0.1, "pcgrad": 0.2, "salun": 0.3},
                      {"interference_aware": 1.2 + seed, "pcgrad": 1.1, "salun": 4.0})
    args = argparse.Namespace(benchmarks=["street"], seeds=[0, 1], recipe="memorising",
                              seed_offset=1000, output_dir=str(tmp_path / "noise"),
                              eval_dir=str(tmp_path / "eval"))
    text = script.summary(args)
    assert ("| street / full | 1.50 [1.00, 2.00] | 0.50 | 0.050 | 1.70 | 1.10 (pcgrad) | 0.70 |"
            in text)
    assert "| street / partial | 1.50 [1.00, 2.00] |" in text


def test_the_cell_scripts_read_the_evaluation_where_unlearning_eval_writes_it(
        monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Docs audit: uis_floor.py and retrain_noise.py read the evaluation from
    runs/unlearning_eval_<recipe> (their help said so), while unlearning_eval.py writes the
    default recipe's to runs/unlearning_eval: with --recipe default they found no evaluation
    and printed its columns as missing. Each recipe's folder is now the same for both."""
    evaluation = _script("unlearning_eval")
    cells = _script("_eval_common")
    written: dict[str, str] = {}

    def record_output_dir(args: argparse.Namespace) -> int:
        written[args.recipe] = args.output_dir
        return 0

    monkeypatch.setattr(evaluation, "run_tuning", record_output_dir)
    for recipe in ("default", "memorising"):
        assert evaluation.main(["--recipe", recipe, "--tune"]) == 0
        parser = argparse.ArgumentParser()
        cells.add_cell_arguments(parser)
        args = parser.parse_args(["--recipe", recipe])
        cells.parse_cells(parser, args)
        assert args.eval_dir == written[recipe], recipe
    assert written["default"] == "runs/unlearning_eval"
