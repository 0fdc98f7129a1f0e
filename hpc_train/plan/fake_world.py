"""The ranks a plan of sequence parallelism plays, on PyTorch's fake process group.

The fake backend (``torch.testing._internal.distributed.fake_pg``, the tool PyTorch ships for
estimating distributed memory in one process) runs every collective without communicating:
an all-to-all hands back a tensor of the shape the real one would. Under fake tensors that is
all a plan needs, so the run's own sequence-parallel code (DeepSpeed's Ulysses attention, our
vision routing) runs in the planner as it would on each rank, and its memory is measured, not
modelled. The world is made once per process; a process that already has a real one is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from hpc_train.errors import HpcTrainError


@dataclass(frozen=True)
class SequenceGroup:
    """One sequence-parallel group of the fake world, as ``use_sequence_parallel``'s ``mpu``."""

    group: Any

    def get_sequence_parallel_group(self) -> Any:
        return self.group


_GROUPS: dict[int, SequenceGroup] = {}


def sequence_group(world: int, size: int) -> SequenceGroup:
    """A group of ``size`` ranks in a fake world of ``world`` (made on first use)."""
    _join_fake_world(world)
    if size not in _GROUPS:
        _GROUPS[size] = SequenceGroup(dist.new_group(list(range(size))))
    return _GROUPS[size]


def leave_fake_world() -> None:
    """Destroy the fake world (tests; a plan's process simply ends)."""
    if dist.is_initialized() and dist.get_backend() == "fake":
        dist.destroy_process_group()
    _GROUPS.clear()


def _join_fake_world(world: int) -> None:
    if dist.is_initialized():
        if dist.get_backend() != "fake" or dist.get_world_size() != world:
            raise HpcTrainError("a plan of sequence parallelism plays its ranks on a fake process group, and this "
                                f"process already has a {dist.get_backend()} one of {dist.get_world_size()} ranks. "
                                "Fix: run hpc-train plan in a process of its own")
        return
    import deepspeed
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers the "fake" backend)
    from torch._C._distributed_c10d import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    deepspeed.init_distributed(dist_backend="fake")  # DeepSpeed's comm, which its Ulysses attention calls


__all__ = ["SequenceGroup", "leave_fake_world", "sequence_group"]
