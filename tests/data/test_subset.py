"""data.fraction: a fixed, seeded subset of the training split, the same every epoch, on every rank
and after a resume (the few-shot data of router fine-tuning)."""

import pytest
import torch

from data_helpers import cfg_for, collect
from modsquad_ds.data.loader import build_eval_loader, build_train_loader
from modsquad_ds.data.shard_index import index_path, load_index
from modsquad_ds.data.subset import subset_positions, subset_shards, subset_size
from modsquad_ds.data.tar_reader import read_span


def test_subset_positions_are_seeded_sorted_and_sized():
    kept = subset_positions(30, 0.4, seed=0)
    assert len(kept) == 12 == len(set(kept)) and kept == sorted(kept) and all(0 <= p < 30 for p in kept)
    assert subset_positions(30, 0.4, seed=0) == kept
    assert subset_positions(30, 0.4, seed=1) != kept
    assert subset_positions(30, 1.0, seed=0) == list(range(30))
    assert [subset_size(160, f) for f in (0.005, 0.01, 0.05, 0.5)] == [1, 2, 8, 80]


def test_shard_pieces_hold_exactly_the_kept_samples(all_shards):
    shards = load_index(index_path(all_shards, "train")).shards  # 7, 7, 7, 7, 2 samples
    pieces = subset_shards(shards, 0.5, seed=3)
    starts = {s.name: 7 * i for i, s in enumerate(shards)}
    covered = [starts[p.name] + p.first + i for p in pieces for i in range(p.samples)]
    assert covered == subset_positions(30, 0.5, seed=3)
    assert all(p.first + p.samples <= 7 for p in pieces), "a piece never runs past its shard"


def _stored_keys(shards_dir):
    keys = []
    for s in load_index(index_path(shards_dir, "train")).shards:
        keys += [r.key for r in read_span(s.path, s.name, 0, s.samples, set())]
    return keys


def test_every_epoch_and_rank_reads_only_the_subset(all_shards):
    cfg = cfg_for(all_shards, batch_size=3, workers=2, fraction=0.4)
    stored = _stored_keys(all_shards)
    expected = {stored[p] for p in subset_positions(30, 0.4, cfg.seed)}
    orders = []
    for epoch in (0, 1, 2):
        per_rank = [[k for b in collect(build_train_loader(cfg, r, 2, epoch)) for k in b["keys"]] for r in (0, 1)]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert set(per_rank[0]) | set(per_rank[1]) == expected  # 12 = 2 ranks x 2 batches x 3
        orders.append(per_rank[0] + per_rank[1])
    assert len({tuple(o) for o in orders}) == 3, "each epoch permutes the subset anew"
    evaluated = {k for b in collect(build_eval_loader(cfg, 0, 1, split="train")) for k in b["keys"]}
    assert evaluated == set(stored), "evaluation reads the whole split"


def test_resume_inside_a_subset_epoch_equals_uninterrupted(all_shards):
    cfg = cfg_for(all_shards, batch_size=2, workers=2, fraction=0.5, shuffle_buffer=5)
    full = collect(build_train_loader(cfg, 0, 1, epoch=1))
    resumed = collect(build_train_loader(cfg, 0, 1, epoch=1, start_batch=3))
    assert len(full) == 7 and [b["keys"] for b in resumed] == [b["keys"] for b in full[3:]]
    for x, y in zip(full[3:], resumed):
        assert torch.equal(x["image"], y["image"])


def test_raw_folder_subset_is_fixed_across_epochs(mini_root):
    cfg = cfg_for(raw_root=mini_root, batch_size=2, workers=0, fraction=0.2)
    seen = [{k for b in collect(build_train_loader(cfg, 0, 1, epoch)) for k in b["keys"]} for epoch in (0, 1)]
    assert seen[0] == seen[1] and len(seen[0]) == 6  # round(0.2 x 30)
    too_few = cfg_for(raw_root=mini_root, batch_size=4, workers=0, fraction=0.05)
    with pytest.raises(ValueError, match="fewer than"):
        build_train_loader(too_few, 0, 1, 0)
