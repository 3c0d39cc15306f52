"""Start the process group through modsquad_ds.distributed under whatever launcher runs this script, do one
all-reduce, and write what this rank saw to OUT/rank{r}.json.

Usage: <launcher> tests/distributed/scripts/allreduce_probe.py OUT [--local_rank N]
(the deepspeed launcher appends --local_rank; it is accepted and checked against LOCAL_RANK).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from modsquad_ds.distributed.bootstrap import init_distributed, shutdown
from modsquad_ds.distributed.collectives import all_reduce_scalar, all_reduce_tensor, any_rank, step_vote
from modsquad_ds.distributed.cpu_threads import ranks_on_this_host


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    ctx = init_distributed(timeout_s=60, heartbeat_timeout_s=30)
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t)
    import deepspeed.comm as ds_comm  # the engine's view of the same group

    record = {
        "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
        "launcher": ctx.launch.launcher, "master_addr": ctx.launch.master_addr,
        "master_port": ctx.launch.master_port, "sum": t.item(), "backend": ctx.backend,
        "init_seconds": ctx.init_seconds, "shm_op_skipped": ctx.shm_op_skipped,
        "ds_rank": ds_comm.get_rank(), "ds_world_size": ds_comm.get_world_size(),
        "argv_local_rank": args.local_rank,
        # The NaN-storm stop: one rank's bad loss must stop every rank.
        "any_last_rank": any_rank(ctx.rank == ctx.world_size - 1),
        # The trainer's micro-step vote: finite everywhere, and the largest stop wish of any rank.
        "vote_if_last_nan": step_vote(torch.tensor(float("nan") if ctx.rank == ctx.world_size - 1 else 1.0),
                                      float(ctx.rank)),
        "vote_clean": step_vote(torch.tensor(1.0), 2.0 if ctx.rank == 0 else 0.0),
        "max_rank": all_reduce_scalar(ctx.rank, op="max"), "ranks_on_host": ranks_on_this_host(),
        "tensor_sum": all_reduce_tensor(torch.tensor([ctx.rank + 1.0, 10.0], dtype=torch.float64)).tolist(),
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{ctx.rank}.json").write_text(json.dumps(record))
    shutdown(ctx)
    print(f"probe rank {record['rank']}/{record['world_size']} ok", file=sys.stderr)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
