"""End the job within a bounded time when a rank dies, instead of hanging.

Three layers, each covering what the one before cannot:

1. The process-group timeout (``train.dist_timeout_s``): a collective that waits longer raises on
   the ranks that wait. It has to be long (a checkpoint save or an evaluation on one rank keeps the
   others waiting legitimately), so it bounds *hangs*, slowly.
2. Gloo notices a killed peer at once (its TCP connections close) and the waiting collective raises;
   :func:`fail_fast` turns that exception into one clear line and an exit code, using ``os._exit`` so
   that no exit handler (MPI_Finalize, process-group teardown) can wait on the dead peer. NCCL does
   not notice: layer 3 covers it.
3. :class:`Heartbeat` bounds *deaths* by ``train.heartbeat_timeout_s`` whatever the survivors are
   doing (computing, loading data, blocked in NCCL, or the peer's node vanished without closing its
   sockets). A daemon thread bumps this rank's counter in the rendezvous store and watches the next
   rank's counter (a ring: three store requests per interval per rank, fine at a thousand ranks). A
   rank that sees its neighbour stall posts the reason under an ``abort`` key that every rank polls,
   so the whole job ends within about ``timeout + interval``. Losing the store itself (rank 0 hosts
   it) is also a death. The thread releases the GIL while it sleeps and torch collectives release it
   while they wait, so a busy rank still beats.

The launchers add their own layer: torchrun and the deepspeed launcher kill the remaining workers
when one exits non-zero, mpiexec (hydra) kills all ranks when one dies; srun does so with
``--kill-on-bad-exit=1`` (slurm/ scripts set it). A plain set of processes relies on the above.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Iterator, Optional

import torch.distributed as dist

EXIT_PEER_LOST = 75
"""Exit code of a rank ended because another rank died or a collective failed (EX_TEMPFAIL:
a requeue may succeed)."""
EXIT_NONFINITE = 76
"""Exit code of a run stopped by a NaN storm (see :func:`die`)."""
EXIT_DATA = 65
"""Exit code of a rank stopped by bad input data (EX_DATAERR): data.max_corrupt exceeded, a shard
gone during the run."""
EXIT_STOPPED = 3
"""Exit code of a run stopped by SIGTERM after saving its checkpoint: not finished, resume to go on.
Not 0, so that a scheduler tells it from a finished run (Slurm ends a preempted job whose script
exits 0 as COMPLETED and does not requeue it); not 128+n, which means "killed by signal n" without
a save; distinct from EXIT_PEER_LOST, after which the newest checkpoint may be older."""

_PREFIX = "modsquad/heartbeat/"


def die(message: str, code: int = EXIT_PEER_LOST) -> None:
    """Print one line to stderr and end the process now, skipping exit handlers that could block on
    a dead peer. Used from the heartbeat thread too, where an exception would only end the thread."""
    try:
        sys.stdout.flush()
        print(f"[modsquad_ds.distributed] {message}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


# Gloo reports a dead peer as a plain RuntimeError ("[.../gloo/transport/tcp/pair.cc:545] Read error
# [127.0.0.1]:36584: Connection reset by peer", torch 2.14), not as a DistError; these markers pick
# those out without swallowing ordinary bugs.
_COMM_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused",
                 "broken pipe", "timed out", "timeout", "socket")


def comm_failure_in(err: Optional[BaseException]) -> Optional[BaseException]:
    """``err``, or the exception it was raised while handling, that is a failed collective: the last
    error after a peer's death may be another one raised during the handling (seen: a loader worker
    killed by the launcher's clean-up while a gloo error was being raised)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
            return err
        if isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COMM_MARKERS):
            return err
        err = err.__cause__ or err.__context__
    return None


def is_comm_failure(err: BaseException) -> bool:
    return comm_failure_in(err) is not None


@contextlib.contextmanager
def fail_fast(rank: int, world_size: int) -> Iterator[None]:
    """Turn a failed collective into a clear one-line exit (code EXIT_PEER_LOST) instead of a
    traceback and a teardown that may hang. Other exceptions keep their traceback."""
    try:
        yield
    except Exception as raised:
        err = comm_failure_in(raised) if world_size > 1 else None
        if err is None:
            raise
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        die(f"rank {rank}/{world_size}: a collective failed, a peer probably died or hung; ending "
            f"this rank ({type(err).__name__}: {first})")


class Heartbeat:
    """Liveness ring over the rendezvous store; see the module docstring.

    ``store`` must be a client of its own (:meth:`connect`), so that a stalled store request in this
    thread never holds the lock of the store the process group uses, and so that its timeout can be
    short without shortening the process group's.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float,
                 interval_s: Optional[float] = None,
                 on_failure: Callable[[str], None] = die):
        if timeout_s <= 0:
            raise ValueError(f"heartbeat timeout must be positive, got {timeout_s}")
        self.store = dist.PrefixStore(_PREFIX, store)
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.interval_s = interval_s if interval_s is not None else min(5.0, timeout_s / 6)
        self.peer = (rank + 1) % world_size
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modsquad-heartbeat", daemon=True)

    @classmethod
    def connect(cls, master_addr: str, master_port: int, rank: int, world_size: int,
                timeout_s: float, **kwargs) -> "Heartbeat":
        store = dist.TCPStore(master_addr, master_port, is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return cls(store, rank, world_size, timeout_s, **kwargs)

    def start(self) -> "Heartbeat":
        self.store.add(f"beat/{self.rank}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leave the ring on purpose: the watcher of this rank stops expecting beats. Call on every
        rank before the process group is torn down (bootstrap.shutdown does)."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.store.set(f"left/{self.rank}", "1")

    def _run(self) -> None:
        last_seen, last_change = -1, time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.check(["abort"]):
                    reason = self.store.get("abort").decode()
                    self._fail(f"rank {self.rank}/{self.world_size}: ending because {reason}")
                    return
                seen = self.store.add(f"beat/{self.peer}", 0)
                now = time.monotonic()
                if seen != last_seen:
                    last_seen, last_change = seen, now
                elif now - last_change > self.timeout_s and not self.store.check([f"left/{self.peer}"]):
                    reason = (f"rank {self.peer} sent no heartbeat for {now - last_change:.0f} s "
                              f"(killed, crashed or its node is gone; noticed by rank {self.rank})")
                    with contextlib.suppress(Exception):
                        self.store.set("abort", reason)
                    self._fail(f"rank {self.rank}/{self.world_size}: ending because {reason}")
                    return
            except Exception as err:  # the store lives on rank 0 (or the torchrun agent)
                if self._stop.is_set():
                    return
                self._fail(f"rank {self.rank}/{self.world_size}: lost the rendezvous store "
                           f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                           "rank 0 or the launcher probably died")
                return

    def _fail(self, message: str) -> None:
        if not self._stop.is_set():
            self.on_failure(message)
