"""The loaders where CUDA is present: batches from workers arrive pinned, as one pinned block
(modsquad_ds/data/packed.py: the pin thread pins the packed batch), and reach the GPU with their
values, by the copies TrainModule makes (non-blocking from pinned memory). Evaluation's too: its
copies are non-blocking as well (eval/runner.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_tools import make_shards
from data_tools.mini_taskonomy import generate
from modsquad_ds.config import load_config
from modsquad_ds.data.loader import build_train_loader, start_workers
from modsquad_ds.data.packed import unpacked
from modsquad_ds.eval.data import eval_loader
from modsquad_ds.train.module import to_device


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_loader")
    generate(root, buildings=2, points=2, views=2, resolution=32, seed=4, workers=2, progress=False)
    out = root / "shards"
    assert make_shards.main(["--root", str(root), "--out", str(out), "--split", "train", "--samples-per-shard", "4",
                             "--no-progress"]) == 0
    return out


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _tensors(v)


def test_batches_from_workers_arrive_pinned_in_one_block_and_reach_the_gpu(shards):
    def batches(workers):
        cfg = load_config(preset="tiny", overrides=[f"data.shards_dir={shards}", "data.batch_size=2",
                                                    f"data.workers={workers}", "data.hflip=false"])
        return list(build_train_loader(cfg, 0, 1, epoch=0))

    def rows(batch):  # each sample's row of every tensor (workers share the epoch out in another order)
        return {key: [t[i].cpu() for t in _tensors(batch)] for i, key in enumerate(batch["keys"])}

    expected = {k: r for b in batches(0) for k, r in rows(b).items()}
    device = torch.device("cuda", torch.cuda.current_device())
    arrived = {}
    for batch in batches(2):
        tensors = list(_tensors(batch))
        assert len(tensors) == 21 and all(t.is_pinned() for t in tensors)
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        moved = to_device(batch, device)
        torch.cuda.synchronize()
        assert all(t.device == device for t in _tensors(moved))
        arrived.update(rows(moved))
    assert arrived.keys() == expected.keys() and len(arrived) == 8
    for key, got in arrived.items():
        assert all(torch.equal(a, b) for a, b in zip(got, expected[key], strict=True)), key


def test_evaluation_batches_from_workers_arrive_pinned_in_one_block(shards):
    cfg = load_config(preset="tiny", overrides=[f"data.shards_dir={shards}", "data.batch_size=2", "data.workers=2"])
    batches = [unpacked(b) for b in start_workers(eval_loader(cfg, "train", 0, 1))]
    assert len(batches) == 4
    for batch in batches:
        tensors = list(_tensors(batch))
        assert all(t.is_pinned() for t in tensors)
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
