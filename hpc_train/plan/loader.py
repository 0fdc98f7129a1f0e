"""Can the run's loader keep its GPU fed? Measured on this machine before the run: the planned
micro-batch's own samples go through the whole sample path (decode, processor, tokens and
labels, collation) on one core, against the GPU's time for that micro-batch from the step
time; the headroom is what the run's DataLoader workers deliver over what the GPU consumes
(1.0 and up: the GPU never waits for data). When the micro-batch has videos the run does not
read prepared, the same samples are timed again from a store filled with the frames the first
timing decoded, so the plan can say what ``hpc-train prepare-media`` would change.

Workers beyond the CPUs a GPU has do not load faster: inside a SLURM job the node's CPUs
(``SLURM_CPUS_ON_NODE``) over its GPUs bound the workers that count.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_train.config import DataConfig
from hpc_train.data.caches.prepared_media import PreparedMedia
from hpc_train.data.decoding.media import VideoFrames
from hpc_train.data.pipeline import DataPipeline, build_pipeline
from hpc_train.data.sources.records import Record
from hpc_train.data.video_on_device import DeferredSample
from hpc_train.models.families import Family

BUDGET_S = 20.0
"""One core's time spent timing samples; the rest of the micro-batch is estimated from those
timed (a 32-frame sample of a 1080p episode decodes in 5-17 s)."""


@dataclass(frozen=True)
class LoaderTime:
    seconds: float
    """One core's time for the micro-batch's samples, as the run reads them."""
    prepared_seconds: float | None
    """The same with its videos prepared (``None``: it has none the run decodes)."""
    workers: int
    """``data.num_workers``: processes loading in parallel (0: the training process itself)."""
    videos: int
    samples: int = 1
    """Samples in the micro-batch."""
    timed: int = 1
    """Of those, the ones timed (the others estimated from them)."""
    cpus_per_gpu: int | None = None
    """The job's CPUs per GPU (``None``: not in a SLURM job)."""
    on_gpu: bool = False
    """Its videos are decoded by the GPU (``data.video.device=cuda``): timed without them."""

    @property
    def loaders(self) -> int:
        """Processes that load at once: the workers, as many as the GPU's CPUs leave room for
        beside its rank (the training process itself without workers)."""
        if not self.workers:
            return 1
        return self.workers if self.cpus_per_gpu is None else max(1, min(self.workers, self.cpus_per_gpu - 1))

    def headroom(self, gpu_seconds: float, seconds: float | None = None) -> float:
        """What the loaders deliver over what the GPU consumes, for a micro-batch the GPU runs in
        ``gpu_seconds``."""
        load = self.seconds if seconds is None else seconds
        return float("inf") if load <= 0 else self.loaders * gpu_seconds / load


def job_cpus_per_gpu(gpus_per_node: int) -> int | None:
    """CPUs per GPU of the SLURM job this runs in (its node's CPUs over the GPUs it plans for)."""
    cpus = os.environ.get("SLURM_CPUS_ON_NODE", "")
    if not os.environ.get("SLURM_JOB_ID") or not cpus.isdigit():
        return None
    return max(1, int(cpus) // max(1, gpus_per_node))


class _Keep:
    """Stores each video the decoding pass decodes, for the prepared pass; its time is left out."""

    def __init__(self, store: PreparedMedia | None) -> None:
        self.store, self.seconds = store, 0.0

    def __call__(self, path: Path, clip: tuple[float, float] | None, frames: VideoFrames) -> None:
        if self.store is not None:
            started = time.perf_counter()
            self.store.save(path, clip, frames)
            self.seconds += time.perf_counter() - started


def _per_sample(pipeline: DataPipeline, records: list[Record], keep: _Keep | None = None) -> tuple[float, int]:
    """One core's seconds per sample and how many were timed: the first sample warms the
    processor untimed, the others are timed until :data:`BUDGET_S` is spent."""
    # with data.video.device=cuda, the workers' part: stand-in frames (the GPU decodes)
    dataset = pipeline.dataset(records, defer_videos=pipeline.data.video.device == "cuda")
    collate = pipeline.collator()
    pipeline.media.on_decoded = keep
    dataset[0]  # the processor's first call pays for imports and caches
    kept_before = keep.seconds if keep is not None else 0.0
    encoded, started = [], time.perf_counter()
    for i in range(1, len(records)) if len(records) > 1 else [0]:
        item = dataset[i]
        encoded.append(item.sample if isinstance(item, DeferredSample) else item)
        if time.perf_counter() - started > BUDGET_S:
            break
    collate(encoded)
    kept = (keep.seconds if keep is not None else 0.0) - kept_before
    return (time.perf_counter() - started - kept) / len(encoded), len(encoded)


def loader_time(data: DataConfig, processor: Any, family: Family, records: list[Record],
                gpus_per_node: int = 1) -> LoaderTime:
    """Time ``records`` (the planned micro-batch) through the run's sample path on one core."""
    videos = sum(len(r.videos) for r in records)
    cpus = job_cpus_per_gpu(gpus_per_node)
    common = {"workers": data.num_workers, "videos": videos, "samples": len(records), "cpus_per_gpu": cpus,
              "on_gpu": data.video.device == "cuda"}
    if not videos or data.prepared_media is not None or data.video.device == "cuda":
        each, timed = _per_sample(build_pipeline(data, processor, family), records)
        return LoaderTime(seconds=each * len(records), prepared_seconds=None, timed=timed, **common)
    with tempfile.TemporaryDirectory(prefix="hpc-train-plan-media-") as folder:
        ready = data.model_copy(update={"prepared_media": folder})
        keep = _Keep(PreparedMedia(folder, ready, processor, family))
        each, timed = _per_sample(build_pipeline(data, processor, family), records, keep)
        # the same samples (the warm-up's and those timed), now read from the store
        prepared, _ = _per_sample(build_pipeline(ready, processor, family), records[:timed + (len(records) > 1)])
    return LoaderTime(seconds=each * len(records), prepared_seconds=prepared * len(records), timed=timed, **common)


def describe_loader(loader: LoaderTime, gpu_seconds: tuple[float, float]) -> list[str]:
    """The plan's lines about the loader, for a micro-batch the GPU runs in ``gpu_seconds``
    (fast, slow)."""
    fast, slow = gpu_seconds
    low, high = loader.headroom(fast), loader.headroom(slow)
    timed = "" if loader.timed >= loader.samples else f" (timed on {loader.timed} of its {loader.samples} samples)"
    what = "process and encode; its videos decoded by the GPU, not timed" if loader.on_gpu else \
        "decode, process, encode"
    lines = [f"loader: this micro-batch takes {loader.seconds:.2f} s on one core to load ({what})"
             f"{timed}, the GPU {fast:.3g}-{slow:.3g} s: {_loaders(loader)}, headroom {low:.2f}-{high:.2f} "
             "(1.0 and up: the GPU never waits for data)"]
    if loader.prepared_seconds is not None:
        lines.append(f"  with its {loader.videos} video(s) prepared (hpc-train prepare-media): "
                     f"{loader.prepared_seconds:.2f} s, headroom {loader.headroom(fast, loader.prepared_seconds):.2f}-"
                     f"{loader.headroom(slow, loader.prepared_seconds):.2f}")
    if low < 1.0:
        needed = math.ceil(loader.seconds / fast)
        fixes = ["prepare the videos (hpc-train prepare-media, data.prepared_media)"] \
            if loader.prepared_seconds is not None else []
        fixes += [f"{needed} loading workers per GPU (data.num_workers={needed}, with {needed + 1} CPUs per GPU: "
                  "sbatch --cpus-per-task)", "with a frozen tower, data.vision_cache (from the second epoch)"]
        lines.append("  the GPU will wait for data. Fix: " + ", or ".join(fixes))
    return lines


def _loaders(loader: LoaderTime) -> str:
    if not loader.workers:
        return "no workers (the training process loads)"
    if loader.cpus_per_gpu is None:
        return f"data.num_workers={loader.workers}"
    if loader.loaders < loader.workers:
        return (f"data.num_workers={loader.workers}, of which {loader.loaders} load at once on the job's "
                f"{loader.cpus_per_gpu} CPUs per GPU (one runs the rank)")
    return f"data.num_workers={loader.workers} on the job's {loader.cpus_per_gpu} CPUs per GPU"


__all__ = ["LoaderTime", "describe_loader", "job_cpus_per_gpu", "loader_time"]
