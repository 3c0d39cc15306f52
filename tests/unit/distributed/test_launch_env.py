"""Launch detection from environment mappings alone: one case per launcher, plus the traps."""

import pytest

from modsquad_ds.distributed.env import (LaunchEnv, LaunchError, detect, expand_nodelist, export, first_host,
                                  slurm_port)


def fixed_port():
    return 40123


def test_plain_process_is_a_world_of_one():
    launch = detect({}, port_picker=fixed_port)
    assert launch == LaunchEnv(0, 1, 0, "127.0.0.1", 40123, "single")
    assert not launch.is_distributed


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29400",
           "TORCHELASTIC_RUN_ID": "abc", "LOCAL_WORLD_SIZE": "2"}
    assert detect(env) == LaunchEnv(3, 8, 1, "n0", 29400, "torchrun")


def test_deepspeed_launcher():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}
    assert detect(env).launcher == "deepspeed"


def test_env_vars_win_over_slurm_and_mpi():
    """deepspeed --launcher slurm/mpich export RANK etc. into srun/mpirun tasks: those are the truth."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "PMI_RANK": "0", "PMI_SIZE": "1"}
    launch = detect(env)
    assert (launch.rank, launch.world_size, launch.launcher, launch.local_rank) == (1, 2, "env", 0)


def test_rank_without_rendezvous_is_an_error_naming_the_variable():
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT are not"):
        detect({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="but MASTER_PORT is not"):
        detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})


def test_world_of_one_with_rank_only_gets_loopback():
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}, port_picker=fixed_port) == \
        LaunchEnv(0, 1, 0, "127.0.0.1", 40123, "env")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 2 is outside 0..1"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "not a TCP port"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "65536"}, "MASTER_PORT 65536 is not a TCP port"),
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     "mpiexec: rank 4 is outside 0..3"),
])
def test_impossible_values(env, message):
    with pytest.raises(LaunchError, match=message):
        detect(env)


SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-10]"}


def test_srun_task():
    launch = detect(SRUN)
    assert launch == LaunchEnv(5, 8, 1, "gpu07", 12000 + 123456 % 20000, "slurm")


def test_srun_port_differs_between_jobs_and_avoids_ephemeral_range():
    ports = {slurm_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(12000 <= p < 32000 for p in ports)


def test_srun_step_nodelist_and_step_tasks_take_precedence():
    env = dict(SRUN, SLURM_STEP_NODELIST="gpu[09-10]", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="3")
    launch = detect(env)
    assert (launch.master_addr, launch.world_size) == ("gpu09", 4)


def test_srun_respects_explicit_master():
    launch = detect(dict(SRUN, MASTER_ADDR="login1", MASTER_PORT="23456"))
    assert (launch.master_addr, launch.master_port) == ("login1", 23456)


def test_batch_shell_without_srun_is_a_single_process():
    """sbatch's batch shell has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: waiting for N-1 peers
    that were never started would hang."""
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    env["SLURM_PROCID"] = "0"
    assert detect(env, port_picker=fixed_port).launcher == "single"


@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[8-10],b1", ["a8", "a9", "a10", "b1"]),
    ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[1-2]-ib,y", ["x1-ib", "x2-ib", "y"]),
])
def test_nodelist_parser(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_nodelist_parser_refuses_garbage():
    with pytest.raises(LaunchError, match="cannot parse"):
        expand_nodelist("node[a-b]")


def test_first_host_falls_back_when_scontrol_is_broken(tmp_path):
    assert first_host("n[3-4]", scontrol=str(tmp_path / "missing-scontrol")) == "n3"


def test_first_host_uses_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho from-scontrol\necho other\n")
    fake.chmod(0o755)
    assert first_host("weird{list}", scontrol=str(fake)) == "from-scontrol"


def test_openmpi_task():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "n1", "MASTER_PORT": "2222"}
    assert detect(env) == LaunchEnv(2, 4, 0, "n1", 2222, "mpi")


def test_mpich_task_needs_mpi_for_the_rendezvous():
    launch = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launcher) == (1, 2, 1, "mpi")
    assert launch.master_addr is None  # resolve() asks rank 0 over mpi4py
    with pytest.raises(LaunchError, match="resolve"):
        launch.as_env()


def test_export_writes_the_five_variables():
    environ = {}
    export(LaunchEnv(1, 2, 1, "h", 5555, "slurm"), environ)
    assert environ == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                       "MASTER_PORT": "5555"}


def test_older_slurm_step_variable_counts_as_a_step():
    """Slurm before 20.11 names the step SLURM_STEPID: still an srun task, not a single process."""
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    assert detect(dict(env, SLURM_STEPID="0")) == LaunchEnv(5, 8, 1, "gpu07", 12000 + 123456 % 20000, "slurm")


def test_pmix_task_and_launcher_names():
    """PMIx-only launchers (prrte, srun --mpi=pmix) give PMIX_*; LOCAL_SIZE alone (without
    deepspeed's CROSS_RANK) does not make a launch a deepspeed one."""
    launch = detect({"PMIX_RANK": "3", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                     "MASTER_PORT": "2222"})
    assert launch == LaunchEnv(3, 4, 1, "n1", 2222, "mpi")
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}
    assert detect(env, port_picker=fixed_port).launcher == "env"
