"""The compiled gradient-surgery ops (``torch.ops.mtunlearn``) with checked Python wrappers.

Layers: Gram matrices / inner products (one pass over the inputs) -> coefficient-space solvers
(tiny ``k x k`` problems, on device) -> combinations (one pass writing the result). The whole-step
ops (:func:`project_out`, :func:`project_nonconflicting`, :func:`pcgrad`) chain the three.
"""

from mtunlearn_ext._extension import CPU_ISAS, cpu_isa, cpu_isa_limit, has_extension, set_cpu_isa
from mtunlearn_ext.ops.combine import combine, combine_list
from mtunlearn_ext.ops.gram import gram, gram_list, gram_list_stacked, inner, inner_list
from mtunlearn_ext.ops.projections import pcgrad, project_nonconflicting, project_out
from mtunlearn_ext.ops.solvers import (
    nonconflicting_dual,
    pcgrad_order,
    pcgrad_weights,
    ridge_solve,
)

if has_extension():
    from mtunlearn_ext.ops import _batching, _registration  # noqa: F401

__all__ = [
    "CPU_ISAS",
    "combine",
    "combine_list",
    "cpu_isa",
    "cpu_isa_limit",
    "gram",
    "gram_list",
    "gram_list_stacked",
    "inner",
    "inner_list",
    "nonconflicting_dual",
    "pcgrad",
    "pcgrad_order",
    "pcgrad_weights",
    "project_nonconflicting",
    "project_out",
    "ridge_solve",
    "set_cpu_isa",
]
