"""The performance scripts of benchmarks/ still run, at sizes of a few seconds (the README quotes
their tables; nothing else in the suite runs them). Smoke runs: they check that every contender
runs and agrees with the others, never how fast anything is."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
#: One thread: the smoke runs share CI's two cores with nothing to measure.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_the_pytest_benchmark_suite_runs_every_contender(tmp_path: Path) -> None:
    """Each benchmark checks its result against a float64 reference, so the untimed run fails
    on a contender that is wrong as well as on one that no longer runs."""
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCHMARKS /
                                                                   "test_bench_ops.py"),
                "-m", "benchmark", "--benchmark-disable", "-rs"], cwd=tmp_path)
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, out
    # The one skip is TorchJD's bfloat16 UPGrad (NumPy has no bfloat16), said in the output.
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all("bfloat16" in line for line in skips), skips


def test_compare_times_every_contender_of_the_step(tmp_path: Path) -> None:
    out_json = tmp_path / "compare.json"
    stdout = _run([str(BENCHMARKS / "compare.py"), "--k", "2", "6", "--n", "1000", "--dtype",
                   "fp32", "--cases", "gram", "step", "directions", "--repeats", "2",
                   "--min-sample", "0",
                   "--cheap-samples", "2", "--budget", "1", "--no-memory", "--threads", "1",
                   "--json", str(out_json)], cwd=tmp_path)
    payload = json.loads(out_json.read_text())
    timings = {(r["kind"], t["name"]): t for r in payload["results"] for t in r["timings"]}
    assert {kind for kind, _ in timings} == {"gram", "step", "directions"}
    failed = {key: (t["error"], t["skipped"]) for key, t in timings.items()
              if t["error"] or t["skipped"]}
    assert failed == {}
    names = {name for _, name in timings}
    for contender in ("ops.gram", "torch.mm(x, x.T)", "ops.pcgrad", "TorchJD UPGrad",
                      "LibMTL-style PCGrad loop", "surgery.UPGrad()(x)",
                      "mm + linalg.solve (project_out)"):
        assert contender in names, sorted(names)
    assert all(t["median_s"] > 0 for t in timings.values())
    assert "## Targets" in stdout


def test_large_model_step_agrees_with_plain_torch(tmp_path: Path) -> None:
    out_json = tmp_path / "large.json"
    _run([str(BENCHMARKS / "large_model.py"), "--per-sample", "2", "--snapshots", "2",
          "--depth", "1", "--repeats", "1", "--json", str(out_json)], cwd=tmp_path)
    payload = json.loads(out_json.read_text())
    assert payload["config"]["depth"] == 1 and payload["shared_params"] > 7_000_000
    # The compiled surgery's .grad against the same algorithm in plain torch, and against
    # OrthoGrad's exact QR (which differs by the ridge only).
    assert max(payload["rel_diff_gram"]) < 1e-4
    assert max(payload["rel_diff_qr"]) < 1e-3
    assert all(math.isfinite(v) and v > 0 for v in payload["surgery_compiled"])


def test_bench_comm_runs_on_two_gloo_ranks(tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "bench_comm.py"), "--world-size", "2", "--tasks", "2",
                   "--numel", "1000", "--reps", "1"], cwd=tmp_path)
    assert "world size 2, backend gloo" in stdout
    row = [line for line in stdout.splitlines() if line.startswith("2 ")]
    assert len(row) == 1 and row[0].split()[1] == "1,000", stdout


def test_host_overhead_times_the_list_ops_over_resnet50_shapes(tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "host_overhead.py"), "--models", "resnet50", "--k", "2",
                   "--threads", "1"], cwd=tmp_path)
    rows = [line for line in stdout.splitlines() if line.startswith("| resnet50 | 159 ")]
    contenders = {line.split("|")[3].strip() for line in rows}
    assert {"surgery.aggregate_list(UPGrad)", "cat + UPGrad + split-copy",
            "surgery.project_out_list"} <= contenders, stdout


def test_many_tasks_times_singular_and_regular_grams_with_conflict_free_updates(
        tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "many_tasks.py"), "--ks", "12", "--n", "4"], cwd=tmp_path)
    rows = [line.split() for line in stdout.splitlines()[1:]]
    assert [(r[0], r[2]) for r in rows] == [("UPGrad", "4"), ("MGDA", "4"), ("UPGrad", "120"),
                                            ("MGDA", "120")], stdout
    assert all(float(r[-1]) >= -1e-5 for r in rows), stdout  # no task's gradient conflicts


def test_per_sample_embeddings_times_both_passes_after_they_agree(tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "per_sample_embeddings.py"), "--rows", "50", "--dim", "4",
                   "--bag", "5", "--batch", "6", "--repeats", "2", "--threads", "1"],
                  cwd=tmp_path)
    rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| 50 ")]
    assert [r[2].strip() for r in rows] == ["sum", "mean", "max"], stdout
    assert all(float(r[-2].strip()) <= 1e-5 for r in rows), stdout


def test_memory_inner_shapes_times_every_kernel_variant(tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "memory_inner_shapes.py"), "--tensors", "4", "--values",
                   "1000", "--repeats", "2", "--threads", "1", "--shapes", "4x8,gram4"],
                  cwd=tmp_path)
    ops_timed = [line.split("|")[1].strip() for line in stdout.splitlines()
                 if line.startswith("| inner_list") or line.startswith("| gram_list")]
    assert ops_timed == ["inner_list", "gram_list"], stdout


def test_unlearning_memory_counts_the_peak_of_every_method(tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "unlearning_memory.py"), "--sizes", "0.05", "--methods",
                   "interference_aware", "finetune"], cwd=tmp_path)
    rows = [line.split() for line in stdout.splitlines()[1:]]
    assert [row[1] for row in rows] == ["interference_aware", "finetune"], stdout
    # Copies of the model at the peak: the plan's and more (the returned model at least).
    copies, plan = float(rows[0][4]), float(rows[0][5])
    assert copies > plan > 7, stdout



def test_removal_chain_checks_every_round_of_a_short_chain(tmp_path: Path) -> None:
    """Five requests (full, partial, the partial one's instance in full): each round's retain
    set against the hand-computed one, verify, evaluate, report; default output names."""
    stdout = _run([str(BENCHMARKS / "removal_chain.py"), "--rounds", "5", "--folder",
                   str(tmp_path / "chain"), "--json", str(tmp_path / "chain.json")], cwd=tmp_path)
    assert "FAILED" not in stdout, stdout
    rows = json.loads((tmp_path / "chain.json").read_text())["rounds"]
    assert [row["task"] is None for row in rows] == [True, True, True, False, True], stdout
    assert rows[-1]["name_bytes"] == rows[1]["name_bytes"], stdout  # -2 ... -5: no growth


def _compare_module():  # type: ignore[no-untyped-def]
    """benchmarks/compare.py as a module (it imports its sibling _bench_common by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("compare")


def test_the_directions_case_projects_many_directions_off_four_rows() -> None:
    """Mutation audit: the smoke run checks that the directions case runs and agrees, not that
    it is the case RESULTS.md reports: k directions (g, k rows) projected off the 4 basis rows
    (m > k: the two-pass path), not 4 directions off k rows; the quick grid runs it, and the
    grid only at k past the 4 rows."""
    compare = _compare_module()
    case = compare.build_directions(compare.CaseSpec("directions", "fp32", 6, 1000))
    by_name = {c.name: c for c in case.contenders}
    (x,) = case.inputs
    assert x.shape == (6 + compare.DIRECTIONS_BASIS_ROWS, 1000)
    for name in ("ops.project_out", "ops.project_nonconflicting",
                 "mm + linalg.solve (project_out)"):
        assert by_name[name].fn().shape == (6, 1000), name  # one row per direction
    assert compare.input_bytes_of(case.spec) == case.input_bytes
    quick = argparse.Namespace(quick=True, cases=list(compare.CASE_KINDS))
    assert compare.CaseSpec("directions", "fp32", 64, 10**6) in compare.plan_cases(quick)
    grid = argparse.Namespace(quick=False, cases=["directions"], dtype=["fp32"], n=[1e3],
                              k=[2, 4, 6])
    assert [s.k for s in compare.plan_cases(grid)] == [6]
    rows = {"kind": "directions", "model": "", "n": 1000, "dtype": "fp32", "k": 6,
            "floor": {"best_s": 1e-3},
            "timings": [{"name": "ops.project_out", "x_floor": 2.0, "median_s": 1e-3,
                         "samples": [1e-3], "skipped": None, "error": None},
                        {"name": "ops.project_nonconflicting", "x_floor": 2.0, "median_s": 1e-3,
                         "samples": [1e-3], "skipped": None, "error": None},
                        {"name": "mm + linalg.solve (project_out)", "x_floor": 4.0,
                         "median_s": 2e-3, "samples": [1e-3], "skipped": None, "error": None}]}
    summary = compare.summary_markdown([rows])
    assert "**directions**" in summary and "mm+solve / proj_out" in summary


def test_run_hashes_are_the_same_for_the_same_command_line(tmp_path: Path) -> None:
    """scripts/run_hashes.py, the bit-for-bit check before and after a change, is only useful
    if the same command gives the same digests: a second run, which reuses the cached reference
    models, must print the same lines; different methods and requests give different weights."""
    args = [str(ROOT / "scripts" / "run_hashes.py"), "--size", "tiny", "--recipe", "default",
            "--steps", "1", "--cache-dir", str(tmp_path / "cache")]
    first, second = _run(args, cwd=tmp_path), _run(args, cwd=tmp_path)
    rows = [line.split() for line in first.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("interference_aware", "full"), ("orthograd", "full"),
                                            ("interference_aware", "partial"),
                                            ("orthograd", "partial")], first
    assert all(len(r[2]) == 8 and int(r[2], 16) >= 0 for r in rows), first
    assert len({r[2] for r in rows}) == 4, first
    assert second == first
