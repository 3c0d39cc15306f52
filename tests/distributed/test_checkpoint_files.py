"""checkpoint.save and load_latest around the real DeepSpeed engine, one process: which folders a
run keeps, what a complete one holds, and what resume brings back."""

import pytest

from _ep_harness import run_workers

pytestmark = pytest.mark.dist


def test_save_keeps_the_newest_checkpoints_and_resume_returns_the_position(tmp_path):
    """keep_checkpoints=2 over saves at steps 1..4 leaves steps 3 and 4, each complete (manifest
    verifies, no DeepSpeed converter script, layout recorded), ``latest`` naming 4, nothing partial;
    a re-save of step 4 replaces it; load_latest brings back the saved position, extra state and RNG."""
    rec = run_workers("checkpoint_probe.py", tmp_path, world_size=1, timeout_s=150)[0]
    assert [a["returned"] for a in rec["after"]] == [f"step_0000000{s}" for s in (1, 2, 3, 4)]
    assert rec["after"][0]["names"] == ["latest", "step_00000001"]  # the crashed save's leftovers removed
    assert rec["after"][-1]["names"] == ["latest", "step_00000003", "step_00000004"]
    assert rec["latest"] == "step_00000004"
    assert rec["verify"] == [None, None] and rec["converter_scripts"] == []
    assert rec["layout"] == {"world_size": 1, "data.batch_size": 2, "step": 4, "epoch": 1, "batch_in_epoch": 1}
    assert rec["after_resave"] == ["step_00000003", "step_00000004"]
    assert rec["position"] == {"step": 4, "epoch": 1, "batch_in_epoch": 1}
    assert rec["extra"]["usage"] == {"n": 40}  # beside DeepSpeed's own client-state keys
    assert rec["rand_after_load"] == rec["expected_rand"]
