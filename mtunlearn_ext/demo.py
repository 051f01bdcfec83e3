"""The unlearning demo: ``python -m mtunlearn_ext.demo`` (``./run.sh``).

On the default benchmark (``indoor``, ``small``: rendered rooms with segmentation, depth and
surface normals) and training recipe (``memorising``: 40 epochs, after which the original model
memorises its training instances) it trains the original model, retrains the gold model without
the forget pairs,
runs the interference-aware method and the strongest baselines for one full-task and one
partial-task request (through the experiment runner, :mod:`mtunlearn_ext.experiment`, whose
checkpoint cache makes a second run fast), prints the comparison tables and writes a report:
Markdown with PNG plots of the per-task metrics against the retrained model, the task-gradient
cosine (interference) matrices before and after the projections, and sample predictions.

``python -m mtunlearn_ext.demo --showcase`` runs the compiled-ops showcase instead
(:mod:`mtunlearn_ext.showcase`; its options follow ``--showcase``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (``--help`` imports nothing heavy)
    from mtunlearn_ext.experiment import ReferenceModel
    from mtunlearn_ext.unlearning import Unlearner
    from mtunlearn_ext.unlearning.presets import Recipe

__all__ = ["DEMO_BASELINES", "DEMO_BENCHMARKS", "DEMO_RECIPES", "check_args", "main"]

#: The baselines the demo runs beside the method: on the memorising recipe's evaluation
#: (benchmarks/UNLEARNING_RESULTS.md, seeds 0-6) the three with the lowest UIS on both full
#: requests (OrthoGrad, the method's nearest relative, then NegGrad+ and PCGrad); on the partial
#: requests the best baseline is OrthoGrad (indoor) or NegGrad+ (street).
DEMO_BASELINES: tuple[str, ...] = ("neggrad_plus", "orthograd", "pcgrad")
#: The benchmarks the demo runs on: the ones the library makes itself (no data root needed).
DEMO_BENCHMARKS: tuple[str, ...] = ("indoor", "street", "digits")
#: Training recipes (:data:`mtunlearn_ext.unlearning.presets.RECIPES`), the demo's default first.
DEMO_RECIPES: tuple[Recipe, ...] = ("memorising", "default")
#: Training epochs of each recipe per benchmark (every size), for ``--help``: the ``default``
#: recipe is the benchmark's own (``mtunlearn_ext.data.registry``), ``memorising`` sets 40
#: epochs everywhere (``mtunlearn_ext.unlearning.presets.RECIPES``). Written out so that
#: ``--help`` imports nothing heavy; a test checks them against those sources.
RECIPE_EPOCHS: dict[str, dict[str, int]] = {
    "memorising": {"indoor": 40, "street": 40, "digits": 40},
    "default": {"indoor": 10, "street": 10, "digits": 30},
}
METHOD = "interference_aware"
_COLORS = {"original": "#7f7f7f", "retrained": "#2ca02c", METHOD: "#d62728"}
#: The baselines' colours, in order: matplotlib's default cycle without the colours reserved
#: above (its 3rd and 4th are retrained's green and the method's red, which a baseline drawn
#: with the default cycle took).
_BASELINE_COLORS = tuple(c for c in ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                     "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
                         if c not in _COLORS.values())


def _epochs_text(recipe: str) -> str:
    """``recipe``'s epochs in words: "40 epochs", or "10 epochs on indoor and street, 30 on
    digits" when the benchmarks differ."""
    by_epochs: dict[int, list[str]] = {}
    for benchmark in DEMO_BENCHMARKS:
        by_epochs.setdefault(RECIPE_EPOCHS[recipe][benchmark], []).append(benchmark)
    if len(by_epochs) == 1:
        return f"{next(iter(by_epochs))} epochs"
    parts = [f"{epochs}{' epochs' if i == 0 else ''} on {' and '.join(names)}"
             for i, (epochs, names) in enumerate(by_epochs.items())]
    return ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtunlearn_ext.demo",
        description="Multi-task unlearning demo: original vs retrained vs the interference-aware "
                    "method and baselines, full- and partial-task requests, with a report.")
    parser.add_argument("--showcase", action="store_true",
                        help="run the compiled-ops showcase instead (remaining options go to it)")
    parser.add_argument("--benchmark", default="indoor", choices=list(DEMO_BENCHMARKS),
                        help="a benchmark the library generates (the real data sets need "
                             "`mtunlearn train --data-root`)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forget-fraction", type=float, default=0.1)
    parser.add_argument("--partial-task", default=None,
                        help="target task of the partial request (default: the first task)")
    parser.add_argument("--baselines", default=",".join(DEMO_BASELINES),
                        help="comma-separated baselines to compare with")
    parser.add_argument("--recipe", default=DEMO_RECIPES[0], choices=list(DEMO_RECIPES),
                        help="training recipe of the original and retrained models, and the "
                             "method settings selected for it: 'memorising' ("
                             f"{_epochs_text('memorising')}: the original model memorises its "
                             "training instances, the case unlearning is for) or 'default' (each "
                             f"benchmark's own recipe, {_epochs_text('default')}: faster, but the "
                             "model memorises less; on indoor a forget-set attack AUC of 0.50 "
                             "before any unlearning, against about 0.88 with 'memorising')")
    parser.add_argument("--train", default="{}",
                        help='JSON overrides on top of the recipe, e.g. {"epochs": 5} (the '
                             'method settings stay those of --recipe)')
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--cache-dir", default=".cache/mtunlearn")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (1 is fastest for this model on a small "
                             "shared CPU)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (trainings and the two requests run in parallel)")
    # --no-progress, as benchmarks/compare.py's: the bar is all it hides (the log lines and
    # tables on stdout stay), where the command line's --quiet would promise a silent run.
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar over the demo's six stages on stderr "
                             "(--no-progress: none; the log lines on stdout stay)")
    from mtunlearn_ext.workflow import add_import_option

    add_import_option(parser)  # a method of one's own, for --baselines
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (``python -m mtunlearn_ext.demo``; ``argv``: its arguments, default
    ``sys.argv[1:]``); returns the exit code."""
    # The demo's wall time counts from here: the argument checks load (on a first run,
    # generate) every benchmark the requests use, which is part of what a run costs.
    start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--showcase" in argv:
        from mtunlearn_ext.showcase import main as showcase

        return showcase([a for a in argv if a != "--showcase"])
    parser = build_parser()
    args = parser.parse_args(argv)
    from mtunlearn_ext.workflow import imported_or_exit

    imported_or_exit(parser, args.imports)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))  # exit 2, one line, before any work
    return run_demo(args, start)


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the option (``FileNotFoundError`` for a real data set's
    missing root) for everything that would otherwise fail inside a worker process, with a
    traceback, after minutes of training: counts, the JSON recipe overrides, the methods and
    settings of both requests, and the partial request's task."""
    from mtunlearn_ext.experiment import check_experiment

    for name in ("jobs", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    try:
        overrides = json.loads(args.train)
    except json.JSONDecodeError as error:
        raise ValueError(f"--train: expected a JSON object, got {args.train!r}; {error}") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"--train: expected a JSON object, got {args.train!r}")
    for cls in _plugin_methods(_methods(args)):
        # The workers are spawned processes: they import a method's module again, and find its
        # class there only if the module defines it at its top level when imported.
        if cls.__module__ != "__main__":
            continue
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file is None:
            raise ValueError(f"--baselines: method {cls.name!r} is defined in an interactive "
                             "session, which the demo's worker processes cannot import; "
                             "define it at the top level of a module file and import that "
                             "(or pass --import FILE.py)")
        if not _defined_at_top_level(main_file, cls):
            raise ValueError(f"--baselines: method {cls.name!r} is not defined at the top level "
                             f"of {main_file} (under `if __name__ == '__main__':`, or in a "
                             "function), so the demo's worker processes, which import that "
                             "file again, do not see it; define the class at the top level")
    flags = {"methods": "--baselines", "`seed`": "--seed", "forget_fraction": "--forget-fraction",
             "--target-tasks": "--partial-task", "--train": ""}
    for config in _configs(args).values():
        try:
            check_experiment(config)
        except ValueError as error:
            flag = next((f for key, f in flags.items() if key in str(error)), "arguments")
            message = str(error).replace("--target-tasks: ", "")
            raise ValueError(f"{flag}: {message}" if flag else message) from error


def _defined_at_top_level(file: str, cls: type) -> bool:
    """Whether the script ``file`` defines ``cls`` at its top level (a statement of the module
    itself, not inside ``if __name__ == "__main__":`` or a function)."""
    import ast

    try:
        tree = ast.parse(Path(file).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return True  # not readable here: left to the worker
    return "." not in cls.__qualname__ and any(
        isinstance(node, ast.ClassDef) and node.name == cls.__name__ for node in tree.body)


def _plugin_specs(methods: Sequence[str]) -> list[tuple[str, str | None, str]]:
    """``(module, source file, qualified name)`` of each method of ``methods`` that is not the
    library's own, for the workers (:func:`_register_plugins`): plain strings, because a class
    pickled by reference is unpickled before a worker's initializer runs, and a module that
    ``--import`` loaded from a file outside ``sys.path`` cannot be found by name there."""
    return [(cls.__module__, getattr(sys.modules.get(cls.__module__), "__file__", None),
             cls.__qualname__) for cls in _plugin_methods(methods)]


def _register_plugins(specs: Sequence[tuple[str, str | None, str]]) -> None:
    """In a worker: import each plugin's module (by name, else from its file; the parent's
    script is this process's ``__mp_main__``) and register its method, as the parent has it
    (also where the module registers it only under its main guard). A method that cannot be
    found is left out: the job then fails with "unknown methods", naming it."""
    import importlib

    from mtunlearn_ext.unlearning import register_unlearner
    from mtunlearn_ext.workflow import import_plugins

    for module_name, file, qualname in specs:
        try:
            if module_name == "__main__":
                module = sys.modules.get("__mp_main__", sys.modules["__main__"])
            else:
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    if file is None:
                        raise
                    import_plugins([file])
                    module = sys.modules[Path(file).stem]
            found: Any = module
            for part in qualname.split("."):
                found = getattr(found, part)
            register_unlearner(found)
        except Exception:  # noqa: BLE001  (an initializer's error breaks the whole pool)
            continue


def _plugin_methods(methods: Sequence[str]) -> list[type[Unlearner]]:
    """The classes of ``methods`` that are not the library's own (methods of one's own,
    registered in this process): the workers register them again (:func:`_worker_init`)."""
    from mtunlearn_ext.unlearning import UNLEARNERS
    from mtunlearn_ext.unlearning.registry import method_source

    return [UNLEARNERS[m] for m in methods if method_source(m) is not None]


# -- the demo ------------------------------------------------------------------------------------


#: In a worker process: the queue its jobs' progress goes to (set by :func:`_worker_init`).
_PROGRESS_QUEUE: Any = None


def _worker_init(queue: Any, parent: int,
                 plugins: Sequence[tuple[str, str | None, str]] = ()) -> None:
    """A worker's start: Ctrl-C left to the parent, the progress queue, a watch on the parent,
    the code imported, and ``plugins`` (:func:`_plugin_specs`) registered as in the parent,
    instead of failing as unknown methods after the trainings (a method registered under the
    script's main guard, or by hand)."""
    global _PROGRESS_QUEUE
    import signal

    _register_plugins(plugins)

    # Ctrl-C reaches the whole process group: the parent alone handles it (it stops the
    # workers), so no worker prints a traceback or is interrupted inside a lock.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PROGRESS_QUEUE = queue

    # A parent killed outright (SIGKILL, an OOM kill) cannot stop its workers, which waited
    # for their next job for ever: each leaves once its parent (``parent``, the pid passed:
    # one killed while this worker started is already gone from os.getppid()) is gone.
    def leave_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=leave_with_parent, daemon=True, name="demo-parent-watch").start()
    # The code the jobs run, imported now, and its version read now (records.code_version,
    # once per process): a commit made during the run is not in the records it writes.
    import importlib

    from mtunlearn_ext.records import code_version

    for module in ("experiment", "report", "unlearning.interference"):
        importlib.import_module(f"mtunlearn_ext.{module}")
    code_version()


@contextmanager
def _reporting(job: str) -> Iterator[None]:
    """Send the fractions of ``job`` done (:mod:`mtunlearn_ext._progress`) to the parent's stage
    bar: at most one message per 1% and per quarter second (a training step is milliseconds)."""
    from mtunlearn_ext._progress import reporting_to

    queue = _PROGRESS_QUEUE
    if queue is None:
        yield
        return
    sent = {"fraction": 0.0, "time": 0.0}

    def send(fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or (fraction - sent["fraction"] >= 0.01
                               and now - sent["time"] >= 0.25):
            sent.update(fraction=fraction, time=now)
            queue.put((job, fraction))

    with reporting_to(send):
        yield


def _stop_workers(pool: Any) -> None:
    """Cancel ``pool``'s waiting jobs and end its workers now."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown drops them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def _train_job(config: Any, which: ReferenceModel, job: str) -> dict[str, Any]:
    """Worker: train (or load from the cache) one reference model of ``config``; ``job``: its
    name on the stage bar."""
    from mtunlearn_ext.experiment import train_reference_model

    with _reporting(job):
        return train_reference_model(config, which)  # at config.threads


def _request_job(config: Any, keep_model: bool, job: str
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Worker: one request end to end (every method unlearned and evaluated), its interference
    matrices, and (``keep_model``) the interference-aware model's weights for the sample plot;
    ``job``: its name on the stage bar."""
    from mtunlearn_ext._progress import within
    from mtunlearn_ext.experiment import experiment_threads, prepare_experiment, run_experiment
    from mtunlearn_ext.report import interference_to_json
    from mtunlearn_ext.unlearning.interference import interference_matrix
    from mtunlearn_ext.unlearning.interference_aware import InterferenceAwareConfig

    # Every step at the run's thread count (prepare_experiment restores the count on return,
    # and the unlearned weights depend on it).
    kept: dict[str, dict[str, Any]] = {}

    def keep(method: str, model: Any) -> None:
        # The weights the request evaluated, for the sample plot (running the method again
        # for them took a sixth of a cached demo).
        if keep_model and method == METHOD:
            kept["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    with experiment_threads(config.threads), _reporting(job):
        with within(0.0, 0.8):
            results = run_experiment(config, on_unlearned=keep)
        prepared = prepare_experiment(config)  # the cached models: loads only
        problem = prepared.problem(config)
        settings = InterferenceAwareConfig(**config.method_configs[METHOD])
        with within(0.8, 1.0):
            matrix = interference_to_json(interference_matrix(problem, settings), settings)
    return results, matrix, kept.get("state")


def _baselines(args: argparse.Namespace) -> list[str]:
    return [m for m in args.baselines.split(",") if m]


def _methods(args: argparse.Namespace) -> list[str]:
    """The methods each request runs: the baselines and the method. Not ``"retrain"``: the
    experiment runner answers it (with no settings) with the gold model it already trained and
    evaluates as ``retrained``, the same checkpoint, so its row repeated ``retrained``'s."""
    return [*_baselines(args), METHOD]


def _caps_without_held_out(settings: dict[str, dict[str, Any]], benchmark: str
                           ) -> dict[str, dict[str, Any]]:
    """``settings`` for ``benchmark``: on one without a validation split (``digits``; the
    generated ``indoor`` and ``street`` have one), forget caps that the presets take from
    held-out instances come from the retain set instead (the report says so)."""
    from mtunlearn_ext.data.registry import GENERATED_BENCHMARKS

    if benchmark in GENERATED_BENCHMARKS:
        return settings
    return {method: ({**values, "cap_reference": "retain"}
                     if values.get("cap_reference") == "held_out" else values)
            for method, values in settings.items()}


def _held_out_note(benchmark: str, recipe: Recipe) -> str | None:
    """The line saying that the method's forget caps come from the retain set, where
    :func:`_caps_without_held_out` changes its settings (None elsewhere)."""
    from mtunlearn_ext.unlearning.presets import tuned_settings

    presets = [tuned_settings(request, [METHOD], recipe) for request in ("full", "partial")]
    if all(_caps_without_held_out(settings, benchmark) == settings for settings in presets):
        return None
    return (f"{benchmark} has no validation split: the method's forget caps come from the "
            f"retain set (cap_reference 'retain'), not from held-out instances as the "
            f"{recipe} recipe's settings were selected with (on indoor and street)")


def _configs(args: argparse.Namespace) -> dict[str, Any]:
    """The full and the partial request's :class:`~mtunlearn_ext.experiment.ExperimentConfig`."""
    from mtunlearn_ext.experiment import ExperimentConfig
    from mtunlearn_ext.unlearning.presets import RECIPES, tuned_settings

    methods = _methods(args)
    out = Path(args.output_dir)
    return {request: ExperimentConfig(
        benchmark=args.benchmark, size=args.size, request=request,
        forget_fraction=args.forget_fraction,
        target_tasks=[args.partial_task] if request == "partial" and args.partial_task else None,
        methods=methods, method_configs=_caps_without_held_out(
            tuned_settings(request, methods, args.recipe), args.benchmark),
        seed=args.seed, output=str(out / f"{request}.json"), cache_dir=args.cache_dir,
        train_overrides={**RECIPES[args.recipe], **json.loads(args.train)}, progress=False,
        threads=args.threads)
        for request in ("full", "partial")}


def run_demo(args: argparse.Namespace, start: float | None = None) -> int:
    """Run the demo for checked ``args``; ``start``: the ``perf_counter`` time its wall time
    counts from (:func:`main` passes its own start, before the argument checks; default
    now)."""
    import warnings

    # Undefined UIS ratios are dropped by design. The filter is the run's own: set for the
    # process, it stayed after demo.main() returned in a caller's process (a notebook, a
    # test), silencing every RuntimeWarning there, torch's and numpy's included.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        return _run_demo(args, start)


def _stage_bar(progress: bool) -> Any:
    """The bar over the demo's six stages (three trainings, two requests, the report), on
    stderr; ``progress`` False: a disabled bar, which draws nothing (``tqdm.write`` still
    prints the log lines). The count is fractional while stages run (``2.4/6``)."""
    from tqdm.auto import tqdm

    return tqdm(total=6, desc="demo", unit="stage", disable=not progress,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} stages "
                           "[{elapsed}<{remaining}{postfix}]")


class _StageProgress:
    """The stage bar's count: each finished stage whole, each running one by the fraction
    its worker last reported (the first minutes of a run were four trainings at 0/6)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.finished: set[str] = set()
        self.running: dict[str, float] = {}

    def reported(self, messages: Any) -> None:
        """Take every (stage, fraction) message waiting in the queue ``messages``."""
        from queue import Empty

        while True:
            try:
                stage, fraction = messages.get_nowait()
            except (Empty, OSError, ValueError):
                break
            if stage not in self.finished:
                self.running[stage] = max(self.running.get(stage, 0.0), float(fraction))
        self._show()

    def finish(self, stage: str) -> None:
        self.finished.add(stage)
        self.running.pop(stage, None)
        self._show()

    def _show(self) -> None:
        # A running stage counts at most 0.99: the whole unit comes with its result.
        count = round(len(self.finished) + sum(min(f, 0.99) for f in self.running.values()), 1)
        if count != self.bar.n:  # (a redraw per poll filled a logged stderr)
            self.bar.n = int(count) if count == int(count) else count
            self.bar.refresh()


def _run_demo(args: argparse.Namespace, start: float | None) -> int:
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor

    from tqdm.auto import tqdm

    from mtunlearn_ext._io import interrupts_held, write_text_atomic
    from mtunlearn_ext.experiment import format_table

    start = time.perf_counter() if start is None else start
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    baselines = _baselines(args)
    methods = _methods(args)
    configs = _configs(args)

    def log(message: str) -> None:
        tqdm.write(f"[{time.perf_counter() - start:6.0f} s] {message}")

    # Three trainings (original, and one retrained model per request) and two request runs,
    # scheduled on ``--jobs`` single-threaded workers: on 2 cores the original and the first
    # retraining run side by side, then each request starts as soon as its models exist.
    stages = _stage_bar(args.progress)
    progress = _StageProgress(stages)
    results: dict[str, dict[str, Any]] = {}
    matrices: dict[str, dict[str, Any]] = {}
    unlearned_state = None
    context = multiprocessing.get_context("spawn")  # no forked OpenMP/torch state
    # The workers' progress messages (none without a bar to show them).
    queue = context.Queue() if args.progress else None
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context,
                             initializer=_worker_init,
                             initargs=(queue, os.getpid(), _plugin_specs(methods))) as pool:
        try:
            trainings: dict[str, Future[Any]] = {
                "original": pool.submit(_train_job, configs["full"], "original", "original"),
                "retrained (full)": pool.submit(_train_job, configs["full"], "retrained",
                                                "retrained (full)"),
                "retrained (partial)": pool.submit(_train_job, configs["partial"], "retrained",
                                                   "retrained (partial)")}
            note = _held_out_note(args.benchmark, args.recipe)
            if note is not None:
                log(f"note: {note}")
            log("training the original model and the two retrained (gold) models "
                f"({args.jobs} worker{'s' if args.jobs > 1 else ''}; cached models are reused)")
            runs: dict[str, Future[Any]] = {}
            pending = dict(trainings)
            needs = {"full": ("original", "retrained (full)"),
                     "partial": ("original", "retrained (partial)")}
            while pending or len(runs) < 2:
                for name, future in list(pending.items()):
                    if future.done():
                        record = future.result()
                        how = "from the cache" if record.get("cached") else "trained"
                        log(f"{name} model {how} ({record.get('train_seconds') or 0:.0f} s of "
                            "training)")
                        progress.finish(name)
                        del pending[name]
                for request, names in needs.items():
                    if request not in runs and all(n not in pending for n in names):
                        log(f"{request}-task request: unlearning with {', '.join(methods)} "
                            "and evaluating every model")
                        runs[request] = pool.submit(_request_job, configs[request],
                                                    request == "partial", request)
                time.sleep(0.2)
                if queue is not None:
                    progress.reported(queue)
            for request in ("full", "partial"):
                # Polled, not a blocking result(): the bar moves while the request runs.
                while not runs[request].done():
                    if queue is not None:
                        progress.reported(queue)
                    time.sleep(0.2)
                results[request], matrices[request], state = runs[request].result()
                unlearned_state = state if state is not None else unlearned_state
                log(f"{request}-task request done "
                    f"({results[request]['request']['target_tasks']})")
                tqdm.write(format_table(results[request]))
                tqdm.write(_attack_note(results[request]))
                progress.finish(request)
        except BaseException:
            # An interrupt or an error: the running jobs are stopped, not waited for (the
            # pool's exit waited for them: a demo sent SIGINT still waited 11 minutes later,
            # its workers interrupted mid-job).
            _stop_workers(pool)
            raise

    stages.set_postfix_str("report")
    # The plots are drawn into a staging folder and moved beside the report only once every
    # one of them and the report exist, the report last: an interrupt or error before then
    # leaves the previous demo's report and plots as they were (new plots never sit beside an
    # old report), and the staging folder is removed.
    staging = Path(tempfile.mkdtemp(prefix=".demo-staging-", dir=out))
    try:
        report_text = _draw_report(args, staging, configs, results, matrices,
                                   unlearned_state, baselines, start, log)
        with interrupts_held():
            for plot in sorted(staging.iterdir()):
                os.replace(plot, out / plot.name)
            write_text_atomic(out / "report.md", report_text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress.finish("report")
    stages.close()
    total = time.perf_counter() - start
    print(f"\nreport: {out / 'report.md'} (plots beside it); demo wall time {total:.0f} s "
          "(from the start, the argument checks included)")
    return 0


def _draw_report(args: argparse.Namespace, staging: Path,
                 configs: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]],
                 matrices: Mapping[str, Any], unlearned_state: Any, baselines: Sequence[str],
                 start: float, log: Callable[[str], None]) -> str:
    """The report's plots, drawn into ``staging`` under the names the report links to (the
    files of the output folder once moved), and the report's text."""
    from mtunlearn_ext.experiment import experiment_threads, prepare_experiment
    from mtunlearn_ext._io import write_text_atomic
    from mtunlearn_ext.report import plot_interference

    # The report's models, samples and UIS floors at the workers' thread count (the floors'
    # metrics depend on it).
    with experiment_threads(args.threads):
        prepared = prepare_experiment(configs["partial"])  # cached: loads only
        unlearned = prepared.factory()
        assert unlearned_state is not None  # the partial request's job (keep_model) returned it
        unlearned.load_state_dict(unlearned_state)
        models = {"original": prepared.original, "retrained": prepared.retrained, METHOD: unlearned}
        figures = {}
        for request in ("full", "partial"):
            figures[f"metrics_{request}"] = _plot_metrics(results[request], baselines,
                                                          staging / f"metrics_{request}.png")
            figures[f"interference_{request}"] = plot_interference(
                matrices[request], f"{request}-task request: cosines of shared-backbone gradients",
                staging / f"interference_{request}.png", overwrite=True)
            # The plotted cosines as numbers too (they existed only as the PNG's pixels).
            write_text_atomic(staging / f"interference_{request}.json",
                              json.dumps(matrices[request], indent=1) + "\n")
        figures["samples"] = _plot_samples(models, prepared.forget, prepared.benchmark,
                                           prepared.target_tasks, staging / "samples.png")
        floors = _uis_floors(prepared, results, args)
        for request, floor in floors.items():
            log(f"UIS floor of the {request}-task request (the original model untouched, forget "
                f"sets of {floor.forget_size} unseen instances): {floor.mean:.2f}")
    return _report(results, matrices, figures, baselines, time.perf_counter() - start, args,
                   floors)


#: Unseen scenes and random forget sets behind the demo's UIS floors (a few seconds on
#: ``small``).
FLOOR_POOL, FLOOR_DRAWS = 400, 100


def _uis_floors(prepared: Any, results: Mapping[str, Mapping[str, Any]],
                args: argparse.Namespace) -> dict[str, Any]:
    """Per request, :func:`~mtunlearn_ext.metrics.uis_floor` of the original model at the
    request's forget-set size, over the request's target tasks, on fresh scenes of the
    benchmark (generated benchmarks only: others have no unseen pool to draw from)."""
    from mtunlearn_ext.data.registry import GENERATED_BENCHMARKS, unseen_instances
    from mtunlearn_ext.metrics import uis_floor

    if args.benchmark not in GENERATED_BENCHMARKS:
        return {}
    pool = unseen_instances(args.benchmark, FLOOR_POOL, seed=args.seed, size=args.size)
    floors = {}
    for request, res in results.items():
        size = res["request"]["num_forget_instances"]
        if size > len(pool):
            continue
        floors[request] = uis_floor(prepared.original, prepared.benchmark.test, pool, size,
                                    tasks=res["request"]["target_tasks"], draws=FLOOR_DRAWS,
                                    seed=args.seed,
                                    original_test=res["models"]["original"]["metrics"]["test"])
    return floors


# -- plots -----------------------------------------------------------------------------------------


def _model_order(results: Mapping[str, Any], baselines: Sequence[str]) -> list[str]:
    return ["original", "retrained", *[b for b in baselines if b in results["models"]], METHOD]


def _series_colors(labels: Sequence[str]) -> dict[str, str]:
    """A colour per model: the fixed ones of original, retrained and the method, and for the
    baselines (in order) :data:`_BASELINE_COLORS`, which skips those (cycling past 7)."""
    baselines = [label for label in labels if label not in _COLORS]
    return {label: _COLORS.get(label) or _BASELINE_COLORS[baselines.index(label)
                                                          % len(_BASELINE_COLORS)]
            for label in labels}


def _attack_note(results: Mapping[str, Any]) -> str:
    """What the MIA AUCs of one request can tell: the attack's own check (member AUC: training
    members against unseen data, where a working attack is well above 0.5) and the forget AUC's
    spread under chance (:func:`~mtunlearn_ext.metrics.membership.auc_chance_spread`), against
    which AUC differences between models are read."""
    from mtunlearn_ext.metrics.membership import (ATTACK_AT_CHANCE, attack_at_chance,
                                                  auc_chance_spread)

    attack = results["models"]["original"].get("mia") or {}
    n_f, n_u = attack.get("num_forget") or 0, attack.get("num_non_members_eval") or 0
    note = ("MIA AUC: the membership attack on the forget pairs against unseen test instances "
            "(0.5: they look unseen); member AUC: the same attack on held-back training members, "
            "its check that it tells members from unseen data at all.")
    if n_f and n_u:
        spread = auc_chance_spread(n_f, n_u)
        note += (f" With {n_f} forget and {n_u} unseen instances the forget AUC's spread under "
                 f"chance is {spread:.3f}: AUC differences below it are sampling scatter.")
    weak = [label for label, entry in results["models"].items()
            if attack_at_chance((entry.get("mia") or {}).get("member_auc"))]
    if weak:
        note += (f" The attack is at chance (member AUC <= {ATTACK_AT_CHANCE}) on "
                 f"{', '.join(weak)}: its forget AUC there says nothing about forgetting.")
    return note


def _plot_metrics(results: Mapping[str, Any], baselines: Sequence[str], path: Path) -> str:
    """Per task: the primary metric on forget / retain / test for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtunlearn_ext.experiment import PRIMARY_METRIC, SPLITS
    from mtunlearn_ext.report import save_png

    tasks = results["benchmark"]["tasks"]
    targets = set(results["request"]["target_tasks"])
    labels = _model_order(results, baselines)
    colors = _series_colors(labels)
    # The legend sits beside the last panel: inside one it covered the forget bars (the
    # retrained model's, the reference, wholly on the partial request).
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.2, 3.4),
                             squeeze=False)
    width = 0.8 / len(labels)
    for ax, spec in zip(axes[0], tasks):
        metric = PRIMARY_METRIC[spec["kind"]]
        splits = [s for s in SPLITS if s != "forget" or spec["name"] in targets]
        for i, label in enumerate(labels):
            values = [results["models"][label]["metrics"].get(s, {}).get(spec["name"], {})
                      .get(metric) for s in splits]
            # A missing (null) value draws no bar, not a bar of 0.
            values = [float("nan") if v is None else v for v in values]
            ax.bar([x + (i - (len(labels) - 1) / 2) * width for x in range(len(splits))], values,
                   width, label=label, color=colors[label])
        ax.set_xticks(range(len(splits)), splits)
        ax.set_title(f"{spec['name']} ({metric})" + (" [target]" if spec["name"] in targets
                                                     else ""))
        finite = [results["models"][m]["metrics"].get(s, {}).get(spec["name"], {}).get(metric)
                  for m in labels for s in splits]
        finite = [v for v in finite if v is not None]
        if finite:
            low, high = min(finite), max(finite)
            pad = max(high - low, 1e-3) * 0.6
            ax.set_ylim(max(0.0, low - pad), high + pad)
            if low - pad > 0:  # zoomed in on the differences: say so, bars look taller
                ax.set_ylabel(f"{metric} (axis from {low - pad:.3g}, not 0)", fontsize=7)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{results['request']['type']}-task request: per-task metrics "
                 f"(closer to 'retrained' is better)")
    fig.tight_layout()
    save_png(fig, path, overwrite=True, dpi=110)
    return path.name


def _input_image(x: Any, benchmark: Any) -> Any:
    """One input as an image to show, or ``None``: ``[C, H, W]`` with 1 or 3 channels (the
    benchmark's RGB normalisation undone), or a flat vector of a square length (``digits``'
    8 x 8 pixels)."""
    import math

    if x.dim() == 3 and x.shape[0] in (1, 3):
        mean, std = benchmark.info.get("rgb_normalisation", [0.5, 0.25])
        image = (x * std + mean).clamp(0, 1).permute(1, 2, 0)
        return image[..., 0].numpy() if x.shape[0] == 1 else image.numpy()
    side = math.isqrt(x.numel()) if x.dim() == 1 else 0
    if side and side * side == x.numel():
        return x.reshape(side, side).numpy()
    return None


def _plot_samples(models: Mapping[str, Any], forget: Any, benchmark: Any,
                  target_tasks: Sequence[str], path: Path, count: int = 3) -> str:
    """Forget instances: the input (when it is an image), then per task the ground truth and
    each model's prediction: a map for segmentation and depth, the label for a per-instance
    task (classification, regression)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from mtunlearn_ext.report import save_png

    rows = list(range(min(count, len(forget))))
    batch = forget.batch(torch.tensor(rows))
    outputs = {}
    with torch.no_grad():
        for label, model in models.items():
            model = copy.deepcopy(model).eval().cpu()
            outputs[label] = model(batch["input"])
    inputs = batch["input"]
    images = ([_input_image(inputs[r], benchmark) for r in range(len(rows))]
              if isinstance(inputs, torch.Tensor) else [None] * len(rows))
    shown_inputs = any(image is not None for image in images)
    tasks = [t for t in benchmark.train.tasks if t.kind != "normals"]
    dense = [t for t in tasks if t.kind in ("segmentation", "depth")]
    per_instance = [t for t in tasks if t not in dense]
    columns = int(shown_inputs) + len(dense) * (1 + len(models)) + len(per_instance)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.9 * columns, 1.7 * len(rows)),
                             squeeze=False)
    targets_all = benchmark.train.targets
    ids = batch["id"].tolist()
    positions = benchmark.train.positions_of(ids)

    def role(name: str) -> str:
        return "target" if name in target_tasks else "kept"

    for r in range(len(rows)):
        c = 0
        if shown_inputs:
            image = images[r]
            if image is not None:
                axes[r][0].imshow(image, cmap="gray" if image.ndim == 2 else None)
            axes[r][0].set_title(f"id {ids[r]}", fontsize=7)
            c = 1
        for spec in dense:
            truth = targets_all[spec.name][positions[r]]
            panels = [("truth", truth)] + [
                (label, outputs[label][spec.name][r]) for label in models]
            for label, value in panels:
                if spec.kind == "segmentation":
                    shown = value if value.dim() == 2 else value.argmax(dim=0)
                    axes[r][c].imshow(shown.numpy(), cmap="tab20", vmin=0,
                                      vmax=max(spec.num_classes or 1, 1) - 1,
                                      interpolation="nearest")
                else:
                    axes[r][c].imshow(value[0].numpy(), cmap="viridis", vmin=0,
                                      vmax=float(truth.max()))
                if r == 0:
                    axes[r][c].set_title(f"{spec.name} ({role(spec.name)})\n{label}",
                                         fontsize=7)
                c += 1
        for spec in per_instance:
            def text(value: Any) -> str:
                if spec.kind == "classification":
                    return str(int(value.argmax()) if value.dim() else int(value))
                return ", ".join(f"{float(v):.2f}" for v in value.reshape(-1)[:3])

            truth = targets_all[spec.name][positions[r]]
            lines = [f"truth: {text(truth)}"] + [
                f"{label}: {text(outputs[label][spec.name][r])}" for label in models]
            axes[r][c].text(0.02, 0.5, "\n".join(lines), fontsize=7, va="center",
                            family="monospace")
            if r == 0:
                axes[r][c].set_title(f"{spec.name} ({role(spec.name)})", fontsize=7)
            c += 1
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("forget instances of the partial request: predictions of each model (the target "
                 "task's should move toward the retrained model's, the others stay)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, overwrite=True, dpi=110)
    return path.name


# -- the report ----------------------------------------------------------------------------------


def _fixed(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals, ``-`` for a missing (null) one (a method that
    diverged has no attack AUC or UIS; the report must still be written)."""
    return "-" if value is None else f"{value:.{digits}f}"


def _report(results: Mapping[str, Mapping[str, Any]], matrices: Mapping[str, Any],
            figures: Mapping[str, str], baselines: Sequence[str], total: float,
            args: argparse.Namespace, floors: Mapping[str, Any] | None = None) -> str:
    from mtunlearn_ext.experiment import format_table
    from mtunlearn_ext.report import INTERFERENCE_EXPLANATION

    first = results["full"]
    held_out_note = _held_out_note(first["benchmark"]["name"], args.recipe)
    lines = [
        "# Interference-aware multi-task unlearning: demo report", "",
        f"Benchmark `{first['benchmark']['name']}` ({first['benchmark']['size']}: "
        f"{first['benchmark']['num_train']} training / {first['benchmark']['num_test']} test "
        f"instances; tasks {[t['name'] for t in first['benchmark']['tasks']]}), seed {args.seed}, "
        f"training recipe `{args.recipe}`: `{json.dumps(first['recipe'])}`; every method's "
        f"settings are the ones selected for that recipe "
        f"(`mtunlearn_ext.unlearning.presets`)"
        + ("." if held_out_note is None else f"; {held_out_note}."), "",
        "Both requests forget the same share of training instances. The **retrained** model "
        "(trained from scratch without the forget pairs, same recipe and seed) is the gold "
        "standard; an unlearned model should be indistinguishable from it: same metrics on every "
        "split and the same membership-attack AUC on the forget pairs. UIS (OrthoGrad's formula, "
        "x100, over the request's target tasks: the partial request's kept tasks count in the "
        "retrain gap only) and the retrain gap (mean normalised distance to the retrained model "
        "over every metric and the AUC, x100) are lower-is-better.", ""]
    for request in ("full", "partial"):
        res = results[request]
        req = res["request"]
        lines += [f"## {request.capitalize()}-task request", "",
                  f"Forget {req['num_forget_instances']} instances for tasks "
                  f"{req['target_tasks']} ({req['num_forget_pairs']} forget pairs; "
                  f"{req['num_retain_pairs']} retain pairs"
                  + (f", including the forget instances' {req['non_target_tasks']} labels"
                     if req["non_target_tasks"] else "") + ").", "",
                  "| model | UIS ↓ | retrain gap ↓ | MIA AUC (retrained: "
                  f"{_fixed(res['models']['retrained'].get('mia_auc'), 3)}) | "
                  "member AUC | unlearning time (s) |",
                  "|---|---|---|---|---|---|"]
        for label in _model_order(res, baselines):
            entry = res["models"][label]
            uis_value = entry.get("uis")
            gap = entry.get("retrain_gap")
            wall = _fixed(entry.get("wall_time_s"), 1)
            if label == "retrained" and wall != "-":
                wall += " (retraining)"
            name = f"**{label}**" if label == METHOD else label
            lines.append(f"| {name} | {_fixed(uis_value, 2)} | {_fixed(gap, 2)} | "
                         f"{_fixed(entry.get('mia_auc'), 3)} | "
                         f"{_fixed((entry.get('mia') or {}).get('member_auc'), 3)} | {wall} |")
        lines += ["", "-: none (the original model has no unlearning time, the retrained model "
                  "has no gap to itself; a method that diverged has no finite score). The "
                  "retrained model's time is its training run; the methods' times were measured "
                  "while the other request's work ran on the other core."]
        lines += ["", _attack_note(res)]
        floor = (floors or {}).get(request)
        if floor is not None:
            retrained_uis = _fixed(res["models"]["retrained"].get("uis"), 2)
            lines += ["", f"UIS floor: {floor.mean:.2f} (5-95% of draws "
                      f"{floor.quantile(0.05):.2f}-{floor.quantile(0.95):.2f}), the UIS of the "
                      "original model left untouched with random sets of "
                      f"{floor.forget_size} unseen instances as the forget set: what forget "
                      "pairs that look exactly like unseen data score. A UIS below the floor "
                      "is not more forgetting (the forget scores sit nearer the original's test "
                      "scores than unseen data's do); the retrained model's own UIS "
                      f"({retrained_uis}) is the reference. The band is how far one model's "
                      "UIS moves from one forget set to another, not the noise of a difference "
                      "between models scored on the same forget set."]
        lines += ["", "Every metric (primary metric per task; the JSON "
                  f"`{request}.json` holds all of them):", "", "```text",
                  format_table(res), "```", "",
                  f"![per-task metrics]({figures[f'metrics_{request}']})", ""]
        m = matrices[request]
        kept = ", ".join(f"{t}: {_fixed(v, 2)}" for t, v in m["forget_kept"].items())
        lines += [f"![interference]({figures[f'interference_{request}']})", "",
                  f"{INTERFERENCE_EXPLANATION} Share of each forget gradient's norm kept by the "
                  f"projections: {kept}.", ""]
    lines += ["## Sample predictions", "",
              f"![samples]({figures['samples']})", "",
              "Forget instances of the partial request: the target task's prediction should look "
              "like the retrained model's (which never saw these labels), the other tasks' "
              "should stay as they were.", "",
              f"Demo wall time: {total:.0f} s, from the start of the command: the argument "
              "checks (which load, on a first run generate, the benchmarks), the trainings, "
              "both requests and this report (cached checkpoints are reused on a second run).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        # One line, not a traceback: the report is written last, atomically, so an interrupt
        # leaves the previous one (and its plots) as they were.
        print("demo: interrupted; the previous report and plots, if any, are as they were",
              file=sys.stderr)
        raise SystemExit(130) from None
