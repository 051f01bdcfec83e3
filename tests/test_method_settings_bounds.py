"""Methods' settings at their boundaries (a review of every knob at 0, 1, its largest, NaN/Inf,
and in combination): settings a method would have ignored without a word, or refused only deep
inside a run with another function's message, are now refused up front, naming the method's
setting and what it takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_api_validation import TASKS, _TwoHeads  # the two-task toy model of the API tests
from torch import nn

import mtunlearn_ext
from mtunlearn_ext.unlearning import get_unlearner

def _unlearn(method: str, config: dict[str, object], model: nn.Module | None = None
             ) -> nn.Module:
    dtype = torch.float32 if model is None else next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g).to(dtype)
    y = {"a": torch.randint(0, 3, (40,), generator=g),
         "b": torch.randn(40, 1, generator=g).to(dtype)}
    new, _ = mtunlearn_ext.unlearn(
        _TwoHeads() if model is None else model,
        forget_data=(x[:5], {t: v[:5] for t, v in y.items()}),
        retain_data=(x[5:], {t: v[5:] for t, v in y.items()}), tasks=TASKS,
        shared_parameters=lambda n: n.startswith("trunk."), method=method, config=config)
    return new


@pytest.mark.parametrize(("method", "field", "other_method"),
                         [("finetune", "forget_weight", "neggrad_plus"),
                          ("gradient_ascent", "retain_weight", "neggrad_plus")])
def test_a_weight_of_a_term_the_method_does_not_have_is_refused(
        method: str, field: str, other_method: str) -> None:
    """Review: fine-tuning with `forget_weight` 1 and gradient ascent with `retain_weight` 1 ran
    and returned the model of weight 0 bit for bit (their steps draw no forget / retain batch):
    the setting was ignored without a word."""
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError, match=rf"`{field}` at 0 or use '{other_method}'.*, got "
                                             rf"{bad}"):
            get_unlearner(method, {field: bad})
    with pytest.raises(ValueError, match=rf"`{field}` at 0"):
        _unlearn(method, {"steps": 2, field: 1.0})
    assert getattr(get_unlearner(method, {field: 0.0}).config, field) == 0.0
    assert getattr(get_unlearner(method, {field: 0}).config, field) == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_orthograd_refuses_a_ridge_that_is_not_finite(bad: float) -> None:
    """Review: `ridge` inf passed OrthoGradConfig (only `>= 0` was checked) and the run failed
    at its first step with `mtunlearn_ext.surgery.project_out_list: ridge must be ...`, a name
    the caller never used."""
    expected = rf"OrthoGradConfig: `ridge` must be a finite number >= 0, got {bad!r}"
    with pytest.raises(ValueError, match=expected):
        get_unlearner("orthograd", {"ridge": bad})
    with pytest.raises(ValueError, match=expected):
        _unlearn("orthograd", {"steps": 1, "ridge": bad})
    large = get_unlearner("orthograd", {"ridge": 1e300}).config
    assert getattr(large, "ridge") == 1e300


def test_retrain_refuses_a_seed_past_64_bits() -> None:
    """Review: `seed` 2**70 passed RetrainConfig (only `>= 0` was checked) and the retraining
    failed inside torch's `manual_seed` with "Overflow when unpacking long long" (the CLI: a
    traceback)."""
    for bad in (2**64, 2**70, -1):
        with pytest.raises(ValueError, match=r"RetrainConfig: `seed` must be an int in "
                                             rf"\[0, 2\*\*64\) or None, got {bad}"):
            get_unlearner("retrain", {"seed": bad})
    largest = 2**64 - 1
    assert getattr(get_unlearner("retrain", {"seed": largest}).config, "seed") == largest
    torch.Generator().manual_seed(largest)  # what the retraining seeds with it


@pytest.mark.parametrize("method", ["interference_aware", "neggrad_plus"])
def test_head_refit_steps_with_frozen_heads_are_refused(method: str) -> None:
    """Review: `head_refit_steps` 5 with `head_lr_scale` 0 ran five refit steps that moved
    nothing (the trunk's rate is 0 in a refit, the heads' lr x 0): the model was bit for bit
    that of the run without them."""
    expected = (r"`head_refit_steps` \(5\) moves the heads alone, at `lr` x `head_lr_scale`, "
                r"which is 0 here")
    with pytest.raises(ValueError, match=expected):
        get_unlearner(method, {"head_refit_steps": 5, "head_lr_scale": 0.0})
    with pytest.raises(ValueError, match=expected):
        _unlearn(method, {"steps": 2, "head_refit_steps": 5, "head_lr_scale": 0})
    # Either alone is a run of its own: frozen heads, or a refit at the heads' rate.
    get_unlearner(method, {"head_refit_steps": 0, "head_lr_scale": 0.0})
    get_unlearner(method, {"head_refit_steps": 5, "head_lr_scale": 1e-3})


@pytest.mark.parametrize("method", ["interference_aware", "scrub"])
def test_an_integer_adam_beta2_runs_as_its_float(method: str) -> None:
    """Review: `adam_beta2` 0 (an int, as JSON's `0` in --method-config gives it) passed the
    checks, and Adam then refused the betas `(0.9, 0)` inside the run: "betas must be either
    both floats or both Tensors"."""
    settings = {"steps": 2, "optimizer": "adam"}
    as_int = _unlearn(method, {**settings, "adam_beta2": 0})
    as_float = _unlearn(method, {**settings, "adam_beta2": 0.0})
    for p, q in zip(as_int.parameters(), as_float.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_cli_refuses_bad_settings_before_it_loads_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: `unlearn --method-config` settings of the wrong type or range were checked
    only after the checkpoint was loaded and the input model measured on the forget, retain
    and test sets (minutes on a large model): a checkpoint that does not exist was reported
    first, and a typo waited for the whole measurement."""
    from mtunlearn_ext import cli, workflow

    def not_yet(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(workflow, "load_model", not_yet)
    for method, settings, expected in (
            ("interference_aware", '{"steps": true}', "`steps` must be an integer, got True"),
            ("finetune", '{"forget_weight": 1}', "leave `forget_weight` at 0"),
            ("orthograd", '{"ridge": Infinity}', "`ridge` must be a finite number >= 0")):
        assert cli.main(["unlearn", "--checkpoint", str(tmp_path / "missing.pt"),
                         "--forget-ids", "3,7", "--method", method, "--method-config",
                         settings, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"--method-config: expected valid settings of {method!r}" in err, err
        assert expected in err, err
    assert list(tmp_path.iterdir()) == []


class _DeadUnit(_TwoHeads):
    """A trunk unit that never fires: its weights' gradients are exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.trunk[0].bias[0] = -1e4


@pytest.mark.parametrize("method", ["interference_aware", "neggrad_plus"])
def test_an_adam_eps_that_is_0_in_the_models_type_is_refused(method: str) -> None:
    """Review: `adam_eps` 1e-50 passed (finite and > 0) but is 0 in float32, where Adam adds
    it: a coordinate whose gradient is 0 became 0 / 0 and the run returned NaN weights, with
    a warning that blamed the learning rate."""
    settings = {"steps": 2, "optimizer": "adam", "adam_eps": 1e-50}
    with pytest.raises(ValueError, match=rf"{method}: `adam_eps` \(1e-50\) is 0 in "
                                         r"torch\.float32, the type of the model's parameters.*"
                                         r"give at least 1\.175e-38"):
        _unlearn(method, settings, _DeadUnit())
    # In float64 it is a number: the same run is finite, as is float32's smallest normal.
    model = _unlearn(method, settings, _DeadUnit().double())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model = _unlearn(method, {**settings, "adam_eps": 1.2e-38}, _DeadUnit())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_scrub_refuses_a_temperature_whose_square_overflows_float32() -> None:
    """Review: `temperature` 1e20 passed (finite and > 0); the class divergences are scaled by
    tau^2, inf in float32, and inf times a divergence of 0 returned NaN weights."""
    for bad in (1e20, 1e300):
        with pytest.raises(ValueError, match=r"SCRUBConfig: `temperature` must be a finite "
                                             r"number > 0 and at most 1\.845e\+19"):
            _unlearn("scrub", {"steps": 2, "temperature": bad})
    model = _unlearn("scrub", {"steps": 2, "temperature": 1.8e19})
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_the_memory_plan_counts_the_per_sample_rows_a_batch_can_give(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: `num_per_sample` 64 of retain batches of 8 rows takes 8 rows per step (the
    batch's first rows, as the docs say), but the gradient-memory plan counted 64: the report
    overstated the copies 8 times and a run that fit the device was refused."""
    from mtunlearn_ext.unlearning import interference_aware as module

    settings = {"steps": 1, "num_per_sample": 64, "retain_batch_size": 8}
    trunk, heads = 8 * 16 + 16, (16 * 3 + 3) + (16 + 1)
    snapshots, per_sample_pass = 24 * trunk * 4, 8 * (trunk + heads) * 4
    monkeypatch.setattr(module, "_device_memory", lambda device: 2**15)  # fits 8 rows, not 64
    monkeypatch.setattr(module, "_available_memory", lambda device: 2**15)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    y = {"a": torch.randint(0, 3, (40,), generator=g), "b": torch.randn(40, 1, generator=g)}
    _, report = mtunlearn_ext.unlearn(
        _TwoHeads(), forget_data=(x[:5], {t: v[:5] for t, v in y.items()}),
        retain_data=(x[5:], {t: v[5:] for t, v in y.items()}), tasks=TASKS,
        shared_parameters=lambda n: n.startswith("trunk."), config=settings)
    plan = report.extra["interference_aware"]["gradient_memory_bytes"]
    assert plan == {"snapshots": snapshots, "instance_memory": 0,
                    "per_sample_pass": per_sample_pass, "total": snapshots + per_sample_pass}
