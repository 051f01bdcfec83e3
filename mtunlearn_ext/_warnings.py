"""The package's warning categories, and warnings shown at the user's line, however deep in
the package they are raised."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["MtUnlearnRuntimeWarning", "MtUnlearnWarning", "warn_at_caller"]


class MtUnlearnWarning(UserWarning):
    """Every warning of mtunlearn_ext: a request or a setting that runs, but not as the caller
    may think (pairs left out, a check that found a layer no task reaches, a run that changed
    nothing). A ``UserWarning``, so that filters on that go on catching it; its own class, so
    that ``warnings.filterwarnings("error", category=MtUnlearnWarning)`` (or ``"ignore"``)
    reaches this package's warnings and no one else's."""


class MtUnlearnRuntimeWarning(MtUnlearnWarning, RuntimeWarning):
    """A value the package could not use as it was: NaN/Inf losses or metrics, a score's term
    left out as undefined, a cache file that cannot be read or written. Both an
    :class:`MtUnlearnWarning` and a ``RuntimeWarning`` (what these warnings were before)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: torch's decorator wrappers (``@torch.no_grad()`` and the like): a frame of theirs between
#: the package's frames is not the user's line.
_TORCH_WRAPPERS = os.path.join("torch", "utils", "_contextlib.py")


def warn_at_caller(message: str, category: type[MtUnlearnWarning] = MtUnlearnWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside this package: code reached
    both through :func:`mtunlearn_ext.unlearn` and through an unlearner's own ``unlearn``
    lies at different depths, which no fixed ``stacklevel`` fits (Python 3.12's
    ``skip_file_prefixes`` does this; 3.11 has no such argument). The wrappers of torch's
    decorators (``@torch.no_grad()`` on a method of the package) are skipped too."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                        or frame.f_code.co_filename.endswith(_TORCH_WRAPPERS)):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
