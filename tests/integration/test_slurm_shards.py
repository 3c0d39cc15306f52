"""slurm/make_shards.sbatch on a real single-node Slurm cluster: an array of 3 tasks plus the
dependent index job writes the same shards and index, byte for byte, as one process.

Run under the shared lock: flock /tmp/modsquad-slurm.lock python -m pytest tests/integration/test_slurm_shards.py
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from data_tools import make_shards
from data_tools.mini_taskonomy import generate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]


def _jobs(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout
    return out.split()


def _state(env, job_id: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return " ".join(re.findall(r"JobState=(\S+)", text))


def test_array_job_writes_the_same_shards_as_one_process(slurm_env, tmp_path):
    root = tmp_path / "mini"
    generate(root, buildings=2, points=3, views=2, resolution=24, seed=4, workers=2, progress=False)
    common = ["--root", str(root), "--split", "train", "--samples-per-shard", "2", "--resize", "16"]
    single, array = tmp_path / "single", tmp_path / "array"
    assert make_shards.main(common + ["--out", str(single), "--workers", "1", "--no-progress"]) == 0

    logs = tmp_path / "logs"
    logs.mkdir()
    array_id = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2", f"--output={logs}/task-%A_%a.out",
         str(REPO / "slurm" / "make_shards.sbatch"), *common, "--out", str(array)],
        env=slurm_env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    deadline = time.monotonic() + 300
    while _jobs(slurm_env):
        assert time.monotonic() < deadline, f"array job still queued: {_jobs(slurm_env)}"
        time.sleep(1)
    task_logs = sorted(logs.glob("task-*.out"))
    text = "".join(p.read_text() for p in task_logs)
    assert _state(slurm_env, array_id).split() == ["COMPLETED"] * 3, text[-3000:]
    index_log = REPO / f"slurm-shards-{array_id}_index.out"
    try:
        index_text = index_log.read_text()
    finally:
        index_log.unlink(missing_ok=True)
    assert "index job" in text and "index written" in index_text, index_text[-2000:]
    # 12 samples in shards of 2 -> 6 shards, a block of two per array task
    for k in range(3):
        assert f"task {k} of 3" in text and f"shards {2 * k}..{2 * k + 1}: 0 already done, 2 to write" in text

    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in array.iterdir())
    assert [n for n in names if n.endswith(".tar")] == [f"train-00000{k}.tar" for k in range(6)]
    for name in names:  # shards, sidecars, the index and the summary
        assert (single / name).read_bytes() == (array / name).read_bytes(), name
