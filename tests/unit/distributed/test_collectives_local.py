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


def _ring(timeout_s: float):
    """A real TCPStore (as rank 0 hosts it) and two heartbeats of a world of 2, each with a client of
    its own; failures are collected instead of ending the process. Returns the store as the
    heartbeats see it (their prefix)."""
    from datetime import timedelta

    import torch.distributed as dist

    from modsquad_ds.distributed.env import free_port
    from modsquad_ds.distributed.watchdog import Heartbeat

    port = free_port("127.0.0.1")
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    failures = {0: [], 1: []}
    beats = [Heartbeat.connect("127.0.0.1", port, rank, 2, timeout_s, interval_s=0.05,
                               on_failure=failures[rank].append) for rank in (0, 1)]
    return dist.PrefixStore("modsquad/heartbeat/", master), beats, failures


def _wait_for(condition, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_heartbeat_notices_a_silent_peer_and_tells_every_rank():
    """Rank 1's thread stops beating without leaving (as when its process is killed): rank 0 reports
    it after about the timeout, not before, and posts the reason under ``abort`` for the others."""
    import time

    master, (hb0, hb1), failures = _ring(timeout_s=0.5)
    hb0.start(), hb1.start()
    time.sleep(0.8)  # longer than the timeout: live peers never trip it
    assert failures == {0: [], 1: []}
    hb1._stop.set(), hb1._thread.join()  # dies: no more beats, no "left" key
    t0 = time.monotonic()
    assert _wait_for(lambda: failures[0], 5), "rank 0 never noticed the silent peer"
    assert 0.4 < time.monotonic() - t0 < 3
    assert failures[0][0].startswith("rank 0/2: ending because rank 1 sent no heartbeat for")
    assert master.get("abort").decode().startswith("rank 1 sent no heartbeat")
    hb0.stop()


def test_heartbeat_lets_a_peer_leave_and_obeys_an_abort_posted_elsewhere():
    import time

    master, (hb0, hb1), failures = _ring(timeout_s=0.3)
    hb0.start(), hb1.start()
    hb1.stop()  # a clean shutdown leaves the ring on purpose
    time.sleep(0.9)
    assert failures[0] == []
    master.set("abort", "rank 5 sent no heartbeat for 9 s")
    assert _wait_for(lambda: failures[0], 3)
    assert failures[0] == ["rank 0/2: ending because rank 5 sent no heartbeat for 9 s"]
    hb0.stop()


def test_heartbeat_interval_defaults_to_a_sixth_of_the_timeout_at_most_five_seconds():
    """Several beats fit in one timeout (a late beat is not a death), and a long timeout does not
    make the ring poll slowly."""
    import torch.distributed as dist

    from modsquad_ds.distributed.watchdog import Heartbeat

    store = dist.HashStore()
    assert Heartbeat(store, 0, 2, timeout_s=3.0).interval_s == 0.5
    assert Heartbeat(store, 0, 2, timeout_s=600.0).interval_s == 5.0
    with pytest.raises(ValueError, match="heartbeat timeout must be positive"):
        Heartbeat(store, 0, 2, timeout_s=0)
