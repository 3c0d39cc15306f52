"""Two real ranks (gloo) iterate their loaders in lock-step with an all-reduce per batch:
unequal batch counts would hang here (killed by the timeout) instead of in a training run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.dist, pytest.mark.timeout(180)]


def _rank_main(rank, world, rdv, shards_dir, result_dir):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from data_helpers import cfg_for
    from modsquad_ds.data.loader import build_train_loader

    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    cfg = cfg_for(shards_dir, batch_size=3, workers=2)
    keys, steps = [], 0
    for batch in build_train_loader(cfg, rank, world, epoch=1):
        t = torch.tensor([float(batch["image"].shape[0])])
        dist.all_reduce(t)  # every rank must reach every step
        keys += batch["keys"]
        steps += 1
    dist.barrier()
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join([str(steps)] + keys))
    dist.destroy_process_group()
    from modsquad_ds.distributed.bootstrap import end_process

    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)


def test_two_ranks_finish_the_epoch_together(all_shards, tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "rdv"), str(all_shards), str(tmp_path)), nprocs=world)
    lines = [(tmp_path / f"rank{r}.txt").read_text().split("\n") for r in range(world)]
    assert lines[0][0] == lines[1][0] == "5"
    assert not set(lines[0][1:]) & set(lines[1][1:])
    assert len(set(lines[0][1:]) | set(lines[1][1:])) == 30
