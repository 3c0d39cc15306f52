"""Shared pytest set-up: deterministic, quiet, single-threaded enough for a 2-core machine."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def pytest_sessionfinish(session, exitstatus):
    """End any worker process a test left running. DataLoader workers ignore SIGTERM
    (modsquad_ds/data/worker_signals.py), the signal multiprocessing ends its children with when the
    interpreter exits, so one left behind kept pytest waiting after its summary (seen twice on
    2026-11-30, cause not found)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
