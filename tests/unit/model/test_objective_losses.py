"""Per-task losses, task weighting and the objective against hand-computed values."""

import math

import pytest
import torch

from modsquad_ds.config import load_config
from modsquad_ds.model.objective import MultiTaskObjective
from modsquad_ds.model.output import ModelOutput
from modsquad_ds.model.task_losses import (cosine_loss, l1_loss, l2_loss, pixel_cross_entropy,
                                           soft_cross_entropy)
from modsquad_ds.model.weighting import FixedWeighting, UncertaintyWeighting
from modsquad_ds.moe.losses import load_balancing_loss, mutual_information
from modsquad_ds.moe.stats import RoutingStats


def test_l1_and_l2_average_over_valid_pixels_only():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [0.0, 100.0]]]])
    mask = torch.tensor([[[[True, True], [True, False]]]])
    assert l1_loss(pred, target, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    assert l2_loss(pred, target, mask).item() == pytest.approx((1 + 4 + 9) / 3)
    assert l1_loss(pred, target).item() == pytest.approx((1 + 2 + 3 + 96) / 4)
    nothing_valid = torch.zeros_like(mask)
    assert l1_loss(pred, target, nothing_valid).item() == 0.0


def test_cosine_loss_is_one_minus_cosine_of_normalised_vectors():
    pred = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    pred[0, :, 0, 1] = torch.tensor([2.0, 2.0, 0.0])  # 45 degrees, length does not matter
    target = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    expected = (0.0 + (1 - math.cos(math.pi / 4))) / 2
    assert cosine_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_loss_keeps_the_sign_of_the_cosine():
    """A normal pointing the opposite way costs 2 (cos = -1) and one at 135 degrees 1 + cos 45°:
    the loss is 1 - cos, not 1 - |cos| (which would make a flipped normal free)."""
    target = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    pred = torch.tensor([[[[0.0, 3.0]], [[0.0, 0.0]], [[-5.0, -3.0]]]])  # opposite; 135 degrees
    assert cosine_loss(pred[..., :1], target[..., :1]).item() == pytest.approx(2.0, rel=1e-6)
    expected = (2.0 + (1 + math.cos(math.pi / 4))) / 2
    assert cosine_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_with_a_one_hot_target_is_nll():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([[0.0, 1.0, 0.0]])
    expected = -(0.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(
        -0.5 * (torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[0, 1]).item())


def test_pixel_cross_entropy_masks_uncertain_pixels():
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 2, 0, 0] = 10.0
    target = torch.tensor([[[2, 3]]])
    mask = torch.tensor([[[[True, False]]]])
    expected = -math.log(math.exp(10) / (math.exp(10) + 3))
    assert pixel_cross_entropy(logits, target, mask).item() == pytest.approx(expected, rel=1e-3)  # fp32


def test_uncertainty_weighting_formula():
    w = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.0, math.log(4.0)]))
    total = w({"a": torch.tensor(2.0), "b": torch.tensor(8.0)})
    # 0.5/sigma^2 * L + log(1 + sigma^2): a: 0.5*2 + log 2; b: 0.5/4*8 + log 5
    assert total.item() == pytest.approx(1 + math.log(2) + 1 + math.log(5), rel=1e-6)
    # the factors on the losses, as the trainer logs them (weight/<task>): 0.5/sigma^2
    assert {n: v.item() for n, v in w.weights().items()} == pytest.approx({"a": 0.5, "b": 0.125})
    fixed = FixedWeighting(["a", "b"], {"b": 0.5})
    assert fixed({"a": torch.tensor(2.0), "b": torch.tensor(8.0)}).item() == pytest.approx(6.0)
    assert {n: v.item() for n, v in fixed.weights().items()} == {"a": 1.0, "b": 0.5}


def test_objective_reports_each_trained_tasks_weight():
    cfg = load_config(overrides=["tasks.names=[edge_texture, normal]", "loss.aux=none"])
    objective = MultiTaskObjective(cfg)
    with torch.no_grad():
        objective.weighting.log_vars.copy_(torch.tensor([math.log(2.0), 0.0]))
    out = ModelOutput({"edge_texture": torch.ones(1, 1, 2, 2)}, [])  # one task in this batch
    _, stats = objective(out, {"targets": {"edge_texture": torch.zeros(1, 1, 2, 2)}})
    assert stats["weight/edge_texture"].item() == pytest.approx(0.25) and "weight/normal" not in stats


def _routing(table):
    return RoutingStats("blocks.1.mlp", "mlp", table, table.detach(), table.sum(1).detach(), 1)


def test_objective_subtracts_weighted_mi_and_uses_reduced_tables():
    cfg = load_config(overrides=["tasks.names=[edge_texture]", "loss.task_weighting=fixed", "loss.w_mi=0.5"])
    objective = MultiTaskObjective(cfg)
    table = torch.tensor([[3.0, 1.0]], requires_grad=True)
    out = ModelOutput({"edge_texture": torch.ones(1, 1, 2, 2)}, [_routing(table)])
    batch = {"targets": {"edge_texture": torch.zeros(1, 1, 2, 2)}}
    other = torch.tensor([1.0, 3.0])  # what the other ranks saw (the reducer gets every table flattened)
    loss, stats = objective(out, batch, reduce_table=lambda t: t + other)
    expected_mi = mutual_information(torch.tensor([[3.0, 1.0]]) + other)  # one task: MI = 0
    assert loss.item() == pytest.approx(1.0 - 0.5 * expected_mi.item())
    assert stats["loss/edge_texture"].item() == pytest.approx(1.0)

    two_tasks = load_config(overrides=["tasks.names=[edge_texture, normal]", "loss.task_weighting=fixed",
                                       "loss.w_mi=0.5"])
    table = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    out = ModelOutput({}, [_routing(table)])
    loss, stats = MultiTaskObjective(two_tasks)(out, {"targets": {}})
    assert loss.item() == pytest.approx(-0.5 * mutual_information(table).item())
    assert stats["mi/blocks.1.mlp"].item() == pytest.approx(mutual_information(table).item())


@pytest.mark.parametrize("aux", ["mi", "balance"])
def test_every_layers_tables_are_reduced_in_one_call(aux):
    """One reduction per micro step (one collective forward, one backward), not one per layer, with
    the same losses as reducing and scoring each layer's table on its own."""
    cfg = load_config(overrides=["tasks.names=[edge_texture, normal]", "loss.task_weighting=fixed",
                                 f"loss.aux={aux}", "loss.w_mi=0.5", "loss.w_balance=0.5"])
    torch.manual_seed(0)
    shapes = [(2, 3), (2, 4), (2, 3), (2, 4), (2, 3)]  # attention and MLP layers interleaved
    tables = [torch.rand(s, requires_grad=True) for s in shapes]
    others = [torch.rand(s) for s in shapes]  # what the other ranks saw
    routing = [RoutingStats(f"blocks.{i}.{'attn' if s[1] == 3 else 'mlp'}", "mlp", t, t.detach() * 2, t.sum(1).detach(), 1)
               for i, (t, s) in enumerate(zip(tables, shapes))]
    calls = []

    def reduce_table(flat):
        calls.append(flat.shape)
        if aux == "mi":
            return flat + torch.cat([o.reshape(-1) for o in others])
        return flat + torch.cat([o.reshape(-1) for o in others] + [2 * o.reshape(-1) for o in others])

    loss, stats = MultiTaskObjective(cfg)(ModelOutput({}, routing), {"targets": {}}, reduce_table)
    assert len(calls) == 1
    if aux == "mi":
        per_layer = [mutual_information(t + o) for t, o in zip(tables, others)]
        expected = -0.5 * sum(per_layer)
    else:
        per_layer = [load_balancing_loss(t + o, 2 * (t + o).detach()) for t, o in zip(tables, others)]
        expected = 0.5 * sum(per_layer)
    assert list(stats)[:len(shapes)] == [f"{aux}/{r.layer}" for r in routing]  # layer order kept
    for r, value in zip(routing, per_layer):
        assert stats[f"{aux}/{r.layer}"].item() == pytest.approx(value.item(), rel=1e-6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    grads = torch.autograd.grad(loss, tables)
    expected_grads = torch.autograd.grad(expected, tables)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_balance_and_none_aux_modes():
    table = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = ModelOutput({}, [_routing(table)])
    balance = load_config(overrides=["tasks.names=[edge_texture, normal]", "loss.aux=balance",
                                     "loss.w_balance=0.1"])
    loss, stats = MultiTaskObjective(balance)(out, {"targets": {}})
    assert loss.item() == pytest.approx(0.1 * 2.0)  # all tokens on one of 2 experts: E * 1 * 1
    none = load_config(overrides=["tasks.names=[edge_texture, normal]", "loss.aux=none"])
    loss, stats = MultiTaskObjective(none)(out, {"targets": {}})
    assert loss.item() == 0.0 and not any(k.startswith(("mi/", "balance/")) for k in stats)
