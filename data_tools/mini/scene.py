"""Random indoor scenes for mini-Taskonomy: a room (with a window), objects, a camera.

Everything a label depends on is decided here, from one seeded RNG per (building, point, view):
the building fixes the room (its size, wall and floor textures, hence the scene class), the point
fixes the camera position and the objects, the view fixes where the camera looks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modsquad_ds.data.classes import DEFAULT_OBJECT_KEEP, DEFAULT_SCENE_KEEP

# Object categories: shape, texture photo (scikit-image's bundled images), ImageNet logit index
# (inside the default kept 100, so the class_object task is learnable), semantic id (2..17).
CATEGORIES = [
    # name,        shape,      texture,     imagenet index
    ("cat_box",     "box",      "chelsea",   DEFAULT_OBJECT_KEEP[28]),
    ("mug",         "cylinder", "coffee",    DEFAULT_OBJECT_KEEP[50]),
    ("astro_ball",  "sphere",   "astronaut", DEFAULT_OBJECT_KEEP[80]),
    ("rocket_can",  "cylinder", "rocket",    DEFAULT_OBJECT_KEEP[90]),
    ("coin_ball",   "sphere",   "coins",     DEFAULT_OBJECT_KEEP[41]),
    ("camera_box",  "box",      "camera",    DEFAULT_OBJECT_KEEP[75]),
    ("moon_ball",   "sphere",   "moon",      DEFAULT_OBJECT_KEEP[11]),
    ("page_box",    "box",      "page",      DEFAULT_OBJECT_KEEP[62]),
]
# Room types: wall texture, floor texture, tint; scene index inside the default kept 63.
ROOM_TYPES = [
    ("brick", "gravel", (1.0, 0.85, 0.75), DEFAULT_SCENE_KEEP[5]),
    ("grass", "brick", (0.8, 1.0, 0.8), DEFAULT_SCENE_KEEP[17]),
    ("gravel", "grass", (0.85, 0.85, 1.0), DEFAULT_SCENE_KEEP[29]),
    ("camera", "gravel", (1.0, 1.0, 0.8), DEFAULT_SCENE_KEEP[40]),
    ("brick", "brick", (0.9, 0.9, 0.9), DEFAULT_SCENE_KEEP[52]),
    ("text", "gravel", (1.0, 0.9, 1.0), DEFAULT_SCENE_KEEP[61]),
]
OBJECTS_MIN, OBJECTS_MAX = 6, 12
"""Objects per camera point: indoor views are cluttered; the clutter gives occlusion edges, keypoints
and superpixel cuts most of their density (docs/data.md: the mean targets against the release's)."""


@dataclass
class Obj:
    category: int
    shape: str
    center: np.ndarray
    size: np.ndarray
    """box: half extents (x, y, z); sphere: (r, r, r); cylinder: (r, half height, r)."""


@dataclass
class Scene:
    room: np.ndarray  # (3,) width (x), height (y), depth (z); the room spans [0, room]
    room_type: int
    window: tuple  # (wall, u0, u1, v0, v1): a hole in wall z = room[2], x in [u0, u1], y in [v0, v1]
    objects: list[Obj] = field(default_factory=list)
    cam_pos: np.ndarray = None
    cam_rot: np.ndarray = None  # (3, 3) camera-to-world; camera looks down its -z, y up, x right
    light: np.ndarray = None


def _stable_seed(*parts) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def building_room(seed: int, building_index: int):
    rng = np.random.default_rng(_stable_seed(seed, "room", building_index))
    room = np.array([rng.uniform(4.0, 7.0), rng.uniform(2.6, 3.2), rng.uniform(4.0, 7.0)])
    room_type = building_index % len(ROOM_TYPES) if building_index < len(ROOM_TYPES) else int(rng.integers(len(ROOM_TYPES)))
    u0 = rng.uniform(0.5, room[0] - 2.0)
    v0 = rng.uniform(0.8, 1.2)
    window = ("far", u0, u0 + rng.uniform(1.0, 1.6), v0, v0 + rng.uniform(0.8, 1.2))
    return room, room_type, window


def make_scene(seed: int, building_index: int, point: int, view: int) -> Scene:
    room, room_type, window = building_room(seed, building_index)
    rng = np.random.default_rng(_stable_seed(seed, "point", building_index, point))
    objects = []
    for _ in range(int(rng.integers(OBJECTS_MIN, OBJECTS_MAX + 1))):
        cat = int(rng.integers(len(CATEGORIES)))
        shape = CATEGORIES[cat][1]
        x, z = rng.uniform(0.8, room[0] - 0.8), rng.uniform(1.9, room[2] - 0.8)  # in front of the camera
        if shape == "box":
            half = rng.uniform([0.2, 0.2, 0.2], [0.6, 0.6, 0.6])
            center = np.array([x, half[1], z])
        elif shape == "sphere":
            r = rng.uniform(0.2, 0.55)
            half = np.array([r, r, r])
            center = np.array([x, r + (rng.uniform(0.0, 0.8) if rng.random() < 0.3 else 0.0), z])
        else:
            r, h = rng.uniform(0.15, 0.4), rng.uniform(0.3, 0.9)
            half = np.array([r, h, r])
            center = np.array([x, h, z])
        objects.append(Obj(cat, shape, center, half))
    cam = np.array([rng.uniform(0.6, room[0] - 0.6), rng.uniform(1.2, 1.7), rng.uniform(0.4, 1.2)])
    vrng = np.random.default_rng(_stable_seed(seed, "view", building_index, point, view))
    # Look mostly towards the far wall (where the window is), with yaw / pitch varying per view.
    yaw = vrng.uniform(-0.9, 0.9)
    pitch = vrng.uniform(-0.45, 0.1)
    forward = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    rot = np.stack([right, up, -forward], axis=1)  # columns: camera x, y, z in world coordinates
    light = np.array([room[0] / 2, room[1] - 0.1, room[2] / 2])
    return Scene(room, room_type, window, objects, cam, rot, light)
