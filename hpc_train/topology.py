"""Where this process sits in the job, from whichever launcher started it.

Launchers, in the order they are believed (an outer one is often still visible inside an
inner one: ``srun torchrun`` shows SLURM's variables to torchrun's workers):

1. torchrun (``TORCHELASTIC_RUN_ID``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``GROUP_RANK``);
2. an explicit environment (``RANK`` / ``WORLD_SIZE``, as the DeepSpeed launcher sets them);
3. MPI: Open MPI (``OMPI_COMM_WORLD_*``) or MPICH / Intel MPI (``PMI_RANK``, ``PMI_SIZE``,
   ``MPI_LOCALRANKID``), with mpi4py for what the variables do not say (local rank, the
   master address);
4. a SLURM job step (``srun``): ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
   ``SLURM_NODEID``, the first host of ``SLURM_JOB_NODELIST`` as master;
5. nothing: a world of one.

Two launchers that describe the same processes (the same world size) must agree on this
process's rank; if they do not, the job was started twice over and training would hang or
mix ranks, so that is an error naming both.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from hpc_train.errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    node_rank: int = 0
    num_nodes: int = 1
    source: str = "single"
    """Which launcher the topology was read from: torchrun, env, mpi, slurm or single."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}/{self.local_world_size}, "
                f"node {self.node_rank}/{self.num_nodes}), master {self.master_addr}:{self.master_port}, "
                f"from {self.source}")

    def as_env(self) -> dict[str, str]:
        """The variables ``torch.distributed``'s env:// initialisation reads."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port), "GROUP_RANK": str(self.node_rank)}


@dataclass(frozen=True)
class _Reading:
    source: str
    rank: int
    world_size: int
    names: str
    """How the user would recognise it, e.g. ``SLURM_PROCID=1 of SLURM_NTASKS=2``."""


class _Env:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def has(self, *names: str) -> bool:
        return all(self.env.get(n, "") != "" for n in names)

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name, "")
        return value if value != "" else default

    def int(self, name: str, default: int | None = None) -> int:
        raw = self.env.get(name, "")
        if raw == "":
            if default is None:
                raise ConfigError(f"environment variable {name} is not set")
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer. "
                              "Fix: check how the job was launched") from None


def discover(env: Mapping[str, str] | None = None, *,
             hostnames: Callable[[str], list[str]] | None = None,
             mpi: Callable[[], DistInfo] | None = None) -> DistInfo:
    """The topology of this process, from the environment (``os.environ`` by default)."""
    e = _Env(os.environ if env is None else env)
    readings = _readings(e)
    if e.has("TORCHELASTIC_RUN_ID"):
        info = _from_torch_env(e, "torchrun")
    elif e.has("RANK") or e.has("WORLD_SIZE"):
        info = _from_torch_env(e, "env")
    elif "mpi" in readings and not _same(readings.get("slurm"), readings["mpi"]):
        info = (mpi or _mpi_topology)()
        said = readings["mpi"]
        if (info.rank, info.world_size) != (said.rank, said.world_size):
            raise ConfigError(
                f"mpi4py sees rank {info.rank} of {info.world_size}, but the MPI launcher says {said.names}: "
                "mpi4py was built against another MPI than the one that started this job. Fix: load your "
                "MPI, then `pip install --force-reinstall --no-binary mpi4py mpi4py`")
        if "MASTER_ADDR" in e.env or "MASTER_PORT" in e.env:
            info = replace(info, master_addr=e.get("MASTER_ADDR", info.master_addr),
                            master_port=e.int("MASTER_PORT", info.master_port))
    elif "slurm" in readings:
        # also srun's own PMI variables (MpiDefault=pmi2): the step says it all, no MPI needed
        info = _from_slurm(e, hostnames or slurm_hostnames)
    else:
        info = DistInfo()
    _check_agreement(info, readings)
    _check_ranges(info)
    return info


def _same(a: _Reading | None, b: _Reading) -> bool:
    return a is not None and (a.rank, a.world_size) == (b.rank, b.world_size)


def _readings(e: _Env) -> dict[str, _Reading]:
    """What each launcher visible in the environment says about this process."""
    out: dict[str, _Reading] = {}
    if e.has("RANK", "WORLD_SIZE") and not e.has("TORCHELASTIC_RUN_ID"):
        out["env"] = _Reading("env", e.int("RANK"), e.int("WORLD_SIZE"),
                              f"RANK={e.get('RANK')} of WORLD_SIZE={e.get('WORLD_SIZE')}")
    if e.has("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        out["mpi"] = _Reading("mpi", e.int("OMPI_COMM_WORLD_RANK"), e.int("OMPI_COMM_WORLD_SIZE"),
                              f"OMPI_COMM_WORLD_RANK={e.get('OMPI_COMM_WORLD_RANK')} of "
                              f"OMPI_COMM_WORLD_SIZE={e.get('OMPI_COMM_WORLD_SIZE')}")
    elif e.has("PMI_RANK", "PMI_SIZE"):
        out["mpi"] = _Reading("mpi", e.int("PMI_RANK"), e.int("PMI_SIZE"),
                              f"PMI_RANK={e.get('PMI_RANK')} of PMI_SIZE={e.get('PMI_SIZE')}")
    # Only a job step (srun) gives each task its own SLURM_PROCID; a batch script's
    # variables describe the allocation, not this process.
    if e.has("SLURM_STEP_ID", "SLURM_PROCID") and (e.has("SLURM_STEP_NUM_TASKS") or e.has("SLURM_NTASKS")):
        tasks = e.get("SLURM_STEP_NUM_TASKS") and "SLURM_STEP_NUM_TASKS" or "SLURM_NTASKS"
        out["slurm"] = _Reading("slurm", e.int("SLURM_PROCID"), e.int(tasks),
                                f"SLURM_PROCID={e.get('SLURM_PROCID')} of {tasks}={e.get(tasks)}")
    return out


def _from_torch_env(e: _Env, source: str) -> DistInfo:
    if not e.has("RANK", "WORLD_SIZE"):
        missing = " and ".join(n for n in ("RANK", "WORLD_SIZE") if not e.has(n))
        raise ConfigError(f"{missing} is not set while {'RANK' if e.has('RANK') else 'WORLD_SIZE'} is. "
                          "Fix: set both (and LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or launch with "
                          "torchrun, srun or mpirun")
    world = e.int("WORLD_SIZE")
    local_world = e.int("LOCAL_WORLD_SIZE", e.int("LOCAL_SIZE", world))
    rank = e.int("RANK")
    return DistInfo(rank=rank, local_rank=e.int("LOCAL_RANK", rank % max(local_world, 1)), world_size=world,
                    local_world_size=local_world, master_addr=e.get("MASTER_ADDR", "127.0.0.1") or "127.0.0.1",
                    master_port=e.int("MASTER_PORT", DEFAULT_PORT),
                    node_rank=e.int("GROUP_RANK", e.int("CROSS_RANK", rank // max(local_world, 1))),
                    num_nodes=max(1, world // max(local_world, 1)), source=source)


def _from_slurm(e: _Env, hostnames: Callable[[str], list[str]]) -> DistInfo:
    tasks = e.int("SLURM_STEP_NUM_TASKS", e.int("SLURM_NTASKS", 1))
    nodes = e.int("SLURM_STEP_NUM_NODES", e.int("SLURM_NNODES", 1))
    nodelist = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST") or e.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set inside a SLURM job step. Fix: launch with srun")
    hosts = hostnames(nodelist)
    per_node = _tasks_per_node(e.get("SLURM_STEP_TASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE"), nodes)
    node_rank = e.int("SLURM_NODEID", 0)
    job = e.int("SLURM_JOB_ID", 0)
    return DistInfo(rank=e.int("SLURM_PROCID"), local_rank=e.int("SLURM_LOCALID", 0), world_size=tasks,
                    local_world_size=per_node[node_rank] if node_rank < len(per_node) else 1,
                    master_addr=e.get("MASTER_ADDR") or hosts[0],
                    master_port=e.int("MASTER_PORT", slurm_port(job)), node_rank=node_rank, num_nodes=nodes,
                    source="slurm")


def slurm_port(job_id: int) -> int:
    """A port for the job's rendezvous: jobs sharing a node get different ones, all of them below
    Linux's ephemeral range (32768-60999), from which connections take their local ports."""
    return 10000 + job_id % 20000 if job_id else DEFAULT_PORT


def _tasks_per_node(spec: str | None, nodes: int) -> list[int]:
    """``2(x3),1`` → [2, 2, 2, 1] (SLURM's compressed tasks-per-node)."""
    if not spec:
        return [1] * nodes
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ConfigError(f"cannot read SLURM tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_hostnames(nodelist: str) -> list[str]:
    """The host names of a SLURM node list, by ``scontrol show hostnames`` (SLURM's own
    expansion), or by our own reading of the bracket syntax where scontrol is missing."""
    if shutil.which("scontrol"):
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              timeout=30)
        if done.returncode == 0 and done.stdout.split():
            return done.stdout.split()
    return expand_nodelist(nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[01-03,7],rack[1-2]-gpu[1-2]`` → node01 node02 node03 node7 rack1-gpu1 ... rack2-gpu2."""
    names: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            if nodelist[start:i]:
                names += _expand_one(nodelist[start:i])
            start = i + 1
    return names


def _expand_one(pattern: str) -> list[str]:
    opened = pattern.find("[")
    if opened < 0:
        return [pattern]
    closed = pattern.index("]", opened)
    head, ranges, rest = pattern[:opened], pattern[opened + 1:closed], pattern[closed + 1:]
    out = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        for n in range(int(low), int(high or low) + 1):
            out += [f"{head}{str(n).zfill(len(low))}{tail}" for tail in _expand_one(rest)]
    return out


def _mpi_topology() -> DistInfo:
    """Rank, size, local rank and a master address from MPI itself (mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(f"this process was started by mpirun, but mpi4py cannot be imported ({exc}). "
                          "Fix: pip install mpi4py against your MPI (module load openmpi first), or "
                          "launch with torchrun / srun") from None
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    host = socket.gethostname()
    hosts = world.allgather(host)
    order = list(dict.fromkeys(hosts))  # nodes numbered in the order of their first rank
    master = world.bcast((host, free_port()) if world.Get_rank() == 0 else None, root=0)
    info = DistInfo(rank=world.Get_rank(), local_rank=local.Get_rank(), world_size=world.Get_size(),
                    local_world_size=local.Get_size(), master_addr=master[0], master_port=master[1],
                    node_rank=order.index(host), num_nodes=len(order), source="mpi")
    local.Free()
    return info


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous this process will host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def _check_agreement(info: DistInfo, readings: Mapping[str, _Reading]) -> None:
    env, slurm = readings.get("env"), readings.get("slurm")
    if info.source == "env" and env is not None:
        # Each srun task is one process: an explicit environment inside a step describes the
        # same processes (a launcher that starts several per task would set more, not fewer).
        for other in (slurm, readings.get("mpi")):
            if other is None:
                continue
            if (other.world_size == env.world_size and other.rank != env.rank) or (
                    other.source == "slurm" and env.world_size < other.world_size):
                raise ConfigError(
                    f"the launchers disagree about this process: the environment says {env.names}, "
                    f"{other.source} says {other.names}. Fix: start each process once, with one launcher "
                    "(e.g. `srun python -m hpc_train ...`, `srun --ntasks-per-node=1 launch/torchrun.sh ...`, "
                    "or `mpirun ...`), and do not export RANK / WORLD_SIZE into the job by hand")
    # MPI beside a SLURM step is not compared: mpirun's daemons run as a step of their own,
    # so its ranks inherit the daemon's SLURM_PROCID (a node index), not a rank.


def _check_ranges(info: DistInfo) -> None:
    if not 0 <= info.rank < info.world_size:
        raise ConfigError(f"rank {info.rank} is outside world size {info.world_size} ({info.source}). "
                          "Fix: check the launcher's variables")
    if not 0 <= info.local_rank < max(info.local_world_size, 1):
        raise ConfigError(f"local rank {info.local_rank} is outside local world size {info.local_world_size} "
                          f"({info.source}). Fix: check the launcher's variables")
