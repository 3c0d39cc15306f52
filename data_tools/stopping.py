"""Ctrl-C and SIGTERM while a tool writes: raised at once, and remembered.

    with StopSignals() as stop:
        for item in work:
            stop.check()        # raises KeyboardInterrupt or Stopped if a signal came and was lost
            ...

SIGTERM (Slurm's scancel and time limit, ``kill``) raises :class:`Stopped`, Ctrl-C
``KeyboardInterrupt``, as Python's own handler does. Raising is not enough on its own: Python runs a
signal's handler wherever the main thread happens to be, and that may be a callback whose exceptions
are printed and dropped ("Exception ignored in": an at-fork hook while a worker process starts, a
finalizer). One such SIGTERM let a run of make_shards go on to the end. So the signal is also
remembered, and :meth:`StopSignals.check` raises it again at the caller's next safe point; and
while this process forks (between the at-fork hooks registered below, which bracket the others) the
handler only remembers.

Ctrl-C keeps an inherited "ignore" (a background job of a shell without job control): the tool
then ignores it, as it would without this class.
"""

from __future__ import annotations

import os
import signal

_forking = 0


def _fork_begins() -> None:
    global _forking
    _forking += 1


def _fork_ended() -> None:
    global _forking
    _forking -= 1


# "before" hooks run last-registered first and "after" hooks first-registered first: these run
# before and after those registered earlier (logging's, whose exceptions were dropped).
os.register_at_fork(before=_fork_begins, after_in_parent=_fork_ended, after_in_child=_fork_ended)


class Stopped(Exception):
    """SIGTERM: stop as Ctrl-C does, cleaning up."""


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        if not _forking:
            self.check()

    def check(self) -> None:
        if self.received == signal.SIGTERM:
            raise Stopped
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
