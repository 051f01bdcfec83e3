"""``mtunlearn_ext.unlearn``: unlearn a request on your own multi-task model and data.

One call wraps everything the registry's methods need: the split of the model's parameters into
a shared trunk and per-task heads, the forget / retain data in the project's data contract
(:class:`~mtunlearn_ext.data.MultiTaskDataset` with a supervision mask), the problem, and the
method (the interference-aware unlearner by default, or any registered baseline). The input
model is never modified; a new one is returned with a report.

The package, one concept per module (private; what is public is imported here):

- ``_types``: the argument types (:data:`DataLike`, how parameters are named);
- ``_entry``: which public function's checks are running (the name their messages start with);
- ``_model_split``: the shared/heads split of the caller's module and the wrapper methods call;
- ``_task_specs``: what the model predicts, for the class counts of ``tasks`` given by kind
  (the task forms themselves are :mod:`mtunlearn_ext.data.task_forms`', which ``gather``
  reads too);
- ``_data_forms``: the caller's tuples, datasets and loaders in the data contract, checked;
- ``_instance_matching``: which rows are one instance where ids cannot say (data as tuples);
- ``_lineage``: chains of removals (``earlier_requests``, what a returned model carries);
- ``_problem``: :func:`build_problem`, the checked problem the methods run;
- ``_unlearn``: :func:`unlearn`, the run and its report;
- ``_saving``: :func:`save_unlearned` and :func:`verify_saved`, the audit trail;
- ``_evaluation``: :func:`evaluate` and :func:`uis_floor` on the caller's model and data.
"""

from __future__ import annotations

from mtunlearn_ext.api._evaluation import UISTasks, evaluate, uis_floor
from mtunlearn_ext.api._lineage import Lineage
from mtunlearn_ext.api._model_split import SplitModel
from mtunlearn_ext.api._problem import build_problem
from mtunlearn_ext.api._saving import API_RECORD_SCHEMA, SavedCheck, save_unlearned, verify_saved
from mtunlearn_ext.api._types import DataLike, InMemoryData, ParameterSpec, SharedSpec, TasksSpec
from mtunlearn_ext.api._unlearn import unlearn
from mtunlearn_ext.training import state_dict_sha256

__all__ = ["API_RECORD_SCHEMA", "DataLike", "InMemoryData", "ParameterSpec", "SavedCheck",
           "SharedSpec", "SplitModel", "TasksSpec", "UISTasks", "build_problem", "evaluate",
           "save_unlearned", "state_dict_sha256", "uis_floor", "unlearn", "verify_saved"]

# The names these classes had when the API was one module: a model pickled then (a returned
# module carries its Lineage; a problem's model is a SplitModel) is found by them.
_Lineage = Lineage
_SplitModel = SplitModel
