"""Predictions -> the release's encodings: the inverses of :func:`modsquad_ds.data.decode.to_target`.

``encode_pixel(spec, pred_CHW)`` returns the array a Taskonomy release file of that domain holds
(uint16 depth in 1/512 m, 8-bit normals centred on 128, ...), so a prediction can be written as a
PNG that the same decoder, and every Taskonomy tool, reads back; decoding an encoded target gives the
target again up to the encoding's rounding (tested). ``colorize`` makes a viewable RGB picture.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from modsquad_ds.data import decode
from modsquad_ds.data.tasks import TaskSpec


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _u16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 65535).astype(np.uint16)


def encode_pixel(spec: TaskSpec, pred_CHW: np.ndarray) -> np.ndarray:
    """A pixel task's float prediction (C, H, W) -> the release array: (H, W) or (H, W, 3)."""
    name = spec.domain
    p = np.asarray(pred_CHW, dtype=np.float32)
    if name in ("depth_zbuffer", "depth_euclidean"):
        # stay below the 'no geometry' codes (>= 64500): a prediction always has a depth
        return np.minimum(_u16(p[0] * decode.DEPTH_UNITS_PER_METRE), decode.DEPTH_INVALID_MIN - 1)
    if name == "normal":
        norm = np.linalg.norm(p, axis=0, keepdims=True)
        n = np.where(norm > 1e-6, p / np.maximum(norm, 1e-6), np.array([0.0, 0.0, 1.0])[:, None, None])
        return _u8(n * decode.NORMAL_SCALE + decode.NORMAL_CENTER).transpose(1, 2, 0)
    if name == "principal_curvature":
        rg = _u8(p[:2] * decode.CURVATURE_SCALE + decode.CURVATURE_CENTER)
        return np.concatenate([rg, np.zeros_like(rg[:1])]).transpose(1, 2, 0)  # B = 0, as the release
    if name == "reshading":
        return np.repeat(_u8(p[0] * decode.UINT8_MAX)[..., None], 3, axis=2)  # three equal channels
    if name in ("edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d"):
        return _u16(p[0] * decode.UINT16_MAX)
    if name in ("segment_unsup2d", "segment_unsup25d"):
        return _u8(p[0] * decode.UINT8_MAX)
    if name == "segment_semantic":  # class scores -> release labels: ids 0..16 are stored as 1..17
        return (p.argmax(axis=0) + 1).astype(np.uint8)
    raise ValueError(f"no encoding for domain {name!r}")


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a uint8 (H, W[, 3]) or uint16 (H, W) array; 16-bit stays 16-bit."""
    image = Image.fromarray(np.ascontiguousarray(array))  # uint16 (H, W) becomes mode I;16: a 16-bit PNG
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def colorize(spec: TaskSpec, encoded: np.ndarray) -> np.ndarray:
    """A viewable uint8 RGB picture of an encoded prediction."""
    if encoded.ndim == 3:  # normals, curvature, reshading: already RGB
        return encoded
    import matplotlib

    if spec.domain == "segment_semantic":
        colours = matplotlib.colormaps["tab20"](np.arange(20))[:, :3]
        return (colours[encoded % 20] * 255).astype(np.uint8)
    x = encoded.astype(np.float64)
    lo, hi = np.percentile(x, 1), np.percentile(x, 99)
    x = np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)
    cmap = "magma_r" if spec.domain.startswith("depth") else "viridis"
    return (matplotlib.colormaps[cmap](x)[..., :3] * 255).astype(np.uint8)
