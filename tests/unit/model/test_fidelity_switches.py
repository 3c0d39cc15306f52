"""The fidelity switches (the authors' choices where the paper leaves them open) do what they say,
and their defaults leave the model as it was."""

from __future__ import annotations

import torch

from modsquad_ds.config import load_config
from modsquad_ds.data.synthetic import synthetic_batch
from modsquad_ds.model import build_model
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.moe.losses import mutual_information

TASKS = "tasks.names=[class_scene,depth_zbuffer,normal]"


def _model(*overrides):
    cfg = load_config(overrides=[TASKS, *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_defaults_keep_parameter_names_and_shapes():
    _, default = _model()
    _, explicit = _model("moe.wide_dense_attention=false", "model.class_head=cls_token", "moe.eval_noise=false")
    a, b = default.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not any(k.startswith("heads.class_scene.norm") for k in a)


def test_wide_dense_attention_only_in_blocks_with_moe_mlp():
    cfg, model = _model("moe.wide_dense_attention=true")
    d, h = cfg.model.embed_dim, cfg.model.num_heads
    widths = {}
    for i, block in enumerate(model.blocks):
        qkv = getattr(getattr(block.attn, "attn", None), "qkv", None)
        if qkv is not None:
            widths[i] = qkv.weight.shape[0] // 3
    # alternate layout: blocks 1 and 3 hold dense attention + MoE MLP
    assert widths == {1: 2 * d, 3: 2 * d}
    assert model.blocks[1].attn.attn.head_dim == 2 * d // h
    _, mlp_only = _model("moe.wide_dense_attention=true", "moe.attn.enabled=false")
    widths = {i: b.attn.attn.qkv.weight.shape[0] // 3 for i, b in enumerate(mlp_only.blocks)}
    assert widths == {0: d, 1: 2 * d, 2: d, 3: 2 * d}


def test_cls_token_class_head():
    """The default head (``model.class_head: cls_token``) is the linear layer on token 0 alone:
    changing the class token changes the logits, changing any patch token (token 1 included)
    leaves them bit for bit as they were."""
    cfg, model = _model()
    head = model.heads["class_scene"]
    tokens = torch.randn(2, 17, cfg.model.embed_dim)
    assert torch.allclose(head(tokens), head.proj(tokens[:, 0]), atol=1e-6)
    patches = tokens.clone()
    patches[:, 1:] += 100.0  # every patch token, the first one included
    assert torch.equal(head(patches), head(tokens))
    cls = tokens.clone()
    cls[:, 0] += 100.0
    assert not torch.allclose(head(cls), head(tokens), atol=1e-3)


def test_mean_patch_class_head():
    cfg, model = _model("model.class_head=mean_patch")
    head = model.heads["class_scene"]
    tokens = torch.randn(2, 17, cfg.model.embed_dim)
    expected = head.proj(torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (cfg.model.embed_dim,),
                                                        head.norm.weight, head.norm.bias, 1e-6))
    assert torch.allclose(head(tokens), expected, atol=1e-6)
    tokens2 = tokens.clone()
    tokens2[:, 0] += 100.0  # the class token plays no part
    assert torch.allclose(head(tokens2), head(tokens), atol=1e-6)


def test_mi_over_topk_gates():
    cfg, model = _model("loss.mi_table=topk_gates", "loss.w_mi=1.0", "loss.task_weighting=fixed")
    batch = synthetic_batch(cfg.tasks.names, 3, cfg.model.img_size, torch.Generator().manual_seed(0))
    model.eval()
    out = model(batch["image"])
    objective = MultiTaskObjective(cfg)
    aux, stats = objective.aux_loss(out)
    expected = 0.0
    for r in out.routing:
        # the gate table holds only the top-k probabilities: never more than the full table
        assert bool((r.gate_table_TE <= r.prob_table_TE + 1e-6).all())
        assert bool((r.gate_table_TE.sum(1) < r.prob_table_TE.sum(1)).all())
        expected += float(mutual_information(r.gate_table_TE.detach()))
        assert float(stats[f"mi/{r.layer}"]) == float(mutual_information(r.gate_table_TE.detach()))
    assert abs(float(aux.detach()) + expected) < 1e-5
    # and with the default table the MI is the full-softmax one
    cfg_p = load_config(overrides=[TASKS, "loss.w_mi=1.0"])
    _, stats_p = MultiTaskObjective(cfg_p).aux_loss(out)
    r = out.routing[0]
    assert float(stats_p[f"mi/{r.layer}"]) == float(mutual_information(r.prob_table_TE.detach()))


def test_gate_table_by_hand():
    from modsquad_ds.moe.stats import routing_stats

    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]])
    topk = probs.topk(2, dim=-1).indices
    s = routing_stats("l", "mlp", probs, topk, torch.tensor([0]), 1)
    assert torch.allclose(s.gate_table_TE, torch.tensor([[0.5, 0.9, 0.3]]))


def test_router_noise_at_eval():
    cfg, noisy = _model("moe.eval_noise=true")
    _, quiet = _model()
    images = torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size)
    noisy.eval()
    quiet.eval()
    with torch.no_grad():
        a, b = noisy(images).preds["normal"], noisy(images).preds["normal"]
        c, d = quiet(images).preds["normal"], quiet(images).preds["normal"]
    assert not torch.equal(a, b)
    assert torch.equal(c, d)
