"""Writing files exactly as the Taskonomy release encodes them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 (H, W) -> 8-bit grey, uint8 (H, W, 3) -> 8-bit RGB, uint16 (H, W) -> 16-bit grey."""
    if arr.dtype == np.uint16 and arr.ndim == 2:
        img = Image.fromarray(arr)  # mode I;16: written as a 16-bit greyscale PNG
    elif arr.dtype == np.uint8 and arr.ndim in (2, 3):
        img = Image.fromarray(arr)
    else:
        raise ValueError(f"no release PNG encoding for {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
