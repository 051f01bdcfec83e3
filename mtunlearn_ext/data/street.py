"""``street``: Cityscapes-like rendered street scenes with segmentation and depth targets.

A camera at driver's height looks down a straight street: a ground plane (road with lane
markings, sidewalks), rows of buildings on both sides and a far row closing the street, cars
(body and cabin boxes), poles with signs, trees (trunk and crown), pedestrians (body and head),
and sky wherever no surface is hit. The 7 classes are Cityscapes' 7 categories, as in the 7-class
Cityscapes of LibMTL/MTAN (:data:`STREET_CLASSES`).

Targets (camera model of :mod:`mtunlearn_ext.data._raycast`):

* ``segmentation`` ``[H, W]`` long, every pixel labelled (sky included).
* ``depth`` ``[1, H, W]``: **z-depth** in metres; ``0`` (unknown) on sky pixels, as Cityscapes'
  stereo depth has no value there.

Input RGB: albedo x (ambient + Lambert from a directional sun) with class textures (building
window grids, lane dashes, sidewalk paving), a sky gradient, pixel noise; normalised as
``(rgb - 0.5) / 0.25``. The same ``seed`` gives bit-identical tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mtunlearn_ext.data._raycast import RayHits, Scene, cast
from mtunlearn_ext.data._rendered import RenderedKind, make_rendered_benchmark
from mtunlearn_ext.data.base import Benchmark, TaskSpec

__all__ = ["STREET_CLASSES", "STREET_FOV_X", "STREET_VERSION", "make_street", "render_street",
           "sample_street_scene", "street_tasks"]

STREET_VERSION = 1
"""Bumped whenever the generated data change (it keys the on-disk cache)."""

STREET_CLASSES: tuple[str, ...] = ("flat", "construction", "object", "nature", "sky", "human",
                                   "vehicle")
FLAT, CONSTRUCTION, OBJECT, NATURE, SKY, HUMAN, VEHICLE = range(len(STREET_CLASSES))

STREET_FOV_X = math.radians(70.0)
RGB_MEAN, RGB_STD = 0.5, 0.25
DEPTH_PRIOR = 12.0  # metres: a constant of the generator, for the depth head's init


def street_tasks() -> list[TaskSpec]:
    """The two tasks: 7-class segmentation and depth."""
    return [TaskSpec("segmentation", "segmentation", num_classes=len(STREET_CLASSES)),
            TaskSpec("depth", "depth")]


def _colour(rng: np.random.Generator, lo: float, hi: float) -> tuple[float, float, float]:
    return tuple(float(v) for v in rng.uniform(lo, hi, size=3))  # type: ignore[return-value]


def _tint(rng: np.random.Generator, base: tuple[float, float, float],
          jitter: float = 0.12) -> tuple[float, float, float]:
    values = np.clip(np.asarray(base) * rng.uniform(1 - jitter, 1 + jitter, size=3), 0.0, 1.0)
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def sample_street_scene(rng: np.random.Generator) -> Scene:
    """One random street, drawn from ``rng`` (camera at the origin, ground at ``y = -height``).

    The road spans ``|x| < road_half``, the sidewalks ``road_half < |x| < building_x``.
    """
    height = rng.uniform(1.3, 1.7)
    ground = -height
    scene = Scene(yaw=rng.uniform(-0.08, 0.08), pitch=rng.uniform(-0.07, 0.03),
                  camera_height=height)
    road_half = rng.uniform(3.5, 6.0)
    scene.extras["road_half"] = road_half
    building_x = road_half + rng.uniform(1.5, 3.0)
    # The ground's albedo is a placeholder; the shader paints road, sidewalk and lane marks.
    scene.planes = [(1, ground, FLAT, (0.3, 0.3, 0.32))]
    # Building rows on both sides, then a far row closing the street.
    for side in (-1.0, 1.0):
        z = rng.uniform(-2.0, 6.0)
        while z < 70.0:
            length = rng.uniform(6.0, 16.0)
            if rng.random() < 0.85:
                depth = rng.uniform(8.0, 15.0)
                x0 = side * building_x
                x1 = side * (building_x + depth)
                scene.boxes.append(((min(x0, x1), ground, z), (max(x0, x1),
                                    ground + rng.uniform(4.0, 16.0), z + length), CONSTRUCTION,
                                    _colour(rng, 0.35, 0.85)))
            z += length + (rng.uniform(0.5, 4.0) if rng.random() < 0.3 else 0.0)
    far = rng.uniform(45.0, 70.0)
    scene.boxes.append(((-80.0, ground, far), (80.0, ground + rng.uniform(5.0, 15.0), far + 5.0),
                        CONSTRUCTION, _colour(rng, 0.4, 0.8)))
    # Cars in two lanes, facing along z.
    for _ in range(int(rng.integers(0, 6))):
        x = rng.choice([-1.0, 1.0]) * rng.uniform(1.2, max(1.3, road_half - 1.2))
        z = rng.uniform(5.0, 40.0)
        half_w, half_l = rng.uniform(0.8, 1.0), rng.uniform(1.9, 2.4)
        paint = _colour(rng, 0.05, 0.95)
        body_top = ground + rng.uniform(0.9, 1.1)
        scene.boxes.append(((x - half_w, ground + 0.2, z - half_l), (x + half_w, body_top,
                            z + half_l), VEHICLE, paint))
        scene.boxes.append(((x - half_w + 0.1, body_top, z - half_l * 0.5), (x + half_w - 0.1,
                            body_top + rng.uniform(0.45, 0.65), z + half_l * 0.4), VEHICLE,
                            _tint(rng, (0.2, 0.25, 0.3))))
    # Sidewalk things: poles (with a sign), trees, pedestrians.
    for _ in range(int(rng.integers(2, 9))):
        side = rng.choice([-1.0, 1.0])
        z = rng.uniform(3.0, 45.0)
        kind = rng.choice(3, p=[0.35, 0.35, 0.3])
        if kind == 0:
            x = side * (road_half + 0.4)
            top = ground + rng.uniform(3.5, 6.5)
            scene.cylinders.append((x, z, rng.uniform(0.06, 0.12), ground, top, OBJECT,
                                    _tint(rng, (0.45, 0.45, 0.45))))
            if rng.random() < 0.7:
                sign = [(0.8, 0.1, 0.1), (0.1, 0.3, 0.8), (0.9, 0.8, 0.1)][int(rng.integers(3))]
                scene.boxes.append(((x - 0.35, top - 0.8, z - 0.05), (x + 0.35, top - 0.1,
                                    z + 0.05), OBJECT, _tint(rng, sign)))
        elif kind == 1:
            x = side * rng.uniform(road_half + 0.6, building_x - 0.5)
            trunk_top = ground + rng.uniform(1.8, 3.0)
            crown = rng.uniform(1.0, 2.2)
            scene.cylinders.append((x, z, rng.uniform(0.12, 0.2), ground, trunk_top, NATURE,
                                    _tint(rng, (0.35, 0.25, 0.15))))
            scene.spheres.append(((x, trunk_top + crown * 0.8, z), crown, NATURE,
                                  _tint(rng, (0.2, 0.5, 0.15), 0.25)))
        else:
            x = side * rng.uniform(road_half + 0.3, building_x - 0.3)
            body_top = ground + rng.uniform(1.3, 1.6)
            scene.cylinders.append((x, z, rng.uniform(0.18, 0.25), ground, body_top, HUMAN,
                                    _colour(rng, 0.1, 0.9)))
            scene.spheres.append(((x, body_top + 0.13, z), 0.12, HUMAN,
                                  _tint(rng, (0.85, 0.65, 0.5))))
    return scene


def _shade(hits: RayHits, scenes: list[Scene], noise_rng: np.random.Generator) -> np.ndarray:
    """``[n, H, W, 3]`` RGB in [0, 1]."""
    label, point, normal, albedo = hits.label, hits.point, hits.normal_world, hits.albedo.copy()
    x, y, z = point[..., 0], point[..., 1], point[..., 2]
    road_half = np.array([s.extras["road_half"] for s in scenes])[:, None, None]
    ground = label == FLAT
    sidewalk = ground & (np.abs(x) > road_half)
    lane_mark = ground & (np.abs(x) < 0.08) & ((z % 6.0) < 3.0)
    albedo[ground] = (0.30, 0.30, 0.32)
    albedo[sidewalk] = (0.62, 0.60, 0.56)
    albedo[lane_mark] = (0.92, 0.92, 0.9)
    texture = np.ones(label.shape)
    paving = (np.floor(x / 0.5) + np.floor(z / 0.5)) % 2
    texture = np.where(sidewalk, 0.9 + 0.1 * paving, texture)
    # Building facades: a grid of darker windows (on the side walls z/y, on the far wall x/y).
    facade_u = np.where(np.abs(normal[..., 0]) > 0.5, z, x)
    windows = ((y % 3.0) > 1.0) & ((y % 3.0) < 2.2) & ((facade_u % 2.5) < 1.3)
    texture = np.where((label == CONSTRUCTION) & windows, 0.45, texture)
    texture = np.where(label == NATURE, 1.0 + 0.15 * np.sin(7.0 * x) * np.sin(5.0 * y), texture)
    sun = np.array([0.4, 1.0, -0.5])
    sun = sun / np.linalg.norm(sun)
    lambert = np.clip((normal * sun).sum(-1), 0.0, None)
    rgb = albedo * (texture * (0.45 + 0.6 * lambert))[..., None]
    # Sky: pale at the horizon, deeper blue above.
    elevation = hits.direction[..., 1] / np.linalg.norm(hits.direction, axis=-1)
    sky = (np.array([0.78, 0.86, 0.95]) + np.clip(elevation, 0, 1)[..., None]
           * np.array([-0.35, -0.25, -0.02]))
    rgb = np.where((label < 0)[..., None], sky, rgb)
    rgb = rgb + noise_rng.normal(0.0, 0.015, size=rgb.shape)
    return np.clip(rgb, 0.0, 1.0)


def render_street(scenes: list[Scene], size: tuple[int, int], noise_rng: np.random.Generator,
                  chunk: int = 16) -> dict[str, torch.Tensor]:
    """Render ``scenes`` to ``input [n, 3, H, W]``, ``segmentation [n, H, W]``,
    ``depth [n, 1, H, W]`` (see module docs)."""
    h, w = size
    n = len(scenes)
    rgb = np.empty((n, 3, h, w), dtype=np.float32)
    seg = np.empty((n, h, w), dtype=np.int64)
    depth = np.empty((n, 1, h, w), dtype=np.float32)
    for start in range(0, n, chunk):
        part = scenes[start:start + chunk]
        hits = cast(part, size, STREET_FOV_X)
        stop = start + len(part)
        rgb[start:stop] = _shade(hits, part, noise_rng).transpose(0, 3, 1, 2)
        seg[start:stop] = np.where(hits.label < 0, SKY, hits.label)
        depth[start:stop, 0] = np.where(np.isfinite(hits.depth), hits.depth, 0.0)
    return {"input": torch.from_numpy((rgb - RGB_MEAN) / RGB_STD),
            "segmentation": torch.from_numpy(seg), "depth": torch.from_numpy(depth)}


# The stream key keeps street's images apart from indoor's for the same seed.
_STREET = RenderedKind(
    name="street", stream_key=0x57EE7, tasks=street_tasks, sample_scene=sample_street_scene,
    render=render_street, classes=STREET_CLASSES, version=STREET_VERSION, fov_x=STREET_FOV_X,
    conventions={"depth": "z-depth in metres along the optical axis; 0 = unknown (sky)"},
    rgb_normalisation=(RGB_MEAN, RGB_STD), depth_prior=DEPTH_PRIOR)


def make_street(num_train: int, num_test: int, size: tuple[int, int] = (48, 96),
                seed: int = 0, num_validation: int = 0) -> Benchmark:
    """The ``street`` benchmark: ``num_train`` + ``num_test`` rendered streets of ``size``.

    Ids, seeding and ``info`` as in :func:`~mtunlearn_ext.data.indoor.make_indoor`.
    """
    return make_rendered_benchmark(_STREET, num_train, num_test, size, seed,
                                   num_validation)
