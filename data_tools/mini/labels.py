"""Every mini-Taskonomy domain from the rendered geometry, in the release's encodings.

Geometry gives rgb, depth_zbuffer, depth_euclidean, normal, reshading, principal_curvature,
segment_semantic; the 2D labels (edge_texture, keypoints2d, segment_unsup2d) and edge_occlusion follow
the recipes documented in docs (field notes: they match the release files); keypoints3d and
segment_unsup25d apply the same ideas to the geometry; class_object / class_scene are determined by
the objects in view and the room type.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
from scipy.sparse.linalg import ArpackError
from skimage import data as skdata
from skimage import feature, filters, graph, segmentation
from skimage.util import img_as_uint

from data_tools.mini.render import CEILING, FLOOR, OBJ0, WALL, Hits
from data_tools.mini.scene import CATEGORIES, ROOM_TYPES, Scene
from modsquad_ds.data import decode

CURVATURE_ENCODE = 20.0
"""raw = 127 + 20 * k (k in 1/m): our objects' radii of 0.15-0.55 m (k up to 6.7) stay inside 8 bits."""
TEXTURE_PX_PER_M = 160.0
RESHADE_D0 = 1.8
"""Distance (m) up to which the reshading lamp at the camera is at full strength."""
RELEASE_FROM_CAMERA = np.array([1.0, -1.0, -1.0])
"""Our camera frame (x right, y up, z back) -> the release's normal frame (x right, y down, z forward)."""


@functools.lru_cache(maxsize=None)
def texture(name: str) -> np.ndarray:
    """A bundled scikit-image photo as float RGB in [0, 1]."""
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.float32) / 255.0


def _sample(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    h, w = tex.shape[:2]
    x = np.floor(uv[:, 0] * TEXTURE_PX_PER_M).astype(np.int64) % w
    y = np.floor(-uv[:, 1] * TEXTURE_PX_PER_M).astype(np.int64) % h
    return tex[y, x]


def _lambert(h: Hits, light: np.ndarray) -> np.ndarray:
    to_light = light - h.point
    dist = np.linalg.norm(to_light, axis=1, keepdims=True).clip(1e-6)
    return np.clip(np.sum(h.normal * to_light / dist, axis=1), 0, 1)


def geometry_domains(scene: Scene, h: Hits, res: int) -> dict[str, np.ndarray]:
    hit = np.isfinite(h.t)
    wall_tex, floor_tex, tint, _ = ROOM_TYPES[scene.room_type]
    color = np.zeros((len(h.t), 3), np.float32)
    for sid, name in ((FLOOR, floor_tex), (CEILING, "gravel"), (WALL, wall_tex)):
        sel = h.surface == sid
        color[sel] = _sample(texture(name), h.uv[sel]) * np.array(tint, np.float32)
    sem = np.where(hit, 1, 0).astype(np.uint8)  # 1 background; 0 uncertain (no geometry)
    for idx, obj in enumerate(scene.objects):
        sel = h.surface == OBJ0 + idx
        color[sel] = _sample(texture(CATEGORIES[obj.category][2]), h.uv[sel])
        sem[sel] = 2 + obj.category
    light = _lambert(h, scene.light)
    rgb = color * (0.35 + 0.65 * light[:, None])
    sky = np.array([0.75, 0.85, 1.0], np.float32) * (0.8 + 0.2 * h.dirs_cam[:, 1:2].clip(0, 1))
    rgb[~hit] = sky[~hit]
    # z-buffer depth is the distance along the camera's viewing axis; euclidean is along the ray.
    zbuf = h.t * -h.dirs_cam[:, 2]

    def depth_u16(x):
        out = np.full(len(x), 65535, np.uint16)
        out[hit] = np.clip(np.round(x[hit] * decode.DEPTH_UNITS_PER_METRE), 0, decode.DEPTH_INVALID_MIN - 1)
        return out

    # World -> camera (rot is orthonormal, camera-to-world), then the release's frame: our camera has
    # x right, y up, z towards the viewer; the release's decoded normals have x image-right, y
    # image-down, z away from the camera (a floor decodes to n_y < 0, a ceiling to n_y = +1).
    n_cam = (h.normal @ scene.cam_rot) * RELEASE_FROM_CAMERA
    normal = np.full((len(h.t), 3), 128, np.uint8)
    normal[hit] = np.clip(np.round(n_cam[hit] * decode.NORMAL_SCALE + decode.NORMAL_CENTER), 0, 255)
    # "new lighting": a lamp at the camera, unlike the rgb's ceiling light.
    reshade = np.zeros(len(h.t), np.uint8)
    # Inverse-square falloff from RESHADE_D0 on: real reshading images are dim away from the camera
    # (mean ~0.2-0.3 of 255 on the release), not a flat cosine.
    falloff = np.minimum(1.0, (RESHADE_D0 / np.maximum(h.t, 1e-6)) ** 2)
    reshade[hit] = np.round(255 * np.clip(_lambert(h, scene.cam_pos) * falloff, 0, 1)[hit])
    curv = np.zeros((len(h.t), 3), np.uint8)  # invalid code (0, 0, 0)
    curv[hit, 0] = np.clip(np.round(decode.CURVATURE_CENTER + CURVATURE_ENCODE * h.k1[hit]), 1, 255)
    curv[hit, 1] = np.clip(np.round(decode.CURVATURE_CENTER + CURVATURE_ENCODE * h.k2[hit]), 1, 255)
    shape2, shape3 = (res, res), (res, res, 3)
    return {
        "rgb": np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(shape3),
        "depth_zbuffer": depth_u16(zbuf).reshape(shape2),
        "depth_euclidean": depth_u16(h.t).reshape(shape2),
        "normal": normal.reshape(shape3),
        "reshading": np.repeat(reshade.reshape(shape2)[..., None], 3, axis=2),
        "principal_curvature": curv.reshape(shape3),
        "segment_semantic": sem.reshape(shape2),
    }


def _gray(rgb: np.ndarray) -> np.ndarray:
    # PIL's convert('L') weights (ITU-R 601-2), as the recipe's rgb.convert('L').
    return (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0


def edge_texture(rgb: np.ndarray) -> np.ndarray:
    gray = _gray(rgb)
    ones = np.ones_like(gray)
    smooth = filters.gaussian(gray, sigma=3.0, mode="constant") / filters.gaussian(ones, sigma=3.0, mode="constant")
    edges = img_as_uint(np.clip(filters.sobel(smooth), 0, 1))
    # The release is 0 on the 1-pixel image border (older scikit-image's sobel zeroed it; since
    # 0.19 it reflects there instead): zero it as the release files are.
    edges[[0, -1], :] = 0
    edges[:, [0, -1]] = 0
    return edges


def keypoints2d(rgb: np.ndarray) -> np.ndarray:
    gray = _gray(rgb)
    resp = np.max([feature.hessian_matrix_det(gray, sigma=s, approximate=True)
                   for s in np.linspace(1, 30, 10)], axis=0)
    return img_as_uint(np.clip(resp, 0, 1))


def segment_unsup2d(rgb: np.ndarray, seed: int) -> np.ndarray:
    labels = segmentation.felzenszwalb(rgb, scale=200, sigma=3.0)
    if labels.max() == 0:  # one segment (tiny images): the region graph would have no edges
        return np.zeros(labels.shape, np.uint8)
    cut = None
    for attempt in range(3):  # ARPACK's eigsh (inside cut_normalized) fails on some graphs from some
        g = graph.rag_mean_color(rgb, labels, mode="similarity")  # start vectors: retry with another
        try:
            cut = graph.cut_normalized(labels, g, thresh=0.005, num_cuts=10, max_edge=2.0, rng=seed + attempt)
            break
        except ArpackError:
            continue
    if cut is None:  # never seen after a retry; the superpixels themselves are the closest fallback
        cut = labels
    # cut_normalized names each region by one of its Felzenszwalb ids (skimage.graph._graph_cut._label_all),
    # not 0..k-1; the field notes' recipe stops there, so those ids are what is stored, as 8 bits.
    return (cut % 256).astype(np.uint8)


def edge_occlusion(depth_u16: np.ndarray) -> np.ndarray:
    depth = depth_u16.astype(np.float64)
    mask = depth < 2**16 - 500
    return img_as_uint(np.clip(filters.sobel(np.sqrt(depth) / np.sqrt(2**16), mask=mask), 0, 1))


def keypoints3d(depth_u16: np.ndarray) -> np.ndarray:
    """The keypoints2d recipe on the depth map (a 3D interest measure); 0 where no geometry."""
    valid = depth_u16 < decode.DEPTH_INVALID_MIN
    d = np.sqrt(np.where(valid, depth_u16, 0).astype(np.float64)) / np.sqrt(2**16)
    resp = np.max([np.abs(feature.hessian_matrix_det(d, sigma=s, approximate=True))
                   for s in np.linspace(1, 30, 10)], axis=0)
    resp = resp / max(resp[valid].max() if valid.any() else 1.0, 1e-12)  # scale to [0, 1] per image
    return np.where(valid, img_as_uint(np.clip(resp, 0, 1)), 0).astype(np.uint16)


def segment_unsup25d(dom: dict[str, np.ndarray]) -> np.ndarray:
    """Superpixels on normals + depth + curvature (the release's 2.5D segmentation inputs)."""
    valid = dom["depth_zbuffer"] < decode.DEPTH_INVALID_MIN
    depth = np.where(valid, dom["depth_zbuffer"], 0) / (32.0 * decode.DEPTH_UNITS_PER_METRE)  # ~0..0.3
    stack = np.concatenate([dom["normal"] / 255.0, depth[..., None],
                            dom["principal_curvature"][..., :2] / 255.0], axis=2)
    with warnings.catch_warnings():  # 6 channels is intended: not an RGB image
        warnings.simplefilter("ignore", RuntimeWarning)
        labels = segmentation.felzenszwalb(stack, scale=50, sigma=1.0, channel_axis=-1)
    return (segmentation.relabel_sequential(labels)[0] % 256).astype(np.uint8)


def class_vectors(scene: Scene, h: Hits, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1000 ImageNet logits (objects in view, by visible area) and 365 Places probabilities (room)."""
    logits = rng.normal(0.0, 0.5, 1000).astype(np.float32)
    n = len(h.t)
    for idx, obj in enumerate(scene.objects):
        area = np.count_nonzero(h.surface == OBJ0 + idx) / n
        if area > 0:
            logits[CATEGORIES[obj.category][3]] += 3.0 + 25.0 * np.sqrt(area)
    scene_logits = rng.normal(0.0, 0.3, 365)
    scene_logits[ROOM_TYPES[scene.room_type][3]] += 6.0
    places = np.exp(scene_logits - scene_logits.max())
    return logits, (places / places.sum()).astype(np.float32)


def all_domains(scene: Scene, h: Hits, res: int, seed: int) -> dict[str, np.ndarray]:
    dom = geometry_domains(scene, h, res)
    rgb = dom["rgb"]
    dom["edge_texture"] = edge_texture(rgb)
    dom["keypoints2d"] = keypoints2d(rgb)
    dom["segment_unsup2d"] = segment_unsup2d(rgb, seed)
    dom["edge_occlusion"] = edge_occlusion(dom["depth_zbuffer"])
    dom["keypoints3d"] = keypoints3d(dom["depth_zbuffer"])
    dom["segment_unsup25d"] = segment_unsup25d(dom)
    dom["class_object"], dom["class_scene"] = class_vectors(scene, h, np.random.default_rng(seed))
    return dom


