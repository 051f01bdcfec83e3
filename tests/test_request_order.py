"""One request, one result: the order its target tasks come in (a list as typed, a set, which
is sorted by name) changes neither the weights nor a byte of what is recorded of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest
from mtunlearn_ext.api import state_dict_sha256
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec

# The data set's order is neither sorted nor reversed sorted, so no form of the names can
# pass for it by chance.
TASKS = {"zone": "classification", "area": "regression", "mass": "regression"}
IN_DATA_ORDER = ["zone", "mass"]
FORMS: dict[str, Any] = {"data order": IN_DATA_ORDER, "reversed": IN_DATA_ORDER[::-1],
                         "set": set(IN_DATA_ORDER), "frozenset": frozenset(IN_DATA_ORDER)}


class _ThreeHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.heads = nn.ModuleDict({"zone": nn.Linear(16, 3), "area": nn.Linear(16, 1),
                                    "mass": nn.Linear(16, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {t: h(z) for t, h in self.heads.items()}


def _data(n: int = 30) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), {"zone": torch.randint(0, 3, (n,), generator=g),
                                            "area": torch.randn(n, 1, generator=g),
                                            "mass": torch.randn(n, 1, generator=g)}


def _common() -> dict[str, Any]:
    return {"tasks": TASKS, "method": "interference_aware", "config": {"steps": 2},
            "shared_parameters": lambda name: name.startswith("trunk.")}


def _saved_record(model: nn.Module, report: Any, folder: Path) -> dict[str, Any]:
    record = mtunlearn_ext.save_unlearned(model, report, folder / "u.pt")
    # What may differ between two runs of one request: when and where it was written, and
    # the wall time.
    for key in ("written_at", "wall_time_s", "checkpoint"):
        record.pop(key)
    return json.loads(json.dumps(record))


@pytest.mark.parametrize("form", list(FORMS))
def test_resolved_tasks_are_in_the_data_sets_order(form: str) -> None:
    x, y = _data()
    data = MultiTaskDataset(x, y, [TaskSpec("zone", "classification", num_classes=3),
                                   TaskSpec("area", "regression"), TaskSpec("mass", "regression")])
    request = ForgetRequest.create([1, 2], FORMS[form])
    assert request.resolved_tasks(data) == IN_DATA_ORDER
    # An unknown name is kept (last) for validate to refuse, not dropped.
    odd = ForgetRequest.create([1], ["mass", "nope", "zone"])
    assert odd.resolved_tasks(data) == ["zone", "mass", "nope"]
    with pytest.raises(KeyError, match="unknown task names \\['nope'\\]"):
        odd.validate(data)


def test_a_request_records_the_same_bytes_whatever_order_its_tasks_come_in(
        tmp_path: Path) -> None:
    records, weights = {}, {}
    for form, tasks in FORMS.items():
        model, report = mtunlearn_ext.unlearn(
            _ThreeHeads(), train_data=_data(),
            forget_request=ForgetRequest.create([3, 1, 2], tasks), **_common())
        assert report.request["target_tasks"] == IN_DATA_ORDER, form
        # A second request on the returned model lists this one among its earlier ones.
        _, chained = mtunlearn_ext.unlearn(model, train_data=_data(),
                                           forget_request=ForgetRequest.create([7], ["area"]),
                                           **_common())
        assert chained.request["earlier_requests"][0]["target_tasks"] == IN_DATA_ORDER, form
        weights[form] = state_dict_sha256(model)
        records[form] = _saved_record(model, report, tmp_path / form.replace(" ", "_"))
    assert len(set(weights.values())) == 1
    assert all(record == records["data order"] for record in records.values())


# Tuple rows are linked by equal inputs only; these forget rows have no retained copy.
@pytest.mark.filterwarnings("ignore:interference_aware. coupled=True")
def test_forget_data_with_its_tasks_in_another_order_is_the_same_request() -> None:
    x, y = _data()
    forget = (x[:3], {t: v[:3] for t, v in y.items()})
    retain = (x[3:], {t: v[3:] for t, v in y.items()})
    reports = [mtunlearn_ext.unlearn(_ThreeHeads(), forget_data=forget, retain_data=retain,
                                     target_tasks=FORMS[form], **_common())[1]
               for form in ("data order", "reversed", "set")]
    assert [r.request["target_tasks"] for r in reports] == [IN_DATA_ORDER] * 3
