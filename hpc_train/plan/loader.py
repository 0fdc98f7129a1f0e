"""Can the run's loader keep its GPU fed? Measured on this machine before the run: the planned
micro-batch's own samples go through the whole sample path (decode, processor, tokens and
labels, collation) on one core, against the GPU's time for that micro-batch from the step
time; the headroom is what the run's DataLoader workers deliver over what the GPU consumes
(1.0 and up: the GPU never waits for data). When the micro-batch has videos the run does not
read prepared, the same samples are also timed from a store prepared here, so the plan can say
what ``hpc-train prepare-media`` would change.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

from hpc_train.config import DataConfig
from hpc_train.data.media import load_video, video_sampling
from hpc_train.data.pipeline import build_pipeline
from hpc_train.data.prepared_media import PreparedMedia
from hpc_train.data.records import Record
from hpc_train.models.families import Family


@dataclass(frozen=True)
class LoaderTime:
    seconds: float
    """One core's time for the micro-batch's samples, as the run reads them."""
    prepared_seconds: float | None
    """The same with its videos prepared (``None``: it has none the run decodes)."""
    workers: int
    """``data.num_workers``: processes loading in parallel (0: the training process itself)."""
    videos: int

    def headroom(self, gpu_seconds: float, seconds: float | None = None) -> float:
        """What the workers deliver over what the GPU consumes, for a micro-batch the GPU runs in
        ``gpu_seconds``; without workers the training process loads between steps."""
        load = self.seconds if seconds is None else seconds
        if load <= 0:
            return float("inf")
        return (self.workers or 1) * gpu_seconds / load


def _timed(data: DataConfig, processor: Any, family: Family, records: list[Record]) -> float:
    pipeline = build_pipeline(data, processor, family)
    dataset, collate = pipeline.dataset(records), pipeline.collator()
    dataset[0]  # the processor's first call pays for imports and caches
    started = time.perf_counter()
    collate([dataset[i] for i in range(len(records))])
    return time.perf_counter() - started


def loader_time(data: DataConfig, processor: Any, family: Family, records: list[Record]) -> LoaderTime:
    """Time ``records`` (the planned micro-batch) through the run's sample path on one core."""
    seconds = _timed(data, processor, family, records)
    videos = sum(len(r.videos) for r in records)
    prepared = None
    if videos and data.prepared_media is None:
        with tempfile.TemporaryDirectory(prefix="hpc-train-plan-media-") as folder:
            ready = data.model_copy(update={"prepared_media": folder})
            store, sampling = PreparedMedia(folder, ready, processor, family), video_sampling(data.video)
            for record in records:
                for path in record.videos:
                    store.save(path, record.video_clip, load_video(path, sampling, clip=record.video_clip))
            prepared = _timed(ready, processor, family, records)
    return LoaderTime(seconds=seconds, prepared_seconds=prepared, workers=data.num_workers, videos=videos)


def describe_loader(loader: LoaderTime, gpu_seconds: tuple[float, float]) -> list[str]:
    """The plan's lines about the loader, for a micro-batch the GPU runs in ``gpu_seconds``
    (fast, slow)."""
    fast, slow = gpu_seconds
    who = f"data.num_workers={loader.workers}" if loader.workers else "no workers (the training process loads)"
    low, high = loader.headroom(fast), loader.headroom(slow)
    lines = [f"loader: this micro-batch takes {loader.seconds:.2f} s on one core to load (decode, process, encode), "
             f"the GPU {fast:.3g}-{slow:.3g} s: with {who}, headroom {low:.2f}-{high:.2f} (1.0 and up: the GPU "
             "never waits for data)"]
    if loader.prepared_seconds is not None:
        lines.append(f"  with its {loader.videos} video(s) prepared (hpc-train prepare-media): "
                     f"{loader.prepared_seconds:.2f} s, headroom {loader.headroom(fast, loader.prepared_seconds):.2f}-"
                     f"{loader.headroom(slow, loader.prepared_seconds):.2f}")
    if low < 1.0:
        lines.append("  the GPU will wait for data. Fix: "
                     + ("prepare the videos (hpc-train prepare-media, data.prepared_media), " if loader.prepared_seconds
                        is not None else "")
                     + "more CPUs per GPU with more data.num_workers (sbatch --cpus-per-task), or, with a frozen "
                     "tower, data.vision_cache (from the second epoch)")
    return lines


__all__ = ["LoaderTime", "describe_loader", "loader_time"]
