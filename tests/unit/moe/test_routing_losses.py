"""The MI and balance losses against hand-computed values and finite differences."""

import math

import pytest
import torch

from modsquad_ds.moe.losses import load_balancing_loss, mutual_information


def test_mi_is_zero_when_every_task_uses_experts_alike():
    table = torch.tensor([[3.0, 1.0, 2.0], [6.0, 2.0, 4.0]])  # rows proportional
    assert mutual_information(table).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("tasks", [2, 3, 5])
def test_mi_is_log_t_when_each_task_owns_its_experts(tasks):
    table = torch.eye(tasks) * 7.0
    assert mutual_information(table).item() == pytest.approx(math.log(tasks), rel=1e-6)
    # owning two experts each changes nothing: I(T;E) = H(T) when E determines T
    table = torch.kron(torch.eye(tasks), torch.ones(1, 2))
    assert mutual_information(table).item() == pytest.approx(math.log(tasks), rel=1e-6)


def test_mi_hand_computed_two_by_two():
    # P = [[0.4, 0.1], [0.1, 0.4]]; P(T) = P(E) = [0.5, 0.5]
    table = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    expected = 2 * 0.4 * math.log(0.4 / 0.25) + 2 * 0.1 * math.log(0.1 / 0.25)
    assert mutual_information(table).item() == pytest.approx(expected, rel=1e-6)


def test_mi_ignores_absent_tasks_and_unused_experts():
    table = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 4.0, 0.0]])
    reference = mutual_information(torch.tensor([[4.0, 1.0], [1.0, 4.0]]))
    assert mutual_information(table).item() == pytest.approx(reference.item(), rel=1e-6)


def test_mi_gradient_matches_finite_differences():
    torch.manual_seed(0)
    table = (torch.rand(3, 5, dtype=torch.float64) + 0.1).requires_grad_()
    # the loss is computed in float32 internally; check against central differences in float64
    (grad,) = torch.autograd.grad(mutual_information(table), table)
    eps = 1e-4
    numeric = torch.zeros_like(table)
    with torch.no_grad():
        for i in range(3):
            for j in range(5):
                plus, minus = table.clone(), table.clone()
                plus[i, j] += eps
                minus[i, j] -= eps
                numeric[i, j] = (mutual_information(plus) - mutual_information(minus)) / (2 * eps)
    torch.testing.assert_close(grad.double(), numeric, rtol=2e-2, atol=2e-4)


def test_mi_gradient_analytic_form():
    """dI/dn_te = (log(P_te / (P_t P_e)) - I) / total for a table of counts n (derived by hand)."""
    table = torch.tensor([[4.0, 1.0], [2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    mi = mutual_information(table)
    (grad,) = torch.autograd.grad(mi, table)
    with torch.no_grad():
        p = table / table.sum()
        ratio = torch.log(p / (p.sum(1, keepdim=True) * p.sum(0, keepdim=True)))
        expected = (ratio - mi) / table.sum()
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_balance_loss_is_one_when_uniform_and_e_when_collapsed():
    uniform = torch.ones(2, 4)
    assert load_balancing_loss(uniform, uniform).item() == pytest.approx(1.0)
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert load_balancing_loss(probs, probs).item() == pytest.approx(4.0)
    # hand-computed: share = [0.5, 0.5, 0, 0], mean prob = [0.25, 0.25, 0.5, 0] -> 4 * 0.25 = 1.0
    counts = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    probs = torch.tensor([[0.25, 0.25, 0.5, 0.0]])
    assert load_balancing_loss(probs, counts).item() == pytest.approx(1.0)


def test_a_stack_of_tables_gives_each_table_its_own_loss():
    torch.manual_seed(0)
    tables = torch.rand(5, 3, 4)
    tables[2, 1] = 0.0  # an absent task in one layer
    counts = torch.rand(5, 3, 4)
    torch.testing.assert_close(mutual_information(tables), torch.stack([mutual_information(t) for t in tables]))
    torch.testing.assert_close(load_balancing_loss(tables, counts),
                               torch.stack([load_balancing_loss(t, c) for t, c in zip(tables, counts)]))
