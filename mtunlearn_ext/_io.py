"""Atomic file writes shared by checkpoints, the benchmark cache and result files."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "link_new", "name_max", "sha256_of_file", "temporary_file_beside",
           "write_text_atomic", "write_text_new"]

#: The name limit assumed where the file system does not say (``pathconf`` unsupported).
_DEFAULT_NAME_MAX = 255
#: The random part ``mkstemp`` puts between a temporary file's prefix and suffix.
_RANDOM_CHARS = 8


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def name_max(folder: str | os.PathLike[str]) -> int:
    """The longest file name (in bytes) the file system holding ``folder`` takes
    (``pathconf(folder, "PC_NAME_MAX")``; 255 where it cannot say, or for a missing folder)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder, no pathconf (Windows)
        return _DEFAULT_NAME_MAX
    return limit if limit > 0 else _DEFAULT_NAME_MAX


def _temporary_prefix(name: str, suffix: str, limit: int) -> str:
    """``.{name}.``, with ``name`` cut short where needed so that the temporary file's name
    (prefix, ``mkstemp``'s random part and ``suffix``) fits in ``limit`` bytes: it only has to
    be unique and beside the target, so any legal target name can be written."""
    room = limit - _RANDOM_CHARS - len(os.fsencode(suffix)) - 2  # the two dots
    while name and len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}."


def temporary_file_beside(target: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, path)`` of a new temporary file in ``target``'s folder, to be renamed or linked
    onto ``target``, with the permissions a plain ``open(target, "w")`` would give it
    (``0o666`` less the umask): ``mkstemp`` makes it owner-only, which the finished file would
    keep. Its name is ``.{target name}.XXXXXXXX{suffix}``, the target's name shortened where
    that would exceed the file system's name limit."""
    prefix = _temporary_prefix(target.name, suffix, name_max(target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    try:  # until the caller has (fd, name), no one else can remove the file: do it here
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except OSError:  # file systems without POSIX modes: keep what mkstemp made
            pass
    except BaseException:  # KeyboardInterrupt, a signal turned into an exception, ...
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
        raise
    return fd, name


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link_new(tmp: str | os.PathLike[str], target: Path, exists_message: str) -> None:
    """Put the finished temporary file ``tmp`` at the *new* path ``target``: a hard link, which
    fails atomically if ``target`` appeared meanwhile (``FileExistsError(exists_message)``); on
    a file system without hard links (``os.link`` raising another ``OSError``, e.g. ``EPERM``)
    a check, then a rename. ``tmp`` is left for the caller to remove if it is still there."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(exists_message) from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.lexists(target):  # a dangling symbolic link too: never written through
            raise FileExistsError(exists_message) from None
        os.replace(tmp, target)


def _text_beside(target: Path, text: str) -> str:
    """``text`` in a new temporary file in ``target``'s folder, flushed to disk; its name. The
    file is removed again if the write fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temporary_file_beside(target)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp_name)
        raise
    return tmp_name


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, fsync,
    ``os.replace``): readers see the old file or the whole new one, never a part."""
    target = Path(path)
    tmp_name = _text_beside(target, text)
    try:
        os.replace(tmp_name, target)
        _fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_text_new(path: str | os.PathLike[str], text: str) -> str:
    """Write ``text`` to a *new* file ``path`` atomically; return the file's SHA-256.

    Temporary file in the same directory, fsync, then a hard link onto ``path`` (atomic, and
    failing if ``path`` appeared meanwhile): an existing file is never replaced
    (``FileExistsError``) and a reader never sees a partial file. On a file system without
    hard links the check and a rename take its place.
    """
    target = Path(path)
    if os.path.lexists(target):
        raise FileExistsError(f"{target} exists; refusing to overwrite it")
    tmp_name = _text_beside(target, text)
    try:
        link_new(tmp_name, target, f"{target} exists; refusing to overwrite it")
        _fsync_dir(target.parent)
        return sha256_of_file(target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str], overwrite: bool = False) -> str:
    """``torch.save(obj)`` to ``path`` atomically; returns the file's SHA-256.

    The bytes go to a temporary file in the same directory, which is fsynced and then renamed
    onto ``path`` (``os.replace`` is atomic on POSIX), so a reader sees either no file or the
    whole file, never a partial one. Without ``overwrite`` an existing ``path`` is refused
    (``FileExistsError``); the final step is then a hard link, which fails atomically if another
    writer got there first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    fd, tmp_name = temporary_file_beside(target)
    try:
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as error:
                # A failed write (disk full) raises OSError inside torch.save, whose zip writer
                # then fails again while closing ("unexpected pos ...") and replaces it with
                # that RuntimeError: the OSError is what happened.
                if isinstance(error.__context__, OSError):
                    raise error.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())
        sha = sha256_of_file(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            link_new(tmp, target, f"{target} exists; pass overwrite=True to replace it")
        _fsync_dir(target.parent)
        return sha
    finally:
        Path(tmp_name).unlink(missing_ok=True)
