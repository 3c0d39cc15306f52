"""Release encodings -> numbers: every scale constant lives here, with the reason for it.

Two steps, both at the stored resolution and before any resize:
1. :func:`decode_member` turns a file's bytes into a numpy array with the release's own dtype
   (PNG via PIL with 16-bit kept as uint16, NPY with ``allow_pickle=False``). Nothing else decodes
   shard members: no pickle, no torch.load, no WebDataset default handlers.
2. :func:`to_target` turns one domain's raw array into the task's float target and, for tasks with
   invalid pixels, a bool validity mask built from the raw values.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from modsquad_ds.data.tasks import TaskSpec

# ---- constants of the release encodings -------------------------------------------------------
DEPTH_UNITS_PER_METRE = 512.0
"""depth_zbuffer / depth_euclidean are uint16 in units of 1/512 m (max range 128 m)."""
DEPTH_INVALID_MIN = 64500
"""Original Taskonomy treats depth_zbuffer >= 64500 as 'no geometry' (65535 is the fill value);
every depth-masked task is invalid there."""
NORMAL_CENTER = 128.0
NORMAL_SCALE = 127.0
"""normal: 8-bit RGB, n = (raw - 128) / 127, then renormalised to unit length (8-bit rounding
leaves |n| within ~1 %). (128, 128, 128) is the invalid code."""
CURVATURE_CENTER = 127.0
CURVATURE_SCALE = 127.0
"""principal_curvature: R, G = k1, k2 centred on 127 ("zero curvature is 127"); we regress
(raw - 127) / 127 in [-1, 1]. (0, 0, 0) is the invalid code."""
UINT16_MAX = 65535.0
"""edge_texture, edge_occlusion, keypoints2d, keypoints3d are img_as_uint outputs: raw / 65535
undoes img_as_uint exactly, giving the recipe's float in [0, 1]."""
UINT8_MAX = 255.0
"""reshading (a shading image) and segment_unsup2d/25d labels: raw / 255 keeps targets in [0, 1],
the same range as the other L1 targets, so no task dominates the summed loss by scale."""
SEMANTIC_IGNORE = 0
"""segment_semantic: 0 = uncertain (masked), 1 = background, 2..17 = classes -> ids raw - 1."""

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class DecodeError(ValueError):
    """A member that cannot be decoded (bad bytes, wrong shape or dtype for its domain)."""


# ---- step 1: bytes -> raw arrays ---------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (H, W[, C]) or uint16 (H, W); 16-bit stays 16-bit.

    WebDataset's image decoders (``l8``, ``pil``, ``torchl``...) turn 16-bit depth into 255s, so we
    go through PIL ourselves and read mode ``I;16`` as uint16.
    """
    if not data.startswith(_PNG_SIGNATURE):
        raise DecodeError("not a PNG (bad signature)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(img, dtype=np.uint16)
            if mode == "I":  # 16-bit PNGs opened by some PIL builds as 32-bit ints
                arr = np.asarray(img)
                if arr.min() < 0 or arr.max() > 65535:
                    raise DecodeError("32-bit PNG values outside uint16")
                return arr.astype(np.uint16)
            if mode in ("L", "RGB"):
                return np.asarray(img, dtype=np.uint8)
            if mode in ("RGBA", "P", "LA"):
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
            raise DecodeError(f"unsupported PNG mode {mode}")
    except DecodeError:
        raise
    except Exception as err:  # PIL raises many types for damaged data
        raise DecodeError(f"undecodable PNG: {type(err).__name__}: {err}") from None


def decode_png_torchvision(data: bytes) -> np.ndarray:
    """The same arrays as :func:`decode_png` through torchvision.io (libpng), which inflates the
    release's PNGs faster than PIL (docs/benchmarks.md); modes it does not return as 1 or 3
    channels of uint8/uint16 (palette, alpha: PIL converts those to RGB) go through :func:`decode_png`."""
    if not data.startswith(_PNG_SIGNATURE):
        raise DecodeError("not a PNG (bad signature)")
    if len(data) < 26 or data[25] not in (0, 2):  # IHDR colour type: only grey (0) and RGB (2) here
        return decode_png(data)
    import torch
    from torchvision.io import ImageReadMode, decode_png as tv_decode_png

    try:
        img = tv_decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)
    except Exception as err:  # libpng errors surface as RuntimeError
        raise DecodeError(f"undecodable PNG: {type(err).__name__}: {err}") from None
    if img.shape[0] == 1 and img.dtype in (torch.uint8, torch.uint16):
        return img[0].numpy()
    if img.shape[0] == 3 and img.dtype == torch.uint8:
        return np.ascontiguousarray(img.numpy().transpose(1, 2, 0))
    return decode_png(data)  # e.g. 16-bit RGB, which the release does not use


# The header's three keys, as numpy writes them (a Python dict literal, any key order).
_NPY_KEYS = {"descr": re.compile(r"'descr': *'([<>|=][a-z]\d+)'"),
             "fortran_order": re.compile(r"'fortran_order': *(True|False)"),
             "shape": re.compile(r"'shape': *\(((?:\d+, *)*\d*)\)")}


def decode_npy(data: bytes) -> np.ndarray:
    """NPY bytes -> array, for plain numeric arrays only: an object (pickled) or structured dtype is
    refused, never unpickled. The header is read here, not by ``np.load``: numpy evaluates it with
    ``ast.literal_eval``, which in forked loader workers under CPython 3.11 has raised ``SystemError:
    AST constructor recursion depth mismatch`` on valid files (counted as corrupt samples)."""
    if not data.startswith(_NPY_MAGIC) or len(data) < 10:
        raise DecodeError("not an NPY file (bad magic)")
    major = data[6]
    width = 2 if major == 1 else 4  # header length field: 2 bytes in format 1.0, 4 in 2.0 and 3.0
    if major not in (1, 2, 3):
        raise DecodeError(f"undecodable NPY: format version {major} unknown")
    start = 8 + width
    length = int.from_bytes(data[8:start], "little")
    header = data[start:start + length].decode("utf8" if major == 3 else "latin1", errors="replace")
    found = {key: pattern.search(header) for key, pattern in _NPY_KEYS.items()}
    if not header.strip().startswith("{") or not all(found.values()):
        raise DecodeError(f"undecodable NPY: not a plain numeric array header: {header.strip()[:80]!r}")
    descr, fortran, dims = (found[key].group(1) for key in ("descr", "fortran_order", "shape"))
    try:
        dtype = np.dtype(descr)
    except TypeError as err:
        raise DecodeError(f"undecodable NPY: dtype {descr!r}: {err}") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise DecodeError(f"undecodable NPY: dtype {descr!r} is not numeric")
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - start - length != count * dtype.itemsize:
        raise DecodeError(f"undecodable NPY: {len(data) - start - length} data bytes for shape {shape} of {descr}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start + length)
    return array.reshape(shape, order="F" if fortran == "True" else "C").copy(order="K")  # writable, own memory


DECODERS = {"png": decode_png, "npy": decode_npy}
"""The only handlers: extension -> function. Members with other extensions are never decoded."""


PNG_DECODERS = {"pil": decode_png, "torchvision": decode_png_torchvision}
"""``data.png_decoder`` -> function; both return identical arrays (tests/data/test_decode.py)."""


def decode_member(ext: str, data: bytes, png_decoder: str = "pil") -> np.ndarray:
    if ext == "png":
        return PNG_DECODERS[png_decoder](data)
    try:
        return DECODERS[ext](data)
    except KeyError:
        raise DecodeError(f"no decoder for .{ext}") from None


# ---- step 2: raw arrays -> targets and masks ----------------------------------------------------
def _expect(raw: np.ndarray, domain: str, dtype, channels: int | None) -> np.ndarray:
    if raw.dtype != dtype:
        raise DecodeError(f"{domain}: expected {np.dtype(dtype).name}, got {raw.dtype.name}")
    if channels is None:
        if raw.ndim != 2:
            raise DecodeError(f"{domain}: expected a single-channel image, got shape {raw.shape}")
    elif raw.ndim != 3 or raw.shape[2] != channels:
        raise DecodeError(f"{domain}: expected {channels} channels, got shape {raw.shape}")
    return raw


def depth_valid(depth_zbuffer_raw: np.ndarray) -> np.ndarray:
    """(H, W) bool: True where the z-buffer has geometry."""
    return _expect(depth_zbuffer_raw, "depth_zbuffer", np.uint16, None) < DEPTH_INVALID_MIN


def image_to_float(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W) normalised with the ImageNet mean and std."""
    rgb = _expect(rgb, "rgb", np.uint8, 3)
    x = rgb.astype(np.float32) / UINT8_MAX
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def class_probs(raw: np.ndarray, keep: tuple[int, ...] | list[int], expected_len: int, domain: str) -> np.ndarray:
    """Release class values -> probabilities over the kept classes, summing to 1.

    class_object holds logits: softmax over all 1000 first (so the kept classes keep their share
    of the full distribution), then keep and renormalise. Values that already are a distribution
    (non-negative, summing to 1, as class_scene files are) are used as they are.
    """
    raw = np.asarray(raw).reshape(-1)
    if raw.shape[0] != expected_len or not np.issubdtype(raw.dtype, np.floating):
        raise DecodeError(f"{domain}: expected {expected_len} float values, got {raw.shape[0]} {raw.dtype}")
    if not np.all(np.isfinite(raw)):
        raise DecodeError(f"{domain}: non-finite values")
    probs = raw.astype(np.float64) if (raw.min() >= 0 and abs(raw.sum() - 1.0) < 1e-3) else softmax(raw)
    kept = probs[list(keep)]
    total = kept.sum()
    if total <= 1e-12:  # nothing of the kept classes: fall back to uniform, never divide by zero
        return np.full(len(keep), 1.0 / len(keep), dtype=np.float32)
    return (kept / total).astype(np.float32)


def to_target(spec: TaskSpec, raw: np.ndarray, valid: np.ndarray | None, keep=None):
    """One task's raw array -> (target, mask or None) at the stored resolution.

    Pixel targets are float32 (C, H, W) (segment_semantic: int64 (H, W)); masks are bool (H, W).
    ``valid`` is the depth validity map; it is combined into the mask of depth-masked tasks.
    """
    name = spec.domain
    mask = valid if spec.depth_masked else None
    if name in ("depth_zbuffer", "depth_euclidean"):
        raw = _expect(raw, name, np.uint16, None)
        own = raw < DEPTH_INVALID_MIN
        target = (raw.astype(np.float32) / DEPTH_UNITS_PER_METRE)[None]
    elif name == "normal":
        raw = _expect(raw, name, np.uint8, 3)
        own = np.any(raw != 128, axis=2)
        n = (raw.astype(np.float32) - NORMAL_CENTER) / NORMAL_SCALE
        norm = np.linalg.norm(n, axis=2, keepdims=True)
        n = np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), 0.0)
        target = n.transpose(2, 0, 1).astype(np.float32)
    elif name == "principal_curvature":
        raw = _expect(raw, name, np.uint8, 3)
        own = np.any(raw != 0, axis=2)
        target = ((raw[..., :2].astype(np.float32) - CURVATURE_CENTER) / CURVATURE_SCALE).transpose(2, 0, 1)
    elif name == "reshading":
        if raw.ndim == 3:  # three equal channels in the release: keep one
            raw = raw[..., 0]
        raw = _expect(raw, name, np.uint8, None)
        own = None
        target = (raw.astype(np.float32) / UINT8_MAX)[None]
    elif name in ("edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d"):
        raw = _expect(raw, name, np.uint16, None)
        own = None
        target = (raw.astype(np.float32) / UINT16_MAX)[None]
    elif name in ("segment_unsup2d", "segment_unsup25d"):
        raw = _expect(raw, name, np.uint8, None)
        own = None
        target = (raw.astype(np.float32) / UINT8_MAX)[None]
    elif name == "segment_semantic":
        raw = _expect(raw, name, np.uint8, None)
        if raw.max() > spec.channels:
            raise DecodeError(f"{name}: label {int(raw.max())} > {spec.channels}")
        own = raw != SEMANTIC_IGNORE
        mask = own
        target = np.maximum(raw.astype(np.int64) - 1, 0)
        return target, mask
    elif spec.kind == "class":
        from modsquad_ds.data.classes import RAW_LENGTH

        return class_probs(raw, keep, RAW_LENGTH[name], name), None
    else:
        raise DecodeError(f"no decoding rule for domain {name!r}")
    if mask is not None and own is not None:
        mask = mask & own
    return target, mask
