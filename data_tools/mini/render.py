"""Ray casting a :class:`~data_tools.mini.scene.Scene` into per-pixel geometry.

Vectorised numpy over all pixels (a 128 x 128 view is ~16 k rays, a few ms per primitive). Output
per pixel: ray distance, hit point, world normal, principal curvatures, object / surface id and
texture coordinates. Rays leaving through the window hit nothing (t = inf): the release's
"no geometry" pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.mini.scene import Scene

FOV_DEG = 75.0
EPS = 1e-6

# Surface ids: 0 floor, 1 ceiling, 2 walls, 10 + i object i; -1 nothing.
FLOOR, CEILING, WALL, OBJ0, NONE = 0, 1, 2, 10, -1


@dataclass
class Hits:
    t: np.ndarray  # (N,) ray distance, inf where nothing
    point: np.ndarray  # (N, 3)
    normal: np.ndarray  # (N, 3) world, unit, facing the camera
    k1: np.ndarray  # (N,) principal curvatures in 1/m (convex > 0)
    k2: np.ndarray
    surface: np.ndarray  # (N,) int surface id
    uv: np.ndarray  # (N, 2) texture coordinates in metres
    dirs_cam: np.ndarray  # (N, 3) unit ray directions in the camera frame


def focal_px(res: int) -> float:
    """Pinhole focal length in pixels (principal point at the image centre, pixel centres at +0.5)."""
    return (res / 2) / np.tan(np.radians(FOV_DEG) / 2)


def camera_rays(scene: Scene, res: int):
    f = focal_px(res)
    j, i = np.meshgrid(np.arange(res) + 0.5, np.arange(res) + 0.5)
    d = np.stack([(j - res / 2) / f, -(i - res / 2) / f, -np.ones_like(i)], axis=-1).reshape(-1, 3)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d, d @ scene.cam_rot.T


def _update(h: Hits, t, mask, normal, k1, k2, surface, uv):
    better = mask & (t > EPS) & (t < h.t)
    h.t[better] = t[better]
    h.normal[better] = normal[better] if normal.ndim == 2 else normal
    h.k1[better] = k1[better] if np.ndim(k1) else k1
    h.k2[better] = k2[better] if np.ndim(k2) else k2
    h.surface[better] = surface
    h.uv[better] = uv[better]


def render(scene: Scene, res: int) -> Hits:
    dc, d = camera_rays(scene, res)
    o = scene.cam_pos
    n = d.shape[0]
    h = Hits(np.full(n, np.inf), np.zeros((n, 3)), np.zeros((n, 3)), np.zeros(n), np.zeros(n),
             np.full(n, NONE), np.zeros((n, 2)), dc)
    with np.errstate(divide="ignore", invalid="ignore"):
        _room(h, scene, o, d)
        for idx, obj in enumerate(scene.objects):
            {"box": _box, "sphere": _sphere, "cylinder": _cylinder}[obj.shape](h, obj, OBJ0 + idx, o, d)
    hit = np.isfinite(h.t)
    h.point[hit] = o + d[hit] * h.t[hit, None]
    # Normals face the viewer (the room's walls are seen from inside).
    flip = np.sum(h.normal * d, axis=1) > 0
    h.normal[flip] *= -1
    return h


def _room(h: Hits, scene: Scene, o, d):
    room = scene.room
    for axis in range(3):
        for plane, sign in ((0.0, 1.0), (room[axis], -1.0)):
            t = (plane - o[axis]) / d[:, axis]
            p = o + d * t[:, None]
            inside = np.ones(len(t), bool)
            for other in range(3):
                if other != axis:
                    inside &= (p[:, other] >= -1e-9) & (p[:, other] <= room[other] + 1e-9)
            normal = np.zeros(3)
            normal[axis] = sign
            surface = FLOOR if (axis == 1 and plane == 0.0) else CEILING if axis == 1 else WALL
            uv_axes = [a for a in range(3) if a != axis]
            uv = p[:, uv_axes]
            if axis == 2 and plane == room[2]:  # the far wall has the window: no geometry there
                _, u0, u1, v0, v1 = scene.window
                hole = (p[:, 0] > u0) & (p[:, 0] < u1) & (p[:, 1] > v0) & (p[:, 1] < v1)
                # The ray escapes: nothing is hit, and nothing behind the wall may count either.
                escape = inside & hole & (t > EPS)
                inside &= ~hole
                h.surface[escape] = NONE
            _update(h, t, inside, np.broadcast_to(normal, (len(t), 3)), 0.0, 0.0, surface, uv)


def _box(h, obj, sid, o, d):
    lo, hi = obj.center - obj.size, obj.center + obj.size
    t1, t2 = (lo - o) / d, (hi - o) / d
    tmin_ax, tmax_ax = np.minimum(t1, t2), np.maximum(t1, t2)
    tmin, tmax = tmin_ax.max(1), tmax_ax.min(1)
    ok = (tmax >= tmin) & (tmin > EPS)
    axis = tmin_ax.argmax(1)
    normal = np.zeros_like(d)
    normal[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    p = o + d * tmin[:, None]
    rel = p - lo
    uv = np.where(axis[:, None] == 0, rel[:, [2, 1]], np.where(axis[:, None] == 1, rel[:, [0, 2]], rel[:, [0, 1]]))
    _update(h, tmin, ok, normal, 0.0, 0.0, sid, uv)


def _sphere(h, obj, sid, o, d):
    r = obj.size[0]
    oc = o - obj.center
    b = d @ oc
    disc = b * b - (oc @ oc - r * r)
    t = -b - np.sqrt(np.maximum(disc, 0))
    ok = disc > 0
    p = o + d * t[:, None]
    normal = (p - obj.center) / r
    uv = np.stack([np.arctan2(normal[:, 0], normal[:, 2]) * r, np.arcsin(np.clip(normal[:, 1], -1, 1)) * r], 1)
    _update(h, t, ok, normal, np.full(len(t), 1 / r), np.full(len(t), 1 / r), sid, uv)


def _cylinder(h, obj, sid, o, d):
    r, half = obj.size[0], obj.size[1]
    c = obj.center
    ox, oz = o[0] - c[0], o[2] - c[2]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = 2 * (ox * d[:, 0] + oz * d[:, 2])
    cc = ox * ox + oz * oz - r * r
    disc = b * b - 4 * a * cc
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, EPS))
    p = o + d * t[:, None]
    ok = (disc > 0) & (np.abs(p[:, 1] - c[1]) <= half)
    normal = np.stack([p[:, 0] - c[0], np.zeros(len(t)), p[:, 2] - c[2]], 1) / r
    uv = np.stack([np.arctan2(normal[:, 0], normal[:, 2]) * r, p[:, 1] - (c[1] - half)], 1)
    _update(h, t, ok, normal, np.full(len(t), 1 / r), np.zeros(len(t)), sid, uv)
    # top cap: a flat disk
    tc = (c[1] + half - o[1]) / d[:, 1]
    pc = o + d * tc[:, None]
    okc = ((pc[:, 0] - c[0]) ** 2 + (pc[:, 2] - c[2]) ** 2) <= r * r
    _update(h, tc, okc, np.broadcast_to(np.array([0.0, 1.0, 0.0]), (len(t), 3)), 0.0, 0.0, sid,
            pc[:, [0, 2]] - c[[0, 2]])
