"""Intra-op threads for training on CPUs: a rank's share of its node's cores, less its loader workers.

PyTorch starts one OpenMP thread per core in every process. Loader workers are processes too, and
OpenMP threads spin at the barriers inside every matmul, so one busy process more than there are
cores stalls the whole step. Measured on 2 cores, the demo config on one rank with one loader worker
(benchmarks/trainer_overhead.py): 54 images/s with 2 threads, 77 with 1.

Only where nobody chose: an ``OMP_NUM_THREADS`` in the environment wins (torchrun sets it to 1 when it
starts several processes per node), and runs on GPUs keep PyTorch's default.
"""

from __future__ import annotations

import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


def thread_budget(cores: int, ranks_on_host: int, loader_workers: int) -> int:
    """Threads for one rank: the node's cores shared by its ranks, one per loader worker kept free."""
    return max(1, cores // max(1, ranks_on_host) - loader_workers)


def ranks_on_this_host() -> int:
    """How many ranks share this machine (a collective when distributed: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts.count(socket.gethostname())


def set_cpu_threads(loader_workers: int) -> Optional[int]:
    """Set this rank's intra-op threads on a CPU-only run (see the module docstring); returns them, or
    None where the environment or a GPU decides. Every rank must call it (it may be a collective)."""
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = thread_budget(len(os.sched_getaffinity(0)), ranks_on_this_host(), loader_workers)
    torch.set_num_threads(threads)
    return threads
