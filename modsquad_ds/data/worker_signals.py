"""Loader workers outlive a stop request until their rank has saved, and never outlive the rank.

SIGTERM reaches loader workers with the rank whatever sends it: torchrun's agent kills each rank's
whole session (``os.killpg``, torch/distributed/elastic/multiprocessing/subprocess_handler), the
deepspeed launcher terminates each rank's process tree (deepspeed/launcher/launch.py,
``terminate_process_tree``), Slurm's ``scancel --signal=TERM`` signals every process of the step,
a terminal's Ctrl-C every process of the foreground group. A worker that dies of it makes the rank's
DataLoader raise ``DataLoader worker (pid ...) is killed by signal: Terminated`` before the rank
reaches its next step boundary, where it would have saved (``train/signals.py``).

So workers ignore SIGTERM and SIGINT, and end with their parent instead:
- ``PR_SET_PDEATHSIG`` = SIGKILL (Linux, through libc's ``prctl``): the kernel kills the worker when
  the thread that forked it ends. That is the rank's main thread (loaders are built there), so it
  means "when the rank ends", however it ends;
- the DataLoader's own watchdog (``torch.utils.data._utils.worker.ManagerWatchdog``) also ends a
  worker whose parent is gone, within ``MP_STATUS_CHECK_INTERVAL`` (5 s), on any platform.
A stop signal arriving while workers are being forked would kill a child that has not yet set its
handlers: :func:`stop_signals_blocked` holds SIGTERM/SIGINT blocked in the rank's main thread while
the workers start (a forked child inherits the mask and unblocks once it ignores them; the rank
receives the held signal right after).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def worker_init(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` (bind ``parent_pid`` with functools.partial, in the rank)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the rank died before prctl took effect: nobody to serve
        os._exit(0)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT in this thread while DataLoader workers are forked (see module doc)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
