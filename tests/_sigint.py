"""Start a command with Ctrl-C (SIGINT) at a chosen disposition. Shared by tests/data/test_stopping.py
and tests/integration/fault_injection.py.

A shell without job control (``make test &`` in a script, CI steps) starts its background jobs with
SIGINT ignored, and an ignored signal stays ignored through fork and exec: Python then installs no
KeyboardInterrupt handler. A test that sends Ctrl-C must therefore set the disposition itself: at its
default, as a terminal's foreground job has it, or ignored, as such a background job has it.
"""

import sys


def with_sigint(cmd: list[str], ignored: bool = False) -> list[str]:
    """``cmd`` behind a tiny interpreter that sets SIGINT's disposition, then execs ``cmd``."""
    disposition = "SIG_IGN" if ignored else "SIG_DFL"
    return [sys.executable, "-c", f"import os, signal, sys; signal.signal(signal.SIGINT, signal.{disposition}); "
            "os.execvp(sys.argv[1], sys.argv[1:])", *cmd]
