"""Which samples each rank sees, in which order, and how many optimizer steps that makes.

The order of an epoch is a pure function of (seed, epoch), so a resumed run can jump to
any position and see exactly the samples the uninterrupted run would have seen. Every rank
gets the same number of micro-batches (the tail that does not fill a whole optimizer step
on every rank is left out), so no rank waits on a collective another never joins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from hpc_train.errors import ConfigError


def micro_batches_per_epoch(num_samples: int, *, micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Micro-batches each rank runs per epoch (a whole number of optimizer steps)."""
    per_rank = num_samples // (micro_batch * world_size)
    return (per_rank // grad_accum) * grad_accum


def steps_per_epoch(num_samples: int, *, micro_batch: int, world_size: int, grad_accum: int) -> int:
    return micro_batches_per_epoch(num_samples, micro_batch=micro_batch, world_size=world_size,
                                   grad_accum=grad_accum) // grad_accum


def total_steps(num_samples: int, *, micro_batch: int, world_size: int, grad_accum: int,
                epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the whole run, known before it starts."""
    per_epoch = steps_per_epoch(num_samples, micro_batch=micro_batch, world_size=world_size,
                                grad_accum=grad_accum)
    if per_epoch == 0:
        need = micro_batch * world_size * grad_accum
        raise ConfigError(
            f"the training set has {num_samples} samples, fewer than one optimizer step needs "
            f"(micro_batch {micro_batch} x world {world_size} x grad_accum {grad_accum} = {need}). "
            "Fix: lower train.micro_batch_size or train.grad_accum, or add data")
    if max_steps is not None:
        return max_steps
    return max(1, math.ceil(epochs * per_epoch))


def rank_micro_batches(num_samples: int, *, epoch: int, seed: int, rank: int, world_size: int,
                       micro_batch: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of sample indices for ``epoch``, in order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples)
    count = micro_batches_per_epoch(num_samples, micro_batch=micro_batch, world_size=world_size,
                                    grad_accum=grad_accum)
    used = order[: count * micro_batch * world_size].reshape(count, world_size, micro_batch)
    return [batch.tolist() for batch in used[:, rank, :]]


class PlannedBatches:
    """A batch sampler over this rank's micro-batches, starting at a settable position.

    One DataLoader (with persistent workers) serves the whole run; before each pass the
    loop sets ``position`` to (epoch, next micro-batch), and iteration yields the rest of
    that epoch.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int, world_size: int, micro_batch: int,
                 grad_accum: int) -> None:
        self.num_samples = num_samples
        self.kwargs = {"seed": seed, "rank": rank, "world_size": world_size,
                       "micro_batch": micro_batch, "grad_accum": grad_accum}
        self.position = (0, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = self.position
        yield from rank_micro_batches(self.num_samples, epoch=epoch, **self.kwargs)[start:]

    def __len__(self) -> int:
        return micro_batches_per_epoch(self.num_samples, micro_batch=self.kwargs["micro_batch"],
                                       world_size=self.kwargs["world_size"],
                                       grad_accum=self.kwargs["grad_accum"]) - self.position[1]
