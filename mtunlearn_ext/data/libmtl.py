"""Loaders for the real NYUv2 and Cityscapes in LibMTL's (and MTAN's) preprocessed layout.

Expected layout (one ``.npy`` per instance and target, numbered ``0.npy, 1.npy, ...``)::

    root/train/image/<i>.npy    float [H, W, 3], RGB in [0, 1]
    root/train/label/<i>.npy    [H, W], class index, -1 = unlabelled
    root/train/depth/<i>.npy    [H, W, 1] (or [H, W]), 0 = unknown
    root/train/normal/<i>.npy   [H, W, 3] unit normals, 0 = unknown   (NYUv2 only)
    root/val/...                the same, used as the test split

NYUv2 (13 classes, 288x384) has ``image``, ``label``, ``depth``, ``normal``; Cityscapes (7
classes, 128x256) ``image``, ``label``, ``depth``. Inputs are normalised like the generated
benchmarks, ``(rgb - 0.5) / 0.25``. ``size`` resizes on load: RGB bilinearly, labels, depth and
normals with nearest neighbour, so unknown (0) and unlabelled (-1) values are never blended into
valid ones.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtunlearn_ext.data.base import Benchmark, MultiTaskDataset, TaskSpec

__all__ = ["LayoutError", "load_cityscapes", "load_libmtl", "load_nyuv2"]

RGB_MEAN, RGB_STD = 0.5, 0.25
_INDEX = re.compile(r"^(\d+)\.npy$")
# LibMTL folder -> (task name, channels of the stored array, or None for a label map)
_FOLDERS = {"label": ("segmentation", None), "depth": ("depth", 1), "normal": ("normals", 3)}


class LayoutError(FileNotFoundError):
    """The data root does not hold the expected LibMTL layout."""


def _indices(folder: Path) -> list[int]:
    if not folder.is_dir():
        raise LayoutError(f"missing folder {folder} (expected LibMTL layout "
                          "<root>/{train,val}/{image,label,depth[,normal]}/<i>.npy)")
    found = sorted(int(m.group(1)) for name in os.listdir(folder)
                   if (m := _INDEX.match(name)) is not None)
    if not found:
        raise LayoutError(f"no <i>.npy files in {folder}")
    return found


def _load_array(path: Path, what: str, channels: int | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise LayoutError(f"cannot read {path}: {error}") from error
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


def _resize(x: torch.Tensor, size: tuple[int, int] | None, mode: str) -> torch.Tensor:
    """``x [C, H, W]`` resized to ``size``."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x[None].float(), size=size, mode=mode, **kwargs)[0]


def _load_split(split_dir: Path, folders: list[str], num_classes: int,
                size: tuple[int, int] | None, limit: int | None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    indices = _indices(split_dir / "image")
    for folder in folders:
        other = _indices(split_dir / folder)
        if other != indices:
            missing = sorted(set(indices) ^ set(other))[:10]
            raise LayoutError(f"{split_dir}: image/ and {folder}/ hold different instances "
                              f"(e.g. {missing})")
    if limit is not None:
        indices = indices[:limit]
    images: list[torch.Tensor] = []
    targets: dict[str, list[torch.Tensor]] = {_FOLDERS[f][0]: [] for f in folders}
    shape: tuple[int, int] | None = None
    for i in indices:
        image = _load_array(split_dir / "image" / f"{i}.npy", "image", 3)
        if shape is None:
            shape = image.shape[:2]
        elif image.shape[:2] != shape:
            raise LayoutError(f"{split_dir}/image/{i}.npy is {image.shape[:2]}, the first image "
                              f"{shape}; all images of a split must have one size")
        if not np.isfinite(image).all():
            raise LayoutError(f"{split_dir}/image/{i}.npy holds NaN or Inf")
        rgb = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        images.append(_resize(rgb, size, "bilinear"))
        for folder in folders:
            task, channels = _FOLDERS[folder]
            array = _load_array(split_dir / folder / f"{i}.npy", folder, channels)
            if array.shape[:2] != shape:
                raise LayoutError(f"{split_dir}/{folder}/{i}.npy is {array.shape[:2]}, its image "
                                  f"{shape}")
            if channels is None:
                # Labels come as floats in LibMTL's files: whole numbers, up to rounding.
                fractional = np.abs(array - np.rint(array)) > 1e-3
                if fractional.any():
                    raise LayoutError(f"{split_dir}/label/{i}.npy holds labels that are not whole "
                                      f"numbers: {sorted(set(array[fractional].tolist()))[:5]}")
                label = torch.from_numpy(np.rint(array).astype(np.int64))
                bad = (label < -1) | (label >= num_classes)
                if bool(bad.any()):
                    raise LayoutError(f"{split_dir}/label/{i}.npy has labels outside [-1, "
                                      f"{num_classes}): {sorted(set(label[bad].tolist()))[:5]}")
                targets[task].append(_resize(label[None], size, "nearest")[0].long())
            else:
                value = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
                targets[task].append(_resize(value.permute(2, 0, 1), size, "nearest"))
    inputs = (torch.stack(images) - RGB_MEAN) / RGB_STD
    return inputs, {task: torch.stack(values) for task, values in targets.items()}


def load_libmtl(root: str | os.PathLike[str], name: str, tasks: list[TaskSpec],
                folders: list[str], *, size: tuple[int, int] | None = None,
                max_train: int | None = None, max_test: int | None = None,
                depth_prior: float | None = None) -> Benchmark:
    """Load a LibMTL-layout data set at ``root`` (``train/`` -> train, ``val/`` -> test).

    Raises :class:`LayoutError` naming the problem when the root, a folder or a file is missing
    or malformed. Train ids are ``0 .. N_train - 1`` (file order), test ids follow.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise LayoutError(f"{name}: data root {base} does not exist or is not a directory")
    seg = next(t for t in tasks if t.kind == "segmentation")
    assert seg.num_classes is not None
    splits = {}
    for split in ("train", "val"):
        limit = max_train if split == "train" else max_test
        splits[split] = _load_split(base / split, folders, seg.num_classes, size, limit)
    datasets = []
    first_id = 0
    for split in ("train", "val"):
        inputs, targets = splits[split]
        ids = torch.arange(first_id, first_id + inputs.shape[0])
        first_id += inputs.shape[0]
        datasets.append(MultiTaskDataset(inputs, targets, tasks, ids=ids))
    info: dict[str, object] = {
        "source": str(base), "layout": "LibMTL npy", "size": list(splits["train"][0].shape[-2:]),
        "rgb_normalisation": [RGB_MEAN, RGB_STD], "test_split": "val",
    }
    if depth_prior is not None:
        info["depth_prior"] = depth_prior
    return Benchmark(name, datasets[0], datasets[1], tasks, info)


def load_nyuv2(root: str | os.PathLike[str], *, size: tuple[int, int] | None = None,
               max_train: int | None = None, max_test: int | None = None,
               num_classes: int = 13) -> Benchmark:
    """NYUv2 (LibMTL layout): tasks ``segmentation`` (13 classes), ``depth``, ``normals``."""
    tasks = [TaskSpec("segmentation", "segmentation", num_classes=num_classes),
             TaskSpec("depth", "depth"), TaskSpec("normals", "normals")]
    return load_libmtl(root, "nyuv2", tasks, ["label", "depth", "normal"], size=size,
                       max_train=max_train, max_test=max_test, depth_prior=2.5)


def load_cityscapes(root: str | os.PathLike[str], *, size: tuple[int, int] | None = None,
                    max_train: int | None = None, max_test: int | None = None,
                    num_classes: int = 7) -> Benchmark:
    """Cityscapes (LibMTL layout): tasks ``segmentation`` (7 classes) and ``depth``."""
    tasks = [TaskSpec("segmentation", "segmentation", num_classes=num_classes),
             TaskSpec("depth", "depth")]
    return load_libmtl(root, "cityscapes", tasks, ["label", "depth"], size=size,
                       max_train=max_train, max_test=max_test)
