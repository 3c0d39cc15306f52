import torch

from modsquad_ds.moe import dispatch as dsp


def test_plan_sorts_slots_by_expert_and_combine_weights_by_gate():
    # 3 tokens, top-2 over 3 experts, chosen by hand
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])
    gates = torch.tensor([[0.5, 0.25], [0.6, 0.3], [0.7, 0.1]])
    p = dsp.plan(ids, gates, num_experts=3)
    assert p.counts == [2, 2, 2]
    # expert 0 gets (token 0, token 1), expert 1 (token 1, token 2), expert 2 (token 0, token 2)
    assert p.token_idx.tolist() == [0, 1, 1, 2, 0, 2]
    torch.testing.assert_close(p.gates, torch.tensor([0.25, 0.6, 0.3, 0.1, 0.5, 0.7]))

    x = torch.tensor([[1.0], [10.0], [100.0]])
    xs = dsp.dispatch(x, p)
    assert xs.squeeze(1).tolist() == [1.0, 10.0, 10.0, 100.0, 1.0, 100.0]
    # expert e multiplies by (e + 1)
    ys = xs * torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0]).unsqueeze(1)
    y = dsp.combine(ys, p)
    expected = [0.5 * 3 * 1 + 0.25 * 1 * 1, 0.6 * 1 * 10 + 0.3 * 2 * 10, 0.7 * 3 * 100 + 0.1 * 2 * 100]
    torch.testing.assert_close(y.squeeze(1), torch.tensor(expected))


def test_unpermute_restores_slot_order_and_empty_experts_are_fine():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3]])
    p = dsp.plan(ids, torch.ones(3, 2), num_experts=5)
    assert p.counts == [2, 1, 0, 3, 0]
    slots = torch.arange(6.0).unsqueeze(1)  # value = slot id in sorted order
    back = dsp.unpermute(slots, p)
    # each (token, choice) gets the sorted row that holds it
    assert torch.equal(back.view(-1)[:], slots.view(-1)[torch.argsort(p.slot_order)])
    assert back.shape == (3, 2, 1)


def _naive_dispatch_combine(x, ids, gates, expert_fn):
    """Token by token, slot by slot, with autograd's own gradients (no permutations)."""
    out = []
    for n in range(x.shape[0]):
        out.append(sum(gates[n, j] * expert_fn(x[n], int(ids[n, j])) for j in range(ids.shape[1])))
    return torch.stack(out)


def test_dispatch_and_combine_gradients_equal_the_naive_token_loop():
    torch.manual_seed(0)
    n, k, e, d = 7, 3, 5, 4
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    ids[0] = torch.tensor([4, 4, 4])  # not a valid top-k, but the layout must not care
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(e, d, dtype=torch.float64)  # expert e: x * scale[e]
    grad_out = torch.randn(n, d, dtype=torch.float64)

    p = dsp.plan(ids, gates, e)
    y = dsp.combine(dsp.dispatch(x, p) * scale[p.expert_S], p)
    y.backward(grad_out)
    fast = (y.detach(), x.grad.clone(), gates.grad.clone())
    x.grad, gates.grad = None, None
    y_ref = _naive_dispatch_combine(x, ids, gates, lambda row, ex: row * scale[ex])
    y_ref.backward(grad_out)
    for got, want in zip(fast, (y_ref.detach(), x.grad, gates.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_combine_in_bfloat16_stays_close_to_float32():
    torch.manual_seed(1)
    n, k, e, d = 64, 4, 8, 32
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    gates = torch.rand(n, k)
    y32 = torch.randn(n * k, d)
    p = dsp.plan(ids, gates, e)
    out16 = dsp.combine(y32.bfloat16(), p)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), dsp.combine(y32, p), rtol=2e-2, atol=2e-2)
