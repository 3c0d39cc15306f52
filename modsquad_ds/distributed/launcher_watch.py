"""A rank whose launcher is gone stops as if it had been sent SIGTERM: it saves and exits 3.

``kill PID`` of the ``deepspeed`` command ends that process alone: DeepSpeed's per-node launcher
and the ranks under it go on training, orphaned, holding the run folder's lock, and the next launch
is refused as "in use by another run". A torchrun or per-node launcher killed outright (SIGKILL,
the OOM killer) leaves its ranks the same way. So every rank notes the launcher processes above it
when training starts (the deepspeed command and DeepSpeed's per-node launcher; torchrun) and a
daemon thread checks once a second that each still runs (same pid, same start time, so a reused
pid does not count). When one is gone, the thread asks for the trainer's usual stop, as SIGTERM
would: agreed by all ranks at the next step, checkpoint first (modsquad_ds/train/signals.py). It
calls back rather than signalling this process, so that it can never land after the trainer has
put the default SIGTERM action back.

Only launchers are watched, never a shell: a run started with ``nohup`` must outlive its terminal.
Linux only (``/proc``); elsewhere nothing is watched.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Optional

LAUNCHER_MARKERS = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "/bin/deepspeed", "torchrun",
                    "torch.distributed.run", "torch.distributed.launch")
"""Words in a process's command line that make it a launcher this rank runs under."""


def _stat(pid: int) -> Optional[tuple[int, int]]:
    """(parent pid, start time in clock ticks) of ``pid``; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3
    return int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launchers_above(pid: Optional[int] = None) -> list[tuple[int, int]]:
    """``(pid, start time)`` of every launcher among the ancestors of ``pid`` (default: this process)."""
    found = []
    stat = _stat(os.getpid() if pid is None else pid)
    while stat is not None and stat[0] > 1:
        parent = stat[0]
        stat = _stat(parent)
        if stat is not None and any(marker in _cmdline(parent) for marker in LAUNCHER_MARKERS):
            found.append((parent, stat[1]))
    return found


def is_running(pid: int, started: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == started


class LauncherWatch:
    """While started, calls ``on_gone`` (once) when any launcher above this process has ended."""

    def __init__(self, on_gone: Callable[[], None], interval_s: float = 1.0,
                 launchers: Optional[list[tuple[int, int]]] = None):
        self.on_gone = on_gone
        self.launchers = launchers_above() if launchers is None else launchers
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modsquad-launcher-watch", daemon=True)

    def start(self) -> "LauncherWatch":
        if self.launchers:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            gone = [pid for pid, started in self.launchers if not is_running(pid, started)]
            if gone:
                print(f"[modsquad_ds.distributed] launcher process {gone[0]} ended: stopping as on SIGTERM "
                      "(checkpoint at the next step)", flush=True)
                self.on_gone()
                return
