"""Atomic file writes shared by checkpoints, records, the benchmark cache and result files, and
the plain-JSON form of what they hold."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "interrupts_held", "json_safe", "link_new", "name_max",
           "new_temporary_beside", "path_max", "Placement", "placements", "remove_if_placed",
           "json_sha256", "sha256_of_file", "temporary_file_beside", "tensor_bytes",
           "write_json_new", "write_text_atomic", "write_text_new"]

#: The name limit assumed where the file system does not say (``pathconf`` unsupported).
_DEFAULT_NAME_MAX = 255
#: The path limit assumed where the system does not say.
_DEFAULT_PATH_MAX = 4096
#: The random part ``mkstemp`` puts between a temporary file's prefix and suffix.
_RANDOM_CHARS = 8


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_sha256(payload: Any) -> str:
    """SHA-256 hex digest of ``payload`` as JSON with sorted keys (anything JSON cannot hold
    as its ``str``): a digest of plain data that does not depend on dict order."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def tensor_bytes(value: torch.Tensor) -> bytes:
    """The raw bytes of a (strided) tensor's values, in row-major order, on the CPU."""
    # reshape(-1): a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes;
    # for every other tensor the bytes are the same.
    flat = value.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


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


def path_max(folder: str | os.PathLike[str]) -> int:
    """The longest path (in bytes) the system takes for a file under ``folder``
    (``pathconf(folder, "PC_PATH_MAX")``; 4096, Linux's, where it cannot say)."""
    try:
        limit = os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no such folder, no pathconf (Windows)
        return _DEFAULT_PATH_MAX
    return limit if limit > 0 else _DEFAULT_PATH_MAX


def _temporary_prefix(name: str, suffix: str, limit: int) -> str:
    """``.{name}.``, with ``name`` cut short where needed so that the temporary file's name
    (prefix, ``mkstemp``'s random part and ``suffix``) fits in ``limit`` bytes: it only has to
    be unique and beside the target, so any legal target name can be written."""
    room = limit - _RANDOM_CHARS - len(os.fsencode(suffix)) - 2  # the two dots
    while name and len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}."


class _HeldInterrupts:
    """SIGINT and SIGTERM held back while the block runs, then handled as they would have been.

    Python runs a signal's handler (the ``KeyboardInterrupt`` of Ctrl-C, the command line's
    SIGTERM exception) between any two bytecodes of the main thread, so one arriving inside
    ``mkstemp``, after it created the file and before its caller has the name, left an empty
    temporary file that nothing could remove. Inside the block the handlers only note the
    signal; leaving the block puts the previous handlers back and calls them for the signals
    that came (a default action is taken by sending the signal again), so the exception is
    raised once the block's work, the creation and the registration of a file, is complete.
    Handlers can only be replaced in the main thread: elsewhere (where no handler raises) the
    block runs as it is.
    """

    _SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                     if s is not None)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: list[int] = []

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def __enter__(self) -> _HeldInterrupts:
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            for signum in self._SIGNALS:
                current = signal.getsignal(signum)
                if current is None:  # set outside Python: it could not be put back
                    continue
                self.previous[signum] = current  # first: the swap below may be cut short
                try:
                    signal.signal(signum, self._note)
                except (OSError, ValueError):  # pragma: no cover - no handlers here
                    del self.previous[signum]
        except BaseException:
            # A signal that came before the hold was complete ran its own handler (between
            # the two swaps, or in ``signal.signal``'s check for pending signals) and raised:
            # ``with`` calls no __exit__ then, and SIGINT kept this hold's note-taker for good,
            # every later Ctrl-C of the process swallowed.
            self._put_back()
            raise
        return self

    def _put_back(self) -> None:
        """The previous handlers back, every one of them. A signal's handler can run between
        any two bytecodes and inside ``signal.signal`` (which handles pending signals before
        it changes one); one that raises cut the swaps short and left a note-taker installed.
        The swaps are made again until all are done, then the first exception is raised."""
        raised: BaseException | None = None
        remaining = list(self.previous.items())
        while remaining:
            try:
                while remaining:
                    signum, handler = remaining[0]
                    try:
                        signal.signal(signum, handler)
                    except (OSError, ValueError):  # pragma: no cover - no handlers here
                        pass
                    remaining.pop(0)
            except BaseException as error:  # a pending signal's handler: swap again
                raised = raised or error
        if raised is not None:
            raise raised

    def __exit__(self, *exc: object) -> None:
        self._put_back()
        for signum in dict.fromkeys(self.pending):
            handler = self.previous.get(signum)
            if callable(handler):
                handler(signum, None)  # raises KeyboardInterrupt / the command's exception
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)  # the default action (termination)


def interrupts_held() -> _HeldInterrupts:
    """A context manager holding SIGINT / SIGTERM back while its block runs
    (:class:`_HeldInterrupts`): one that arrives meanwhile is handled when the block ends."""
    return _HeldInterrupts()


def temporary_file_beside(target: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, path)`` of a new temporary file in ``target``'s folder, to be renamed or linked
    onto ``target``, with the permissions a plain ``open(target, "w")`` would give it
    (``0o666`` less the umask): ``mkstemp`` makes it owner-only, which the finished file would
    keep. Its name is ``.{target name}.XXXXXXXX{suffix}``, the target's name shortened where
    that would exceed the file system's name limit. An interrupt (SIGINT / SIGTERM) arriving
    while the file is created is handled once ``(fd, path)`` are known, and the file is then
    removed; callers that must never leave the file behind create it with
    :func:`new_temporary_beside`, which also covers the moment the caller takes the name."""
    prefix = _temporary_prefix(target.name, suffix, name_max(target.parent))
    name: str | None = None
    try:
        with interrupts_held():  # mkstemp's creation and our knowing the name: one step
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
            try:
                os.fchmod(fd, 0o666 & ~_umask())
            except OSError:  # file systems without POSIX modes: keep what mkstemp made
                pass
    except BaseException:  # KeyboardInterrupt, a signal turned into an exception, ...
        if name is not None:  # until the caller has (fd, name), no one else can remove it
            os.close(fd)
            try:
                os.unlink(name)
            except OSError:
                pass
        raise
    return fd, name


@contextmanager
def new_temporary_beside(target: Path, suffix: str = ".tmp") -> Iterator[tuple[int, str]]:
    """``(fd, path)`` of a new temporary file beside ``target`` (:func:`temporary_file_beside`)
    for the block, removed when the block ends if it is still there (renamed or linked onto
    ``target``, it is gone or a second name of the target). The file is created, and its name
    known to this clean-up, with interrupts held (:func:`interrupts_held`), so an interrupt at
    any point leaves no temporary file. The block owns ``fd`` (closes it, e.g. by
    ``os.fdopen``)."""
    name: str | None = None
    try:
        with interrupts_held():
            fd, name = temporary_file_beside(target, suffix)
        yield fd, name
    finally:
        if name is not None:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


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


#: What :func:`link_new` notes of a file it puts in place: its ``(st_dev, st_ino)`` and, where
#: the writer gave it, its SHA-256.
Placement = tuple[int, int, str | None]

#: Where :func:`link_new` notes the files it puts in place (absolute path -> its
#: :data:`Placement`): the ``placements`` block of the caller's transaction, if any. A
#: context variable, not one table for the process: two transactions of one process (two
#: threads of a service) writing the same name must each know only their own files.
_PLACING: ContextVar[dict[str, Placement] | None] = ContextVar("_PLACING", default=None)


@contextmanager
def placements(into: dict[str, Placement]) -> Iterator[None]:
    """Inside, :func:`link_new` notes each file it puts in place into ``into``, for
    :func:`remove_if_placed`."""
    token = _PLACING.set(into)
    try:
        yield
    finally:
        _PLACING.reset(token)


def _identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    status = os.lstat(path)
    return status.st_dev, status.st_ino


def link_new(tmp: str | os.PathLike[str], target: Path, exists_message: str,
             sha256: str | None = None) -> None:
    """Put the finished temporary file ``tmp`` at the *new* path ``target``: a hard link, which
    fails atomically if ``target`` appeared meanwhile (``FileExistsError(exists_message)``); on
    a file system without hard links (``os.link`` raising another ``OSError``, e.g. ``EPERM``)
    a check, then a rename. ``tmp`` is left for the caller to remove if it is still there.
    Which file was put there is remembered (:func:`remove_if_placed`), in one step with the
    link as far as SIGINT / SIGTERM go; ``sha256``, the file's, lets the rollback tell it from
    a later file that got its inode number."""
    identity = _identity(tmp)
    with interrupts_held():
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise FileExistsError(exists_message) from None
        except OSError:  # no hard links on this file system: check, then rename
            if os.path.lexists(target):  # a dangling symbolic link too: never written through
                raise FileExistsError(exists_message) from None
            os.replace(tmp, target)
        placed = _PLACING.get()
        if placed is not None:
            placed[os.path.abspath(target)] = (*identity, sha256)


def remove_if_placed(path: str | os.PathLike[str], placed: dict[str, Placement]) -> None:
    """Remove ``path`` if it still names the file :func:`link_new` put there inside
    ``placements(placed)``. A rollback removes only its own outputs: where a write failed
    before its link (disk full at the fsync, an interrupt), the file of that name is another
    run's, finished meanwhile, and it stays. The inode number alone is no proof: a process
    that removed ours and wrote that name again may get the freed number; where the writer
    gave the SHA-256, the bytes are compared too (read on a rollback only)."""
    key = os.path.abspath(path)
    if key not in placed:
        return
    device, inode, sha256 = placed[key]
    try:
        if _identity(path) == (device, inode) and (sha256 is None
                                                    or sha256_of_file(path) == sha256):
            os.unlink(path)
    except OSError:
        pass


def write_file_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], *,
                      overwrite: bool, suffix: str = ".tmp") -> None:
    """Write a file through ``write(binary_file)`` atomically: a temporary file beside
    ``path`` (its folders made), flushed and fsynced, then renamed over ``path`` with
    ``overwrite``, else linked to the *new* path (:func:`link_new`: ``FileExistsError`` if it
    exists), and the folder fsynced. A reader sees no file or the whole one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with new_temporary_beside(target, suffix=suffix) as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            link_new(tmp, target, f"{target} exists; refusing to overwrite it")
        _fsync_dir(target.parent)


def _write_text_fd(fd: int, text: str) -> None:
    """``text`` into the new file ``fd`` (closed afterwards), flushed to disk."""
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same directory, fsync,
    ``os.replace``): readers see the old file or the whole new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with new_temporary_beside(target) as (fd, tmp_name):
        _write_text_fd(fd, text)
        os.replace(tmp_name, target)
        _fsync_dir(target.parent)


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
    target.parent.mkdir(parents=True, exist_ok=True)
    with new_temporary_beside(target) as (fd, tmp_name):
        _write_text_fd(fd, text)
        sha = sha256_of_file(tmp_name)
        link_new(tmp_name, target, f"{target} exists; refusing to overwrite it", sha)
        _fsync_dir(target.parent)
        return sha


def write_json_new(path: str | os.PathLike[str], payload: Any) -> str:
    """Write ``payload`` as JSON to a *new* file atomically; return the file's SHA-256
    (:func:`write_text_new`: an existing file is never replaced, a reader never sees a partial
    file). NaN/Inf are refused (``allow_nan=False``)."""
    return write_text_new(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def json_safe(value: Any) -> Any:
    """Plain JSON types: tuples -> lists, tensors -> numbers, NaN/Inf -> ``None``."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


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
    if os.path.lexists(target) and not overwrite:  # a dangling link too: never written through
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    with new_temporary_beside(target) as (fd, tmp_name):
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as error:
                # An exception inside torch.save (a failed write: OSError, disk full; an
                # interrupt: KeyboardInterrupt, or the command line's SIGTERM exception) makes
                # its zip writer fail again while closing ("unexpected pos ...") and replace it
                # with that RuntimeError: the first exception is what happened.
                cause = error.__context__
                if isinstance(cause, (OSError, KeyboardInterrupt, SystemExit)):
                    raise cause from None
                raise
            f.flush()
            os.fsync(f.fileno())
        sha = sha256_of_file(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            link_new(tmp, target, f"{target} exists; pass overwrite=True to replace it", sha)
        _fsync_dir(target.parent)
        return sha


class DuplicateKeyError(ValueError):
    """A JSON object gives one key twice (``args[0]``: the key)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that refuses a key given twice: ``json`` keeps
    the last of two without a word, so a record or a setting edited by inserting a second
    ``"instance_ids"`` before the real one read as the one a person does not see."""
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise DuplicateKeyError(key)
        value[key] = item
    return value

