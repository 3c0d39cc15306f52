"""Read a run of samples from one WebDataset tar shard, tolerating damaged shards.

Members are ``{key}.{domain}.{ext}`` and a sample's members are consecutive (WebDataset's
convention). The shard is opened seekable (``tarfile`` mode ``r:``), so samples before the wanted
run are skipped by reading their 512-byte headers only, and reading stops after the run.

Only members whose ``domain.ext`` is wanted are read at all; nothing is decoded here. Damage is
reported, not raised: a truncated or unreadable tar yields a :class:`Corrupt` event for every sample
of the run it could not deliver. A shard file that is not there at all is raised (CorruptDataError):
skipping it would silently drop its share of every epoch.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Union


@dataclass(frozen=True)
class RawSample:
    key: str
    files: dict[str, bytes]
    """domain -> file bytes, exactly as stored."""
    shard: str


@dataclass(frozen=True)
class Corrupt:
    shard: str
    key: str
    reason: str
    detail: str


def split_member_name(name: str) -> tuple[str, str, str] | None:
    """``dir/abc__point_1_view_2.depth_zbuffer.png`` -> (key, domain, ext); None if not a sample file."""
    base = name.rsplit("/", 1)[-1]
    parts = base.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def read_span(path: str, shard_name: str, first: int, count: int,
              wanted: set[str]) -> Iterator[Union[RawSample, Corrupt]]:
    """Yield samples [first, first + count) of the shard at ``path`` (``wanted`` = domain names)."""
    if not os.path.exists(path):
        from modsquad_ds.data.corrupt import CorruptDataError

        raise CorruptDataError(f"shard {shard_name} is listed in the index but missing: {path}")
    delivered = 0
    index = -1
    current_key, files = None, {}

    def flush():
        nonlocal delivered
        if current_key is not None and index >= first:
            delivered += 1
            return RawSample(current_key, files, shard_name)
        return None

    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                member = tf.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                parsed = split_member_name(member.name)
                if parsed is None:
                    continue
                key, domain, _ext = parsed
                if key != current_key:
                    done = flush()
                    if done is not None:
                        yield done
                    if delivered >= count:
                        return
                    index += 1
                    current_key, files = key, {}
                if index >= first and domain in wanted:
                    f = tf.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    files[domain] = data
            done = flush()
            if done is not None:
                yield done
    except (tarfile.TarError, OSError, EOFError) as err:
        error = f"{type(err).__name__}: {err}"
    else:
        error = "the file ends early"
    missing = count - delivered
    for i in range(missing):  # every indexed sample of the run that did not arrive
        yield Corrupt(shard_name, "", "truncated or unreadable tar",
                      f"{error}; {missing} of {count} samples of the run lost")
