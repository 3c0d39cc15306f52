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
