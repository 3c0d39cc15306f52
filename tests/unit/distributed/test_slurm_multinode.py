"""Multi-node launches under Slurm, from Slurm's own variables: every rank of 2 nodes x 8 GPUs agrees
on one rendezvous (first host of the node list, a port from the job id), and odd node lists expand
as ``scontrol show hostnames`` expands them (checked against scontrol itself where it is installed).
"""

import os
import shutil
import subprocess

import pytest

from modsquad_ds.distributed.bootstrap import cuda_device_index
from modsquad_ds.distributed.env import LaunchError, detect, expand_nodelist, slurm_port


def srun_task(procid: int, nodes: int, per_node: int, nodelist: str, job_id: int) -> dict:
    """The variables srun gives task ``procid`` of ``--nodes N --ntasks-per-node G`` (block distribution)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % per_node), "SLURM_NODEID": str(procid // per_node),
            "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
            "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
            "SLURM_TASKS_PER_NODE": f"{per_node}(x{nodes})", "SLURM_GPUS_ON_NODE": str(per_node)}


def test_two_nodes_of_eight_gpus_agree_on_one_rendezvous():
    launches = [detect(srun_task(i, 2, 8, "gpu-[12,14]", 4242)) for i in range(16)]
    assert [x.rank for x in launches] == list(range(16))
    assert [x.local_rank for x in launches] == list(range(8)) * 2
    assert {x.world_size for x in launches} == {16}
    assert {(x.master_addr, x.master_port) for x in launches} == {("gpu-12", slurm_port(4242))}
    assert {x.launcher for x in launches} == {"slurm"}


def test_each_rank_finds_its_gpu_however_slurm_binds_them():
    launches = [detect(srun_task(i, 2, 8, "gpu-[12,14]", 4242)) for i in range(16)]
    # --gpus-per-node 8: every task sees its node's 8 GPUs
    assert [cuda_device_index(x.local_rank, 8) for x in launches] == list(range(8)) * 2
    # --gpus-per-task 1 / --gpu-bind=single:1: every task sees only its own GPU
    assert {cuda_device_index(x.local_rank, 1) for x in launches} == {0}
    with pytest.raises(LaunchError, match="local rank 5 sees 4 GPU"):
        cuda_device_index(5, 4)  # 8 tasks on a node with 4 visible GPUs


def test_concurrent_jobs_on_the_same_nodes_get_different_ports():
    a = detect(srun_task(0, 2, 8, "gpu-[12,14]", 4242))
    b = detect(srun_task(0, 2, 8, "gpu-[12,14]", 4243))
    assert a.master_addr == b.master_addr and a.master_port != b.master_port


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a-[1,3-4]", ["a-1", "a-3", "a-4"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("rack[1-2]-node[01-02],login", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02", "login"]),
    ("node[9-11]", ["node9", "node10", "node11"]),
    ("n[01-2]", ["n01", "n02"]),
    ("gpu[008-010]", ["gpu008", "gpu009", "gpu010"]),
    ("a,b,a", ["a", "b", "a"]),
    ("c1,gpu-[3-4],c2", ["c1", "gpu-3", "gpu-4", "c2"]),
])
def test_odd_nodelists(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert detect(srun_task(len(hosts) - 1, len(hosts), 1, nodelist, 7)).master_addr == hosts[0]


@pytest.mark.parametrize("nodelist", ["n[7-3]", "n[1-3", "n1-3]", "node[a]", "n[1-10:2]", "", "a,,b"])
def test_bad_nodelists_name_the_problem(nodelist):
    with pytest.raises(LaunchError, match="nodelist"):
        expand_nodelist(nodelist)


SCONTROL_LISTS = ["node[01-03,07]", "a-[1,3-4]", "r[1-2]n[1-2]", "node[9-11]", "n[01-2]", "gpu[008-010]",
                  "a,b,a", "c1,gpu-[3-4],c2", "x[1-3],y[10-12],z"]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
@pytest.mark.parametrize("nodelist", SCONTROL_LISTS)
def test_parser_agrees_with_scontrol(tmp_path, nodelist):
    # `scontrol show hostnames` needs a configuration to start but no controller: a minimal one
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\nNodeName=localhost\n"
                    "PartitionName=p Nodes=localhost\n")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=dict(os.environ, SLURM_CONF=str(conf)),
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert expand_nodelist(nodelist) == out
