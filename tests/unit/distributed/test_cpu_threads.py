"""The CPU thread budget: a rank's share of the cores, less its loader workers; never below one."""

import torch

from modsquad_ds.distributed import cpu_threads
from modsquad_ds.distributed.cpu_threads import ranks_on_this_host, set_cpu_threads, thread_budget


def test_thread_budget_by_hand():
    assert thread_budget(cores=2, ranks_on_host=1, loader_workers=1) == 1
    assert thread_budget(cores=2, ranks_on_host=1, loader_workers=0) == 2
    assert thread_budget(cores=64, ranks_on_host=8, loader_workers=2) == 6
    assert thread_budget(cores=2, ranks_on_host=2, loader_workers=2) == 1  # never zero
    assert thread_budget(cores=16, ranks_on_host=0, loader_workers=0) == 16


def test_without_a_process_group_this_rank_is_alone():
    assert ranks_on_this_host() == 1


def test_the_environment_decides_when_it_says(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_cpu_threads(loader_workers=1) is None
        assert torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        assert set_cpu_threads(loader_workers=1) == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
