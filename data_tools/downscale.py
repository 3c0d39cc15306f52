"""Shard-time downscaling: one sample's release files -> the same files at the training resolution.

At 512 px a loader worker spends most of its time inflating 13+ PNGs it then shrinks to 224 or
less. Resizing once, when the shards are written, moves that work out of every epoch. The output
keeps the release encodings (dtypes, channels, invalid codes), so the loader reads it unchanged,
and the resizing is the loader's own (modsquad_ds/data/transforms.py), applied to the loader's own
targets (modsquad_ds/data/decode.py), so a model sees what it would have seen from full-size shards
up to the 8/16-bit rounding of the re-encoding:

- rgb: bilinear with antialiasing;
- segment ids (segment_unsup2d/25d, segment_semantic): nearest, ids never averaged;
- depth, normals, curvature, reshading, edges, keypoints: an area average over valid pixels only,
  with validity from the *raw* values before any resize (depth_zbuffer >= 64500, the normal's
  (128,128,128), the curvature's (0,0,0)); an output pixel is valid when >= half its area is,
  invalid ones get the release's invalid code back; normals are renormalised to unit length;
- class_object / class_scene (.npy vectors): copied.

The shard index records the size (``"resolution"``) and this recipe (``"resize"``); the loader
refuses shards whose resolution differs from the model's input size.
"""

from __future__ import annotations

import numpy as np
import torch

from data_tools.release_checks import encoding_problems
from data_tools.release_io import encode_png
from modsquad_ds.data import decode, transforms
from modsquad_ds.data.tasks import get_task, is_depth_masked

RECIPE = "task-aware-v1"
"""Name of the resizing rules above, stored in the index (bump it when the rules change)."""


def _resize(domain: str, raw: np.ndarray, valid: np.ndarray | None, size: int) -> np.ndarray:
    """One domain's raw array -> raw array at ``size`` in the same encoding."""
    if domain == "rgb":
        x = torch.from_numpy(raw.astype(np.float32).transpose(2, 0, 1))
        out = transforms.resize_image(x, size).numpy().transpose(1, 2, 0)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    if domain in transforms.NEAREST_TASKS:
        return transforms.resize_label(domain, torch.from_numpy(raw.astype(np.int64)), None, size)[0] \
            .numpy().astype(raw.dtype)
    spec = get_task(domain)
    target, mask = decode.to_target(spec, raw, valid if spec.depth_masked else None)
    m = torch.from_numpy(mask) if mask is not None else None
    t, m = transforms.resize_label(domain, torch.from_numpy(target), m, size)
    t = t.numpy()
    ok = m.numpy() if m is not None else np.ones(t.shape[-2:], bool)
    if domain in ("depth_zbuffer", "depth_euclidean"):
        out = np.clip(np.round(t[0] * decode.DEPTH_UNITS_PER_METRE), 0, decode.DEPTH_INVALID_MIN - 1)
        return np.where(ok, out, 65535).astype(np.uint16)
    if domain == "normal":
        out = np.clip(np.round(t.transpose(1, 2, 0) * decode.NORMAL_SCALE + decode.NORMAL_CENTER), 0, 255)
        out[~ok] = 128
        return out.astype(np.uint8)
    if domain == "principal_curvature":
        out = np.zeros(t.shape[1:] + (3,), np.uint8)
        kk = np.clip(np.round(t.transpose(1, 2, 0) * decode.CURVATURE_SCALE + decode.CURVATURE_CENTER), 0, 255)
        out[..., :2] = kk
        out[~ok] = 0
        out[ok & (out[..., 0] == 0) & (out[..., 1] == 0), 1] = 1  # a valid (0, 0) would read as invalid
        return out
    if domain == "reshading":
        out = np.where(ok, np.clip(np.round(t[0] * decode.UINT8_MAX), 0, 255), 0).astype(np.uint8)
        return np.repeat(out[..., None], 3, axis=2)  # the release's three equal channels
    if raw.dtype == np.uint16:  # edges and keypoints: img_as_uint values
        return np.where(ok, np.clip(np.round(t[0] * decode.UINT16_MAX), 0, 65535), 0).astype(np.uint16)
    raise ValueError(f"no shard-time resizing rule for domain {domain!r}")


def downscale_sample(files: dict[str, bytes], size: int) -> dict[str, bytes]:
    """{domain: release file bytes} -> the same domains at ``size`` x ``size`` (never enlarges).

    Raises :class:`modsquad_ds.data.decode.DecodeError` for a file that does not decode or breaks the
    release encodings, or when the stored size is smaller than ``size``.
    """
    raw = {d: decode.decode_member("npy" if data.startswith(b"\x93NUMPY") else "png", data)
           for d, data in files.items()}
    problems = encoding_problems(raw)  # e.g. an RGB saved as grey: the rules below assume the release's
    if problems:
        raise decode.DecodeError("; ".join(problems))
    valid = decode.depth_valid(raw["depth_zbuffer"]) if "depth_zbuffer" in raw else None
    if valid is None and any(is_depth_masked(d) for d in raw):
        raise decode.DecodeError("depth-masked domains need depth_zbuffer in the sample to downscale")
    out = {}
    for d, arr in raw.items():
        if arr.ndim == 1:  # class vectors
            out[d] = files[d]
            continue
        h, w = arr.shape[:2]
        if min(h, w) < size:
            raise decode.DecodeError(f"{d} is {h}x{w}, smaller than --resize {size}: shards never upsample")
        out[d] = files[d] if (h, w) == (size, size) else encode_png(_resize(d, arr, valid, size))
    return out
