"""The streaming loader on real tar shards written by data_tools.make_shards, read by real
DataLoader worker processes."""

import pickle

import numpy as np
import pytest
import torch

from data_helpers import cfg_for, collect, copy_shards, rewrite_index, rewrite_tar
from modsquad_ds.data.corrupt import CorruptDataError
from modsquad_ds.data.decode import decode_png
from modsquad_ds.data.layout import SampleId
from modsquad_ds.data.loader import build_eval_loader, build_shard_loader, build_train_loader

ALL_KEYS = 30


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_read_disjoint_samples_covering_the_epoch(all_shards, workers):
    cfg = cfg_for(all_shards, batch_size=3, workers=workers)
    per_rank = []
    for rank in (0, 1):
        loader = build_train_loader(cfg, rank, 2, epoch=0)
        batches = collect(loader)
        assert len(batches) == len(loader) == 5
        per_rank.append([k for b in batches for k in b["keys"]])
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == ALL_KEYS  # 30 = 2 ranks x 5 batches x 3


def test_rank_share_does_not_depend_on_worker_count(all_shards):
    keys = {}
    for workers in (0, 2):
        cfg = cfg_for(all_shards, batch_size=3, workers=workers)
        keys[workers] = {k for b in build_train_loader(cfg, 1, 2, epoch=3) for k in b["keys"]}
    assert keys[0] == keys[2]


@pytest.mark.parametrize("world,batch", [(2, 4), (3, 2), (4, 3)])
def test_equal_batch_counts_with_uneven_shards(all_shards, world, batch):
    cfg = cfg_for(all_shards, batch_size=batch, workers=2)  # shards hold 7, 7, 7, 7, 2 samples
    counts = [len(collect(build_train_loader(cfg, r, world, epoch=1))) for r in range(world)]
    assert counts == [ALL_KEYS // (world * batch)] * world


def _same_batches(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])
        for t in x["targets"]:
            assert torch.equal(x["targets"][t], y["targets"][t])
        for t in x["masks"]:
            assert torch.equal(x["masks"][t], y["masks"][t])


@pytest.mark.parametrize("workers,start", [(2, 5), (2, 6), (0, 4), (3, 7)])
def test_resume_mid_epoch_equals_uninterrupted(all_shards, workers, start):
    cfg = cfg_for(all_shards, batch_size=2, workers=workers, shuffle_buffer=5)
    full = collect(build_train_loader(cfg, 0, 1, epoch=2))
    assert len(full) == 15
    resumed = build_train_loader(cfg, 0, 1, epoch=2, start_batch=start)
    assert len(resumed) == 15 - start
    _same_batches(full[start:], collect(resumed))


def test_epochs_differ_and_repeat_deterministically(all_shards):
    cfg = cfg_for(all_shards, batch_size=2, workers=2)
    a = [b["keys"] for b in build_train_loader(cfg, 0, 1, epoch=0)]
    assert a == [b["keys"] for b in build_train_loader(cfg, 0, 1, epoch=0)]
    assert a != [b["keys"] for b in build_train_loader(cfg, 0, 1, epoch=1)]


def test_pickle_payload_in_a_shard_is_never_executed(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "evil")
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps(Payload())

    def add_payload(name, data):
        key, domain, _ = name.split(".")
        extra = [(f"{key}.evil.pyd", blob), (f"{key}.model.pth", blob), (f"{key}.meta.pickle", blob)]
        return [(name, data)] + (extra if domain == "class_object" else [])

    for tar in sorted(out.glob("*.tar")):
        rewrite_tar(tar, add_payload)
    rewrite_index(out)
    batches = collect(build_train_loader(cfg_for(out, batch_size=3, workers=2), 0, 1, epoch=0))
    assert len(batches) == 10 and not marker.exists()


def test_corrupt_samples_are_skipped_counted_per_shard(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "corrupt")
    state = {"bad_png": 0, "dropped": 0}

    def garble_one_depth(name, data):
        if name.endswith(".depth_zbuffer.png") and state["bad_png"] == 0:
            state["bad_png"] = 1
            return [(name, data[:8] + b"garbage" * 10)]
        return [(name, data)]

    def drop_one_normal(name, data):
        if name.endswith(".normal.png") and state["dropped"] == 0:
            state["dropped"] = 1
            return []
        return [(name, data)]

    rewrite_tar(out / "train-000000.tar", garble_one_depth)
    rewrite_tar(out / "train-000001.tar", drop_one_normal)
    rewrite_index(out)
    truncated = out / "train-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # after the index
    cfg = cfg_for(out, batch_size=2, workers=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, 0, 1, epoch=0)
    batches = collect(loader)
    assert len(batches) == 15  # still a full epoch: short workers refill from their own shards
    report = loader.corrupt_report()
    assert report["train-000000.tar"] == {"undecodable": 1}
    assert report["train-000001.tar"] == {"missing domain": 1}
    lost = report["train-000002.tar"]["truncated or unreadable tar"]
    assert 1 <= lost <= 7
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 30 and len(set(keys)) == 30 - 2 - lost  # refills repeat usable samples


def test_corrupt_limit_stops_with_the_shard_named(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "limit")
    rewrite_tar(out / "train-000003.tar",
                lambda n, d: [(n, b"\x89PNG\r\n\x1a\n broken" if n.endswith(".rgb.png") else d)])
    rewrite_index(out)
    with pytest.raises(CorruptDataError, match=r"train-000003\.tar"):
        collect(build_train_loader(cfg_for(out, batch_size=2, workers=2, max_corrupt=3), 0, 1, epoch=0))


def test_decoded_values_round_trip_release_encodings(all_shards, mini_root):
    cfg = cfg_for(all_shards, batch_size=5, workers=0, hflip=False)
    cfg.model.img_size = 24  # the stored resolution: no resize, values compare exactly
    batch = next(iter(build_train_loader(cfg, 0, 1, epoch=0)))
    for i, key in enumerate(batch["keys"]):
        sid = SampleId.from_key(key)
        raw = decode_png(sid.path(mini_root, "depth_zbuffer").read_bytes())
        valid = raw < 64500
        assert torch.equal(batch["masks"]["depth_zbuffer"][i, 0], torch.from_numpy(valid))
        depth = batch["targets"]["depth_zbuffer"][i, 0].numpy()
        assert np.array_equal(depth[valid] * 512, raw[valid].astype(np.float32))
        n = batch["targets"]["normal"][i]
        nmask = batch["masks"]["normal"][i, 0]
        assert torch.allclose(n.norm(dim=0)[nmask], torch.tensor(1.0), atol=1e-5)
        assert not nmask[torch.from_numpy(~valid)].any()
        assert batch["masks"]["normal"].dtype == torch.bool
    assert batch["targets"]["class_object"].sum(1).allclose(torch.ones(5))


def test_flip_in_the_loader_negates_normal_x(all_shards):
    plain = cfg_for(all_shards, batch_size=2, workers=0, hflip=False)
    flip = cfg_for(all_shards, batch_size=2, workers=0, hflip=True)
    a = {k: i for b in build_train_loader(plain, 0, 1, epoch=0) for i, k in enumerate(b["keys"])}
    from modsquad_ds.data.transforms import flip_decision

    for b0, b1 in zip(build_train_loader(plain, 0, 1, epoch=0), build_train_loader(flip, 0, 1, epoch=0)):
        for i, key in enumerate(b0["keys"]):
            n0, n1 = b0["targets"]["normal"][i], b1["targets"]["normal"][i]
            if flip_decision(plain.seed, 0, key):
                assert torch.allclose(n1[0], -n0[0].flip(-1)) and torch.allclose(n1[1:], n0[1:].flip(-1))
                assert torch.equal(b1["image"][i], b0["image"][i].flip(-1))
            else:
                assert torch.equal(n1, n0)
    assert a


def test_raw_folder_reader_gives_the_same_samples_as_shards(all_shards, mini_root):
    shard_cfg = cfg_for(all_shards, batch_size=3, workers=2, hflip=False)
    raw_cfg = cfg_for(raw_root=mini_root, batch_size=3, workers=2, hflip=False)
    by_key = {}
    for b in build_train_loader(shard_cfg, 0, 1, epoch=0):
        for i, k in enumerate(b["keys"]):
            by_key[k] = (b["image"][i], b["targets"]["depth_euclidean"][i], b["masks"]["normal"][i])
    raw_batches = collect(build_train_loader(raw_cfg, 0, 1, epoch=0))
    assert len(raw_batches) == 10
    for b in raw_batches:
        assert set(b) == {"image", "targets", "masks", "keys"}
        for i, k in enumerate(b["keys"]):
            img, depth, mask = by_key[k]
            assert torch.equal(b["image"][i], img) and torch.equal(b["targets"]["depth_euclidean"][i], depth)
            assert torch.equal(b["masks"]["normal"][i], mask)


def test_raw_reader_resume_and_split_csv(mini_root):
    cfg = cfg_for(raw_root=mini_root, batch_size=2, workers=2,
                  split_csv=str(mini_root / "splits" / "train_val_test_mini.csv"))
    full = collect(build_train_loader(cfg, 1, 2, epoch=4))
    assert len(full) == 18 // 4
    _same_batches(full[1:], collect(build_train_loader(cfg, 1, 2, epoch=4, start_batch=1)))
    val = collect(build_eval_loader(cfg, 0, 1))
    assert {SampleId.from_key(k).building for b in val for k in b["keys"]} == {"minibldg003"}


def test_missing_index_and_missing_domains_are_clear_errors(all_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="make_shards"):
        build_shard_loader(cfg_for(tmp_path), "train", 0, 1, 0)
    cfg = cfg_for(all_shards)
    cfg.tasks.names = ["segment_semantic"]  # not among the packed domains
    with pytest.raises(ValueError, match="segment_semantic"):
        build_train_loader(cfg, 0, 1, 0)
    with pytest.raises(ValueError, match="start_batch"):
        build_train_loader(cfg_for(all_shards, batch_size=3), 0, 1, 0, start_batch=11)


def test_samples_per_epoch_caps_the_epoch(all_shards):
    cfg = cfg_for(all_shards, batch_size=2, workers=0, samples_per_epoch=9)
    loader = build_train_loader(cfg, 0, 1, epoch=0)
    assert len(collect(loader)) == 4 == loader.batches_per_epoch


def test_loader_batches_feed_the_model(all_shards):
    pytest.importorskip("modsquad_ds.model.objective")
    from modsquad_ds.model import build_model
    from modsquad_ds.model.objective import MultiTaskObjective

    cfg = cfg_for(all_shards, batch_size=2, workers=0)
    model, objective = build_model(cfg), MultiTaskObjective(cfg)
    batch = next(iter(build_train_loader(cfg, 0, 1, epoch=0)))
    loss, _ = objective(model(batch["image"]), batch)
    loss.backward()
    assert torch.isfinite(loss)


EXITS_MID_EPOCH = """
import multiprocessing, sys
sys.path.insert(0, {helpers!r})
from data_helpers import cfg_for
from modsquad_ds.data.loader import build_train_loader

batches = iter(build_train_loader(cfg_for({shards!r}, batch_size=2, workers=2), 0, 1, epoch=0))
next(batches)  # the workers are running and the iterator stays alive to the end
print(*(p.pid for p in multiprocessing.active_children()), flush=True)
"""


def test_a_program_ending_mid_epoch_exits_and_ends_its_workers(all_shards):
    """Workers ignore SIGTERM, which multiprocessing's exit hook sends before joining them: without
    worker_signals' own exit hook, this program hung after its last line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = EXITS_MID_EPOCH.format(helpers=str(Path(__file__).parent), shards=str(all_shards))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    for pid in workers:  # killed and reaped by the program, so no such process any more
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its program"
