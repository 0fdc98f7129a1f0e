"""Who am I in the job: rank, world size, and the process group.

Reads what torchrun and the DeepSpeed launcher export (RANK, LOCAL_RANK, WORLD_SIZE, ...).
A plain ``python`` run is a world of one and needs no process group.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpc_train.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def read_dist_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """The topology the launcher exported, checked for consistency."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer. "
                              "Fix: launch with torchrun or the DeepSpeed launcher") from None

    world = number("WORLD_SIZE", 1)
    rank = number("RANK", 0)
    local_rank = number("LOCAL_RANK", 0)
    local_world = number("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}. Fix: check the launcher's variables")
    if not 0 <= local_rank < max(local_world, 1):
        raise ConfigError(f"LOCAL_RANK={local_rank} is outside LOCAL_WORLD_SIZE={local_world}. "
                          "Fix: check the launcher's variables")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                    master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                    master_port=number("MASTER_PORT", 29500))


def device_for(info: DistInfo) -> torch.device:
    """This rank's GPU, or the CPU when there is none."""
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(info: DistInfo, *, timeout_s: float = 1800) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs).

    A world of one gets a group of its own too: DeepSpeed would otherwise look for MPI to
    discover the topology, and fail where no MPI library is installed.
    """
    if dist.is_initialized():
        return
    import deepspeed

    if not info.distributed:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks (a flag raised on any rank is raised on all)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def _all_reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
