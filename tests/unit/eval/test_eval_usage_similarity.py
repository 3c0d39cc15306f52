"""Usage, sharpness, MI and task similarity on constructed routing decisions; the recorder on a
real model equals the model's own routing statistics."""

from __future__ import annotations

import math

import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.eval.similarity import (cluster_tasks, group_separation, hard_frequency, sharpness, soft_frequency,
                                         summarize, task_similarity)
from modsquad_ds.eval.usage import LayerUsage, RouteRecorder, layer_name
from modsquad_ds.model import build_model
from modsquad_ds.moe.router import RoutingResult


def _routing(topk_TSK, num_experts):
    t, s, k = topk_TSK.shape
    probs = torch.zeros(t, s, num_experts).scatter_(2, topk_TSK, 1.0 / k)
    return RoutingResult(probs.log(), probs, topk_TSK, probs.gather(2, topk_TSK))


def test_constructed_routing():
    # 3 tasks, 2 tokens, 4 experts, top-2. Task 0 and 1 pick {0,1} on token 0; on token 1 task 0
    # picks {0,1}, task 1 {1,2}; task 2 always {2,3}.
    topk = torch.tensor([[[0, 1], [0, 1]],
                         [[0, 1], [1, 2]],
                         [[2, 3], [2, 3]]])
    layer = LayerUsage("mlp", 3, 4, 2)
    layer.add(_routing(topk, 4), torch.tensor([0, 1, 2]), torch.ones(2))
    sim = task_similarity(layer)
    assert sim[0, 1] == pytest.approx((1.0 + 0.5) / 2)  # share 2/2 then 1/2 of their experts
    assert sim[0, 2] == 0 and sim[1, 2] == pytest.approx((0 + 0.5) / 2)
    assert torch.allclose(sim.diag(), torch.ones(3, dtype=sim.dtype))
    hard = hard_frequency(layer)
    assert hard[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert hard[1].tolist() == [0.25, 0.5, 0.25, 0.0]
    assert torch.allclose(soft_frequency(layer), hard)  # probs were 1/k on the chosen experts
    sharp = sharpness(hard)
    assert sharp[0] == pytest.approx(1 - math.log(2) / math.log(4))  # always the same 2 of 4
    assert sharp[1] == pytest.approx(1 - (1.5 * math.log(2)) / math.log(4))
    # padding tokens (weight 0) change nothing
    layer2 = LayerUsage("mlp", 3, 4, 2)
    layer2.add(_routing(torch.cat([topk, torch.zeros(3, 1, 2, dtype=torch.long)], 1), 4),
               torch.tensor([0, 1, 2]), torch.tensor([1.0, 1.0, 0.0]))
    for a, b in zip(layer.tensors(), layer2.tensors()):
        assert torch.equal(a, b)


def test_summary_mi_and_clusters():
    topk = torch.tensor([[[0], [0]], [[0], [0]], [[1], [1]], [[1], [1]]])  # tasks 0,1 -> e0; 2,3 -> e1
    layer = LayerUsage("mlp", 4, 2, 1)
    layer.add(_routing(topk, 2), torch.arange(4), torch.ones(2))
    s = summarize({"blocks.1.mlp": layer})
    assert s["mean_mi"] == pytest.approx(math.log(2))  # each task owns one of 2 experts equally used
    assert s["mean_sharpness_hard"] == pytest.approx(1.0)
    names = ["depth_zbuffer", "normal", "edge_texture", "keypoints2d"]
    clusters = cluster_tasks(s["similarity"], names, 2)
    assert clusters == {"depth_zbuffer": 0, "normal": 0, "edge_texture": 1, "keypoints2d": 1}
    sep = group_separation(s["similarity"], names)
    assert sep["within"] == 1.0 and sep["across"] == 0.0


def test_layer_names():
    assert layer_name("blocks.1.mlp.deepspeed_moe.gate.router") == "blocks.1.mlp"
    assert layer_name("blocks.0.attn.router") == "blocks.0.attn"


def test_recorder_matches_model_routing_stats():
    cfg = load_config(overrides=["tasks.names=[depth_zbuffer,normal,edge_texture]"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad(), RouteRecorder(model, cfg.tasks.names) as rec:
        out = model(images)
    for r in out.routing:
        layer = rec.layers[r.layer]
        assert torch.allclose(layer.soft_TE, r.prob_table_TE.double(), rtol=1e-6, atol=1e-9)
        assert torch.equal(layer.hard_TE, r.count_table_TE.double())
        assert torch.equal(layer.tokens_T, r.tokens_T.double())
