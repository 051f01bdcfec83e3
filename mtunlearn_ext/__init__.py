"""mtunlearn_ext: interference-aware multi-task machine unlearning on fast gradient-surgery ops.

Layers, bottom to top: ``mtunlearn_ext.ops`` (compiled Gram / projection ops) ->
``mtunlearn_ext.surgery`` (projections and aggregators on the ops) -> ``mtunlearn_ext.unlearning``
(the interference-aware method and the baselines); ``data``, ``models`` and ``metrics`` beside
them; the CLI and reports on top.
"""

from typing import TYPE_CHECKING

from mtunlearn_ext._extension import BuildInfo, build_info, has_extension
from mtunlearn_ext._version import __version__
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning, MtUnlearnWarning
from mtunlearn_ext import ops

if TYPE_CHECKING:  # what the lazy names below are, for type checkers (module __getattr__ is
    # typed ``object``: a user's checker refused ``mtunlearn_ext.unlearn(...)`` as not callable)
    from mtunlearn_ext.api import evaluate, save_unlearned, uis_floor, unlearn, verify_saved
    from mtunlearn_ext.data.base import TaskSpec
    from mtunlearn_ext.data.request import ForgetRequest
    from mtunlearn_ext import (api, cli, data, demo, erasure, experiment, lineage, losses,
                               metrics, models, records, report, showcase, surgery, training,
                               tuning, unlearning, workflow)

__all__ = ["BuildInfo", "ForgetRequest", "MtUnlearnRuntimeWarning", "MtUnlearnWarning",
           "TaskSpec", "__version__", "build_info", "evaluate", "has_extension", "ops",
           "save_unlearned", "uis_floor", "unlearn", "verify_saved"]

# The unlearning API pulls in data, models and every method; it is loaded on first use so that
# ``import mtunlearn_ext`` (and ``mtunlearn_ext.ops``) stays as light as before.
_LAZY = {"unlearn": ("mtunlearn_ext.api", "unlearn"),
         "evaluate": ("mtunlearn_ext.api", "evaluate"),
         "save_unlearned": ("mtunlearn_ext.api", "save_unlearned"),
         "uis_floor": ("mtunlearn_ext.api", "uis_floor"),
         "verify_saved": ("mtunlearn_ext.api", "verify_saved"),
         "ForgetRequest": ("mtunlearn_ext.data.request", "ForgetRequest"),
         # The errors about a task's labels advise `TaskSpec(...)`, written as the caller
         # writes `ForgetRequest`.
         "TaskSpec": ("mtunlearn_ext.data.base", "TaskSpec")}

#: The public submodules, imported on first attribute access (PEP 562), so that
#: ``import mtunlearn_ext; mtunlearn_ext.data.TaskSpec`` works as the guides write it, while
#: ``import mtunlearn_ext`` itself loads none of them.
_SUBMODULES = ("api", "cli", "data", "demo", "erasure", "experiment", "lineage", "losses",
               "metrics", "models", "records", "report", "showcase", "surgery", "training",
               "tuning", "unlearning", "workflow")


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        # Importing a submodule binds it as this package's attribute.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'mtunlearn_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
