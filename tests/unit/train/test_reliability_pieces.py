"""The reliability mechanisms on their own, in real processes and real files: the checkpoint
manifest, the run-folder lock, loader workers and stop signals, the skip tally's report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modsquad_ds.train import manifest
from modsquad_ds.train.run_lock import RunFolderBusy, RunLock
from modsquad_ds.train.skips import describe

REPO = Path(__file__).resolve().parents[3]


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
    (folder / "layer_0_expert_1_mp_rank_00_model_states.pt").write_bytes(b"x" * 300)
    manifest.write(folder, manifest.build(folder))
    return folder


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    folder = _folder(tmp_path)
    files = __import__("json").loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["layer_0_expert_1_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"]
    assert files["layer_0_expert_1_mp_rank_00_model_states.pt"] == {
        "bytes": 300, "sha256": hashlib.sha256(b"x" * 300).hexdigest()}
    assert manifest.verify(folder) is None


@pytest.mark.parametrize("damage, expected", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "has 100 bytes, the manifest says 5000"),
    (lambda p: p.unlink(), "is missing"),
    (lambda p: p.write_bytes(bytes(5000)), "does not match its SHA-256"),  # same size, other bytes
])
def test_manifest_names_the_damaged_file(tmp_path, damage, expected):
    folder = _folder(tmp_path)
    damage(folder / "mp_rank_00_model_states.pt")
    problem = manifest.verify(folder)
    assert problem is not None and "mp_rank_00_model_states.pt" in problem and expected in problem


def test_folder_without_manifest_is_not_trusted(tmp_path):
    folder = _folder(tmp_path)
    (folder / "manifest.json").unlink()
    assert "manifest.json is missing" in manifest.verify(folder)


_HOLDER = textwrap.dedent("""
    import sys, time
    from modsquad_ds.train.run_lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_run_lock_refuses_a_second_run_and_frees_on_crash(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"is in use by another run \(pid {holder.pid} on "):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
        holder.wait(10)
        with RunLock(tmp_path):  # the kernel dropped the lock with the process
            pass
    finally:
        holder.kill()
        holder.wait()


_LOADER = textwrap.dedent("""
    import sys, time, torch
    from torch.utils.data import IterableDataset
    from modsquad_ds.data.loader import EpochLoader

    class Slow(IterableDataset):
        def __iter__(self):
            for i in range(10**6):
                time.sleep(0.05)
                yield {"x": torch.tensor([i]), "_corrupt": []}

    from modsquad_ds.config import load_config
    from modsquad_ds.data.loader import dataloader
    cfg = load_config(["configs/demo.yaml"])  # data.workers: 1, as users run it
    it = iter(EpochLoader(dataloader(Slow(), cfg, cfg.data.workers, batch_size=None), 10**6, 0, 0, 0))
    next(it)
    import psutil, signal
    signal_seen = []
    signal.signal(signal.SIGTERM, lambda *a: signal_seen.append(1))  # before the test may send it
    print(psutil.Process().children()[0].pid, flush=True)
    while not signal_seen:
        next(it)  # keeps using the worker: a dead worker raises here
    for _ in range(5):
        next(it)
    print("saved after SIGTERM", flush=True)
    time.sleep(600)
""")


def test_loader_workers_outlive_sigterm_and_die_with_their_rank(tmp_path):
    rank = subprocess.Popen([sys.executable, "-c", _LOADER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True, cwd=REPO)
    try:
        worker = int(rank.stdout.readline())
        os.killpg(rank.pid, signal.SIGTERM)  # as torchrun does: the rank's whole session
        assert rank.stdout.readline().strip() == "saved after SIGTERM", rank.stdout.read()
        assert _alive(worker)
        rank.send_signal(signal.SIGKILL)
        rank.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its rank"
            time.sleep(0.05)
    finally:
        if rank.poll() is None:
            os.killpg(rank.pid, signal.SIGKILL)
        rank.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_skip_summary_is_one_line_naming_shards():
    line = describe({"train-000001.tar": {"shape mismatch": 2, "undecodable": 1}, "train-000007.tar": {"shape mismatch": 1}})
    assert line == ("4 samples skipped as unusable: train-000001.tar (shape mismatch 2, undecodable 1), "
                    "train-000007.tar (shape mismatch 1)")


def test_data_wait_counts_time_in_the_loader_not_in_the_step():
    from modsquad_ds.train.trainer import DataWait

    def slow_loader():
        for i in range(3):
            time.sleep(0.05)
            yield i

    wait = DataWait()
    assert list(wait.timed(slow_loader())) == [0, 1, 2]
    assert wait.take() >= 3 * 0.05 and wait.take() == 0.0  # take() resets the window
    for _ in wait.timed(range(3)):
        time.sleep(0.2)  # the step's own time is not waiting
    assert wait.take() < 3 * 0.2


def test_stop_requests_from_real_signals_and_an_ignored_ctrl_c_stays_ignored():
    """SIGUSR1 asks for a checkpoint only; SIGTERM and Ctrl-C ask for a checkpoint and a stop (the
    trainer saves before it stops); a process started with Ctrl-C ignored keeps ignoring it; uninstall
    puts every earlier handler back."""
    from modsquad_ds.train.signals import StopRequests

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as nohup / a background job starts us
    try:
        requests = StopRequests().install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)
        assert (requests.save, requests.stop) == (True, False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert (requests.save, requests.stop) == (True, True)
        requests.uninstall()
        assert {s: signal.getsignal(s) for s in before} == before
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C not ignored: it stops and saves
        ctrl_c = StopRequests().install()
        os.kill(os.getpid(), signal.SIGINT)
        assert (ctrl_c.save, ctrl_c.stop) == (True, True)
        ctrl_c.uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous_int)
