"""What the library says: every warning is of the package's own category (a user's filter or a
test suite's ``"error"`` reaches it and nothing else), at the caller's line."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest, MtUnlearnRuntimeWarning, MtUnlearnWarning
from mtunlearn_ext.metrics import uis
from mtunlearn_ext.surgery import GradientSurgery, UPGrad
from test_api_validation import TASKS, _TwoHeads  # the two-task toy model of the API tests

PACKAGE = Path(mtunlearn_ext.__file__).parent
OWN_CATEGORIES = {"MtUnlearnWarning", "MtUnlearnRuntimeWarning"}


def _category_given(call: ast.Call) -> str | None:
    """The category a ``warnings.warn``/``warn_at_caller`` call names (its second argument or
    ``category=``), ``None`` where it names none."""
    given = call.args[1] if len(call.args) > 1 else next(
        (k.value for k in call.keywords if k.arg == "category"), None)
    if given is None:
        return None
    return given.id if isinstance(given, ast.Name) else ast.unparse(given)


def test_every_warning_of_the_package_is_of_its_own_category() -> None:
    """Warnings were plain UserWarning or RuntimeWarning: a user could not silence (or turn
    into errors) this package's warnings alone, without torch's and numpy's."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_warnings.py":  # warn_at_caller passes its caller's category on
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "warnings.warn":
                category = _category_given(node)
            elif name == "warn_at_caller":  # MtUnlearnWarning unless given
                category = _category_given(node) or "MtUnlearnWarning"
            else:
                continue
            if category not in OWN_CATEGORIES:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {category}")
    assert offenders == []


def test_the_categories_extend_the_standard_ones() -> None:
    """Filters written for the standard categories keep catching the package's warnings."""
    assert issubclass(MtUnlearnWarning, UserWarning)
    assert issubclass(MtUnlearnRuntimeWarning, MtUnlearnWarning)
    assert issubclass(MtUnlearnRuntimeWarning, RuntimeWarning)


def _unlearn_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = {"a": torch.randint(0, 3, (40,), generator=g), "b": torch.randn(40, 1, generator=g)}
    mtunlearn_ext.unlearn(_TwoHeads(features=6), tasks=TASKS,
                          train_data=(x, y), forget_request=ForgetRequest.create(range(5)),
                          shared_parameters=lambda name: name.startswith("trunk."),
                          config={"steps": 0})


def test_an_unlearn_warning_is_the_packages_and_a_test_suite_can_make_it_an_error() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _unlearn_nothing()
    said = [w for w in caught if "left the weights exactly as they were" in str(w.message)]
    assert [(w.category, w.filename) for w in said] == [(MtUnlearnWarning, __file__)]
    # The returned model is a new module (never the caller's): the warning said "is the input
    # model" (review).
    assert "the returned model (a copy) holds the input model's weights" in str(said[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MtUnlearnWarning)
        with pytest.raises(MtUnlearnWarning, match="left the weights exactly as they were"):
            _unlearn_nothing()


def test_a_uis_term_left_out_is_warned_of_at_the_callers_line() -> None:
    """uis() runs uis_terms(), whose warning's stacklevel=2 pointed at uis() itself
    (mtunlearn_ext/metrics/scores.py), not at the line calling uis()."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uis({"a": {"accuracy": 0.0, "miou": 0.5}}, {"a": {"accuracy": 0.1, "miou": 0.4}},
            {"a": {"accuracy": 0.1, "miou": 0.3}})
    assert [(w.category, w.filename) for w in caught] == [(MtUnlearnRuntimeWarning, __file__)]


def test_a_surgery_reaching_no_shared_parameter_warns_once_at_the_callers_line() -> None:
    """The warning came at every step: 1000 lines over a 1000-step loop wherever warnings are
    not deduplicated (``simplefilter("always")``, ``python -W always``)."""
    trunk, head = nn.Linear(4, 8), nn.Linear(8, 1)
    surgery = GradientSurgery(trunk.named_parameters(), UPGrad())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(50):
            features = trunk(torch.randn(16, 4)).detach()  # the trunk gets no gradient
            surgery.backward([head(features).mean(), head(features).pow(2).mean()])
    assert [(w.category, w.filename) for w in caught] == [(MtUnlearnWarning, __file__)]
    assert "no task's loss reached any of the 2 shared parameters" in str(caught[0].message)
    # A surgery built again (the remedy the warning gives) says it again.
    with pytest.warns(MtUnlearnWarning, match="no task's loss reached"):
        GradientSurgery(trunk.named_parameters(), UPGrad()).backward(
            [head(trunk(torch.randn(16, 4)).detach()).mean()])
