"""Every metric against values worked out by hand, masks and padding weights included; sums over
batches equal one pass over the concatenation; Delta_t on known inputs."""

from __future__ import annotations

import math

import pytest
import torch

from modsquad_ds.data.tasks import get_task
from modsquad_ds.eval.delta_t import comparison_table, delta_t, task_deltas
from modsquad_ds.eval.metrics import MetricSums, finish, task_sums


def _one(task, pred, target, mask=None, weight=None):
    spec = get_task(task)
    w = torch.ones(pred.shape[0]) if weight is None else weight
    return finish(spec, task_sums(spec, pred, target, mask, w).tolist())


def test_depth_metrics_by_hand_with_mask():
    # 1 image, 2x2 pixels; pixel (1,1) invalid (its error of 100 must not count).
    target = torch.tensor([[[[1.0, 2.0], [4.0, 1.0]]]])
    pred = torch.tensor([[[[1.2, 1.0], [4.0, 101.0]]]])
    mask = torch.tensor([[[[True, True], [True, False]]]])
    m = _one("depth_zbuffer", pred, target, mask)
    # valid errors: 0.2, -1.0, 0.0
    assert m["count"] == 3
    assert m["rmse"] == pytest.approx(math.sqrt((0.04 + 1.0 + 0.0) / 3))
    assert m["abs_err"] == pytest.approx((0.2 + 1.0 + 0.0) / 3)
    assert m["rel_err"] == pytest.approx((0.2 / 1 + 1.0 / 2 + 0.0) / 3)
    # ratios max(p/t, t/p): 1.2, 2.0, 1.0 -> < 1.25: 2 of 3; < 1.5625: 2; < 1.953: 2
    assert m["delta1"] == pytest.approx(2 / 3)
    assert m["delta2"] == pytest.approx(2 / 3)
    assert m["delta3"] == pytest.approx(2 / 3)


def test_depth_delta_thresholds_and_negative_prediction():
    target = torch.full((1, 1, 1, 4), 2.0)
    pred = torch.tensor([[[[2.4, 3.0, 3.8, -1.0]]]])  # ratios 1.2, 1.5, 1.9, huge (clamped to 1e-6)
    m = _one("depth_euclidean", pred, target)
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((0.25, 0.5, 0.75))


def test_depth_valid_zero_true_depth_counts_in_rmse_but_not_in_relative_metrics():
    """A valid pixel whose true depth is 0 (raw depth 0 is below the invalid threshold, so the
    release's mask keeps it) counts in RMSE, absolute error and ``count``; relative error and the
    deltas, which need t > 0, leave it out of both their sums and their denominator."""
    target = torch.tensor([[[[2.0, 0.0, 4.0, 1.0]]]])
    pred = torch.tensor([[[[3.0, 1.0, 4.0, 50.0]]]])
    mask = torch.tensor([[[[True, True, True, False]]]])  # the last pixel is invalid
    m = _one("depth_zbuffer", pred, target, mask)
    # valid errors 1, 1, 0 over 3 pixels, the zero-depth one included
    assert m["count"] == 3
    assert m["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert m["abs_err"] == pytest.approx(2 / 3)
    # t > 0 among the valid: t = 2 (|e|/t = 0.5, ratio 1.5) and t = 4 (0, ratio 1.0)
    assert m["rel_err"] == pytest.approx(0.5 / 2)
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((1 / 2, 1.0, 1.0))


def test_depth_delta_is_strictly_below_the_threshold():
    """delta_i counts ratios strictly below 1.25^i: a ratio of exactly 1.25 (p/t = 2.5/2 and
    t/p = 5/4), 1.5625 or 1.953125 (all exact in binary floating point) misses its own threshold."""
    target = torch.tensor([[[[2.0, 5.0, 2.0, 2.0]]]])
    pred = torch.tensor([[[[2.5, 4.0, 3.125, 3.90625]]]])  # ratios 1.25, 1.25, 1.25^2, 1.25^3
    m = _one("depth_euclidean", pred, target)
    assert (m["delta1"], m["delta2"], m["delta3"]) == (0.0, 2 / 4, 3 / 4)


def test_l1_over_channels_and_mask():
    target = torch.zeros(1, 3, 1, 2)
    pred = torch.tensor([[[[1.0, 9.0]], [[2.0, 9.0]], [[3.0, 9.0]]]])
    mask = torch.tensor([[[[True, False]]]])
    m = _one("normal", pred, target, mask)
    assert m["l1"] == pytest.approx((1 + 2 + 3) / 3) and m["count"] == 3


def test_curvature_l2():
    target = torch.zeros(1, 2, 1, 2)
    pred = torch.tensor([[[[1.0, 2.0]], [[0.0, 3.0]]]])
    assert _one("principal_curvature", pred, target)["l2"] == pytest.approx((1 + 4 + 0 + 9) / 4)


def test_accuracy_against_soft_labels_and_padding_weight():
    target = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])
    pred = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 1.0]])  # right, wrong, right
    assert _one("class_scene", pred, target)["accuracy"] == pytest.approx(2 / 3)
    # the wrong one is padding: weight 0 removes it
    m = _one("class_scene", pred, target, weight=torch.tensor([1.0, 0.0, 1.0]))
    assert m["accuracy"] == 1.0 and m["count"] == 2


def test_miou_by_hand_ignores_unlabelled():
    spec = get_task("segment_semantic")
    target = torch.tensor([[[0, 0, 1, 1, 2]]])
    logits = torch.full((1, spec.channels, 1, 5), -1.0)
    for x, c in enumerate([0, 1, 1, 1, 0]):  # predicted classes per pixel
        logits[0, c, 0, x] = 1.0
    mask = torch.tensor([[[[True, True, True, True, False]]]])  # pixel 4 unlabelled
    m = _one("segment_semantic", logits, target, mask)
    # class 0: inter 1, union 2 (truth 2 + pred 1 - 1); class 1: inter 2, union 3
    assert m["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["pixel_accuracy"] == pytest.approx(3 / 4)


def test_miou_counts_a_class_predicted_but_absent_from_the_truth_as_zero():
    """A class in the prediction or the truth is present; one without any correct pixel has IoU 0
    and still counts in the mean (classes in neither are left out)."""
    spec = get_task("segment_semantic")
    target = torch.tensor([[[0, 0, 1, 1, 3]]])
    logits = torch.full((1, spec.channels, 1, 5), -1.0)
    for x, c in enumerate([0, 2, 1, 1, 1]):  # class 2 only predicted, class 3 only true
        logits[0, c, 0, x] = 1.0
    m = _one("segment_semantic", logits, target)
    # class 0: inter 1, union 2; class 1: inter 2, union 3; class 2: 0 / 1; class 3: 0 / 1
    assert m["miou"] == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5) and m["count"] == 5


def test_miou_padding_weight_equals_dropping_the_image():
    """Weight 0 on an image removes all its pixels from the confusion table: the same numbers as
    evaluating the other image alone (worked out by hand)."""
    spec = get_task("segment_semantic")
    target = torch.tensor([[[0, 0, 1, 1]], [[2, 2, 2, 2]]])
    logits = torch.full((2, spec.channels, 1, 4), -1.0)
    for b, row in enumerate([[0, 1, 1, 1], [3, 3, 3, 3]]):
        for x, c in enumerate(row):
            logits[b, c, 0, x] = 1.0
    both = _one("segment_semantic", logits, target)
    # classes 0: 1/2, 1: 2/3, 2: 0/4, 3: 0/4
    assert both["miou"] == pytest.approx((1 / 2 + 2 / 3) / 4) and both["count"] == 8
    padded = _one("segment_semantic", logits, target, weight=torch.tensor([1.0, 0.0]))
    alone = _one("segment_semantic", logits[:1], target[:1])
    assert padded == alone
    assert padded["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert padded["pixel_accuracy"] == pytest.approx(3 / 4) and padded["count"] == 4


def test_samples_count_the_weighted_images_only():
    """``samples`` is the sum of the per-sample weights (padding samples do not count); without a
    weight every image counts once. It travels through the all-reduce vector as its last entry."""
    batch = {"image": torch.zeros(3, 3, 4, 4), "targets": {"class_scene": torch.eye(3, 63)}}
    preds = {"class_scene": torch.eye(3, 63)}
    sums = MetricSums(["class_scene"])
    sums.update(preds, batch, torch.tensor([1.0, 0.0, 1.0]))
    assert sums.samples == 2.0
    sums.update(preds, batch)
    assert sums.samples == 5.0
    assert sums.vector()[-1].item() == 5.0
    assert sums.compute()["class_scene"] == {"accuracy": 1.0, "count": 5.0}


def test_sums_over_batches_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    tasks = ["depth_zbuffer", "edge_texture", "class_object"]
    batch = {"image": torch.zeros(6, 3, 4, 4),
             "targets": {"depth_zbuffer": torch.rand(6, 1, 4, 4, generator=g) + 0.5,
                         "edge_texture": torch.rand(6, 1, 4, 4, generator=g),
                         "class_object": torch.rand(6, 100, generator=g)},
             "masks": {"depth_zbuffer": torch.rand(6, 1, 4, 4, generator=g) > 0.3}}
    preds = {"depth_zbuffer": torch.rand(6, 1, 4, 4, generator=g) + 0.5,
             "edge_texture": torch.rand(6, 1, 4, 4, generator=g),
             "class_object": torch.randn(6, 100, generator=g)}
    whole = MetricSums(tasks)
    whole.update(preds, batch)
    parts = MetricSums(tasks)
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6)):
        sub = {"image": batch["image"][sl], "targets": {k: v[sl] for k, v in batch["targets"].items()},
               "masks": {k: v[sl] for k, v in batch["masks"].items()}}
        parts.update({k: v[sl] for k, v in preds.items()}, sub)
    a, b = whole.compute(), parts.compute()
    for t in tasks:
        for k in a[t]:
            assert a[t][k] == pytest.approx(b[t][k], rel=1e-12)
    # and the round trip through the all-reduce vector
    again = MetricSums(tasks)
    again.load_vector(parts.vector())
    assert again.compute() == b


def test_delta_t_known_inputs():
    stl = {"depth_zbuffer": {"rmse": 2.0}, "class_object": {"accuracy": 0.5}, "normal": {"l1": 0.1}}
    run = {"depth_zbuffer": {"rmse": 1.5}, "class_object": {"accuracy": 0.4}, "normal": {"l1": 0.1}}
    d = task_deltas(run, stl)
    assert d["depth_zbuffer"] == pytest.approx(25.0)   # lower RMSE is better: +25 %
    assert d["class_object"] == pytest.approx(-20.0)   # lower accuracy is worse: -20 %
    assert d["normal"] == pytest.approx(0.0)
    assert delta_t(run, stl) == pytest.approx(5 / 3)
    table = comparison_table({"run": run}, stl)
    assert "| run | +1.67 |" in table
    # an undefined relative change (baseline accuracy 0) is nan and left out of the mean
    zero = {**stl, "class_object": {"accuracy": 0.0}}
    assert math.isnan(task_deltas(run, zero)["class_object"])
    assert delta_t(run, zero) == pytest.approx(12.5)


def test_delta_t_command_merges_per_task_baselines(tmp_path, capsys):
    import json

    from modsquad_ds.eval.delta_t import main

    files = []
    for name, tasks in (("stl_depth", {"depth_zbuffer": {"rmse": 2.0}}),
                        ("stl_cls", {"class_object": {"accuracy": 0.5}}),
                        ("mtl", {"depth_zbuffer": {"rmse": 1.0}, "class_object": {"accuracy": 0.5}})):
        (tmp_path / name / "eval").mkdir(parents=True)
        path = tmp_path / name / "eval" / "test_step_00000001.json"
        path.write_text(json.dumps({"tasks": tasks}))
        files.append(str(path))
    assert main(["--baseline", files[0], "--baseline", files[1], files[2]]) == 0
    out = capsys.readouterr().out
    assert "| mtl | +25.00 | +50.00 | +0.00 |" in out  # depth RMSE halved: +50 %; accuracy equal: 0
    # two files of one run (two checkpoints) stay two rows, named by file
    later = tmp_path / "mtl" / "eval" / "test_step_00000002.json"
    later.write_text(json.dumps({"tasks": {"depth_zbuffer": {"rmse": 2.0}, "class_object": {"accuracy": 0.5}}}))
    assert main(["--baseline", files[0], "--baseline", files[1], files[2], str(later)]) == 0
    out = capsys.readouterr().out
    assert "| mtl test_step_00000001 | +25.00 |" in out and "| mtl test_step_00000002 | +0.00 |" in out
