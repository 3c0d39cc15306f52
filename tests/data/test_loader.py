"""The streaming loader on real tar shards written by data_tools.make_shards, read by real
DataLoader worker processes."""

import io
import multiprocessing
import pickle
import tarfile

import numpy as np
import pytest
import torch

from data_helpers import cfg_for, collect, copy_shards, rewrite_index, rewrite_tar
from modsquad_ds.data.corrupt import CorruptCounter, CorruptDataError
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


def _truncation_damage(original: bytes, cut: int) -> tuple[int, int]:
    """(lost, partial) for a tar cut at byte ``cut``, from its member layout alone (tarfile offsets).

    A sample arrives whole when all its members (header, data, padding to 512) lie before the cut.
    A cut inside a member header, or exactly at its start, reads as a clean end of archive there:
    when that member is not its sample's first, the sample arrives without its later domains
    (``partial``, reported as "missing domain"). Every other sample of the shard is lost: reported
    once as "truncated or unreadable tar". (Checked against tar_reader.read_span at every 97th cut
    of a fixture shard when this was written.)"""
    layout = []  # (key, header offset, padded end) in stored order
    with tarfile.open(fileobj=io.BytesIO(original)) as tf:
        for m in tf:
            layout.append((m.name.split(".")[0], m.offset, m.offset_data + -(-m.size // 512) * 512))
    keys = list(dict.fromkeys(k for k, _, _ in layout))
    whole = sum(1 for k in keys if max(e for kk, _, e in layout if kk == k) <= cut)
    firsts = {min(h for kk, h, _ in layout if kk == k) for k in keys}
    partial = int(any(h <= cut < h + 512 and h not in firsts for _, h, _ in layout))
    return len(keys) - whole - partial, partial


def _damaged_copy(all_shards, dst):
    """The train shards with three kinds of damage: shard 0's first depth_zbuffer garbled
    (undecodable), shard 1's first normal dropped (missing domain), shard 2 cut to half its bytes
    after the index was written. Returns (folder, lost, partial): shard 2's samples the cut loses and
    whether one arrives incomplete, derived from its layout (_truncation_damage)."""
    out = copy_shards(all_shards, dst)
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
    original = truncated.read_bytes()
    cut = len(original) // 2
    truncated.write_bytes(original[:cut])  # after the index
    lost, partial = _truncation_damage(original, cut)
    assert 1 <= lost <= 7 - partial  # the cut is mid-shard (4 lost, 0 partial at the time of writing)
    return out, lost, partial


@pytest.mark.parametrize("epoch", [0, 1])
def test_corrupt_samples_are_skipped_counted_per_shard(all_shards, tmp_path, epoch):
    """A full epoch despite damage, and every corrupt sample reported exactly once, under its shard
    and reason: a worker left short refills by reading its span again, which meets the same damage,
    and those repeats are not reported again (nor counted against data.max_corrupt). In epoch 1 both
    workers' refill passes meet damage again before their quotas are full (plan.epoch_shard_order puts
    the truncated shard first in worker 0's span, shard 0 with its undecodable first sample first in
    worker 1's); in epoch 0 the refills end before any damage."""
    out, lost, partial = _damaged_copy(all_shards, tmp_path / "corrupt")
    cfg = cfg_for(out, batch_size=2, workers=2, shuffle_buffer=4)
    loader = build_train_loader(cfg, 0, 1, epoch=epoch)
    batches = collect(loader)
    assert len(batches) == 15  # still a full epoch: short workers refill from their own shards
    report = loader.corrupt_report()
    assert report["train-000000.tar"] == {"undecodable": 1}
    assert report["train-000001.tar"] == {"missing domain": 1}
    assert report["train-000002.tar"] == {"truncated or unreadable tar": lost,
                                          **({"missing domain": 1} if partial else {})}
    assert set(report) == {"train-000000.tar", "train-000001.tar", "train-000002.tar"}
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 30 and len(set(keys)) == 30 - 2 - lost - partial  # refills repeat usable samples


@pytest.mark.parametrize("workers,start", [(0, 4), (2, 5), (3, 7)])
def test_resume_mid_epoch_after_corrupt_samples_equals_uninterrupted(all_shards, tmp_path, workers, start):
    """Resuming skips the usable samples the interrupted run consumed, not stream items: corrupt
    samples met before the resume point (a resumed worker reads its span from the start again) must
    not count towards the skip, or the resumed run starts that many samples too early. Proven with
    shards holding undecodable, incomplete and truncated samples; in epoch 1 the truncated shard
    leads the span of the (first) worker, so its lost samples come before each of these resume points
    (each case fails when they are counted)."""
    out, _, _ = _damaged_copy(all_shards, tmp_path / "corrupt")
    cfg = cfg_for(out, batch_size=2, workers=workers, shuffle_buffer=4)
    full = collect(build_train_loader(cfg, 0, 1, epoch=1))
    assert len(full) == 15
    resumed = collect(build_train_loader(cfg, 0, 1, epoch=1, start_batch=start))
    assert len(resumed) == 15 - start
    _same_batches(full[start:], resumed)


def test_corrupt_limit_stops_with_the_shard_named(all_shards, tmp_path):
    out = copy_shards(all_shards, tmp_path / "limit")
    rewrite_tar(out / "train-000003.tar",
                lambda n, d: [(n, b"\x89PNG\r\n\x1a\n broken" if n.endswith(".rgb.png") else d)])
    rewrite_index(out)
    before = set(multiprocessing.active_children())
    with pytest.raises(CorruptDataError, match=r"train-000003\.tar"):
        collect(build_train_loader(cfg_for(out, batch_size=2, workers=2, max_corrupt=3), 0, 1, epoch=0))
    # The epoch's workers are gone with the error: they ignore SIGTERM, torch's last resort, and had
    # lived on (the rank waited ~20 s for them when the iterator was released).
    assert [p for p in multiprocessing.active_children() if p not in before] == []


def test_corrupt_limit_allows_exactly_max_corrupt_samples():
    """data.max_corrupt is the number of corrupt samples tolerated: with limit 2 the first and second
    add() pass and the third raises, naming the count, the limit and the shard; limit 0 tolerates
    none. Counts stay per shard and per reason."""
    counter = CorruptCounter(2, " on rank 0 this epoch", log_first=False)
    counter.add("a.tar", "k1", "undecodable", "k1 rgb: bad")
    counter.add("b.tar", "k2", "missing domain", "k2 lacks normal")
    assert counter.total == 2
    with pytest.raises(CorruptDataError, match=r"^3 corrupt samples on rank 0 this epoch exceed "
                                               r"data\.max_corrupt=2; last in shard a\.tar: undecodable"):
        counter.add("a.tar", "k3", "undecodable", "k3 depth: bad")
    assert counter.report() == {"a.tar": {"undecodable": 2}, "b.tar": {"missing domain": 1}}
    with pytest.raises(CorruptDataError, match="data.max_corrupt=0"):
        CorruptCounter(0, log_first=False).add("a.tar", "k", "undecodable", "bad")


def test_max_corrupt_equal_to_the_damage_finishes_the_epoch(all_shards, tmp_path):
    """End to end on damaged shards (2 + lost + partial corrupt samples in epoch 0, each reported once):
    data.max_corrupt equal to that number finishes the epoch; one less stops it."""
    out, lost, partial = _damaged_copy(all_shards, tmp_path / "corrupt")
    damage = 2 + lost + partial
    loader = build_train_loader(cfg_for(out, batch_size=2, workers=2, shuffle_buffer=4, max_corrupt=damage),
                                0, 1, epoch=0)
    assert len(collect(loader)) == 15 and sum(sum(c.values()) for c in loader.corrupt_report().values()) == damage
    with pytest.raises(CorruptDataError, match=f"exceed data.max_corrupt={damage - 1};"):
        collect(build_train_loader(cfg_for(out, batch_size=2, workers=2, shuffle_buffer=4,
                                           max_corrupt=damage - 1), 0, 1, epoch=0))


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
    """With hflip on, exactly the samples whose coin (flip_decision) says so come out mirrored:
    image, every pixel target and every mask (the mini release's depth masks are not left-right
    symmetric, so an unflipped mask is caught), with normal x negated; class targets unchanged.
    The others are bit-identical to the hflip=False run. Both kinds occur in the epoch."""
    from modsquad_ds.data.transforms import flip_decision

    plain = cfg_for(all_shards, batch_size=2, workers=0, hflip=False)
    flip = cfg_for(all_shards, batch_size=2, workers=0, hflip=True)
    flipped = unflipped = asymmetric_masks = 0
    pairs = list(zip(build_train_loader(plain, 0, 1, epoch=0), build_train_loader(flip, 0, 1, epoch=0)))
    assert len(pairs) == 15
    for b0, b1 in pairs:
        assert b0["keys"] == b1["keys"]
        assert set(b0["masks"]) == set(b1["masks"]) and "normal" in b0["masks"]
        for i, key in enumerate(b0["keys"]):
            if not flip_decision(plain.seed, 0, key):
                unflipped += 1
                assert torch.equal(b1["image"][i], b0["image"][i])
                for t in b0["targets"]:
                    assert torch.equal(b1["targets"][t][i], b0["targets"][t][i]), t
                for t in b0["masks"]:
                    assert torch.equal(b1["masks"][t][i], b0["masks"][t][i]), t
                continue
            flipped += 1
            assert torch.equal(b1["image"][i], b0["image"][i].flip(-1))
            n0, n1 = b0["targets"]["normal"][i], b1["targets"]["normal"][i]
            assert torch.equal(n1[0], -n0[0].flip(-1)) and torch.equal(n1[1:], n0[1:].flip(-1))
            for t in b0["targets"]:
                if t == "normal":
                    continue
                x0, x1 = b0["targets"][t][i], b1["targets"][t][i]
                assert torch.equal(x1, x0.flip(-1) if x0.dim() >= 2 else x0), t  # class: (C,), unflipped
            for t in b0["masks"]:
                m0, m1 = b0["masks"][t][i], b1["masks"][t][i]
                assert torch.equal(m1, m0.flip(-1)), t
                asymmetric_masks += int(not torch.equal(m0, m0.flip(-1)))
    assert flipped + unflipped == 30 and flipped >= 1 and unflipped >= 1
    assert asymmetric_masks >= 1  # otherwise the mask check above could not tell flipped from not


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
    worker_signals' own exit hook, this program hung after its last line. And it ends them quietly:
    the live iterator's SIGCHLD watch used to report each kill as a crash, a traceback after the
    program's last line (and after a training run stopped by Ctrl-C mid-epoch)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = EXITS_MID_EPOCH.format(helpers=str(Path(__file__).parent), shards=str(all_shards))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "killed by signal" not in done.stderr, done.stderr
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    for pid in workers:  # killed and reaped by the program, so no such process any more
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived its program"


UNDER_FORKSERVER = """
import multiprocessing, sys
multiprocessing.set_start_method("forkserver")  # Python 3.14's default on Linux
sys.path.insert(0, {helpers!r})
from data_helpers import cfg_for
from modsquad_ds.data.loader import build_train_loader

print(sum(1 for _ in build_train_loader(cfg_for({shards!r}, batch_size=2, workers=2), 0, 1, epoch=0)))
"""


def test_workers_are_forked_whatever_the_default_start_method(all_shards):
    """Python 3.14 starts processes with a forkserver by default on Linux. A forkserver child's parent
    is the server, not the rank: worker_init took it for an orphan and every worker exited at once
    ("DataLoader worker (pid(s) ...) exited unexpectedly"). The loader forks its workers itself."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = UNDER_FORKSERVER.format(helpers=str(Path(__file__).parent), shards=str(all_shards))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout) == 15  # the 30 samples in batches of 2
