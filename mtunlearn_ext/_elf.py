"""The shared libraries an ELF shared object asks the dynamic loader for (``DT_NEEDED``).

Why it matters: a C++ error raised by a compiled op (``TORCH_CHECK``) unwinds through the
extension's frames into torch's. Both must use the one C++ runtime that torch loads,
``libstdc++.so.6``. Some toolchains link a private copy of it into every shared object (a
compiler wrapper that adds ``-static-libstdc++``, as on the GPU machine we measure on); the
extension then loads fine and computes right, but the first error it raises corrupts its
message or kills the interpreter with a segmentation fault. Such a build is recognised by the
missing ``libstdc++`` entry among its ``DT_NEEDED`` libraries (torch's ``libc10.so`` has one).

Read with the standard library alone (torch only to find its own ``libc10.so``): ``setup.py``
loads this file by path to check the library it just linked, before the package can be imported
from the build tree, and no ``readelf`` is assumed.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

#: The link argument that gives a shared object torch's C++ runtime, after its objects: the
#: shared library by file name. A plain ``-lstdc++`` takes ``libstdc++.a`` from the first library
#: directory that holds either, and a compiler wrapper whose own directory holds only the
#: archive (the GPU machine's, run 7) then links the private copy all the same. setup.py and
#: CMakeLists.txt link with it (Linux only).
CXX_RUNTIME_LINK_FLAG = "-Wl,-l:libstdc++.so.6"

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5


def needed_libraries(path: str | Path) -> list[str] | None:
    """The ``DT_NEEDED`` entries of the ELF file at ``path`` in order, ``[]`` for a file with
    no dynamic section, or ``None`` when ``path`` is not an ELF file this reader understands.

    Only the headers and the dynamic string table are read (the file is mapped, not loaded)."""
    with open(path, "rb") as file:
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            return None
        with data:
            return _needed(data)


def _needed(data: mmap.mmap) -> list[str] | None:
    if data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return None
    wide = data[4] == 2  # ELFCLASS64
    end = "<" if data[5] == 1 else ">"
    try:
        if wide:
            phoff, = struct.unpack_from(end + "Q", data, 0x20)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
        else:
            phoff, = struct.unpack_from(end + "I", data, 0x1C)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
        loads: list[tuple[int, int, int]] = []  # (vaddr, file offset, file size)
        dynamic: tuple[int, int] | None = None  # (file offset, file size)
        for i in range(phnum):
            at = phoff + i * phentsize
            if wide:
                p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                    end + "IIQQQQ", data, at)
            else:
                p_type, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(end + "IIIII", data,
                                                                            at)
            if p_type == _PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == _PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []
        entry = struct.Struct(end + ("qQ" if wide else "iI"))
        needed: list[int] = []
        strtab_addr = None
        for at in range(dynamic[0], dynamic[0] + dynamic[1] - entry.size + 1, entry.size):
            tag, value = entry.unpack_from(data, at)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                needed.append(value)
            elif tag == _DT_STRTAB:
                strtab_addr = value
        if not needed:
            return []
        if strtab_addr is None:
            return None
        # DT_STRTAB holds a virtual address; the segment that maps it gives its file offset.
        strtab = next((offset + strtab_addr - vaddr for vaddr, offset, size in loads
                       if vaddr <= strtab_addr < vaddr + size), None)
        if strtab is None:
            return None
        names = []
        for name_offset in needed:
            start = strtab + name_offset
            stop = data.find(b"\0", start)
            if stop < 0:
                return None
            names.append(data[start:stop].decode("utf-8", "replace"))
        return names
    except (struct.error, ValueError):
        return None


def cxx_runtime_libraries(path: str | Path) -> set[str] | None:
    """The C++ runtime libraries (``libstdc++*``, ``libc++*``) among the ``DT_NEEDED`` entries of
    the shared object at ``path``; ``None`` when it cannot be told (not an ELF file, or one with
    no dynamic section)."""
    needed = needed_libraries(path)
    if not needed:
        return None
    return {name for name in needed if name.startswith(("libstdc++", "libc++"))}


def shares_cxx_runtime(library: str | Path, reference: str | Path) -> bool | None:
    """Whether ``library`` takes its C++ runtime from a shared library that ``reference`` (torch's
    ``libc10.so``) also loads. ``False`` means it carries a private copy (or uses another
    runtime); ``None``: cannot be told, e.g. when ``reference`` names no shared runtime itself."""
    ours, theirs = cxx_runtime_libraries(library), cxx_runtime_libraries(reference)
    if ours is None or not theirs:
        return None
    return bool(ours & theirs)


def carries_private_cxx_runtime(library: str | Path) -> bool:
    """Whether the shared object at ``library`` does *not* load torch's C++ runtime (the
    ``libstdc++`` that torch's ``libc10.so`` names): ``False`` too where this cannot be told
    (not Linux, no ``libc10.so`` beside torch, not an ELF file). Imports torch, which both
    callers have loaded anyway."""
    import sys

    import torch

    if not sys.platform.startswith("linux") or not Path(library).is_file():
        return False
    torch_library = Path(torch.__file__).parent / "lib" / "libc10.so"
    return torch_library.is_file() and shares_cxx_runtime(library, torch_library) is False
