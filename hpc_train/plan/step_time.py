"""Step time from model FLOPs against the GPU's datasheet peak, as a range of efficiencies."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpc_train.config import RunConfig
from hpc_train.data.decoding.media_share import grid_shares
from hpc_train.models.media_keys import MEDIA_GRIDS
from hpc_train.plan.gpus import Gpu
from hpc_train.plan.worst_batch import PlannedBatch
from profiling.flops import ModelShape, Trainability, VisionWork, step_flops

EFFICIENCY = (0.15, 0.40)
"""Model FLOPs utilisation assumed: small vision-language models with DeepSpeed reach 15-40% of
the dense peak (short rows, many small kernels, communication), the range every time is given for."""
STARTUP_S = 600
"""Loading, DeepSpeed's setup, measuring lengths and the first checkpoint: allowed once per job."""
SLURM_MARGIN = 1.25


@dataclass(frozen=True)
class StepTime:
    flops_per_step: float
    """Per rank, every micro-batch as hungry as the planned one (an upper bound for mixed data)."""
    tokens_per_step: int
    seconds: tuple[float, float]
    """(fast, slow) seconds per optimizer step, at the high and the low efficiency."""
    steps: int
    peak_tflops: float

    @property
    def tokens_per_second(self) -> tuple[float, float]:
        return self.tokens_per_step / self.seconds[1], self.tokens_per_step / self.seconds[0]

    @property
    def run_seconds(self) -> tuple[float, float]:
        return self.steps * self.seconds[0] + STARTUP_S, self.steps * self.seconds[1] + STARTUP_S

    def slurm_time(self) -> str:
        """``--time`` for the run: the slow end plus a quarter, in whole quarter hours."""
        minutes = math.ceil(self.run_seconds[1] * SLURM_MARGIN / 60 / 15) * 15
        return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def step_time(config: RunConfig, shape: ModelShape, trainability: Trainability, batch: PlannedBatch, gpu: Gpu,
              *, dtype: str, steps: int) -> StepTime | None:
    """The planned step's time on ``gpu`` (None when its peak rate is unknown)."""
    peak = gpu.peak_tflops(dtype)
    if peak is None:
        return None
    samples = len(batch.batch.get("sample_ids", ())) or config.train.micro_batch_size
    size = config.train.sequence_parallel  # a rank's share of the group's micro-batch
    vision = hungriest_share(batch, size)
    micro = step_flops(shape, trainability, tokens=-(-batch.tokens // size), samples=samples,
                       images=vision.images or -(-batch.tiles // size), context=batch.tokens / samples,
                       vision_rows=vision.rows, vision_pairs=vision.pairs).total
    accum = config.train.grad_accum
    flops = micro * accum
    seconds = (flops / (peak * 1e12 * EFFICIENCY[1]), flops / (peak * 1e12 * EFFICIENCY[0]))
    return StepTime(flops_per_step=flops, tokens_per_step=-(-batch.tokens // size) * accum, seconds=seconds, steps=steps,
                    peak_tflops=peak)


def hungriest_share(batch: PlannedBatch, size: int) -> VisionWork:
    """A grid tower's work on the rank of a sequence-parallel group of ``size`` that encodes the
    most patch rows (whole images go to one rank each, video frames in even shares), or none."""
    if not batch.vision.rows or size == 1:
        return batch.vision
    ranks = [VisionWork() for _ in range(size)]
    for kind, (_, grid_key) in MEDIA_GRIDS.items():
        if grid_key in batch.batch:
            shares = grid_shares(batch.batch[grid_key].tolist(), size, by_frame=kind == "video")
            for rank, mine in enumerate(shares):
                ranks[rank] += VisionWork(images=sum(f for _, _, f, _ in mine), rows=sum(f * hw for _, _, f, hw in mine),
                                          pairs=sum(f * hw * hw for _, _, f, hw in mine))
    return max(ranks, key=lambda work: work.rows)

