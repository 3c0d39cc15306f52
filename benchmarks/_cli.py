"""What the benchmarks' command lines share: counts that must be positive, a bad preset, task or
setting reported in one line (``error: key: message``) instead of a traceback, and a run config
given as the training command takes it (``--config`` and ``--set``) whose shards must exist."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from modsquad_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


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


def add_run_config_args(parser: argparse.ArgumentParser, set_help: str) -> None:
    """``--config`` (default configs/demo.yaml) and repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", default="configs/demo.yaml", help="the run config (default configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def load_run_config(args: argparse.Namespace, prog: str):
    """The config of ``--config`` and ``--set``; ends the process with one line where its shards are missing."""
    cfg = load_config([ROOT / args.config], args.overrides)
    if cfg.data.source == "shards" and not (ROOT / cfg.data.shards_dir / f"{cfg.data.train_split}.index.json").is_file():
        sys.exit(f"{prog}: no shards at {cfg.data.shards_dir} (make demo writes the demo's; "
                 "or --set data.shards_dir=DIR)")
    return cfg
