"""The built extension shares torch's C++ runtime (mtunlearn_ext/_elf.py says why it must).

On the GPU machine we measure on, ``CXX`` is a g++ wrapper that links libstdc++ statically into
shared objects; the extension built with it crashed the interpreter on the first error an op
raised. setup.py links the shared runtime explicitly, by file name after the objects
(``_elf.CXX_RUNTIME_LINK_FLAG``), and refuses a toolchain that still gives a private copy, from
a probe before the build and from the library after it; importing such a library falls back to
the references. These tests build tiny shared objects the ways in question.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtunlearn_ext
from mtunlearn_ext import _elf
from mtunlearn_ext._extension import private_cxx_runtime_error, torch_mismatch

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="ELF shared objects and libstdc++ are Linux's")
TORCH_C10 = Path(torch.__file__).parent / "lib" / "libc10.so"
SOURCE = """
#include <stdexcept>
#include <string>
extern "C" int probe_fails(int x) {
  try {
    if (x > 0) throw std::runtime_error("probe " + std::to_string(x));
  } catch (const std::exception& e) {
    return static_cast<int>(std::string(e.what()).size());
  }
  return 0;
}
"""


def _shared_object(tmp_path: Path, name: str, flags: list[str]) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ on PATH to build the probe shared objects")
    source = tmp_path / "probe.cpp"
    source.write_text(SOURCE)
    out = tmp_path / f"{name}.so"
    # Flags in the order a compiler driver gives them: ours after the objects, the driver's
    # runtime choice (here -static-libstdc++, as the wrapper adds it) last.
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(out), *flags],
                   check=True, capture_output=True)
    return out


@linux_only
def test_the_built_extension_loads_torchs_cxx_runtime() -> None:
    assert mtunlearn_ext.has_extension()
    library = mtunlearn_ext._extension._C.__file__
    needed = _elf.needed_libraries(library)
    assert needed is not None and any(n.startswith("libstdc++") for n in needed), needed
    assert any(n.startswith("libc10") for n in needed), needed
    assert _elf.shares_cxx_runtime(library, TORCH_C10) is True
    assert private_cxx_runtime_error(library) is None


@linux_only
def test_a_private_runtime_is_recognised_and_the_link_flag_prevents_it(tmp_path: Path) -> None:
    private = _shared_object(tmp_path, "private", ["-static-libstdc++"])
    assert _elf.cxx_runtime_libraries(private) == set()
    assert _elf.shares_cxx_runtime(private, TORCH_C10) is False
    message = private_cxx_runtime_error(str(private))
    assert message is not None and "crash the interpreter" in message and str(private) in message
    # setup.py's flag, with the wrapper's -static-libstdc++ still appended by the driver.
    shared = _shared_object(tmp_path, "shared", [_elf.CXX_RUNTIME_LINK_FLAG, "-static-libstdc++"])
    assert _elf.cxx_runtime_libraries(shared) == {"libstdc++.so.6"}
    assert _elf.shares_cxx_runtime(shared, TORCH_C10) is True
    assert private_cxx_runtime_error(str(shared)) is None


def _archive_only_directory(tmp_path: Path) -> Path:
    """A library directory holding only ``libstdc++.a``, as the GPU machine's wrapper's own
    (searched before the system's)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ on PATH")
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True,
                             text=True).stdout.strip()
    if not Path(archive).is_file():
        pytest.skip("no libstdc++.a beside this g++ to put in the wrapper's directory")
    directory = tmp_path / "wrapper-lib"
    directory.mkdir()
    (directory / "libstdc++.a").symlink_to(archive)
    return directory


@linux_only
def test_the_link_flag_names_the_shared_runtime_past_a_directory_holding_only_the_archive(
        tmp_path: Path) -> None:
    """Run 7 on the H200: the library built with the machine's wrapper still carried a private
    runtime with ``-Wl,-lstdc++``, which takes ``libstdc++.a`` from the first library
    directory that has either. A wrapper whose own directory holds only the archive does that
    here; the flag setup.py links with now names the shared runtime by file."""
    wrapper = ["-L", str(_archive_only_directory(tmp_path))]
    old = _shared_object(tmp_path, "old", [*wrapper, "-Wl,-lstdc++", "-static-libstdc++"])
    assert _elf.shares_cxx_runtime(old, TORCH_C10) is False
    new = _shared_object(tmp_path, "new", [*wrapper, _elf.CXX_RUNTIME_LINK_FLAG,
                                           "-static-libstdc++"])
    assert _elf.cxx_runtime_libraries(new) == {"libstdc++.so.6"}
    assert _elf.shares_cxx_runtime(new, TORCH_C10) is True


def _setup_with_compiler(tmp_path: Path, wrapper_body: str, cflags: str = ""
                         ) -> tuple[Path, str]:
    """``setup.py build_ext --inplace`` (CPU only) in a copy of the checkout with ``CXX`` a
    bash wrapper around g++ (and ``CFLAGS``); the copy and the build's output."""
    import os

    if shutil.which("g++") is None:
        pytest.skip("no g++ on PATH for the wrapper")
    wrapper = tmp_path / "wrapper-g++"
    wrapper.write_text("#!/bin/bash\n" + wrapper_body)
    wrapper.chmod(0o755)
    checkout = Path(__file__).resolve().parents[1]
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("setup.py", "README.md", "csrc", "mtunlearn_ext"):  # README: the description
        source = checkout / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns(
                "_C*.so", "__pycache__"))
        else:
            shutil.copy(source, copy / name)
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                         env={**os.environ, "CXX": str(wrapper), "CFLAGS": cflags,
                              "MTUNLEARN_CUDA": "0"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, "the wrappers here never let a build finish"
    return copy, run.stdout + run.stderr


@linux_only
def test_setup_refuses_a_private_runtime_before_compiling(tmp_path: Path) -> None:
    """A toolchain that gives a private runtime whatever the flags (this wrapper drops them)
    is refused by a probe linked before the build, in seconds: the check after the build cost
    the H200's lease 97 s of compiling first (run 7)."""
    copy, output = _setup_with_compiler(
        tmp_path, 'args=()\nfor a in "$@"; do case "$a" in *libstdc++*) ;; '
                  '*) args+=("$a");; esac; done\nexec g++ "${args[@]}" -static-libstdc++\n')
    assert "private copy of the C++ runtime" in output and "before compiling" in output, \
        output[-2000:]
    # No source was compiled, and the probe's files are gone with it.
    assert list(copy.rglob("*.o")) == [] and list(copy.rglob("probe*")) == []


@linux_only
def test_the_probe_is_compiled_with_the_sources_flags(tmp_path: Path) -> None:
    """The probe compiles with the flags torch's ninja build gives the sources (``CFLAGS``
    among them: setuptools' ``compiler_so``), not the bare compiler: a flag the sources get
    and the probe lacked would test another toolchain than the build's."""
    log = tmp_path / "probe-commands"
    _, output = _setup_with_compiler(
        tmp_path, f'case "$*" in *probe.cpp*) echo "$*" >> {log};; esac\n'
                  'echo "wrapper: stop" >&2; exit 1\n', cflags="-DMTU_FROM_CFLAGS=1")
    assert "probe skipped" in output, output[-2000:]
    assert "-DMTU_FROM_CFLAGS=1" in log.read_text(), log.read_text()


@linux_only
def test_setup_links_past_a_wrapper_directory_holding_only_the_archive(tmp_path: Path) -> None:
    """setup.py's own link, through its probe, with a wrapper like the GPU machine's: its
    library directory first, holding only libstdc++.a, and -static-libstdc++ appended. The probe
    passes (with ``-Wl,-lstdc++`` it was refused); the wrapper then stops the build at its first
    source, so that the test takes seconds."""
    directory = _archive_only_directory(tmp_path)
    _, output = _setup_with_compiler(
        tmp_path, 'case "$*" in *probe*) ;; *) echo "wrapper: stop after the probe" >&2; '
                  f'exit 1;; esac\nexec g++ -L{directory} "$@" -static-libstdc++\n')
    assert "private copy of the C++ runtime" not in output, output[-2000:]
    assert "probe skipped" not in output and "wrapper: stop after the probe" in output, \
        output[-2000:]


def test_needed_libraries_of_files_that_are_not_shared_objects(tmp_path: Path) -> None:
    text = tmp_path / "setup.txt"
    text.write_text("not an ELF file")
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.so"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9)
    assert _elf.needed_libraries(text) is None
    assert _elf.needed_libraries(empty) is None
    assert _elf.needed_libraries(truncated) is None
    assert _elf.cxx_runtime_libraries(text) is None
    assert _elf.shares_cxx_runtime(text, TORCH_C10) is None


# Run in a fresh interpreter with only the copy importable: an editable install's finder (this
# checkout's .venv has one) would map mtunlearn_ext._C to the checkout's library.
_IMPORT_THE_COPY = """
import sys, warnings
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
warnings.simplefilter("always")
import mtunlearn_ext
print("extension:", mtunlearn_ext.has_extension())
print("build_info error:", mtunlearn_ext.build_info().get("error"))
"""


def _import_copy_without_library(tmp_path: Path, require: bool, library: bytes | None
                                  ) -> subprocess.CompletedProcess[str]:
    """Import a copy of the package whose compiled library is missing (``library`` None) or is
    the given bytes (a file that is there but cannot load)."""
    import importlib.machinery
    import os

    package = Path(mtunlearn_ext.__file__).parent
    copy = tmp_path / "site" / "mtunlearn_ext"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    if library is not None:
        (copy / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(library)
    env = {**os.environ, "PYTHONPATH": str(copy.parent),
           "MTUNLEARN_REQUIRE_EXTENSION": "1" if require else "0"}
    return subprocess.run([sys.executable, "-c", _IMPORT_THE_COPY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@linux_only
@pytest.mark.parametrize("require", [True, False], ids=["required", "fallback"])
def test_a_missing_library_is_called_not_built_not_a_circular_import(tmp_path: Path,
                                                                      require: bool) -> None:
    """Python words the missing submodule as ``cannot import name '_C' from partially
    initialized module 'mtunlearn_ext' (most likely due to a circular import)``; the message
    led with it, sending users hunting an import cycle."""
    run = _import_copy_without_library(tmp_path, require, None)
    output = run.stdout + run.stderr
    lead = "mtunlearn_ext: the compiled extension mtunlearn_ext._C is not built or not installed"
    build = "python setup.py build_ext --inplace"
    if require:
        assert run.returncode != 0
        message = output.strip().splitlines()[-1]
        assert message.startswith(f"ImportError: {lead}"), message
    else:
        assert run.returncode == 0, output
        assert "extension: False" in output
        message = next(line for line in output.splitlines() if "RuntimeWarning" in line)
        assert f"RuntimeWarning: {lead}" in message
        error = next(line for line in output.splitlines() if line.startswith("build_info error"))
        assert error.startswith(f"build_info error: {lead[len('mtunlearn_ext: '):]}"), error
    # How to build it, then Python's own words as detail, last.
    assert build in message and "pip install --no-build-isolation ." in message
    assert message.index(build) < message.index("(import error: cannot import name '_C'")


@linux_only
def test_a_library_that_fails_to_load_is_called_so(tmp_path: Path) -> None:
    run = _import_copy_without_library(tmp_path, True, b"not a shared object")
    message = (run.stdout + run.stderr).strip().splitlines()[-1]
    assert run.returncode != 0
    assert "exists but failed to load (built against another torch or Python?)" in message
    assert "rebuild it: in a checkout `python setup.py build_ext --inplace`" in message
    # The loader's own words ("file too short", "invalid ELF header", ...) last, as detail.
    assert message.index("rebuild it") < message.index("(import error: "), message


@pytest.mark.parametrize(("compiled", "running", "warned"), [
    ("2.13.0+cpu", "2.14.1+cu130", True), ("2.14.1", "3.14.1", True),
    ("2.14.0", "2.14.1+cu130", False),  # a patch release keeps the ABI; the local tag is no ABI
    ("2.14.1+cu130", "2.14.1+cpu", False), ("unknown", "2.14.1", False)])
def test_torch_releases_that_do_not_share_an_abi(compiled: str, running: str,
                                                 warned: bool) -> None:
    message = torch_mismatch(compiled, running)
    assert (message is not None) == warned
    if message is not None:
        assert f"built against torch {compiled} and runs under torch {running}" in message
        assert "pip install --no-build-isolation ." in message


def test_a_library_built_against_another_torch_release_warns_at_import() -> None:
    """A wheel built against torch 2.13.0 loaded under 2.14.1 without a word (gram even ran):
    torch keeps no C++ ABI across minor releases, so the next op might not. The library names
    the torch it was compiled against; this run pretends torch is another release."""
    import os

    assert mtunlearn_ext._extension._C.torch_version == mtunlearn_ext.build_info()[
        "torch_version"]
    script = ("import warnings; warnings.simplefilter('always'); import torch; "
              "torch.__version__ = '9.9.0'; import mtunlearn_ext")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MTUNLEARN_REQUIRE_EXTENSION": "1"})
    assert run.returncode == 0, run.stderr
    built = mtunlearn_ext.build_info()["torch_version"]
    assert f"built against torch {built} and runs under torch 9.9.0" in run.stderr, run.stderr


def test_ops_registered_first_by_another_build_are_used_or_refused_by_their_schemas() -> None:
    """C++ user audit: the CMake library and this package each carry the ops, and loading both
    into one process aborted it (torch's "Only a single TORCH_LIBRARY can be used to register
    the namespace mtunlearn", thrown from a static initialiser). Now the build loaded first
    registers and the other registers nothing; the package uses the first one's ops when their
    schemas are its own, and refuses them (falls back, or fails the import under
    MTUNLEARN_REQUIRE_EXTENSION) naming each op that differs. Here the first build is a Python
    definition of the namespace, the same or with another `gram`."""
    import os

    assert mtunlearn_ext._extension._C.registration() == {"owner": True, "schema_mismatch": ""}
    first = ("import torch; lib = torch.library.Library('mtunlearn', 'DEF'); "
             "lib.define('gram(Tensor x{extra}) -> Tensor'); "
             "lib.impl('gram', lambda x: x @ x.T, 'CPU'); "
             "import mtunlearn_ext; from mtunlearn_ext import _extension; "
             "print(mtunlearn_ext.has_extension(), _extension._C and "
             "_extension._C.registration()); ")
    env = {**os.environ, "MTUNLEARN_REQUIRE_EXTENSION": "1"}
    # Another gram: the import fails and says which op differs, and how.
    run = subprocess.run([sys.executable, "-c", first.format(extra=", int extra")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1 and "Traceback" in run.stderr, run.stderr
    assert ("\nImportError: mtunlearn_ext: another build of the mtunlearn ops, loaded earlier "
            "in this process") in run.stderr, run.stderr
    assert ("mtunlearn::gram: this build defines mtunlearn::gram(Tensor x) -> Tensor, the loaded "
            "one mtunlearn::gram(Tensor x, int extra) -> Tensor") in run.stderr, run.stderr
    # The same gram: this build's ops are the first's (no abort, no second registration).
    run = subprocess.run([sys.executable, "-c", first.format(extra="")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 1, run.stderr  # the first build defines no other op
    assert "mtunlearn::inner: this build defines" in run.stderr, run.stderr
    assert "mtunlearn::gram:" not in run.stderr, run.stderr
