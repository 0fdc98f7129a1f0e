"""The packed run's plan before step 1: every sample's length (measured in shares by the ranks,
cached for later runs), the rows they pack into, and the exact step count."""

from __future__ import annotations

import math
from pathlib import Path

from hpc_train.config import RunConfig
from hpc_train.data.batching.frame_counts import FrameCounts
from hpc_train.data.batching.packing import PlannedPacks, drop_too_long
from hpc_train.data.encoding.lengths import (
    SampleShapes,
    cached_shapes,
    interleaved,
    measure_shapes,
    write_cached_shapes,
)
from hpc_train.data.pipeline import DataPipeline
from hpc_train.data.sources.records import Record
from hpc_train.dist import DistInfo, all_gather, all_reduce_max, say_on_main
from hpc_train.errors import HpcTrainError


def data_ranks(config: RunConfig, info: DistInfo) -> tuple[int, int]:
    """This rank's place among the ranks that read different data, and their number: the
    ranks of one sequence-parallel group read the same micro-batches."""
    size = config.train.sequence_parallel
    return info.rank // size, info.world_size // size


def plan_packing(config: RunConfig, info: DistInfo, pipeline: DataPipeline, records: list[Record]
                  ) -> tuple[PlannedPacks, int, float]:
    """Lengths (measured in shares by the ranks, cached), the plan, and the exact step count."""
    data, train = config.data, config.train
    shapes = _shapes(config, info, pipeline, records)
    lengths = shapes.lengths
    if not pipeline.family.video_as_images:  # LLaVA-OneVision stacks a row's videos
        _refuse_mixed_frame_counts(config, records, shapes)
    if data.truncation == "drop":
        lengths, dropped = drop_too_long(lengths, data.max_seq_len)
        if dropped:
            say_on_main(info, f"packing: {dropped} samples over data.max_seq_len={data.max_seq_len} dropped")
    rank, world = data_ranks(config, info)
    packs = PlannedPacks(lengths, data.max_seq_len, seed=train.seed, rank=rank, world_size=world,
                         rows_per_micro=train.micro_batch_size, grad_accum=train.grad_accum)
    per_epoch = packs.steps_per_epoch()
    if per_epoch == 0:
        raise HpcTrainError("packing made fewer rows than one optimizer step needs. Fix: lower "
                            "train.micro_batch_size / train.grad_accum, or add data")
    plan = packs.plan(0)
    unusable = len(lengths) - len(packs.usable)
    say_on_main(info, f"packing: {len(plan.rows)} rows of {data.max_seq_len} tokens from {len(packs.usable)} samples "
               f"({unusable} unusable), efficiency {100 * plan.efficiency:.1f}%, {per_epoch} optimizer steps per epoch")
    return packs, train.max_steps or max(1, math.ceil(train.epochs * per_epoch)), plan.efficiency


def _shapes(config: RunConfig, info: DistInfo, pipeline: DataPipeline, records: list[Record]) -> SampleShapes:
    """Every sample's shape: from the cache when every rank finds it there; otherwise each rank
    measures every world_size-th record and all gather, so no rank waits in a collective while
    another measures the whole set (long enough, for a large one, to outlast the process
    group's timeout)."""
    encoder, data = pipeline.encoder, config.data
    where = {"cache_dir": Path(config.output_dir) / "lengths", "source": data.train}
    cached = cached_shapes(records, encoder, data, **where)
    if all_reduce_max([float(cached is None)])[0] == 0.0:
        return cached
    mine = range(info.rank, len(records), info.world_size)
    say_on_main(info, f"lengths: measuring {len(records):,} samples, {len(mine):,} per rank (cached for later runs)")
    share = measure_shapes(records, encoder, data, mine,
                           progress=lambda n: say_on_main(info, f"lengths: {n:,}/{len(mine):,} of rank 0's share"))
    shapes = interleaved(all_gather(share))
    if info.is_main:
        write_cached_shapes(shapes, encoder, data, **where)
    return shapes


def _refuse_mixed_frame_counts(config: RunConfig, records: list[Record], shapes: SampleShapes) -> None:
    """Before step 1, not at it: videos that cannot share a packed row."""
    frames = FrameCounts()
    for i, (n, counts) in enumerate(zip(shapes.lengths, shapes.video_frames, strict=True)):
        if 0 <= n <= config.data.max_seq_len:
            frames.add(i, counts)
    error = frames.mixing_error(lambda i: records[i].where, path=config.data.train, packing=True,
                                batch_size=config.train.micro_batch_size)
    if error is not None:
        raise error


__all__ = ["data_ranks", "plan_packing"]
