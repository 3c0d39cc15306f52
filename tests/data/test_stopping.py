"""data_tools/stopping.py with real signals: raised at once, raised again at the next check when a
callback dropped it, held while the process forks, and an inherited "ignore" of Ctrl-C kept."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _sigint import with_sigint

from data_tools.stopping import Stopped, StopSignals

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_raises_stopped_and_check_raises_it_again():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        stop.check()  # nothing received: no-op
        with pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode
        with pytest.raises(Stopped):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) is before


def _run(script: str, ignore_ctrl_c: bool = False) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter started with SIGINT ignored or at its default."""
    return subprocess.run(with_sigint([sys.executable, "-c", textwrap.dedent(script)], ignored=ignore_ctrl_c),
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_a_signal_during_a_fork_is_held_not_dropped():
    """A SIGTERM whose handler would run inside another module's at-fork hook (as logging's, where
    an exception is printed and dropped) is held, and raised by the next check."""
    done = _run("""
        import os, signal
        os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM))  # before ours
        from data_tools.stopping import Stopped, StopSignals
        with StopSignals() as stop:
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            for _ in range(1000):
                pass  # handlers ran by now
            print("received", stop.received, flush=True)
            try:
                stop.check()
            except Stopped:
                print("stopped at the check")
    """)
    assert done.returncode == 0, done.stderr
    assert f"received {int(signal.SIGTERM)}" in done.stdout and "stopped at the check" in done.stdout
    assert "Exception ignored" not in done.stderr


def test_an_inherited_ignore_of_ctrl_c_is_kept():
    script = """
        import os, signal
        from data_tools.stopping import StopSignals
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            stop.check()
        print("still running")
    """
    assert "still running" in _run(script, ignore_ctrl_c=True).stdout
    interrupted = _run(script)
    assert "still running" not in interrupted.stdout and "KeyboardInterrupt" in interrupted.stderr
