"""Session fixtures: one tiny mini-Taskonomy release and shards written by the real tools.

Sizes are kept tiny (24 px, 30 views) so the whole data suite runs in well under a minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data_tools import make_shards
from data_tools.mini_taskonomy import generate

RES = 24


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory) -> Path:
    """5 buildings x 3 points x 2 views; split CSV: 3 train, 1 val, 1 test buildings."""
    root = tmp_path_factory.mktemp("mini")
    generate(root, buildings=5, points=3, views=2, resolution=RES, seed=0, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def all_shards(mini_root, tmp_path_factory) -> Path:
    """Every building (30 samples) in shards of 7: sizes 7, 7, 7, 7, 2 (uneven on purpose)."""
    out = tmp_path_factory.mktemp("shards_all")
    assert make_shards.main(["--root", str(mini_root), "--out", str(out), "--split", "train",
                             "--samples-per-shard", "7", "--workers", "2", "--no-progress"]) == 0
    return out
