"""``mtunlearn``'s arguments other than ids, and its exit codes for bad input (2) and for NaN/Inf
(3): request options given to ``evaluate`` without a request, seeds outside [0, 2**32-1] or inside
``--train``, an unknown ``--method``, fewer than one epoch, and ``--data-root`` for a benchmark
that reads none are refused in one line naming the argument, before any work; a diverging
``train`` or ``unlearn`` (the default method's own step included) exits 3, as the README says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import ROOT, _err, _train
from test_cli import _listing, _unlearn, ids, trained  # noqa: F401  (trained: a fixture)
from torch import nn

from mtunlearn_ext import cli
from mtunlearn_ext.api import build_problem
from mtunlearn_ext.cli import _train as cli_train
from mtunlearn_ext.workflow import NonFiniteError, run_unlearning


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread: for this module only, restored
    after it; never set at import, which would leave the whole `pytest tests` run on one thread)."""


# -- evaluate refuses request options without a request -------------------------------------------


@pytest.mark.parametrize(("extra", "argument", "fragment"), [
    (["--target-tasks", "nope"], "--target-tasks", "got ['nope']; unknown task names"),
    (["--target-tasks", "digit"], "--target-tasks", "--target-tasks has no effect"),
    (["--request", "partial"], "--request", "--request has no effect"),
    (["--target-tasks", "digit", "--request", "partial"], "--target-tasks",
     "--target-tasks and --request have no effect"),
    (["--seed", "3"], "--seed", "--seed has no effect"),
    (["--request", "full", "--seed", "3"], "--request", "--request and --seed have no effect"),
    (["--target-tasks", "digit", "--request", "partial", "--seed", "3"], "--target-tasks",
     "--target-tasks, --request and --seed have no effect"),
])
def test_evaluate_refuses_request_options_without_request(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        extra: list[str], argument: str, fragment: str) -> None:
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--output", str(out),
                     "--quiet", *extra]) == 2
    err = _err(capsys)
    assert err.startswith(f"mtunlearn: error: {argument}: expected") and fragment in err, err
    assert not out.exists()
    # With a request they are used (and an unknown task is still named, as is a partial
    # request without its target tasks).
    refused = "nope" in extra or ("partial" in extra and "--target-tasks" not in extra)
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--quiet", *extra]) == (2 if refused else 0)


# -- a partial request names its target tasks ----------------------------------------------------

_PARTIAL_WITHOUT_TASKS = ("mtunlearn: error: --target-tasks: expected the target tasks of a "
                          "partial request (a proper subset of ['digit', 'parity', 'magnitude']), "
                          "got 'no --target-tasks'; a partial request concerns the named tasks "
                          "only; name them, e.g. --target-tasks digit")


def test_a_partial_request_without_target_tasks_is_refused(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # It ran before, on the first task (experiment.build_request's default), which neither the
    # help nor docs/cli.md said: a user could forget the labels of a task they never named.
    out = tmp_path / "u.pt"
    assert _unlearn(trained, out, "--forget-ids", ids(1, 2), "--request", "partial") == 2
    assert _err(capsys) == _PARTIAL_WITHOUT_TASKS
    config = tmp_path / "c.yaml"
    config.write_text("request: partial\ntarget_tasks: null\n")
    assert _unlearn(trained, out, "--forget-fraction", "0.02", "--config", str(config)) == 2
    assert _err(capsys) == _PARTIAL_WITHOUT_TASKS
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--request", "partial", "--quiet"]) == 2
    assert _err(capsys) == _PARTIAL_WITHOUT_TASKS
    assert _listing(tmp_path) == {"c.yaml"}
    # Named, the task is the one targeted; a full request needs none.
    assert _unlearn(trained, out, "--forget-ids", ids(1, 2), "--request", "partial",
                    "--target-tasks", "parity") == 0
    record = json.loads(Path(str(out) + ".record.json").read_text())
    assert record["request"]["type"] == "partial"
    assert record["request"]["target_tasks"] == ["parity"]
    assert _unlearn(trained, tmp_path / "f.pt", "--forget-ids", ids(1, 2),
                    "--request", "full") == 0


# -- the seed: its range, and not inside --train --------------------------------------------------


@pytest.mark.parametrize("seed", [2**32, 2**64])
def test_seed_beyond_32_bits_is_blamed_on_seed(trained: Path, tmp_path: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str],
                                               seed: int) -> None:
    expected = f"mtunlearn: error: --seed: expected an integer in [0, 2**32-1], got {seed}"
    assert _train(tmp_path / "t.pt", "--seed", str(seed)) == 2
    assert _err(capsys).startswith(expected)
    assert _unlearn(trained, tmp_path / "u.pt", "--forget-fraction", "0.02",
                    "--seed", str(seed)) == 2
    assert _err(capsys).startswith(expected)
    assert cli.main(["evaluate", "--checkpoint", str(trained), "--forget-fraction", "0.02",
                     "--seed", str(seed), "--quiet"]) == 2
    assert _err(capsys).startswith(expected)
    assert _listing(tmp_path) == set()


def test_largest_seed_works_end_to_end(tmp_path: Path) -> None:
    assert _train(tmp_path / "t.pt", "--seed", str(2**32 - 1)) == 0
    assert _unlearn(tmp_path / "t.pt", tmp_path / "u.pt", "--forget-fraction", "0.02") == 0


def test_train_refuses_a_seed_in_the_recipe_overrides(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`--train '{"seed": 5}'` was silently replaced by --seed (0): a model of seed 0."""
    assert _train(tmp_path / "s.pt", "--train", '{"seed": 5}') == 2
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: --train: expected fields of TrainConfig, got "
                          "{'seed': 5}") and "use --seed" in err, err
    assert _listing(tmp_path) == set()


# -- other arguments refused before any work ------------------------------------------------------


def test_an_unknown_method_is_refused_before_it_names_the_outputs(trained,  # noqa: F811
                                                                   capsys) -> None:  # type: ignore[no-untyped-def]
    """`--method foo/bar` went into the default output names first: a ValueError traceback
    ("Invalid name 'orig.foo/bar.pt'") instead of the unknown-method error."""
    folder = trained.parent  # where the default outputs would go
    before = sorted(p.name for p in folder.iterdir())
    code = cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", "3,7",
                     "--method", "foo/bar"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--method: expected one of [" in err and "'interference_aware'" in err, err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_train_refuses_zero_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --epochs 0` exited 0 with `final_loss nan` and a checkpoint holding NaN."""
    base = ["train", "--benchmark", "digits", "--size", "tiny", "--quiet",
            "--output", str(tmp_path / "t.pt")]
    with pytest.raises(SystemExit) as stopped:  # argparse refuses it: exit 2
        cli.main([*base, "--epochs", "0"])
    assert stopped.value.code == 2
    assert "argument --epochs: expected an integer >= 1, got '0'" in _err(capsys)
    assert cli.main([*base, "--train", '{"epochs": 0}']) == 2
    assert _err(capsys).startswith("mtunlearn: error: --train: expected fields of TrainConfig, "
                                   "got {'epochs': 0}; TrainConfig: `epochs` must be >= 1")
    assert _listing(tmp_path) == set()


def test_train_refuses_data_root_for_a_benchmark_that_reads_none(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --benchmark digits --data-root /nonexistent` was accepted, and the ignored path,
    stored in the metadata, changed the checkpoint's SHA-256."""
    assert cli.main(["train", "--benchmark", "digits", "--size", "tiny", "--data-root",
                     "/nonexistent", "--output", str(tmp_path / "t.pt"), "--quiet"]) == 2
    assert _err(capsys) == (
        "mtunlearn: error: --data-root: expected no value unless --benchmark is one of "
        "['nyuv2', 'cityscapes'] (the real data sets it locates), got '/nonexistent'; "
        "'digits' reads no data root; drop --data-root")
    assert _listing(tmp_path) == set()
    # The benchmarks named are exactly those load_benchmark reads from a data root.
    from mtunlearn_ext.data import registry

    assert set(cli_train._DATA_ROOT_BENCHMARKS) == set(registry._REAL)



def test_a_data_root_is_stored_absolute_and_its_data_checked_on_reload(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """`train --data-root data` stored 'data' as given, so `evaluate` from another folder could
    not find it; and the `data_sha256` that `train` stores was never compared: after train
    files 0 and 1 were swapped on disk, `unlearn --forget-ids 0` forgot the image the model had
    learnt as instance 1."""
    from test_data import _write_libmtl

    from mtunlearn_ext.training import load_checkpoint

    data = tmp_path / "work" / "data"
    _write_libmtl(data, with_normals=True)
    orig = tmp_path / "orig.pt"
    monkeypatch.chdir(tmp_path / "work")
    assert cli.main(["train", "--benchmark", "nyuv2", "--size", "tiny", "--data-root", "data",
                     "--epochs", "1", "--output", str(orig), "--quiet"]) == 0
    monkeypatch.chdir(tmp_path)
    assert load_checkpoint(orig).meta["data_root"] == str(data.resolve())
    assert cli.main(["evaluate", "--checkpoint", str(orig), "--output",
                     str(tmp_path / "e.json"), "--quiet"]) == 0
    capsys.readouterr()
    for folder in (data / "train").iterdir():
        (folder / "0.npy").rename(folder / "x.npy")
        (folder / "1.npy").rename(folder / "0.npy")
        (folder / "x.npy").rename(folder / "1.npy")
    out = tmp_path / "u.pt"
    assert cli.main(["unlearn", "--checkpoint", str(orig), "--forget-ids", "0", "--output",
                     str(out), "--record", str(tmp_path / "u.json"), "--quiet"]) == 2
    err = _err(capsys)
    assert err.startswith(f"mtunlearn: error: --checkpoint: expected a checkpoint trained on "
                          f"the data now under {data.resolve()}, got 'nyuv2'; its training data "
                          f"differ from the files recorded at training: train/depth/0.npy "
                          f"edited, train/depth/1.npy edited, train/image/0.npy edited (and "), err
    assert "instance ids name files by number" in err
    assert not out.exists() and not (tmp_path / "u.json").exists()
    # A checkpoint from before the files' digests were recorded: the tensors' hash decides.
    import torch

    payload = torch.load(orig, weights_only=True)
    del payload["meta"]["train_files_sha256"], payload["meta"]["test_files_sha256"]
    del payload["meta_sha256"]  # nor the metadata's hash
    older = tmp_path / "older.pt"
    torch.save(payload, older)
    assert cli.main(["unlearn", "--checkpoint", str(older), "--forget-ids", "0", "--output",
                     str(out), "--record", str(tmp_path / "u.json"), "--quiet"]) == 2
    err = _err(capsys)
    assert err.startswith(f"mtunlearn: error: --checkpoint: expected a checkpoint trained on "
                          f"the data now under {data.resolve()}, got 'nyuv2'; its training data "
                          f"had SHA-256 "), err
    assert "instance ids name files by number" in err
    assert not out.exists() and not (tmp_path / "u.json").exists()

# -- NaN/Inf: exit 3, nothing written -------------------------------------------------------------


def test_train_nan_loss_is_the_nonfinite_policy(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`train --train '{"lr": 1e30}'` raised FloatingPointError (traceback, exit 1); the
    documented policy is exit 3 with one line naming the step, nothing written."""
    assert _train(tmp_path / "nan.pt", "--train", '{"lr": 1e30}') == 3
    err = _err(capsys)
    assert err.startswith("mtunlearn: error: non-finite values (NaN/Inf) at step 1: training "
                          "loss nan"), err
    assert "nothing was written" in err
    assert _listing(tmp_path) == set()


def test_nonfinite_op_errors_leave_the_ops_own_advice_out(trained: Path, tmp_path: Path,  # noqa: F811
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """CLI review: a NaN caught by the surgery ops inside interference_aware told the command
    line's user to "pass finite values (or check_finite=False ...)", an op argument the
    command has no way to set."""
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(0, 1),
                     "--method-config", '{"lr": 1e38, "steps": 4}',
                     "--output", str(tmp_path / "u.pt"), "--quiet"]) == 3
    err = _err(capsys)
    assert "non-finite values (NaN/Inf)" in err and "check_finite" not in err, err


def _flat(text: str) -> str:
    """Markdown text with its line breaks folded into single spaces."""
    return " ".join(text.split())


def test_readme_gives_exit_3_for_nonfinite_values(trained: Path, tmp_path: Path,  # noqa: F811
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The README listed "NaN/Inf losses or gradients" among the bad input that "exits with
    code 2"; a diverging run exits 3 (docs/cli.md, the NaN/Inf policy)."""
    assert cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(0, 1),
                     "--method", "neggrad_plus", "--method-config", '{"lr": 1e30, "steps": 3}',
                     "--output", str(tmp_path / "u.pt"), "--quiet"]) == 3
    assert "non-finite values (NaN/Inf)" in _err(capsys)
    readme = _flat((ROOT / "README.md").read_text())
    passage = readme.split("## Command line, records and safety", 1)[1].split("\n## ", 1)[0]
    two = passage.split("exits with code 2", 1)[0]
    assert "NaN/Inf" not in two.rsplit("bad input", 1)[-1], two
    assert "a NaN/Inf loss, gradient or parameter during a run stops it with exit code 3" \
        in passage


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.heads = nn.ModuleDict({"a": nn.Linear(12, 3), "b": nn.Linear(12, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _request():  # type: ignore[no-untyped-def]
    from mtunlearn_ext import ForgetRequest

    return ForgetRequest.create(range(5))


def _two_task_problem():  # type: ignore[no-untyped-def]
    """A seeded 40-instance problem on `_Net`: a classification and a regression task."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = {"a": torch.randint(0, 3, (40,), generator=g), "b": torch.randn(40, 1, generator=g)}
    return build_problem(_Net(), tasks={"a": "classification", "b": "regression"},
                         train_data=(x, y), forget_request=_request(),
                         shared_parameters=lambda n: n.startswith("trunk."))


def test_nan_inside_the_default_methods_step_is_the_nonfinite_error() -> None:
    """The interference-aware method's ops refuse NaN/Inf gradients inside a step, before the
    guard's callback: a FloatingPointError traceback (exit 1) instead of the NaN/Inf policy's
    NonFiniteError with the step (exit 3)."""
    problem = _two_task_problem()
    with pytest.raises(NonFiniteError, match=r"at step \d+: .*NaN or Inf") as caught:
        run_unlearning(problem, "interference_aware", {"steps": 5, "lr": 1e30})
    assert isinstance(caught.value.step, int) and caught.value.step >= 1


def test_another_models_weights_are_named_by_what_differs(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Failure injection: a checkpoint whose metadata names one benchmark and whose weights are
    another model's was refused with torch's heading alone ("Error(s) in loading state_dict
    for MLPMultiTaskNet:"), which names nothing that differs."""
    from mtunlearn_ext.training import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(trained)
    other = nn.Module()
    other.encoder = nn.Linear(2, 2)
    foreign = tmp_path / "foreign.pt"
    save_checkpoint(foreign, other, loaded.meta)
    assert cli.main(["evaluate", "--checkpoint", str(foreign), "--quiet"]) == 2
    err = _err(capsys)
    assert len(err.strip().splitlines()) == 1
    assert "expected weights of the 'digits' model" in err
    assert 'Missing key(s) in state_dict: "backbone.' in err
    assert 'Unexpected key(s) in state_dict: "encoder.weight", "encoder.bias"' in err


def _with_meta(source: Path, target: Path, **changes: object) -> Path:
    """A copy of the checkpoint ``source`` with its metadata changed as a hand-made file would
    have it (the metadata hash recomputed: it guards against damage, not against an author)."""
    from mtunlearn_ext.training import (
        _CHECKPOINT_FORMAT,
        load_checkpoint,
        meta_sha256,
        state_dict_sha256,
    )

    loaded = load_checkpoint(source)
    meta = {**loaded.meta, **changes}
    torch.save({"format": _CHECKPOINT_FORMAT, "state_dict": loaded.state_dict, "meta": meta,
                "state_sha256": state_dict_sha256(loaded.state_dict),
                "meta_sha256": meta_sha256(meta)}, target)
    return target


@pytest.mark.parametrize("seed", [[1], None, 1.5, True], ids=["list", "null", "float", "bool"])
def test_a_checkpoints_seed_must_be_an_integer(trained: Path, tmp_path: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str],
                                               seed: object) -> None:
    """int() of the metadata's seed: a list or None was a TypeError traceback (exit 1), 1.5
    and true were read as seed 1, data the checkpoint does not name."""
    crafted = _with_meta(trained, tmp_path / "crafted.pt", seed=seed)
    assert cli.main(["evaluate", "--checkpoint", str(crafted), "--quiet"]) == 2
    err = _err(capsys)
    assert "--checkpoint: expected a checkpoint whose metadata seed is an integer >= 0" in err


@pytest.mark.parametrize("recipe", ["x", 3, {"no_such_field": 1}], ids=["text", "number", "key"])
def test_a_checkpoints_recipe_is_checked_before_any_work(trained: Path,  # noqa: F811
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         recipe: object) -> None:
    """The recorded training recipe (retraining's) was read after the input model was
    measured: a TypeError or ValueError traceback with exit 1."""
    crafted = _with_meta(trained, tmp_path / "crafted.pt", recipe=recipe)
    code = _unlearn(crafted, tmp_path / "out.pt", "--forget-ids", ids(1), "--method",
                    "finetune")
    assert code == 2
    err = _err(capsys)
    assert "--checkpoint: expected a checkpoint whose recorded training recipe" in err, err
    assert not (tmp_path / "out.pt").exists()


def test_the_finite_guard_reads_back_only_where_the_curves_are_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's NaN/Inf guard read two flags per parameter back to the host after every step
    (bool(torch.isfinite(t).all()): here 8 reads a step, on CUDA 8 synchronisations, for a
    model of 4 tensors). It now keeps its flags on the device and reads them once, at the steps
    whose losses the curve recorder reads anyway (every `log_every`-th and the last), and
    still names the first step that went non-finite and the tensor."""
    from mtunlearn_ext.workflow import _FiniteGuard

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    reads = []
    for method in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original) -> Any:
            reads.append(1)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    guard = _FiniteGuard(check_every=4, total_steps=8)
    guard(1, model)  # step 0: a logged step
    assert len(reads) == 1
    for steps_done in (2, 3):
        guard(steps_done, model)
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")  # goes non-finite in step 3 (0-based)
    guard(4, model)
    assert len(reads) == 1  # steps 1-3 are not logged: nothing read
    with pytest.raises(NonFiniteError, match=r"at step 3: parameter 1\.weight; lower `lr` or "
                       r"`steps` in --method-config") as caught:
        guard(5, model)  # step 4, logged: the flag is read and names step 3
    assert caught.value.step == 3


def test_the_finite_guard_follows_gradients_that_come_and_go() -> None:
    """Review of the guard above: it stacked a flag per gradient present, so a step in which a
    parameter first got a gradient (a head without one in the step before) gave a longer
    flag list than the one kept, and torch.where between them failed (a shape error, not the
    run's). Each parameter has two flags in every step now, a missing gradient's true."""
    from mtunlearn_ext.workflow import _FiniteGuard

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    guard = _FiniteGuard(check_every=4, total_steps=8)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # only one gradient in step 0
    guard(1, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].bias.grad[0] = float("inf")  # step 1: a gradient that was not there in step 0
    guard(2, model)
    with pytest.raises(NonFiniteError, match=r"at step 1: gradient of 1\.bias;"):
        guard.raise_if_diverged()


def _guard_flags_one_tensor_at_a_time(model: nn.Module) -> list[bool]:
    """The guard's flags, computed the plain way: each gradient and parameter on its own."""
    return [bool(torch.isfinite(t).all()) if t is not None else True
            for p in model.parameters() for t in (p.grad, p)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_finite_guard_flags_every_nan_and_inf_it_is_shown(dtype: torch.dtype) -> None:
    """The guard takes each tensor's largest magnitude in one multi-tensor reduction: the
    flags must equal the per-tensor `isfinite(...).all()` ones whatever is poisoned (a NaN
    beside values near the type's largest, where a sum of squares would overflow to a false
    Inf; -Inf; an empty parameter; a missing gradient) and name the poisoned tensor."""
    from mtunlearn_ext.workflow import _FiniteGuard

    gen = torch.Generator().manual_seed(0)
    largest = torch.finfo(dtype).max
    for trial in range(40):
        model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).to(dtype)
        model.register_parameter("empty", nn.Parameter(torch.empty(0, 3, dtype=dtype)))
        tensors = []
        for k, p in enumerate(model.parameters()):
            if k != 1 or trial % 2:  # the first bias has no gradient in half the trials
                p.grad = torch.full_like(p, largest / 2)
                tensors.append(p.grad)
            tensors.append(p.data)
        poisoned = [t for t in tensors if t.numel()]
        target = poisoned[int(torch.randint(len(poisoned), (1,), generator=gen))]
        index = int(torch.randint(target.numel(), (1,), generator=gen))
        bad = (float("nan"), float("inf"), -float("inf"))[trial % 3]
        target.view(-1)[index] = bad
        want = _guard_flags_one_tensor_at_a_time(model)
        assert want.count(False) == 1
        guard = _FiniteGuard(check_every=1, total_steps=1)
        flags = guard.step_flags(model)
        assert flags is not None and flags.tolist() == want, (trial, bad)
        with pytest.raises(NonFiniteError, match=r"at step 0: ") as caught:
            guard(1, model)
        names = [f"{kind} {name}" for name, _ in model.named_parameters()
                 for kind in ("gradient of", "parameter")]
        assert names[want.index(False)] + ";" in str(caught.value)


def test_the_finite_guard_passes_finite_extremes_and_a_model_without_parameters() -> None:
    from mtunlearn_ext.workflow import _FiniteGuard

    model = nn.Linear(4, 3).to(torch.float16)
    for p in model.parameters():
        p.grad = torch.full_like(p, torch.finfo(torch.float16).max)
    with torch.no_grad():
        model.weight.fill_(-torch.finfo(torch.float16).max)
    guard = _FiniteGuard(check_every=1, total_steps=3)
    for steps_done in (1, 2, 3):
        guard(steps_done, model)
    assert guard.first_bad_step() is None
    empty = _FiniteGuard(check_every=1, total_steps=1)
    assert empty.step_flags(nn.ReLU()) is None
    empty(1, nn.ReLU())
    assert empty.first_bad_step() is None


def _problem_whose_method_fails(monkeypatch: pytest.MonkeyPatch, error: Exception,
                                poison_first: bool) -> Any:
    """A problem and a patched `checked_unlearner` whose method runs two steps (the guard's
    callback sees them) and then raises `error`; with `poison_first` the second left a NaN."""
    from mtunlearn_ext import workflow

    problem = _two_task_problem()
    real = workflow.checked_unlearner

    def failing_after_one_step(method: str, settings: Any) -> Any:
        unlearner = real(method, settings)
        model = _Net()

        def unlearn(_: Any) -> Any:
            for callback in unlearner.step_callbacks:
                callback(1, model)  # step 0, logged: its flags are read (finite)
            if poison_first:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            for callback in unlearner.step_callbacks:
                callback(2, model)  # step 1, not logged: nothing read back yet
            raise error

        unlearner.unlearn = unlearn
        return unlearner

    monkeypatch.setattr(workflow, "checked_unlearner", failing_after_one_step)
    return problem


@pytest.mark.parametrize("error", [ValueError("a bug in step 2"),
                                   RuntimeError("a bug in step 2")])
def test_a_methods_failure_after_its_first_step_is_its_own(
        monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """After a step, a method's ValueError is a bug, not the user's settings: it keeps its type
    and message (a traceback), unlike the same error raised before the first step."""
    problem = _problem_whose_method_fails(monkeypatch, error, poison_first=False)
    with pytest.raises(type(error), match="a bug in step 2") as caught:
        run_unlearning(problem, "interference_aware", {"steps": 5, "log_every": 5})
    assert caught.value is error


@pytest.mark.parametrize("error", [ValueError("solver failed"),
                                   FloatingPointError("gradient has NaN or Inf")])
def test_a_failure_after_an_unread_nan_names_the_first_bad_step(
        monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """A step that left a NaN the guard had not read back yet, and a later failure (an op's own
    check, a solver) on it: the run's error is the first bad step's, not the later symptom."""
    problem = _problem_whose_method_fails(monkeypatch, error, poison_first=True)
    with pytest.raises(NonFiniteError, match=r"at step 1: parameter ") as caught:
        run_unlearning(problem, "interference_aware", {"steps": 5, "log_every": 5})
    assert caught.value.__context__ is error


def test_the_finite_guard_passes_integer_parameters_and_checks_the_others() -> None:
    """An integer or bool parameter (a frozen counter or index table registered as one) can
    hold no NaN/Inf, and the infinity norm refuses its type: the guard's single reduction
    failed on it ("Expected a floating point or complex tensor"). It is taken as finite; the
    float parameters beside it are still checked."""
    from mtunlearn_ext.workflow import _FiniteGuard

    model = nn.Linear(3, 2)
    model.register_parameter("counts", nn.Parameter(torch.arange(4), requires_grad=False))
    model.register_parameter("mask", nn.Parameter(torch.ones(2, dtype=torch.bool),
                                                  requires_grad=False))
    model.weight.grad = torch.ones_like(model.weight)
    flags = _FiniteGuard().step_flags(model)
    assert flags is not None and flags.tolist() == [True] * 8
    with torch.no_grad():
        model.bias[1] = float("nan")
    guard = _FiniteGuard(check_every=1, total_steps=1)
    with pytest.raises(NonFiniteError, match=r"at step 0: parameter bias;"):
        guard(1, model)


# -- an operator's mix-ups, told as what they are (CLI audit) ------------------------------------

def test_mixed_up_files_are_named_for_what_they_are(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """A record given as --checkpoint said "Unsupported operand 123"; a missing --method-config
    or --train file "Expecting value: line 1 column 1 (char 0)"; a truncated checkpoint ran on
    for four sentences of torch's; a .json --config said only which suffixes are read."""
    record = tmp_path / "orig.pt.record.json"
    record.write_text(json.dumps({"schema": "mtunlearn_ext.unlearning-record/1"}))
    assert cli.main(["unlearn", "--checkpoint", str(record), "--forget-ids", ids(1)]) == 2
    assert _err(capsys).endswith(f"checkpoint {record} is not an mtunlearn checkpoint: it is "
                                 "JSON text (an unlearning record? its `output.checkpoint` "
                                 "names the checkpoint it describes)")
    for argv in (["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1),
                  "--method-config", "nope.json"],
                 ["train", "--output", str(tmp_path / "x.pt"), "--train", "nope.json"]):
        assert cli.main(argv) == 2
        option = argv[-2]
        assert _err(capsys) == (f"mtunlearn: error: {option}: expected a JSON object or a "
                                "readable file holding one, got 'nope.json'; no such file")
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(trained.read_bytes()[:1000])
    assert cli.main(["evaluate", "--checkpoint", str(truncated)]) == 2
    err = _err(capsys)
    assert "cannot be read (truncated or corrupt?)" in err and "miniz" not in err, err
    config = tmp_path / "req.json"
    config.write_text(json.dumps({"checkpoint": str(trained), "forget_ids": [1]}))
    assert cli.main(["unlearn", "--config", str(config)]) == 2
    assert _err(capsys).endswith("a JSON config is not read: write it as YAML or TOML, the "
                                 "options' names as keys")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orig.pt.record.json", "req.json",
                                                          "trunc.pt"]
