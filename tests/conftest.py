"""Shared pytest set-up: deterministic, quiet, single-threaded enough for a 2-core machine."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
