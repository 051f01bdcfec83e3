"""A multi-layer perceptron with one small MLP head per task, for flat inputs (digits)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.data.base import TaskSpec
from mtunlearn_ext.models.base import MultiTaskModel

__all__ = ["MLPMultiTaskNet"]


def _width(value: object, name: str) -> int:
    """``value`` as a layer width (NumPy's integers too, as a grid of widths gives them).
    ``nn.Linear`` took ``True`` for a width of 1."""
    width = integer_value(value)
    if width is None or width < 1:
        raise ValueError(f"MLPMultiTaskNet: `{name}` must be an int >= 1, got {value!r}")
    return width


def _mlp(sizes: Sequence[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPMultiTaskNet(MultiTaskModel):
    """Shared ``Linear-ReLU`` stack, then per task ``Linear-ReLU-Linear`` to logits/values.

    Each head has a hidden layer of its own, so every task owns a non-trivial parameter block
    (task-aware projections and head-only baselines need something to act on).

    Args:
        tasks: classification, regression or binary specs (a binary task: one logit).
        in_features: input size (64 for 8x8 digits).
        hidden: widths of the shared layers.
        head_hidden: width of each head's hidden layer.
        regression_dims: regression task name -> its target size ``d`` (the head outputs
            ``[B, d]``); a regression task not in it gets one output.
    """

    def __init__(self, tasks: Sequence[TaskSpec], in_features: int = 64,
                 hidden: Sequence[int] = (128, 128), head_hidden: int = 64,
                 regression_dims: Mapping[str, int] | None = None) -> None:
        # len(), not truth: `not hidden` raised for a NumPy array of widths.
        if len(hidden) == 0:
            raise ValueError("MLPMultiTaskNet: `hidden` needs at least one layer width")
        in_features = _width(in_features, "in_features")
        hidden = [_width(h, f"hidden[{i}]") for i, h in enumerate(hidden)]
        head_hidden = _width(head_hidden, "head_hidden")
        dims = dict(regression_dims or {})
        regression = [t.name for t in tasks if t.kind == "regression"]
        unknown = [name for name in dims if name not in regression]
        if unknown:
            raise ValueError(f"MLPMultiTaskNet: `regression_dims` names {unknown}, which are not "
                             f"regression tasks; the regression tasks are {regression}")
        dims = {name: _width(d, f"regression_dims[{name!r}]") for name, d in dims.items()}
        backbone = _mlp([in_features, *hidden], final_activation=True)
        heads: dict[str, nn.Module] = {}
        for t in tasks:
            if t.kind == "classification":
                assert t.num_classes is not None
                out = t.num_classes
            elif t.kind == "regression":
                out = dims.get(t.name, 1)
            elif t.kind == "binary":
                out = 1
            else:
                raise ValueError(f"MLPMultiTaskNet: task {t.name!r} of kind {t.kind} needs a "
                                 "dense model")
            heads[t.name] = _mlp([hidden[-1], head_hidden, out], final_activation=False)
        super().__init__(backbone, heads, tasks)
