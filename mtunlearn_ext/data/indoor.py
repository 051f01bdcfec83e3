"""``indoor``: NYUv2-like rendered rooms with segmentation, depth and surface-normal targets.

Each image is a random room seen from a random camera: floor, ceiling, left/right/back walls, and
furniture built from boxes, spheres and vertical cylinders (beds with headboards, cabinets, tables
and chairs on legs, sofas with a back and arms, floor lamps, bins), plus pictures, windows and TVs
painted on the walls. 13 classes, as many as NYUv2's 13-class labelling (:data:`INDOOR_CLASSES`).

Targets (see :mod:`mtunlearn_ext.data._raycast` for the camera model):

* ``segmentation`` ``[H, W]`` long: the class of the first surface hit.
* ``depth`` ``[1, H, W]``: **z-depth** in metres (along the optical axis, as a Kinect reports it),
  ``0`` (unknown) on window pixels, mimicking depth sensors that fail on glass.
* ``normals`` ``[3, H, W]``: unit surface normals in the camera frame (``x`` right, ``y`` up,
  ``z`` forward), facing the camera; a floor seen by an unrotated camera has normal ``(0, 1, 0)``.

Input RGB: Lambertian shading of per-class albedos (jittered per instance, with class-specific
textures: floor tiles, striped sheets, wood grain, picture patterns) under a ceiling point light
plus ambient light; windows, lamps and TVs are emissive; Gaussian pixel noise; then normalised as
``(rgb - 0.5) / 0.25``. The same ``seed`` gives bit-identical tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mtunlearn_ext.data._raycast import RayHits, Scene, cast
from mtunlearn_ext.data._rendered import RenderedKind, make_rendered_benchmark
from mtunlearn_ext.data.base import Benchmark, TaskSpec

__all__ = ["INDOOR_CLASSES", "INDOOR_FOV_X", "INDOOR_VERSION", "indoor_tasks", "make_indoor",
           "render_indoor", "sample_indoor_scene"]

INDOOR_VERSION = 1
"""Bumped whenever the generated data change (it keys the on-disk cache)."""

INDOOR_CLASSES: tuple[str, ...] = ("wall", "floor", "ceiling", "bed", "cabinet", "table", "chair",
                                   "sofa", "picture", "window", "tv", "lamp", "bin")
(WALL, FLOOR, CEILING, BED, CABINET, TABLE, CHAIR, SOFA, PICTURE, WINDOW, TV, LAMP,
 BIN) = range(len(INDOOR_CLASSES))

INDOOR_FOV_X = math.radians(62.0)
"""Horizontal field of view (NYUv2's Kinect: about 58 degrees)."""

RGB_MEAN, RGB_STD = 0.5, 0.25
DEPTH_PRIOR = 3.0  # metres: a constant of the generator (typical depth), for the depth head's init

_ALBEDO = {
    WALL: (0.78, 0.74, 0.66), FLOOR: (0.55, 0.38, 0.22), CEILING: (0.93, 0.93, 0.90),
    BED: (0.85, 0.86, 0.95), CABINET: (0.42, 0.28, 0.16), TABLE: (0.66, 0.50, 0.30),
    CHAIR: (0.28, 0.30, 0.36), SOFA: (0.62, 0.16, 0.16), PICTURE: (0.70, 0.55, 0.30),
    WINDOW: (0.78, 0.90, 1.00), TV: (0.05, 0.05, 0.08), LAMP: (1.00, 0.93, 0.65),
    BIN: (0.20, 0.50, 0.32),
}
_EMISSIVE = (WINDOW, TV, LAMP)


def indoor_tasks() -> list[TaskSpec]:
    """The three tasks: 13-class segmentation, depth, normals."""
    return [TaskSpec("segmentation", "segmentation", num_classes=len(INDOOR_CLASSES)),
            TaskSpec("depth", "depth"), TaskSpec("normals", "normals")]


def _rgb(values: np.ndarray) -> tuple[float, float, float]:
    """The three entries of ``values`` as Python floats."""
    r, g, b = (float(v) for v in values)
    return r, g, b


def _albedo(rng: np.random.Generator, cls: int, jitter: float = 0.15) -> tuple[float, float, float]:
    base = np.asarray(_ALBEDO[cls]) * rng.uniform(1 - jitter, 1 + jitter, size=3)
    return _rgb(np.clip(base, 0.0, 1.0))


def sample_indoor_scene(rng: np.random.Generator) -> Scene:
    """One random room (geometry, classes and albedos), drawn from ``rng``.

    World frame as in :mod:`~mtunlearn_ext.data._raycast`: camera at the origin, floor at
    ``y = -camera_height``. Planes: 0 floor, 1 ceiling, 2 left wall, 3 right wall, 4 back wall.
    """
    height = rng.uniform(1.2, 1.7)
    floor_y = -height
    ceiling_y = rng.uniform(2.5, 3.0) - height
    x_left, x_right, z_back = -rng.uniform(1.6, 3.2), rng.uniform(1.6, 3.2), rng.uniform(4.5, 7.5)
    wall_albedo = _albedo(rng, WALL, jitter=0.25)
    scene = Scene(yaw=rng.uniform(-0.35, 0.35), pitch=rng.uniform(-0.3, 0.02),
                  camera_height=height)
    scene.planes = [(1, floor_y, FLOOR, _albedo(rng, FLOOR)),
                    (1, ceiling_y, CEILING, _albedo(rng, CEILING, 0.05)),
                    (0, x_left, WALL, wall_albedo), (0, x_right, WALL, wall_albedo),
                    (2, z_back, WALL, wall_albedo)]

    footprints: list[tuple[float, float, float, float]] = []

    def place(half_w: float, half_d: float, against_wall: bool) -> tuple[float, float] | None:
        """A free floor position (x, z) for a footprint, or None after a few tries."""
        x_lo, x_hi = x_left + half_w + 0.05, x_right - half_w - 0.05
        z_lo, z_hi = 1.3 + half_d, z_back - half_d - 0.05
        if x_lo >= x_hi or z_lo >= z_hi:
            return None
        for _ in range(20):
            x, z = rng.uniform(x_lo, x_hi), rng.uniform(z_lo, z_hi)
            if against_wall:
                side = rng.integers(3)
                x = x_lo if side == 0 else x_hi if side == 1 else x
                z = z_hi if side == 2 else z
            box = (x - half_w, x + half_w, z - half_d, z + half_d)
            if all(box[1] + 0.05 < f[0] or f[1] + 0.05 < box[0] or box[3] + 0.05 < f[2]
                   or f[3] + 0.05 < box[2] for f in footprints):
                footprints.append(box)
                return x, z
        return None

    def add_box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float, cls: int,
                albedo: tuple[float, float, float]) -> None:
        scene.boxes.append(((x0, y0, z0), (x1, y1, z1), cls, albedo))

    kinds = [BED, CABINET, TABLE, CHAIR, SOFA, LAMP, BIN]
    for cls in rng.choice(kinds, size=rng.integers(3, 9), p=[.1, .15, .18, .2, .1, .12, .15]):
        cls = int(cls)
        albedo = _albedo(rng, cls)
        if cls == BED:
            hw, hd = rng.uniform(0.7, 1.0), rng.uniform(0.9, 1.1)
            pos = place(hw, hd, against_wall=True)
            if pos:
                x, z = pos
                top = floor_y + rng.uniform(0.45, 0.6)
                add_box(x - hw, x + hw, floor_y, top, z - hd, z + hd, cls, albedo)
                add_box(x - hw, x + hw, floor_y, floor_y + rng.uniform(0.9, 1.2), z + hd - 0.08,
                        z + hd, cls, _albedo(rng, CABINET))
        elif cls == CABINET:
            hw, hd = rng.uniform(0.3, 0.6), rng.uniform(0.2, 0.3)
            pos = place(hw, hd, against_wall=True)
            if pos:
                x, z = pos
                add_box(x - hw, x + hw, floor_y, floor_y + rng.uniform(0.8, 2.0), z - hd, z + hd,
                        cls, albedo)
        elif cls in (TABLE, CHAIR):
            hw = rng.uniform(0.4, 0.8) if cls == TABLE else rng.uniform(0.2, 0.26)
            hd = rng.uniform(0.3, 0.5) if cls == TABLE else rng.uniform(0.2, 0.26)
            pos = place(hw, hd, against_wall=False)
            if pos:
                x, z = pos
                top = floor_y + (rng.uniform(0.7, 0.78) if cls == TABLE else rng.uniform(0.42, 0.5))
                add_box(x - hw, x + hw, top - 0.05, top, z - hd, z + hd, cls, albedo)
                leg = 0.04 if cls == TABLE else 0.03
                for sx in (-1, 1):
                    for sz in (-1, 1):
                        lx, lz = x + sx * (hw - leg - 0.02), z + sz * (hd - leg - 0.02)
                        add_box(lx - leg, lx + leg, floor_y, top - 0.05, lz - leg, lz + leg, cls,
                                albedo)
                if cls == CHAIR:
                    back_z = z + hd if rng.random() < 0.5 else z - hd
                    add_box(x - hw, x + hw, top, top + rng.uniform(0.4, 0.5), back_z - 0.03,
                            back_z + 0.03, cls, albedo)
        elif cls == SOFA:
            hw, hd = rng.uniform(0.8, 1.1), rng.uniform(0.4, 0.45)
            pos = place(hw, hd, against_wall=True)
            if pos:
                x, z = pos
                add_box(x - hw, x + hw, floor_y, floor_y + 0.45, z - hd, z + hd, cls, albedo)
                add_box(x - hw, x + hw, floor_y, floor_y + 0.85, z + hd - 0.18, z + hd, cls, albedo)
                for sx in (-1, 1):
                    ax = x + sx * (hw - 0.09)
                    add_box(ax - 0.09, ax + 0.09, floor_y, floor_y + 0.62, z - hd, z + hd, cls,
                            albedo)
        elif cls == LAMP:
            pos = place(0.2, 0.2, against_wall=False)
            if pos:
                x, z = pos
                top = floor_y + rng.uniform(1.1, 1.6)
                radius = rng.uniform(0.13, 0.22)
                scene.cylinders.append((x, z, 0.025, floor_y, top, cls, _albedo(rng, CHAIR)))
                scene.spheres.append(((x, top + radius * 0.7, z), radius, cls, albedo))
        else:  # BIN
            radius = rng.uniform(0.15, 0.3)
            pos = place(radius, radius, against_wall=False)
            if pos:
                x, z = pos
                scene.cylinders.append((x, z, radius, floor_y, floor_y + rng.uniform(0.3, 0.7),
                                        cls, albedo))

    # Pictures, windows and TVs on the walls: (plane, u range, v range) in plane coordinates.
    for cls, count, (w_lo, w_hi), (h_lo, h_hi), (c_lo, c_hi) in (
            (PICTURE, rng.integers(0, 3), (0.4, 1.1), (0.3, 0.8), (1.3, 1.9)),
            (WINDOW, rng.integers(0, 2), (0.8, 1.6), (0.9, 1.3), (1.3, 1.7)),
            (TV, rng.integers(0, 2), (0.8, 1.2), (0.45, 0.7), (1.0, 1.4))):
        for _ in range(int(count)):
            plane = int(rng.integers(2, 5))
            half_w, half_h = rng.uniform(w_lo, w_hi) / 2, rng.uniform(h_lo, h_hi) / 2
            u_lo, u_hi = ((x_left, x_right) if plane == 4 else (1.5, z_back - 0.3))
            if u_hi - u_lo <= 2 * half_w + 0.2:
                continue
            u = rng.uniform(u_lo + half_w + 0.1, u_hi - half_w - 0.1)
            v = floor_y + rng.uniform(c_lo, c_hi)
            albedo = (_rgb(rng.uniform(0.15, 0.95, size=3))
                      if cls == PICTURE else _albedo(rng, cls, 0.08))
            scene.decals.append((plane, u - half_w, u + half_w, v - half_h, v + half_h, cls,
                                 albedo))
    return scene


def _shade(hits: RayHits, scenes: list[Scene], noise_rng: np.random.Generator) -> np.ndarray:
    """``[n, H, W, 3]`` RGB in [0, 1]: textured albedo x (ambient + Lambert, ceiling light)."""
    label, point, normal, albedo = hits.label, hits.point, hits.normal_world, hits.albedo
    texture = np.ones(label.shape)
    x, y, z = point[..., 0], point[..., 1], point[..., 2]
    tiles = (np.floor(x / 0.6) + np.floor(z / 0.6)) % 2
    texture = np.where(label == FLOOR, 0.82 + 0.18 * tiles, texture)
    texture = np.where(label == BED, 1.0 + 0.1 * np.sign(np.sin(2 * np.pi * x / 0.25)), texture)
    texture = np.where((label == CABINET) | (label == TABLE),
                       1.0 + 0.08 * np.sin(2 * np.pi * (x + z) / 0.07), texture)
    texture = np.where(label == PICTURE, 1.0 + 0.35 * np.sin(2 * np.pi * (x + z) / 0.3)
                       * np.sin(2 * np.pi * y / 0.25), texture)
    texture = np.where(label == WALL, 1.0 + 0.03 * np.sin(2 * np.pi * (x + z + y) / 1.3), texture)
    # One point light below the ceiling, its position a deterministic function of the scene.
    lights = np.array([[0.3 * (s.planes[2][1] + s.planes[3][1]), s.planes[1][1] - 0.3,
                        0.45 * s.planes[4][1]] for s in scenes])
    to_light = lights[:, None, None, :] - point
    dist = np.linalg.norm(to_light, axis=-1, keepdims=True)
    lambert = np.clip((normal * to_light / np.maximum(dist, 1e-9)).sum(-1), 0.0, None)
    shading = 0.35 + 0.85 * lambert / (1.0 + 0.04 * dist[..., 0] ** 2)
    emissive = np.isin(label, _EMISSIVE)
    shading = np.where(emissive, 1.0, shading)
    rgb = albedo * (texture * shading)[..., None]
    rgb = rgb + noise_rng.normal(0.0, 0.015, size=rgb.shape)
    return np.clip(rgb, 0.0, 1.0)


def render_indoor(scenes: list[Scene], size: tuple[int, int], noise_rng: np.random.Generator,
                  chunk: int = 16) -> dict[str, torch.Tensor]:
    """Render ``scenes`` to tensors: ``input [n, 3, H, W]`` (normalised RGB), ``segmentation``
    ``[n, H, W]`` long, ``depth [n, 1, H, W]``, ``normals [n, 3, H, W]`` (see module docs)."""
    h, w = size
    n = len(scenes)
    rgb = np.empty((n, 3, h, w), dtype=np.float32)
    seg = np.empty((n, h, w), dtype=np.int64)
    depth = np.empty((n, 1, h, w), dtype=np.float32)
    normals = np.empty((n, 3, h, w), dtype=np.float32)
    for start in range(0, n, chunk):
        part = scenes[start:start + chunk]
        hits = cast(part, size, INDOOR_FOV_X)
        stop = start + len(part)
        rgb[start:stop] = _shade(hits, part, noise_rng).transpose(0, 3, 1, 2)
        seg[start:stop] = np.where(hits.label < 0, -1, hits.label)
        unknown = (hits.label == WINDOW) | ~np.isfinite(hits.depth)
        depth[start:stop, 0] = np.where(unknown, 0.0, hits.depth)
        normals[start:stop] = hits.normal_cam.transpose(0, 3, 1, 2)
    return {"input": torch.from_numpy((rgb - RGB_MEAN) / RGB_STD),
            "segmentation": torch.from_numpy(seg), "depth": torch.from_numpy(depth),
            "normals": torch.from_numpy(normals)}


# The stream key keeps indoor's images apart from street's for the same seed.
_INDOOR = RenderedKind(
    name="indoor", stream_key=0x1D00, tasks=indoor_tasks, sample_scene=sample_indoor_scene,
    render=render_indoor, classes=INDOOR_CLASSES, version=INDOOR_VERSION, fov_x=INDOOR_FOV_X,
    conventions={
        "depth": "z-depth in metres along the optical axis; 0 = unknown (window glass)",
        "normals": "unit, camera frame: x right, y up, z forward; facing the camera",
    },
    rgb_normalisation=(RGB_MEAN, RGB_STD), depth_prior=DEPTH_PRIOR)


def make_indoor(num_train: int, num_test: int, size: tuple[int, int] = (48, 64),
                seed: int = 0, num_validation: int = 0) -> Benchmark:
    """The ``indoor`` benchmark: ``num_train`` + ``num_test`` rendered rooms of ``size = (H, W)``.

    Train ids are ``0 .. num_train - 1``, test ids follow, then ``num_validation`` validation
    ids (``Benchmark.validation``; ``None`` when 0). The train, test and validation scenes come
    from independent streams of ``seed``, so no split changes with another's size.
    ``info`` holds plain (JSON-able) values: the class names, the camera (``fov_x``,
    ``focal_px``), the conventions, and the per-image cameras ``train_cameras`` /
    ``test_cameras``: one ``[height, yaw, pitch]`` list per image.
    """
    return make_rendered_benchmark(_INDOOR, num_train, num_test, size, seed,
                                   num_validation)
