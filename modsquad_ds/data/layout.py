"""The raw Taskonomy release layout: file names, sample keys, split CSVs, and scanning a folder.

Layout: ``{root}/{domain}/taskonomy/{building}/point_{p}_view_{v}_domain_{domain}.{ext}``.
Files are paired across domains by ``(building, point, view)`` parsed from the name, never by their
position in a directory listing (listings of different domains differ whenever a file is missing).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Older release names (the 2018 per-building tars) mapped to the current ones.
DOMAIN_ALIASES = {
    "depth": "depth_zbuffer", "mist": "depth_euclidean", "edge2d": "edge_texture",
    "edge": "edge_occlusion", "softmax1000": "class_object", "places": "class_scene",
    "keypoint": "keypoints3d", "keypoint2d": "keypoints2d", "reshade": "reshading",
    "curvature": "principal_curvature", "segment2d": "segment_unsup2d",
    "segment25d": "segment_unsup25d", "segmentsemantic": "segment_semantic",
}

# File extension of each domain in the release (everything else is a PNG).
NPY_DOMAINS = {"class_object", "class_scene"}


def domain_ext(domain: str) -> str:
    return "npy" if domain in NPY_DOMAINS else "png"


_NAME_RE = re.compile(r"^point_(\d+)_view_(\d+)_domain_([A-Za-z0-9_]+)\.(png|npy|json)$")
_KEY_RE = re.compile(r"^(?P<building>[^/.]+?)__point_(?P<point>\d+)_view_(?P<view>\d+)$")


@dataclass(frozen=True, order=True)
class SampleId:
    """One camera view: the unit every domain file is paired on."""

    building: str
    point: int
    view: int

    @property
    def key(self) -> str:
        """WebDataset key: no dots (WebDataset splits member names at the first dot)."""
        return f"{self.building}__point_{self.point}_view_{self.view}"

    @classmethod
    def from_key(cls, key: str) -> "SampleId":
        m = _KEY_RE.match(key)
        if not m:
            raise ValueError(f"not a sample key: {key!r} (expected building__point_P_view_V)")
        return cls(m["building"], int(m["point"]), int(m["view"]))

    def filename(self, domain: str) -> str:
        return f"point_{self.point}_view_{self.view}_domain_{domain}.{domain_ext(domain)}"

    def path(self, root: str | Path, domain: str) -> Path:
        return Path(root) / domain / "taskonomy" / self.building / self.filename(domain)


def parse_filename(name: str) -> tuple[int, int, str, str] | None:
    """``point_3_view_1_domain_rgb.png`` -> (3, 1, "rgb", "png"); None for foreign files."""
    m = _NAME_RE.match(name)
    if not m:
        return None
    return int(m[1]), int(m[2]), DOMAIN_ALIASES.get(m[3], m[3]), m[4]


def read_split_csv(path: str | Path) -> dict[str, list[str]]:
    """Buildings per split from a release CSV ``id,train,val,test`` (0/1 flags).

    The release files end lines with a bare CR, which ``csv`` and ``readlines`` in text mode on some
    platforms treat as one single line; ``str.splitlines`` splits on CR, LF and CRLF alike.
    """
    text = Path(path).read_bytes().decode("utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty split file")
    header = [h.strip().lower() for h in lines[0].split(",")]
    if header[0] != "id" or len(header) < 2:
        raise ValueError(f"{path}: expected a header 'id,train,val,test', got {lines[0]!r}")
    out: dict[str, list[str]] = {name: [] for name in header[1:]}
    for lineno, line in enumerate(lines[1:], start=2):
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(header):
            raise ValueError(f"{path}:{lineno}: expected {len(header)} columns, got {line!r}")
        for name, flag in zip(header[1:], cells[1:]):
            if flag not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: flag {name}={flag!r} is not 0 or 1")
            if flag == "1":
                out[name].append(cells[0])
    return out


def write_split_csv(path: str | Path, splits: dict[str, list[str]]) -> None:
    """Write a split CSV exactly as the release does (bare-CR line endings)."""
    names = ["train", "val", "test"]
    buildings = sorted({b for s in splits.values() for b in s})
    rows = ["id," + ",".join(names)]
    for b in buildings:
        rows.append(b + "," + ",".join("1" if b in splits.get(n, []) else "0" for n in names))
    Path(path).write_bytes(("\r".join(rows) + "\r").encode())


@dataclass
class ScanResult:
    """What a scan of the raw folder found, and what it could not use (for the summary)."""

    samples: dict[SampleId, dict[str, Path]] = field(default_factory=dict)
    """Complete samples: every requested domain present."""
    incomplete: dict[SampleId, list[str]] = field(default_factory=dict)
    """Samples lacking some domains -> the missing domain names."""
    missing_domain_dirs: list[str] = field(default_factory=list)
    excluded_buildings: list[str] = field(default_factory=list)
    """Buildings on disk but not in the requested split."""
    absent_buildings: list[str] = field(default_factory=list)
    """Buildings in the split CSV with no files on disk."""
    foreign_files: int = 0

    def summary(self) -> dict:
        missing_per_domain: dict[str, int] = {}
        for doms in self.incomplete.values():
            for d in doms:
                missing_per_domain[d] = missing_per_domain.get(d, 0) + 1
        return {
            "complete_samples": len(self.samples),
            "incomplete_samples": len(self.incomplete),
            "missing_files_per_domain": dict(sorted(missing_per_domain.items())),
            "incomplete_examples": [k.key for k in sorted(self.incomplete)[:10]],
            "missing_domain_dirs": self.missing_domain_dirs,
            "excluded_buildings": len(self.excluded_buildings),
            "excluded_examples": self.excluded_buildings[:10],
            "absent_buildings": self.absent_buildings,
            "foreign_files": self.foreign_files,
        }


def scan_release(root: str | Path, domains: list[str], buildings: list[str] | None = None) -> ScanResult:
    """Index ``root`` by (building, point, view) for ``domains``; ``buildings`` limits to a split.

    Uses ``os.scandir`` once per building folder (one directory read, no per-file stat), so scanning
    the full release is bounded by directory reads, not by 4 million stats.
    """
    root = Path(root)
    result = ScanResult()
    found: dict[SampleId, dict[str, Path]] = {}
    on_disk: set[str] = set()
    wanted = set(buildings) if buildings is not None else None
    for domain in domains:
        base = root / domain / "taskonomy"
        if not base.is_dir():
            result.missing_domain_dirs.append(domain)
            continue
        for bentry in sorted(os.scandir(base), key=lambda e: e.name):
            if not bentry.is_dir():
                continue
            on_disk.add(bentry.name)
            if wanted is not None and bentry.name not in wanted:
                continue
            for fentry in os.scandir(bentry.path):
                parsed = parse_filename(fentry.name)
                if parsed is None or parsed[2] != domain:
                    result.foreign_files += 1
                    continue
                sid = SampleId(bentry.name, parsed[0], parsed[1])
                found.setdefault(sid, {})[domain] = Path(fentry.path)
    if wanted is not None:
        result.excluded_buildings = sorted(on_disk - wanted)
        result.absent_buildings = sorted(wanted - on_disk)
    for sid in sorted(found):
        files = found[sid]
        missing = [d for d in domains if d not in files]
        if missing:
            result.incomplete[sid] = missing
        else:
            result.samples[sid] = files
    return result
