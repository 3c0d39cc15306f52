"""Epoch plan arithmetic: equal batches per rank, disjoint cover, resume mapping (no processes)."""

import pytest

from modsquad_ds.data import plan
from modsquad_ds.data.shard_index import ShardInfo

SHARDS = [ShardInfo(f"s{i}", n) for i, n in enumerate([7, 7, 7, 7, 2, 13, 1])]  # 44 samples


def positions(p: plan.WorkerPlan, order):
    start = {s.name: sum(x.samples for x in order[:i]) for i, s in enumerate(order)}
    return [start[sp.shard.name] + sp.first + k for sp in p.spans for k in range(sp.count)]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (2, 3)])
def test_ranks_and_workers_split_disjointly_with_equal_batches(world, workers):
    b = 2
    order = plan.epoch_shard_order(SHARDS, 5, 1)
    n = plan.batches_per_rank(44, world, b)
    seen = []
    for r in range(world):
        total = 0
        for w in range(max(1, workers)):
            p = plan.worker_plan(SHARDS, seed=5, epoch=1, rank=r, world_size=world, batch_size=b,
                                 num_workers=workers, physical=w)
            assert len(positions(p, order)) == p.n_samples
            seen += positions(p, order)
            total += p.n_batches
        assert total == n  # same number of batches on every rank
    assert len(seen) == len(set(seen)) == world * n * b
    assert set(seen) == set(range(world * n * b))


def test_shard_order_is_epoch_seeded_and_same_everywhere():
    a = [s.name for s in plan.epoch_shard_order(SHARDS, 0, 0)]
    assert a == [s.name for s in plan.epoch_shard_order(SHARDS, 0, 0)]
    assert a != [s.name for s in plan.epoch_shard_order(SHARDS, 0, 1)]


def test_resume_mapping_hand_computed():
    # 7 batches over 3 workers: logical 0 has batches 0,3,6; 1 has 1,4; 2 has 2,5.
    assert plan.worker_batches(7, 3) == [3, 2, 2]
    # Resume at batch 4: physical 0 plays logical 1 (next batch 4), physical 1 -> 2, physical 2 -> 0.
    assert [plan.logical_worker(p, 4, 3) for p in range(3)] == [1, 2, 0]
    assert [plan.skipped_batches(4, lw, 3) for lw in range(3)] == [2, 1, 1]


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than world_size"):
        plan.batches_per_rank(5, 2, 4)


def test_spans_cross_shard_boundaries():
    order = [ShardInfo("a", 3), ShardInfo("b", 4)]
    spans = plan.spans_for_range(order, 2, 3)
    assert [(s.shard.name, s.first, s.count) for s in spans] == [("a", 2, 1), ("b", 0, 2)]


def test_a_cap_above_the_split_size_changes_nothing():
    """data.samples_per_epoch larger than the split: the epoch is the whole split (44 samples, world 2,
    batch 4: 5 batches per rank), never more batches than there are samples."""
    kw = dict(seed=0, epoch=0, world_size=2, batch_size=4, num_workers=1, physical=0)
    for cap in (None, 44, 1000):
        p = plan.worker_plan(SHARDS, rank=1, cap=cap, **kw)
        assert p.n_batches == 5 and sum(sp.count for sp in p.spans) == 20
    assert plan.worker_plan(SHARDS, rank=1, cap=16, **kw).n_batches == 2
