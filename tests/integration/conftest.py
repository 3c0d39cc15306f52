"""A real single-node Slurm cluster (Debian's slurmctld/slurmd/munge, started by
slurm/local_cluster.sh) for the tests that submit jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLUSTER = Path(__file__).resolve().parents[2] / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    """Environment whose SLURM_CONF points at a cluster of this module's own; stopped afterwards."""
    subprocess.run(["bash", str(CLUSTER), "install"], check=True, timeout=300)
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(CLUSTER), "start", str(state)], check=True, timeout=60)
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), MODSQUAD_PYTHON=sys.executable,
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # jobs must take their ranks from Slurm, not from the test's environment
    yield env
    subprocess.run(["scancel", "--user", "root"], env=env, timeout=30)
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], check=True, timeout=60)
