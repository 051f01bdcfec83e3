"""Build of mtunlearn_ext and its compiled ops (one extension, mtunlearn_ext._C, via ninja).

CUDA kernels are compiled whenever torch is a CUDA build and ``$CUDA_HOME/bin/nvcc`` exists, even
with no GPU attached; otherwise a CPU-only extension is built. Environment overrides:

* ``MTUNLEARN_CUDA=1`` forces CUDA (fails clearly if impossible), ``MTUNLEARN_CUDA=0`` forbids it.
* ``TORCH_CUDA_ARCH_LIST`` is respected; the default covers Ampere and Hopper plus PTX.
* ``MAX_JOBS`` bounds ninja's parallelism (default: the number of CPUs).
* ``CXX`` / ``CC`` choose the compiler as usual. Whatever it is, the extension takes the C++
  runtime from torch's ``libstdc++.so`` (see ``_CXX_RUNTIME_LINK``), and the build fails with
  an explanation if it would not: in a second, from a probe linked the same way before any
  source is compiled, and from the linked library after the build.
* ``MTUNLEARN_METADATA_ONLY=1`` leaves the extension out: only the package metadata and the
  ``mtunlearn`` console script. scripts/setup_env.sh uses it for an editable install on top of
  its incremental ``build_ext --inplace``: a plain editable install recompiles every source in a
  fresh temporary build folder (minutes) and copies the result over the in-place library.
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))

# /usr/local/bin/nvcc is a wrapper script; torch would guess CUDA_HOME=/usr/local and fail to
# link cudart. Point it at the real toolkit before torch.utils.cpp_extension reads it.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ModuleNotFoundError:
    # pip builds a project without pyproject.toml in an isolated environment, where the torch
    # the extension must be built against is absent; so does `python -m build`, which a user
    # told only pip's flag would not know how to turn off.
    sys.exit("mtunlearn_ext: the build needs the torch it will run with, and none is importable "
             "here (pip and `python -m build` build in an isolated environment unless told "
             "not to). Install torch (and ninja) first, then build in the same environment: "
             "`pip install --no-build-isolation .` (or `-e .`), `pip wheel --no-build-isolation "
             ".` or `python -m build --no-isolation` (or ./run.sh / ./test.sh from a checkout).")
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

DEFAULT_ARCHS = "8.0;9.0+PTX"

# Some toolchains link a private libstdc++ into every shared object (a g++ wrapper that adds
# -static-libstdc++: the GPU machine's /opt/gcc/bin/g++). The extension then loads and computes,
# but an error raised by an op (TORCH_CHECK) unwinds with two C++ runtimes in play: its message
# comes out cut short, or the interpreter dies with a segmentation fault (seen on an H200 machine;
# tests/test_build.py reproduces the private copy). Naming the shared runtime right after our
# objects makes the linker take every C++ runtime symbol from it, so the static archive the
# driver appends later has nothing left to supply; by its file name (mtunlearn_ext/_elf.py's
# CXX_RUNTIME_LINK_FLAG says why).

# A shared object that throws a C++ exception: linked the way the extension will be, before its
# sources are compiled, it shows in a second whether the toolchain gives a private runtime.
_PROBE_SOURCE = """#include <stdexcept>
extern "C" int mtunlearn_probe(int x) {
  if (x > 0) throw std::runtime_error("probe");
  return x;
}
"""


def _load_package_file(name: str):  # type: ignore[no-untyped-def]
    """mtunlearn_ext/<name>.py by path: the package itself cannot be imported mid-build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"_mtunlearn{name}", os.path.join(ROOT, "mtunlearn_ext", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _private_runtime_message(linked: str, what: str) -> str:
    """``linked``: what was linked with the private runtime, as a sentence's start."""
    return (
        f"mtunlearn_ext: {linked} with a private copy of the C++ runtime instead "
        f"of torch's libstdc++.so (compiler: {os.environ.get('CXX', 'c++')}); an error raised "
        f"by an op would crash the interpreter, so {what}. Build with a compiler that links "
        "libstdc++ dynamically, e.g. "
        "`CXX=/usr/bin/g++ CC=/usr/bin/gcc python setup.py build_ext --inplace`."
    )


_ELF = _load_package_file("_elf")
_CXX_RUNTIME_LINK = [_ELF.CXX_RUNTIME_LINK_FLAG] if sys.platform.startswith("linux") else []


class _BuildExtension(BuildExtension):
    """torch's BuildExtension between two checks that the library shares torch's C++ runtime:
    a probe linked the same way before the build (a second, where the build takes minutes),
    and the linked library after it."""

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        library = self.get_ext_fullpath(ext.name)
        if self._probe_links_private_runtime(ext):
            sys.exit(_private_runtime_message(
                f"a probe linked the way {library} would be was linked",
                "the build stopped before compiling"))
        super().build_extension(ext)
        if _ELF.carries_private_cxx_runtime(library):
            os.remove(library)
            sys.exit(_private_runtime_message(f"{library} was linked", "the library was removed"))

    def _probe_links_private_runtime(self, ext) -> bool:  # type: ignore[no-untyped-def]
        """Whether _PROBE_SOURCE, compiled by the C++ compiler with the flags torch gives the
        sources (``compiler_so[1:]``: CFLAGS among them) and linked by this command's own linker
        with the extension's link arguments, carries a private C++ runtime.
        False where the probe cannot be built (the build then reports its own errors, and the
        check after it still runs). Its files are removed either way."""
        if not sys.platform.startswith("linux") or self.compiler.compiler_type != "unix":
            return False
        import subprocess
        import sysconfig
        import tempfile

        os.makedirs(self.build_temp, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="runtime_probe", dir=self.build_temp) as workdir:
            source = os.path.join(workdir, "probe.cpp")
            objects = [os.path.join(workdir, "probe.o")]
            library = os.path.join(workdir, "probe" + sysconfig.get_config_var("EXT_SUFFIX"))
            with open(source, "w") as f:
                f.write(_PROBE_SOURCE)
            # The whole command (a launcher such as ccache may come first; setuptools puts
            # CXXFLAGS in it), and the flags torch's ninja build compiles the sources with.
            cxx = list(self.compiler.compiler_cxx or os.environ.get("CXX", "c++").split())
            flags = list(self.compiler.compiler_so[1:])
            try:
                subprocess.run([*cxx, *flags, "-c", "-fPIC", source, "-o", objects[0]],
                               check=True, capture_output=True)
                self.compiler.link_shared_object(objects, library,
                                                 extra_postargs=ext.extra_link_args,
                                                 target_lang="c++")
            except Exception as error:  # noqa: BLE001 - any failure only skips the probe
                print(f"mtunlearn_ext: C++ runtime probe skipped ({type(error).__name__})",
                      flush=True)
                return False
            return bool(_ELF.carries_private_cxx_runtime(library))


def _cuda_wanted() -> bool:
    mode = os.environ.get("MTUNLEARN_CUDA", "auto").strip().lower()
    possible = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        if not possible:
            sys.exit(
                "MTUNLEARN_CUDA=1 but CUDA cannot be built: torch.version.cuda="
                f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
            )
        return True
    return possible


def _metadata_only() -> bool:
    return os.environ.get("MTUNLEARN_METADATA_ONLY", "").strip().lower() in ("1", "true", "yes")


def _extension():  # type: ignore[no-untyped-def]
    with_cuda = _cuda_wanted()
    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "registration.cpp"), os.path.join(csrc, "module.cpp")]
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "*", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(csrc, "ops", "*", "cpu", "*.cpp")))
    torch_version = torch.__version__.split("+")[0]
    define_macros = [("MTU_TORCH_VERSION", f'"{torch.__version__}"')]
    # -g0: Python's own CFLAGS carry -g, which made the library 14x larger (19 MB) for debug
    # information no user of a wheel reads.
    cxx_flags = ["-O3", "-g0", "-ffp-contract=fast", "-fopenmp", "-fvisibility=hidden",
                 "-Wno-psabi"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    archs = ""
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # With no GPU to probe, cpp_extension would crash on an empty arch list.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join(csrc, "ops", "*", "cuda", "*.cu")))
        sources += [os.path.join(csrc, "cuda_host.cpp")]
        define_macros += [("MTU_WITH_CUDA", None), ("MTU_CUDA_ARCHS", f'"{archs}"')]
    print(
        "mtunlearn_ext build configuration:\n"
        f"  torch {torch.__version__} (CUDA build: {torch.version.cuda})\n"
        f"  CUDA kernels: {'yes' if with_cuda else 'no'}"
        + (f" (archs {archs}, CUDA_HOME={CUDA_HOME})" if with_cuda else "")
        + f"\n  sources: {len(sources)} files, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}\n"
        f"  cxx flags: {' '.join(cxx_flags)}",
        flush=True,
    )
    del torch_version
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="mtunlearn_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, csrc, "include")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp", *_CXX_RUNTIME_LINK],
    )


with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as _readme:
    _README = _readme.read()

setup(
    name="mtunlearn_ext",
    version=_load_package_file("_version").__version__,  # mtunlearn_ext.__version__'s
    description="Interference-aware multi-task machine unlearning on compiled gradient-surgery ops",
    # What `pip show` leaves out and a package index shows as the project's page.
    long_description=_README,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mtunlearn_ext", "mtunlearn_ext.*"]),
    package_data={"mtunlearn_ext": ["py.typed"]},
    # What the package imports at run time; the exact pins of a tested set are in
    # requirements.txt (torch 2.11 is the oldest tested: the GPU machine's).
    install_requires=["torch>=2.11", "numpy>=1.26", "scipy>=1.11", "scikit-learn>=1.3",
                      "tqdm>=4.60", "matplotlib>=3.7", "PyYAML>=6.0"],
    ext_modules=[] if _metadata_only() else [_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.11",  # tomllib (--config *.toml)
    entry_points={"console_scripts": ["mtunlearn = mtunlearn_ext.cli:console_main"]},
)
