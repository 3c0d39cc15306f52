"""Run real launchers (torchrun, mpiexec, deepspeed, srun-style env, plain python) under a hard deadline.

Every command starts in its own session; on the deadline the whole session (launcher and ranks) is
killed and the test fails with the output, so a hang can never block the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modsquad_ds.distributed.env import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
BIN = Path(sys.executable).parent  # the venv's bin: torchrun, deepspeed, mpiexec live here


def mini_shards(root: Path, *, points: int, views: int, seed: int, samples_per_shard: int,
                splits: tuple[str, ...] = ("train",)) -> Path:
    """A mini-Taskonomy of 4 buildings at 32 px under ``root``, written as shards of ``splits``."""
    from data_tools import make_shards
    from data_tools.mini_taskonomy import generate

    generate(root, buildings=4, points=points, views=views, resolution=32, seed=seed, workers=2, progress=False)
    out = root / "shards"
    for split in splits:
        assert make_shards.main(["--root", str(root), "--out", str(out), "--split", split,
                                 "--split-csv", str(root / "splits" / "train_val_test_mini.csv"),
                                 "--samples-per-shard", str(samples_per_shard), "--no-progress"]) == 0
    return out


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # A launcher's variables leaking in from the test runner would be read as this launch's.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE",
                "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(key, None)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float


def run(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Result:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started: launcher and its ranks
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout_s:.0f} s\n{out[-4000:]}") from None
    return Result(proc.returncode, out, time.monotonic() - t0)


def run_ok(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Result:
    result = run(cmd, timeout_s, env)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}\n{result.output[-4000:]}"
    return result


def records(out: Path, world_size: int) -> list:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def python() -> str:
    return sys.executable


def script(name: str) -> str:
    return str(SCRIPTS / name)


class Ranks:
    """N plain processes with RANK/WORLD_SIZE/MASTER_* set by hand (no launcher to clean up after a
    failure: exactly the case the watchdog must handle)."""

    def __init__(self, script_name: str, args: list[str], world_size: int = 2):
        port = free_port("127.0.0.1")
        self.procs = []
        for rank in range(world_size):
            env = base_env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            self.procs.append(subprocess.Popen([python(), script(script_name), *args], cwd=REPO, env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, start_new_session=True))

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()


def wait_for_files(paths: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise AssertionError(f"not all of {[str(p) for p in paths]} appeared within {timeout_s:.0f} s")
        time.sleep(0.1)
