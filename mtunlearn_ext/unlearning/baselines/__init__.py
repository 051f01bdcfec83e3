"""The baseline unlearning methods; importing this package registers them all."""

from mtunlearn_ext.unlearning.baselines.finetune import FineTune, FineTuneConfig
from mtunlearn_ext.unlearning.baselines.gradient_ascent import GradientAscent, GradientAscentConfig
from mtunlearn_ext.unlearning.baselines.neggrad_plus import NegGradPlus, NegGradPlusConfig
from mtunlearn_ext.unlearning.baselines.orthograd import OrthoGrad, OrthoGradConfig
from mtunlearn_ext.unlearning.baselines.pcgrad import PCGradConfig, PCGradUnlearner
from mtunlearn_ext.unlearning.baselines.random_labels import RandomLabels, RandomLabelsConfig
from mtunlearn_ext.unlearning.baselines.retrain import Retrain, RetrainConfig
from mtunlearn_ext.unlearning.baselines.salun import SalUn, SalUnConfig
from mtunlearn_ext.unlearning.baselines.scrub import SCRUB, SCRUBConfig

BASELINES: tuple[str, ...] = ("retrain", "finetune", "gradient_ascent", "neggrad_plus",
                              "random_labels", "salun", "orthograd", "pcgrad", "scrub")

__all__ = [
    "BASELINES",
    "FineTune",
    "FineTuneConfig",
    "GradientAscent",
    "GradientAscentConfig",
    "NegGradPlus",
    "NegGradPlusConfig",
    "OrthoGrad",
    "OrthoGradConfig",
    "PCGradConfig",
    "PCGradUnlearner",
    "RandomLabels",
    "RandomLabelsConfig",
    "Retrain",
    "RetrainConfig",
    "SCRUB",
    "SCRUBConfig",
    "SalUn",
    "SalUnConfig",
]
