"""One run per run folder: rank 0 holds a lock on ``{out_dir}/.run.lock`` for the run's life.

Two trainings in one ``train.out_dir`` would interleave ``metrics.jsonl``, rename the same
``step_*`` folders and delete each other's ``.partial-*`` folders. The lock is a POSIX record lock
(``fcntl.lockf``), chosen because:
- the kernel drops it when the holding process ends in any way (crash, SIGKILL, ``os._exit``), so a
  crashed run never leaves the folder stuck; the file itself stays and is simply locked again;
- it is not inherited by forked children (DataLoader workers), so a lingering worker of a dead rank
  cannot keep it (``flock`` locks are shared with children);
- on NFS, Linux sends it to the server's lock manager (NLM for v3, the protocol itself for v4), so it
  holds across machines; if the holder's machine dies, the server frees it when the lease lapses
  (NFSv4: ~90 s), after which a requeued run gets it.
Only rank 0 takes it: the other ranks of the same run are its own processes, and one holder per run
makes "another run is here" a single decision the trainer shares with every rank.

The file records who holds it (pid, host, start time), for the refusal message only: liveness is
the kernel's lock, never the recorded pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".run.lock"


class RunFolderBusy(RuntimeError):
    """Another live run holds the folder."""


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunFolderBusy naming the holder. Never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusy(f"train.out_dir: {self.path.parent} is in use by another run ({holder}); "
                                "wait for it to end, stop it, or choose another train.out_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays for the next run
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"
