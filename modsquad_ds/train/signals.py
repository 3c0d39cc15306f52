"""Checkpoints on demand: SIGUSR1 saves at the next step boundary and goes on; SIGTERM (what Slurm
sends at the time limit or on preemption) and Ctrl-C (SIGINT) save and end the run cleanly.

Handlers only set flags; the trainer turns them into a decision shared by all ranks (a signal may
reach only some of them) at the next optimizer-step boundary. A second Ctrl-C changes nothing: a
terminal signals every process of the job and launchers forward the signal again, so one keypress
often arrives twice; Ctrl-backslash (SIGQUIT) ends a run at once, without a checkpoint.
"""

from __future__ import annotations

import signal
import threading


class StopRequests:
    def __init__(self):
        self.save = False
        self.stop = False
        self._previous = {}

    def install(self) -> "StopRequests":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig, handler in ((signal.SIGUSR1, self._on_save), (signal.SIGTERM, self._on_stop),
                             (signal.SIGINT, self._on_stop)):
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started with Ctrl-C ignored (a background job): keep it ignored
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_save(self, signum, frame) -> None:
        self.save = True

    def _on_stop(self, signum=None, frame=None) -> None:
        self.save = self.stop = True

    request_stop = _on_stop
    """Save and stop, as SIGTERM asks (for a caller that is not a signal: distributed/launcher_watch.py)."""
