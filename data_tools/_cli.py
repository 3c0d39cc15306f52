"""Lets each tool run both as ``python -m data_tools.<name>`` and ``python data_tools/<name>.py``."""

import sys
from pathlib import Path


def ensure_repo_on_path() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
