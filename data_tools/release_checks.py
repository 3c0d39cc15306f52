"""Checks that one sample's files follow the Taskonomy release encodings.

Used on generator output by the tests and on real shards by ``verify_shards --decode``; each
problem is a one-line string naming the domain.
"""

from __future__ import annotations

import numpy as np

from modsquad_ds.data.classes import RAW_LENGTH
from modsquad_ds.data.decode import DEPTH_INVALID_MIN, DecodeError, decode_member
from modsquad_ds.data.layout import domain_ext

# domain -> (dtype, channels: None = single channel, 3 = RGB)
ENCODINGS = {
    "rgb": (np.uint8, 3), "depth_zbuffer": (np.uint16, None), "depth_euclidean": (np.uint16, None),
    "normal": (np.uint8, 3), "principal_curvature": (np.uint8, 3), "reshading": (np.uint8, 3),
    "edge_texture": (np.uint16, None), "edge_occlusion": (np.uint16, None),
    "keypoints2d": (np.uint16, None), "keypoints3d": (np.uint16, None),
    "segment_unsup2d": (np.uint8, None), "segment_unsup25d": (np.uint8, None),
    "segment_semantic": (np.uint8, None),
}


def encoding_problems(arrays: dict[str, np.ndarray]) -> list[str]:
    """Decoded arrays that break the release encodings (dtype, channels, one map size), one line each."""
    problems = []
    shapes = {d: a.shape[:2] for d, a in arrays.items() if d in ENCODINGS}
    if len(set(shapes.values())) > 1:
        problems.append(f"maps differ in size: {shapes}")
    for domain, arr in arrays.items():
        if domain in ENCODINGS:
            dtype, ch = ENCODINGS[domain]
            if arr.dtype != dtype or (arr.ndim == 3) != (ch is not None) or (ch and arr.shape[2] != ch):
                problems.append(f"{domain}: {arr.dtype} {arr.shape}, release is {np.dtype(dtype).name} "
                                f"{'RGB' if ch else 'single channel'}")
        elif domain in RAW_LENGTH:
            if arr.shape != (RAW_LENGTH[domain],) or not np.issubdtype(arr.dtype, np.floating):
                problems.append(f"{domain}: {arr.dtype} {arr.shape}, release is float ({RAW_LENGTH[domain]},)")
    return problems


def check_sample(files: dict[str, bytes]) -> list[str]:
    problems, arrays = [], {}
    for domain, data in files.items():
        try:
            arrays[domain] = decode_member(domain_ext(domain), data)
        except DecodeError as err:
            problems.append(f"{domain}: {err}")
    problems += encoding_problems(arrays)
    if problems or "depth_zbuffer" not in arrays:
        return problems
    invalid = arrays["depth_zbuffer"] >= DEPTH_INVALID_MIN
    if "reshading" in arrays and arrays["reshading"].ndim == 3:
        r = arrays["reshading"]
        if not (np.array_equal(r[..., 0], r[..., 1]) and np.array_equal(r[..., 0], r[..., 2])):
            problems.append("reshading: the three channels differ")
    if "principal_curvature" in arrays and np.any(arrays["principal_curvature"][..., 2] != 0):
        problems.append("principal_curvature: blue channel is not 0")
    if "depth_euclidean" in arrays:
        de, dz = arrays["depth_euclidean"], arrays["depth_zbuffer"]
        ok = ~invalid & (de < DEPTH_INVALID_MIN)
        if np.any(de[ok].astype(np.int64) + 1 < dz[ok]):
            problems.append("depth_euclidean is shorter than depth_zbuffer somewhere")
    if invalid.any():
        if "normal" in arrays and not np.all(arrays["normal"][invalid] == 128):
            problems.append("normal: not (128,128,128) where depth has no geometry")
        if "principal_curvature" in arrays and not np.all(arrays["principal_curvature"][invalid] == 0):
            problems.append("principal_curvature: not (0,0,0) where depth has no geometry")
    return problems
