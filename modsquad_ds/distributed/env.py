"""Find out how this process was launched and where its rendezvous is.

Every launcher tells a process its rank differently; torch.distributed wants five variables:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. :func:`detect` maps an environment
mapping onto a :class:`LaunchEnv` without touching the process (so every launcher is testable from a
dict); :func:`resolve` adds the one thing a mapping cannot give, the MPI rendezvous over mpi4py; and
:func:`export` writes the five variables so that DeepSpeed's ``init_distributed`` finds them all
and skips its own MPI discovery, which always picks port 29500 (two jobs on one node collide).

Order of precedence, first match wins:

1. ``env``: RANK and WORLD_SIZE already set (torchrun, the ``deepspeed`` launcher, or a user who set
   them by hand). The launcher's name is guessed from the variables each one adds.
2. ``slurm``: a task of an ``srun`` step (SLURM_PROCID and SLURM_STEP_ID). Python started directly in
   the batch shell also has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: it must not wait for N-1
   peers that were never started, so it falls through to ``single``.
3. ``mpi``: ``mpiexec``/``mpirun`` of Open MPI (OMPI_COMM_WORLD_*) or MPICH/Intel MPI (PMI_RANK,
   PMI_SIZE). Rank and size come from the variables; the master address and a free port come from
   rank 0 over mpi4py (:func:`resolve`).
4. ``single``: nothing set; world of one on 127.0.0.1 with a free port.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000
"""srun ports are SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN: below Linux's ephemeral range
(32768-60999) so an outgoing connection never holds it, and distinct for any two jobs whose ids differ
by less than 20000 (two jobs sharing a node are nearly always that close)."""

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The environment names an impossible or incomplete launch; the message says which variable."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: Optional[str]
    """None only for ``mpi`` before :func:`resolve` asks rank 0 over mpi4py."""
    master_port: Optional[int]
    launcher: str
    """single | torchrun | deepspeed | env | slurm | mpi"""

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def as_env(self) -> dict[str, str]:
        if self.master_addr is None or self.master_port is None:
            raise LaunchError(f"{self.launcher} launch has no rendezvous yet: call resolve() first")
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}

    def describe(self) -> str:
        return (f"launcher={self.launcher} rank={self.rank}/{self.world_size} "
                f"local_rank={self.local_rank} master={self.master_addr}:{self.master_port}")


def free_port(host: str = "") -> int:
    """A TCP port nobody listens on right now (the OS picks it); racy only against other pickers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{key}={raw!r} is not an integer") from None


def _check(launch: LaunchEnv, source: str) -> LaunchEnv:
    if launch.world_size < 1:
        raise LaunchError(f"{source}: world size must be >= 1, got {launch.world_size}")
    if not 0 <= launch.rank < launch.world_size:
        raise LaunchError(f"{source}: rank {launch.rank} is outside 0..{launch.world_size - 1}")
    if launch.local_rank < 0:
        raise LaunchError(f"{source}: local rank must be >= 0, got {launch.local_rank}")
    if launch.master_port is not None and not 0 < launch.master_port < 65536:
        raise LaunchError(f"{source}: MASTER_PORT {launch.master_port} is not a TCP port")
    return launch


# ---------------------------------------------------------------------------------------------- slurm

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as ``node[01-04,07],gpu5`` in pure Python.

    Zero padding is kept (``[08-10]`` -> 08, 09, 10) and several bracket groups in one name multiply
    out (``r[1-2]n[1-2]``). :func:`first_host` prefers ``scontrol`` when it is installed.
    """
    hosts: list[str] = []
    items = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)
    if ",".join(items) != nodelist:  # an unclosed bracket or an empty name between commas
        raise LaunchError(f"cannot parse Slurm nodelist {nodelist!r}")
    for item in items:
        hosts.extend(_expand_name(item, nodelist))
    if not hosts:
        raise LaunchError(f"Slurm nodelist {nodelist!r} names no host")
    return hosts


def _expand_name(name: str, nodelist: str) -> list[str]:
    match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not match:
        if "[" in name or "]" in name:
            raise LaunchError(f"cannot parse Slurm nodelist {nodelist!r} (at {name!r})")
        return [name]
    prefix, body, rest = match.groups()
    tails = _expand_name(rest, nodelist)
    out = []
    for part in body.split(","):
        r = _RANGE.match(part)
        if not r:
            raise LaunchError(f"cannot parse Slurm nodelist {nodelist!r} (range {part!r})")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):  # scontrol refuses these too ("Invalid range")
            raise LaunchError(f"cannot parse Slurm nodelist {nodelist!r} (range {part!r} runs backwards)")
        out += [f"{prefix}{n:0{len(lo)}d}{tail}" for n in range(int(lo), int(hi) + 1) for tail in tails]
    return out


def first_host(nodelist: str, scontrol: Optional[str] = None) -> str:
    """First host of a nodelist: ``scontrol show hostnames`` when given, else :func:`expand_nodelist`."""
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol is no reason to fail: the pure parser covers ordinary lists
    return expand_nodelist(nodelist)[0]


def slurm_port(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _detect_slurm(env: Mapping[str, str], scontrol: Optional[str]) -> LaunchEnv:
    # A step may run on a subset of the job's nodes; its rank 0 sits on the step's first node.
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif nodelist:
        addr = first_host(nodelist, scontrol)
    else:
        raise LaunchError("srun task without SLURM_JOB_NODELIST: cannot find rank 0's host")
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    else:
        port = slurm_port(_int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0)
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if world_key not in env:
        raise LaunchError("srun task without SLURM_NTASKS: cannot tell the world size")
    return LaunchEnv(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, world_key),
                     local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                     master_addr=addr, master_port=port, launcher="slurm")


# ------------------------------------------------------------------------------------------------ mpi

_MPI_VARS = (  # (rank, size, local rank) as each MPI family spells them
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
)


def _detect_mpi(env: Mapping[str, str]) -> Optional[LaunchEnv]:
    for rank_key, size_key, local_key in _MPI_VARS:
        if rank_key in env and size_key in env:
            local = _int(env, local_key) if local_key in env else None
            return LaunchEnv(rank=_int(env, rank_key), world_size=_int(env, size_key),
                             local_rank=-1 if local is None else local,  # -1: ask MPI in resolve()
                             master_addr=env.get("MASTER_ADDR"),
                             master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
                             launcher="mpi")
    return None


# -------------------------------------------------------------------------------------------- detect

def _launcher_name(env: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # set by deepspeed.launcher.launch
        return "deepspeed"
    return "env"


def detect(env: Mapping[str, str], *, scontrol: Optional[str] = None,
           port_picker: Callable[[], int] = free_port) -> LaunchEnv:
    """Map an environment onto a :class:`LaunchEnv`; pure apart from ``scontrol`` and ``port_picker``.

    ``mpi`` launches without MASTER_ADDR come back with ``master_addr=None`` (and ``local_rank=-1``
    when the MPI does not export it): :func:`resolve` fills them in.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if world > 1 and (addr is None or port is None):
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
            raise LaunchError(f"RANK and WORLD_SIZE={world} are set but {' and '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not: "
                              "every rank needs the rendezvous address")
        launch = LaunchEnv(rank=_int(env, "RANK"), world_size=world,
                           local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                           master_addr=addr or "127.0.0.1",
                           master_port=int(port) if port is not None else port_picker(),
                           launcher=_launcher_name(env))
        return _check(launch, "RANK/WORLD_SIZE")
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return _check(_detect_slurm(env, scontrol), "srun")
    mpi = _detect_mpi(env)
    if mpi is not None:
        return _check(mpi, "mpiexec") if mpi.local_rank >= 0 else mpi
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                     master_port=port_picker(), launcher="single")


def resolve(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """:func:`detect` on ``os.environ`` (or ``env``), then the MPI rendezvous where one is needed."""
    env = os.environ if env is None else env
    launch = detect(env, scontrol=shutil.which("scontrol"))
    if launch.launcher == "mpi" and (launch.master_addr is None or launch.master_port is None
                                     or launch.local_rank < 0):
        launch = _mpi_rendezvous(launch)
    return launch


def _mpi_rendezvous(launch: LaunchEnv) -> LaunchEnv:
    """Rank 0 picks its address and a free port and broadcasts them; local rank from a shared-memory
    split of COMM_WORLD. Imports mpi4py (MPI_Init) only here: other launchers never pay for it."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise LaunchError(f"launched by mpiexec (rank {launch.rank} of {launch.world_size}) but mpi4py "
                          f"cannot be imported ({err}): set MASTER_ADDR and MASTER_PORT instead") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != launch.world_size or comm.Get_rank() != launch.rank:
        raise LaunchError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()} but the environment "
                          f"says {launch.rank} of {launch.world_size}: mpi4py is linked to another MPI "
                          "than the one that launched this process")
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank() if launch.local_rank < 0 else launch.local_rank
    single_node = comm.allreduce(node.Get_size(), op=MPI.MIN) == comm.Get_size()
    node.Free()
    rendezvous = None
    if comm.Get_rank() == 0:
        # One node: loopback always works, even where the host name resolves to nothing useful.
        addr = launch.master_addr or ("127.0.0.1" if single_node else _routable_address())
        rendezvous = (addr, launch.master_port or free_port())
    addr, port = comm.bcast(rendezvous, root=0)
    return _check(replace(launch, master_addr=addr, master_port=port, local_rank=local_rank), "mpiexec")


def _routable_address() -> str:
    """This host's address as other nodes see it: the source address of a route outwards (no packet
    is sent by a UDP connect), else whatever the host name resolves to."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def export(launch: LaunchEnv, environ: Optional[dict] = None) -> None:
    """Write the five torch.distributed variables (os.environ by default)."""
    (os.environ if environ is None else environ).update(launch.as_env())
