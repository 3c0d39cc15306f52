"""routing_stats against a token-by-token loop (the tables every loss and usage map reads)."""

import torch

from modsquad_ds.moe.stats import routing_stats


def test_tables_equal_a_loop_over_tokens_with_repeated_and_absent_tasks():
    torch.manual_seed(0)
    t, s, e, k, num_tasks = 3, 7, 5, 2, 4
    probs = torch.rand(t, s, e, dtype=torch.float64).softmax(-1).requires_grad_()
    topk = probs.detach().topk(k, dim=-1).indices
    task_ids = torch.tensor([2, 0, 2])  # task 2 in two slots, task 1 and 3 absent
    stats = routing_stats("blocks.0.mlp", "mlp", probs, topk, task_ids, num_tasks)

    prob, gate, count = (torch.zeros(num_tasks, e, dtype=torch.float64) for _ in range(3))
    tokens = torch.zeros(num_tasks, dtype=torch.float64)
    for slot in range(t):
        task = int(task_ids[slot])
        for token in range(s):
            tokens[task] += 1
            for expert in range(e):
                prob[task, expert] += probs[slot, token, expert].item()
            for expert in topk[slot, token].tolist():
                gate[task, expert] += probs[slot, token, expert].item()
                count[task, expert] += 1
    torch.testing.assert_close(stats.prob_table_TE.detach(), prob)
    torch.testing.assert_close(stats.gate_table_TE.detach(), gate)
    torch.testing.assert_close(stats.count_table_TE, count)
    torch.testing.assert_close(stats.tokens_T, tokens)
    assert stats.top_k == k and not stats.count_table_TE.requires_grad
    # gradients: d(sum of the gate table)/d(prob) is 1 exactly at each token's top-k experts
    (grad,) = torch.autograd.grad(stats.gate_table_TE.sum(), probs)
    torch.testing.assert_close(grad, torch.zeros_like(probs).scatter_(2, topk, 1.0))
