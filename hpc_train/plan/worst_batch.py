"""The micro-batch of the run's own data that needs the most memory: padded, the longest samples
that fit ``data.max_seq_len``; packed, the planned row with the most real tokens (every row
has ``micro_batch x max_seq_len`` slots, so its media decide)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hpc_train.config import RunConfig
from hpc_train.data.batching.packing import PlannedPacks, drop_too_long
from hpc_train.data.encoding.lengths import SampleShapes, cached_shapes, measure_shapes
from hpc_train.data.encoding.tokenize import EncodedSample
from hpc_train.data.pipeline import DataPipeline
from hpc_train.data.sources.records import Record
from hpc_train.errors import HpcTrainError
from hpc_train.models.media_keys import MEDIA_GRIDS
from profiling.flops import VisionWork, grid_work


@dataclass(frozen=True)
class PlannedBatch:
    """A real collated micro-batch and what it is."""

    batch: dict[str, Any]
    indices: list[int]
    """Records in it."""
    tokens: int
    """Language-model positions (padding included)."""
    real_tokens: int
    tiles: int
    """Images, frames and tiles the vision tower encodes."""
    vision: VisionWork = VisionWork()
    """A grid tower's patch rows and segments (LLaVA-OneVision-1.5; none counted for the others)."""


def run_shapes(config: RunConfig, pipeline: DataPipeline, records: Sequence[Record]) -> SampleShapes:
    """Every record's length and frames: the run's cache when it has one, else measured (without
    decoding pixels)."""
    from pathlib import Path

    data = config.data
    cached = cached_shapes(records, pipeline.encoder, data, cache_dir=Path(config.output_dir) / "lengths",
                           source=data.train)
    return cached if cached is not None else measure_shapes(records, pipeline.encoder, data, range(len(records)))


def worst_batch(config: RunConfig, pipeline: DataPipeline, records: Sequence[Record], lengths: Sequence[int],
                indices: Sequence[int] | None = None) -> PlannedBatch:
    """The run's hungriest micro-batch (or the one of ``indices``, re-encoded under ``config``)."""
    data, micro = config.data, config.train.micro_batch_size
    if indices is None:
        indices = _packed_worst(config, lengths) if data.packing else _padded_worst(lengths, data.max_seq_len, micro)
    dataset = pipeline.dataset(records)
    samples = [dataset[i] for i in indices]
    usable = [s for s in samples if isinstance(s, EncodedSample)]
    if not usable:
        raise HpcTrainError(f"{data.train}: none of the longest samples can be encoded under this config "
                            "(see hpc-train check-data). Fix: the data or data.max_seq_len")
    collate = pipeline.packed_collator(rows_per_micro=micro) if data.packing else pipeline.collator()
    batch = collate(usable)
    ids = batch["input_ids"]
    return PlannedBatch(batch=batch, indices=list(indices), tokens=ids.numel(),
                        real_tokens=sum(len(s) for s in usable), tiles=_tiles(batch), vision=_grid_work(batch))


def _padded_worst(lengths: Sequence[int], max_seq_len: int, micro: int) -> list[int]:
    fitting = sorted((i for i, n in enumerate(lengths) if 0 <= n <= max_seq_len), key=lambda i: -lengths[i])
    if not fitting:
        raise HpcTrainError(f"no sample fits data.max_seq_len={max_seq_len}. Fix: raise data.max_seq_len "
                            "(hpc-train check-data lists the lengths)")
    return fitting[:micro]


def _packed_worst(config: RunConfig, lengths: Sequence[int]) -> list[int]:
    data, train = config.data, config.train
    kept, _ = drop_too_long(list(lengths), data.max_seq_len)
    packs = PlannedPacks(kept, data.max_seq_len, seed=train.seed, rank=0, world_size=1,
                         rows_per_micro=train.micro_batch_size, grad_accum=1)
    micro_batches = packs.micro_batches(0)
    if not micro_batches:
        raise HpcTrainError(f"packing made no row of data.max_seq_len={data.max_seq_len} tokens. Fix: raise "
                            "data.max_seq_len or add data")
    return max(micro_batches, key=lambda group: sum(lengths[i] for i in group))


def _grid_work(batch: dict[str, Any]) -> VisionWork:
    grids = [batch[key] for _, key in MEDIA_GRIDS.values() if key in batch]
    return sum((grid_work(grid) for grid in grids), VisionWork())


def _tiles(batch: dict[str, Any]) -> int:
    """Images, tiles and frames in the batch (all-zero padding slots left out)."""
    if any(key in batch for _, key in MEDIA_GRIDS.values()):  # patch rows: the grids count the items
        return _grid_work(batch).images
    total = 0
    for key in ("pixel_values", "pixel_values_videos"):
        pixels = batch.get(key)
        if isinstance(pixels, torch.Tensor):
            slices = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels
            total += int(slices.flatten(1).ne(0).any(dim=1).sum())
    return total
