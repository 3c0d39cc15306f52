"""The production MoE layers equal the slow reference (paper eq. 1 written literally): outputs and
gradients, for random inputs and every setting."""

import itertools

import pytest
import torch
from timm.layers import Mlp

from modsquad_ds.moe import MoEAttention, MoEMlp, cpu_mlp
from modsquad_ds.moe.dispatch import combine, dispatch, plan
from modsquad_ds.moe.experts import run_mlp_experts
from modsquad_ds.moe.kernels import has_grouped_mm, set_kernel
from modsquad_ds.moe.reference import reference_moe_attention, reference_moe_mlp, reference_route

SETTINGS = list(itertools.product(
    [(4, 1), (6, 2), (5, 5)],          # (num_experts, top_k), including top_k == num_experts
    [torch.tensor([0, 1, 2]), torch.tensor([2]), torch.tensor([1, 1])],  # all tasks, one, repeated
    [False, True],                     # router noise (seeded identically for both paths)
))


# every expert kernel (moe/kernels.py) against the same reference; grouped_mm runs on CPU from torch 2.14.
# On the CPU "loop" runs the MLP experts whole, expert by expert (moe/cpu_mlp.py); "loop_unfused" is
# the loop kernel as GPUs and autocast run it, one projection at a time.
KERNELS = ["loop", "loop_unfused",
           pytest.param("grouped", marks=pytest.mark.skipif(not has_grouped_mm(), reason="no grouped_mm"))]


@pytest.fixture(autouse=True)
def _unfused_loop(request, monkeypatch):
    """Kernel ``loop_unfused``: the loop kernel with the CPU's whole-MLP path turned off."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("kernel") == "loop_unfused":
        monkeypatch.setattr(cpu_mlp, "fusable", lambda expert, x: False)


def _layer(kind, num_experts, top_k, noisy, kernel="auto"):
    torch.manual_seed(0)
    if kind == "mlp":
        layer, reference = MoEMlp(12, 20, num_experts, top_k, num_tasks=3, noisy=noisy), reference_moe_mlp
    else:
        layer, reference = MoEAttention(12, 8, num_experts, top_k, num_tasks=3, noisy=noisy), reference_moe_attention
    assert set_kernel(layer, kernel.removesuffix("_unfused")) == 1
    return layer, reference


def _grads(output, inputs, params, weight):
    return torch.autograd.grad((output * weight).sum(), [inputs, *params])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["mlp", "attn"])
@pytest.mark.parametrize("experts_k, task_ids, noisy", SETTINGS)
def test_fast_layer_matches_reference(kind, experts_k, task_ids, noisy, kernel):
    layer, reference = _layer(kind, *experts_k, noisy, kernel)
    layer.train()
    x = torch.randn(len(task_ids), 2, 7, 12, requires_grad=True)
    torch.manual_seed(1)
    y, stats = layer(x, task_ids)
    torch.manual_seed(1)
    y_ref = reference(layer, x, task_ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)

    weight = torch.randn_like(y)
    params = list(layer.parameters())
    for fast, slow in zip(_grads(y, x, params, weight), _grads(y_ref, x, params, weight)):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_router_matches_per_task_reference_and_noise_is_training_only():
    torch.manual_seed(0)
    layer = MoEMlp(8, 16, 6, 2, num_tasks=4, noisy=True)
    x = torch.randn(3, 10, 8)
    task_ids = torch.tensor([3, 0, 2])
    torch.manual_seed(5)
    fast = layer.router(x, task_ids)
    torch.manual_seed(5)
    slow = reference_route(layer.router, x, task_ids)
    for a, b in zip((fast.probs_TSE, fast.gates_TSK), (slow.probs_TSE, slow.gates_TSK)):
        torch.testing.assert_close(a, b)
    assert torch.equal(fast.topk_ids_TSK, slow.topk_ids_TSK)
    # gates are the softmax probabilities at the chosen experts, not renormalised
    torch.testing.assert_close(fast.gates_TSK, fast.probs_TSE.gather(-1, fast.topk_ids_TSK))
    assert (fast.gates_TSK.sum(-1) < 1.0).all()

    layer.eval()
    a, b = layer.router(x, task_ids), layer.router(x, task_ids)
    assert torch.equal(a.logits_TSE, b.logits_TSE), "eval routing must be deterministic (no noise)"
    expected = torch.stack([x[i] @ layer.router.task_wg[t] for i, t in enumerate(task_ids.tolist())])
    torch.testing.assert_close(a.logits_TSE, expected)


def test_routing_stats_tables_are_per_global_task():
    torch.manual_seed(0)
    layer = MoEMlp(8, 16, 5, 2, num_tasks=4, noisy=False)
    x = torch.randn(2, 3, 4, 8)
    _, stats = layer(x, torch.tensor([3, 1]))
    assert stats.prob_table_TE.shape == (4, 5)
    # each token's probabilities sum to 1, so each present task's row sums to its token count
    torch.testing.assert_close(stats.prob_table_TE.sum(1), torch.tensor([0.0, 12.0, 0.0, 12.0]))
    torch.testing.assert_close(stats.count_table_TE.sum(1), torch.tensor([0.0, 24.0, 0.0, 24.0]))
    torch.testing.assert_close(stats.tokens_T, torch.tensor([0.0, 12.0, 0.0, 12.0]))
    assert stats.prob_table_TE.requires_grad and not stats.count_table_TE.requires_grad


def test_no_router_parameter_is_named_expert():
    """DeepSpeed's checkpointing treats names containing 'expert' inside an MoE module as experts."""
    layer = MoEMlp(8, 16, 4, 2, num_tasks=2)
    names = [n for n, _ in layer.named_parameters() if n.startswith("router")]
    assert names and not any("expert" in n for n in names)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_fast_layer_under_bf16_autocast_stays_near_reference(kind, kernel):
    """Autocast does not reach inside the loop kernel's autograd Function nor grouped_mm: the expert
    projections cast for themselves (experts.expert_linear). bf16 keeps 8 bits: 2% of the norm."""
    torch.manual_seed(0)  # widths whose bf16 rows are multiples of 16 bytes, as grouped_mm requires
    if kind == "mlp":
        layer, reference = MoEMlp(16, 32, 6, 2, num_tasks=3, noisy=False), reference_moe_mlp
    else:
        layer, reference = MoEAttention(16, 8, 6, 2, num_tasks=3, noisy=False), reference_moe_attention
    set_kernel(layer, kernel.removesuffix("_unfused"))
    x = torch.randn(3, 2, 7, 16, requires_grad=True)
    task_ids = torch.tensor([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x, task_ids)
    y_ref = reference(layer, x, task_ids)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < 2e-2
    weight = torch.randn_like(y_ref)
    for fast, slow in zip(_grads(y.float(), x, list(layer.parameters()), weight),
                          _grads(y_ref, x, list(layer.parameters()), weight)):
        assert ((fast - slow).norm() / slow.norm().clamp_min(1e-12)).item() < 2e-2


@pytest.mark.parametrize("approximate, dtype", [("none", torch.float64), ("tanh", torch.float64),
                                                 ("none", torch.bfloat16)])
def test_cpu_moe_mlp_equals_dispatch_experts_combine_with_idle_experts(approximate, dtype):
    """moe/cpu_mlp.py (dispatch, experts and combine expert by expert) against dispatch, the
    projection loop and combine: outputs and every gradient (tokens, gates, parameters), with experts
    that get no tokens (their gradients are zeros) and a tanh GELU; in float64, and in bfloat16 with
    float32 gates (DeepSpeed's bf16 engines hold the weights so, without autocast) to bf16 rounding."""
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(Mlp(6, 10, act_layer=lambda: torch.nn.GELU(approximate=approximate))
                                  for _ in range(4)).to(dtype)
    topk = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2]])  # experts 1 and 3 idle
    gates = torch.rand(5, 2, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    x = torch.randn(5, 6, dtype=dtype, requires_grad=True)
    assert cpu_mlp.fusable(experts[0], x)
    weight = torch.randn(5, 6, dtype=dtype)
    inputs = [x, gates, *experts.parameters()]
    fused = cpu_mlp.moe_mlp(experts, x, plan(topk, gates, 4))
    grads = torch.autograd.grad((fused * weight).sum(), inputs)
    p = plan(topk, gates, 4)
    unfused = combine(run_mlp_experts(experts, dispatch(x, p), p, "loop"), p)
    assert fused.dtype == unfused.dtype == dtype
    tol = {} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fused, unfused, **tol)
    for g, ref in zip(grads, torch.autograd.grad((unfused * weight).sum(), inputs)):
        assert g.dtype == ref.dtype
        torch.testing.assert_close(g, ref, **tol)
    idle = [g for i, g in enumerate(grads[2:]) if i // 4 in (1, 3)]  # 4 parameters per expert
    assert len(idle) == 8 and all(torch.count_nonzero(g) == 0 for g in idle)


def test_cpu_moe_mlp_with_frozen_experts_gives_the_inputs_their_gradients():
    """Tuning only routers and heads (a new task): the experts' weights take no gradient, and the
    tokens' and gates' gradients are those of the general path."""
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(Mlp(6, 10) for _ in range(3)).requires_grad_(False)
    gates = torch.rand(4, 2, requires_grad=True)
    x = torch.randn(4, 6, requires_grad=True)
    topk = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 0]])
    weight = torch.randn(4, 6)
    fused = cpu_mlp.moe_mlp(experts, x, plan(topk, gates, 3))
    p = plan(topk, gates, 3)
    unfused = combine(run_mlp_experts(experts, dispatch(x, p), p, "loop"), p)
    for g, ref in zip(torch.autograd.grad((fused * weight).sum(), [x, gates]),
                      torch.autograd.grad((unfused * weight).sum(), [x, gates])):
        torch.testing.assert_close(g, ref)
    assert all(q.grad is None for q in experts.parameters())


def test_cpu_moe_mlp_keeps_only_the_gelu_input_per_slot():
    """What the one-pass path saves for backward, counted by the planner's own measure: the tokens,
    the plan's gates, token ids and slot order, and one (S, hidden) tensor, the GELU's input; no
    token copies, no GELU output and no expert outputs (the general path keeps all three)."""
    from modsquad_ds.plan.measure import saved_bytes

    torch.manual_seed(0)
    n, d, hidden, e, k = 64, 8, 12, 4, 2
    experts = torch.nn.ModuleList(Mlp(d, hidden) for _ in range(e))
    x = torch.randn(n, d, requires_grad=True)
    p = plan(torch.rand(n, e).topk(k, dim=1).indices, torch.rand(n, k, requires_grad=True), e)
    kept = saved_bytes(lambda: cpu_mlp.moe_mlp(experts, x, p), experts.parameters())
    plan_rows = sum(t.untyped_storage().nbytes() for t in (p.gates, p.token_idx, p.inverse))
    assert kept == x.untyped_storage().nbytes() + plan_rows + n * k * hidden * 4
    general = saved_bytes(lambda: combine(run_mlp_experts(experts, dispatch(x, p), p, "loop"), p),
                          experts.parameters())
    assert general - kept >= n * k * (d + hidden + d) * 4


def test_frozen_experts_keep_no_token_copies_for_their_weights():
    """Router fine-tuning freezes the experts: the expert kernels then keep their inputs no longer
    (they were saved only for the weights' gradients), and the tokens' and gates' gradients stay
    those of the trained-experts path. Both custom kernels: moe/cpu_mlp.py and the loop kernel."""
    from modsquad_ds.moe.experts import expert_linear
    from modsquad_ds.plan.measure import saved_bytes

    torch.manual_seed(0)
    n, d, hidden, e, k = 64, 8, 12, 4, 2
    experts = torch.nn.ModuleList(Mlp(d, hidden) for _ in range(e))
    x = torch.randn(n, d, requires_grad=True)
    p = plan(torch.rand(n, e).topk(k, dim=1).indices, torch.rand(n, k, requires_grad=True), e)
    weight = torch.randn(n, d)
    trained = saved_bytes(lambda: cpu_mlp.moe_mlp(experts, x, p), experts.parameters())
    want = torch.autograd.grad((cpu_mlp.moe_mlp(experts, x, p) * weight).sum(), [x, p.gates])
    experts.requires_grad_(False)
    frozen = saved_bytes(lambda: cpu_mlp.moe_mlp(experts, x, p), experts.parameters())
    assert trained - frozen == x.untyped_storage().nbytes()
    for g, ref in zip(torch.autograd.grad((cpu_mlp.moe_mlp(experts, x, p) * weight).sum(), [x, p.gates]), want):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)

    x_SI = dispatch(x, p).detach().requires_grad_()
    w = torch.randn(e, hidden, d, requires_grad=True)
    out_weight = torch.randn(n * k, hidden)
    want = torch.autograd.grad((expert_linear(x_SI, p, w, kernel="loop") * out_weight).sum(), x_SI)[0]
    kept = saved_bytes(lambda: expert_linear(x_SI, p, w, kernel="loop"), [w])
    w.requires_grad_(False)
    assert kept - saved_bytes(lambda: expert_linear(x_SI, p, w, kernel="loop"), [w]) == x_SI.untyped_storage().nbytes()
    got = torch.autograd.grad((expert_linear(x_SI, p, w, kernel="loop") * out_weight).sum(), x_SI)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
