"""Multi-task models: a shared backbone, one head per task, an explicit parameter split."""

from mtunlearn_ext.models.base import SHARED, MultiTaskModel, ParameterSplit
from mtunlearn_ext.models.dense import DenseBackbone, DenseMultiTaskNet
from mtunlearn_ext.models.factory import build_model
from mtunlearn_ext.models.mlp import MLPMultiTaskNet

__all__ = ["SHARED", "DenseBackbone", "DenseMultiTaskNet", "MLPMultiTaskNet", "MultiTaskModel",
           "ParameterSplit", "build_model"]
