"""The public API as help() and inspect.signature show it: every name a package ``__all__``
lists exists, has a docstring, and a function or class shows its real parameters, not the
``*args, **kwargs`` of a wrapper (which also hid a misspelt keyword from a user's type
checker)."""

from __future__ import annotations

import importlib
import inspect
import typing

import pytest

import mtunlearn_ext

# ops is imported eagerly, so it is not among the lazily loaded _SUBMODULES: named here.
_PACKAGES = ["mtunlearn_ext", "mtunlearn_ext.ops",
             *(f"mtunlearn_ext.{name}" for name in mtunlearn_ext._SUBMODULES),
             "mtunlearn_ext.unlearning.baselines"]

# Where a variadic parameter is the interface: an unlearner takes its config's fields as
# keyword overrides (checked against the config dataclass when built), a Protocol class has no
# constructor of its own, and a TypedDict's keys are its interface (it is built as a dict).
_VARIADIC_BY_DESIGN = {"overrides"}
_PROTOCOLS = {"mtunlearn_ext.surgery.GradReducer"}


def _public_objects() -> dict[str, object]:
    found = {}
    for package in _PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"{package}.__all__ names {name!r}, which it lacks"
            value = getattr(module, name)
            if inspect.isfunction(value) or inspect.isclass(value):
                found[f"{package}.{name}"] = value
    return found


_PUBLIC = _public_objects()


@pytest.mark.parametrize("name", sorted(_PUBLIC))
def test_a_public_function_or_class_shows_its_real_parameters(name: str) -> None:
    value = _PUBLIC[name]
    assert inspect.getdoc(value), f"{name} has no docstring"
    if (name in _PROTOCOLS or typing.is_typeddict(value)
            or (inspect.isclass(value) and issubclass(value, BaseException))):
        return
    assert callable(value)
    variadic = [parameter.name for parameter in inspect.signature(value).parameters.values()
                if parameter.kind in (inspect.Parameter.VAR_POSITIONAL,
                                      inspect.Parameter.VAR_KEYWORD)
                and parameter.name not in _VARIADIC_BY_DESIGN]
    assert not variadic, f"{name}{inspect.signature(value)} hides its parameters"


def test_the_wrappers_take_the_keywords_of_what_they_wrap() -> None:
    """sharded_surgery / replicated_surgery take GradientSurgery's keywords, and mia_auc
    membership_attack's, by name and with the same defaults."""
    from mtunlearn_ext.metrics import membership_attack, mia_auc
    from mtunlearn_ext.surgery import GradientSurgery

    def keywords(function: object, skip: set[str]) -> dict[str, object]:
        assert callable(function)
        return {p.name: p.default for p in inspect.signature(function).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in skip}

    assert keywords(mia_auc, set()) == keywords(membership_attack, set())
    surgery_keywords = keywords(GradientSurgery, {"reducer"})
    if hasattr(mtunlearn_ext.surgery, "replicated_surgery"):  # torch.distributed available
        from mtunlearn_ext.surgery import replicated_surgery, sharded_surgery

        assert keywords(replicated_surgery, {"group"}) == surgery_keywords
        # None: "backward" for DTensor parameters, else "autograd".
        assert keywords(sharded_surgery, {"group"}) == {**surgery_keywords, "per_task": None}


def _public_callables() -> dict[str, object]:
    """The public functions, and the public methods (``__init__`` and ``__call__`` too) of the
    public classes defined in the package."""
    found: dict[str, object] = {}
    for name, value in _PUBLIC.items():
        if inspect.isfunction(value):
            found[name] = value
        elif inspect.isclass(value) and value.__module__.startswith("mtunlearn_ext"):
            for attribute, member in vars(value).items():
                if attribute.startswith("_") and attribute not in ("__init__", "__call__"):
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member):
                    found[f"{name}.{attribute}"] = member
    return found


def test_every_public_function_and_method_is_annotated() -> None:
    """A user's ``mypy --strict`` refuses a call to an unannotated function ("Call to untyped
    function ... in typed context") and reads its result as Any; the package's own mypy run is
    not strict, so it would not notice one."""
    untyped = []
    for name, function in _public_callables().items():
        if name.startswith(tuple(_PROTOCOLS)):
            continue
        assert callable(function)
        signature = inspect.signature(function)
        bare = [p.name for i, p in enumerate(signature.parameters.values())
                if p.annotation is inspect.Parameter.empty
                and not (i == 0 and p.name in ("self", "cls"))]
        if bare or signature.return_annotation is inspect.Signature.empty:
            untyped.append(f"{name}{signature}")
    assert not untyped, untyped


def _defaults(function: typing.Callable[..., object]) -> dict[str, object]:
    parameters = inspect.signature(function).parameters
    return {name: parameter.default for name, parameter in parameters.items()
            if parameter.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("wrapper, wrapped, names", [
    ("mtunlearn_ext.metrics.membership.mia_auc",
     "mtunlearn_ext.metrics.membership.membership_attack",
     ["tasks", "batch_size", "attack", "max_members", "seed"]),
    ("mtunlearn_ext.surgery.distributed.replicated_surgery",
     "mtunlearn_ext.surgery.GradientSurgery",
     ["head_params", "per_task", "per_layer", "num_layers", "check_finite"]),
    ("mtunlearn_ext.surgery.distributed.sharded_surgery", "mtunlearn_ext.surgery.GradientSurgery",
     ["head_params", "per_layer", "num_layers", "check_finite"]),
])
def test_a_wrapper_that_spells_out_its_callees_keywords_keeps_their_defaults(
        wrapper: str, wrapped: str, names: list[str]) -> None:
    # The wrappers list the keywords they pass on (they took **kwargs): a default changed in
    # the callee alone would silently differ between the two ways of calling it.
    def resolve(dotted: str) -> typing.Callable[..., object]:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)

    ours, theirs = _defaults(resolve(wrapper)), _defaults(resolve(wrapped))
    assert {n: ours.get(n) for n in names} == {n: theirs.get(n) for n in names}
