"""Training under a real single-node Slurm cluster (Debian's slurmctld/slurmd/munge, started by
slurm/local_cluster.sh): sbatch + srun, and a time-limit signal that checkpoints, requeues and resumes.
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slurm_mini")
    generate(root, buildings=4, points=3, views=3, resolution=32, seed=2, workers=2, progress=False)
    for split in ("train", "test"):
        assert make_shards.main(["--root", str(root), "--out", str(root / "shards"), "--split", split,
                                 "--split-csv", str(root / "splits" / "train_val_test_mini.csv"),
                                 "--no-progress"]) == 0
    return root / "shards"


def _submit(env, out_file: Path, shards: Path, run_dir: Path, steps: int) -> str:
    cmd = ["sbatch", "--parsable", "-n", "2", f"--output={out_file}", str(REPO / "slurm" / "train.sbatch"),
           "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}", "--set", "train.ep_size=2",
           "--set", f"train.steps={steps}", "--set", "train.warmup_steps=0", "--set", f"train.out_dir={run_dir}",
           "--set", "train.log_every=1", "--set", "data.batch_size=4"]  # loader workers on, as configs/demo.yaml
    return subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def _job(env, job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _wait(condition, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sbatch_srun_trains_with_expert_parallelism(slurm_env, shards, tmp_path):
    out_file, run_dir = tmp_path / "job.out", tmp_path / "run"
    job_id = _submit(slurm_env, out_file, shards, run_dir, steps=3)
    _wait(lambda: _job(slurm_env, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job")
    output = out_file.read_text()
    assert _job(slurm_env, job_id)["JobState"] == "COMPLETED", output[-3000:]
    assert "world=2 dp=2 ep=2" in output and "launcher=slurm" in output
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3

    # the jobs around training, on the run just trained: evaluation on 2 ranks, export on one task
    eval_out, export_out = tmp_path / "eval.out", tmp_path / "export.out"
    jobs = [_sbatch(slurm_env, ["-n", "2", f"--output={eval_out}"], "evaluate.sbatch",
                    [str(run_dir), "--split", "test", "--set", f"data.shards_dir={shards}"]),
            _sbatch(slurm_env, [f"--output={export_out}"], "export.sbatch",
                    ["--run", str(run_dir), "--threshold", "1.0"])]
    for job, out in zip(jobs, (eval_out, export_out)):
        _wait(lambda: _job(slurm_env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job")
        assert _job(slurm_env, job)["JobState"] == "COMPLETED", out.read_text()[-3000:]
    assert re.search(r"test: \d+ images on 2 rank", eval_out.read_text()), eval_out.read_text()[-3000:]
    assert (run_dir / "eval" / "test_step_00000003.json").is_file()
    exported = run_dir / "export" / "step_00000003"
    assert (exported / "depth_zbuffer.safetensors").is_file() and (exported / "report.md").is_file()


def _sbatch(env, options: list[str], script: str, args: list[str]) -> str:
    cmd = ["sbatch", "--parsable", *options, str(REPO / "slurm" / script), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_env, shards, tmp_path):
    out_file, run_dir = tmp_path / "job.out", tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    job_id = _submit(slurm_env, out_file, shards, run_dir, steps=100000)
    try:
        _wait(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, "training to start")
        # what Slurm does ahead of a time limit with --signal=B:USR1@T, or on preemption
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_env, check=True)
        _wait(lambda: "resumed from" in out_file.read_text(), "the requeued job to resume", timeout_s=240)
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env)
    output = out_file.read_text()
    # the batch shell's `scancel --signal=TERM` reaches the loader workers too: they must outlive it
    assert "killed by signal" not in output and "Traceback" not in output, output[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM or Ctrl-C, exit code 3 \(run the same command to resume\): step (\d+)",
                            output).group(1))
    resumed = int(re.search(r"resumed from \S+step_(\d+)", output).group(1))
    assert resumed == stopped
    assert "checkpoint saved; requeueing job" in output and f"job {job_id} restart 1" in output
