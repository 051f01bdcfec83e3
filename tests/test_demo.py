"""The main job's demo end to end on the tiny benchmark: both requests, the parallel schedule,
the tables, and a report whose every image exists."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from mtunlearn_ext import _io, demo
from mtunlearn_ext import report as report_module
from mtunlearn_ext.unlearning.baselines.neggrad_plus import NegGradPlus

# Runs our scripts and command line end to end: left out of scripts/test_matrix.sh's
# legs by default (they run in the main suite; the legs check the library on other
# torch and Python versions).
pytestmark = pytest.mark.end_to_end


def test_demo_runs_both_requests_and_writes_the_report(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    # Every file of the report goes through the atomic writers (a reader never sees half a
    # report or plot); record what each wrote.
    written: list[str] = []
    for module, name in ((_io, "write_text_atomic"), (report_module, "save_png")):
        original = getattr(module, name)

        def spy(*args, _original=original, **kwargs):
            path = args[0] if isinstance(args[0], (str, Path)) else args[1]
            written.append(Path(path).name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    # The default recipe (10 epochs): the test's trainings take a quarter of the memorising
    # recipe's time; test_the_recipe_sets_training_and_method_settings covers the choice.
    rc = demo.main(["--size", "tiny", "--recipe", "default", "--baselines", "finetune",
                    "--jobs", "2", "--output-dir", str(out),
                    "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "full-task request done" in text and "partial-task request done" in text
    # The log lines on stdout, the stage bar (on by default) on stderr, run to its end.
    assert "full-task request done" in printed.out and "demo:" not in printed.out
    assert "demo: 100%" in printed.err and "6/6" in printed.err
    # ... moving within stages too (the workers report their steps), never backwards.
    counts = [float(c) for c in re.findall(r"\| (\d+(?:\.\d)?)/6 stages", printed.err)]
    assert any(c != int(c) for c in counts), counts
    assert counts == sorted(counts), counts
    for request in ("full", "partial"):
        results = json.loads((out / f"{request}.json").read_text())
        assert {"original", "retrained", "finetune", demo.METHOD} <= set(results["models"])
        # The gold model once: a "retrain" row was the same checkpoint as "retrained".
        assert "retrain" not in results["models"]
        assert results["request"]["type"] == request
    partial = json.loads((out / "partial.json").read_text())
    assert partial["request"]["target_tasks"] == ["segmentation"]
    report = (out / "report.md").read_text()
    assert "## Full-task request" in report and "## Partial-task request" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"metrics_full.png", "metrics_partial.png", "interference_full.png",
            "interference_partial.png", "samples.png"} <= set(images)
    for image in images:
        assert (out / image).stat().st_size > 1000, image
    # Report audit: the plotted cosines as numbers beside their PNGs, the matrix's labels and
    # a before/after cell for each pair of them.
    for request in ("full", "partial"):
        matrix = json.loads((out / f"interference_{request}.json").read_text())
        size = len(matrix["labels"])
        assert size > 1 and len(matrix["before"]) == len(matrix["after"]) == size
        assert all(len(row) == size for row in matrix["before"] + matrix["after"])
    assert {"report.md", *images, "interference_full.json",
            "interference_partial.json"} <= set(written), sorted(written)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    # Each request's table is followed by its UIS floor.
    floors = re.findall(r"UIS floor: (\d+\.\d+) \(5-95% of draws", report)
    assert len(floors) == 2 and all(float(f) > 0 for f in floors)
    assert "UIS floor of the partial-task request" in text
    # New-user review: the attack's note (its member-AUC check, the forget AUC's spread under
    # chance) follows each console table, not only the report's.
    assert printed.out.count("member AUC: the same attack on held-back training members") == 2
    # Three trainings were scheduled (original, one gold model per request), none skipped.
    assert len(re.findall(r"model (trained|from the cache)", text)) == 3
    # A method that diverged has no attack AUC or UIS, a projection no kept share: the report
    # is still written, with '-' for them.
    results = {r: json.loads((out / f"{r}.json").read_text()) for r in ("full", "partial")}
    broken = results["full"]["models"]["finetune"]
    broken["mia_auc"] = broken["uis"] = broken["retrain_gap"] = None
    matrices = {r: {"forget_kept": {"segmentation": None, "depth": 0.5}}
                for r in ("full", "partial")}
    figures = {f"{kind}_{r}": f"{kind}_{r}.png" for kind in ("metrics", "interference")
               for r in ("full", "partial")} | {"samples": "samples.png"}
    text = demo._report(results, matrices, figures, ["finetune"], 1.0,
                        argparse.Namespace(seed=0, recipe="default"))
    assert "| finetune | - | - | - |" in text
    # Metrics review: the '-' was not explained (the report's legend called it "not measured").
    assert text.count("a method that diverged has no finite score") == 2
    assert "segmentation: -, depth: 0.50" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--jobs", "0"], "--jobs: expected an integer >= 1, got 0"),
    (["--baselines", "nope"], "--baselines: ExperimentConfig: unknown methods ['nope']"),
    (["--seed", "-1"], "--seed: ExperimentConfig: `seed` must be >= 0, got -1"),
    (["--train", "{bad"], "--train: expected a JSON object, got '{bad'"),
    (["--partial-task", "nope"], "--partial-task: unknown tasks ['nope']; 'indoor' has"),
    (["--train", '{"epochs": "x"}'], "--train: TrainConfig: `epochs` must be an integer"),
    (["--train", '{"optimizer": "sgd", "momentum": -1.0}'],
     "--train: TrainConfig: `momentum` must be in [0, 1), got -1.0"),
    (["--train", '{"weight_decay": NaN}'],
     "--train: TrainConfig: `weight_decay` must be a finite number >= 0, got nan"),
    (["--train", '{"task_weights": {"depth": -1}}'],
     "--train: TrainConfig: `task_weights['depth']` must be a finite number >= 0, got -1"),
    (["--train", '{"task_weights": {"dpeth": 2.0}}'],
     "--train: `task_weights` names unknown tasks ['dpeth']; 'indoor' has"),
    (["--benchmark", "nyuv2"], "invalid choice: 'nyuv2'"),
    (["--recipe", "long"], "invalid choice: 'long'"),
])
def test_demo_refuses_bad_arguments_before_any_work(tmp_path, capsys, argv, message):
    """Each of these used to fail inside a worker process with a traceback (after the
    trainings, for some); now the demo stops at once with exit 2 and one line."""
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--size", "tiny", "--output-dir", str(out),
                   "--cache-dir", str(tmp_path / "cache"), *argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()


def test_demo_on_a_benchmark_of_flat_inputs_and_per_instance_tasks(tmp_path, capsys):
    """digits: 64 pixel values per instance and three classification tasks; the sample figure
    shows the input as an 8 x 8 image and each task's labels as text. On the default recipe,
    whose method settings take forget caps from held-out instances: digits has no validation
    split, and the demo crashed after its trainings (a worker's traceback); its caps now come
    from the retain set, which the run and the report say."""
    out = tmp_path / "demo"
    assert demo.main(["--benchmark", "digits", "--size", "tiny", "--baselines", "finetune",
                      "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    report = (out / "report.md").read_text()
    assert "![samples](samples.png)" in report and "UIS floor" not in report
    assert (out / "samples.png").stat().st_size > 1000
    note = "digits has no validation split: the method's forget caps come from the retain set"
    assert note in report and note in capsys.readouterr().out
    args = demo.build_parser().parse_args(["--benchmark", "digits"])
    for config in demo._configs(args).values():
        assert config.method_configs[demo.METHOD]["cap_reference"] == "retain"
    indoor = demo.build_parser().parse_args([])
    assert demo._held_out_note("indoor", "memorising") is None
    for config in demo._configs(indoor).values():
        assert config.method_configs[demo.METHOD]["cap_reference"] == "held_out"


def test_the_recipe_sets_training_and_method_settings() -> None:
    """``--recipe`` picks the trainings' epochs and the settings selected for that recipe;
    ``--train`` overrides go on top of the recipe, not in place of it."""
    from mtunlearn_ext.unlearning.presets import RECIPES, tuned_settings

    assert set(demo.DEMO_RECIPES) == set(RECIPES) and demo.DEMO_RECIPES[0] == "memorising"
    parser = demo.build_parser()
    for argv, recipe, overrides in (([], "memorising", {"epochs": 40}),
                                    (["--recipe", "default"], "default", {}),
                                    (["--train", '{"lr": 0.01}'], "memorising",
                                     {"epochs": 40, "lr": 0.01})):
        configs = demo._configs(parser.parse_args(argv))
        for request, config in configs.items():
            assert config.train_overrides == overrides
            assert config.method_configs == tuned_settings(request, config.methods, recipe)
    # The two recipes' settings differ, so the choice is not a no-op.
    assert tuned_settings("full", [demo.METHOD], "memorising") != tuned_settings(
        "full", [demo.METHOD], "default")


def test_every_bar_series_has_its_own_colour(tmp_path, monkeypatch):
    """Baselines took matplotlib's default cycle, whose 3rd and 4th colours are the ones fixed
    for 'retrained' (green) and the method (red): PCGrad was drawn in retrained's green."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(report_module, "save_png",
                        lambda fig, path, overwrite=False, dpi=100: figures.append(fig))
    # The demo's baselines and more, up to the seven colours the baselines' palette holds.
    baselines = [*demo.DEMO_BASELINES, "finetune", "scrub", "salun", "random_label"]
    labels = ["original", "retrained", *baselines, demo.METHOD]
    metrics = {s: {"a": {"accuracy": 0.5 + 0.01 * i}} for i, s in enumerate(("forget", "retain",
                                                                             "test"))}
    results = {"benchmark": {"tasks": [{"name": "a", "kind": "classification"}]},
               "request": {"type": "full", "target_tasks": ["a"]},
               "models": {label: {"metrics": metrics} for label in labels}}
    demo._plot_metrics(results, baselines, tmp_path / "m.png")
    (ax,) = figures[0].axes
    colours = {}
    for container in ax.containers:
        faces = {mcolors.to_hex(bar.get_facecolor()) for bar in container}
        assert len(faces) == 1
        colours[container.get_label()] = faces.pop()
    plt.close(figures[0])
    assert list(colours) == labels
    reserved = {"original": "#7f7f7f", "retrained": "#2ca02c", demo.METHOD: "#d62728"}
    assert {label: colours[label] for label in reserved} == reserved
    assert len(set(colours.values())) == len(labels), colours  # every series its own colour


def test_no_progress_hides_the_stage_bar_and_keeps_the_log_lines(tmp_path, monkeypatch, capsys):
    """The stage bar had no switch of its own (only tqdm's TQDM_DISABLE=1 hid it), where
    benchmarks/compare.py takes --no-progress. Checked without a run (a whole one takes
    ~30 s): main hands the switch to the bar, and the bar draws on stderr or nothing."""
    from tqdm.auto import tqdm

    parser = demo.build_parser()
    assert parser.parse_args([]).progress is True
    assert parser.parse_args(["--no-progress"]).progress is False
    assert "--no-progress" in parser.format_help()

    class Stop(Exception):
        pass

    asked: list[bool] = []

    def bar(progress: bool):  # type: ignore[no-untyped-def]
        asked.append(progress)
        raise Stop  # before any work

    stage_bar = demo._stage_bar
    monkeypatch.setattr(demo, "check_args", lambda args: None)
    monkeypatch.setattr(demo, "_stage_bar", bar)
    for switch in ([], ["--no-progress"], ["--progress"]):
        with pytest.raises(Stop):
            demo.main(["--size", "tiny", "--output-dir", str(tmp_path / "o"), *switch])
    assert asked == [True, False, True]
    capsys.readouterr()
    for progress in (True, False):
        stages = stage_bar(progress)
        tqdm.write("a log line")
        stages.update(6)
        stages.close()
        printed = capsys.readouterr()
        assert printed.out == "a log line\n"
        if progress:
            assert "demo: 100%" in printed.err and "6/6" in printed.err
        else:
            assert printed.err == ""


def test_the_wall_time_counts_the_argument_checks(tmp_path, monkeypatch):
    """The clock started after check_args, which loads (on a first run generates) every
    benchmark: 4.6 s of a first indoor/small run went uncounted."""
    import time

    events: list[tuple[str, float]] = []

    def slow_check(args):  # type: ignore[no-untyped-def]
        events.append(("check", time.perf_counter()))

    def fake_run(args, start=None):  # type: ignore[no-untyped-def]
        events.append(("start", start))
        return 0

    monkeypatch.setattr(demo, "check_args", slow_check)
    monkeypatch.setattr(demo, "run_demo", fake_run)
    assert demo.main(["--size", "tiny", "--output-dir", str(tmp_path / "o")]) == 0
    (_, checked), (_, start) = events
    assert start is not None and start < checked


def test_a_request_job_runs_every_step_at_the_run_thread_count(monkeypatch):
    """prepare_experiment restores the thread count on return; the job's interference matrix
    ran after it, relying on the count it had left set. The kept weights are those the
    request evaluated, handed over by run_experiment (the method is not run a second time for
    them: profiling audit, a sixth of a cached demo)."""
    import torch

    from mtunlearn_ext import experiment
    from mtunlearn_ext.unlearning import interference

    seen: dict[str, int] = {}
    evaluated = torch.nn.Linear(1, 1)

    class Prepared:
        def problem(self, config):  # type: ignore[no-untyped-def]
            seen["problem"] = torch.get_num_threads()
            return "problem"

    def run(config, on_unlearned=None):  # type: ignore[no-untyped-def]
        seen["unlearn"] = torch.get_num_threads()
        for method in ("neggrad_plus", demo.METHOD):
            on_unlearned(method, evaluated if method == demo.METHOD else torch.nn.Linear(2, 2))
        return {}

    def prepare(config):  # type: ignore[no-untyped-def]
        with experiment.experiment_threads(config.threads):
            pass
        return Prepared()

    def matrix(problem, settings):  # type: ignore[no-untyped-def]
        seen["matrix"] = torch.get_num_threads()
        return {}

    monkeypatch.setattr(experiment, "run_experiment", run)
    monkeypatch.setattr(experiment, "prepare_experiment", prepare)
    monkeypatch.setattr(interference, "interference_matrix", matrix)
    monkeypatch.setattr(report_module, "interference_to_json", lambda m, s: {})
    args = demo.build_parser().parse_args(["--size", "tiny", "--threads", "1"])
    torch.set_num_threads(2)  # conftest restores the count after the test
    _, _, state = demo._request_job(demo._configs(args)["partial"], True, "partial")
    assert seen == {"problem": 1, "matrix": 1, "unlearn": 1}
    assert torch.get_num_threads() == 2
    assert state is not None and state.keys() == evaluated.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in evaluated.state_dict().items())
    assert demo._request_job(demo._configs(args)["full"], False, "full")[2] is None


def test_the_gold_model_is_one_row_not_two() -> None:
    """The tables printed identical ``retrained`` and ``retrain`` rows: the runner answers
    ``retrain`` (no settings) with the very checkpoint it evaluates as ``retrained``."""
    from mtunlearn_ext.unlearning.presets import tuned_settings

    args = demo.build_parser().parse_args(["--baselines", "orthograd,pcgrad"])
    for request, config in demo._configs(args).items():
        assert config.methods == ["orthograd", "pcgrad", demo.METHOD]
        # Had it stayed, it would have been the reused gold model (no settings of its own).
        assert not tuned_settings(request, ["retrain"], args.recipe).get("retrain")


def test_the_recipe_help_gives_each_benchmarks_epochs() -> None:
    """``--help`` said 'default' is "the benchmark's 10 epochs"; digits' recipe has 30."""
    from mtunlearn_ext.data.registry import _RECIPES, SIZES
    from mtunlearn_ext.unlearning.presets import RECIPES

    for recipe in demo.DEMO_RECIPES:
        for benchmark in demo.DEMO_BENCHMARKS:
            for size in SIZES:  # what _configs trains: the benchmark's recipe, then the overrides
                trained = {**_RECIPES[benchmark][size][1], **RECIPES[recipe]}
                assert demo.RECIPE_EPOCHS[recipe][benchmark] == trained["epochs"], (
                    recipe, benchmark, size)
    assert demo._epochs_text("memorising") == "40 epochs"
    assert demo._epochs_text("default") == "10 epochs on indoor and street, 30 on digits"
    text = " ".join(demo.build_parser().format_help().split())
    assert ("'default' (each benchmark's own recipe, 10 epochs on indoor and street, 30 on "
            "digits:" in text)
    assert "'memorising' (40 epochs:" in text and "4x faster" not in text


def test_an_interrupt_while_drawing_leaves_the_previous_report_and_plots_alone(tmp_path,
                                                                               monkeypatch):
    """The plots are drawn into a staging folder and moved beside the report only with it: an
    interrupt while drawing leaves the previous demo's report and plots as they were (not new
    plots beside an old report) and no staging folder."""
    out = tmp_path / "demo"
    out.mkdir()
    previous = {"report.md": b"the previous report", "metrics_full.png": b"previous plot",
                "interference_full.png": b"previous plot"}
    for name, content in previous.items():
        (out / name).write_bytes(content)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_plot_samples", interrupted)  # after the metric plots
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--size", "tiny", "--recipe", "default", "--baselines", "finetune",
                   "--jobs", "2", "--output-dir", str(out), "--cache-dir",
                   str(tmp_path / "cache")])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")} \
        == previous
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_the_demo_leaves_the_callers_warning_filters_as_they_were(monkeypatch, tmp_path):
    """run_demo ignored RuntimeWarning for the whole process: after demo.main() returned in a
    caller's process (a notebook, a test), every RuntimeWarning there, torch's and numpy's
    included, stayed silenced."""
    import warnings

    class Stop(Exception):
        pass

    def stop(args):  # type: ignore[no-untyped-def]
        raise Stop  # the run's first step past its filter

    monkeypatch.setattr(demo, "check_args", lambda args: None)
    monkeypatch.setattr(demo, "_baselines", stop)
    before = list(warnings.filters)
    with pytest.raises(Stop):
        demo.main(["--size", "tiny", "--output-dir", str(tmp_path / "o")])
    # (imports the run made may add filters of their own, sympy's: not these)
    added = [f for f in warnings.filters if f not in before]
    assert [f for f in added if f[0] == "ignore" and f[2] is RuntimeWarning] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("still said", RuntimeWarning)
    assert [str(w.message) for w in caught] == ["still said"]


def test_the_reports_attack_note_gives_the_attacks_check_and_the_aucs_chance_spread() -> None:
    """Report audit: the demo showed forget AUCs to three decimals without the attack's own
    check (member AUC) or the AUC's spread under chance, beside differences of a tenth of
    it. The note gives both and names the models on which the attack is at chance."""
    from mtunlearn_ext import demo

    def entry(member_auc: float) -> dict[str, object]:
        return {"mia": {"member_auc": member_auc, "num_forget": 60, "num_non_members_eval": 100}}

    note = demo._attack_note({"models": {"original": entry(0.62), "retrained": entry(0.54),
                                         "orthograd": entry(0.70)}})
    # sqrt((60 + 100 + 1) / (12 * 60 * 100)) = 0.0473
    assert "With 60 forget and 100 unseen instances the forget AUC's spread under chance is " \
           "0.047" in note, note
    assert note.endswith("The attack is at chance (member AUC <= 0.55) on retrained: its "
                         "forget AUC there says nothing about forgetting."), note
    assert "at chance" not in demo._attack_note({"models": {"original": entry(0.62)}})


def _demo_process(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The tiny demo as a command, SIGINT at its default (a shell's background job ignores
    it), its stdout read line by line."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mtunlearn_ext.demo", "--size", "tiny", "--recipe", "default",
         "--baselines", "finetune", "--jobs", "2", "--no-progress", "--output-dir",
         str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=Path(__file__).resolve().parents[1],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_line(process, fragment: str) -> None:  # type: ignore[no-untyped-def]
    for line in process.stdout:
        if fragment in line:
            return
    raise AssertionError(f"the demo ended before printing {fragment!r}: "
                         f"{process.stderr.read()[-2000:]}")


def _children(pid: int) -> list[int]:
    import subprocess

    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")
def test_an_interrupt_stops_the_running_jobs_and_a_killed_demo_leaves_no_workers(tmp_path):
    """Reproducibility audit: SIGINT to the demo left its pool waiting for the running jobs
    (a demo sent SIGINT by `timeout` still waited 11 minutes later; sent to the parent alone,
    the request job ran to its end and wrote its JSON), and the workers printed tracebacks.
    Now the workers ignore SIGINT, the parent stops them and says so in one line (exit 130),
    and the request interrupted writes nothing. A demo killed outright left its workers
    waiting for jobs for ever: they leave once their parent is gone."""
    import os
    import signal

    process = _demo_process(tmp_path / "interrupted")
    _wait_for_line(process, "full-task request: unlearning")
    workers = _children(process.pid)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "demo: interrupted" in err, err
    assert not (tmp_path / "interrupted" / "out" / "full.json").exists()  # not run to its end
    assert not _still_alive(workers, seconds=30)  # (multiprocessing's tracker: a moment later)

    process = _demo_process(tmp_path / "killed")
    _wait_for_line(process, "training the original model")
    workers = _children(process.pid)
    assert workers
    process.kill()
    process.wait()
    left = _still_alive(workers, seconds=60)
    for pid in left:  # not left running for the suite's sake, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, "workers outlived their killed parent"


def _still_alive(pids: list[int], seconds: float) -> list[int]:
    """``pids`` still running after waiting up to ``seconds`` for them to end."""
    import time

    deadline = time.monotonic() + seconds
    while [p for p in pids if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.25)
    return [p for p in pids if _alive(p)]


class _PluginAscent(NegGradPlus):
    """A method of one's own that its module does not register at import: as one registered
    under ``if __name__ == "__main__"``, or by hand in the parent process."""

    name = "demo_plugin_ascent"


def _registered(name: str) -> bool:
    from mtunlearn_ext.unlearning import UNLEARNERS

    return name in UNLEARNERS


def test_a_method_registered_only_in_the_parent_reaches_the_demos_workers(
        registries_restored, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Extension audit: the demo's checks accepted a method registered under the script's
    main guard, and its spawned worker then failed with "unknown methods" (a traceback, exit
    1) after the trainings. The workers now register the parent's methods of one's own: one
    its module does not register at import, and (diff review) one from a file that
    ``--import`` loaded from outside ``sys.path``, which a class pickled by reference broke
    the whole pool with (ModuleNotFoundError in the worker's start)."""
    from mtunlearn_ext.unlearning import register_unlearner
    from mtunlearn_ext.workflow import import_plugins

    register_unlearner(_PluginAscent)
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "demo_file_plugin.py").write_text(
        "from mtunlearn_ext.unlearning import register_unlearner\n"
        "from mtunlearn_ext.unlearning.baselines.neggrad_plus import NegGradPlus\n\n\n"
        "@register_unlearner\nclass FilePlugin(NegGradPlus):\n"
        "    name = 'demo_file_plugin_ascent'\n")
    monkeypatch.delitem(sys.modules, "demo_file_plugin", raising=False)
    import_plugins([str(folder / "demo_file_plugin.py")])
    monkeypatch.setitem(sys.modules, "demo_file_plugin", sys.modules["demo_file_plugin"])
    names = [_PluginAscent.name, "demo_file_plugin_ascent"]
    specs = demo._plugin_specs(["neggrad_plus", *names, demo.METHOD])
    # (the library's own methods are the workers' already)
    assert [(module, qualname) for module, _, qualname in specs] == [
        (__name__, "_PluginAscent"), ("demo_file_plugin", "FilePlugin")]
    context = multiprocessing.get_context("spawn")
    for given, expected in ((specs, True), ([], False)):
        with ProcessPoolExecutor(1, mp_context=context, initializer=demo._worker_init,
                                 initargs=(None, os.getpid(), given)) as pool:
            assert [pool.submit(_registered, name).result() for name in names] == [expected] * 2


def test_a_method_of_an_interactive_session_or_a_missing_plugin_is_refused_at_once(
        tmp_path, capsys, monkeypatch, registries_restored) -> None:  # type: ignore[no-untyped-def]
    """A method defined in a notebook or the REPL (``__main__`` without a file) cannot reach
    spawned workers: refused before any work, saying what to do. A module that ``--import``
    cannot import is refused the same way."""
    from mtunlearn_ext.unlearning import register_unlearner

    interactive = type("Interactive", (_PluginAscent,),
                       {"name": "demo_interactive_ascent", "__module__": "__main__"})
    register_unlearner(interactive)
    guarded = type("Guarded", (_PluginAscent,),
                   {"name": "demo_guarded_ascent", "__module__": "__main__"})
    register_unlearner(guarded)
    script = tmp_path / "my_script.py"  # (diff review: a class under the main guard)
    script.write_text("import sys\n\nif __name__ == '__main__':\n"
                      "    class Guarded:\n        pass\n")
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    out = tmp_path / "demo"
    common = ["--size", "tiny", "--output-dir", str(out), "--cache-dir", str(tmp_path / "c")]
    for argv, message, file in (
            (["--baselines", "demo_interactive_ascent"],
             "--baselines: method 'demo_interactive_ascent' is defined in an interactive "
             "session, which the demo's worker processes cannot import", None),
            (["--baselines", "demo_guarded_ascent"],
             f"--baselines: method 'demo_guarded_ascent' is not defined at the top level of "
             f"{script} (under `if __name__ == '__main__':`, or in a function)", str(script)),
            (["--import", "no_such_plugin_module"],
             "--import: expected an importable module name or .py file, got "
             "'no_such_plugin_module'", None)):
        if file is None:
            monkeypatch.delattr(main, "__file__", raising=False)
        else:
            monkeypatch.setattr(main, "__file__", file, raising=False)
        with pytest.raises(SystemExit) as stopped:
            demo.main([*common, *argv])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not out.exists()
