"""The global MI on 2 ranks equals the 1-process MI on the concatenated batch: value and gradient,
through a real DeepSpeed engine (which averages gradients over ranks)."""

import pytest

from _launch import BIN, records, run_ok, script
from modsquad_ds.distributed.env import free_port

pytestmark = [pytest.mark.dist, pytest.mark.timeout(150)]


def test_global_mi_matches_single_process_on_concatenated_batch(tmp_path):
    run_ok([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            script("global_mi_probe.py"), str(tmp_path)], timeout_s=120)
    for rec in records(tmp_path, 2):
        scale = rec["ref_grad_max"]
        assert scale > 1e-4, "degenerate case: the reference gradient is ~0"
        good = rec["autograd"]
        assert good["loss"] == pytest.approx(rec["ref_loss"], rel=1e-5)
        assert good["max_abs_diff"] <= 1e-5 * scale
        assert good["ratio_to_ref"] == pytest.approx(1.0, abs=1e-5)
        # Negative control: same forward value, but a backward that does not sum over ranks leaves
        # DeepSpeed's average at 1/world of the right gradient. The test can tell the two apart.
        bad = rec["identity"]
        assert bad["loss"] == pytest.approx(rec["ref_loss"], rel=1e-5)
        assert bad["ratio_to_ref"] == pytest.approx(0.5, abs=1e-5)


def test_the_trainers_engine_reports_the_mi_of_tables_summed_over_ranks(tmp_path):
    """The wiring, not the collective: the engine ``train.trainer.build_engine`` builds (ep_size 2 on 2
    ranks, each with its own batch) reports for every MoE layer the MI of the layer's tables summed
    over both ranks, not of its own rank's table (which an engine without the reduction would train
    on, at 1/world of the right gradient, with every other test green)."""
    from _ep_harness import run_workers

    recs = run_workers("trainer_mi_probe.py", tmp_path, world_size=2, timeout_s=150)
    assert recs[0]["logged"].keys() == recs[0]["global"].keys() and len(recs[0]["logged"]) >= 2
    for rec in recs:
        for layer, logged in rec["logged"].items():
            assert logged == pytest.approx(rec["global"][layer], rel=1e-5, abs=1e-7), layer
        # the check can fail: each rank's own table gives another MI
        assert any(abs(rec["local"][k] - rec["global"][k]) > 1e-4 * abs(rec["global"][k]) for k in rec["local"])
    assert recs[0]["global"] == pytest.approx(recs[1]["global"], rel=1e-6)
