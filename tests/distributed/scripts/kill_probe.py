"""A rank that runs until a peer dies, for the killed-rank tests.

Usage: <launcher or env> tests/distributed/scripts/kill_probe.py OUT MODE [HEARTBEAT_S]
  MODE collective: all-reduce in a loop inside fail_fast (a dead peer breaks the collective)
  MODE compute:    never communicate (a long computation or data wait): only the heartbeat notices
Writes OUT/ready{rank} (with its pid) once the process group is up, then loops until killed.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from modsquad_ds.distributed.bootstrap import init_distributed
from modsquad_ds.distributed.watchdog import fail_fast


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    heartbeat_s = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    # The process-group timeout is far longer than the test allows: what ends the job must be the
    # dead peer's closed connection or the heartbeat, not a timeout.
    ctx = init_distributed(timeout_s=300, heartbeat_timeout_s=heartbeat_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ready{ctx.rank}").write_text(str(os.getpid()))
    with fail_fast(ctx.rank, ctx.world_size):
        t = torch.ones(1000)
        while True:
            if mode == "collective":
                dist.all_reduce(t)
                t.fill_(1.0)
            time.sleep(0.05)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
