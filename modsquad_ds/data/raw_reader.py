"""Training straight from a raw release folder (no shards): for small local copies, and the
peer the sharded loader is benchmarked against.

Same batches, same guarantees as the shard loader: an epoch-seeded permutation of all complete
samples, a contiguous equal share per rank (N = T // (world * batch) batches), resume by skipping
whole batches. Files are paired by (building, point, view) from a scan, never by listing order.
A corrupt sample is replaced by the next usable one in the rank's order (counted and reported).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from torch.utils.data import Dataset, Sampler

from modsquad_ds.data.layout import SampleId, read_split_csv, scan_release
from modsquad_ds.data.plan import batches_per_rank
from modsquad_ds.data.sample import SampleError, SampleProcessor, collate

log = logging.getLogger("modsquad_ds.data")


def split_buildings(split_csv: str | None, split: str) -> list[str] | None:
    if split_csv is None:
        return None
    splits = read_split_csv(split_csv)
    if split not in splits:
        raise ValueError(f"{split_csv}: no column {split!r} (has {', '.join(splits)})")
    return splits[split]


class RawFolderDataset(Dataset):
    def __init__(self, root: str | Path, processor: SampleProcessor, buildings: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"raw Taskonomy folder not found: {self.root}")
        self.processor = processor
        scan = scan_release(self.root, processor.domains, buildings)
        summary = scan.summary()
        if scan.incomplete or scan.missing_domain_dirs or scan.absent_buildings:
            log.warning("raw folder %s: %s", self.root, summary)
        self.summary = summary
        self.ids: list[SampleId] = sorted(scan.samples)
        self.files = [scan.samples[i] for i in self.ids]
        if not self.ids:
            raise ValueError(f"no complete sample under {self.root} for domains {processor.domains}: {summary}")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> dict:
        key = self.ids[i].key
        files = {}
        for domain, path in self.files[i].items():
            try:
                files[domain] = path.read_bytes()
            except OSError as err:
                raise SampleError("unreadable file", f"{path}: {err}") from None
        return self.processor.load(key, files)

    def __getitem__(self, i: int) -> dict:
        """Sample i, or the next usable one; corrupt ones become events (``_corrupt``)."""
        events = []
        for step in range(len(self.ids)):
            j = (i + step) % len(self.ids)
            try:
                sample = self.processor.finish(self.load(j))
                sample["_corrupt"] = events
                return sample
            except SampleError as err:
                building = self.ids[j].building
                events.append((f"{self.root.name}/{building}", self.ids[j].key, err.reason, str(err)))
        raise SampleError("undecodable", f"no usable sample in {self.root}")


def collate_with_events(samples: list[dict]) -> dict:
    events = [e for s in samples for e in s.pop("_corrupt")]
    batch = collate(samples)
    batch["_corrupt"] = events
    return batch


class RankBatchSampler(Sampler):
    """Batches of indices for one rank and epoch, from ``start_batch`` on."""

    def __init__(self, num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int,
                 batch_size: int, start_batch: int = 0, shuffle: bool = True, cap: int | None = None,
                 subset: list[int] | None = None):
        """``subset``: the sample indices to use (data.fraction), else all ``num_samples``."""
        order = list(subset) if subset is not None else list(range(num_samples))
        total = min(len(order), cap) if cap else len(order)
        self.n_batches = batches_per_rank(total, world_size, batch_size)
        if shuffle:
            random.Random(f"raw:{seed}:{epoch}").shuffle(order)
        per_rank = self.n_batches * batch_size
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        self.batches = [mine[b * batch_size:(b + 1) * batch_size] for b in range(start_batch, self.n_batches)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
