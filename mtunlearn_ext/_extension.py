"""Loading of the compiled extension (``mtunlearn_ext._C``) and the fallback policy.

Importing ``mtunlearn_ext._C`` registers the ``torch.ops.mtunlearn`` operators (its shared
library carries the ``TORCH_LIBRARY`` block). When it is missing, every op in
:mod:`mtunlearn_ext.ops` falls back to its pure-PyTorch reference with a warning, unless the
environment variable ``MTUNLEARN_REQUIRE_EXTENSION=1`` is set, in which case importing the
package fails. Tests and CI set it, so a broken build can never hide behind the fallback.

The CPU kernels pick their instruction set at run time (AVX-512, AVX2 or the x86-64 baseline,
whichever the CPU supports); ``MTUNLEARN_CPU_ISA`` or :func:`set_cpu_isa` can cap it, for
example to compare the variants on one machine (the AVX-512 kernels give the AVX2 kernels'
results bit for bit).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch

from mtunlearn_ext._elf import carries_private_cxx_runtime
from mtunlearn_ext._version import __version__
from mtunlearn_ext._warnings import MtUnlearnRuntimeWarning

_REQUIRE_ENV = "MTUNLEARN_REQUIRE_EXTENSION"
_ISA_ENV = "MTUNLEARN_CPU_ISA"
#: The CPU kernels' instruction sets, lowest first.
CPU_ISAS = ("baseline", "avx2", "avx512")

if os.environ.get(_ISA_ENV, "") not in ("", *CPU_ISAS):
    raise ValueError(f"mtunlearn_ext: {_ISA_ENV} must be one of {', '.join(CPU_ISAS)} (or unset), "
                     f"got {os.environ[_ISA_ENV]!r}")


def private_cxx_runtime_error(library: str) -> str | None:
    """Why the compiled library at ``library`` must not be used, or ``None`` when it may.

    A library that carries its own copy of the C++ runtime (a toolchain that links
    ``libstdc++`` statically into shared objects) computes right, but the first error an op
    raises corrupts its message or crashes the interpreter (:mod:`mtunlearn_ext._elf`).
    """
    if not carries_private_cxx_runtime(library):
        return None
    return (f"{library} does not load torch's C++ runtime (its toolchain links libstdc++ "
            "statically into shared objects), so an error raised by a compiled op would "
            "crash the interpreter. Rebuild it with `python setup.py build_ext --inplace` from "
            "this version's setup.py, which links libstdc++ dynamically and checks that it did")


#: How to build the extension: in a checkout, and as a package (the README's commands).
BUILD_COMMANDS = ("in a checkout `python setup.py build_ext --inplace` (./run.sh and ./test.sh "
                  "run it), as a package `pip install ninja && pip install "
                  "--no-build-isolation .`")


def torch_mismatch(compiled: str, running: str) -> str | None:
    """Why a library compiled against torch ``compiled`` may not run under torch ``running``
    (another major.minor release: torch keeps no C++ ABI from one to the next), or ``None``.
    A wheel built against 2.13.0 loaded under 2.14.1 without a word; whether an op then works
    is luck."""
    def release(version: str) -> list[str]:
        return version.split("+")[0].split(".")[:2]

    # "unknown": csrc/module.cpp's default where the build defined no MTU_TORCH_VERSION.
    if not compiled[:1].isdigit() or release(compiled) == release(running):
        return None
    return (f"the compiled extension was built against torch {compiled} and runs under torch "
            f"{running}; torch keeps no C++ ABI across minor releases, so an op may fail or "
            f"crash. Rebuild it against this torch: {BUILD_COMMANDS}")


def schema_conflict(module: Any) -> str | None:
    """Why the ops of ``module`` (the loaded ``_C``) cannot be used, when another build of them
    (the CMake library, ``torch.ops.load_library("libmtunlearn_ops.so")`` earlier in this
    process) registered ``torch.ops.mtunlearn`` first with other schemas, or ``None``. The
    first build loaded registers the namespace and the second registers nothing (torch aborts a
    process that defines a namespace twice), so the Python layer then calls the first's ops,
    which must take the arguments it passes."""
    registration = getattr(module, "registration", None)
    mismatch = str(registration()["schema_mismatch"]) if registration is not None else ""
    if not mismatch:
        return None
    return ("another build of the mtunlearn ops, loaded earlier in this process (the CMake "
            "library through torch.ops.load_library?), registered torch.ops.mtunlearn with "
            f"other schemas:{mismatch}\nLoad one build of this version (the package alone "
            "carries the ops)")


def _refuse(reason: str, error: BaseException | None) -> None:
    """Fail the import (``MTUNLEARN_REQUIRE_EXTENSION=1``) or warn and fall back. ``reason``
    says what is wrong and how to fix it; ``error``'s own text comes last, as detail."""
    detail = f" (import error: {error})" if error is not None else ""
    if os.environ.get(_REQUIRE_ENV, "") not in ("", "0"):
        raise ImportError(
            f"mtunlearn_ext: {reason}. {_REQUIRE_ENV} is set, so there is no fallback to the "
            f"pure-PyTorch references{detail}"
        ) from error
    warnings.warn(
        f"mtunlearn_ext: {reason}. Falling back to the slow pure-PyTorch reference "
        f"implementations{detail}",
        MtUnlearnRuntimeWarning,
        stacklevel=3,
    )


def load_failure_reason(package_dir: str) -> str:
    """Why ``import mtunlearn_ext._C`` failed, in plain words, with how to build it. (Python
    words a missing submodule of a package that is still being imported as ``cannot import name
    '_C' from partially initialized module ... (most likely due to a circular import)``, which
    sends a reader hunting an import cycle that does not exist.)"""
    import importlib.machinery

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    try:
        built = sorted(name for name in os.listdir(package_dir)
                       if name.startswith("_C.") and name.endswith(suffixes))
    except OSError:
        built = []
    if not built:
        return (f"the compiled extension mtunlearn_ext._C is not built or not installed (no "
                f"_C{suffixes[0]} in {package_dir}); build it: {BUILD_COMMANDS}")
    return (f"the compiled extension {os.path.join(package_dir, built[0])} exists but failed to "
            f"load (built against another torch or Python?); rebuild it: {BUILD_COMMANDS}")


try:
    from mtunlearn_ext import _C  # noqa: F401  (loading it registers torch.ops.mtunlearn)

    _LOAD_ERROR: BaseException | None = None
except ImportError as error:  # pragma: no cover - exercised only without a build
    _C = None
    _reason = load_failure_reason(os.path.dirname(os.path.abspath(__file__)))
    # build_info() reports it: the plain reason first, Python's own words after.
    _LOAD_ERROR = ImportError(f"{_reason} (import error: {error})")
    _refuse(_reason, error)
else:
    _unsafe = private_cxx_runtime_error(str(getattr(_C, "__file__", "")))
    if _unsafe is not None:  # pragma: no cover - only with such a toolchain
        _C = None
        _LOAD_ERROR = RuntimeError(_unsafe)
        _refuse(_unsafe, None)
    elif _schema_mismatch := schema_conflict(_C):
        _C = None
        _LOAD_ERROR = RuntimeError(_schema_mismatch)
        _refuse(_schema_mismatch, None)
    else:
        # Absent from a library built before it was added: nothing to compare then.
        _mismatch = torch_mismatch(str(getattr(_C, "torch_version", torch.__version__)),
                                   torch.__version__)
        if _mismatch is not None:
            warnings.warn(f"mtunlearn_ext: {_mismatch}", MtUnlearnRuntimeWarning, stacklevel=2)


def has_extension() -> bool:
    """Whether the compiled ops are loaded (``torch.ops.mtunlearn`` is available)."""
    return _C is not None


class BuildInfo(TypedDict, total=False):
    """:func:`build_info`'s dict, its keys typed: the first eight come from the compiled
    extension (absent without it, when ``error`` says why it did not load)."""

    torch_version: str  # the torch the extension was compiled against
    cuda: bool
    cuda_archs: str
    openmp: bool
    parallel_backend: str
    threads: int
    compiler: str
    cplusplus: int
    extension: bool
    error: str
    torch_runtime: str  # the torch running now
    threads_runtime: int
    package_version: str  # mtunlearn_ext.__version__, also the installed metadata's version


def build_info() -> BuildInfo:
    """How the extension was built: torch version, CUDA kernels and archs, OpenMP, compiler.

    Returns a dict (:class:`BuildInfo`): the compiled extension's eight keys with
    ``"extension": True``, ``"torch_runtime"``, ``"threads_runtime"`` (torch's intra-op thread
    count now) and ``"package_version"``; with no compiled extension,
    ``{"extension": False, "error": ..., "torch_runtime": ..., "package_version": ...}``.
    """
    if _C is None:
        return {"extension": False, "error": str(_LOAD_ERROR), "torch_runtime": torch.__version__,
                "package_version": __version__}
    info = cast(BuildInfo, dict(_C.build_info()))
    info["extension"] = True
    info["torch_runtime"] = torch.__version__
    info["threads_runtime"] = torch.get_num_threads()
    info["package_version"] = __version__
    return info


def cpu_isa() -> dict[str, str]:
    """The CPU kernels' instruction set: ``{"detected": what this CPU supports, "limit": the
    cap (:func:`set_cpu_isa`, ``MTUNLEARN_CPU_ISA``), "active": the lower of the two}``, each
    one of :data:`CPU_ISAS`. Without the compiled extension every entry is ``"none"``."""
    if _C is None:
        return {"detected": "none", "limit": "none", "active": "none"}
    return dict(_C.cpu_isa())


@dataclass(eq=False)  # identity, not value: two open blocks may hold the same cap
class _OpenCap:
    isa: str


# The cap is one value for the whole process (the kernels of every thread read it), so blocks
# that threads open and close out of order must not each restore what they found: A entering
# (baseline), B entering (avx2), A leaving (restoring avx512), B leaving (restoring baseline)
# left the process capped at baseline for good. Instead the open blocks are kept in the order
# they were entered; the cap is the last one's, and the cap found before the first is
# restored when the last closes. One thread's nested blocks behave exactly as a stack.
_isa_lock = threading.Lock()
_open_caps: list[_OpenCap] = []
_cap_before_blocks = CPU_ISAS[-1]


def _isa_setter(function: str, isa: str) -> Any:
    """The compiled module, after checking ``isa`` and that the module is loaded."""
    if isa not in CPU_ISAS:
        raise ValueError(f"{function}: `isa` must be one of {', '.join(CPU_ISAS)}, got {isa!r}")
    if _C is None:
        raise RuntimeError(f"{function}: the compiled extension is not loaded")
    return _C


def set_cpu_isa(isa: str) -> str:
    """Cap the CPU kernels' instruction set at ``isa`` (one of :data:`CPU_ISAS`; a cap above
    what the CPU supports leaves the CPU's best). Returns the previous cap. The AVX-512 and
    AVX2 kernels give equal results bit for bit; the baseline kernels (no FMA) round
    differently within the ops' tolerances. The cap is process-wide (every thread's calls);
    inside a :func:`cpu_isa_limit` block it lasts until that block closes."""
    compiled = _isa_setter("set_cpu_isa", isa)
    with _isa_lock:
        previous = str(compiled.cpu_isa()["limit"])
        compiled.set_cpu_isa_limit(isa)
        if _open_caps:
            _open_caps[-1].isa = isa
    return previous


@contextlib.contextmanager
def cpu_isa_limit(isa: str) -> Iterator[None]:
    """``with cpu_isa_limit("avx2"): ...`` runs the block with the CPU kernels capped at
    ``isa`` (see :func:`set_cpu_isa`) and restores the previous cap after.

    The cap is process-wide: while blocks of several threads overlap, the kernels of every
    thread run under the cap of the block entered last, and the cap found before the first
    block comes back when the last one closes, in whatever order they close."""
    global _cap_before_blocks
    compiled = _isa_setter("cpu_isa_limit", isa)
    entry = _OpenCap(isa)
    with _isa_lock:
        if not _open_caps:
            _cap_before_blocks = str(compiled.cpu_isa()["limit"])
        _open_caps.append(entry)
        compiled.set_cpu_isa_limit(isa)
    try:
        yield
    finally:
        with _isa_lock:
            _open_caps.remove(entry)
            compiled.set_cpu_isa_limit(_open_caps[-1].isa if _open_caps else _cap_before_blocks)
