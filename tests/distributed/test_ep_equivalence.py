"""Expert parallelism on DeepSpeed's MoE machinery equals one process (2 gloo ranks, ep_size 2).

One 2-rank run (tests/distributed/scripts/ep_worker.py) builds, on every rank, the single-process reference
on the whole global batch and a real DeepSpeed engine (AdamW client optimizer with DeepSpeed's MoE
parameter groups) on that rank's half of the images, at ZeRO 0, 1 and 2, with router noise off and
on (one global, seeded noise stream sliced per rank). It reports differences; this file asserts them.
"""

import pytest

from _ep_harness import run_workers

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

CASES = ["zero0_noise0", "zero0_noise1", "zero1_noise1", "zero2_noise1"]
RTOL_OUT = 1e-5    # outputs, routing tables: float32 rounding of a different summation order
RTOL_GRAD = 1e-4   # gradients, relative to the tensor's largest entry (seen: <= 1.6e-5)
TOL_STEP = 2e-3    # params after one AdamW step, in units of lr (seen: <= 3e-4)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_workers("ep_worker.py", tmp_path_factory.mktemp("ep_equivalence"), world_size=2,
                       args=("equivalence",), timeout_s=240)


def _worst(table: dict) -> tuple[str, float]:
    name = max(table, key=table.get)
    return name, table[name]


@pytest.mark.parametrize("case", CASES)
def test_outputs_and_routing_match_single_process(records, case):
    for rank, rec in enumerate(records):
        r = rec[case]
        assert set(r["outputs"]) == {"class_scene", "edge_texture", "keypoints2d"}
        name, worst = _worst(r["outputs"])
        assert worst < RTOL_OUT, f"rank {rank}: {name} output differs by {worst:.2e}"
        for layer, (probs, counts) in r["routing"].items():
            assert probs < RTOL_OUT and counts == 0.0, f"rank {rank}: routing of {layer}: {probs:.2e}, {counts}"
        for name, d in r["losses"].items():  # mean of the ranks' task losses; MI of the global table
            assert d < (1e-5 if name.startswith("loss/") else 5e-3), f"rank {rank}: {name} differs by {d:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_gradients_after_deepspeed_reduction_match_single_process(records, case):
    for rank, rec in enumerate(records):
        grads = rec[case]["grads"]
        # every reference parameter is covered: dense, routers (also per task slice) and this rank's
        # four global experts per MoE layer
        assert rec[case]["experts_here"] == ([0, 1, 2, 3] if rank == 0 else [4, 5, 6, 7])
        assert any(k.endswith("mlp.router.task_wg[task 2]") for k in grads)
        assert any("heads." in k for k in grads) and any("weighting.log_vars" in k for k in grads)
        bad = {k: v for k, v in grads.items() if not v < RTOL_GRAD}
        assert not bad, f"rank {rank}, {case}: gradients differ: {sorted(bad.items(), key=lambda kv: -kv[1])[:8]}"


@pytest.mark.parametrize("case", CASES)
def test_task_router_gradients_per_task_slice(records, case):
    for rank, rec in enumerate(records):
        slices = {k: v for k, v in rec[case]["grads"].items() if "[task " in k}
        assert len(slices) == 4 * 3  # 4 MoE layers (2 MoA, 2 MoE MLP) x 3 tasks
        bad = {k: v for k, v in slices.items() if not v < RTOL_GRAD}
        assert not bad, f"rank {rank}, {case}: task-router gradients differ: {bad}"


@pytest.mark.parametrize("case", CASES)
def test_one_adamw_step_matches_single_process(records, case):
    for rank, rec in enumerate(records):
        name, worst = _worst(rec[case]["params"])
        assert worst < TOL_STEP, f"rank {rank}, {case}: {name} differs by {worst:.2e} lr after one step"


@pytest.mark.parametrize("case", CASES)
def test_global_grad_norm_for_clipping(records, case):
    """ZeRO 1/2: DeepSpeed's norm is the 1-process norm. ZeRO 0: DeepSpeed 0.19.8's clip_grad_norm_
    averages per-rank norms that each miss the other rank's experts; ds_adapter.clip_grad_norm_ is
    right."""
    for rank, rec in enumerate(records):
        g = rec[case]["grad_norm"]
        ours = g["ours"] if case.startswith("zero0") else g["deepspeed"]
        assert abs(ours - g["ref"]) <= 1e-6 * g["ref"], f"rank {rank}, {case}: {g}"
        if "deepspeed_zero0" in g:  # documents the upstream discrepancy (not a requirement)
            assert abs(g["deepspeed_zero0"] - g["ref"]) > 1e-6 * g["ref"], (
                f"DeepSpeed's ZeRO-0 clip norm now matches ({g}): drop the workaround note")
