"""launcher_watch with real processes: a rank under a launcher that is killed outright (as ``kill
PID`` ends the deepspeed command alone) is asked to stop; a rank without a launcher watches nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from modsquad_ds.distributed.launcher_watch import is_running, launchers_above

REPO = Path(__file__).resolve().parents[3]

RANK = textwrap.dedent("""
    import threading
    from modsquad_ds.distributed.launcher_watch import LauncherWatch, launchers_above
    gone = threading.Event()
    print("launchers above:", len(launchers_above()), flush=True)
    LauncherWatch(on_gone=gone.set, interval_s=0.1).start()
    print("asked to stop" if gone.wait(30) else "still running", flush=True)
""")


def test_a_rank_is_asked_to_stop_when_its_launcher_is_killed(tmp_path):
    launcher = tmp_path / "torchrun"  # a process whose command line names a launcher
    launcher.write_text(f"#!{sys.executable}\nimport subprocess, sys, time\n"
                        "subprocess.Popen([sys.executable, '-c', sys.argv[1]])\ntime.sleep(60)\n")
    launcher.chmod(0o755)
    proc = subprocess.Popen([str(launcher), RANK], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert proc.stdout.readline().strip() == "launchers above: 1"
        time.sleep(0.3)  # a few checks while the launcher runs
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)  # no chance to pass anything on to its child
        proc.wait()
        # the orphaned rank, through the same pipe
        assert proc.stdout.readline().startswith(f"[modsquad_ds.distributed] launcher process {proc.pid} ended")
        assert proc.stdout.readline().strip() == "asked to stop"
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()


def test_without_a_launcher_nothing_is_watched_and_a_reused_pid_does_not_count():
    assert launchers_above() == []  # pytest's parents: a shell, make, CI; never watched
    started = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert is_running(os.getpid(), started) and not is_running(os.getpid(), started + 1)


def test_a_gone_launcher_is_reported_once():
    """The watch asks for the stop once and ends its thread: the trainer's stop request is not
    repeated every interval (nor the message printed again) while the checkpoint is written."""
    from modsquad_ds.distributed.launcher_watch import LauncherWatch, _stat

    child = subprocess.Popen(["sleep", "30"])
    started = _stat(child.pid)[1]
    child.kill()
    child.wait()  # reaped: its pid is gone
    calls = []
    watch = LauncherWatch(on_gone=lambda: calls.append(time.monotonic()), interval_s=0.02,
                          launchers=[(child.pid, started)]).start()
    time.sleep(0.4)
    assert len(calls) == 1 and not watch._thread.is_alive()
    watch.stop()
