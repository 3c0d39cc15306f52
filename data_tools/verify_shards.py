"""Check WebDataset shards against their index: existence, size, sha256, sample counts, domains.

    python -m data_tools.verify_shards --index /data/shards/train.index.json [--decode] [--workers 8]

--decode also decodes every member with the loader's own decoders (PNG via PIL keeping 16 bits,
NPY without pickle) and checks each sample against the release encodings (dtypes, channels, one
resolution, invalid codes where depth has no geometry: data_tools/release_checks.py). Exit status 0 when
every shard is good, 1 otherwise; each problem is printed on one line naming the shard.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from data_tools.release_checks import check_sample  # noqa: E402
from data_tools.worker_pool import imap_unordered  # noqa: E402
from modsquad_ds.data.shard_index import ShardInfo, load_index  # noqa: E402
from modsquad_ds.data.tar_reader import split_member_name  # noqa: E402


def check_shard(args: tuple[ShardInfo, list[str], bool]) -> list[str]:
    """Problems found in one shard (empty list: good)."""
    shard, domains, do_decode = args
    path = Path(shard.path)
    if not path.is_file():
        return [f"{shard.name}: missing file {path}"]
    problems = []
    size = path.stat().st_size
    if shard.bytes and size != shard.bytes:
        problems.append(f"{shard.name}: size {size} != index {shard.bytes}")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if shard.sha256 and sha.hexdigest() != shard.sha256:
        problems.append(f"{shard.name}: sha256 differs from the index")
    keys: dict[str, set[str]] = {}
    order: list[str] = []
    files: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                parsed = split_member_name(member.name) if member.isfile() else None
                if parsed is None:
                    problems.append(f"{shard.name}: unexpected member {member.name!r}")
                    continue
                key, domain, ext = parsed
                if not order or order[-1] != key:
                    if key in keys:
                        problems.append(f"{shard.name}: members of {key} are not consecutive")
                    keys.setdefault(key, set())
                    order.append(key)
                keys[key].add(domain)
                if do_decode:
                    data = tf.extractfile(member).read()
                    files.setdefault(key, {})[domain] = data
                    if len(files) > 1:  # the previous sample is complete: check and drop it
                        done = next(iter(files))
                        problems += [f"{shard.name}: {done}: {p}" for p in check_sample(files.pop(done))]
        for key, blobs in files.items():
            problems += [f"{shard.name}: {key}: {p}" for p in check_sample(blobs)]
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{shard.name}: unreadable tar ({type(err).__name__}: {err})")
    if len(keys) != shard.samples:
        problems.append(f"{shard.name}: {len(keys)} samples, index says {shard.samples}")
    for key, doms in keys.items():
        missing = set(domains) - doms
        if missing:
            problems.append(f"{shard.name}: {key} lacks {', '.join(sorted(missing))}")
    return problems


def verify(index_file: str | Path, decode: bool = False, workers: int = 1, progress: bool = True) -> list[str]:
    index = load_index(index_file)
    jobs = [(s, index.domains, decode) for s in index.shards]
    found: dict[int, list[str]] = {}
    bar = tqdm(total=len(jobs), unit="shard", desc="verify", disable=not progress)
    checks = imap_unordered(check_shard, jobs, workers, describe=lambda job: f"checking {job[0].name}")
    with bar, contextlib.closing(checks) as results:  # the bar ends its line before any message
        for i, problems in results:
            found[i] = problems
            bar.update()
    problems = [problem for i in sorted(found) for problem in found[i]]  # in the index's shard order
    if not index.num_samples:  # make_shards left every sample out (its summary says why)
        problems.append(f"{index.split}: the index lists no samples (see its summary's unreadable_examples)")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.verify_shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="a {split}.index.json written by make_shards")
    ap.add_argument("--decode", action="store_true", help="also decode every member (slower)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        index = load_index(args.index)
        problems = verify(args.index, args.decode, args.workers, not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: verification stopped; the shards are only read, nothing changed", file=sys.stderr)
        return 130
    for p in problems:
        print(p)
    status = "OK" if not problems else f"{len(problems)} problems"
    print(f"{index.split}: {len(index.shards)} shards, {index.num_samples} samples: {status}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
