"""data_tools/writers.py with real writer processes: the same shards as one process, a writer's
error named with its shard, a writer killed mid-run, and no writer left behind in any case."""

import dataclasses
import multiprocessing
import os
import signal

import pytest

from data_tools.sharding import make_plan
from data_tools.writers import WriterFailed, write_all


def _jobs(mini_root, out):
    out.mkdir()
    return make_plan(mini_root, out, "train", ["rgb", "normal"], None, seed=0, samples_per_shard=2).shards


@pytest.fixture
def writers_alive():
    """The child processes started since the test began (other tests may leave loader workers)."""
    before = {p.pid for p in multiprocessing.active_children()}
    return lambda: [p for p in multiprocessing.active_children() if p.pid not in before]


def test_writers_write_the_shards_one_process_writes(mini_root, tmp_path, writers_alive):
    jobs = _jobs(mini_root, tmp_path / "two")
    sides = list(write_all(jobs, workers=2, resizes=False))
    alone = list(write_all(_jobs(mini_root, tmp_path / "one"), workers=1, resizes=False))
    assert sorted(s["name"] for s in sides) == [j.name for j in jobs]
    assert sorted((s["name"], s["sha256"]) for s in sides) == sorted((s["name"], s["sha256"]) for s in alone)
    assert not writers_alive()


def test_a_writers_error_names_its_shard_and_ends_the_others(mini_root, tmp_path, writers_alive):
    jobs = _jobs(mini_root, tmp_path / "err")
    jobs[3] = dataclasses.replace(jobs[3], out_dir=str(tmp_path / "no_such_folder"))
    with pytest.raises(WriterFailed, match=rf"writing {jobs[3].name} failed:(.|\n)*FileNotFoundError"):
        list(write_all(jobs, workers=2, resizes=False))
    assert not writers_alive()


def test_a_killed_writer_ends_the_run_instead_of_hanging_it(mini_root, tmp_path, writers_alive):
    jobs = _jobs(mini_root, tmp_path / "killed")
    sidecars = write_all(jobs, workers=2, resizes=False)
    next(sidecars)
    os.kill(writers_alive()[0].pid, signal.SIGKILL)  # as the OOM killer would
    with pytest.raises(WriterFailed, match="a shard writer died"):
        list(sidecars)
    assert not writers_alive()


def test_closing_early_kills_the_writers(mini_root, tmp_path, writers_alive):
    """What make_shards does on Ctrl-C or SIGTERM: close the generator, then remove what is half-written."""
    sidecars = write_all(_jobs(mini_root, tmp_path / "closed"), workers=2, resizes=False)
    next(sidecars)
    assert len(writers_alive()) == 2
    sidecars.close()
    assert not writers_alive()
