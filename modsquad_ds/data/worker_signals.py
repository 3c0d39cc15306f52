"""Loader workers outlive a stop request until their rank has saved, and never outlive the rank.

(The data tools' worker processes, data_tools/worker_pool.py, are started the same way: only
their parent reacts to Ctrl-C and SIGTERM, and they never outlive it.)

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
handlers: :func:`starting_workers` holds SIGTERM/SIGINT blocked in the rank's main thread while
the workers start (a forked child inherits the mask and unblocks once it ignores them; the rank
receives the held signal right after).

Ignoring SIGTERM has one more consequence, at interpreter exit. multiprocessing's exit hook ends
the daemon children still running with SIGTERM and then joins them; the DataLoader shuts its
workers down on its own only when its iterator is released. An iterator still alive at exit (a
program that leaves mid-epoch, a traceback that holds the iterator's frame) would leave workers that
ignore the SIGTERM, and a join that never returns: the program hangs after its last line. So
:func:`starting_workers` remembers the workers it saw start, and an exit hook that runs before
multiprocessing's kills those still alive.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours: see _end_workers
import os
import signal
import sys
import weakref
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

FORK = multiprocessing.get_context("fork")
"""How every worker of ours starts, whatever the default: forked from the rank, so that it inherits
the signal mask (starting_workers) and its parent is the rank (worker_init's check, the parent-death
signal). Python 3.14 makes forkserver the default on Linux: a forkserver child's parent is the
server, so every loader worker exited at once ("DataLoader worker (pid(s) ...) exited unexpectedly")."""


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


# The workers started by this process (a weak set: multiprocessing holds a started child until it
# is joined, so a worker that was shut down and joined leaves the set by itself).
_workers: "weakref.WeakSet[multiprocessing.process.BaseProcess]" = weakref.WeakSet()
os.register_at_fork(after_in_child=_workers.clear)  # a forked child's children are its own


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """Fork workers inside this (a DataLoader's, the data tools'): SIGTERM/SIGINT are held in
    this thread while they start, and the new children are remembered for the exit hook (see module
    doc)."""
    before = set(multiprocessing.active_children())
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        _workers.update(p for p in multiprocessing.active_children() if p not in before)


def kill_workers(batches) -> None:
    """Kill the workers of a DataLoader iterator whose epoch ends in an error (a corrupt-sample limit,
    a worker's exception). torch's shutdown asks them to stop and, when they do not answer within
    5 s each, ends them with the SIGTERM they ignore: the rank waited ~20 s and they lived on.

    The iterator's SIGCHLD watch goes first, as in torch's own shutdown: it would otherwise report
    the kill as a worker crash instead of the error that ended the epoch. These are torch internals
    (``_workers``, ``_worker_pids_set``); where a version lacks them, nothing is killed.
    """
    from torch.utils.data._utils import signal_handling

    workers = [w for w in getattr(batches, "_workers", ()) if w.is_alive()]
    if not workers or not hasattr(signal_handling, "_remove_worker_pids"):
        return
    if getattr(batches, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for w in workers:
        w.kill()
    for w in workers:
        w.join(timeout=5)


def _end_workers() -> None:
    """At interpreter exit, kill the workers still alive: they ignore the SIGTERM that
    multiprocessing's own exit hook would end them with before joining them. atexit runs hooks
    last-in first-out, and multiprocessing.util registered its hook when it was imported above.

    A DataLoader iterator still alive still watches its workers (torch's SIGCHLD handler): each kill
    would be reported as a crash, a traceback ending "DataLoader worker (pid ...) is killed by signal:
    Killed" printed after the program's last line. At exit nothing is left to report to, so the
    handler goes first, as in kill_workers (the default action for SIGCHLD still lets join reap)."""
    workers = [p for p in _workers if p.is_alive()]
    if not workers:
        return
    with contextlib.suppress(ValueError):  # only the main thread may set handlers; atexit runs there
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=5)


atexit.register(_end_workers)
