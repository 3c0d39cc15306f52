"""A checkpoint's manifest: size and SHA-256 of every file, written last, checked before resuming.

``{checkpoint}/manifest.json``::

    {"format": "modsquad-checkpoint-manifest", "version": 1,
     "files": {"mp_rank_00_model_states.pt": {"bytes": 123, "sha256": "..."}, ...}}

The atomic ``.partial-*`` rename already protects against a crash *during* a save; the manifest
covers what happens to a complete folder afterwards (a copy cut short, a full disk during rsync, a
file deleted by hand, a bad block). Hashing is split over the ranks (rank r hashes files r, r+W,
...), at save and at verification, so the cost per rank shrinks as the job grows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from modsquad_ds.distributed.collectives import is_distributed

NAME = "manifest.json"
FORMAT = "modsquad-checkpoint-manifest"
_CHUNK = 8 << 20


def file_digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _rank_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(mine: dict) -> dict:
    if not is_distributed():
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out = {}
    for part in parts:
        out.update(part)
    return out


def build(folder: Path, collective: bool = True) -> dict:
    """The manifest dict of ``folder``. ``collective``: all ranks call it once every rank's files are
    in the folder, and each hashes its share; else this process hashes every file (offline tools)."""
    rank, world = _rank_world() if collective else (0, 1)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != NAME)
    mine = {name: file_digest(folder / name) for name in names[rank::world]}
    files = _gather(mine) if collective else mine
    return {"format": FORMAT, "version": 1, "files": dict(sorted(files.items()))}


def write(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / NAME)


def _problem(folder: Path, name: str, expected: dict) -> Optional[str]:
    path = folder / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path} has {size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
    if file_digest(path)["sha256"] != expected["sha256"]:
        return f"{path} does not match its SHA-256 in the manifest (corrupted)"
    return None


def verify(folder: Path, collective: bool = True) -> Optional[str]:
    """None if the folder is intact, else one line naming the first damaged file (sorted by name).
    ``collective``: all ranks call it, the files are split over them and every rank gets the verdict;
    else this process checks every file alone."""
    manifest_path = folder / NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"{manifest_path} is missing (not written by a complete save)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable ({err})"
    rank, world = _rank_world() if collective else (0, 1)
    names = sorted(files)
    mine = {}
    for i, name in enumerate(names):
        problem = _problem(folder, name, files[name]) if i % world == rank else None
        if problem:
            mine[name] = problem
    problems = _gather(mine) if collective else mine
    return problems[min(problems)] if problems else None
