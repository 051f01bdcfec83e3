"""The built extension shares torch's C++ runtime (mtunlearn_ext/_elf.py says why it must).

On the GPU machine we measure on, ``CXX`` is a g++ wrapper that links libstdc++ statically into
shared objects; the extension built with it crashed the interpreter on the first error an op
raised. setup.py links the shared runtime explicitly (``-Wl,-lstdc++`` after the objects) and
refuses a library that still carries a private copy; importing such a library falls back to the
references. These tests build two tiny shared objects the two ways, with the same flag.
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
from mtunlearn_ext._extension import private_cxx_runtime_error

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
    shared = _shared_object(tmp_path, "shared", ["-Wl,-lstdc++", "-static-libstdc++"])
    assert _elf.cxx_runtime_libraries(shared) == {"libstdc++.so.6"}
    assert _elf.shares_cxx_runtime(shared, TORCH_C10) is True
    assert private_cxx_runtime_error(str(shared)) is None


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
