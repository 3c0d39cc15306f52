"""What the benchmarks' command lines share: counts that must be positive, and a bad preset, task or
setting reported in one line (``error: key: message``) instead of a traceback."""

from __future__ import annotations

import argparse
import functools
import sys

from modsquad_ds.config import ConfigError


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, repeats, images or threads)."""
    value = int(text)  # not an integer: argparse reports "invalid positive value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def one_line_errors(main):
    """``main``, with a ConfigError ending the process with its one line (exit 2)."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    return run
