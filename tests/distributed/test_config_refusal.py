"""Bad parallel settings are refused with the key named, before any process group starts."""

import json

import pytest

from _launch import BIN, base_env, python, run, run_ok, script
from modsquad_ds.distributed.env import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

PROBE = script("setup_probe.py")


def test_good_layout_on_two_ranks():
    result = run_ok([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
                     PROBE, "--set", "train.ep_size=2", "--set", "moe.mlp.num_experts=8",
                     "--set", "train.grad_accum=3", "--set", "data.batch_size=4"], timeout_s=90)
    dims = [json.loads(l) for l in result.output.splitlines() if l.startswith("{")]
    assert len(dims) == 2
    for d in dims:
        assert (d["world_size"], d["ep_size"], d["expert_dp_size"], d["local_experts"]) == (2, 2, 1, 4)
        assert d["global_batch"] == 4 * 3 * 2


@pytest.mark.parametrize("overrides, message", [
    (["train.ep_size=3", "moe.mlp.num_experts=6"], "train.ep_size: (3) must divide the world size (2 ranks)"),
    (["train.ep_size=2", "moe.mlp.num_experts=5"], "train.ep_size: (2) must divide moe.mlp.num_experts (5)"),
    (["train.zero_stage=3"], "train.zero_stage: 3 is refused: Native DeepSpeed MoE is not supported with ZeRO Stage 3"),
    (["train.grad_accum=0"], "train.grad_accum: must be >= 1"),
])
def test_refused_before_the_process_group(overrides, message):
    """Rank 0 of a 2-rank world whose rank 1 never starts: had it tried to rendezvous first it would
    wait for the peer until the timeout; it must exit at once with the key named instead."""
    env = base_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    args = [a for o in overrides for a in ("--set", o)]
    result = run([python(), PROBE, *args], timeout_s=60, env=env)
    assert result.returncode == 2, result.output[-3000:]
    errors = [l for l in result.output.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.output[-3000:]
    assert "Traceback" not in result.output
