"""A batch leaves its loader worker as one block of shared memory (modsquad_ds/data/packed.py) and
arrives as the batch it was: every value, dtype and shape, in real DataLoader worker processes."""

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_helpers import cfg_for, collect
from modsquad_ds.data.loader import build_train_loader
from modsquad_ds.data.packed import ALIGN, PackedBatch, pack, unpacked
from modsquad_ds.eval.data import eval_loader


def _batch():
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(3, 3, 5, 5, generator=g),
        "targets": {"depth": torch.rand(3, 1, 5, 5, generator=g),
                    "class": torch.randn(7, 3, generator=g).t(),  # not contiguous: packed as its values
                    "ids": torch.arange(5, dtype=torch.int64), "half": torch.randn(3, generator=g).bfloat16()},
        "masks": {"depth": torch.rand(3, 1, 5, 5, generator=g) > 0.5},
        "weight": torch.tensor(0.25), "none": torch.empty(0, 4),
        "keys": ["a", "b", "c"], "pair": ("x", torch.ones(2, dtype=torch.uint8)), "corrupt": 1, "note": None,
    }


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _assert_same(a, b):
    assert type(a) is type(b)
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_unpack_gives_back_the_batch_as_views_into_one_aligned_buffer():
    batch = _batch()
    packed = pack(batch)
    out = packed.unpack()
    _assert_same(out, batch)
    base = packed.buffer.data_ptr()
    for t in _tensors(out):
        assert t.is_contiguous() and t.untyped_storage().data_ptr() == base  # views, not copies
        assert (t.data_ptr() - base) % ALIGN == 0
    total = sum(t.nbytes for t in _tensors(batch))
    assert total <= packed.buffer.numel() < total + ALIGN * len(list(_tensors(batch)))
    assert unpacked(batch) is batch  # a loader without workers hands batches over as they are


def _numbered(i):
    b = _batch()
    b["image"] += i
    b["corrupt"] = i
    return b


class _Batches(IterableDataset):
    def __iter__(self):
        info = get_worker_info()
        for i in range(info.id, 6, info.num_workers):
            yield _numbered(i)


def test_a_worker_packs_into_shared_memory_and_the_batch_arrives_whole():
    loader = DataLoader(_Batches(), batch_size=None, num_workers=2, collate_fn=pack, multiprocessing_context="fork")
    arrived = [b for b in loader]
    assert len(arrived) == 6 and all(isinstance(b, PackedBatch) and b.buffer.is_shared() for b in arrived)
    for b in arrived:
        got = b.unpack()
        _assert_same(got, _numbered(got["corrupt"]))


@pytest.mark.parametrize("source", ["shards", "raw"])
def test_the_training_loader_delivers_with_workers_what_it_delivers_without(all_shards, mini_root, source):
    where = {"shards_dir": all_shards} if source == "shards" else {"raw_root": mini_root}
    serial = collect(build_train_loader(cfg_for(**where, batch_size=3, workers=0, hflip=False), 0, 1, epoch=1))
    workers = collect(build_train_loader(cfg_for(**where, batch_size=3, workers=2, hflip=False), 0, 1, epoch=1))
    assert len(serial) == len(workers) == 10
    for b in workers:
        assert len({t.untyped_storage().data_ptr() for t in _tensors(b)}) == 1  # one block per batch
    # the workers share the epoch out in another order: compare sample by sample
    by_key = {k: s for b in serial for k, s in zip(b["keys"], _per_sample(b))}
    assert len(by_key) == 30
    for b in workers:
        assert {f: set(v) if isinstance(v, dict) else None for f, v in b.items()} == \
            {f: set(v) if isinstance(v, dict) else None for f, v in serial[0].items()}
        for key, sample in zip(b["keys"], _per_sample(b)):
            _assert_same(sample, by_key.pop(key))
    assert not by_key


def _per_sample(batch):
    """Each sample of a batch: its row of every tensor."""
    rows = range(len(batch["keys"]))
    return [{f: {t: x[i] for t, x in v.items()} for f, v in batch.items() if isinstance(v, dict)}
            | {"image": batch["image"][i]} for i in rows]


def test_the_evaluation_loader_delivers_with_workers_what_it_delivers_without(all_shards):
    batches = {}
    for workers in (0, 2):
        cfg = cfg_for(all_shards, batch_size=4, workers=workers)
        batches[workers] = [unpacked(b) for b in eval_loader(cfg, "train", 0, 1)]
    assert len(batches[0]) == len(batches[2]) == 8  # 30 samples, the last batch padded
    for b in batches[2]:
        assert len({t.untyped_storage().data_ptr() for t in _tensors(b)}) == 1
    key_of = lambda b: b["keys"][0]  # noqa: E731  (workers take contiguous runs of batches, in turn)
    for a, b in zip(sorted(batches[0], key=key_of), sorted(batches[2], key=key_of)):
        _assert_same(a, b)
