"""data_tools/worker_pool.py with real worker processes writing real shards: the same shards as one
process, a worker's error named with its job, a worker killed mid-run, and no worker left behind
in any case."""

import contextlib
import dataclasses
import multiprocessing
import os
import signal

import pytest

from data_tools.sharding import make_plan, write_shard
from data_tools.worker_pool import WorkerFailed, imap_unordered


def _jobs(mini_root, out):
    out.mkdir()
    return make_plan(mini_root, out, "train", ["rgb", "normal"], None, seed=0, samples_per_shard=2).shards


def _write(jobs, workers=2):
    return imap_unordered(write_shard, jobs, workers, describe=lambda job: f"writing {job.name}")


@pytest.fixture
def workers_alive():
    """The child processes started since the test began (other tests may leave loader workers)."""
    before = {p.pid for p in multiprocessing.active_children()}
    return lambda: [p for p in multiprocessing.active_children() if p.pid not in before]


def test_workers_write_the_shards_one_process_writes(mini_root, tmp_path, workers_alive):
    jobs = _jobs(mini_root, tmp_path / "two")
    results = list(_write(jobs))
    assert sorted(i for i, _ in results) == list(range(len(jobs)))
    assert all(side["name"] == jobs[i].name for i, side in results)
    alone = list(_write(_jobs(mini_root, tmp_path / "one"), workers=1))
    assert sorted(side["sha256"] for _, side in results) == sorted(side["sha256"] for _, side in alone)
    assert not workers_alive()


def test_a_workers_error_names_its_job_and_ends_the_others(mini_root, tmp_path, workers_alive):
    jobs = _jobs(mini_root, tmp_path / "err")
    jobs[3] = dataclasses.replace(jobs[3], out_dir=str(tmp_path / "no_such_folder"))
    with pytest.raises(WorkerFailed, match=rf"writing {jobs[3].name} failed:(.|\n)*FileNotFoundError"):
        list(_write(jobs))
    assert not workers_alive()


def test_a_killed_worker_ends_the_run_instead_of_hanging_it(mini_root, tmp_path, workers_alive):
    results = _write(_jobs(mini_root, tmp_path / "killed"))
    next(results)
    os.kill(workers_alive()[0].pid, signal.SIGKILL)  # as the OOM killer would
    with pytest.raises(WorkerFailed, match="a worker process died"):
        list(results)
    assert not workers_alive()


def test_closing_early_kills_the_workers(mini_root, tmp_path, workers_alive):
    """What make_shards does on Ctrl-C or SIGTERM: close the pool, then remove what is half-written."""
    with contextlib.closing(_write(_jobs(mini_root, tmp_path / "closed"))) as results:
        next(results)
        assert len(workers_alive()) == 2
    assert not workers_alive()


def test_setup_runs_in_each_worker_and_jobs_can_be_anything_picklable():
    results = dict(imap_unordered(_pid_and_square, list(range(12)), 3, setup=_mark_setup))
    assert sorted(results) == list(range(12))
    assert all(square == i * i and marked for i, (pid, square, marked) in results.items())
    assert len({pid for pid, _, _ in results.values()} - {os.getpid()}) == 3


_SETUP = {"done": False}


def _mark_setup():
    _SETUP["done"] = True


def _pid_and_square(n):
    return os.getpid(), n * n, _SETUP["done"]
