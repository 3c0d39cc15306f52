"""Helpers shared by the data tests (a plain module: tests/ is not a package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from modsquad_ds.config import load_config


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cfg_for(shards_dir=None, raw_root=None, **data):
    over = [f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in data.items()]
    if shards_dir is not None:
        over.append(f"data.shards_dir={shards_dir}")
    if raw_root is not None:
        over += ["data.source=raw", f"data.raw_root={raw_root}"]
    return load_config(preset="tiny", overrides=over)


def rewrite_index(shards_dir: Path, split: str = "train", counts: dict | None = None) -> Path:
    """Recompute sizes and checksums of (modified) shards; ``counts`` overrides sample counts."""
    import hashlib

    from modsquad_ds.data.shard_index import index_path, load_index, write_index

    index = load_index(index_path(shards_dir, split))
    shards = []
    for s in index.shards:
        data = Path(s.path).read_bytes()
        shards.append({"name": s.name, "samples": (counts or {}).get(s.name, s.samples), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    return write_index(index_path(shards_dir, split), split, index.domains, shards, index.seed, index.summary)


def rewrite_tar(path: Path, edit) -> None:
    """Rewrite a tar member by member: ``edit(name, data)`` returns [(name, data), ...] to write."""
    import io
    import tarfile

    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tf.addfile(info, io.BytesIO(new_data))


def collect(loader) -> list[dict]:
    return [b for b in loader]
