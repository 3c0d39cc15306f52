"""The per-split shard index written by ``data_tools.make_shards`` and read by the loader.

``{out}/{split}.index.json``::

    {"format": "modsquad-taskonomy-shards", "version": 1, "split": "train",
     "domains": [...], "seed": 0, "num_samples": T,
     "shards": [{"name": "train-000000.tar", "samples": 512, "bytes": ..., "sha256": "..."}, ...],
     "summary": {...what the scan could not use...},
     "resolution": 224, "resize": "task-aware-v1"}     # only when written with make_shards --resize

Shard names are relative to the index file's folder. The loader plans epochs from the sample
counts alone (no shard is opened to count), which is what makes equal batches per rank possible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

FORMAT = "modsquad-taskonomy-shards"
VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int = 0
    sha256: str = ""
    path: str = ""
    """Absolute path, filled in when the index is loaded."""
    first: int = 0
    """Offset of this entry's first sample in the tar: a piece of a shard (data.fraction's subset)
    has ``samples`` samples from there; a whole shard starts at 0."""


@dataclass
class ShardIndex:
    split: str
    domains: list[str]
    shards: list[ShardInfo]
    path: Path
    seed: int = 0
    summary: dict | None = None
    resolution: int | None = None
    """Image size the shards were downscaled to when written (``make_shards --resize``); None: as
    stored in the release."""
    resize: str | None = None
    """Name of the resizing recipe used then (data_tools/downscale.py)."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def resolution_problem(self, img_size: int) -> str | None:
        """What is wrong with ``model.img_size`` for these shards (downscaled to another size), or None."""
        if self.resolution is None or self.resolution == img_size:
            return None
        return (f"({img_size}) differs from the {self.resolution} px the shards in {self.path.parent} were "
                f"downscaled to (make_shards --resize): reshard with --resize {img_size} or without --resize")


def index_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}.index.json"


def write_index(path: str | Path, split: str, domains: list[str], shards: list[dict], seed: int,
                summary: dict | None = None, resolution: int | None = None, resize: str | None = None) -> Path:
    """Atomically write the index (several array jobs may race to write the same content)."""
    path = Path(path)
    doc = {"format": FORMAT, "version": VERSION, "split": split, "domains": list(domains),
           "seed": seed, "num_samples": sum(s["samples"] for s in shards),
           "shards": [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in shards],
           "summary": summary or {}}
    if resolution is not None:  # only downscaled shards carry these keys
        doc.update(resolution=resolution, resize=resize)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def load_index(path: str | Path) -> ShardIndex:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard index not found: {path} (write it with python -m data_tools.make_shards)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a shard index (a JSON {type(doc).__name__}, not an object)")
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} index (format={doc.get('format')!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: index version {doc.get('version')} is not supported (expected {VERSION})")
    base = path.parent
    try:
        shards = [ShardInfo(s["name"], int(s["samples"]), int(s.get("bytes", 0)), s.get("sha256", ""),
                            str((base / s["name"]).resolve())) for s in doc["shards"]]
        return ShardIndex(doc["split"], doc["domains"], shards, path, doc.get("seed", 0), doc.get("summary"),
                          doc.get("resolution"), doc.get("resize"))
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # edited by hand, or truncated
        raise ValueError(f"{path}: malformed shard index ({type(err).__name__}: {err})") from None
