"""The same probe under every launcher: process group up, one all-reduce right, DeepSpeed sees it too."""

import os
import subprocess

import pytest

from _launch import BIN, REPO, base_env, python, records, run_ok, script
from modsquad_ds.distributed.env import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]

PROBE = script("allreduce_probe.py")


def check_two_ranks(recs: list[dict], launcher: str) -> None:
    assert [r["rank"] for r in recs] == [0, 1]
    for r in recs:
        assert r["world_size"] == 2 and r["ds_world_size"] == 2 and r["ds_rank"] == r["rank"]
        assert r["sum"] == 3.0  # 1 + 2
        assert r["launcher"] == launcher
        assert r["backend"] == "gloo"
        assert r["shm_op_skipped"] is True
        assert r["any_last_rank"] is True and r["max_rank"] == 1.0 and r["ranks_on_host"] == 2
        assert r["vote_if_last_nan"] == [False, 1.0] and r["vote_clean"] == [True, 2.0]
        assert r["tensor_sum"] == [3.0, 20.0]
        # The five variables DeepSpeed reads are all exported, so it never ran its own MPI discovery.
        assert r["env"]["RANK"] == str(r["rank"]) and r["env"]["MASTER_PORT"] == str(r["master_port"])
    assert sorted(r["local_rank"] for r in recs) == [0, 1]
    assert len({(r["master_addr"], r["master_port"]) for r in recs}) == 1


def test_torchrun(tmp_path):
    run_ok([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            PROBE, str(tmp_path)], timeout_s=120)
    check_two_ranks(records(tmp_path, 2), "torchrun")


def test_deepspeed_launcher(tmp_path):
    # On CPU the launcher counts NUMA nodes as accelerators; --num_gpus (alias --num_accelerators)
    # sets the ranks per node. It appends --local_rank=N to the script's arguments.
    run_ok([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            PROBE, str(tmp_path)], timeout_s=120)
    recs = records(tmp_path, 2)
    check_two_ranks(recs, "deepspeed")
    assert [r["argv_local_rank"] for r in recs] == [r["local_rank"] for r in recs]


def test_mpiexec_discovers_rendezvous_over_mpi4py(tmp_path):
    # MPICH's hydra exports only PMI_RANK/PMI_SIZE/MPI_LOCALRANKID: address and port come from rank 0.
    run_ok([str(BIN / "mpiexec"), "-n", "2", python(), PROBE, str(tmp_path)], timeout_s=120)
    recs = records(tmp_path, 2)
    check_two_ranks(recs, "mpi")
    assert recs[0]["master_port"] != 29500  # DeepSpeed's own discovery would always pick 29500


def test_srun_style_environment(tmp_path):
    """What srun exports (no Slurm installed here): SLURM_* only, the port derived from the job id."""
    procs = []
    job_id = 4242 + os.getpid() % 1000
    for rank in range(2):
        env = base_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                       SLURM_STEP_ID="0", SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost")
        procs.append(subprocess.Popen([python(), PROBE, str(tmp_path)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    recs = records(tmp_path, 2)
    check_two_ranks(recs, "slurm")
    assert recs[0]["master_addr"] == "localhost"
    assert recs[0]["master_port"] == 12000 + job_id % 20000


def test_plain_single_process(tmp_path):
    ext = tmp_path / "torch_extensions"
    run_ok([python(), PROBE, str(tmp_path)], timeout_s=60, env=base_env(TORCH_EXTENSIONS_DIR=str(ext)))
    (rec,) = records(tmp_path, 1)
    assert (rec["rank"], rec["world_size"], rec["launcher"], rec["sum"]) == (0, 1, "single", 1.0)
    assert rec["master_addr"] == "127.0.0.1"
    # The shared-memory op was not compiled: nothing was built into the extensions folder.
    assert rec["shm_op_skipped"] is True and not (ext.exists() and any(ext.iterdir()))
