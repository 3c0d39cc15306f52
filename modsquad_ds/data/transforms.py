"""Per-task geometric transforms: resize to the model's input size and horizontal flip.

Rules that make labels stay correct (each one a known defect of the reference code):
- Continuous labels are resized *mask-aware*: an area average over valid pixels only, so the
  65535 "no geometry" code never bleeds into valid depth; an output pixel is valid when at least
  half of the input pixels it covers are.
- Label ids (segmentation) use nearest neighbour: averaging ids invents classes.
- A horizontal flip mirrors every map and negates the x component of surface normals (the x axis
  points right in the image); curvature magnitudes are unchanged by a mirror.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

NEAREST_TASKS = {"segment_unsup2d", "segment_unsup25d", "segment_semantic"}
UNIT_VECTOR_TASKS = {"normal"}
MASK_VALID_FRACTION = 0.5


def resize_image(x_CHW: torch.Tensor, size: int) -> torch.Tensor:
    if x_CHW.shape[-2:] == (size, size):
        return x_CHW
    return F.interpolate(x_CHW[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _area(x_CHW: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x_CHW.shape[-2:]
    if h % size == 0 and w % size == 0:  # integer factor (512 -> 32, 128 -> 32): block means, ~10x
        c = x_CHW.shape[0]            # faster than adaptive pooling on CPU
        return x_CHW.reshape(c, size, h // size, size, w // size).mean(dim=(2, 4))
    # adaptive average pooling = exact area weights when shrinking, for any ratio.
    if h >= size and w >= size:
        return F.adaptive_avg_pool2d(x_CHW, (size, size))
    return F.interpolate(x_CHW[None], size=(size, size), mode="nearest")[0]


def resize_label(name: str, target: torch.Tensor, mask_HW: torch.Tensor | None, size: int):
    """Resize one task's target (C, H, W) or (H, W) and its mask (H, W) to ``size``."""
    if target.shape[-2:] == (size, size):
        return target, mask_HW
    if name in NEAREST_TASKS:
        t = target if target.dim() == 3 else target[None]
        out = F.interpolate(t[None].float(), size=(size, size), mode="nearest")[0].to(target.dtype)
        out = out if target.dim() == 3 else out[0]
        m = None
        if mask_HW is not None:
            m = F.interpolate(mask_HW[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5
        return out, m
    if mask_HW is None:
        return _area(target, size), None
    w = mask_HW[None].to(target.dtype)
    num = _area(target * w, size)
    den = _area(w, size)
    out = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    m = den[0] >= MASK_VALID_FRACTION
    if name in UNIT_VECTOR_TASKS:  # the average of unit vectors is shorter than 1
        norm = out.norm(dim=0, keepdim=True)
        out = torch.where(norm > 1e-6, out / norm.clamp_min(1e-6), torch.zeros_like(out))
    return out, m


def hflip(name: str, target: torch.Tensor, mask_HW: torch.Tensor | None):
    """Mirror one task's map left-right; normals also get x -> -x."""
    t = target.flip(-1)
    if name in UNIT_VECTOR_TASKS:
        t = t.clone()
        t[0] = -t[0]
    return t, (mask_HW.flip(-1) if mask_HW is not None else None)


def flip_decision(seed: int, epoch: int, key: str) -> bool:
    """Deterministic coin per (seed, epoch, sample): independent of worker count, order and
    resume position, so a resumed epoch flips exactly the samples the uninterrupted one did."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return digest[0] & 1 == 1
