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

import pytest

# Runs our scripts and command line end to end: left out of scripts/test_matrix.sh's
# legs by default (they run in the main suite; the legs check the library on other
# torch and Python versions).
pytestmark = pytest.mark.end_to_end

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
                   "--numel", "1000", "--reps", "1", "--trunk-layers", "4"], cwd=tmp_path)
    assert "world size 2, backend gloo" in stdout
    assert "sharded step  w/o check" in stdout, stdout  # the agreement check's cost, in-tree
    sharded, trunk = stdout.split("\n\n")
    row = [line for line in sharded.splitlines() if line.startswith("2 ")]
    assert len(row) == 1 and row[0].split()[1] == "1,000", stdout
    cells = row[0].split()  # k, n, 16 B, 16 B, all-reduce ms, step ms, then the unchecked step
    assert cells[9] == cells[11] == "ms" and float(cells[10]) > 0, stdout
    # The replicated step, bucketed against one all-reduce per tensor (its gradients equal,
    # checked in the script) and plain DDP.
    assert "replicated step (bucketed)  one all-reduce per tensor  plain DDP step" in trunk, trunk
    row = [line for line in trunk.splitlines() if line.startswith("2 ")]
    assert len(row) == 1 and "8 (4 x Linear(64, 64))" in row[0], trunk
    assert all(float(v) > 0 for v in row[0].split()[-6::2]), trunk


def test_host_overhead_times_the_list_ops_over_resnet50_shapes(tmp_path: Path) -> None:
    stdout = _run([str(BENCHMARKS / "host_overhead.py"), "--models", "resnet50", "--k", "2",
                   "--threads", "1"], cwd=tmp_path)
    rows = [line for line in stdout.splitlines() if line.startswith("| resnet50 | 159 ")]
    contenders = {line.split("|")[3].strip() for line in rows}
    assert {"surgery.aggregate_list(UPGrad)", "cat + UPGrad + split-copy",
            "surgery.project_out_list"} <= contenders, stdout
    # Every plain-PyTorch call was checked against ours before it was timed.
    checked = {line.split("|")[3].strip(): float(line.split("|")[8]) for line in rows
               if line.split("|")[8].strip()}
    assert set(checked) == {"cat + mm", "cat + mv + split-copy", "cat + UPGrad + split-copy",
                            "cat + solve + split-copy"}, stdout
    assert max(checked.values()) < 1e-5, stdout


def _benchmark_module(name: str):  # type: ignore[no-untyped-def]
    """A script of benchmarks/ as a module (they import their sibling _bench_common by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_host_overhead_pairs_compute_the_same_values() -> None:
    """Fairness: each baseline of host_overhead.py and the call of ours it is timed against
    give the same result on the same inputs (the script checks this before timing; it timed
    them unchecked before, and the calls that write into buffers returned nothing to check)."""
    import torch

    host = _benchmark_module("host_overhead")
    bc = _benchmark_module("_bench_common")
    calls = host.contenders("resnet50", 3, "cpu")
    baselines = {c.name: c.vs for c in calls if c.role == "baseline"}
    assert len(baselines) == 4
    agreement = bc.check_agreement(calls, torch.float32)
    assert {name: row["vs"] for name, row in agreement.items()} == baselines
    assert all("error" not in row and row["rel_diff"] < 1e-5 for row in agreement.values()), \
        agreement


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


def test_the_targets_table_lists_every_target_a_run_did_not_measure() -> None:
    """Audit: a run without the k=8, n=1e7 step case listed the gram targets it had not
    measured as "not measured" but left the step targets out of the table altogether."""
    compare = _compare_module()
    verdicts = compare.evaluate_targets([])
    assert {v["verdict"] for v in verdicts} == {"not measured"}
    targets = [v["target"] for v in verdicts]
    assert len(targets) == len(set(targets)) == 9
    for wanted in ("whole step (pcgrad, project_nonconflicting, project_out) <= 2.5x floor",
                   ">= 3x faster than TorchJD", ">= 30x faster than LibMTL PCGrad",
                   "n=1e5, k=16 whole step within 5x floor", "gram / gram_list <= 1.3x floor"):
        assert any(t.startswith(wanted) for t in targets), (wanted, targets)


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
    models, must print the same lines; different methods and requests give different weights.
    It digests the checkout it sits in (first line), not an installed copy of the package: run
    from another clone, it compared that copy's code."""
    args = [str(ROOT / "scripts" / "run_hashes.py"), "--size", "tiny", "--recipe", "default",
            "--steps", "1", "--cache-dir", str(tmp_path / "cache")]
    first, second = _run(args, cwd=tmp_path), _run(args, cwd=tmp_path)
    source, *lines = first.splitlines()
    assert source == f"# mtunlearn_ext from {(ROOT / 'mtunlearn_ext').resolve()}", first
    rows = [line.split() for line in lines]
    assert [(r[0], r[1]) for r in rows] == [("interference_aware", "full"), ("orthograd", "full"),
                                            ("interference_aware", "partial"),
                                            ("orthograd", "partial")], first
    assert all(len(r[2]) == 8 and int(r[2], 16) >= 0 for r in rows), first
    assert len({r[2] for r in rows}) == 4, first
    assert second == first


def test_benchmark_quiet_hides_the_progress_bar_of_compare(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``mtunlearn benchmark --quiet`` was a no-op: compare.py drew its bar over the cases all
    the same. It now passes ``--no-progress``, which compare.py accepts."""
    from mtunlearn_ext import cli

    assert cli.main(["benchmark", "--dry-run", "--quiet"]) == 0
    assert "compare.py --quick --no-progress" in capsys.readouterr().out
    assert cli.main(["benchmark", "--dry-run"]) == 0
    assert "--no-progress" not in capsys.readouterr().out
    _run([str(BENCHMARKS / "compare.py"), "--no-progress", "--cases", "gram", "--k", "2",
          "--n", "1000", "--dtype", "fp32", "--repeats", "1", "--min-sample", "0",
          "--cheap-samples", "1", "--no-memory", "--threads", "1"], cwd=tmp_path)


def test_large_model_usual_way_reads_the_ring_in_place() -> None:
    """Fairness: the plain-torch way of large_model.py takes each layer's basis as a column
    slice of the snapshot ring, as code that keeps its own ring flat would; it used to
    ``torch.cat`` every layer's snapshots at every step, a copy of the whole ring charged to the
    alternative only. The compiled ops read the same buffers, as per-parameter views."""
    import torch

    large = _benchmark_module("large_model")
    params = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2, 2)]
    ring = large.SnapshotRing(params, 3, torch.Generator().manual_seed(0))
    assert ring.flat.shape == (3, 12 + 5 + 8)
    offset = 0
    for p, stack in zip(params, ring.buffers):
        assert stack.shape == (3, *p.shape)
        assert stack.data_ptr() == ring.flat[:, offset:].data_ptr()  # a view, not a copy
        offset += p.numel()
    ring.push([torch.full_like(p, float(i + 1)) for i, p in enumerate(params)])
    assert ring.flat[0].tolist() == [1.0] * 12 + [2.0] * 5 + [3.0] * 8


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compare_pits_every_baseline_against_ours_on_the_same_inputs(dtype: str) -> None:
    """Fairness of compare.py: every baseline is paired with one of our contenders, agrees
    with it, and reads the very tensors the case holds (in the case's dtype): scaling them
    scales every result, ours and theirs alike (each quantity is homogeneous: a Gram by 4, the
    steps by 2), so no side computes on a copy or on other values."""
    compare = _compare_module()
    bc = _benchmark_module("_bench_common")
    for kind in ("gram", "step", "directions"):
        case = compare.BUILDERS[kind](compare.CaseSpec(kind, dtype, 6, 2000))
        assert all(t.dtype == bc.DTYPES[dtype] for t in case.inputs)
        names = {c.name for c in case.contenders}
        baselines = [c for c in case.contenders if c.role == "baseline"]
        assert baselines and all(c.vs in names for c in baselines), kind
        agreement = bc.check_agreement(case.contenders, bc.DTYPES[dtype], 2000)
        assert set(agreement) == {c.name for c in baselines}
        # TorchJD's UPGrad hands bfloat16 to NumPy, which has none (its row reads "err").
        unsupported = {"TorchJD UPGrad"} if dtype == "bf16" else set()
        assert {name for name, row in agreement.items() if "error" in row} == (
            unsupported & set(agreement)), agreement
        timed = [c for c in case.contenders if c.role in ("ours", "baseline")
                 and c.name not in unsupported]
        before = [bc._result_of(c) for c in timed]
        for t in case.inputs:
            t.mul_(2)
        for c, old in zip(timed, before):
            ratio = bc._as_flat64(bc._result_of(c)).norm() / bc._as_flat64(old).norm()
            expected = 4.0 if kind == "gram" else 2.0
            assert abs(ratio.item() - expected) < 0.05 * expected, (kind, c.name, ratio)
        del case


def test_compare_refuses_to_time_a_baseline_that_disagrees(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A fast wrong answer is no win: run_case checks every pair before timing it."""
    compare = _compare_module()
    bc = _benchmark_module("_bench_common")

    def wrong_gram(spec):  # type: ignore[no-untyped-def]
        case = compare.build_gram(spec)
        (x,) = case.inputs
        case.contenders[1] = bc.Contender("torch.mm(x, x.T)", lambda: x[:, 1:] @ x[:, 1:].T,
                                          role="baseline", vs="ops.gram")
        return case

    monkeypatch.setitem(compare.BUILDERS, "gram", wrong_gram)
    args = argparse.Namespace(max_extra_gib=6.0, budget=1.0, repeats=1, min_sample=0.0,
                              cheap_samples=1)
    with pytest.raises(bc.Disagreement, match="torch.mm"):
        compare.run_case(compare.CaseSpec("gram", "fp32", 4, 50), args, 1e9)


def test_per_sample_embeddings_checks_the_tolerance_it_states() -> None:
    """Its docstring says the two passes agree to 1e-5; check_agreement allowed 1e-3 (a
    contender's agree_tol only loosens the default), so a pass off by 1e-4 was timed."""
    script = _benchmark_module("per_sample_embeddings")
    bc = _benchmark_module("_bench_common")
    calls = script.contenders(30, 4, 5, 6, "sum")
    assert script.checked_difference(calls) <= 1e-5
    exact = calls[1].fn
    calls[1] = bc.Contender(calls[1].name, lambda: exact() * (1 + 1e-4), role="baseline",
                            vs=calls[1].vs)
    with pytest.raises(bc.Disagreement, match="1.00e-04"):
        script.checked_difference(calls)
