"""Settings that cannot run on the problem are refused before any work: by
``Unlearner.check_problem`` (called by ``unlearn``), and by ``mtunlearn unlearn`` as bad
``--method-config`` (exit 2, one line, nothing written) instead of a traceback and exit 1
after the input model was measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_cli import ids, trained  # noqa: F401  (trained: a fixture)

from mtunlearn_ext import cli
from mtunlearn_ext.unlearning import get_unlearner
from mtunlearn_ext.unlearning.objectives import objective_names


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    """Every test here runs single-threaded (conftest.one_thread, for this module only)."""


@pytest.mark.parametrize("method", ["interference_aware", "neggrad_plus", "finetune"])
@pytest.mark.parametrize("settings,message", [
    ({"forget_objective": {"nope": "ascent"}}, r"key\(s\) \['nope'\] that are neither a task"),
    ({"steps": 1, "cap_reference": "held_out"}, r"cap_reference='held_out' needs a problem"),
    ({"retain_task_weights": {"nope": 2.0}}, r"`retain_task_weights` names \['nope'\], which "
                                             r"are not tasks of the problem"),
])
def test_unlearn_refuses_settings_the_problem_cannot_meet(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        method: str, settings: dict[str, object], message: str) -> None:
    if "cap_reference" in settings and method != "interference_aware":
        settings = {"steps": 1}  # a setting only the method has: the others run
        expected_code = 0
    else:
        expected_code = 2
    out = tmp_path / "u.pt"
    code = cli.main(["unlearn", "--checkpoint", str(trained), "--forget-ids", ids(1, 2),
                     "--method", method, "--method-config", json.dumps(settings),
                     "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    if expected_code == 2:
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        assert err.startswith(f"mtunlearn: error: --method-config: expected valid settings of "
                              f"'{method}'")
        assert re.search(message, err), err
        assert list(tmp_path.iterdir()) == []  # nothing written


def test_check_problem_is_what_unlearn_refuses_before_any_work(indoor_tiny,  # type: ignore[no-untyped-def]
                                                               indoor_tiny_model) -> None:
    from mtunlearn_ext.data import ForgetRequest
    from mtunlearn_ext.unlearning import UnlearningProblem

    bench = indoor_tiny
    request = ForgetRequest.create(bench.train.ids[:4].tolist(), target_tasks=None)
    forget, retain = request.split(bench.train)
    problem = UnlearningProblem(model=indoor_tiny_model, tasks=list(bench.train.tasks),
                                forget=forget, retain=retain, request=request,
                                target_tasks=list(bench.train.task_names), device="cpu", seed=0)
    capped = get_unlearner("interference_aware", {"steps": 1, "cap_reference": "held_out"})
    with pytest.raises(ValueError, match=r"needs a problem with `held_out` instances "
                       r"\(`held_out_data=` of mtunlearn_ext\.unlearn"):
        capped.check_problem(problem)
    with pytest.raises(ValueError, match=r"needs a problem with `held_out` instances "
                       r"\(`held_out_data=` of mtunlearn_ext\.unlearn"):
        capped.unlearn(problem)
    # Without a capped objective the held-out caps are never measured: the setting is moot.
    get_unlearner("interference_aware", {"steps": 1, "cap_reference": "held_out",
                                         "forget_objective": "ascent"}).check_problem(problem)
    with pytest.raises(ValueError, match=r"key\(s\) \['sgementation'\]"):
        get_unlearner("neggrad_plus", {"forget_objective": {"sgementation": "ascent"}}
                      ).check_problem(problem)
    with pytest.raises(KeyError, match="unknown forget objective 'nope' for task 'segmentation'"):
        objective_names(problem.target_specs(), problem.task_names, {"segmentation": "nope"})
