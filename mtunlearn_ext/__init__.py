"""mtunlearn_ext: interference-aware multi-task machine unlearning on fast gradient-surgery ops.

Layers, bottom to top: ``mtunlearn_ext.ops`` (compiled Gram / projection ops) ->
``mtunlearn_ext.surgery`` (projections and aggregators on the ops) -> ``mtunlearn_ext.unlearning``
(the interference-aware method and the baselines); ``data``, ``models`` and ``metrics`` beside
them; the CLI and reports on top.
"""

from mtunlearn_ext._extension import build_info, has_extension
from mtunlearn_ext import ops

__version__ = "0.1.0"

__all__ = ["__version__", "build_info", "has_extension", "ops"]
