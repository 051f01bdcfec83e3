"""Vectorised ray casting of scenes made of axis-aligned primitives (the renderer behind the
generated ``indoor`` and ``street`` benchmarks).

Conventions (shared by the generators and their tests):

* World frame: the camera sits at the origin; ``y`` points up, ``z`` forward (before the camera
  turns), ``x`` to the right. Lengths are metres.
* Camera: pinhole, square pixels, horizontal field of view ``fov_x``; focal length
  ``f = (W / 2) / tan(fov_x / 2)`` pixels, principal point ``(W / 2, H / 2)``. Pixel ``(i, j)``
  (row, column) looks along ``d_cam = ((j + 0.5 - W/2) / f, -(i + 0.5 - H/2) / f, 1)`` in the
  camera frame (``x`` right, ``y`` up, ``z`` forward). Camera to world is
  ``R = R_y(yaw) R_x(-pitch)``: ``yaw > 0`` turns right, ``pitch > 0`` looks up.
* Because ``d_cam`` has unit ``z``, the ray parameter ``t`` of the first hit ``p = t R d_cam`` is
  the hit's **z-depth** (distance along the optical axis), the quantity depth sensors such as the
  Kinect of NYUv2 report. It is *not* the Euclidean ray length ``t |d_cam|``.
* Normals: unit, facing the camera, reported in the camera frame (``n_cam = R^T n_world``).

Primitives: infinite planes ``axis = value`` (a room's walls, floor and ceiling, a street's
ground), axis-aligned boxes, spheres, vertical cylinders (with caps), and decals: rectangles
painted on a plane (pictures, windows) that change the class and colour of the plane's pixels but
not the geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RayHits", "Scene", "camera_rays", "cast", "focal_length", "rotation"]

Vec3 = tuple[float, float, float]
_EPS = 1e-4  # minimum hit distance: hits at or behind the camera do not count


@dataclass
class Scene:
    """One scene. Every primitive carries its semantic class and an RGB albedo in ``[0, 1]``.

    Attributes:
        yaw, pitch: camera orientation (radians).
        camera_height: the camera's height above the ground/floor (metadata for consumers).
        planes: ``(axis, value, class, albedo)``: the plane ``x_axis = value`` (``axis`` 0/1/2).
        boxes: ``(min_corner, max_corner, class, albedo)``.
        spheres: ``(centre, radius, class, albedo)``.
        cylinders: ``(cx, cz, radius, y_bottom, y_top, class, albedo)``: vertical axis.
        decals: ``(plane_index, u0, u1, v0, v1, class, albedo)``: a rectangle on
            ``planes[plane_index]`` in that plane's coordinates ``(u, v)``: ``(z, y)`` on an
            ``x`` plane, ``(x, z)`` on a ``y`` plane, ``(x, y)`` on a ``z`` plane. Later decals
            cover earlier ones.
        extras: generator-specific numbers the shader needs (e.g. a street's road width).
    """

    yaw: float = 0.0
    pitch: float = 0.0
    camera_height: float = 0.0
    planes: list[tuple[int, float, int, Vec3]] = field(default_factory=list)
    boxes: list[tuple[Vec3, Vec3, int, Vec3]] = field(default_factory=list)
    spheres: list[tuple[Vec3, float, int, Vec3]] = field(default_factory=list)
    cylinders: list[tuple[float, float, float, float, float, int, Vec3]] = field(
        default_factory=list)
    decals: list[tuple[int, float, float, float, float, int, Vec3]] = field(default_factory=list)
    extras: dict[str, float] = field(default_factory=dict)


@dataclass
class RayHits:
    """First hits of every pixel of ``n`` scenes, arrays shaped ``[n, H, W, ...]``.

    ``depth``: z-depth (``inf`` where nothing is hit); ``label``: class (``-1`` where nothing is
    hit); ``normal_cam`` / ``normal_world``: unit normals (zero where nothing is hit);
    ``albedo``: RGB; ``point``: world hit point; ``direction``: the world ray direction
    ``R d_cam``; ``decal``: index of the decal hit (``-1`` if none).
    """

    depth: np.ndarray
    label: np.ndarray
    normal_cam: np.ndarray
    normal_world: np.ndarray
    albedo: np.ndarray
    point: np.ndarray
    direction: np.ndarray
    decal: np.ndarray


def focal_length(width: int, fov_x: float) -> float:
    """Focal length in pixels of a camera ``width`` pixels wide with field of view ``fov_x``."""
    return (width / 2.0) / float(np.tan(fov_x / 2.0))


def camera_rays(size: tuple[int, int], fov_x: float) -> np.ndarray:
    """``[H * W, 3]`` camera-frame ray directions ``d_cam`` (unit z), row-major pixels."""
    h, w = size
    f = focal_length(w, fov_x)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (cols + 0.5 - w / 2.0) / f
    y = -(rows + 0.5 - h / 2.0) / f
    return np.stack([x, y, np.ones_like(x)], axis=-1).reshape(-1, 3).astype(np.float64)


def rotation(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """``[n, 3, 3]`` camera-to-world rotations ``R_y(yaw) R_x(-pitch)``."""
    yaw = np.asarray(yaw, dtype=np.float64).reshape(-1)
    pitch = np.asarray(pitch, dtype=np.float64).reshape(-1)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(-pitch), np.sin(-pitch)
    zeros, ones = np.zeros_like(yaw), np.ones_like(yaw)
    r_y = np.stack([np.stack([cy, zeros, sy], -1), np.stack([zeros, ones, zeros], -1),
                    np.stack([-sy, zeros, cy], -1)], axis=-2)
    r_x = np.stack([np.stack([ones, zeros, zeros], -1), np.stack([zeros, cp, -sp], -1),
                    np.stack([zeros, sp, cp], -1)], axis=-2)
    return r_y @ r_x


def _pad(rows: Sequence[Sequence[Sequence[float]]], width: int,
         fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Stack ragged per-scene lists into ``[n, K, width]`` plus a ``[n, K]`` validity mask."""
    k = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(k, 1), width), fill, dtype=np.float64)
    valid = np.zeros((len(rows), max(k, 1)), dtype=bool)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = np.asarray(r, dtype=np.float64)
            valid[i, :len(r)] = True
    return out, valid


def _flat(prims: Sequence[tuple]) -> list[list[float]]:
    """Each primitive tuple flattened to ``[geometry..., class, r, g, b]``."""
    rows = []
    for p in prims:
        values: list[float] = []
        for item in p:
            values.extend(item if isinstance(item, (tuple, list)) else [item])
        rows.append(values)
    return rows


def _best(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest primitive per pixel: ``(t_min [n, P], index [n, P])`` over axis 1 of ``t``."""
    index = t.argmin(axis=1)
    return np.take_along_axis(t, index[:, None], axis=1)[:, 0], index


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values [n, K, w]`` at per-pixel primitive ``index [n, P]`` -> ``[n, P, w]``."""
    return np.take_along_axis(values, index[:, :, None], axis=1)


def cast(scenes: Sequence[Scene], size: tuple[int, int], fov_x: float) -> RayHits:
    """Cast one ray per pixel into every scene and return the first hits (see module docs).

    All scenes are processed together, primitives padded to the largest count; memory grows as
    ``n * K * H * W``, so callers pass scenes in chunks.
    """
    n = len(scenes)
    h, w = size
    d_cam = camera_rays(size, fov_x)                                        # [P, 3]
    rot = rotation(np.array([s.yaw for s in scenes]), np.array([s.pitch for s in scenes]))
    d = np.einsum("nij,pj->npi", rot, d_cam)                                 # [n, P, 3]
    safe_d = np.where(np.abs(d) < 1e-12, 1e-12, d)
    inv_d = 1.0 / safe_d
    num_p = d.shape[1]
    inf = np.inf

    candidates_t: list[np.ndarray] = []
    candidates_label: list[np.ndarray] = []
    candidates_albedo: list[np.ndarray] = []
    candidates_normal: list[np.ndarray] = []

    # Planes: axis = value, hit at t = value / d_axis when that is in front of the camera.
    planes, plane_ok = _pad([_flat(s.planes) for s in scenes], 6, 0.0)
    plane_axis = planes[:, :, 0].astype(np.int64)                            # [n, Kp]
    d_axis = np.take_along_axis(safe_d.transpose(0, 2, 1), plane_axis[:, :, None], axis=1)
    t_plane = planes[:, :, 1:2] / d_axis                                     # [n, Kp, P]
    t_plane = np.where(plane_ok[:, :, None] & (t_plane > _EPS), t_plane, inf)
    t_p, k_p = _best(t_plane)
    sel = _gather(planes, k_p)                                               # [n, P, 6]
    axis_p = sel[..., 0].astype(np.int64)
    normal_p = np.zeros((n, num_p, 3))
    np.put_along_axis(normal_p, axis_p[..., None], -np.sign(sel[..., 1:2]), axis=2)
    candidates_t.append(t_p)
    candidates_label.append(sel[..., 2])
    candidates_albedo.append(sel[..., 3:6])
    candidates_normal.append(normal_p)

    # Boxes: slab test, one axis at a time (a reduction over a trailing axis of 3 is slow),
    # in float32 because these [n, K, P] arrays dominate the cost.
    boxes, box_ok = _pad([_flat(s.boxes) for s in scenes], 10, 0.0)
    box32 = boxes.astype(np.float32)
    inv32 = inv_d.astype(np.float32)
    t_near = np.full((n, boxes.shape[1], num_p), -np.inf, dtype=np.float32)
    t_far = np.full_like(t_near, np.inf)
    for axis in range(3):
        inv_axis = inv32[:, None, :, axis]                                   # [n, 1, P]
        t1 = box32[:, :, axis, None] * inv_axis                              # [n, Kb, P]
        t2 = box32[:, :, axis + 3, None] * inv_axis
        np.maximum(t_near, np.minimum(t1, t2), out=t_near)
        np.minimum(t_far, np.maximum(t1, t2), out=t_far)
    hit = box_ok[:, :, None] & (t_near <= t_far) & (t_near > _EPS)
    t_b, k_b = _best(np.where(hit, t_near, np.float32(inf)))
    t_b = t_b.astype(np.float64)
    # The entry face of the winning box: the axis whose slab is entered last.
    chosen = _gather(boxes, k_b)                                             # [n, P, 10]
    t_enter = np.minimum(chosen[..., 0:3] * inv_d, chosen[..., 3:6] * inv_d)
    entry_axis = t_enter.argmax(axis=2)
    normal_b = np.zeros((n, num_p, 3))
    d_entry = np.take_along_axis(d, entry_axis[..., None], axis=2)
    np.put_along_axis(normal_b, entry_axis[..., None], -np.sign(d_entry), axis=2)
    sel = chosen
    candidates_t.append(t_b)
    candidates_label.append(sel[..., 6])
    candidates_albedo.append(sel[..., 7:10])
    candidates_normal.append(normal_b)

    # Spheres: |t d - c|^2 = r^2, nearer root.
    spheres, sphere_ok = _pad([_flat(s.spheres) for s in scenes], 8, 0.0)
    centre = spheres[:, :, 0:3]
    a = (d * d).sum(axis=2)[:, None, :]                                      # [n, 1, P]
    b = -2.0 * np.einsum("npi,nki->nkp", d, centre)                          # [n, Ks, P]
    c = ((centre * centre).sum(axis=2) - spheres[:, :, 3] ** 2)[:, :, None]
    disc = b * b - 4.0 * a * c
    t_s = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a)
    hit = sphere_ok[:, :, None] & (disc >= 0) & (t_s > _EPS)
    t_s, k_s = _best(np.where(hit, t_s, inf))
    sel = _gather(spheres, k_s)
    point = np.where(np.isfinite(t_s)[..., None], t_s[..., None], 0.0) * d
    normal_s = (point - sel[..., 0:3]) / np.maximum(sel[..., 3:4], 1e-12)
    candidates_t.append(t_s)
    candidates_label.append(sel[..., 4])
    candidates_albedo.append(sel[..., 5:8])
    candidates_normal.append(normal_s)

    # Vertical cylinders: side (a circle in the xz plane) and the two caps.
    cyl, cyl_ok = _pad([_flat(s.cylinders) for s in scenes], 9, 0.0)
    cx, cz, radius = cyl[:, :, 0:1], cyl[:, :, 1:2], cyl[:, :, 2:3]          # [n, Kc, 1]
    y_bottom, y_top = cyl[:, :, 3:4], cyl[:, :, 4:5]
    dx, dy, dz = d[:, None, :, 0], d[:, None, :, 1], d[:, None, :, 2]        # [n, 1, P]
    a = dx * dx + dz * dz
    b = -2.0 * (dx * cx + dz * cz)
    c = cx * cx + cz * cz - radius * radius
    disc = b * b - 4.0 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * np.maximum(a, 1e-12))
    y_side = t_side * dy
    side_ok = (disc >= 0) & (t_side > _EPS) & (y_side >= y_bottom) & (y_side <= y_top)
    caps_t = []
    for y_cap in (y_top, y_bottom):
        t_cap = y_cap / np.where(np.abs(dy) < 1e-12, 1e-12, dy)
        inside = (t_cap * dx - cx) ** 2 + (t_cap * dz - cz) ** 2 <= radius * radius
        caps_t.append(np.where(inside & (t_cap > _EPS), t_cap, inf))
    parts = np.stack([np.where(side_ok, t_side, inf), *caps_t], axis=0)     # [3, n, Kc, P]
    part = parts.argmin(axis=0)
    t_c = np.where(cyl_ok[:, :, None], parts.min(axis=0), inf)
    t_c, k_c = _best(t_c)
    part = np.take_along_axis(part, k_c[:, None], axis=1)[:, 0]              # [n, P]
    sel = _gather(cyl, k_c)
    point = np.where(np.isfinite(t_c)[..., None], t_c[..., None], 0.0) * d
    radial = np.stack([point[..., 0] - sel[..., 0], np.zeros_like(t_c),
                       point[..., 2] - sel[..., 1]], axis=-1) / np.maximum(sel[..., 2:3], 1e-12)
    cap_normal = np.zeros_like(radial)
    cap_normal[..., 1] = np.where(part == 1, 1.0, -1.0)
    normal_c = np.where((part == 0)[..., None], radial, cap_normal)
    candidates_t.append(t_c)
    candidates_label.append(sel[..., 5])
    candidates_albedo.append(sel[..., 6:9])
    candidates_normal.append(normal_c)

    # The nearest primitive of any kind.
    all_t = np.stack(candidates_t)                                           # [4, n, P]
    kind = all_t.argmin(axis=0)
    depth = all_t.min(axis=0)
    missed = ~np.isfinite(depth)
    pick = kind[None, :, :, None]
    label = np.take_along_axis(np.stack(candidates_label), kind[None], 0)[0]
    albedo = np.take_along_axis(np.stack(candidates_albedo), pick, 0)[0]
    normal_world = np.take_along_axis(np.stack(candidates_normal), pick, 0)[0]
    normal_world /= np.maximum(np.linalg.norm(normal_world, axis=-1, keepdims=True), 1e-12)
    point = np.where(missed[..., None], 0.0, depth[..., None]) * d

    # Decals repaint plane pixels inside their rectangle.
    decals, decal_ok = _pad([_flat(s.decals) for s in scenes], 9, 0.0)
    decal = np.full((n, num_p), -1, dtype=np.int64)
    on_plane = (kind == 0) & ~missed
    u = np.where(axis_p == 0, point[..., 2], point[..., 0])
    v = np.where(axis_p == 1, point[..., 2], point[..., 1])
    for j in range(decals.shape[1]):
        dj = decals[:, j]                                                    # [n, 9]
        inside = (on_plane & decal_ok[:, j:j + 1] & (k_p == dj[:, 0:1].astype(np.int64))
                  & (u >= dj[:, 1:2]) & (u <= dj[:, 2:3]) & (v >= dj[:, 3:4]) & (v <= dj[:, 4:5]))
        label = np.where(inside, dj[:, 5:6], label)
        albedo = np.where(inside[..., None], dj[:, None, 6:9], albedo)
        decal = np.where(inside, j, decal)

    label = np.where(missed, -1, label).astype(np.int64)
    normal_world = np.where(missed[..., None], 0.0, normal_world)
    normal_cam = np.einsum("nji,npj->npi", rot, normal_world)               # R^T n

    def shape(x: np.ndarray) -> np.ndarray:
        return x.reshape(n, h, w, *x.shape[2:])

    return RayHits(depth=shape(depth), label=shape(label), normal_cam=shape(normal_cam),
                   normal_world=shape(normal_world), albedo=shape(albedo), point=shape(point),
                   direction=shape(d), decal=shape(decal))
