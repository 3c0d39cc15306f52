"""One sample: the domain files' bytes -> the model's tensors; and batching samples.

Shared by the WebDataset loader and the raw-folder reader so both produce the same batch:
``{"image": float32 (B,3,H,W), "targets": {task: tensor}, "masks": {task: bool (B,1,H,W)},
"keys": [str]}``. Masks exist only for tasks that have invalid pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from modsquad_ds.data import decode, transforms
from modsquad_ds.data.classes import default_keep
from modsquad_ds.data.layout import domain_ext
from modsquad_ds.data.tasks import get_task


class SampleError(ValueError):
    """A sample that cannot be used: ``reason`` is a short category for the corrupt-data report."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def needed_domains(tasks: list[str]) -> list[str]:
    """rgb, the tasks' domains, and depth_zbuffer whenever a task is masked by depth."""
    specs = [get_task(t) for t in tasks]
    out = ["rgb"] + [s.domain for s in specs]
    if any(s.depth_masked for s in specs):
        out.append("depth_zbuffer")
    return list(dict.fromkeys(out))


@dataclass
class SampleProcessor:
    """Picklable (it travels to DataLoader workers); one per loader and epoch."""

    tasks: list[str]
    img_size: int
    seed: int = 0
    epoch: int = 0
    hflip: bool = False
    class_keep: dict[str, tuple[int, ...]] = field(default_factory=dict)
    png_decoder: str = "pil"
    """data.png_decoder: "pil" or "torchvision" (same arrays; see decode.PNG_DECODERS)."""

    def __post_init__(self):
        self.specs = [get_task(t) for t in self.tasks]
        self.domains = needed_domains(self.tasks)
        self._pixel_domains = {"depth_zbuffer"} | {s.domain for s in self.specs if s.kind == "pixel"}
        for s in self.specs:
            if s.kind == "class":
                self.class_keep.setdefault(s.name, default_keep(s.name))

    def decode(self, key: str, files: dict[str, bytes]) -> dict[str, np.ndarray]:
        """Bytes of every needed domain -> raw arrays. Raises SampleError (missing / undecodable)."""
        missing = [d for d in self.domains if d not in files]
        if missing:
            raise SampleError("missing domain", f"{key} lacks {', '.join(missing)}")
        raw = {}
        for d in self.domains:
            try:
                raw[d] = decode.decode_member(domain_ext(d), files[d], self.png_decoder)
            except decode.DecodeError as err:
                raise SampleError("undecodable", f"{key} {d}: {err}") from None
        return raw

    def prepare(self, key: str, raw: dict[str, np.ndarray]) -> dict:
        """Raw arrays -> targets and masks at the stored resolution. All validation happens here
        (and in :meth:`decode`), so a sample that passes is never dropped later: that keeps the
        count of usable samples identical whether or not a resumed run skips them."""
        try:
            image = decode.image_to_float(raw["rgb"])
            size_hw = image.shape[-2:]
            # Every image member alike, before any of them is combined with another (a depth mask
            # of another size fails inside numpy with "operands could not be broadcast together").
            for domain, array in raw.items():
                if domain in self._pixel_domains and tuple(array.shape[:2]) != tuple(size_hw):
                    raise SampleError("shape mismatch",
                                      f"{key} {domain} is {tuple(array.shape[:2])}, rgb is {tuple(size_hw)}")
            valid = decode.depth_valid(raw["depth_zbuffer"]) if "depth_zbuffer" in raw else None
            targets, masks = {}, {}
            for spec in self.specs:
                t, m = decode.to_target(spec, raw[spec.domain], valid, self.class_keep.get(spec.name))
                targets[spec.name] = t
                if m is not None:
                    masks[spec.name] = m
        except decode.DecodeError as err:
            raise SampleError("undecodable", f"{key}: {err}") from None
        return {"key": key, "image": image, "targets": targets, "masks": masks}

    def finish(self, prepared: dict) -> dict:
        """Prepared arrays -> tensors at ``img_size``, flipped when this sample's coin says so."""
        key = prepared["key"]
        flip = self.hflip and transforms.flip_decision(self.seed, self.epoch, key)
        image = transforms.resize_image(torch.from_numpy(prepared["image"]), self.img_size)
        if flip:
            image = image.flip(-1)
        targets, masks = {}, {}
        for spec in self.specs:
            t = torch.from_numpy(np.ascontiguousarray(prepared["targets"][spec.name]))
            if spec.kind != "pixel":
                targets[spec.name] = t
                continue
            m = prepared["masks"].get(spec.name)
            m = torch.from_numpy(np.ascontiguousarray(m)) if m is not None else None
            t, m = transforms.resize_label(spec.name, t, m, self.img_size)
            if flip:
                t, m = transforms.hflip(spec.name, t, m)
            targets[spec.name] = t
            if m is not None:
                masks[spec.name] = m
        return {"key": key, "image": image, "targets": targets, "masks": masks}

    def load(self, key: str, files: dict[str, bytes]) -> dict:
        """decode + prepare: raises SampleError for anything unusable."""
        return self.prepare(key, self.decode(key, files))

    def __call__(self, key: str, files: dict[str, bytes]) -> dict:
        return self.finish(self.load(key, files))


def collate(samples: list[dict]) -> dict:
    """Stack processed samples into the batch dict the model and objective consume."""
    first = samples[0]
    return {
        "image": torch.stack([s["image"] for s in samples]).contiguous(),
        "targets": {t: torch.stack([s["targets"][t] for s in samples]) for t in first["targets"]},
        "masks": {t: torch.stack([s["masks"][t] for s in samples])[:, None] for t in first["masks"]},
        "keys": [s["key"] for s in samples],
    }
