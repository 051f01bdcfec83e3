"""The issue-4 evaluation: the interference-aware method against every baseline, with ablations.

    python benchmarks/unlearning_eval.py                       # indoor+street, full+partial, 3 seeds
    python benchmarks/unlearning_eval.py --summarize-only      # rebuild the tables from the JSONs
    python benchmarks/unlearning_eval.py --recipe memorising   # models trained 40 epochs
    python benchmarks/unlearning_eval.py --tune --seeds 0      # the settings grid (training data)
    python benchmarks/unlearning_eval.py --select              # best mean score over benchmarks
    python benchmarks/unlearning_eval.py --select --per-benchmark   # ... over each one alone

Every (benchmark, request, seed) is one run of the experiment runner
(:func:`mtunlearn_ext.experiment.run_experiment`: original and retrained models cached, every
method evaluated on forget / retain / test with the membership attack, UIS and the retrain gap),
with the fixed settings of :mod:`mtunlearn_ext.unlearning.presets`. A finished run's JSON is kept
and reused, so an interrupted evaluation resumes where it stopped. The full and partial requests
of one (benchmark, seed) run in the same worker, so the original model is trained once.

The summary (``summary.md`` and ``summary.json`` in the output folder) gives, per benchmark and
request, the mean and standard deviation over seeds of each method's UIS, retrain gap, forget-set
attack AUC (and its distance to the retrained model's), unlearning wall time and its ratio to the
retraining time, and checks the issue's targets for ``interference_aware``:
UIS <= 0.7x (full) / 0.5x (partial) the best baseline's, the lowest retrain gap of all methods,
|AUC - AUC_retrained| <= 0.05, and wall time <= 15% of retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # and _eval_common (tests load it)

from _eval_common import on_the_verdicts_side  # noqa: E402
from mtunlearn_ext._io import write_text_atomic  # noqa: E402
from mtunlearn_ext.experiment import ExperimentConfig, run_experiment, write_json_atomic  # noqa: E402
from mtunlearn_ext.unlearning.baselines import BASELINES  # noqa: E402
from mtunlearn_ext.unlearning.presets import ABLATIONS, RECIPES, tuned_settings  # noqa: E402
from mtunlearn_ext.unlearning.registry import method_source  # noqa: E402
from mtunlearn_ext.workflow import add_import_option, imported_or_exit  # noqa: E402

METHOD = "interference_aware"
STEP_BASELINES = [m for m in BASELINES if m != "retrain"]
ALL_METHODS = ["retrain", *STEP_BASELINES, METHOD, *ABLATIONS]
UIS_TARGET = {"full": 0.7, "partial": 0.5}
MIA_TOLERANCE = 0.05
GAP_TIE = 0.005
TIME_TARGET = 0.15


def _config(benchmark: str, request: str, seed: int, args: argparse.Namespace,
            output: Path) -> ExperimentConfig:
    methods = list(args.methods)
    return ExperimentConfig(
        benchmark=benchmark, size=args.size, request=request, forget_fraction=args.forget_fraction,
        target_tasks=[args.partial_task] if request == "partial" else None, methods=methods,
        method_configs=tuned_settings(request, methods, args.recipe), seed=seed, output=str(output),
        cache_dir=args.cache_dir, train_overrides=dict(args.train), threads=args.threads,
        progress=False)


#: The run settings that fix a run file's reference models (original, retrained) and its
#: scores: a file made with other values is another experiment, never reused or merged into.
_RUN_FIELDS = ("size", "data_root", "forget_fraction", "forget_ids", "target_tasks",
               "train_overrides", "mia_attack", "eval_batch_size", "device")


def _run_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`_RUN_FIELDS` of a run's ``config`` (an ExperimentConfig as a dict)."""
    return {k: config.get(k) for k in _RUN_FIELDS}


def _same_run(path: Path, identity: Mapping[str, Any]) -> bool:
    """Whether the run file at ``path`` was made with the run settings ``identity``."""
    try:
        stored = json.loads(path.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    return _run_identity(stored) == dict(identity)


def _stale_methods(path: Path, methods: Sequence[str],
                   settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The methods of ``methods`` that the run file at ``path`` lacks, or holds with settings
    other than ``settings`` (so a changed preset re-runs only what it changes), or, for a
    method of one's own (``--import``), from another source file than it has now: a plugin
    changes between runs, the library's own methods with its commits (``--refresh``)."""
    if not path.is_file():
        return list(methods)
    try:
        stored = json.loads(path.read_text())
        models, configs = stored["models"], stored["config"]["method_configs"]
    except (json.JSONDecodeError, KeyError):
        return list(methods)
    sources = stored.get("method_sources", {})
    return [m for m in methods
            if m not in models or dict(configs.get(m, {})) != dict(settings.get(m, {}))
            or sources.get(m) != method_source(m)]


def _merge_methods(path: Path, update: Mapping[str, Any], methods: Sequence[str]) -> None:
    """Replace ``methods``' entries (results and settings) of the run file at ``path`` by those
    of ``update``, a run of the same (benchmark, request, seed): its original and retrained
    models are the same cached checkpoints, so every other entry stays valid."""
    stored = json.loads(path.read_text())
    for key in ("benchmark", "request", "recipe"):
        if stored[key] != update[key]:
            raise RuntimeError(f"{path}: cannot merge a run with a different {key}")
    if _run_identity(stored["config"]) != _run_identity(update["config"]):
        raise RuntimeError(f"{path}: cannot merge a run with other run settings "
                           f"({_run_identity(update['config'])})")
    for reference in ("original", "retrained"):  # the models every score was measured against
        if stored["models"][reference].get("sha256") != update["models"][reference].get("sha256"):
            raise RuntimeError(f"{path}: cannot merge a run scored against another {reference} "
                               "model")
    for method in methods:
        stored["models"][method] = update["models"][method]
        stored["config"]["method_configs"][method] = update["config"]["method_configs"].get(
            method, {})
        source = update.get("method_sources", {}).get(method)
        sources = stored.setdefault("method_sources", {})
        if source is None:
            sources.pop(method, None)
        else:
            sources[method] = source
        for phase in (f"unlearn/{method}", f"evaluate/{method}"):
            if phase in update["phases_seconds"]:
                stored["phases_seconds"][phase] = update["phases_seconds"][phase]
    stored["config"]["methods"] = list(dict.fromkeys([*stored["config"]["methods"], *methods]))
    write_json_atomic(path, stored)


def _run_unit(benchmark: str, seed: int, args: argparse.Namespace) -> list[str]:
    """Both requests of one (benchmark, seed), in order (one original model). A run file whose
    methods all ran with the current settings is kept; otherwise only the missing or stale
    methods run, and are merged into it."""
    done = []
    for request in args.requests:
        path = Path(args.output_dir) / "runs" / f"{benchmark}-{request}-seed{seed}.json"
        settings = tuned_settings(request, args.methods, args.recipe)
        identity = _run_identity(dataclasses.asdict(_config(benchmark, request, seed, args, path)))
        # A file made with other run settings (size, recipe overrides, forget fraction, ...)
        # is another experiment: run afresh, never kept or merged into.
        rerun = args.rerun or (path.is_file() and not _same_run(path, identity))
        stale = list(args.methods) if rerun else _stale_methods(path, args.methods, settings)
        # Methods whose code changed since their runs: re-run and merged like stale ones.
        stale += [m for m in args.methods if m in args.refresh and m not in stale]
        if not stale:
            done.append(f"{path} (kept)")
            continue
        start = time.perf_counter()
        if path.is_file() and not rerun:
            partial = path.with_name(path.stem + ".update.json")
            config = _config(benchmark, request, seed, args, partial)
            config.methods = stale
            config.method_configs = {m: settings[m] for m in stale if m in settings}
            _merge_methods(path, run_experiment(config), stale)
            partial.unlink(missing_ok=True)
        else:
            run_experiment(_config(benchmark, request, seed, args, path))
        done.append(f"{path} ({time.perf_counter() - start:.0f}s; ran {', '.join(stale)})")
        print(f"finished {path.name} in {time.perf_counter() - start:.0f}s "
              f"(ran {', '.join(stale)})", flush=True)
    return done


# -- aggregation ---------------------------------------------------------------------------------


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1`` in the denominator) over the seeds; the
    deviation of one seed is undefined (NaN: the table printed "± 0.00", no spread measured as
    none). A missing or non-finite value (a seed on which the method diverged: its gap is inf,
    its UIS and AUC null) makes the mean inf: left out, it would score a broken method better
    on the seeds it survived."""
    if not values:
        return math.nan, math.nan
    if any(v is None or not math.isfinite(v) for v in values):
        return math.inf, math.nan
    finite = [float(v) for v in values if v is not None]
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else math.nan)


def seed_interval(statistic: Callable[[Sequence[int]], float], num_seeds: int,
                  level: float = 0.9) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over resamples of the seeds with replacement.

    ``statistic`` gets the indices of one resample (e.g. the ratio of two methods' mean UIS over
    those seeds, paired by seed). Up to 6 seeds every one of the ``n^n`` resamples is taken
    (exact, no randomness); beyond, 5000 draws of a fixed generator. With a handful of seeds the
    interval is coarse, and it shows only the seed-to-seed spread of a fixed setting, not the
    selection's own noise: it says whether a target is missed or met by more than the seeds
    disagree.
    """
    if num_seeds <= 6:
        resamples: Sequence[Sequence[int]] = list(
            itertools.product(range(num_seeds), repeat=num_seeds))
    else:
        rng = random.Random(0)
        resamples = [[rng.randrange(num_seeds) for _ in range(num_seeds)] for _ in range(5000)]
    values = sorted(v for v in (statistic(r) for r in resamples) if math.isfinite(v))
    if not values:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0

    def quantile(q: float) -> float:
        position = q * (len(values) - 1)
        low = math.floor(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    return quantile(tail), quantile(1.0 - tail)


def _paired_intervals(per_seed: Mapping[str, Sequence[float]], best: str, lowest_gap: str,
                      gaps: Mapping[str, Sequence[float]], mia_distance: Sequence[float]
                      ) -> dict[str, tuple[float, float]]:
    """90% seed-resampling intervals of the target quantities (paired by seed); none (NaN)
    for a quantity with a seed that diverged (an infinite value): the resamples without that
    seed would give a finite interval that hides it."""
    ours, theirs = per_seed[METHOD], per_seed[best]
    n = len(ours)

    def interval(statistic: Callable[[Sequence[int]], float],
                 *inputs: Sequence[float]) -> tuple[float, float]:
        if not all(math.isfinite(v) for values in inputs for v in values):
            return math.nan, math.nan
        return seed_interval(statistic, n)

    def mean(values: Sequence[float], idx: Sequence[int]) -> float:
        return statistics.fmean(values[i] for i in idx)

    def ratio(idx: Sequence[int]) -> float:
        denominator = mean(theirs, idx)
        return mean(ours, idx) / denominator if denominator > 0 else math.nan

    return {
        "uis_ratio": interval(ratio, ours, theirs),
        "gap_difference": interval(
            lambda idx: mean(gaps[METHOD], idx) - mean(gaps[lowest_gap], idx),
            gaps[METHOD], gaps[lowest_gap]),
        "mia_distance": interval(lambda idx: mean(mia_distance, idx), mia_distance),
    }


def _seed_value(value: float | None) -> float:
    """A run file's per-seed score as a number: null is a seed on which the method diverged
    (JSON holds no inf), as bad as :func:`_mean_std` counts it."""
    return math.inf if value is None else float(value)


def uis_ratio(ours: float, best: float) -> float:
    """The method's mean UIS over the best baseline's. A best baseline at UIS 0 leaves no room
    below it: the ratio is inf, or NaN when the method's is 0 as well (UIS is never negative).
    A best baseline whose mean is inf (every baseline diverged on some seed) gives NaN: a
    finite UIS over inf read 0, the best ratio there is, for a comparison with no result."""
    if not math.isfinite(best):
        return math.nan
    if best > 0:
        return ours / best
    return math.nan if ours == 0 else math.inf


def uis_target_met(ours: float, best: float, target: float) -> bool:
    """Whether the method's mean UIS is at most ``target`` times the best baseline's, on the
    unrounded means (``0 <= target * 0`` when both are 0); never met against a best baseline
    that diverged (an inf mean: the ratio is NaN), there being nothing to be below."""
    return uis_ratio(ours, best) <= target if best > 0 else ours <= target * best


def _seed_runs(runs_dir: Path, benchmark: str, request: str) -> list[Path]:
    """The run files of (``benchmark``, ``request``), one per seed, in seed order: only
    ``<benchmark>-<request>-seed<N>.json``. The glob ``seed*.json`` also took a merge's leftover
    ``seed<N>.update.json`` (left when a merge is refused or interrupted), which averaged seed N
    in twice, and put seed 10 before seed 7. Another name (``seed07.json``: a second file of
    seed 7) or a file whose recorded seed is not its name's is left out and named."""
    name = re.compile(rf"{re.escape(benchmark)}-{re.escape(request)}-seed(0|[1-9][0-9]*)\.json")
    numbered = []
    for path in runs_dir.glob(f"{benchmark}-{request}-seed*.json"):
        match = name.fullmatch(path.name)
        if match is None:
            print(f"left out of the summary: {path} (not named <benchmark>-<request>-seed<N>"
                  ".json)", file=sys.stderr)
            continue
        numbered.append((int(match.group(1)), path))
    runs: list[Path] = []
    for seed, path in sorted(numbered):
        try:
            recorded = json.loads(path.read_text())["config"]["seed"]
        except (OSError, json.JSONDecodeError, KeyError):
            recorded = None
        if recorded != seed:
            print(f"left out of the summary: {path} (it records seed {recorded})",
                  file=sys.stderr)
            continue
        runs.append(path)
    return runs


def summarize(output_dir: Path, benchmarks: Sequence[str], requests: Sequence[str],
              methods: Sequence[str], recipe: str = "default",
              run_settings: Callable[[str, str], Mapping[str, Any]] | None = None
              ) -> dict[str, Any]:
    """Mean/std over the seeds found on disk, per benchmark, request and method, and the
    issue's targets checked for the interference-aware method. A run file that lacks a method,
    holds one with settings other than ``recipe``'s presets, or (with ``run_settings``:
    (benchmark, request) -> :func:`_run_identity` expected) was made with other run settings,
    is left out (and named)."""
    summary: dict[str, Any] = {}
    for benchmark in benchmarks:
        for request in requests:
            runs = _seed_runs(output_dir / "runs", benchmark, request)
            settings = tuned_settings(request, methods, recipe)
            if run_settings is not None:
                expected = run_settings(benchmark, request)
                for path in [p for p in runs if not _same_run(p, expected)]:
                    print(f"left out of the summary: {path} (made with other run settings "
                          f"than {dict(expected)})", file=sys.stderr)
                    runs.remove(path)
            stale = {p: _stale_methods(p, methods, settings) for p in runs}
            for path, names in stale.items():
                if names:
                    print(f"left out of the summary: {path} (missing or other settings: "
                          f"{', '.join(names)})", file=sys.stderr)
            results = [json.loads(p.read_text()) for p in runs if not stale[p]]
            if not results:
                continue
            seeds = [r["config"]["seed"] for r in results]
            rows: dict[str, dict[str, Any]] = {}
            for label in ["original", *methods]:
                if label == "retrain":
                    continue
                def values(key: str, label: str = label) -> list[float]:
                    return [r["models"][label].get(key) for r in results]
                retrain_time = [r["models"]["retrained"]["wall_time_s"] for r in results]
                mia = values("mia_auc")
                gold_mia = [r["models"]["retrained"]["mia_auc"] for r in results]
                row = {
                    "uis": _mean_std(values("uis")),
                    "retrain_gap": _mean_std(values("retrain_gap")),
                    "mia_auc": _mean_std(mia),
                    "mia_distance": _mean_std([None if a is None or b is None else abs(a - b)
                                               for a, b in zip(mia, gold_mia)]),
                    "wall_time_s": _mean_std(values("wall_time_s")),
                    "time_ratio": _mean_std([w / t if w is not None and t else math.nan
                                             for w, t in zip(values("wall_time_s"),
                                                             retrain_time)]),
                }
                if label == "original":
                    # The untouched model, scored like an unlearned one (UIS against itself).
                    row["uis"] = _mean_std([_original_uis(r) for r in results])
                    row["retrain_gap"] = _mean_std([_original_gap(r) for r in results])
                    row["wall_time_s"] = row["time_ratio"] = (math.nan, math.nan)
                rows[label] = row
            rows["retrained"] = {
                "uis": _mean_std([r["models"]["retrained"].get("uis") for r in results]),
                "retrain_gap": (0.0, 0.0),
                "mia_auc": _mean_std([r["models"]["retrained"]["mia_auc"] for r in results]),
                "mia_distance": (0.0, 0.0),
                "wall_time_s": _mean_std([r["models"]["retrained"]["wall_time_s"]
                                          for r in results]),
                "time_ratio": (1.0, 0.0),
            }
            baselines = [m for m in methods if m in STEP_BASELINES]
            checks: dict[str, Any] = {}
            if METHOD in rows and baselines:
                best = min(baselines, key=lambda m: rows[m]["uis"][0])
                ours_uis, best_uis = rows[METHOD]["uis"][0], rows[best]["uis"][0]
                ratio = uis_ratio(ours_uis, best_uis)
                others = [m for m in methods if m not in (METHOD, "retrain")]
                lowest_gap = min(others, key=lambda m: rows[m]["retrain_gap"][0])
                # The same comparison against the baselines alone: an ablation can be the
                # method's own configuration (no task projection in full requests).
                lowest_baseline_gap = min(baselines, key=lambda m: rows[m]["retrain_gap"][0])

                def per_seed(key: str) -> dict[str, list[float]]:
                    return {m: [_seed_value(r["models"][m].get(key)) for r in results]
                            for m in (METHOD, best, lowest_gap)}

                ours_mia = per_seed("mia_auc")[METHOD]
                intervals = _paired_intervals(
                    per_seed("uis"), best, lowest_gap, per_seed("retrain_gap"),
                    [abs(a - _seed_value(r["models"]["retrained"]["mia_auc"]))
                     for a, r in zip(ours_mia, results)])
                checks = {
                    "intervals_90": intervals,
                    "best_baseline_by_uis": best,
                    "uis_ratio": ratio,
                    "uis_target": UIS_TARGET[request],
                    "uis_ok": uis_target_met(ours_uis, best_uis, UIS_TARGET[request]),
                    "lowest_gap_other": lowest_gap,
                    "lowest_gap_other_value": rows[lowest_gap]["retrain_gap"][0],
                    # A tie within the table's rounding is not "the lowest".
                    "gap_ok": (rows[METHOD]["retrain_gap"][0]
                               < rows[lowest_gap]["retrain_gap"][0] - GAP_TIE),
                    "lowest_gap_baseline": lowest_baseline_gap,
                    "gap_below_baselines": (rows[METHOD]["retrain_gap"][0]
                                            < rows[lowest_baseline_gap]["retrain_gap"][0]
                                            - GAP_TIE),
                    "mia_distance": rows[METHOD]["mia_distance"][0],
                    "mia_ok": rows[METHOD]["mia_distance"][0] <= MIA_TOLERANCE,
                    "time_ratio": rows[METHOD]["time_ratio"][0],
                    "time_ok": rows[METHOD]["time_ratio"][0] <= TIME_TARGET,
                }
            summary[f"{benchmark}/{request}"] = {"seeds": seeds, "methods": rows,
                                                 "targets": checks,
                                                 "settings": results[0]["config"]["method_configs"],
                                                 "recipe": results[0]["recipe"]}
    return summary


def _original_uis(result: Mapping[str, Any]) -> float:
    from mtunlearn_ext.metrics import uis

    original = result["models"]["original"]["metrics"]
    return uis(original["test"], original["test"], original["forget"],
               tasks=result["request"]["target_tasks"])


def _original_gap(result: Mapping[str, Any]) -> float:
    from mtunlearn_ext.metrics import retrain_gap

    return retrain_gap(result["models"]["original"]["metrics"],
                       result["models"]["retrained"]["metrics"],
                       result["models"]["original"]["mia_auc"],
                       result["models"]["retrained"]["mia_auc"])


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, NaN/inf as None (JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    if not math.isfinite(mean):
        return "-"
    if not math.isfinite(std):  # one seed
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(summary: Mapping[str, Any]) -> str:
    lines = ["# Unlearning evaluation (mean ± std over seeds)", "",
             "Every cell of a table is over the seeds in its heading, the same for every "
             "method (a run file lacking one is left out for all); std is the sample standard "
             "deviation (n - 1), none with one seed; '-' is a mean that is not finite (a seed "
             "diverged).", "",
             "Intervals after a target are 90% intervals over resamples of the seeds (paired by "
             "seed): how far the seeds' disagreement moves the quantity, not a guarantee.", ""]
    for key, block in summary.items():
        lines += [f"## {key} (seeds {block['seeds']})", "",
                  "| method | UIS ↓ | retrain gap ↓ | MIA AUC | abs(AUC − AUC_retrained) ↓ | "
                  "wall time (s) | time / retrain |",
                  "|---|---|---|---|---|---|---|"]
        order = ["original", "retrained", *[m for m in block["methods"]
                                            if m not in ("original", "retrained")]]
        for label in order:
            row = block["methods"][label]
            name = f"**{label}**" if label == METHOD else label
            lines.append(f"| {name} | {_fmt(row['uis'])} | {_fmt(row['retrain_gap'])} | "
                         f"{_fmt(row['mia_auc'], 3)} | {_fmt(row['mia_distance'], 3)} | "
                         f"{_fmt(row['wall_time_s'], 1)} | {_fmt(row['time_ratio'], 3)} |")
        t = block["targets"]
        if t:
            def mark(ok: bool) -> str:
                return "met" if ok else "NOT met"
            spread = t.get("intervals_90", {})

            def interval(key: str, digits: int) -> str:
                if key not in spread or not all(math.isfinite(v) for v in spread[key]):
                    return ""
                low, high = spread[key]
                return f" [seeds 90%: {low:.{digits}f} to {high:.{digits}f}]"

            # The gap target's verdict: this difference below -GAP_TIE (unrounded).
            gap_difference = (block["methods"][METHOD]["retrain_gap"][0]
                              - t["lowest_gap_other_value"])
            lines += ["", f"Targets for `{METHOD}`:",
                      f"- UIS ratio to the best baseline (`{t['best_baseline_by_uis']}`): "
                      f"{on_the_verdicts_side(t['uis_ratio'], t['uis_target'], 2)}"
                      f"{interval('uis_ratio', 2)} (mean UIS "
                      f"{block['methods'][METHOD]['uis'][0]:.2f} vs "
                      f"{block['methods'][t['best_baseline_by_uis']]['uis'][0]:.2f}; target <= "
                      f"{t['uis_target']}): {mark(t['uis_ok'])}"
                      + (" (no baseline finished on every seed: undefined)"
                         if math.isnan(t["uis_ratio"])
                         and not math.isfinite(
                             block["methods"][t["best_baseline_by_uis"]]["uis"][0])
                         else ""),
                      f"- lowest retrain gap of all methods: "
                      f"{block['methods'][METHOD]['retrain_gap'][0]:.3f} vs "
                      f"{t['lowest_gap_other_value']:.3f} for `{t['lowest_gap_other']}`, the "
                      f"lowest of the others (difference "
                      f"{on_the_verdicts_side(gap_difference, -GAP_TIE, 3)}"
                      f"{interval('gap_difference', 3)}; a tie "
                      f"within {GAP_TIE} does not count): {mark(t['gap_ok'])}; against the "
                      f"baselines alone (lowest `{t['lowest_gap_baseline']}`, "
                      f"{block['methods'][t['lowest_gap_baseline']]['retrain_gap'][0]:.3f}): "
                      f"{'lowest' if t['gap_below_baselines'] else 'not the lowest'}",
                      f"- abs(MIA AUC - retrained's) = "
                      f"{on_the_verdicts_side(t['mia_distance'], MIA_TOLERANCE, 3)}"
                      f"{interval('mia_distance', 3)} (target <= {MIA_TOLERANCE}): "
                      f"{mark(t['mia_ok'])}",
                      f"- wall time / retraining time = "
                      f"{on_the_verdicts_side(t['time_ratio'], TIME_TARGET, 3)} "
                      f"(target <= {TIME_TARGET}): {mark(t['time_ok'])}"]
        lines.append("")
    lines += ["UIS and the retrain gap are x100 (lower is better). 'original' is the untouched "
              "model scored like an unlearned one; 'retrained' is the gold model (its UIS is its "
              "own distance from the original). Wall times are measured on a shared 2-core CPU, "
              "with --jobs workers side by side; the retraining time is that of the training "
              "run that produced the cached gold model, possibly under another load, so the "
              "time ratio is indicative only: benchmarks/unlearning_time.py measures it back "
              "to back in one process.", ""]
    return "\n".join(lines)


# -- the tuning grid ---------------------------------------------------------------------------


def selection_score(metrics: Mapping[str, Any], gold: Mapping[str, Any],
                    original: Mapping[str, Any]) -> float:
    """What hyper-parameters are chosen by (x100, lower is better), from training data only:

    ``0.5 * mean_k |u^F_k - g^F_k| + 0.5 * mean_k |u^R_k - o^R_k|`` over the forget-pair metrics
    (unlearned ``u`` vs retrained ``g``: the forget pairs should look as if never trained on) and
    the retain-pair metrics (unlearned vs original ``o``: what is kept should stay as it was),
    each term normalised as in :func:`~mtunlearn_ext.metrics.retrain_gap`. The plain retrain gap
    on the retain pairs would also reward moving the retained pairs toward the retrained model's
    own training noise (a different run, ~0.07 mIoU apart here), which no unlearning method can
    or should imitate.
    """
    from mtunlearn_ext.metrics import retrain_gap_terms

    forget = list(retrain_gap_terms({"forget": metrics["forget"]},
                                    {"forget": gold["forget"]}).values())
    retain = list(retrain_gap_terms({"retain": metrics["retain"]},
                                    {"retain": original["retain"]}).values())
    return 0.5 * statistics.fmean(forget) + 0.5 * statistics.fmean(retain)


def validation_uis(metrics: Mapping[str, Any], original: Mapping[str, Any],
                   targets: Sequence[str]) -> float:
    """UIS (OrthoGrad's formula, x100) with the *validation* split standing in for the test
    split: ``O_t`` the original model's validation score, ``U_t`` the unlearned model's, ``U_u``
    its forget-pair score, over the request's target tasks. The validation instances are never
    trained on and never scored by the evaluation, so selecting on it leaves the test split
    untouched."""
    from mtunlearn_ext.metrics import uis

    return uis(original["validation"], metrics["validation"], metrics["forget"], tasks=targets)


#: ``--select-score`` choices: record -> the value settings are ranked by (lower is better), or
#: ``None`` when the record lacks what it needs (runs tuned before validation metrics existed).
SELECT_SCORES: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
    # The distance to the retrained model on the forget pairs and the change on retain pairs.
    "proxy": lambda r: float(r["score"]),
    # Half that, half UIS on the validation split: the two measures, the retrain gap
    # and UIS, both approximated without the test split.
    "aligned": lambda r: (0.5 * float(r["score"]) + 0.5 * float(r["validation_uis"])
                          if "validation_uis" in r else None),
}


def _grid(method: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The settings tried for ``method``: the product of its ``--grid`` entry (parameter ->
    values), with ``lr`` from ``--lrs`` unless the entry names its own; an entry that is a list
    of such mappings tries the union of their products (in order, each setting once)."""
    entry = args.grid.get(method, {})
    blocks = entry if isinstance(entry, list) else [entry]
    settings: list[dict[str, Any]] = []
    for block in blocks:
        axes: dict[str, list[Any]] = {"lr": list(args.lrs), **block}
        combos: list[dict[str, Any]] = [{}]
        for name, values in axes.items():
            combos = [{**c, name: v} for c in combos for v in values]
        settings.extend(c for c in combos if c not in settings)
    return settings


def run_tuning(args: argparse.Namespace) -> int:
    """For every step-based method and every setting of its grid (:func:`_grid`), one run
    scored at each step budget of ``--checkpoints`` (a run of ``s`` steps is the first ``s``
    steps of a longer one: constant learning rate, same seeded batches; where it is not, as
    with ``head_refit_steps``, one run per budget: :func:`mtunlearn_ext.tuning.score_budgets`)
    by
    :func:`selection_score` on the forget pairs and a fixed subset of the retain pairs. The test
    split and the attack are never used. The records of every (benchmark, request) go to
    ``tuning/<benchmark>-<request>-seed<seed>.json``; :func:`select_settings` then picks, per
    request, the setting with the lowest score averaged over every tuned benchmark."""
    import torch

    from mtunlearn_ext.experiment import prepare_experiment
    from mtunlearn_ext.metrics import evaluate, retrain_gap
    from mtunlearn_ext.tuning import score_budgets

    # The runs below unlearn and score at the run's thread count; prepare_experiment restores
    # the caller's count when it returns, so it is set for the whole tuning here.
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir) / "tuning"
    for benchmark in args.benchmarks:
        for seed in args.seeds:
            for request in args.requests:
                methods = [m for m in args.methods if m != "retrain" and m not in ABLATIONS]
                config = _config(benchmark, request, seed, args, out / "unused.json")
                config.methods, config.method_configs = [], {}
                prepared = prepare_experiment(config)
                problem = prepared.problem(config)
                generator = torch.Generator().manual_seed(seed)
                rows = torch.randperm(len(prepared.retain), generator=generator)[:args.retain_eval]
                splits = {"forget": prepared.forget, "retain": prepared.retain.subset(rows)}
                if problem.held_out is not None:
                    splits["validation"] = problem.held_out
                targets = list(problem.target_tasks)

                def scores(model: Any) -> dict[str, Any]:
                    return {n: evaluate(model, d, None, 64) for n, d in splits.items()}

                def scored(metrics: dict[str, Any]) -> dict[str, Any]:
                    pairs = {k: metrics[k] for k in ("forget", "retain")}
                    out = {"score": selection_score(metrics, gold, original),
                           "gap": retrain_gap(pairs, {k: gold[k] for k in pairs})}
                    if "validation" in metrics:
                        out["validation_uis"] = validation_uis(metrics, original, targets)
                    return out

                gold, original = scores(prepared.retrained), scores(prepared.original)
                records: list[dict[str, Any]] = [{"method": "original", **scored(original)}]
                base = tuned_settings(request, methods, args.recipe)
                budgets = {m: [c for c in args.checkpoints
                               if m != METHOD or c <= args.method_max_steps] for m in methods}
                for method in methods:
                    for point in _grid(method, args):
                        settings = {**base.get(method, {}), **point}

                        def watch(steps: int, model: Any, seconds: float, method: str = method,
                                  settings: dict[str, Any] = settings) -> None:
                            metrics = scores(model)
                            record = {"method": method, "lr": settings["lr"], "steps": steps,
                                      **scored(metrics), "seconds": seconds,
                                      "settings": {**settings, "steps": steps},
                                      "metrics": metrics}
                            records.append(record)
                            shown = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float))
                                              else f"{k}={v}"
                                              for k, v in record["settings"].items())
                            print(f"{benchmark}/{request} {method:22s} {shown} "
                                  f"score={record['score']:6.3f} gap={record['gap']:6.3f}",
                                  flush=True)

                        score_budgets(method, settings, budgets[method], problem, watch)
                path = out / f"{benchmark}-{request}-seed{seed}.json"
                write_json_atomic(path, _plain({"records": _merge_records(path, records),
                                                "gold": gold, "original": original}))
                print(f"{path}: original score {records[0]['score']:.3f}", flush=True)
    return 0


def _setting_key(record: Mapping[str, Any]) -> str:
    return json.dumps({"method": record["method"], **record.get("settings", {})},
                      sort_keys=True)


def _merge_records(path: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` (the untouched model's first) after the records of an earlier tuning file at
    ``path`` that tried other settings: grids run at different times add up, and a setting
    tried again keeps its newest score."""
    if not path.is_file():
        return records
    newer = {_setting_key(r) for r in records}
    older = json.loads(path.read_text())["records"][1:]
    return [records[0], *[r for r in older if _setting_key(r) not in newer], *records[1:]]


def _score_tables(tuning_dir: Path, request: str, score: str = "proxy",
                  benchmarks: Sequence[str] | None = None
                  ) -> tuple[list[str], dict[str, float], dict[str, dict[str, float]]]:
    """For one request: the tuned benchmarks (file stems; only those of ``benchmarks`` when
    given), the untouched model's score on each, and setting key -> benchmark -> score
    (``score``: a key of :data:`SELECT_SCORES`) for every setting scored on *every* one of
    them."""
    rank = SELECT_SCORES[score]
    names: list[str] = []
    tables: dict[str, dict[str, float]] = {}
    originals: dict[str, float] = {}
    for path in sorted(tuning_dir.glob(f"*-{request}-seed*.json")):
        if benchmarks is not None and path.stem.split("-")[0] not in benchmarks:
            continue
        names.append(path.stem)
        data = json.loads(path.read_text())
        value = rank(data["records"][0])
        if value is not None:
            originals[path.stem] = value
        for record in data["records"][1:]:
            value = rank(record)
            if value is not None:
                tables.setdefault(_setting_key(record), {})[path.stem] = value
    complete = {k: v for k, v in tables.items() if len(v) == len(names)}
    return names, originals, complete


def beats_on_every_run(challenger: Mapping[str, float], incumbent: Mapping[str, float]) -> bool:
    """The incumbent rule: a setting replaces a preset only if it scores lower on *every*
    selection run (benchmark x seed) that both were scored on, and on at least one.

    Adopted in the twelfth session, before any further tuning round: three preset changes
    (rounds 28, 35, 38) had won by mean margins the size of the differences between
    neighbouring settings and moved the test split both ways. With four selection runs the
    chance that a setting no better than the preset wins all four is 1/16, a one-sided sign
    test at about 6%, where a lower mean alone is a coin flip."""
    shared = set(challenger) & set(incumbent)
    return bool(shared) and all(challenger[r] < incumbent[r] for r in shared)


def select_settings(tuning_dir: Path, requests: Sequence[str],
                    score: str = "proxy", benchmarks: Sequence[str] | None = None,
                    incumbents: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, Any]:
    """Per request and method, the setting (step budget included) with the lowest ``score``
    (:data:`SELECT_SCORES`) averaged over the benchmarks whose tuning files are in
    ``tuning_dir``; only settings scored on every one of them compete. Returns ``{request:
    {method: {"settings", "score", "per_benchmark"}}}``, and ``"original"`` scores for
    reference. ``benchmarks`` restricts the files to those benchmarks' (default: every one).

    ``incumbents`` (request -> method -> preset settings) applies :func:`beats_on_every_run`:
    a method whose preset was scored keeps it unless the best setting beats it on every run;
    the kept entry says so (``"kept_preset": True``) and names the ``"challenger"``."""
    selected: dict[str, Any] = {}
    for request in requests:
        names, originals, tables = _score_tables(tuning_dir, request, score, benchmarks)
        if not names:
            continue
        best: dict[str, Any] = {}
        for key, per_file in tables.items():
            settings = json.loads(key)
            method = settings.pop("method")
            mean = statistics.fmean(per_file.values())
            if method not in best or mean < best[method]["score"]:
                best[method] = {"settings": settings, "score": mean, "per_benchmark": per_file}
        for method, preset in ((incumbents or {}).get(request) or {}).items():
            key = _setting_key({"method": method, "settings": preset})
            if method not in best or key not in tables or best[method]["settings"] == preset:
                continue
            kept = tables[key]
            if not beats_on_every_run(best[method]["per_benchmark"], kept):
                best[method] = {"settings": dict(preset), "score": statistics.fmean(kept.values()),
                                "per_benchmark": kept, "kept_preset": True,
                                "challenger": best[method]}
        selected[request] = {"original": originals, "methods": best}
    return selected


def _ratio_line(methods: Mapping[str, Any]) -> str:
    """The interference-aware method's selected score against the best baseline's (ablations
    are not baselines)."""
    baselines = {m: row["score"] for m, row in methods.items()
                 if not m.startswith("interference_aware")}
    ours = methods.get("interference_aware")
    if ours is None or not baselines:
        return "interference_aware vs best baseline: not both selected"
    best = min(baselines, key=baselines.__getitem__)
    if not math.isfinite(baselines[best]):  # ours over inf read 0.00x: no comparison at all
        return (f"interference_aware vs best baseline: no baseline has a finite score "
                f"({best}: {baselines[best]})")
    ratio = ours["score"] / baselines[best] if baselines[best] > 0 else math.inf
    return (f"interference_aware vs best baseline ({best}): {ours['score']:.3f} / "
            f"{baselines[best]:.3f} = {ratio:.2f}x")


def write_grid_csv(tuning_dir: Path, requests: Sequence[str], path: Path) -> int:
    """Every setting tried on every tuned benchmark, one row each (request, method, settings,
    one proxy-score column per benchmark, their mean), sorted by request, method and mean;
    returns the number of rows. Columns are named by benchmark, or by benchmark and seed
    (``indoor-seed1``) when the tuning files span several seeds."""
    import csv
    import io

    rows: list[list[Any]] = []
    columns: list[str] = []
    for request in requests:
        names, _, tables = _score_tables(tuning_dir, request)
        seeds = {n.rsplit("-", 1)[-1] for n in names}
        benchmarks = [n.split("-")[0] + ("" if len(seeds) == 1 else "-" + n.rsplit("-", 1)[-1])
                      for n in names]
        columns = columns or benchmarks
        if benchmarks != columns:
            raise ValueError(f"write_grid_csv: {request} requests were tuned on {benchmarks}, "
                             f"others on {columns}")
        for key, per_file in tables.items():
            settings = json.loads(key)
            method = settings.pop("method")
            scores = [per_file[n] for n in names]
            rows.append([request, method, json.dumps(settings, sort_keys=True),
                         *(f"{v:.4f}" for v in scores), f"{statistics.fmean(scores):.4f}"])
    rows.sort(key=lambda r: (r[0], r[1], float(r[-1])))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["request", "method", "settings", *columns, "mean"])
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", default="indoor,street")
    parser.add_argument("--requests", default="full,partial")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="small")
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--partial-task", default="segmentation",
                        help="target task of the partial requests")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                        help="training recipe of the original and retrained models, and the "
                             "presets table selected for it: 'default' (the benchmarks' own) or "
                             "'memorising' (40 epochs: the original memorises its training set)")
    parser.add_argument("--train", type=json.loads, default={},
                        help="JSON overrides of the recipe's training settings (the presets "
                             "stay those of --recipe)")
    parser.add_argument("--output-dir", default=None,
                        help="default: runs/unlearning_eval (default recipe) or "
                             "runs/unlearning_eval_<recipe>")
    parser.add_argument("--cache-dir", default=".cache/mtunlearn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1,
                        help="(benchmark, seed) units run in parallel processes")
    parser.add_argument("--rerun", action="store_true", help="ignore finished run files")
    parser.add_argument("--refresh", default="",
                        help="methods to re-run (and merge into the kept run files) even if "
                             "their settings did not change, e.g. after a change of their code")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--tune", action="store_true", help="run the lr/step grid instead")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--grid", type=json.loads, default={},
                        help="JSON method -> parameter -> values tried (lr defaults to --lrs)")
    parser.add_argument("--select", action="store_true",
                        help="print the settings with the lowest mean score over the tuned "
                             "benchmarks (from the tuning files) and stop")
    parser.add_argument("--select-score", choices=sorted(SELECT_SCORES), default="proxy",
                        help="with --select: rank by the selection score ('proxy') or by its "
                             "mean with UIS on the validation split ('aligned'; only runs "
                             "tuned with validation metrics compete)")
    parser.add_argument("--incumbent-rule", action="store_true",
                        help="with --select: keep each method's preset (presets.py, --recipe) "
                             "unless a setting scores lower on every selection run (the rule "
                             "of every tuning round from round 39 on; see beats_on_every_run)")
    parser.add_argument("--per-benchmark", action="store_true",
                        help="with --select: pick every method's setting on each benchmark of "
                             "--benchmarks alone (the same rule), and print the method's score "
                             "against the best baseline's on each")
    parser.add_argument("--grid-csv", default=None,
                        help="with --select: also write every tuned setting's scores to this "
                             "CSV file")
    parser.add_argument("--checkpoints", default="10,15,20,25,40,60")
    parser.add_argument("--method-max-steps", type=int, default=25,
                        help="largest step budget tried for the interference-aware method (its "
                             "wall-time target: <= 15%% of retraining)")
    parser.add_argument("--retain-eval", type=int, default=150)
    add_import_option(parser)
    args = parser.parse_args(argv)
    imported_or_exit(parser, args.imports)
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    args.requests = [r for r in args.requests.split(",") if r]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    args.refresh = [m for m in args.refresh.split(",") if m]
    args.lrs = [float(v) for v in args.lrs.split(",")]
    args.train = {**RECIPES[args.recipe], **args.train}
    if args.output_dir is None:
        args.output_dir = ("runs/unlearning_eval" if args.recipe == "default"
                           else f"runs/unlearning_eval_{args.recipe}")
    args.checkpoints = sorted(int(v) for v in args.checkpoints.split(","))
    if args.tune:
        return run_tuning(args)
    if args.select:
        tuning_dir = Path(args.output_dir) / "tuning"
        incumbents = ({r: tuned_settings(r, args.methods, args.recipe) for r in args.requests}
                      if args.incumbent_rule else None)
        selected = select_settings(tuning_dir, args.requests, args.select_score,
                                   incumbents=incumbents)
        if args.grid_csv:
            count = write_grid_csv(tuning_dir, args.requests, Path(args.grid_csv))
            print(f"{args.grid_csv}: {count} settings")
        name = "selected.json" if args.select_score == "proxy" else \
            f"selected-{args.select_score}.json"
        if args.per_benchmark:
            selected = {b: select_settings(tuning_dir, args.requests, args.select_score, [b],
                                           incumbents) for b in args.benchmarks}
            name = name.replace(".json", "-per-benchmark.json")
        write_json_atomic(Path(args.output_dir) / "tuning" / name, _plain(selected))
        for label, picks in (selected.items() if args.per_benchmark else [("", selected)]):
            for request, block in picks.items():
                print(f"{label + '/' if label else ''}{request}: untouched model "
                      f"{block['original']}")
                for method, row in block["methods"].items():
                    print(f"  {method:22s} score={row['score']:.3f} {row['settings']} "
                          f"{ {k: round(v, 3) for k, v in row['per_benchmark'].items()} }")
                    if row.get("kept_preset"):
                        challenger = row["challenger"]
                        print(f"  {'':22s} preset kept: the best other setting "
                              f"({challenger['score']:.3f}, {challenger['settings']}) is not "
                              f"lower on every run "
                              f"{ {k: round(v, 3) for k, v in challenger['per_benchmark'].items()} }")
                print("  " + _ratio_line(block["methods"]))
        return 0
    output_dir = Path(args.output_dir)
    if not args.summarize_only:
        units = [(b, s) for s in args.seeds for b in args.benchmarks]
        start = time.perf_counter()
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                futures = [pool.submit(_run_unit, b, s, args) for b, s in units]
                for future in futures:
                    for line in future.result():
                        print(line, flush=True)
        else:
            for b, s in units:
                for line in _run_unit(b, s, args):
                    print(line, flush=True)
        print(f"all runs done in {time.perf_counter() - start:.0f}s")
    summary = summarize(output_dir, args.benchmarks, args.requests, args.methods, args.recipe,
                        run_settings=lambda benchmark, request: _run_identity(dataclasses.asdict(
                            _config(benchmark, request, 0, args, output_dir))))
    write_json_atomic(output_dir / "summary.json", _plain(summary))
    markdown = to_markdown(summary)
    write_text_atomic(output_dir / "summary.md", markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
