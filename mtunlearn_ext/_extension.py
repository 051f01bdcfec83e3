"""Loading of the compiled extension (``mtunlearn_ext._C``) and the fallback policy.

Importing ``mtunlearn_ext._C`` registers the ``torch.ops.mtunlearn`` operators (its shared
library carries the ``TORCH_LIBRARY`` block). When it is missing, every op in
:mod:`mtunlearn_ext.ops` falls back to its pure-PyTorch reference with a warning, unless the
environment variable ``MTUNLEARN_REQUIRE_EXTENSION=1`` is set, in which case importing the
package fails. Tests and CI set it, so a broken build can never hide behind the fallback.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

_REQUIRE_ENV = "MTUNLEARN_REQUIRE_EXTENSION"

try:
    from mtunlearn_ext import _C  # noqa: F401  (loading it registers torch.ops.mtunlearn)

    _LOAD_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - exercised only without a build
    _C = None
    _LOAD_ERROR = error
    if os.environ.get(_REQUIRE_ENV, "") not in ("", "0"):
        raise ImportError(
            f"mtunlearn_ext: the compiled extension could not be loaded ({error}) and "
            f"{_REQUIRE_ENV} is set; build it with `python setup.py build_ext --inplace`"
        ) from error
    warnings.warn(
        "mtunlearn_ext: compiled extension not found; using the slow pure-PyTorch reference "
        f"implementations ({error}). Build it with `python setup.py build_ext --inplace`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_extension() -> bool:
    """Whether the compiled ops are loaded (``torch.ops.mtunlearn`` is available)."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """How the extension was built: torch version, CUDA kernels and archs, OpenMP, compiler.

    Returns a dict; with no compiled extension, ``{"extension": False, "error": ...}``.
    """
    if _C is None:
        return {"extension": False, "error": str(_LOAD_ERROR), "torch_runtime": torch.__version__}
    info = dict(_C.build_info())
    info["extension"] = True
    info["torch_runtime"] = torch.__version__
    info["threads_runtime"] = torch.get_num_threads()
    return info
