"""A user's code as a type checker reads it: checked by ``scripts/typecheck.sh`` (listed in
mypy.ini's ``files``), never run. The package's top-level names are loaded lazily (module
``__getattr__``, typed ``object``), so without the package's ``TYPE_CHECKING`` imports a
user's checker refused ``mtunlearn_ext.unlearn(...)`` as "object not callable"."""

from __future__ import annotations

from pathlib import Path
from typing import Final, assert_type

import numpy as np
import torch
from matplotlib.figure import Figure

import mtunlearn_ext
from mtunlearn_ext import ForgetRequest, TaskSpec
from mtunlearn_ext.api import SavedCheck, SplitModel, TasksSpec
from mtunlearn_ext.data import Benchmark, RequestType, TaskKind, register_benchmark
from mtunlearn_ext.data.base import MultiTaskDataset
from mtunlearn_ext.experiment import ExperimentConfig
from mtunlearn_ext.report import interference_to_json, plot_interference, save_png
from mtunlearn_ext.training import TrainConfig, make_optimizer
from mtunlearn_ext.models import (
    DenseBackbone,
    DenseMultiTaskNet,
    MLPMultiTaskNet,
    MultiTaskModel,
    build_model,
)
from mtunlearn_ext.models.dense import PositiveDepth, UnitNormals
from mtunlearn_ext.metrics import mia_auc
from mtunlearn_ext.surgery import (
    MGDA,
    Aggregator,
    Mean,
    MeanWeighting,
    PCGrad,
    Sum,
    UPGrad,
    UPGradWeighting,
    project_nonconflicting_list,
    project_out_list,
    replicated_surgery,
    sharded_surgery,
)
from mtunlearn_ext.unlearning import (
    EarlierRequest,
    InstanceProjection,
    InterferenceAwareConfig,
    ProtectMode,
    StepOptimizer,
    Unlearner,
    UnlearningProblem,
    UnlearningResult,
)
from mtunlearn_ext.unlearning.base import UnlearningReport
from mtunlearn_ext.unlearning.interference import InterferenceMatrix
from mtunlearn_ext.unlearning.baselines.pcgrad import PCGradConfig
from mtunlearn_ext.unlearning.presets import tuned_settings
from mtunlearn_ext.workflow import checked_unlearner, run_unlearning


class TwoHeads(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kind": x}


def typed_build_info() -> None:
    """build_info's keys are typed (a dict[str, Any] made each value Any)."""
    info: mtunlearn_ext.BuildInfo = mtunlearn_ext.build_info()
    assert_type(info["cuda"], bool)
    assert_type(info.get("threads"), int | None)
    info["cuda_arch"]  # type: ignore[typeddict-item]


def typed_usage(model: torch.nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]) -> None:
    spec = TaskSpec("kind", "classification", num_classes=3)
    assert_type(spec, TaskSpec)
    request = ForgetRequest.create(range(10), ["kind"])
    assert_type(request, ForgetRequest)
    new_model, report = mtunlearn_ext.unlearn(model, tasks=[spec], train_data=(x, y),
                                              forget_request=request)
    assert_type(new_model, torch.nn.Module)
    assert_type(report, UnlearningReport)
    # The report's request facts are typed keys (a dict[str, Any] made every value Any and a
    # misspelt key a KeyError at run time).
    assert_type(report.request["num_forget_instances"], int)
    assert_type(report.request["target_tasks"], list[str])
    assert_type(report.request.get("earlier_requests"), list[EarlierRequest] | None)
    report.request["num_forget"]  # type: ignore[typeddict-item]
    assert_type(mtunlearn_ext.data.MultiTaskDataset, type[MultiTaskDataset])
    mtunlearn_ext.save_unlearned(new_model, report, "unlearned.pt", original=model)
    # The caller's class comes back; torch datasets and loaders are data as unlearn reads them.
    own, _ = mtunlearn_ext.unlearn(TwoHeads(), tasks={"kind": "classification"},
                                   train_data=torch.utils.data.TensorDataset(x),
                                   forget_request=ForgetRequest.create(np.flatnonzero(x > 0)))
    assert_type(own, TwoHeads)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x))
    mtunlearn_ext.evaluate(own, loader, tasks={"kind": "classification"})
    tasks: TasksSpec = {"kind": "classification"}
    check = mtunlearn_ext.verify_saved("unlearned.pt.record.json")
    assert_type(check, SavedCheck)
    if not check:
        raise SystemExit(check.mismatches)
    outs = project_out_list([x], [x])
    assert_type(outs, list[torch.Tensor])
    projected, coeffs = project_nonconflicting_list([x], [x], return_coeffs=True)
    assert_type(coeffs, torch.Tensor)
    del tasks, projected


@register_benchmark("typed_toy")
def build_toy(seed: int, size: str, data_root: str | None) -> Benchmark:
    raise NotImplementedError


def built_toy() -> None:  # an untyped decorator (Any) would make the call Any
    assert_type(build_toy(0, "small", None), Benchmark)


def typed_choices() -> None:
    """A setting's closed choices are ``Literal`` types: a misspelt one is a type error in the
    caller's code (each ``type: ignore`` below is needed, which ``warn_unused_ignores`` checks)
    rather than a ``ValueError`` when the run starts."""
    config = InterferenceAwareConfig(instance_projection="orthogonal", protect="others",
                                     cap_quantile="rank", cap_reference="held_out",
                                     optimizer="adam")
    assert_type(config.instance_projection, InstanceProjection)
    assert_type(config.protect, ProtectMode)
    assert_type(config.optimizer, StepOptimizer)
    InterferenceAwareConfig(instance_projection="orthogonl")  # type: ignore[arg-type]
    InterferenceAwareConfig(protect="some")  # type: ignore[arg-type]
    InterferenceAwareConfig(snapshot_targets="label")  # type: ignore[arg-type]
    InterferenceAwareConfig(instance_rows="instances")  # type: ignore[arg-type]
    InterferenceAwareConfig(cap_reference="heldout")  # type: ignore[arg-type]
    InterferenceAwareConfig(cap_quantile="ranked")  # type: ignore[arg-type]
    InterferenceAwareConfig(optimizer="adamw")  # type: ignore[arg-type]
    PCGradConfig(granularity="tasks")  # type: ignore[arg-type]
    tuned_settings("partial", ["interference_aware"], "memorising")
    tuned_settings("ful", ["interference_aware"])  # type: ignore[arg-type]
    tuned_settings("full", ["interference_aware"], "memorizing")  # type: ignore[arg-type]
    request: Final = "partial"  # (a plain `request = "partial"` would be typed str)
    assert_type(ExperimentConfig(request=request).request, RequestType)
    ExperimentConfig(request="partal")  # type: ignore[arg-type]
    ExperimentConfig(mia_attack="logit")  # type: ignore[arg-type]
    kind: TaskKind = "segmentation"
    TaskSpec("seg", kind, num_classes=3)
    TaskSpec("seg", "segmentaton", num_classes=3)  # type: ignore[arg-type]
    data = (torch.zeros(2, 3), {"kind": torch.zeros(2)})
    mtunlearn_ext.evaluate(TwoHeads(), data, tasks={"kind": "classification"})
    mtunlearn_ext.evaluate(TwoHeads(), data,
                           tasks={"kind": "clasification"})  # type: ignore[dict-item]


def typed_aggregators(jacobian: torch.Tensor) -> None:
    """An aggregator or weighting call is typed (``nn.Module.__call__`` returns ``Any``)."""
    assert_type(UPGrad()(jacobian), torch.Tensor)
    assert_type(MGDA()(jacobian), torch.Tensor)
    assert_type(PCGrad()(jacobian), torch.Tensor)
    assert_type(Mean()(jacobian), torch.Tensor)
    assert_type(Sum()(jacobian), torch.Tensor)
    aggregator: Aggregator = UPGrad()
    assert_type(aggregator(jacobian), torch.Tensor)
    assert_type(aggregator.weighting(jacobian @ jacobian.T), torch.Tensor)
    assert_type(UPGradWeighting()(jacobian @ jacobian.T), torch.Tensor)


def typed_gather(source: torch.utils.data.Dataset[tuple[torch.Tensor, dict[str, int]]]) -> None:
    """``gather`` takes the task forms ``unlearn`` takes, a mapping task -> kind included."""
    kinds: TasksSpec = {"seg": "segmentation"}
    read = mtunlearn_ext.data.gather(source, {"seg": "segmentation", "depth": "depth"})
    assert_type(read, MultiTaskDataset)
    mtunlearn_ext.data.gather(source, kinds)
    mtunlearn_ext.data.gather(source, TaskSpec("seg", "segmentation", num_classes=3))
    mtunlearn_ext.data.gather(source, {"seg": "segmentaton"})  # type: ignore[dict-item]


def typed_models(x: torch.Tensor, module: torch.nn.Module) -> None:
    """A model's call is typed as its forward (``nn.Module.__call__`` returns ``Any``); each
    ``type: ignore`` below is needed, which ``warn_unused_ignores`` checks."""
    spec = TaskSpec("kind", "classification", num_classes=3)
    assert_type(MLPMultiTaskNet([spec])(x), dict[str, torch.Tensor])
    assert_type(DenseMultiTaskNet([spec])(x, ["kind"]), dict[str, torch.Tensor])
    model: MultiTaskModel = build_model([spec], input_shape=[64])
    assert_type(model(x), dict[str, torch.Tensor])
    assert_type(model((x, x), tasks=["kind"]), dict[str, torch.Tensor])  # several inputs
    model(x, [0])  # type: ignore[list-item]
    assert_type(DenseBackbone()(x), torch.Tensor)
    assert_type(PositiveDepth()(x), torch.Tensor)
    assert_type(UnitNormals()(x), torch.Tensor)
    DenseBackbone()(x, ["kind"])  # type: ignore[call-arg]
    wrapper = SplitModel(module, ["trunk.weight"], {"kind": ["head.weight"]})
    assert_type(wrapper({"image": x}), dict[str, torch.Tensor])
    wrapper(x, [0])  # type: ignore[list-item]


def typed_wrapper_keywords(trunk: torch.nn.Module, data: MultiTaskDataset) -> None:
    """The wrappers name the keywords they pass on (they took ``**kwargs: object``, so a
    misspelt or ill-typed keyword passed the caller's type check); each ``type: ignore`` below
    is needed, which ``warn_unused_ignores`` checks."""
    sharded_surgery(trunk.parameters(), UPGrad(), per_layer=[0, 1], num_layers=2)
    sharded_surgery(trunk.parameters(), UPGrad(), per_tsk="backward")  # type: ignore[call-arg]
    replicated_surgery(trunk.parameters(), UPGrad(), head_params=[], check_finite=False)
    replicated_surgery(trunk.parameters(), UPGrad(), per_task="backwards")  # type: ignore[arg-type]
    assert_type(mia_auc(MLPMultiTaskNet([]), data, data, data, attack="logistic"), float)
    mia_auc(MLPMultiTaskNet([]), data, data, data, sed=1)  # type: ignore[call-arg]
    MeanWeighting(3)  # type: ignore[call-arg]


def typed_problem_and_reports(problem: UnlearningProblem, matrix: InterferenceMatrix,
                              figure: Figure) -> None:
    """Where a precise type exists it is given, not ``Any`` (which let every use through);
    each ``type: ignore`` below is needed, which ``warn_unused_ignores`` checks."""
    assert_type(problem.train_config, TrainConfig | None)
    assert_type(checked_unlearner("interference_aware", {}), Unlearner)
    assert_type(run_unlearning(problem, "interference_aware", {}), UnlearningResult)
    interference_to_json(matrix, InterferenceAwareConfig())
    interference_to_json(matrix, {"steps": 3})  # type: ignore[arg-type]
    plot_interference(interference_to_json(matrix), "cosines", "interference.png")
    plot_interference([[1.0]], "cosines", "interference.png")  # type: ignore[arg-type]
    save_png(figure, Path("figure.png"))
    save_png("figure", Path("figure.png"))  # type: ignore[arg-type]
    make_optimizer([{"params": [torch.zeros(1)], "lr": 0.1}], TrainConfig())
    make_optimizer(0.1, TrainConfig())  # type: ignore[arg-type]
