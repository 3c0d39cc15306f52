"""ep_size smaller than the world size: 4 gloo ranks, ep_size 2, so every expert lives on two ranks
(expert-parallel groups {0,1} and {2,3}, expert-data-parallel groups {0,2} and {1,3}) and DeepSpeed
must average each expert's gradient over its replicas. Still equal to one process on the whole batch.
"""

import pytest

from _ep_harness import run_workers

pytestmark = [pytest.mark.dist, pytest.mark.timeout(400)]

CASES = ["zero1_noise1", "zero2_noise1"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_workers("ep_worker.py", tmp_path_factory.mktemp("ep_dp"), world_size=4,
                       args=("equivalence", "2", ",".join(CASES)), timeout_s=360)


@pytest.mark.parametrize("case", CASES)
def test_four_ranks_ep2_match_single_process(records, case):
    assert [rec[case]["experts_here"] for rec in records] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    for rank, rec in enumerate(records):
        r = rec[case]
        worst_out = max(r["outputs"].values())
        assert worst_out < 1e-5, f"rank {rank}: outputs differ by {worst_out:.2e}"
        bad = {k: v for k, v in r["grads"].items() if not v < 1e-4}
        assert not bad, f"rank {rank}, {case}: gradients differ: {sorted(bad.items(), key=lambda kv: -kv[1])[:6]}"
        worst_step = max(r["params"].values())
        assert worst_step < 2e-3, f"rank {rank}, {case}: params differ by {worst_step:.2e} lr after a step"
