"""Collectives in a world of one are the identity (no process group needed), gradients included."""

import pytest
import torch

from modsquad_ds.distributed.collectives import (all_reduce_scalar, all_reduce_sum_autograd, all_reduce_tensor, any_rank,
                                                  step_vote)
from modsquad_ds.distributed.watchdog import is_comm_failure


def test_autograd_all_reduce_is_identity_without_a_group():
    x = torch.randn(3, 4, requires_grad=True)
    y = all_reduce_sum_autograd(x)
    assert y is x
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3, 4), 2.0))


def test_scalar_helpers_without_a_group():
    assert all_reduce_scalar(2.5) == 2.5
    assert any_rank(True) and not any_rank(False)
    assert step_vote(torch.tensor(1.0), 2.0) == (True, 2.0)
    assert step_vote(torch.tensor(float("nan")), 0.0) == (False, 0.0)
    assert step_vote(torch.tensor(float("inf")), 1.0) == (False, 1.0)


def test_tensor_reduction_in_a_world_of_one_is_a_copy():
    t = torch.tensor([1.5, 2.5], dtype=torch.float64)
    out = all_reduce_tensor(t)
    assert torch.equal(out, t) and out.data_ptr() != t.data_ptr()
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce_tensor(t, op="mean")


def test_comm_failure_classification():
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:36584: "
                        "Connection reset by peer.")
    assert is_comm_failure(gloo)
    assert is_comm_failure(torch.distributed.DistNetworkError("x"))
    assert not is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_comm_failure(ValueError("gloo"))


def test_comm_failure_found_behind_an_error_raised_while_handling_it():
    """A peer's death under torchrun: the launcher's clean-up kills a loader worker while the gloo
    error is being raised; the survivor must still see the failed collective (one line, exit 75)."""
    from modsquad_ds.distributed.watchdog import comm_failure_in

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1: Connection reset by peer")
    try:
        try:
            raise gloo
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 8572) is killed by signal: Terminated.")
    except RuntimeError as err:
        assert comm_failure_in(err) is gloo
    assert comm_failure_in(RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")) is None
