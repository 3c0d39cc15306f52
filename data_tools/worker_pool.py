"""Work spread over processes of their own, whose end cannot hang on a signal.

    with contextlib.closing(imap_unordered(write_shard, jobs, workers=8)) as results:
        for i, result in results: ...      # jobs[i]'s result, in the order they finish

Not ``multiprocessing.Pool``: its workers share locked queues, and a worker that dies while it holds
a lock (an idle worker holds the task queue's, waiting for a task) leaves it held for ever, so
``Pool.terminate`` hangs acquiring it. SIGTERM to the whole job (Slurm's scancel and time limit)
killed make_shards' writers exactly so; ending them by an exception instead corrupted the task
pipe mid-message. Here each worker has a pipe of its own to the parent, which hands out one job at
a time; nothing is shared, so killing a worker harms no one else.

Workers start as loader workers do (modsquad_ds/data/worker_signals.py): they ignore SIGINT and
SIGTERM, so only the parent reacts to Ctrl-C and to Slurm; they die with the parent (SIGKILL on
its death); and when the parent stops early (closing the generator), it kills them and reaps them.
A worker that raises, or dies, ends the run with its job named instead of hanging it.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import Connection, wait
from typing import Callable, Iterator, Sequence, TypeVar

from modsquad_ds.data.worker_signals import FORK, starting_workers, worker_init

J = TypeVar("J")
R = TypeVar("R")


class WorkerFailed(RuntimeError):
    """A worker raised (its traceback is in the message) or died during a job."""


def imap_unordered(fn: Callable[[J], R], jobs: Sequence[J], workers: int, setup: Callable[[], None] | None = None,
                   describe: Callable[[J], str] = repr) -> Iterator[tuple[int, R]]:
    """``(i, fn(jobs[i]))`` as each job finishes, over ``workers`` processes (in this one for 1).
    ``setup`` runs once in each worker; ``describe`` names a job in errors."""
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            yield i, fn(job)
        return
    procs: list[multiprocessing.process.BaseProcess] = []
    busy: dict[Connection, int] = {}  # each worker's pipe and the job it is on
    pending = iter(range(len(jobs)))
    finished = False
    try:
        with starting_workers():
            for _ in range(min(workers, len(jobs))):
                ours, theirs = FORK.Pipe()
                proc = FORK.Process(target=_work, args=(theirs, os.getpid(), fn, setup), daemon=True)
                proc.start()
                theirs.close()
                procs.append(proc)
                busy[ours] = i = next(pending)
                ours.send(jobs[i])
        while busy:
            for conn in wait(list(busy)):
                i = busy.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):  # a socket pair: a dead worker's end reads as reset or EOF
                    raise WorkerFailed(f"a worker process died during {describe(jobs[i])}") from None
                if not ok:
                    raise WorkerFailed(f"{describe(jobs[i])} failed:\n{value}")
                yield i, value
                i = next(pending, None)
                try:
                    conn.send(None if i is None else jobs[i])  # None: no more work, the worker exits
                except OSError:  # it died after sending its last result
                    if i is not None:
                        raise WorkerFailed(f"a worker process died before taking {describe(jobs[i])}") from None
                if i is not None:
                    busy[conn] = i
        finished = True
    finally:
        for proc in procs:
            if not finished:
                proc.kill()
            proc.join()


def _work(conn: Connection, parent_pid: int, fn: Callable, setup: Callable[[], None] | None) -> None:
    """One worker process: jobs in, results (or a traceback) out, until it is sent None."""
    worker_init(parent_pid)
    if setup is not None:
        setup()
    while (job := conn.recv()) is not None:
        try:
            conn.send((True, fn(job)))
        except Exception:  # noqa: BLE001 - the parent reports it with the job's name
            conn.send((False, traceback.format_exc()))
            return
