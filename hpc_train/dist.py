"""The process group: joined from the topology the launcher gave (torchrun, the DeepSpeed
launcher, srun or mpirun), and the few collectives the loop needs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from hpc_train.extensions import skip_shared_memory_comm
from hpc_train.lost_ranks import start_beating
from hpc_train.topology import DistInfo, discover

joined = False
"""Whether this process has joined a process group (see :func:`hpc_train.cli.entry`)."""


def read_dist_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """This process's topology, from whichever launcher started it (see :mod:`hpc_train.topology`)."""
    return discover(env)


def init_distributed(info: DistInfo, device: torch.device, *, timeout_s: float = 1800) -> None:
    """Join the process group: NCCL for a rank on a GPU (``device``, bound before by
    :func:`hpc_train.device.choose_device`), gloo on the CPU.

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
        # Port 0: the store binds one of its own. Nothing else joins a world of one, and a port
        # found free beforehand can be taken by another process before the store listens.
        os.environ.setdefault("MASTER_PORT", "0")
    elif info.source in ("slurm", "mpi"):
        # torch's env:// rendezvous (and DeepSpeed's) reads these; srun and mpirun do not set them.
        os.environ.update(info.as_env())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo":
        skip_shared_memory_comm()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    global joined
    joined = True
    start_beating(dist.get_rank(), dist.get_world_size())  # so that a survivor can name a lost rank


def collective_timeout_s() -> float | None:
    """The timeout the joined process group really has (NCCL's or gloo's options), or None."""
    if not dist.is_initialized():
        return None
    group = dist.group.WORLD
    for device in ("cuda", "cpu"):
        try:
            return group._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (RuntimeError, AttributeError, ValueError):
            continue
    return None


def say_on_main(info: DistInfo, text: str) -> None:
    """Print ``text`` on rank 0 only (a run's progress lines, said once)."""
    if info.is_main:
        print(text, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks (a flag raised on any rank is raised on all)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def sum_over_ranks(device_values: torch.Tensor, host_values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a 1-D device tensor followed by host numbers: one
    collective and one read of the device, whatever the lengths."""
    device = _comm_device() if dist.is_initialized() else device_values.device
    return _reduced(torch.cat([device_values.to(device, torch.float64),
                               torch.tensor(host_values, dtype=torch.float64).to(device, non_blocking=True)]),
                    dist.ReduceOp.SUM)


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _all_reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    return _reduced(torch.tensor(values, dtype=torch.float64, device=_comm_device()), op)


def _reduced(t: torch.Tensor, op: dist.ReduceOp) -> list[float]:
    """``t`` reduced over ranks in place (as it is without a process group), read once."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
