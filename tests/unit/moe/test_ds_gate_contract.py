"""Our gate inside DeepSpeed's own MoE code path, one process, ep_size 1: the 0.19.4+ gate contract
(pinned deepspeed==0.19.8), equality with MoEMlp, layer conversion both ways, names and helpers."""

import copy

import pytest
import torch
import torch.nn as nn
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import MOELayer
from timm.layers import Mlp

from modsquad_ds.moe import MoEMlp
from modsquad_ds.moe import ds_adapter as ep
from modsquad_ds.moe.reference import reference_moe_mlp

TASK_IDS = torch.tensor([2, 0, 1])


def _layer(num_experts=6, top_k=2, noisy=True, seed=0):
    torch.manual_seed(seed)
    return MoEMlp(12, 20, num_experts, top_k, num_tasks=3, noisy=noisy)


def _grads(y, x, params, w):
    return torch.autograd.grad((y * w).sum(), [x, *params])


@pytest.mark.parametrize("experts_class", [Experts, ep.BatchedExperts])  # DeepSpeed's loop, our bmm
@pytest.mark.parametrize("num_experts, top_k", [(6, 2), (4, 1), (5, 5)])
@pytest.mark.parametrize("noisy", [False, True])
def test_stock_moelayer_with_task_gate_equals_moemlp(num_experts, top_k, noisy, experts_class):
    """DeepSpeed's MOELayer (sparse encode, experts, sparse decode) driven by TaskGate == MoEMlp."""
    src = _layer(num_experts, top_k, noisy)
    src.train()
    gate = ep.TaskGate(src.router)
    experts = experts_class(Mlp(12, 20, act_layer=nn.GELU), num_experts, "ep_size_1")
    for mine, theirs in zip(experts.deepspeed_experts, src.experts.experts):
        mine.load_state_dict(theirs.state_dict())
    moe = MOELayer(gate, experts, "ep_size_1", 1, num_experts)
    x = torch.randn(3, 2, 7, 12, requires_grad=True)
    torch.manual_seed(1)
    y = moe(x, TASK_IDS)  # MOELayer hands its second input to the gate: our task ids
    torch.manual_seed(1)
    y_ref = reference_moe_mlp(src, x, TASK_IDS)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(y)
    p_moe = [src.router.task_wg, *experts.parameters()]
    p_ref = [src.router.task_wg, *src.experts.parameters()]
    for a, b in zip(_grads(y, x, p_moe, w), _grads(y_ref, x, p_ref, w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gate_output_contract():
    src = _layer(6, 2, noisy=False)
    gate = ep.TaskGate(src.router)
    x = torch.randn(3 * 14, 12)
    out = gate(x, TASK_IDS, True, False)  # exactly how MOELayer.forward calls it in 0.19.4+
    assert len(out) == 7
    l_aux, capacity, num_experts, indices, locations, gates, counts = out
    s, k = x.shape[0], 2
    assert float(l_aux) == 0.0 and num_experts == 6
    assert indices.shape == locations.shape == gates.shape == (k, s)
    assert indices.dtype == locations.dtype == torch.int32 and gates.dtype == torch.float32
    assert gates.requires_grad
    assert counts.tolist() == torch.bincount(indices.flatten().long(), minlength=6).tolist()
    assert int(capacity) == int(counts.max()) and int(counts.sum()) == s * k
    assert (indices >= 0).all(), "dropless: no route is flagged -1"
    assert (locations >= 0).all() and (locations < int(capacity)).all()
    slots = indices.long() * int(capacity) + locations.long()
    assert slots.unique().numel() == s * k, "every (token, choice) gets its own slot"
    r = src.router(x.view(3, 14, 12), TASK_IDS)
    assert torch.equal(indices.t().reshape(3, 14, k).long(), r.topk_ids_TSK)
    torch.testing.assert_close(gates.t().reshape(3, 14, k), r.gates_TSK)
    # locations follow token order within each expert, like DeepSpeed's cumsum
    for e in range(6):
        tok_order = torch.nonzero(indices.t() == e)[:, 0]
        assert torch.equal(locations.t()[indices.t() == e].long(), torch.arange(tok_order.numel()))


def test_gate_refuses_missing_task_ids():
    gate = ep.TaskGate(_layer().router)
    with pytest.raises(ValueError, match="task id"):
        gate(torch.randn(6, 12), None, True, False)
    with pytest.raises(ValueError, match="equal task slots"):
        gate(torch.randn(7, 12), TASK_IDS, True, False)


def test_converted_layer_is_a_deepspeed_moe_with_safe_names():
    model = nn.Sequential(_layer())
    ep.convert_to_expert_parallel(model, ep_size=1)
    layer = model[0]
    assert isinstance(layer, MoE) and isinstance(layer, ep.ExpertParallelMoEMlp)
    names = [n for n, _ in layer.named_parameters()] + [n for n, _ in layer.named_buffers()]
    # DeepSpeed's checkpointing treats every name with "expert" inside an MoE module as an expert weight
    assert all(n.startswith("deepspeed_moe.experts.deepspeed_experts.") for n in names if "expert" in n)
    assert {n for n in names if "router" in n} == {"deepspeed_moe.gate.router.task_wg",
                                                   "deepspeed_moe.gate.router.task_wnoise"}
    expert_params = [p for n, p in layer.named_parameters() if "deepspeed_experts" in n]
    assert all(ep.is_expert_param(p) and p.group_name == "ep_size_1" for p in expert_params)
    assert not ep.is_expert_param(layer.router.task_wg)
    assert layer.global_expert_ids() == list(range(6))
    assert isinstance(layer.deepspeed_moe.experts, ep.BatchedExperts) and layer.deepspeed_moe.experts.batched


@pytest.mark.parametrize("local_dispatch", [True, False], ids=["local_dispatch", "deepspeed_moelayer"])
def test_model_conversion_round_trip_is_exact(local_dispatch):
    """At ep_size 1 the converted layers run MoEMlp's dropless dispatch (the trainer's path) or
    DeepSpeed's MOELayer with TaskGate; either equals the model before conversion."""
    from modsquad_ds.config import load_config
    from modsquad_ds.model.factory import build_model

    cfg = load_config(preset="tiny", overrides=["tasks.names=[class_scene,edge_texture]"])
    torch.manual_seed(0)
    ref = build_model(cfg)
    model = ep.convert_to_expert_parallel(copy.deepcopy(ref), ep_size=1)
    layers = ep.expert_parallel_layers(model)
    for _, layer in layers:
        layer.local_dispatch = local_dispatch
    assert [n for n, _ in layers] == ["blocks.1.mlp", "blocks.3.mlp"]
    assert [m.name for _, m in layers] == ["blocks.1.mlp", "blocks.3.mlp"]
    # state dicts map onto each other key by key
    ref_state, ep_state = ref.state_dict(), model.state_dict()
    assert {ep.reference_key(k) for k in ep_state} == set(ref_state)
    for k, v in ep_state.items():
        assert torch.equal(v, ref_state[ep.reference_key(k)])
        if ".mlp." in k and ("deepspeed" in k):
            assert ep.expert_parallel_key(ep.reference_key(k)) == k
    images = torch.randn(2, 3, 32, 32)
    model.train(), ref.train()
    torch.manual_seed(3)
    out = model(images)
    torch.manual_seed(3)
    out_ref = ref(images)
    for task in out.preds:
        torch.testing.assert_close(out.preds[task], out_ref.preds[task], rtol=1e-5, atol=1e-6)
    for s, s_ref in zip(out.routing, out_ref.routing):
        assert (s.layer, s.kind, s.top_k) == (s_ref.layer, s_ref.kind, s_ref.top_k)
        torch.testing.assert_close(s.prob_table_TE, s_ref.prob_table_TE)
        assert torch.equal(s.count_table_TE, s_ref.count_table_TE) and torch.equal(s.tokens_T, s_ref.tokens_T)
    loss = sum(p.square().mean() for p in out.preds.values()) + sum(s.prob_table_TE.square().sum() for s in out.routing)
    loss_ref = sum(p.square().mean() for p in out_ref.preds.values()) + sum(
        s.prob_table_TE.square().sum() for s in out_ref.routing)
    loss.backward(), loss_ref.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[ep.reference_key(n)].grad, rtol=1e-5, atol=1e-6)  # fp32 summation order
    back = ep.convert_to_single_process(model)
    assert not ep.expert_parallel_layers(back)
    assert all(torch.equal(v, ref_state[k]) for k, v in back.state_dict().items())


def test_conversion_refuses_bad_ep_size():
    with pytest.raises(ValueError, match="process group"):
        ep.convert_to_expert_parallel(nn.Sequential(_layer()), ep_size=2)
    with pytest.raises(ValueError, match="must be >= 1"):
        ep.convert_to_expert_parallel(nn.Sequential(_layer()), ep_size=0)


def test_moe_param_groups_split_experts_for_deepspeed():
    model = ep.convert_to_expert_parallel(nn.Sequential(_layer(), nn.LayerNorm(12)), ep_size=1)
    groups = ep.moe_param_groups(model, weight_decay=0.05, no_decay=("norm.weight",))
    by_name = {g["name"]: g for g in groups}
    assert by_name["ep_size_1"]["moe"] and all(ep.is_expert_param(p) for p in by_name["ep_size_1"]["params"])
    assert not any(ep.is_expert_param(p) for g in groups if not g.get("moe") for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)  # a valid optimizer spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_matches_torch_in_one_process(dtype):
    """The norm in float64 of every gradient, however they are stored (bf16 engines hold bf16
    gradients), to 1e-6; clipped to ``max_norm`` up to the gradients' own rounding."""
    model = ep.convert_to_expert_parallel(nn.Sequential(_layer(noisy=False)), ep_size=1).to(dtype)
    y, _ = model[0](torch.randn(3, 2, 7, 12, dtype=dtype), TASK_IDS)
    y.float().square().sum().backward()
    want = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    got = ep.clip_grad_norm_(model, max_norm=0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    after = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert abs(float(after) - 0.5) < (1e-5 if dtype == torch.float32 else 5e-3)


def test_clip_grad_norm_never_reads_the_norm_back():
    """On the meta device (shapes, no values) anything that reads a value back to the host fails: the
    clipping decides on the device, as it must not stall a GPU step."""
    model = ep.convert_to_expert_parallel(nn.Sequential(_layer(noisy=False)), ep_size=1).to("meta")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    total = ep.clip_grad_norm_(model, max_norm=0.5)
    assert total.is_meta and total.shape == ()


def test_checkpoint_file_name():
    assert ep.expert_checkpoint_name(1, 12) == "layer_1_expert_12_mp_rank_00_model_states.pt"
    key = "blocks.3.mlp.deepspeed_moe.experts.deepspeed_experts.12.fc1.weight"
    assert ep.reference_key(key) == "blocks.3.mlp.experts.experts.12.fc1.weight"
    assert ep.reference_key(key.replace(".12.", ".0."), global_expert_id=12) == "blocks.3.mlp.experts.experts.12.fc1.weight"
