"""Data: generators (determinism, geometry of the targets), loaders, registry and cache, and the
supervision contract of forget requests."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from mtunlearn_ext.data import (
    ForgetRequest,
    LayoutError,
    load_benchmark,
    load_cityscapes,
    load_nyuv2,
    make_digits,
    make_indoor,
    make_street,
)
from mtunlearn_ext.data import MultiTaskDataset, TaskSpec, registry
from mtunlearn_ext.data._raycast import Scene, camera_rays, cast, rotation
from mtunlearn_ext.data.indoor import (
    CEILING,
    FLOOR,
    INDOOR_FOV_X,
    WALL,
    WINDOW,
    render_indoor,
)
from mtunlearn_ext.data.street import FLAT, SKY


def _assert_same(a, b) -> None:
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert torch.equal(a.test.inputs, b.test.inputs)
    for name in a.train.targets:
        assert torch.equal(a.train.targets[name], b.train.targets[name])
        assert torch.equal(a.test.targets[name], b.test.targets[name])
    assert torch.equal(a.train.ids, b.train.ids)


# -- determinism --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [make_indoor, make_street])
def test_generators_are_deterministic_and_seed_dependent(make) -> None:
    size = (16, 24) if make is make_indoor else (16, 32)
    a = make(6, 3, size=size, seed=3)
    b = make(6, 3, size=size, seed=3)
    _assert_same(a, b)
    c = make(6, 3, size=size, seed=4)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert not torch.equal(a.train.targets["depth"], c.train.targets["depth"])
    # The test split is its own stream: it does not change with the number of training scenes.
    d = make(9, 3, size=size, seed=3)
    assert torch.equal(a.test.inputs, d.test.inputs)
    assert torch.equal(d.train.inputs[:6], a.train.inputs)


def test_digits_is_deterministic_and_consistent() -> None:
    a, b, c = make_digits(seed=0), make_digits(seed=0), make_digits(seed=1)
    _assert_same(a, b)
    assert not torch.equal(a.train.ids, c.train.ids)
    assert len(a.train) + len(a.test) == 1797
    assert set(a.train.ids.tolist()).isdisjoint(a.test.ids.tolist())
    x = a.train.inputs
    assert x.shape[1:] == (64,) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    digit = a.train.targets["digit"]
    assert torch.equal(a.train.targets["parity"], digit % 2)
    assert torch.equal(a.train.targets["magnitude"], (digit >= 5).long())
    # Stratified: every digit appears in the test split in about the overall proportion.
    counts = torch.bincount(a.test.targets["digit"], minlength=10)
    assert int(counts.min()) >= 40
    tiny = make_digits(seed=0, num_samples=400)
    assert (len(tiny.train), len(tiny.test)) == (300, 100)


# -- geometry of the rendered targets ------------------------------------------------------------

def _world_points(depth: np.ndarray, yaw: float, pitch: float, size, fov_x: float) -> np.ndarray:
    """``[H, W, 3]`` world points from a z-depth map, by the documented camera model."""
    d_cam = camera_rays(size, fov_x).reshape(*size, 3)
    rot = rotation(np.array([yaw]), np.array([pitch]))[0]
    return (depth[..., None] * d_cam) @ rot.T


def test_indoor_targets_agree_with_the_room_geometry() -> None:
    bench = make_indoor(6, 0, size=(24, 32), seed=5)
    cams = bench.info["train_cameras"]
    assert bench.info["size"] == [24, 32]
    for i in range(len(bench.train)):
        height, yaw, pitch = (float(v) for v in cams[i])
        seg = bench.train.targets["segmentation"][i].numpy()
        depth = bench.train.targets["depth"][i, 0].double().numpy()
        normals = bench.train.targets["normals"][i].permute(1, 2, 0).double().numpy()
        rot = rotation(np.array([yaw]), np.array([pitch]))[0]
        points = _world_points(depth, yaw, pitch, (24, 32), INDOOR_FOV_X)
        # Every pixel is labelled; depth is unknown exactly on window glass.
        assert seg.min() >= 0
        assert np.array_equal(depth == 0, seg == WINDOW)
        # Normals: unit, and facing the camera (negative dot product with the viewing ray).
        assert np.allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
        d_cam = camera_rays((24, 32), INDOOR_FOV_X).reshape(24, 32, 3)
        assert ((normals * d_cam).sum(-1) < 0).all()
        # Floor pixels: the z-depth puts them on the plane y = -height, normal R^T (0, 1, 0).
        floor = seg == FLOOR
        assert floor.any()
        assert np.allclose(points[floor][:, 1], -height, atol=1e-4)
        assert np.allclose(normals[floor], rot.T @ np.array([0.0, 1.0, 0.0]), atol=1e-5)
        # Ceiling pixels: one horizontal plane above the camera, normal pointing down.
        ceiling = seg == CEILING
        if ceiling.any():
            ys = points[ceiling][:, 1]
            assert ys.min() > 0 and np.ptp(ys) < 1e-4
            assert np.allclose(normals[ceiling], rot.T @ np.array([0.0, -1.0, 0.0]), atol=1e-5)
        # Wall pixels: vertical planes, so horizontal world normals along x or z.
        wall = seg == WALL
        world_n = normals[wall] @ rot.T
        assert np.allclose(world_n[:, 1], 0.0, atol=1e-5)
        assert np.allclose(np.abs(world_n).max(axis=1), 1.0, atol=1e-5)


def _checkable_scene() -> Scene:
    grey = (0.5, 0.5, 0.5)
    return Scene(
        yaw=0.1, pitch=-0.15, camera_height=1.5,
        planes=[(1, -1.5, FLOOR, grey), (1, 1.3, CEILING, grey), (0, -2.5, WALL, grey),
                (0, 2.5, WALL, grey), (2, 6.0, WALL, grey)],
        boxes=[((-0.8, -1.5, 3.0), (0.2, -0.7, 4.0), 3, (0.8, 0.2, 0.2))],
        spheres=[((1.0, -0.6, 3.5), 0.4, 11, (0.9, 0.9, 0.5))],
        cylinders=[(-1.6, 3.2, 0.3, -1.5, -0.8, 12, (0.2, 0.5, 0.3))],
        decals=[(4, -0.5, 0.5, 0.0, 0.8, WINDOW, (0.8, 0.9, 1.0))],
    )


def test_object_pixels_lie_on_their_objects() -> None:
    scene = _checkable_scene()
    size = (48, 64)
    hits = cast([scene], size, INDOOR_FOV_X)
    label, depth = hits.label[0], hits.depth[0]
    points = _world_points(depth, scene.yaw, scene.pitch, size, INDOOR_FOV_X)
    rot = rotation(np.array([scene.yaw]), np.array([scene.pitch]))[0]
    normal_world = hits.normal_cam[0] @ rot.T
    assert np.allclose(hits.point[0], points, atol=1e-6)  # z-depth convention

    box = label == 3
    assert box.sum() > 20
    lo, hi = np.array([-0.8, -1.5, 3.0]), np.array([0.2, -0.7, 4.0])
    p = points[box]
    assert ((p >= lo - 1e-4) & (p <= hi + 1e-4)).all()
    on_face = np.isclose(p, lo, atol=1e-4) | np.isclose(p, hi, atol=1e-4)
    assert on_face.any(axis=1).all()
    # The normal is the axis of the face the point lies on, pointing out of the box.
    n = normal_world[box]
    axis = np.abs(n).argmax(axis=1)
    face_value = np.where(n[np.arange(len(n)), axis] > 0, hi[axis], lo[axis])
    assert np.allclose(p[np.arange(len(p)), axis], face_value, atol=1e-4)

    sphere = label == 11
    assert sphere.sum() > 10
    centre = np.array([1.0, -0.6, 3.5])
    assert np.allclose(np.linalg.norm(points[sphere] - centre, axis=1), 0.4, atol=1e-4)
    assert np.allclose(normal_world[sphere], (points[sphere] - centre) / 0.4, atol=1e-4)

    cylinder = label == 12
    assert cylinder.sum() > 5
    pc = points[cylinder]
    radial = np.hypot(pc[:, 0] + 1.6, pc[:, 2] - 3.2)
    on_side = np.isclose(radial, 0.3, atol=1e-4) & (pc[:, 1] >= -1.5 - 1e-4) & (pc[:, 1] <= -0.8
                                                                                + 1e-4)
    on_top = np.isclose(pc[:, 1], -0.8, atol=1e-4) & (radial <= 0.3 + 1e-4)
    assert (on_side | on_top).all()

    # Objects occlude the room: their depth is less than the back wall's along the same ray.
    assert (depth[box | sphere | cylinder] < 6.0).all()
    # The window decal sits on the back wall (z = 6) and keeps its geometry.
    window = label == WINDOW
    assert window.any() and np.allclose(points[window][:, 2], 6.0, atol=1e-4)
    rendered = render_indoor([scene], size, np.random.default_rng(0))
    assert (rendered["depth"][0, 0][torch.from_numpy(window)] == 0).all()
    assert (rendered["depth"][0, 0][torch.from_numpy(~window)] > 0).all()


def test_unrotated_floor_depth_matches_the_camera_model() -> None:
    scene = Scene(planes=[(1, -1.4, FLOOR, (0.5, 0.5, 0.5)), (2, 8.0, WALL, (0.5, 0.5, 0.5))],
                  camera_height=1.4)
    size = (24, 32)
    hits = cast([scene], size, INDOOR_FOV_X)
    f = (32 / 2) / math.tan(INDOOR_FOV_X / 2)
    for row in range(13, 24):  # rows below the horizon
        ray_y = -(row + 0.5 - 12) / f
        expected = min(1.4 / -ray_y, 8.0)
        assert np.allclose(hits.depth[0, row], expected, rtol=1e-6)
        if expected < 8.0:
            assert (hits.label[0, row] == FLOOR).all()
            assert np.allclose(hits.normal_cam[0, row], [0.0, 1.0, 0.0])


def test_street_targets_agree_with_the_geometry() -> None:
    bench = make_street(6, 0, size=(24, 48), seed=2)
    assert bench.train.task_names == ["segmentation", "depth"]
    for i in range(len(bench.train)):
        height, yaw, pitch = (float(v) for v in bench.info["train_cameras"][i])
        seg = bench.train.targets["segmentation"][i].numpy()
        depth = bench.train.targets["depth"][i, 0].double().numpy()
        assert seg.min() >= 0 and seg.max() < 7
        assert np.array_equal(depth == 0, seg == SKY)
        points = _world_points(depth, yaw, pitch, (24, 48), bench.info["fov_x"])
        flat = seg == FLAT
        assert flat.any()
        assert np.allclose(points[flat][:, 1], -height, atol=1e-4)
        # Sky is above the horizon: its rays point upwards in the world.
        sky_rows = np.nonzero(seg == SKY)[0]
        if len(sky_rows):
            d = camera_rays((24, 48), bench.info["fov_x"]).reshape(24, 48, 3)
            rot = rotation(np.array([yaw]), np.array([pitch]))[0]
            assert ((d[seg == SKY] @ rot.T)[:, 1] > 0).all()


# -- data set plumbing ---------------------------------------------------------------------------

def test_batch_matches_default_collate() -> None:
    bench = make_digits(seed=0, num_samples=100)
    data = bench.train
    positions = [3, 0, 7]
    ours = data.batch(positions)
    theirs = default_collate([data[i] for i in positions])
    assert torch.equal(ours["input"], theirs["input"])
    assert torch.equal(ours["id"], theirs["id"])
    assert torch.equal(ours["supervision"], theirs["supervision"])
    for name in data.task_names:
        assert torch.equal(ours["targets"][name], theirs["targets"][name])
    generator = torch.Generator().manual_seed(0)
    seen = torch.cat([b["id"] for b in data.iter_batches(16, shuffle=True, generator=generator)])
    assert sorted(seen.tolist()) == sorted(data.ids.tolist())


def test_forget_request_takes_integer_ids_only() -> None:
    """Ids come exactly as given (no float32 detour: 2**24 + 1 stays itself), from lists,
    ranges, generators, NumPy arrays and tensors, integral floats included; a mask, a fraction,
    NaN or a string is refused instead of truncated or split."""
    assert ForgetRequest.create([16777217.0, 2 ** 62 + 1]).instance_ids == (16777217, 2 ** 62 + 1)
    assert ForgetRequest.create(np.array([3.0, 4.0])).instance_ids == (3, 4)
    assert ForgetRequest.create(i for i in range(3)).instance_ids == (0, 1, 2)
    with pytest.raises(TypeError, match=r"`instance_ids` must be one-dimensional"):
        ForgetRequest.create(torch.tensor([[1, 2], [3, 4]]))  # was flattened without a word
    assert ForgetRequest.create(5).instance_ids == (5,)
    for bad in (torch.tensor([True, False]), [True], np.array([False, True]),
                list(np.array([True, False]))):
        with pytest.raises(TypeError, match=r"`instance_ids` must be integers \(ids, not a mask: "
                                            r"the ids of a mask's True entries are "
                                            r"`torch\.nonzero\(mask\)\.flatten\(\)` or "
                                            r"`np\.flatnonzero\(mask\)`\)"):
            ForgetRequest.create(bad)  # type: ignore[arg-type]
    # The advice works (diff review: `mask.nonzero()` was refused, `int(x)` of each made a
    # mask's 0/1 values ids).
    mask = torch.tensor([True, False, True])
    assert ForgetRequest.create(torch.nonzero(mask).flatten()).instance_ids == (0, 2)
    assert ForgetRequest.create(np.flatnonzero(mask.numpy())).instance_ids == (0, 2)
    # Review: a fraction or a string was told it was a mask.
    for bad in ([1.5], [float("nan")], ["a"], "12", 2.5, torch.tensor([0.5])):
        with pytest.raises(TypeError, match=r"`instance_ids` must be integers \(the instances' "
                                            r"ids, not strings or fractions\)"):
            ForgetRequest.create(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be integers \(one int id per instance\), got "
                                        r"None"):
        ForgetRequest.create(None)  # type: ignore[arg-type]
    # Review: a mapping's keys became the ids without a word; which half is meant is the
    # caller's to say. Sets and ranges (no values beside their ids) are still read.
    for mapping in ({3: "a"}, {"a": 3}):
        with pytest.raises(TypeError, match=r"`instance_ids` must be integers \(one int id per "
                                            r"instance\), got a dict \{.*\}; pass "
                                            r"`list\(mapping\)` for its keys or "
                                            r"`list\(mapping\.values\(\)\)` for its values"):
            ForgetRequest.create(mapping)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"`instance_ids` must be integers"):
            ForgetRequest(mapping)  # type: ignore[arg-type]
    # Its target tasks likewise: {task: weight} became the tasks named by its keys.
    with pytest.raises(TypeError, match=r"`target_tasks` must be task names .* got a dict "
                                        r"\{'a': 1\}; pass `list\(mapping\)`"):
        ForgetRequest.create([3], {"a": 1})  # type: ignore[arg-type]
    assert sorted(ForgetRequest.create({4, 3}).instance_ids) == [3, 4]  # type: ignore[arg-type]
    assert ForgetRequest.create(range(2)).instance_ids == (0, 1)
    # One task may be named by a plain string (it used to become one task per character).
    assert ForgetRequest.create([1], "depth").target_tasks == ("depth",)
    # A data set's own ids: the same rule (fractions were truncated into duplicates or not).
    specs = [TaskSpec("kind", "classification", num_classes=3)]
    x, y = torch.randn(3, 4), {"kind": torch.tensor([0, 1, 2])}
    assert MultiTaskDataset(x, y, specs, ids=torch.tensor([0.0, 1.0, 2.0])).ids.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"`ids` must be N unique integers, got torch.float32"):
        MultiTaskDataset(x, y, specs, ids=torch.tensor([0.5, 1.5, 2.5]))


def test_partial_split_keeps_non_target_labels_of_forget_instances() -> None:
    bench = make_indoor(10, 2, size=(16, 24), seed=0)
    data = bench.train
    forget_ids = data.ids[[1, 4, 7]]
    request = ForgetRequest.create(forget_ids, ["depth"])
    forget, retain = request.split(data)
    depth_col, seg_col = data.task_index("depth"), data.task_index("segmentation")
    normals_col = data.task_index("normals")
    # The forget set: those instances, only their depth pairs supervised.
    assert sorted(forget.ids.tolist()) == sorted(forget_ids.tolist())
    assert forget.supervision[:, depth_col].all()
    assert not forget.supervision[:, [seg_col, normals_col]].any()
    # The retain set still holds every instance; the forget instances keep their other tasks,
    # with the labels untouched.
    assert len(retain) == len(data)
    rows = retain.positions_of(forget_ids)
    assert not retain.supervision[rows, depth_col].any()
    assert retain.supervision[rows][:, [seg_col, normals_col]].all()
    originals = data.positions_of(forget_ids)
    for name in ("segmentation", "normals", "depth"):
        assert torch.equal(retain.targets[name][rows], data.targets[name][originals])
    # Every other pair is untouched.
    others = torch.tensor([i for i in range(len(data)) if int(data.ids[i]) not in
                           set(forget_ids.tolist())])
    assert retain.supervision[retain.positions_of(data.ids[others])].all()
    # Every instance stays: the retain set shares the inputs instead of copying them (the
    # supervision mask is its own).
    assert retain.inputs.data_ptr() == data.inputs.data_ptr()
    assert retain.supervision.data_ptr() != data.supervision.data_ptr()
    full_forget, full_retain = ForgetRequest.create(forget_ids).split(data)
    assert len(full_retain) == len(data) - 3
    assert full_retain.inputs.data_ptr() != data.inputs.data_ptr()


# -- LibMTL loaders ------------------------------------------------------------------------------

def _write_libmtl(root: Path, with_normals: bool, counts=(3, 2), hw=(8, 12),
                  num_classes: int = 13) -> None:
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), counts):
        for folder in ["image", "label", "depth"] + (["normal"] if with_normals else []):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / split / "image" / f"{i}.npy", rng.random((*hw, 3)).astype(np.float32))
            label = rng.integers(-1, num_classes, size=hw).astype(np.float32)
            np.save(root / split / "label" / f"{i}.npy", label)
            depth = rng.uniform(0.5, 5.0, size=(*hw, 1)).astype(np.float32)
            depth[0, 0, 0] = 0.0
            np.save(root / split / "depth" / f"{i}.npy", depth)
            if with_normals:
                n = rng.normal(size=(*hw, 3))
                n /= np.linalg.norm(n, axis=-1, keepdims=True)
                np.save(root / split / "normal" / f"{i}.npy", n.astype(np.float32))


def test_load_nyuv2_reads_the_libmtl_layout(tmp_path: Path) -> None:
    _write_libmtl(tmp_path, with_normals=True)
    bench = load_nyuv2(tmp_path)
    assert (len(bench.train), len(bench.test)) == (3, 2)
    assert bench.train.task_names == ["segmentation", "depth", "normals"]
    assert bench.train.inputs.shape == (3, 3, 8, 12)
    image = np.load(tmp_path / "train" / "image" / "1.npy")
    assert torch.allclose(bench.train.inputs[1], (torch.from_numpy(image).permute(2, 0, 1)
                                                  - 0.5) / 0.25)
    label = np.load(tmp_path / "val" / "label" / "0.npy")
    assert torch.equal(bench.test.targets["segmentation"][0], torch.from_numpy(label).long())
    assert bench.train.targets["depth"].shape == (3, 1, 8, 12)
    assert bench.train.targets["normals"].shape == (3, 3, 8, 12)
    assert torch.equal(bench.test.ids, torch.tensor([3, 4]))
    # Resizing keeps labels and unknown depth exact (nearest neighbour).
    small = load_nyuv2(tmp_path, size=(4, 6), max_train=2)
    assert small.train.inputs.shape == (2, 3, 4, 6)
    values = set(small.train.targets["segmentation"].unique().tolist())
    assert values <= set(range(-1, 13))
    assert set(small.train.targets["depth"].flatten().tolist()) <= set(
        bench.train.targets["depth"][:2].flatten().tolist())


def test_load_cityscapes_and_layout_errors(tmp_path: Path) -> None:
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    bench = load_cityscapes(tmp_path)
    assert bench.train.task_names == ["segmentation", "depth"]
    with pytest.raises(LayoutError, match="does not exist"):
        load_cityscapes(tmp_path / "missing")
    with pytest.raises(LayoutError, match="normal"):
        load_nyuv2(tmp_path)  # no normal/ folder
    (tmp_path / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(LayoutError, match="different instances"):
        load_cityscapes(tmp_path)


def test_loader_refuses_splits_of_two_image_sizes_without_size(tmp_path: Path) -> None:
    """Review: with ``size=None``, val/ images of another size than train/'s were read as they
    were: a test split the trained model never saw the like of, and ``info["size"]`` naming
    the train size only. With ``size`` both are resized, and may differ on disk."""
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    val = tmp_path / "val"
    shutil.rmtree(val)
    _write_libmtl(tmp_path / "other", with_normals=False, counts=(2, 1), hw=(6, 10),
                  num_classes=7)
    (tmp_path / "other" / "train").rename(val)
    with pytest.raises(LayoutError, match=rf"^{re.escape(str(val / 'image' / '0.npy'))} is "
                                          rf"\(6, 10\), the images of "
                                          rf"{re.escape(str(tmp_path / 'train' / 'image'))} "
                                          r"\(8, 12\); without `size` both splits must have "
                                          r"one image size: pass size=\(height, width\) to "
                                          r"resize both on load$"):
        load_cityscapes(tmp_path)
    bench = load_cityscapes(tmp_path, size=(4, 6))
    assert bench.train.inputs.shape == (3, 3, 4, 6) and bench.test.inputs.shape == (2, 3, 4, 6)


def test_loader_rejects_bad_labels(tmp_path: Path) -> None:
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    np.save(tmp_path / "train" / "label" / "0.npy", np.full((8, 12), 9.0, dtype=np.float32))
    with pytest.raises(LayoutError, match="labels outside"):
        load_cityscapes(tmp_path)
    # A fraction is no class (it was rounded to one); NaN pixels in an image are refused at
    # load, not met later as a failed training step.
    np.save(tmp_path / "train" / "label" / "0.npy", np.full((8, 12), 2.5, dtype=np.float32))
    with pytest.raises(LayoutError, match=r"label/0.npy holds labels that are not whole numbers: "
                                          r"\[2.5\]"):
        load_cityscapes(tmp_path)
    np.save(tmp_path / "train" / "label" / "0.npy", np.full((8, 12), 2.0, dtype=np.float32))
    np.save(tmp_path / "train" / "image" / "1.npy", np.full((8, 12, 3), np.nan, dtype=np.float32))
    with pytest.raises(LayoutError, match=r"image/1.npy holds NaN or Inf"):
        load_cityscapes(tmp_path)


def _rename_everywhere(split_dir: Path, old: str, new: str) -> None:
    for folder in split_dir.iterdir():
        (folder / old).rename(folder / new)


def test_a_file_numbered_far_beyond_the_others_is_named_without_listing_every_number(
        tmp_path: Path) -> None:
    """The gap message listed the missing numbers from a set of every number up to the
    highest: one empty file named 99999999999.npy in a data folder took 10**11 ints' memory.
    (Measured with a smaller number, whose set the old code could still build.)"""
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    (tmp_path / "train" / "image" / "2000000.npy").touch()
    tracemalloc.start()
    try:
        with pytest.raises(LayoutError, match=r"got 4 files up to 2000000.npy; missing e.g. "
                                              r"\[3, 4, 5, 6, 7, 8, 9, 10, 11, 12\]"):
            load_cityscapes(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB to name the gaps"


def test_an_npy_header_declaring_more_than_its_file_holds_is_refused_before_numpy_reads_it(
        tmp_path: Path) -> None:
    """A 192-byte image declaring (400000, 400000, 3) float32 (1.75 TiB) ended the load in
    numpy's MemoryError traceback; a claim that fits the machine's overcommit was allocated
    before numpy found the file short."""
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    image = tmp_path / "train" / "image" / "1.npy"
    with image.open("wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (400000, 400000, 3)})
        f.write(b"\0" * 64)
    with pytest.raises(LayoutError, match=r"1.npy: its header declares a float32 array of shape "
                                          r"\(400000, 400000, 3\) \(1,920,000,000,000 bytes\), "
                                          r"the file holds 64 after it"):
        load_cityscapes(tmp_path)


def test_loader_refuses_numbering_that_would_misname_instances(tmp_path: Path) -> None:
    """Files were sorted by number and given ids by position: with train files 0, 1, 4 file
    4.npy got id 2, so a request for file 2 forgot another image; a zero-padded copy
    ``01.npy`` next to ``1.npy`` loaded ``1.npy`` twice."""
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    _rename_everywhere(tmp_path / "train", "2.npy", "4.npy")
    with pytest.raises(LayoutError, match=r"train/image: expected files numbered 0.npy .. "
                                          r"2.npy without gaps .* got 3 files up to 4.npy; "
                                          r"missing e.g. \[2, 3\]"):
        load_cityscapes(tmp_path)
    _rename_everywhere(tmp_path / "train", "4.npy", "2.npy")
    for folder in (tmp_path / "train").iterdir():
        shutil.copy(folder / "1.npy", folder / "01.npy")
    with pytest.raises(LayoutError, match=r"expected files named <i>.npy without leading zeros "
                                          r"\(0.npy, 1.npy, ...\), got \['01.npy'\]"):
        load_cityscapes(tmp_path)
    for folder in (tmp_path / "train").iterdir():
        (folder / "01.npy").unlink()
    # Ids are file numbers: train file i is id i, val file j is id N_train + j.
    bench = load_cityscapes(tmp_path)
    for split, dataset, first in (("train", bench.train, 0), ("val", bench.test, 3)):
        for j in range(len(dataset)):
            image = torch.from_numpy(np.load(tmp_path / split / "image" / f"{j}.npy"))
            row = dataset.positions_of([first + j])[0]
            assert torch.allclose(dataset.inputs[row], (image.permute(2, 0, 1) - 0.5) / 0.25)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_loader_refuses_a_fifo_or_directory_named_like_an_instance(tmp_path: Path) -> None:
    """A FIFO named train/depth/1.npy made `train` hang forever (np.load waited for a writer);
    a directory failed with numpy's IsADirectoryError. Both are refused naming the file."""
    import threading

    _write_libmtl(tmp_path, with_normals=True)
    fifo = tmp_path / "train" / "depth" / "1.npy"
    fifo.unlink()
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            load_nyuv2(tmp_path)
        except BaseException as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # blocked in open(): a writer that closes at once unblocks it
        with open(fifo, "wb"):
            pass
        thread.join(timeout=30)
        pytest.fail(f"loading hung on the FIFO {fifo}")
    assert len(errors) == 1 and isinstance(errors[0], LayoutError), errors
    assert str(errors[0]) == (f"{fifo} is a FIFO (named pipe), not a regular file: every "
                              "<i>.npy of the layout must be a .npy array file")
    fifo.unlink()
    fifo.mkdir()
    with pytest.raises(LayoutError, match=re.escape(f"{fifo} is a directory, not a regular")):
        load_nyuv2(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_loader_closes_its_descriptor_when_the_check_before_reading_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between `os.open` and `os.fdopen` only the checks' own refusals closed the descriptor:
    an exception from `os.fstat` (or an interrupt there) left it open for the process's life."""
    _write_libmtl(tmp_path, with_normals=True)
    real_fstat = os.fstat

    def failing_fstat(fd: int) -> os.stat_result:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).suffix == ".npy":
            raise OSError(5, "Input/output error")
        return real_fstat(fd)

    open_before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fstat", failing_fstat)
    for _ in range(3):
        with pytest.raises(OSError, match="Input/output error"):
            load_nyuv2(tmp_path)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_loader_says_a_file_is_no_npy_array_without_advising_pickles(tmp_path: Path) -> None:
    """A text file named train/image/1.npy gave numpy's "This file contains pickled (object)
    data. If you trust the file you can load it unsafely using the `allow_pickle=` keyword":
    it is no pickle, and the advice would run a file's code."""
    _write_libmtl(tmp_path, with_normals=True)
    path = tmp_path / "train" / "image" / "1.npy"
    path.write_text("garbage\n")
    with pytest.raises(LayoutError) as caught:
        load_nyuv2(tmp_path)
    assert str(caught.value) == (f"{path} is not a .npy array file (it starts with b'garbag', "
                                 "not numpy's .npy header b'\\x93NUMPY'); save each instance "
                                 "with numpy.save")
    assert "pickle" not in str(caught.value)
    path.write_bytes(b"")
    with pytest.raises(LayoutError, match=r"is not a .npy array file \(it is empty, not numpy's"):
        load_nyuv2(tmp_path)


def test_loader_refuses_one_file_behind_two_instance_names(tmp_path: Path) -> None:
    """With train/image/2.npy a symbolic link to 1.npy one image had ids 1 and 2, so forgetting
    id 1 left it in the retain set as id 2. A hard link, and a val image linked to a train one,
    are the same file too. Label maps may share a file (a deduplicated copy of identical
    labels): two images with equal labels are two instances."""
    _write_libmtl(tmp_path, with_normals=True)
    image = tmp_path / "train" / "image"
    (image / "2.npy").unlink()
    (image / "2.npy").symlink_to("1.npy")
    with pytest.raises(LayoutError) as caught:
        load_nyuv2(tmp_path)
    assert str(caught.value) == (
        f"{image / '2.npy'} and {image / '1.npy'} are the same file (a symbolic or hard link): "
        "one instance would have two ids, and forgetting one id would leave it in the data "
        "under the other; give each instance its own file")
    (image / "2.npy").unlink()
    os.link(image / "0.npy", image / "2.npy")
    with pytest.raises(LayoutError, match=r"image/2.npy and .*image/0.npy are the same file"):
        load_nyuv2(tmp_path)
    (image / "2.npy").unlink()
    shutil.copy(image / "0.npy", image / "2.npy")  # a copy is another file: loads
    val = tmp_path / "val" / "image" / "1.npy"
    val.unlink()
    val.symlink_to(tmp_path / "train" / "image" / "1.npy")
    with pytest.raises(LayoutError, match=r"val/image/1.npy and .*train/image/1.npy are the same"):
        load_nyuv2(tmp_path)
    val.unlink()
    shutil.copy(tmp_path / "train" / "image" / "1.npy", val)
    depth = tmp_path / "train" / "depth"
    (depth / "2.npy").unlink()
    os.link(depth / "1.npy", depth / "2.npy")  # one label file for two images: loads
    loaded = load_nyuv2(tmp_path)
    assert len(loaded.train) == 3
    assert torch.equal(loaded.train.targets["depth"][1], loaded.train.targets["depth"][2])


@pytest.mark.parametrize("folder, value, message", [
    ("image", lambda a: a * 255, r"image/0.npy: image must be RGB in \[0, 1\], got values in "
                                 r"\[.*\] \(dtype float32\); divide images stored in \[0, 255\]"),
    ("image", lambda a: (a * 255).astype(np.uint8), r"\(dtype uint8\); divide images"),
    ("depth", lambda a: a - 10, r"depth/0.npy: depth must be >= 0 \(0 = unknown\), got values "
                                r"down to -"),
    ("depth", lambda a: np.where(a > 4, np.inf, a), r"depth/0.npy holds Inf depth values"),
    ("normal", lambda a: (a + 1) / 2, r"normal/0.npy: normals must be unit vectors \(all zero = "
                                      r"unknown\), got lengths up to"),
    ("normal", lambda a: a * 255, r"normals must be unit vectors"),
    ("label", lambda a: np.full(a.shape, "x"), r"label/0.npy: label must hold real numbers \(a "
                                              r"float or integer dtype\), got dtype <U1"),
    ("label", lambda a: np.where(a > 5, np.nan, a), r"label/0.npy holds NaN or Inf labels"),
    ("depth", lambda a: a.astype(np.complex64), r"depth must hold real numbers .* complex64"),
    ("label", lambda a: np.where(a > 5, 15, a), r"labels outside \[-1, 13\): \[15\]; "
                                               r"`num_classes` must be the label set's"),
    ("label", lambda a: np.where(a > 5, 255, a),
     r"labels outside \[-1, 13\): \[255\]; if 255 marks unlabelled pixels, map it to -1 \(the "
     r"layout's unlabelled value\); otherwise `num_classes` must be"),
    ("depth", lambda a: (a * 1000).astype(np.uint16),  # millimetres as integers
     r"depth/0.npy: depth must be in metres \(0 = unknown\), got values up to \d+, beyond"),
    ("depth", lambda a: np.where(a > 4, np.float32(65535), a),
     r"depth/0.npy: depth must be in metres \(0 = unknown\), got values up to 65535, beyond "
     r"1000 m; convert millimetres \(divide by 1000\) and mark missing pixels with 0, not "
     r"65535"),
    ("depth", lambda a: a * 1000, r"got values up to \d+\.?\d*, beyond 1000 m"),
    ("image", lambda a: a[:0], r"image/0.npy: image is empty \(shape \(0, 12, 3\)\)"),
    ("label", lambda a: a[:, :0], r"label/0.npy: label is empty \(shape \(8, 0\)\)"),
])
def test_loader_refuses_values_no_loss_can_use(tmp_path: Path, folder, value, message) -> None:
    """Each loaded without a word (an image in [0, 255] became inputs up to ~1000, normals
    stored as colours trained a wrong cosine, negative depth was silently unlabelled) or
    failed inside numpy (string labels)."""
    _write_libmtl(tmp_path, with_normals=True)
    path = tmp_path / "train" / folder / "0.npy"
    np.save(path, value(np.load(path)))
    with pytest.raises(LayoutError, match=message):
        load_nyuv2(tmp_path)


def test_resized_targets_stay_aligned_with_the_resized_image(tmp_path: Path) -> None:
    """Labels, depth and normals were taken from each 4 x 4 block's top-left pixel
    (``nearest``), 1.5 source pixels from the block's centre, where the image's sample sits.
    Now the maps take the pixel nearest that centre (``nearest-exact``: row/column 2 of 0..3),
    and the image is filtered (antialiased) around it: a ramp across the columns reads the
    ramp's value at each block's centre (interior blocks; the border ones are clipped)."""
    _write_libmtl(tmp_path, with_normals=True, hw=(8, 16))
    ramp = np.broadcast_to((np.arange(16, dtype=np.float32) / 16)[None, :, None], (8, 16, 3))
    np.save(tmp_path / "train" / "image" / "0.npy", np.ascontiguousarray(ramp))
    label = np.load(tmp_path / "train" / "label" / "0.npy")
    depth = np.load(tmp_path / "train" / "depth" / "0.npy")
    small = load_nyuv2(tmp_path, size=(2, 4))
    assert torch.equal(small.train.targets["segmentation"][0],
                       torch.from_numpy(label[2::4, 2::4]).long())
    assert torch.equal(small.train.targets["depth"][0, 0], torch.from_numpy(depth[2::4, 2::4, 0]))
    rgb = small.train.inputs[0] * 0.25 + 0.5
    centres = (4 * torch.arange(4) + 1.5) / 16
    assert torch.allclose(rgb[:, :, 1:3], centres[1:3].expand(3, 2, 2), atol=1e-6)


def test_resized_images_are_filtered_not_sampled(tmp_path: Path) -> None:
    """Mutation review: a ramp reads the same with or without antialiasing, so dropping it
    passed. Columns lit one in four (3, 7, 11, 15) average to 0.25 over each 4-column block;
    a plain bilinear sample between columns 1 and 2 of each block reads 0."""
    _write_libmtl(tmp_path, with_normals=True, hw=(8, 16))
    lit = np.broadcast_to((np.arange(16) % 4 == 3).astype(np.float32)[None, :, None],
                          (8, 16, 3))
    np.save(tmp_path / "train" / "image" / "0.npy", np.ascontiguousarray(lit))
    rgb = load_nyuv2(tmp_path, size=(2, 4)).train.inputs[0] * 0.25 + 0.5
    assert torch.allclose(rgb[:, :, 1:3], torch.full((3, 2, 2), 0.25), atol=0.02)


def test_integer_depth_in_whole_metres_loads(tmp_path: Path) -> None:
    """Mutation review: depth stored as integers in metres (within the range) is depth; only
    values beyond 1000 m are refused (an integer-dtype refusal came back unnoticed)."""
    _write_libmtl(tmp_path, with_normals=True)
    metres = np.rint(np.load(tmp_path / "train" / "depth" / "0.npy")).astype(np.uint16)
    np.save(tmp_path / "train" / "depth" / "0.npy", metres)
    depth = load_nyuv2(tmp_path).train.targets["depth"][0]
    assert depth.dtype == torch.float32
    assert torch.equal(depth, torch.from_numpy(metres.astype(np.float32)).permute(2, 0, 1))


def test_loader_records_every_files_digest_of_both_splits(tmp_path: Path) -> None:
    import hashlib

    _write_libmtl(tmp_path, with_normals=True)
    bench = load_nyuv2(tmp_path)
    for split, key, count in (("train", "train_files_sha256", 3), ("val", "test_files_sha256", 2)):
        digests = bench.info[key]
        assert list(digests) == [f"{folder}/{i}.npy" for folder in
                                 ("depth", "image", "label", "normal") for i in range(count)]
        for name, digest in digests.items():
            assert digest == hashlib.sha256((tmp_path / split / name).read_bytes()).hexdigest()


def test_loader_reads_nan_as_unknown_and_checks_its_arguments(tmp_path: Path) -> None:
    _write_libmtl(tmp_path, with_normals=True)
    depth = np.load(tmp_path / "train" / "depth" / "0.npy")
    depth[1, 1, 0] = np.nan  # unknown, as the losses read it
    np.save(tmp_path / "train" / "depth" / "0.npy", depth)
    assert torch.isnan(load_nyuv2(tmp_path).train.targets["depth"][0, 0, 1, 1])
    # These failed inside torch (size (0, 5), max_train 0) or were taken by Python's slicing
    # (max_train -1 dropped the last file).
    for kwargs, shown in (({"size": (0, 5)}, "nyuv2: `size` must be None or (height, width), "
                                             "two integers >= 1, got (0, 5)"),
                          ({"size": (4,)}, "got (4,)"), ({"size": (4.5, 6)}, "got (4.5, 6)"),
                          ({"max_train": 0}, "`max_train` must be None or an integer >= 1, "
                                             "got 0"),
                          ({"max_train": -1}, "got -1"), ({"max_test": True}, "got True")):
        with pytest.raises(ValueError, match=re.escape(shown)):
            load_nyuv2(tmp_path, **kwargs)
    assert load_nyuv2(tmp_path, size=[4, 6]).train.inputs.shape == (3, 3, 4, 6)


# -- registry and cache --------------------------------------------------------------------------

def test_tiny_benchmarks_generate_and_are_cached(tmp_path: Path, monkeypatch) -> None:
    # No wall-clock bound: on a shared machine it measured the load, not the code.
    for name in ("indoor", "street"):
        bench = load_benchmark(name, size="tiny", seed=1, cache_dir=tmp_path)
        assert (len(bench.train), len(bench.test)) == (48, 24)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)  # no temp files left
    # A second load reads the cache: generating again would fail here.
    def boom(*args, **kwargs):
        raise AssertionError("generator called despite the cache")
    monkeypatch.setitem(registry._GENERATED, "indoor", (boom, *registry._GENERATED["indoor"][1:]))
    cached = load_benchmark("indoor", size="tiny", seed=1, cache_dir=tmp_path)
    fresh = make_indoor(48, 24, size=(24, 32), seed=1)
    _assert_same(cached, fresh)
    assert cached.info["classes"] == fresh.info["classes"]
    assert cached.info["train_cameras"] == fresh.info["train_cameras"]
    json.dumps(cached.info)  # plain values only
    assert cached.tasks == fresh.tasks


def test_cache_location_key_and_corruption(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MTUNLEARN_CACHE", str(tmp_path / "env-cache"))
    a = load_benchmark("street", size="tiny", seed=0)
    files = list((tmp_path / "env-cache").iterdir())
    assert len(files) == 1 and "street-tiny-seed0" in files[0].name
    load_benchmark("street", size="tiny", seed=1)
    assert len(list((tmp_path / "env-cache").iterdir())) == 2
    # A truncated cache file is regenerated (with a warning), never trusted.
    files[0].write_bytes(files[0].read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="regenerating"):
        b = load_benchmark("street", size="tiny", seed=0)
    _assert_same(a, b)
    assert os.path.getsize(files[0]) > 1000


def test_registry_names_and_errors(tmp_path: Path) -> None:
    digits = load_benchmark("digits", size="tiny")
    assert digits.train.task_names == ["digit", "parity", "magnitude"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("imagenet")
    with pytest.raises(ValueError, match="unknown size"):
        load_benchmark("indoor", size="huge")  # type: ignore[arg-type]
    for name, seed in (("digits", -1), ("indoor", -1), ("street", 1.5), ("indoor", True)):
        with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0, got "):
            load_benchmark(name, size="tiny", seed=seed, use_cache=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="data_root"):
        load_benchmark("nyuv2")
    _write_libmtl(tmp_path, with_normals=True)
    nyu = load_benchmark("nyuv2", size="tiny", data_root=tmp_path)
    assert nyu.train.inputs.shape[-2:] == (72, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uncached = load_benchmark("indoor", size="tiny", use_cache=False)
    assert len(uncached.train) == 48


def test_registry_attaches_the_default_recipe() -> None:
    from mtunlearn_ext.models import build_model
    from mtunlearn_ext.training import TrainConfig

    digits = load_benchmark("digits", size="tiny")
    indoor = load_benchmark("indoor", size="tiny", use_cache=False)
    for bench in (digits, indoor):
        assert TrainConfig(**bench.info["train_config"]).epochs > 0
        json.dumps(bench.info)  # plain values only
    model = build_model(indoor)
    recipe = indoor.info["model_config"]
    assert model.backbone.out_channels == recipe["widths"][0]
    assert model.heads["depth"][0][0].out_channels == recipe["head_hidden"]


# -- values no loss can use ----------------------------------------------------------------------


def _dense_set(n: int = 4) -> MultiTaskDataset:
    specs = [TaskSpec("seg", "segmentation", num_classes=3, ignore_index=255),
             TaskSpec("depth", "depth"), TaskSpec("normals", "normals"),
             TaskSpec("kind", "classification", num_classes=2), TaskSpec("size", "regression")]
    targets = {"seg": torch.zeros(n, 2, 2, dtype=torch.long),
               "depth": torch.ones(n, 1, 2, 2), "normals": torch.tensor([0., 0., 1.])
               .view(1, 3, 1, 1).expand(n, 3, 2, 2).clone(),
               "kind": torch.zeros(n, dtype=torch.long), "size": torch.zeros(n, 2)}
    return MultiTaskDataset(torch.zeros(n, 3, 2, 2), targets, specs, torch.arange(10, 10 + n))


def test_check_values_accepts_labelled_and_unlabelled_conventions() -> None:
    data = _dense_set()
    data.targets["seg"][0, 0, 0] = 255            # ignore_index
    data.targets["depth"][1, 0, 0, 0] = 0.0        # unknown depth
    data.targets["depth"][1, 0, 0, 1] = float("nan")  # NaN depth reads as unlabelled
    data.targets["normals"][2, :, 0, 0] = 0.0      # unknown normal
    data.targets["size"][3] = float("nan")         # an unsupervised pair: never read
    data.supervision[3, 4] = False
    data.check_values("test set")
    MultiTaskDataset(torch.zeros(0, 3), {}, []).check_values()  # empty: nothing to check


def test_check_values_refuses_normals_that_are_no_unit_vectors() -> None:
    """Normals stored as colours ((n + 1) / 2 in [0, 1], or x 255) given through the API were
    taken as they were (only the LibMTL loader checked them): every angle of the loss and the
    metrics was taken of the wrong vectors without a word. Unit vectors, zero vectors
    (unlabelled) and normals a little short (resampled) pass."""
    data = _dense_set()
    data.targets["normals"][1, :, 0, 0] = torch.tensor([0.0, 0.6, 0.76])  # 0.97: resampled
    data.targets["normals"][2, :, 1, 1] = 0.0  # unlabelled
    data.check_values("test set")
    coloured = (data.targets["normals"] + 1) / 2  # (0.5, 0.5, 1): length 1.22
    data.targets["normals"] = coloured
    with pytest.raises(ValueError, match=re.escape(
            "test set: task 'normals' (normals) needs unit vectors (the zero vector: "
            "unlabelled), got a normal of length over 1.1 on row 0 (id 10); map normals stored "
            "as colours in [0, 1] or [0, 255] back to [-1, 1] first")):
        data.check_values("test set")
    data.supervision[0, data.task_index("normals")] = False  # an unsupervised row: never read
    with pytest.raises(ValueError, match=r"length over 1.1 on row 1 \(id 11\)"):
        data.check_values("test set")
    data.targets["normals"] = data.targets["normals"] * 0.5  # most far shorter than 1
    data.targets["normals"][3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    with pytest.raises(ValueError, match=r"got 8 of its 12 labelled normals shorter than 0.9"):
        data.check_values("test set")


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.inputs.__setitem__((2, 1, 0, 0), float("inf")),
     r"test set: the inputs hold NaN or Inf in 1 rows \(first: row 2, id 12\)"),
    (lambda d: d.targets["seg"].__setitem__((1, 1, 1), 3),
     r"task 'seg' \(segmentation\) has labels outside \[0, 3\) other than ignore_index 255 on "
     r"1 supervised rows \(first: row 1, id 11\)"),
    (lambda d: d.targets["kind"].__setitem__(3, 2),
     r"task 'kind' \(classification\) has labels outside \[0, 2\)"),
    (lambda d: d.targets["depth"].__setitem__((0, 0, 1, 1), float("inf")),
     r"task 'depth' \(depth\) has NaN or Inf values at labelled pixels"),
    (lambda d: d.targets["normals"].__setitem__((2, 0, 0, 0), float("inf")),
     r"task 'normals' \(normals\) has NaN or Inf values at labelled pixels"),
    (lambda d: d.targets["size"].__setitem__((1, 0), float("nan")),
     r"task 'size' \(regression\) has NaN or Inf targets on 1 supervised rows \(first: row 1"),
])
def test_check_values_names_the_set_task_and_row(corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    data = _dense_set()
    corrupt(data)
    with pytest.raises(ValueError, match=message):
        data.check_values("test set")


def test_check_values_rejects_fractional_class_labels() -> None:
    specs = [TaskSpec("kind", "classification", num_classes=3)]
    data = MultiTaskDataset(torch.zeros(2, 1), {"kind": torch.tensor([0.0, 1.5])}, specs)
    with pytest.raises(ValueError, match="integer class labels"):
        data.check_values()


def test_batches_carry_neutral_targets_on_unsupervised_pairs() -> None:
    data = _dense_set()
    data.supervision[1] = False  # row 1: every pair unsupervised, its targets garbage
    data.targets["seg"][1] = 7
    data.targets["depth"][1] = float("nan")
    data.targets["normals"][1] = float("inf")
    data.targets["kind"][1] = 99
    data.targets["size"][1] = float("nan")
    stored = {k: v.clone() for k, v in data.targets.items()}
    batch = data.batch([0, 1, 2])
    targets = batch["targets"]
    assert bool((targets["seg"][1] == 255).all()) and int(targets["kind"][1]) == -1
    assert bool((targets["depth"][1] == 0).all()) and bool((targets["normals"][1] == 0).all())
    assert bool((targets["size"][1] == 0).all())
    for name in stored:  # supervised rows untouched, the stored data never modified
        assert torch.equal(targets[name][[0, 2]], stored[name][[0, 2]])
        assert torch.equal(data.targets[name].nan_to_num(), stored[name].nan_to_num())
    item = data[1]
    assert all(torch.equal(item["targets"][k], targets[k][1]) for k in targets)
    assert torch.equal(data[0]["targets"]["seg"], stored["seg"][0])
    # uint8 labels cannot hold ignore_index -1: widened, not wrapped to 255 (a valid class).
    labels = torch.tensor([1, 200], dtype=torch.uint8)
    narrow = MultiTaskDataset(torch.zeros(2, 1), {"kind": labels},
                              [TaskSpec("kind", "classification", num_classes=256)],
                              supervision=torch.tensor([[True], [False]]))
    assert narrow.batch([0, 1])["targets"]["kind"].tolist() == [1, -1]


def test_rows_without_a_label_are_unsupervised_when_no_mask_is_given() -> None:
    """Each kind's "no label" value, over a whole row, makes the row no pair of its task (the
    losses' labelled-pixel rules); a row with one labelled element is a pair."""
    from mtunlearn_ext.data.base import labelled_rows

    seg = torch.full((3, 2, 2), 255)
    seg[1, 0, 1] = 4
    seg[2] = 0
    depth = torch.zeros(3, 1, 2, 2)
    depth[1, 0, 1, 1] = 2.5
    depth[2] = float("nan")  # NaN reads as unlabelled
    normals = torch.zeros(3, 3, 2, 2)
    normals[0, 2, 0, 0] = 1.0
    cls = torch.tensor([-1, 2, 0])
    specs = [TaskSpec("seg", "segmentation", num_classes=5, ignore_index=255),
             TaskSpec("depth", "depth"), TaskSpec("normals", "normals"),
             TaskSpec("cls", "classification", num_classes=3), TaskSpec("reg", "regression")]
    targets = {"seg": seg, "depth": depth, "normals": normals, "cls": cls,
               "reg": torch.zeros(3, 2)}
    assert {s.name: labelled_rows(s, targets[s.name]).tolist() for s in specs} == {
        "seg": [False, True, True], "depth": [False, True, False],
        "normals": [True, False, False], "cls": [False, True, True], "reg": [True, True, True]}
    data = MultiTaskDataset(torch.zeros(3, 4), targets, specs)
    assert data.supervision.tolist() == [[False, False, True, False, True],
                                         [True, True, False, True, True],
                                         [True, False, False, True, True]]


def test_positions_of_finds_ids_in_the_order_asked_and_names_the_missing() -> None:
    """By sort and binary search (a dict of every id took ~0.2 s per call at a million rows):
    the same positions as a dict lookup, in the order asked, repeats kept; unknown ids named
    in that order; an empty set or query."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(1000, generator=g)[:300] * 7 - 2000  # unique, unordered, negative too
    data = MultiTaskDataset(torch.zeros(300, 1), {"a": torch.zeros(300, dtype=torch.long)},
                            [TaskSpec("a", "classification", num_classes=2)], ids)
    lookup = {int(i): p for p, i in enumerate(ids.tolist())}
    wanted = ids[torch.randint(0, 300, (50,), generator=g)].tolist() + [int(ids[5])] * 2
    assert data.positions_of(wanted).tolist() == [lookup[i] for i in wanted]
    assert data.positions_of(torch.tensor(wanted)).dtype == torch.long
    with pytest.raises(KeyError, match=r"not in the data set: \[-1999, 5000\] \(2 in all\)"):
        data.positions_of([int(ids[0]), -1999, 5000])
    assert data.positions_of([]).tolist() == []
    empty = data.subset(torch.zeros(300, dtype=torch.bool))
    assert empty.positions_of([]).tolist() == []
    with pytest.raises(KeyError, match=r"\[3\] \(1 in all\)"):
        empty.positions_of([3])
    # The sorted ids are kept per set: one with another supervision shares them, a subset
    # sorts its own (and repeated rows are still refused), a set without them sorts anew.
    relabelled = data.with_supervision(~data.supervision)
    assert relabelled.positions_of(wanted).tolist() == [lookup[i] for i in wanted]
    part = data.subset(torch.arange(299, 99, -1))
    assert part.positions_of([int(ids[150])]).tolist() == [149]
    # Named as the caller passed them: positions, not the `ids` of the set it would build.
    with pytest.raises(ValueError, match=rf"^MultiTaskDataset\.subset: `positions` must name "
                                         rf"each row at most once: position 3 \(id "
                                         rf"{int(ids[3])}\) appears 2 times \(positions "
                                         rf"repeated: 1\)$"):
        data.subset([3, 5, 3])
    del data._id_order
    assert data.positions_of(wanted).tolist() == [lookup[i] for i in wanted]


def test_positions_of_refuses_ids_it_would_truncate_or_overflow() -> None:
    """``torch.as_tensor(ids, dtype=long)`` found id 43 for 43.9 and id 1 for a mask's True
    (instances never named), and raised a bare "Overflow when unpacking long long" for an id
    of 2**63, from ``positions_of`` and from a request's ``validate``."""
    data = MultiTaskDataset(torch.zeros(3, 1), {"a": torch.zeros(3, dtype=torch.long)},
                            [TaskSpec("a", "classification", num_classes=2)],
                            torch.tensor([43, 1, 70]))
    for fraction in ([43.9], torch.tensor([43.5]), np.array([70.2])):
        with pytest.raises(ValueError, match=r"positions_of: `instance_ids` must be integers, "
                                             r"got torch.float(32|64) values \[(43|70)\."):
            data.positions_of(fraction)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`instance_ids` must be integers, got torch.bool"):
        data.positions_of(torch.tensor([True]))
    # Review: torch converts a list mixing ids and bools to ids, True to 1 (the row of id 1);
    # ForgetRequest refused it already.
    for mixed, flag in (([43, True], "True"), ((False, 70), "False"), ([[43], [True]], "True"),
                        ([43.0, True], "True"), ([70, torch.tensor(True)], "tensor(True)")):
        with pytest.raises(ValueError, match=rf"^MultiTaskDataset\.positions_of: `instance_ids` "
                                             rf"must be integers, got bool "
                                             rf"{re.escape(flag)} among "
                                             rf"{re.escape(repr(mixed))} \(it would be read as "
                                             rf"id {int(flag != 'False')}\)$"):
            data.positions_of(mixed)  # type: ignore[arg-type]
    for huge, shown in (([2 ** 63], "9223372036854775808"),
                        (torch.tensor([1e20], dtype=torch.float64), "1e+20")):
        with pytest.raises(ValueError, match=r"`instance_ids` must be integers in the int64 "
                                             r"range \[-2\*\*63, 2\*\*63\), got "
                                             + re.escape(shown)):
            data.positions_of(huge)
        with pytest.raises(ValueError, match=r"`instance_ids` must be integers in the int64"):
            ForgetRequest.create(huge).validate(data)
    # Integral values of any type still find their rows, exactly (2**24 + 1 not via float32).
    assert data.positions_of([43.0, 70]).tolist() == [0, 2]
    assert data.positions_of(np.array([1, 70])).tolist() == [1, 2]
    big = MultiTaskDataset(torch.zeros(2, 1), {"a": torch.zeros(2, dtype=torch.long)},
                           [TaskSpec("a", "classification", num_classes=2)],
                           torch.tensor([16777216, 16777217]))
    assert big.positions_of([16777217.0]).tolist() == [1]


def test_forget_request_sorts_a_set_of_target_tasks() -> None:
    """A set of strings iterates in its hashes' order, which PYTHONHASHSEED draws anew in every
    process: ``ForgetRequest.create(ids, {"digit", "parity"})`` held (and recorded) its tasks
    in one order or the other from run to run. A list keeps its order."""
    candidates = [frozenset(f"task{i}_{j}" for j in range(5)) for i in range(20)]
    names = next(c for c in candidates if list(c) != sorted(c))  # 1 in 120 iterate sorted
    assert ForgetRequest.create([0], set(names)).target_tasks == tuple(sorted(names))
    assert ForgetRequest([0], names).target_tasks == tuple(sorted(names))
    assert ForgetRequest.create([0], ["b", "a"]).target_tasks == ("b", "a")


def test_a_cache_that_cannot_be_written_is_warned_of_not_fatal(tmp_path: Path) -> None:
    """A cache folder that cannot be made or written (a read-only home, MTUNLEARN_CACHE naming
    a file) made the load of the data just generated fail, and `mtunlearn train` then blamed
    --data-root ("expected a folder holding 'street' in LibMTL's layout, got None")."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match=r"cannot write cache file .*a-file.*; using the "
                                            r"generated data without caching it"):
        bench = load_benchmark("street", size="tiny", seed=0, cache_dir=blocker / "cache")
    _assert_same(bench, load_benchmark("street", size="tiny", seed=0, use_cache=False))
    assert blocker.read_text() == "not a folder"


def test_generators_refuse_a_seed_that_is_no_integer() -> None:
    """``make_digits(seed=None)`` passed None to scikit-learn's random_state, which draws a
    fresh split: other training ids at every call, recorded as seed None. ``make_street`` took
    True for seed 1 and failed inside NumPy for None."""
    with pytest.raises(ValueError, match=r"make_digits: `seed` must be an integer in \[0, "
                                         r"2\*\*32\) \(the split's random_state\), got None"):
        make_digits(seed=None, num_samples=40)  # type: ignore[arg-type]
    for seed in (True, 1.0, -1, 2 ** 32):
        with pytest.raises(ValueError, match=r"make_digits: `seed` must be an integer"):
            make_digits(seed=seed, num_samples=40)  # type: ignore[arg-type]
    assert make_digits(seed=np.int64(3), num_samples=40).train.ids.tolist() == \
        make_digits(seed=3, num_samples=40).train.ids.tolist()
    small = {"num_train": 1, "num_test": 1, "num_validation": 0, "size": (8, 8)}
    for seed in (None, True, 1.0, -1):
        with pytest.raises(ValueError, match=r"make_street: `seed` must be an integer >= 0, "
                                             rf"got {re.escape(repr(seed))}$"):
            make_street(seed=seed, **small)  # type: ignore[arg-type]
    assert torch.equal(make_street(seed=np.int64(1), **small).train.inputs,
                       make_street(seed=1, **small).train.inputs)


@pytest.mark.parametrize("name", ["1٠.npy", "٢.npy"])  # Arabic-Indic zero / two
def test_loader_names_file_numbers_in_other_digits(tmp_path: Path, name: str) -> None:
    """A name numbered in Unicode digits, which ``int()`` reads: beside 0..2, ``1٠.npy`` was
    taken for instance 10 ("got 4 files up to 10.npy", of which there is none), and
    ``٢.npy`` was refused as having leading zeros."""
    _write_libmtl(tmp_path, with_normals=False, num_classes=7)
    for folder in (tmp_path / "train").iterdir():
        shutil.copy(folder / "0.npy", folder / name)
    with pytest.raises(LayoutError, match=r"train/image: expected files named <i>.npy in ASCII "
                                          rf"digits \(0.npy, 1.npy, ...\), got \['{name}'\]$"):
        load_cityscapes(tmp_path)
