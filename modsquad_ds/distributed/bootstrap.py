"""Start (and stop) the process group the DeepSpeed engine runs on, the same way under every launcher.

Order for a trainer (see docs/launchers.md):

    launch = env.resolve()                                    # who am I; no process group yet
    dims = ParallelDims.from_config(cfg, launch.world_size, ds)  # refuse bad layouts first
    ctx = init_distributed(launch, timeout_s=..., heartbeat_timeout_s=...)
    seed_everything(cfg.seed)
    ... deepspeed.initialize(...); train inside `with fail_fast(ctx.rank, ctx.world_size):` ...
    shutdown(ctx)
    ...
    end_process(code)                                         # in `if __name__ == "__main__":`
                                                              # (run_command(main) does it)

:func:`setup` does the first four for a RunConfig.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist

from modsquad_ds.distributed import env as launch_env
from modsquad_ds.distributed.accelerator import free_memory_from_cuda
from modsquad_ds.distributed.env import LaunchEnv
from modsquad_ds.distributed.parallel import ParallelDims
from modsquad_ds.distributed.watchdog import Heartbeat

if TYPE_CHECKING:
    from modsquad_ds.config.schema import RunConfig

log = logging.getLogger(__name__)

BUILD_SHM_ENV = "MODSQUAD_BUILD_SHM_OP"
"""Set to 1 to let DeepSpeed build its CPU shared-memory op (25-150 s on first use)."""


@dataclass
class DistContext:
    launch: LaunchEnv
    backend: str
    device: torch.device
    init_seconds: float
    """Wall time of init_distributed: deepspeed import (if first), rendezvous, DeepSpeed backend."""
    shm_op_skipped: bool
    heartbeat: Optional[Heartbeat] = None

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def local_rank(self) -> int:
        return self.launch.local_rank

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0


def skip_shm_op_build() -> bool:
    """Make DeepSpeed's TorchBackend skip the CPU shared-memory comm op (``deepspeed_shm_comm``).

    On the CPU accelerator ``TorchBackend.__init__`` JIT-compiles it with ninja: 25-150 s on a cold
    cache, on every fresh machine or container. Training never uses it (it serves only
    ``inference_all_reduce``; our collectives go through torch.distributed/gloo), and
    ``build_shm_op`` returning None is the code path DeepSpeed itself takes where the op is
    incompatible. The function is patched in ``sys.modules``: the attribute path
    ``deepspeed.comm.torch`` resolves to the torch package, which ``deepspeed.comm`` re-exports.
    Returns whether the patch is in place.
    """
    if os.environ.get(BUILD_SHM_ENV) == "1":
        return False
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch into sys.modules)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False  # the op exists only for the CPU accelerator; leave others untouched
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return True


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The GPU of this rank among the ones it can see.

    ``srun --gpus-per-node 8`` shows every task all 8 GPUs (take the local rank's); ``--gpus-per-task 1``
    or ``--gpu-bind=single:1`` shows each task only its own (device 0). Anything else would put two
    ranks on one GPU, which NCCL refuses: say so before it does.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise launch_env.LaunchError(f"local rank {local_rank} sees {visible} GPU(s): give each task one GPU "
                                 "(--gpus-per-task 1) or every task of a node all of them (--gpus-per-node)")


def engine_args() -> Optional[argparse.Namespace]:
    """``deepspeed.initialize``'s ``args``: the GPU :func:`init_distributed` chose for this rank.

    Without it the engine moves the model to ``cuda:LOCAL_RANK``, a device that does not exist where
    each task sees only its own GPU (``srun --gpus-per-task 1``: device 0 for every local rank).
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda" and torch.cuda.is_initialized():
        return argparse.Namespace(device_rank=torch.cuda.current_device())
    return None


def init_distributed(launch: Optional[LaunchEnv] = None, *, timeout_s: float = 600.0,
                     heartbeat_timeout_s: float = 60.0, backend: Optional[str] = None) -> DistContext:
    """Rendezvous all ranks and create DeepSpeed's communication backend over the same process group.

    A world of one gets a process group too (DeepSpeed's engine and MoE groups require one), on
    127.0.0.1 and a free port, so the single-process path runs the same code. ``timeout_s`` bounds
    every collective; ``heartbeat_timeout_s`` (0: off) bounds how long a dead peer goes unnoticed.
    """
    t0 = time.perf_counter()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launch = launch or launch_env.resolve()
    launch_env.export(launch)
    accel = get_accelerator()
    backend = backend or accel.communication_backend_name()
    if accel.device_name() == "cuda":
        gpu = cuda_device_index(launch.local_rank, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        # NCCL never notices a dead peer by itself: tear the process down when the watchdog sees a
        # timed-out or failed collective instead of leaving it blocked (torch's 1 = TearDown).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        free_memory_from_cuda(accel)  # a GPU named by UUID in CUDA_VISIBLE_DEVICES broke ZeRO's NVML query
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
    skipped = skip_shm_op_build()
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        # env:// reads the five variables just exported; under torchrun it joins the agent's store
        # instead of hosting one on the same port.
        dist.init_process_group(backend, init_method="env://", rank=launch.rank,
                                 world_size=launch.world_size, timeout=timeout)
    # Wraps the group created above (no second rendezvous, no MPI discovery: all five variables
    # are set) so that deepspeed.comm and deepspeed.initialize use it.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                               verbose=False)
    heartbeat = None
    if launch.world_size > 1 and heartbeat_timeout_s > 0:
        heartbeat = Heartbeat.connect(launch.master_addr, launch.master_port, launch.rank,
                                      launch.world_size, heartbeat_timeout_s).start()
    ctx = DistContext(launch=launch, backend=backend, device=device,
                      init_seconds=time.perf_counter() - t0, shm_op_skipped=skipped, heartbeat=heartbeat)
    log.info("distributed: %s backend=%s init %.1fs (shm op %s)", launch.describe(), backend,
             ctx.init_seconds, "skipped" if skipped else "built")
    return ctx


def shutdown(ctx: Optional[DistContext]) -> None:
    """Clean end of a successful run, on every rank: wait for all, stop the heartbeats (so no rank
    mistakes another's exit for a death), wait again, tear the group down."""
    if ctx is None or not dist.is_initialized():
        return
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.heartbeat is not None:
        ctx.heartbeat.stop()
    if ctx.world_size > 1:
        dist.barrier()
    dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a process that ran a process group: everything a normal exit does but tear the interpreter
    down, which can abort a clean run.

    Gloo's worker threads drop a finished collective's tensors a moment after the collective has
    returned, and that needs the GIL. When the moment falls in the interpreter's teardown, Python ends
    the thread there, inside a C++ destructor, and the process aborts: "terminate called without an
    active exception", exit -6 after a run that did everything right (1 in 10 two-rank runs of
    tests/distributed/scripts/trainer_mi_probe.py on a loaded machine; a gdb backtrace showed
    ``pt_gloo_runloop`` in ``~AsyncAllreduceWork`` -> ``take_gil`` -> ``pthread_exit`` while the main
    thread was in ``Py_FinalizeEx``). destroy_process_group does not stop those threads while
    DeepSpeed still holds the groups. So: join our threads and run the exit hooks (loader workers,
    logging, multiprocessing) as a normal exit does, flush, then ``os._exit``."""
    # What the interpreter's exit does before its teardown, in its order: threading's exit hooks (which
    # release idle thread pools) and the joins of non-daemon threads, then the atexit hooks.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone (a pipe whose reader left)
            pass
    os._exit(code)


EXIT_INTERRUPTED = 130
"""Ctrl-C's exit status, as a shell reports a process that SIGINT ended (and as the data tools exit)."""


def run_command(main) -> NoReturn:
    """``end_process(main())`` for a command's ``__main__``, with Ctrl-C answered by one line and exit
    status 130 instead of a traceback through whatever ran (a launcher's Ctrl-C reaches every rank,
    so each stops the same way; the training loop itself turns Ctrl-C into a checkpoint instead)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    end_process(code)


def seed_everything(seed: int, rank: int = 0, per_rank: bool = False) -> int:
    """Seed Python, NumPy and torch. The same seed on every rank by default (identical initial
    weights, identical router noise streams); ``per_rank`` offsets it by the rank, for augmentation.
    Returns the seed used."""
    used = seed + rank if per_rank else seed
    random.seed(used)
    np.random.seed(used % 2**32)
    torch.manual_seed(used)
    return used


def plan_launch(cfg: "RunConfig", ds_config: Optional[dict] = None) -> tuple[LaunchEnv, ParallelDims]:
    """Who this rank is and the validated parallel layout, without any process group: a bad layout
    raises ConfigError here, before a rank can wait for peers."""
    launch = launch_env.resolve()
    return launch, ParallelDims.from_config(cfg, launch.world_size, ds_config)


def setup(cfg: "RunConfig", ds_config: Optional[dict] = None) -> tuple[DistContext, ParallelDims]:
    """Resolve the launch, validate the layout (ConfigError before any process group starts),
    initialise the process group and seed. ``ds_config``: the resolved DeepSpeed dict, if any."""
    launch, dims = plan_launch(cfg, ds_config)
    ctx = init_distributed(launch, timeout_s=cfg.train.dist_timeout_s,
                           heartbeat_timeout_s=cfg.train.heartbeat_timeout_s)
    seed_everything(cfg.seed)
    return ctx, dims
