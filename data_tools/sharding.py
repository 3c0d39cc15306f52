"""Raw release -> WebDataset tar shards: the plan, the writer, the index.

The plan is a pure function of (scan of the release, split, domains, seed, samples per shard):
every job of a Slurm array computes the same plan and writes only its own range of shards. A shard
is written to a temporary name and renamed when complete, then a small sidecar
``{shard}.json`` records its count, size and sha256: a shard with a sidecar is finished and is
never rewritten, which is what makes interrupted runs resumable. When every shard of the split has
its sidecar, ``{split}.index.json`` is assembled from them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from modsquad_ds.data.layout import domain_ext, scan_release
from modsquad_ds.data.shard_index import index_path, write_index

def _resize_recipe() -> str:
    from data_tools.downscale import RECIPE  # imports torch: only when --resize is used

    return RECIPE


_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "npy": b"\x93NUMPY"}


@dataclass
class ShardJob:
    split: str
    number: int
    name: str
    out_dir: str
    samples: list[tuple[str, dict[str, str]]]
    """(key, {domain: source path}) in shard order."""
    plan_hash: str
    resize: int | None = None
    """Downscale every sample to this size while writing (data_tools/downscale.py); None: copy."""


@dataclass
class Plan:
    split: str
    domains: list[str]
    seed: int
    samples_per_shard: int
    shards: list[ShardJob]
    summary: dict
    plan_hash: str
    resize: int | None = None


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def estimate_samples_per_shard(samples: list[dict[str, Path]], target_bytes: int, seed: int,
                               resize: int | None = None) -> int:
    """Samples per shard that gives ~``target_bytes`` shards, from the sizes of a seeded subset
    (with ``resize``: scaled by the size ratio that downscaling 4 of them actually gives)."""
    pick = random.Random(seed).sample(samples, min(64, len(samples)))
    avg = sum(sum(os.stat(p).st_size for p in files.values()) for files in pick) / max(1, len(pick))
    if resize is not None and pick:
        from data_tools.downscale import downscale_sample
        from modsquad_ds.data.decode import DecodeError

        before = after = 0
        for files in pick[:4]:
            blobs = {d: Path(p).read_bytes() for d, p in files.items()}
            try:
                small = downscale_sample(blobs, resize)
            except (DecodeError, OSError):
                continue  # the writer reports such samples; the estimate uses the others
            before += sum(map(len, blobs.values()))
            after += sum(map(len, small.values()))
        avg *= after / before if before else 1.0
    return max(1, int(round(target_bytes / max(avg, 1.0))))


def make_plan(root: str | Path, out_dir: str | Path, split: str, domains: list[str],
              buildings: list[str] | None, seed: int, samples_per_shard: int | None = None,
              shard_bytes: int = 1 << 30, resize: int | None = None) -> Plan:
    scan = scan_release(root, domains, buildings)
    ids = sorted(scan.samples)  # sorted first, so the shuffle does not depend on listing order
    random.Random(f"make_shards:{seed}").shuffle(ids)  # mixes buildings across all shards
    if samples_per_shard is None:
        samples_per_shard = (estimate_samples_per_shard([scan.samples[i] for i in ids], shard_bytes, seed, resize)
                             if ids else 1)
    identity = [split, domains, seed, samples_per_shard, [i.key for i in ids]]
    if resize is not None:  # appended only when set: plans without it keep their old hash
        identity.append({"resize": resize, "recipe": _resize_recipe()})
    plan_hash = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    shards = []
    for n, start in enumerate(range(0, len(ids), samples_per_shard)):
        chunk = ids[start:start + samples_per_shard]
        shards.append(ShardJob(split, n, shard_name(split, n), str(out_dir),
                               [(i.key, {d: str(scan.samples[i][d]) for d in domains}) for i in chunk],
                               plan_hash, resize))
    return Plan(split, domains, seed, samples_per_shard, shards, scan.summary(), plan_hash, resize)


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self):
        return self.n


def _member(name: str, data: bytes) -> tarfile.TarInfo:
    # Fixed metadata: the same plan writes byte-identical shards (stable checksums across reruns).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


def sidecar_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def is_finished(out_dir: str | Path, name: str) -> bool:
    side, tar = sidecar_path(out_dir, name), Path(out_dir) / name
    if not (side.is_file() and tar.is_file()):
        return False
    try:
        return json.loads(side.read_text())["bytes"] == tar.stat().st_size
    except (ValueError, KeyError, OSError):
        return False


def remove_unfinished(out_dir: str | Path, names: list[str]) -> int:
    """Delete the temporary files of the shards ``names`` (``.{name}.{writer pid}.tmp`` and its
    sidecar's ``.json``): an interrupted run's, or a killed one's, found when the same job resumes.
    Each shard belongs to one job of an array, so no other job writes these."""
    wanted, removed = set(names), 0
    with os.scandir(out_dir) as entries:  # one pass: an array's output folder holds all its shards
        for entry in entries:
            if _shard_of_temporary(entry.name) in wanted:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def _shard_of_temporary(filename: str) -> str | None:
    """``NAME`` for a writer's temporary ``.NAME.PID.tmp`` or ``.NAME.PID.json``, else None."""
    if not (filename.startswith(".") and filename.endswith((".tmp", ".json"))):
        return None
    name, _, _pid = filename[1:].rsplit(".", 1)[0].rpartition(".")
    return name or None


def write_shard(job: ShardJob) -> dict:
    """Write one shard (copying domain files byte for byte) and its sidecar; returns the sidecar."""
    out = Path(job.out_dir)
    final = out / job.name
    tmp = out / f".{job.name}.{os.getpid()}.tmp"
    skipped = []
    count = 0
    with open(tmp, "wb") as raw:
        hf = _HashingFile(raw)
        with tarfile.open(fileobj=hf, mode="w", format=tarfile.GNU_FORMAT) as tf:
            for key, files in job.samples:
                blobs, problem = {}, None
                for domain in sorted(files):
                    path = files[domain]
                    try:
                        data = Path(path).read_bytes()
                    except OSError as err:
                        problem = f"unreadable {path}: {err.strerror or err}"
                        break
                    if not data.startswith(_MAGIC[domain_ext(domain)]):
                        problem = f"not a valid .{domain_ext(domain)} file: {path}"
                        break
                    blobs[domain] = data
                if not problem and job.resize is not None:
                    from data_tools.downscale import downscale_sample
                    from modsquad_ds.data.decode import DecodeError

                    try:
                        blobs = downscale_sample(blobs, job.resize)
                    except DecodeError as err:
                        problem = f"cannot downscale: {err}"
                if problem:
                    skipped.append({"key": key, "reason": problem})
                    continue
                for domain, data in sorted(blobs.items()):
                    tf.addfile(_member(f"{key}.{domain}.{domain_ext(domain)}", data), io.BytesIO(data))
                count += 1
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    side = {"name": job.name, "samples": count, "bytes": final.stat().st_size, "sha256": hf.sha.hexdigest(),
            "plan": job.plan_hash, "skipped": skipped}
    stmp = sidecar_path(out, f".{job.name}.{os.getpid()}")
    stmp.write_text(json.dumps(side))
    os.replace(stmp, sidecar_path(out, job.name))
    return side


def written_by_other_plans(plan: Plan, out_dir: str | Path) -> list[str]:
    """Finished shards of ``plan``'s names whose sidecar records another plan (other options, or the
    release changed): resuming beside them would mix two plans in one split."""
    other = []
    for job in plan.shards:
        if is_finished(out_dir, job.name):
            if json.loads(sidecar_path(out_dir, job.name).read_text()).get("plan") != plan.plan_hash:
                other.append(job.name)
    return other


def try_write_index(plan: Plan, out_dir: str | Path) -> Path | None:
    """Assemble ``{split}.index.json`` if every shard of the plan is finished; else None."""
    sides = []
    for job in plan.shards:
        if not is_finished(out_dir, job.name):
            return None
        side = json.loads(sidecar_path(out_dir, job.name).read_text())
        if side.get("plan") != plan.plan_hash:
            raise RuntimeError(f"{job.name} was written by a different plan ({side.get('plan')} != "
                               f"{plan.plan_hash}): the release or the options changed; delete {out_dir} "
                               "or use the original options")
        sides.append(side)
    skipped = [s for side in sides for s in side["skipped"]]
    summary = dict(plan.summary, unreadable_samples=len(skipped), unreadable_examples=skipped[:10],
                   samples_per_shard=plan.samples_per_shard)
    return write_index(index_path(out_dir, plan.split), plan.split, plan.domains,
                       [s for s in sides if s["samples"] > 0], plan.seed, summary,
                       resolution=plan.resize, resize=_resize_recipe() if plan.resize is not None else None)


