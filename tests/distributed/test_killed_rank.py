"""A rank killed with SIGKILL ends the job within a bounded time, with a message that names the problem."""

import os
import signal
import subprocess
import time

import pytest

from _launch import BIN, Ranks, base_env, python, script, wait_for_files

pytestmark = [pytest.mark.dist, pytest.mark.timeout(120)]

HEARTBEAT_S = 3.0


def kill_and_wait(ranks: Ranks, out, victim: int, bound_s: float) -> tuple[int, str, float]:
    wait_for_files([out / f"ready{r}" for r in range(2)], timeout_s=60)
    time.sleep(0.5)  # both ranks inside their loop
    t0 = time.monotonic()
    ranks.procs[victim].send_signal(signal.SIGKILL)
    survivor = ranks.procs[1 - victim]
    try:
        output, _ = survivor.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"survivor still running {bound_s:.0f} s after rank {victim} was killed") from None
    return survivor.returncode, output, time.monotonic() - t0


@pytest.mark.parametrize("victim", [0, 1])
def test_survivor_in_a_collective_exits_at_once(tmp_path, victim):
    with Ranks("kill_probe.py", [str(tmp_path), "collective", str(HEARTBEAT_S)]) as ranks:
        code, output, seconds = kill_and_wait(ranks, tmp_path, victim, bound_s=20)
    assert code == 75, output[-3000:]
    assert f"rank {1 - victim}/2: a collective failed, a peer probably died or hung" in output
    assert seconds < 20


def test_busy_survivor_is_ended_by_the_heartbeat(tmp_path):
    """No collective to fail: the survivor only learns of the death through the heartbeat."""
    with Ranks("kill_probe.py", [str(tmp_path), "compute", str(HEARTBEAT_S)]) as ranks:
        code, output, seconds = kill_and_wait(ranks, tmp_path, victim=1, bound_s=HEARTBEAT_S + 15)
    assert code == 75, output[-3000:]
    assert "rank 0/2: ending because rank 1 sent no heartbeat" in output
    assert seconds >= HEARTBEAT_S * 0.9  # it really was the heartbeat, not something faster


def test_busy_survivor_loses_the_store_when_rank0_dies(tmp_path):
    with Ranks("kill_probe.py", [str(tmp_path), "compute", str(HEARTBEAT_S)]) as ranks:
        code, output, _ = kill_and_wait(ranks, tmp_path, victim=0, bound_s=HEARTBEAT_S + 15)
    assert code == 75, output[-3000:]
    assert "rank 1/2: lost the rendezvous store" in output


def test_mpiexec_ends_the_job(tmp_path):
    """Under mpiexec a killed rank ends the whole launch with a non-zero status."""
    proc = subprocess.Popen([str(BIN / "mpiexec"), "-n", "2", python(), script("kill_probe.py"), str(tmp_path),
                             "compute", "60"], env=base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_files([tmp_path / "ready0", tmp_path / "ready1"], timeout_s=60)
        victim = int((tmp_path / "ready1").read_text())
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode != 0, output[-3000:]
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
