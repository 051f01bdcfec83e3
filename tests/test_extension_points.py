"""The library's extension points: registering methods and forgetting objectives, custom task
losses in records and benchmark files, and the model builder's regression heads.

Each test names the review finding it covers; the functions under test are imported inside the
tests, so that one missing piece fails its own test and not the whole module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtunlearn_ext.data import Benchmark, MultiTaskDataset, TaskSpec
from mtunlearn_ext.unlearning import FORGET_OBJECTIVES, UNLEARNERS, ForgetObjective

DOC = Path(__file__).resolve().parents[1] / "docs" / "unlearning.md"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread, for this module only)."""


def huber(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    return F.huber_loss(pred, target, reduction="none", delta=delta).mean(dim=1)


class TwoHeads(nn.Module):
    """The guide's kind of user model: a trunk and a ModuleDict of heads, forward(x) -> dict."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.heads = nn.ModuleDict({"kind": nn.Linear(16, 3), "size": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


class _EntropyMax(ForgetObjective):
    name = "_test_entropy_max"
    kinds = ("classification",)

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(pred, dim=1)
        return (log_p.exp() * log_p).sum(dim=1)


# -- 1. forgetting objectives: a registration function ------------------------------------------

def test_register_forget_objective_adds_a_checked_objective(registries_restored: None) -> None:
    """Finding 1: custom objectives went into FORGET_OBJECTIVES by hand (undocumented) and
    could silently replace a built-in one (another `capped_ascent` changed every method's
    default). register_forget_objective checks the class and refuses a taken name."""
    import mtunlearn_ext.unlearning as unlearning
    from mtunlearn_ext.unlearning import register_forget_objective
    from mtunlearn_ext.unlearning.objectives import (
        CappedAscentObjective,
        make_forget_objectives,
    )

    assert "register_forget_objective" in unlearning.__all__
    assert register_forget_objective(_EntropyMax) is _EntropyMax  # usable as a decorator
    assert FORGET_OBJECTIVES["_test_entropy_max"] is _EntropyMax
    assert register_forget_objective(_EntropyMax) is _EntropyMax  # the same class again: fine
    spec = TaskSpec("kind", "classification", num_classes=3)
    data = MultiTaskDataset(torch.randn(6, 2), {"kind": torch.tensor([0, 1, 2, 0, 1, 2])}, [spec])
    built = make_forget_objectives([spec], data, torch.Generator().manual_seed(0), "cpu",
                                   "_test_entropy_max")
    assert isinstance(built["kind"], _EntropyMax)

    class Impostor(ForgetObjective):
        name = "capped_ascent"

        def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return pred.sum(dim=1)

    with pytest.raises(ValueError, match=re.escape(
            f"{__name__}.test_register_forget_objective_adds_a_checked_objective.<locals>."
            f"Impostor: the name 'capped_ascent' is taken by "
            f"mtunlearn_ext.unlearning.objectives.CappedAscentObjective")):
        register_forget_objective(Impostor)
    assert FORGET_OBJECTIVES["capped_ascent"] is CappedAscentObjective


def test_register_forget_objective_refuses_malformed_classes(registries_restored: None) -> None:
    """Finding 1: the class must be a concrete ForgetObjective with a name and a tuple of known
    task kinds (a str `kinds` would make `spec.kind in kinds` a substring test)."""
    from mtunlearn_ext.unlearning import register_forget_objective

    def objective(name: str, kinds: object = None, concrete: bool = True) -> type:
        body: dict[str, object] = {"name": name}
        if kinds is not None:
            body["kinds"] = kinds
        if concrete:
            body["per_sample"] = lambda self, pred, target: pred.sum(dim=1)
        return type("Custom", (ForgetObjective,), body)

    with pytest.raises(TypeError, match="expected a subclass of ForgetObjective"):
        register_forget_objective(dict)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="has no `name`"):
        register_forget_objective(objective(""))
    with pytest.raises(ValueError, match=r"`kinds` must be a non-empty tuple .* got "
                                         r"'classification'"):
        register_forget_objective(objective("a", kinds="classification"))
    with pytest.raises(ValueError, match=r"`kinds` must be a non-empty tuple"):
        register_forget_objective(objective("a", kinds=()))
    with pytest.raises(ValueError, match=r"unknown task kinds \['detection'\]"):
        register_forget_objective(objective("a", kinds=("classification", "detection")))
    with pytest.raises(TypeError, match=r"is abstract: define \['per_sample'\]"):
        register_forget_objective(objective("a", concrete=False))
    assert "a" not in FORGET_OBJECTIVES and "" not in FORGET_OBJECTIVES


# -- 2. register_unlearner on a module reload ------------------------------------------------------

_PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    from mtunlearn_ext.unlearning import GradientUnlearner, StepConfig, register_unlearner


    @dataclass
    class ReloadedConfig(StepConfig):
        steps: int = 3


    @register_unlearner
    class Reloaded(GradientUnlearner):
        name = "_test_reloaded"
        config_class = ReloadedConfig

        def compute_update(self, ctx, forget_batch, retain_batch):
            return self.weighted_update(ctx, forget_batch, retain_batch)
''')


def test_register_unlearner_accepts_a_reloaded_module(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries_restored: None) -> None:
    """Finding 2: importlib.reload (a re-run notebook cell, autoreload) defines the method's
    class again, and register_unlearner refused it: "the name ... is taken by" the same
    class of the module's first run. The same module and qualified name now replace the entry;
    another class of that name is still refused, naming both."""
    from mtunlearn_ext.unlearning import GradientUnlearner, StepConfig, register_unlearner

    (tmp_path / "_ext_points_plugin.py").write_text(_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "_ext_points_plugin", raising=False)
    module = importlib.import_module("_ext_points_plugin")
    try:
        first = module.Reloaded
        again = importlib.reload(module).Reloaded
        assert again is not first
        assert UNLEARNERS["_test_reloaded"] is again

        class Reloaded(GradientUnlearner):  # the same name, another module: refused
            name = "_test_reloaded"
            config_class = StepConfig

            def compute_update(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
                return self.weighted_update(ctx, forget_batch, retain_batch)

        with pytest.raises(ValueError, match=re.escape(
                f"the name '_test_reloaded' of {__name__}.test_register_unlearner_accepts_a_"
                f"reloaded_module.<locals>.Reloaded is taken by _ext_points_plugin.Reloaded")):
            register_unlearner(Reloaded)
        assert UNLEARNERS["_test_reloaded"] is again
    finally:
        sys.modules.pop("_ext_points_plugin", None)


def test_register_unlearner_refuses_a_name_that_is_no_identifier(
        registries_restored: None) -> None:
    """A method named 'a/b' was registered, and `unlearn`'s default output
    `<input>.a/b.pt` then failed with pathlib's "Invalid name" traceback; one holding an ESC
    recoloured every line naming it. Names are identifier-like, as benchmarks' are."""
    from mtunlearn_ext.unlearning import GradientUnlearner, StepConfig, register_unlearner

    for bad in ("a/b", "red\x1b[31m", "two words", "1st", "..", "a.b"):
        class Odd(GradientUnlearner):
            name = bad
            config_class = StepConfig

            def compute_update(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
                return self.weighted_update(ctx, forget_batch, retain_batch)

        with pytest.raises(ValueError, match=re.escape(
                "register_unlearner: test_register_unlearner_refuses_a_name_that_is_no_"
                "identifier.<locals>.Odd.name must be an identifier-like string (letters, "
                f"digits, '_'; not starting with a digit), as a benchmark's, got {bad!r}")):
            register_unlearner(Odd)
        assert bad not in UNLEARNERS


# -- 3. a config subclass without @dataclass ---------------------------------------------------------

def test_register_unlearner_refuses_a_config_that_is_not_a_dataclass(
        registries_restored: None) -> None:
    """Finding 3: a config subclass without @dataclass was registered silently; its declared
    defaults lost to the parent's and its new field was refused as an unknown setting."""
    from mtunlearn_ext.unlearning import GradientUnlearner, StepConfig, register_unlearner

    class NoDataclassConfig(StepConfig):
        steps: int = 7
        my_knob: float = 0.5

    class Mine(GradientUnlearner):
        name = "_test_no_dataclass"
        config_class = NoDataclassConfig

        def compute_update(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
            return self.weighted_update(ctx, forget_batch, retain_batch)

    with pytest.raises(TypeError, match=r"Mine\.config_class \S*NoDataclassConfig is not a "
                                        r"dataclass itself.*StepConfig.*add @dataclass above "
                                        r"`class NoDataclassConfig`"):
        register_unlearner(Mine)
    assert "_test_no_dataclass" not in UNLEARNERS

    Mine.config_class = dataclasses.dataclass(NoDataclassConfig)
    register_unlearner(Mine)
    from mtunlearn_ext.unlearning import get_unlearner

    method = get_unlearner("_test_no_dataclass", {"my_knob": 1.0})
    assert method.config.steps == 7 and method.config.my_knob == 1.0  # type: ignore[attr-defined]

    # A subclass that declares no field (only a stricter check) needs no @dataclass of its own.
    class StricterConfig(StepConfig):
        def validate(self) -> None:
            super().validate()
            if self.steps > 50:
                raise ValueError("at most 50 steps")

    class Strict(Mine):
        name = "_test_stricter"
        config_class = StricterConfig

    register_unlearner(Strict)
    assert get_unlearner("_test_stricter", {"steps": 5}).config.steps == 5
    with pytest.raises(ValueError, match="at most 50 steps"):
        get_unlearner("_test_stricter", {"steps": 60})


# -- 4. TaskSpec.describe of a functools.partial loss ------------------------------------------------

def test_describe_names_a_partial_loss_by_its_function_and_arguments() -> None:
    """Finding 4: a functools.partial loss was recorded as just "partial"."""
    from mtunlearn_ext.experiment import dataset_fingerprint

    def described(loss: object) -> object:
        return TaskSpec("size", "regression", loss=loss).describe()["loss"]  # type: ignore[arg-type]

    assert described(huber) == "huber"
    assert described(functools.partial(huber, delta=0.5)) == "partial(huber, delta=0.5)"
    assert described(functools.partial(huber, delta=0.9)) == "partial(huber, delta=0.9)"
    # Keywords sorted (equal partials, equal text); a callable argument by its name; an
    # argument whose repr is long, multi-line or carries a memory address by its type.
    smooth = functools.partial(F.cross_entropy, reduction="none", label_smoothing=0.1)
    assert described(smooth) == "partial(cross_entropy, label_smoothing=0.1, reduction='none')"
    assert described(functools.partial(huber, object(), torch.zeros(50))) == \
        "partial(huber, <object>, <Tensor>)"
    assert described(functools.partial(huber, torch.zeros(2))) == \
        "partial(huber, tensor([0., 0.]))"
    assert described(functools.partial(functools.partial, huber)) == "partial(partial, huber)"
    # A task without a custom loss describes (and fingerprints) as before: four fields.
    plain = TaskSpec("size", "regression")
    assert plain.describe() == {"name": "size", "kind": "regression", "num_classes": None,
                                "ignore_index": -1}
    inputs, targets = torch.zeros(3, 2), {"size": torch.zeros(3, 1)}
    a = MultiTaskDataset(inputs, targets, [TaskSpec("size", "regression",
                                                    loss=functools.partial(huber, delta=0.5))])
    b = MultiTaskDataset(inputs, targets, [TaskSpec("size", "regression",
                                                    loss=functools.partial(huber, delta=0.9))])
    assert dataset_fingerprint(a) != dataset_fingerprint(b)


# -- 5. save_benchmark and a custom loss ----------------------------------------------------------------

def test_save_benchmark_refuses_a_custom_loss(tmp_path: Path) -> None:
    """Finding 5: save_benchmark / read_benchmark dropped a task's custom loss without a word;
    the benchmark came back with the kind's loss."""
    from mtunlearn_ext.data import read_benchmark, save_benchmark

    plain = [TaskSpec("kind", "classification", num_classes=2), TaskSpec("size", "regression")]
    custom = [plain[0], TaskSpec("size", "regression", loss=functools.partial(huber, delta=0.5))]
    inputs = torch.randn(8, 3)
    targets = {"kind": torch.randint(0, 2, (8,)), "size": torch.randn(8, 1)}
    path = tmp_path / "bench.pt"
    message = (r"save_benchmark: task 'size' has a custom loss \(partial\(huber, delta=0\.5\)\), "
               r"which a benchmark file cannot store .* give them their loss again after "
               r"read_benchmark")
    with_loss = MultiTaskDataset(inputs, targets, custom)
    with pytest.raises(ValueError, match=message):
        save_benchmark(Benchmark("b", with_loss, with_loss, custom), path)
    without = MultiTaskDataset(inputs, targets, plain)
    with pytest.raises(ValueError, match=message):  # the loss only on a split's tasks
        save_benchmark(Benchmark("b", without, without, plain, validation=with_loss), path)
    assert not path.exists()
    save_benchmark(Benchmark("b", without, without, plain), path)
    back = read_benchmark(path)
    assert back.tasks == plain and torch.equal(back.train.targets["size"], targets["size"])


# -- 6. regression heads sized from the targets -----------------------------------------------------------

def _regression_benchmark(width: int | None) -> Benchmark:
    tasks = [TaskSpec("cls", "classification", num_classes=3), TaskSpec("reg", "regression")]
    g = torch.Generator().manual_seed(0)
    shape = (40,) if width is None else (40, width)
    data = MultiTaskDataset(torch.randn(40, 10, generator=g),
                            {"cls": torch.randint(0, 3, (40,), generator=g),
                             "reg": torch.randn(*shape, generator=g)}, tasks)
    return Benchmark("toy", data, data, tasks, info={"model_config": {"hidden": [16]}})


def test_build_model_sizes_regression_heads_from_the_targets() -> None:
    """Finding 6: every regression head had one output whatever the targets' width; a [N, 2]
    target failed at the first training step with a shape error."""
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.training import TrainConfig, train

    bench = _regression_benchmark(2)
    model = build_model(bench, seed=0)
    head = model.heads["reg"]
    assert isinstance(head, nn.Sequential) and isinstance(head[-1], nn.Linear)
    assert head[-1].out_features == 2
    train(model, bench.train, config=TrainConfig(epochs=1, batch_size=16), progress=False)
    # A one-entry target ([N, 1] or [N]) builds the very model the task list builds (the
    # same layers, the same initial draws): models of one-output benchmarks are unchanged.
    reference = build_model(bench.tasks, input_shape=(10,), seed=0, hidden=(16,)).state_dict()
    for width in (1, None):
        state = build_model(_regression_benchmark(width), seed=0).state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)
    # A task list has no targets: regression_dims sizes a head (default one output).
    listed = build_model(bench.tasks, input_shape=(10,), seed=0, regression_dims={"reg": 2})
    assert listed.heads["reg"][-1].out_features == 2  # type: ignore[index]
    with pytest.raises(ValueError, match=r"`regression_dims\['reg'\]` is 3, but the task's "
                                         r"training targets have 2 entries per row"):
        build_model(bench, regression_dims={"reg": 3})
    with pytest.raises(ValueError, match=r"`regression_dims` names \['cls'\], which are not "
                                         r"regression tasks; the regression tasks are \['reg'\]"):
        build_model(bench.tasks, input_shape=(10,), regression_dims={"cls": 2})
    with pytest.raises(ValueError, match=r"`regression_dims` names \['nope'\]"):
        build_model(bench, regression_dims={"nope": 2})
    empty = MultiTaskDataset(torch.zeros(4, 10), {"cls": torch.zeros(4, dtype=torch.long),
                                                  "reg": torch.zeros(4, 0)}, bench.tasks)
    with pytest.raises(ValueError, match=r"regression task 'reg' has targets of shape \(4, 0\)"):
        build_model(Benchmark("empty", empty, empty, bench.tasks))


# -- the guide's example ------------------------------------------------------------------------------------

def test_the_guides_extension_example_runs(monkeypatch: pytest.MonkeyPatch,
                                           registries_restored: None) -> None:
    """docs/unlearning.md, "Extending the library": the example registers an objective and a
    method and runs them (on a model like the quick start's)."""
    import mtunlearn_ext

    text = DOC.read_text().split("## Extending the library", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)

    torch.manual_seed(0)
    module = types.ModuleType("_ext_points_guide")  # @dataclass looks its module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    module.__dict__.update({
        "mtunlearn_ext": mtunlearn_ext, "model": TwoHeads(), "x": torch.randn(40, 8),
        "y": {"kind": torch.randint(0, 3, (40,)), "size": torch.randn(40, 1)}})
    exec(compile(block, str(DOC), "exec"), module.__dict__)  # noqa: S102
    report = module.extended_report
    assert report.method == "descent_ascent"  # type: ignore[attr-defined]
    assert report.extra["forget_objectives"] == {"kind": "entropy_max"}  # type: ignore[attr-defined]
    assert report.config["steps"] == 10  # type: ignore[attr-defined]


# -- the model a method sees: the user's attributes through the API's wrapper ---------------------

def test_a_method_reaches_the_users_module_attributes_through_the_wrapper(
        registries_restored: None) -> None:
    """unlearn() wraps a user's module (its split named by the caller) before a method sees it.
    The wrapper's own ``heads`` (names) hid the module's ``heads`` (modules), so a method
    written against ``ctx.model.heads[t].parameters()`` failed with "'tuple' object has no
    attribute 'parameters'" inside unlearn. Attributes the wrapper lacks are now the user's
    module's; one that neither has is refused naming both and pointing at ``ctx.groups``."""
    import mtunlearn_ext
    from mtunlearn_ext.unlearning import GradientUnlearner, StepConfig, register_unlearner

    seen: dict[str, object] = {}

    @register_unlearner
    class HeadsOnly(GradientUnlearner):  # steps only the target tasks' heads
        name = "_test_model_heads"
        config_class = StepConfig

        def compute_update(self, ctx, forget_batch, retain_batch):  # type: ignore[no-untyped-def]
            stats = self.weighted_update(ctx, forget_batch, retain_batch)
            keep = {id(p) for t in ctx.problem.target_tasks
                    for p in ctx.model.heads[t].parameters()}
            for p in ctx.model.parameters():
                if id(p) not in keep:
                    p.grad = None
            seen["trunk"] = ctx.model.trunk
            return stats

    torch.manual_seed(0)
    model = TwoHeads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unlearned, _ = mtunlearn_ext.unlearn(
        model, tasks={"kind": "classification", "size": "regression"},
        train_data=(torch.randn(40, 8), {"kind": torch.randint(0, 3, (40,)),
                                         "size": torch.randn(40, 1)}),
        forget_request=mtunlearn_ext.ForgetRequest.create(range(8), ["kind"]),
        shared_parameters=lambda name: name.startswith("trunk."),
        method="_test_model_heads", config={"steps": 3})
    assert isinstance(seen["trunk"], nn.Sequential)
    after = dict(unlearned.named_parameters())
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["heads.kind.bias", "heads.kind.weight"]

    from mtunlearn_ext.api._model_split import SplitModel

    wrapper = SplitModel(model, ["trunk.0.weight", "trunk.0.bias"],
                          {"kind": ["heads.kind.weight", "heads.kind.bias"],
                           "size": ["heads.size.weight", "heads.size.bias"]})
    assert wrapper.heads is model.heads
    with pytest.raises(AttributeError, match=r"neither the unlearning wrapper nor the wrapped "
                                             r"TwoHeads has an attribute 'encoder'.*ctx\.groups"):
        wrapper.encoder  # noqa: B018
    assert not hasattr(wrapper, "__array_interface__")


def test_the_registries_are_read_only_views() -> None:
    """FORGET_OBJECTIVES and UNLEARNERS were plain dicts: a write skipped the registration's
    checks (a malformed class, or a silent replacement of the default ``capped_ascent``).
    Both are read-only views of what the register functions add."""
    from mtunlearn_ext.unlearning.objectives import CappedAscentObjective

    with pytest.raises(TypeError, match="does not support item assignment"):
        FORGET_OBJECTIVES["capped_ascent"] = _EntropyMax  # type: ignore[index]
    with pytest.raises(TypeError, match="does not support item assignment"):
        UNLEARNERS["interference_aware"] = UNLEARNERS["neggrad_plus"]  # type: ignore[index]
    assert FORGET_OBJECTIVES["capped_ascent"] is CappedAscentObjective
    assert UNLEARNERS["interference_aware"].name == "interference_aware"
