"""Run a worker script on N local gloo ranks: fresh interpreters, env:// rendezvous on 127.0.0.1 and a
free port, one thread each, and a hard deadline after which every worker's process group is killed.

Workers write ``OUT/rank{r}.json``; :func:`run_workers` returns those records in rank order, or fails
with the tail of every worker's log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from modsquad_ds.distributed.env import free_port

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def run_workers(script: str, out_dir: Path, world_size: int = 2, args: tuple[str, ...] = (),
                timeout_s: float = 180.0) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port("127.0.0.1")
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(SCRIPTS / script), str(out_dir), *args],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # our own session: the worker and its children only
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if timed_out or any(codes):
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{_tail(out_dir / f'rank{r}.log')}"
                          for r, c in enumerate(codes))
        raise AssertionError(f"{script} {'timed out after %.0f s' % timeout_s if timed_out else 'failed'}\n{tails}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world_size)]


def _tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])
