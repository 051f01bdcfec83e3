"""Loaders for the real NYUv2 and Cityscapes in LibMTL's (and MTAN's) preprocessed layout.

Expected layout (one ``.npy`` per instance and target, numbered ``0.npy, 1.npy, ...``)::

    root/train/image/<i>.npy    float [H, W, 3], RGB in [0, 1]
    root/train/label/<i>.npy    [H, W], class index, -1 = unlabelled
    root/train/depth/<i>.npy    float [H, W, 1] (or [H, W]), metres, 0 (or NaN) = unknown
    root/train/normal/<i>.npy   [H, W, 3] unit normals, 0 (or NaN) = unknown   (NYUv2 only)
    root/val/...                the same, used as the test split

Files are numbered ``0 .. n-1`` without gaps or leading zeros, the same ``n`` in every folder of a
split (as LibMTL reads them): train instance ``i`` is ``train/*/<i>.npy`` and has id ``i``, so a
forget request names train files by number; ``val/*/<j>.npy`` has id ``N_train + j`` (``N_train``
after ``max_train``). Values no loss can use are refused at load (:class:`LayoutError` naming the
file): RGB outside ``[0, 1]`` (an image kept in ``[0, 255]``), labels outside ``[-1,
num_classes)`` (255 for "unlabelled" is told to become -1), depth that is negative, infinite,
or beyond 1000 m (millimetres, or 65535 for "missing"), normals that are not
unit vectors (stored as colours), empty arrays. So are files that are no regular file (a FIFO,
a directory), no ``.npy`` array, an array its header declares larger than the file holds
(read before numpy allocates it), or one image file behind two names (a symbolic or hard
link): one image with two ids could not be forgotten (label maps may share a file: identical
labels of two images are harmless).

NYUv2 (13 classes, 288x384) has ``image``, ``label``, ``depth``, ``normal``; Cityscapes (7
classes, 128x256) ``image``, ``label``, ``depth``. Inputs are normalised like the generated
benchmarks, ``(rgb - 0.5) / 0.25``. ``size`` resizes on load: RGB bilinearly with antialiasing,
labels, depth and normals with the source pixel nearest each output pixel's centre
(``nearest-exact``, aligned with the image), so unknown (0) and unlabelled (-1) values are never
blended into valid ones; it may change the aspect ratio (the registry's sizes keep it). Without
``size`` the images are read as they are, and ``val/``'s must have the size of ``train/``'s.

Erased data (``allow_erased=True``, which ``mtunlearn`` passes for a checkpoint that recorded its
training files' digests; never for ``train``): after a removal request was honoured, the
person's files may be deleted from the training split. An instance number whose files are all
gone is then absent (the others keep their numbers as ids: nothing is renumbered); one whose
label file of a task is gone (a partial request on that task) has that task's pair
unsupervised. An instance still present needs its image. ``val/`` never takes a gap. Whether
the missing files were removed by a request is for the caller to check (see
:func:`mtunlearn_ext.workflow.benchmark_from_meta`); every training file's SHA-256 is in
``info["train_files_sha256"]`` (``"image/5.npy" -> hex``) for that.

Everything is read into memory as float32 (labels int64): about 3.8 MiB per instance of NYUv2 at
its full 288x384 (5.4 GiB for its 795 + 654 instances), 0.24 MiB at 72x96; resizing happens per
file, so a smaller ``size`` needs no full-size copy of the split.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtunlearn_ext._fields import integer_value
from mtunlearn_ext.data.base import (
    NORMAL_LENGTH_SLACK,
    Benchmark,
    MultiTaskDataset,
    TaskSpec,
    labelled_rows,
)

__all__ = ["FOLDER_OF_TASK", "TEST_FILES_KEY", "TRAIN_FILES_KEY", "LayoutError", "load_cityscapes",
           "load_libmtl", "load_nyuv2"]

RGB_MEAN, RGB_STD = 0.5, 0.25
_INDEX = re.compile(r"^(0|[1-9][0-9]*)\.npy$")
# Any digits, Unicode's too (``\d``), so that a name int() would read as another number is
# found: ``1٠.npy`` (an Arabic-Indic zero) was taken for instance 10.
_NUMBERED = re.compile(r"^\d+\.npy$")
_ASCII_NUMBERED = re.compile(r"^[0-9]+\.npy$")
# LibMTL folder -> (task name, channels of the stored array, or None for a label map)
_FOLDERS = {"label": ("segmentation", None), "depth": ("depth", 1), "normal": ("normals", 3)}
#: Task name -> its LibMTL folder: the file a partial request on that task removes.
FOLDER_OF_TASK = {task: folder for folder, (task, _) in _FOLDERS.items()}
#: ``Benchmark.info`` key (and checkpoint metadata key) of the training files' SHA-256 digests,
#: ``"<folder>/<i>.npy" -> hex``: what tells an erased file from a changed or added one.
TRAIN_FILES_KEY = "train_files_sha256"
#: The same for the test split's files (``val/``).
TEST_FILES_KEY = "test_files_sha256"
# How far an RGB value may stray outside [0, 1]: a resampling filter overshoots a little, an
# image kept in [0, 255] is far outside (and would become inputs up to ~1000 once normalised).
_RGB_SLACK = 0.05
# Indoor (NYUv2, under 10 m) and street (Cityscapes, under ~100 m) depth in metres: a larger
# value is millimetres, or a "missing" code such as 65535, which would be trained on as depth.
_MAX_DEPTH_METRES = 1000.0
# How every .npy file starts (numpy.lib.format.MAGIC_PREFIX).
_NPY_MAGIC = b"\x93NUMPY"


class LayoutError(FileNotFoundError):
    """The data root does not hold the expected LibMTL layout."""


def _count(folder: Path) -> int:
    """The number of instances in ``folder``, whose files must be ``0.npy .. <n-1>.npy``: LibMTL
    reads instance ``i`` from ``<i>.npy`` and so do instance ids here, so a gap or a renamed
    file would silently give another file the id a request names."""
    found = sorted(_numbers(folder))
    if not found:
        raise LayoutError(f"no <i>.npy files in {folder}")
    if found[-1] != len(found) - 1:
        # The first ten gaps lie below len(found) + 10: a set of every number up to the highest
        # (a file named 99999999999.npy: 10**11 ints) took all the memory there was.
        present = set(found)
        missing = [i for i in range(min(found[-1], len(found) + 10)) if i not in present][:10]
        raise LayoutError(f"{folder}: expected files numbered 0.npy .. {len(found) - 1}.npy "
                          f"without gaps (instance i is <i>.npy, its id i), got {len(found)} "
                          f"files up to {found[-1]}.npy; missing e.g. {missing}")
    return len(found)


def _numbers(folder: Path) -> set[int]:
    """The instance numbers of ``folder``'s ``<i>.npy`` files, gaps allowed (erased data): the
    folder must exist and its names must have no leading zeros."""
    if not folder.is_dir():
        raise LayoutError(f"missing folder {folder} (expected LibMTL layout "
                          "<root>/{train,val}/{image,label,depth[,normal]}/<i>.npy)")
    names = os.listdir(folder)
    foreign = sorted(n for n in names if _NUMBERED.match(n) and not _ASCII_NUMBERED.match(n))
    if foreign:
        raise LayoutError(f"{folder}: expected files named <i>.npy in ASCII digits (0.npy, "
                          f"1.npy, ...), got {foreign[:5]}")
    padded = sorted(n for n in names if _NUMBERED.match(n) and not _INDEX.match(n))
    if padded:
        raise LayoutError(f"{folder}: expected files named <i>.npy without leading zeros "
                          f"(0.npy, 1.npy, ...), got {padded[:5]}")
    return {int(m.group(1)) for name in names if (m := _INDEX.match(name)) is not None}


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"


#: Files already read in one load, by ``(st_dev, st_ino)``: two instance files that are one file.
_Seen = dict[tuple[int, int], Path]


def _refuse_claims_past_the_file(path: Path, handle: io.BufferedIOBase, size: int) -> None:
    """Refuse a .npy file whose header declares more data than the file holds, before numpy
    allocates it: a 192-byte file declaring (400000, 400000, 3) float32 ended the load in
    numpy's MemoryError (a traceback), and a smaller claim reserved that much memory first."""
    try:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return  # a version numpy writes for field names of its own: np.load decides
        shape, _, dtype = read_header(handle)
    except (OSError, ValueError) as error:
        raise LayoutError(f"cannot read {path}: {error}") from error
    declared = math.prod(shape) * dtype.itemsize
    held = size - handle.tell()
    if declared > held:
        raise LayoutError(f"{path}: its header declares a {dtype} array of shape {shape} "
                          f"({declared:,} bytes), the file holds {held:,} after it (truncated, "
                          "or not the array it says)")


def _load_array(path: Path, what: str, channels: int | None, seen: _Seen | None = None,
                digests: dict[str, str] | None = None) -> np.ndarray:
    # Opened without blocking and checked before numpy reads it: np.load on a FIFO named
    # <i>.npy waited forever for a writer (`train` hung), on a directory it failed obscurely.
    # The check is on the open descriptor, so the file cannot be swapped after it.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise LayoutError(f"cannot read {path}: {error.strerror or error}") from error
    try:  # until fdopen owns the descriptor, any exit must close it
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # before fdopen, which refuses a directory itself
            raise LayoutError(f"{path} is {_kind_of(info.st_mode)}, not a regular file: every "
                              "<i>.npy of the layout must be a .npy array file")
        # One file behind two names (2.npy a symbolic or hard link to 1.npy) would be one image
        # with two ids: forgetting id 1 would leave it in the retain set as id 2. Checked by
        # device and inode of the open file, which costs no read.
        key = (info.st_dev, info.st_ino)
        if seen is not None and key in seen:  # images only: label maps may share a file
            raise LayoutError(f"{path} and {seen[key]} are the same file (a symbolic or hard "
                              "link): one instance would have two ids, and forgetting one id "
                              "would leave it in the data under the other; give each instance "
                              "its own file")
        if seen is not None:
            seen[key] = path
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        # np.load takes anything without numpy's magic for a pickle and advises loading it
        # "unsafely using allow_pickle=": a text file named <i>.npy is no pickle, and that
        # advice would run whatever code a file of unknown origin holds.
        magic = handle.read(len(_NPY_MAGIC))
        if magic != _NPY_MAGIC:
            start = f"starts with {magic!r}" if magic else "is empty"
            raise LayoutError(f"{path} is not a .npy array file (it {start}, not numpy's .npy "
                              f"header {_NPY_MAGIC!r}); save each instance with numpy.save")
        handle.seek(0)
        _refuse_claims_past_the_file(path, handle, info.st_size)
        handle.seek(0)
        source: io.BufferedIOBase = handle
        if digests is not None:  # the bytes read once, for their digest and for numpy
            raw = handle.read()
            digests[f"{path.parent.name}/{path.name}"] = hashlib.sha256(raw).hexdigest()
            source = io.BytesIO(raw)
        try:
            array = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise LayoutError(f"cannot read {path}: {error}") from error
    if array.dtype.kind not in "fiu":
        raise LayoutError(f"{path}: {what} must hold real numbers (a float or integer dtype), "
                          f"got dtype {array.dtype}")
    if array.size == 0:
        raise LayoutError(f"{path}: {what} is empty (shape {array.shape}); every instance "
                          "file must hold its array (an interrupted preprocessing run?)")
    if channels is None:
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            raise LayoutError(f"{path}: {what} must be [H, W], got {array.shape}")
        return array
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] != channels:
        raise LayoutError(f"{path}: {what} must be [H, W, {channels}], got {array.shape}")
    return array


def _check_rgb(path: Path, image: np.ndarray) -> None:
    if not np.isfinite(image).all():
        raise LayoutError(f"{path} holds NaN or Inf")
    low, high = float(image.min()), float(image.max())
    if low < -_RGB_SLACK or high > 1 + _RGB_SLACK:
        hint = "; divide images stored in [0, 255] by 255 first" if high > 1.5 else ""
        raise LayoutError(f"{path}: image must be RGB in [0, 1], got values in [{low:.4g}, "
                          f"{high:.4g}] (dtype {image.dtype}){hint}")


def _label_map(path: Path, array: np.ndarray, num_classes: int) -> torch.Tensor:
    if not np.isfinite(array).all():
        raise LayoutError(f"{path} holds NaN or Inf labels (unlabelled pixels are -1)")
    # Labels come as floats in LibMTL's files: whole numbers, up to rounding.
    fractional = np.abs(array - np.rint(array)) > 1e-3
    if fractional.any():
        raise LayoutError(f"{path} holds labels that are not whole numbers: "
                          f"{sorted(set(array[fractional].tolist()))[:5]}")
    label = torch.from_numpy(np.rint(array).astype(np.int64))
    bad = (label < -1) | (label >= num_classes)
    if bool(bad.any()):
        unlabelled = ("; if 255 marks unlabelled pixels, map it to -1 (the layout's "
                      "unlabelled value); otherwise" if bool((label[bad] == 255).any()) else ";")
        raise LayoutError(f"{path} has labels outside [-1, {num_classes}): "
                          f"{sorted(set(label[bad].tolist()))[:5]}{unlabelled} `num_classes` "
                          "must be the label set's class count (LibMTL's Cityscapes labels have "
                          "7, its 19-class set 19; the benchmarks `nyuv2` / `cityscapes`, which "
                          "the CLI reads, take LibMTL's preprocessing, 13 / 7 classes: for "
                          "another label set call load_nyuv2 / load_cityscapes with "
                          "num_classes= and unlearn through the Python API)")
    return label


def _check_dense(path: Path, folder: str, array: np.ndarray) -> None:
    """Depth ``>= 0`` (0 or NaN: unknown, as the losses read it), normals unit vectors (all
    zero or NaN: unknown); anything else would be trained on, or dropped, silently."""
    if np.isinf(array).any():
        raise LayoutError(f"{path} holds Inf {folder} values (mark unknown pixels with 0)")
    if folder == "depth":
        if (array < 0).any():
            raise LayoutError(f"{path}: depth must be >= 0 (0 = unknown), got values down to "
                              f"{float(np.nanmin(array)):.4g}")
        deepest = float(np.nanmax(array)) if np.isfinite(array).any() else 0.0
        if deepest > _MAX_DEPTH_METRES:
            raise LayoutError(f"{path}: depth must be in metres (0 = unknown), got values up to "
                              f"{deepest:.6g}, beyond {_MAX_DEPTH_METRES:g} m; convert "
                              "millimetres (divide by 1000) and mark missing pixels with 0, "
                              "not 65535")
        return
    length = np.linalg.norm(array.astype(np.float32), axis=-1)
    length = length[np.isfinite(length) & (length > 0)]
    if length.size == 0:
        return
    median, longest = float(np.median(length)), float(length.max())
    if longest > 1 + NORMAL_LENGTH_SLACK or median < 1 - NORMAL_LENGTH_SLACK:
        raise LayoutError(f"{path}: normals must be unit vectors (all zero = unknown), got "
                          f"lengths up to {longest:.4g} (median {median:.4g}); map normals "
                          f"stored as colours in [0, 1] or [0, 255] back to [-1, 1] first")


def _resize(x: torch.Tensor, size: tuple[int, int] | None, mode: str) -> torch.Tensor:
    """``x [C, H, W]`` resized to ``size``."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(x[None].float(), size=size, mode=mode, **kwargs)[0]


def _empty_targets(folders: list[str], count: int, size: tuple[int, ...]
                   ) -> dict[str, torch.Tensor]:
    targets = {}
    for folder in folders:
        task, channels = _FOLDERS[folder]
        targets[task] = (torch.empty(count, *size, dtype=torch.long) if channels is None
                         else torch.empty(count, channels, *size))
    return targets


def _fill_missing(targets: dict[str, torch.Tensor], task: str, row: int) -> None:
    """A task's target of an instance whose file was erased: "no label" (-1, or 0 = unknown)."""
    targets[task][row] = -1 if targets[task].dtype == torch.long else 0


def _instances(split_dir: Path, folders: list[str], limit: int | None, erasable: bool
               ) -> tuple[list[int], dict[str, set[int]]]:
    """The instance numbers to read, in order, and each task folder's numbers present.

    Complete data: ``0 .. n-1`` in every folder (:func:`_count`). Erased data (``erasable``):
    any numbers, an instance being there when any of its files is, which must include its
    image; ``limit`` keeps the numbers below it (the instances a complete split would give)."""
    if not erasable:
        count = _count(split_dir / "image")
        for folder in folders:
            other = _count(split_dir / folder)
            if other != count:
                raise LayoutError(f"{split_dir}: image/ and {folder}/ hold different instances "
                                  f"({count} and {other} files)")
        numbers = list(range(count if limit is None else min(count, limit)))
        return numbers, {folder: set(numbers) for folder in folders}
    images = _numbers(split_dir / "image")
    present = {folder: _numbers(split_dir / folder) for folder in folders}
    below = (lambda i: True) if limit is None else (lambda i: i < limit)
    for folder, found in present.items():
        orphans = sorted(i for i in found - images if below(i))
        if orphans:
            i = orphans[0]
            raise LayoutError(f"{split_dir / 'image' / f'{i}.npy'} is missing, yet "
                              f"{split_dir / folder / f'{i}.npy'} is there: an instance still "
                              "in the data needs its image (erase every file of a removed "
                              "instance, or only the label files of a partial request's tasks)")
    numbers = sorted(i for i in images if below(i))
    if not numbers:
        raise LayoutError(f"no <i>.npy files in {split_dir / 'image'}")
    return numbers, present


def _load_split(split_dir: Path, folders: list[str], num_classes: int,
                size: tuple[int, int] | None, limit: int | None, seen: _Seen,
                erasable: bool = False, digests: dict[str, str] | None = None,
                like: tuple[Path, tuple[int, int]] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int], torch.Tensor | None]:
    """``(inputs, targets, instance numbers, presence)`` of a split; ``presence`` (``[N, T]``
    bool, False where a task's file was erased) is None when every file is there. ``like``:
    (another split's image folder, its image size), the size this split's images must have."""
    numbers, present = _instances(split_dir, folders, limit, erasable)
    count = len(numbers)
    presence = torch.tensor([[i in present[f] for f in folders] for i in numbers],
                            dtype=torch.bool).reshape(count, len(folders))
    # Filled in place, one instance at a time: a list of per-instance tensors stacked at the
    # end held every array twice (40 full-size NYUv2 instances: peak RSS 325 -> 242 MiB).
    inputs = torch.empty(0)
    targets: dict[str, torch.Tensor] = {}
    shape: tuple[int, int] | None = None
    for row, i in enumerate(numbers):
        path = split_dir / "image" / f"{i}.npy"
        image = _load_array(path, "image", 3, seen, digests)
        if shape is None:
            shape = image.shape[:2]
            if like is not None and shape != like[1]:
                # Read as they are, the test images would meet a model trained on another
                # size: an error far away, or (a model that pools) scores of rescaled scenes.
                raise LayoutError(f"{path} is {shape}, the images of {like[0]} {like[1]}; "
                                  "without `size` both splits must have one image size: pass "
                                  "size=(height, width) to resize both on load")
        elif image.shape[:2] != shape:
            raise LayoutError(f"{path} is {image.shape[:2]}, the first image {shape}; all "
                              "images of a split must have one size")
        _check_rgb(path, image)
        rgb = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        rgb = _resize(rgb, size, "bilinear")
        if row == 0:
            out = tuple(rgb.shape[-2:])
            inputs = torch.empty(count, 3, *out)
            targets = _empty_targets(folders, count, out)
        inputs[row] = rgb
        for column, folder in enumerate(folders):
            task, channels = _FOLDERS[folder]
            if not bool(presence[row, column]):
                _fill_missing(targets, task, row)
                continue
            path = split_dir / folder / f"{i}.npy"
            array = _load_array(path, folder, channels, None, digests)
            if array.shape[:2] != shape:
                raise LayoutError(f"{path} is {array.shape[:2]}, its image {shape}")
            if channels is None:
                label = _label_map(path, array, num_classes)
                targets[task][row] = _resize(label[None], size, "nearest-exact")[0].long()
            else:
                _check_dense(path, folder, array)
                value = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
                targets[task][row] = _resize(value.permute(2, 0, 1), size, "nearest-exact")
    inputs.sub_(RGB_MEAN).div_(RGB_STD)
    return inputs, targets, numbers, None if bool(presence.all()) else presence


def _checked_arguments(name: str, size: object, max_train: object, max_test: object
                       ) -> tuple[tuple[int, int] | None, int | None, int | None]:
    """``(size, max_train, max_test)``, checked, NumPy's integers as the Python ints they
    stand for."""
    # Checked here: torch's interpolate and Python's slicing took them otherwise (a negative
    # max_train dropped the last files, 0 failed in torch.stack, size (0, 5) deep in torch).
    height: int | None = None
    width: int | None = None
    if isinstance(size, (tuple, list)) and len(size) == 2:
        height, width = integer_value(size[0]), integer_value(size[1])
    if size is not None and (height is None or width is None or min(height, width) < 1):
        raise ValueError(f"{name}: `size` must be None or (height, width), two integers >= 1, "
                         f"got {size!r}")
    limits: list[int | None] = []
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        limit = integer_value(value)
        if value is not None and (limit is None or limit < 1):
            raise ValueError(f"{name}: `{arg}` must be None or an integer >= 1, got {value!r}")
        limits.append(limit)
    height_width = None if height is None or width is None else (height, width)
    return height_width, limits[0], limits[1]


def load_libmtl(root: str | os.PathLike[str], name: str, tasks: list[TaskSpec],
                folders: list[str], *, size: tuple[int, int] | None = None,
                max_train: int | None = None, max_test: int | None = None,
                depth_prior: float | None = None, allow_erased: bool = False,
                num_train: int | None = None) -> Benchmark:
    """Load a LibMTL-layout data set at ``root`` (``train/`` -> train, ``val/`` -> test).

    Raises :class:`LayoutError` naming the problem when the root, a folder or a file is missing
    or malformed, and ``ValueError`` for a ``size`` other than two integers >= 1 or a
    ``max_train`` / ``max_test`` other than an integer >= 1. Train ids are the file numbers
    ``0 .. N_train - 1``; test ids follow (``val/*/<j>.npy`` has id ``N_train + j``).

    ``allow_erased``: the training split may lack the files of removed data (see the module's
    docstring): absent instances, unsupervised pairs whose label file is gone. ``num_train``
    is then the split's size before anything was erased, where the test ids start (default:
    the highest train number + 1, wrong once the last instance was erased).
    ``info["train_files_sha256"]`` holds every training file's SHA-256,
    ``info["test_files_sha256"]`` every test file's: what identifies the data (the tensors
    read from them differ in their last bits with the thread count and the CPU, through the
    resampling).

    With ``size``, images are resampled bilinearly with antialiasing (each output pixel
    filters the source around it, not only its nearest 2 x 2), label, depth and normal maps by
    the nearest source pixel to each output pixel's centre (``nearest-exact``), so targets stay
    aligned with the image.
    """
    size, max_train, max_test = _checked_arguments(name, size, max_train, max_test)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise LayoutError(f"{name}: data root {base} does not exist or is not a directory")
    seg = next(t for t in tasks if t.kind == "segmentation")
    assert seg.num_classes is not None
    shape = None if size is None else (size[0], size[1])
    seen: _Seen = {}  # over both splits: a train file linked into val/ is refused too
    digests: dict[str, str] = {}
    train = _load_split(base / "train", folders, seg.num_classes, shape, max_train, seen,
                        allow_erased, digests)
    test_digests: dict[str, str] = {}
    # Without `size` the splits are read as they are, so they must share one image size.
    like = None if shape is not None else (base / "train" / "image",
                                           (train[0].shape[-2], train[0].shape[-1]))
    test = _load_split(base / "val", folders, seg.num_classes, shape, max_test, seen,
                       digests=test_digests, like=like)
    inputs, targets, numbers, presence = train
    supervision = None
    if presence is not None:  # erased label files: those pairs carry no label
        supervision = torch.stack([labelled_rows(t, targets[t.name]) for t in tasks], dim=1)
        columns = [folders.index(FOLDER_OF_TASK[t.name]) for t in tasks]
        supervision &= presence[:, columns]
    datasets = [MultiTaskDataset(inputs, targets, tasks, ids=torch.tensor(numbers),
                                 supervision=supervision)]
    first_test = (numbers[-1] + 1 if num_train is None else num_train) if allow_erased \
        else len(numbers)
    test_inputs, test_targets, test_numbers, _ = test
    datasets.append(MultiTaskDataset(test_inputs, test_targets, tasks,
                                     ids=torch.tensor(test_numbers) + first_test))
    info: dict[str, object] = {
        "source": str(base), "layout": "LibMTL npy", "size": list(inputs.shape[-2:]),
        "rgb_normalisation": [RGB_MEAN, RGB_STD], "test_split": "val",
        TRAIN_FILES_KEY: dict(sorted(digests.items(), key=_file_order)),
        TEST_FILES_KEY: dict(sorted(test_digests.items(), key=_file_order)),
    }
    if depth_prior is not None:
        info["depth_prior"] = depth_prior
    return Benchmark(name, datasets[0], datasets[1], tasks, info)


def _file_order(item: tuple[str, str]) -> tuple[str, int]:
    """``"image/10.npy"`` after ``"image/9.npy"``: digests listed by folder, then number."""
    folder, name = item[0].split("/")
    return folder, int(name.split(".")[0])


def load_nyuv2(root: str | os.PathLike[str], *, size: tuple[int, int] | None = None,
               max_train: int | None = None, max_test: int | None = None,
               num_classes: int = 13, allow_erased: bool = False,
               num_train: int | None = None) -> Benchmark:
    """NYUv2 (LibMTL layout): tasks ``segmentation`` (13 classes), ``depth``, ``normals``."""
    tasks = [TaskSpec("segmentation", "segmentation", num_classes=num_classes),
             TaskSpec("depth", "depth"), TaskSpec("normals", "normals")]
    return load_libmtl(root, "nyuv2", tasks, ["label", "depth", "normal"], size=size,
                       max_train=max_train, max_test=max_test, depth_prior=2.5,
                       allow_erased=allow_erased, num_train=num_train)


def load_cityscapes(root: str | os.PathLike[str], *, size: tuple[int, int] | None = None,
                    max_train: int | None = None, max_test: int | None = None,
                    num_classes: int = 7, allow_erased: bool = False,
                    num_train: int | None = None) -> Benchmark:
    """Cityscapes (LibMTL layout): tasks ``segmentation`` (7 classes) and ``depth``."""
    tasks = [TaskSpec("segmentation", "segmentation", num_classes=num_classes),
             TaskSpec("depth", "depth")]
    return load_libmtl(root, "cityscapes", tasks, ["label", "depth"], size=size,
                       max_train=max_train, max_test=max_test, allow_erased=allow_erased,
                       num_train=num_train)
