"""Shard writers in processes of their own, whose end cannot hang on a signal.

    with contextlib.closing(write_all(jobs, workers=8, resizes=False)) as sidecars:
        for side in sidecars: ...          # each shard's sidecar, in the order they finish

Not ``multiprocessing.Pool``: its workers share locked queues, and a worker that dies while it holds
a lock (an idle worker holds the task queue's, waiting for a task) leaves it held for ever, so
``Pool.terminate`` hangs acquiring it. SIGTERM to the whole job (Slurm's scancel and time limit)
killed writers exactly so; ending them by an exception instead corrupted the task pipe mid-message.
Here each writer has a pipe of its own to the parent, which hands out one job at a time; nothing
is shared, so killing a writer harms no one else.

Writers are loader-style workers (modsquad_ds/data/worker_signals.py): they ignore SIGINT and
SIGTERM, so only the parent reacts to Ctrl-C and to Slurm; they die with the parent (SIGKILL on
its death); and when the parent stops early (closing the generator), it kills them and reaps them.
What they leave half-written is the caller's to remove (sharding.remove_unfinished).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import Connection, wait
from typing import Iterator, Sequence

from data_tools.sharding import ShardJob, write_shard
from modsquad_ds.data.worker_signals import starting_workers, worker_init


# Forked: the writers must start with the parent's signal mask (see worker_signals), which a
# spawned or forkserver child does not inherit (forkserver is Python 3.14's default on Linux).
_FORK = multiprocessing.get_context("fork")


class WriterFailed(RuntimeError):
    """A writer raised (its traceback is the message) or died while writing a shard."""


def write_all(jobs: Sequence[ShardJob], workers: int, resizes: bool) -> Iterator[dict]:
    """Write ``jobs`` in ``workers`` processes (in this one for 1), yielding each shard's sidecar."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield write_shard(job)
        return
    procs: list[multiprocessing.process.BaseProcess] = []
    busy: dict[Connection, ShardJob] = {}  # each writer's pipe and the shard it is writing
    pending = iter(jobs)
    finished = False
    try:
        with starting_workers():
            for _ in range(min(workers, len(jobs))):
                ours, theirs = _FORK.Pipe()
                proc = _FORK.Process(target=_writer, args=(theirs, os.getpid(), resizes), daemon=True)
                proc.start()
                theirs.close()
                procs.append(proc)
                busy[ours] = job = next(pending)
                ours.send(job)
        while busy:
            for conn in wait(list(busy)):
                job = busy.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):  # a socket pair: a dead writer's end reads as reset or EOF
                    raise WriterFailed(f"a shard writer died while writing {job.name}") from None
                if not ok:
                    raise WriterFailed(f"writing {job.name} failed:\n{value}")
                yield value
                job = next(pending, None)
                try:
                    conn.send(job)  # None: no more work, the writer exits
                except OSError:  # it died after sending its last sidecar
                    if job is not None:
                        raise WriterFailed(f"a shard writer died before taking {job.name}") from None
                if job is not None:
                    busy[conn] = job
        finished = True
    finally:
        for proc in procs:
            if not finished:
                proc.kill()
            proc.join()


def _writer(conn: Connection, parent_pid: int, resizes: bool) -> None:
    """One writer process: jobs in, sidecars (or a traceback) out, until it is sent None."""
    worker_init(parent_pid)
    if resizes:  # downscaling runs torch: one thread each, or N writers x N threads oversubscribe
        import torch

        torch.set_num_threads(1)
    while (job := conn.recv()) is not None:
        try:
            conn.send((True, write_shard(job)))
        except Exception:  # noqa: BLE001 - the parent reports it with the shard's name
            conn.send((False, traceback.format_exc()))
            return
