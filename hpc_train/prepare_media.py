"""``hpc-train prepare-media CONFIG``: decode a run's videos once, into ``data.prepared_media``.

Every video of the training and evaluation sets (each file and clip once) is decoded as the run
will sample it, resized as its processor first resizes it (see
:mod:`hpc_train.data.caches.prepared_media`), and stored. No model is loaded and no GPU is used: the
processor alone says how frames are resized, so CPU nodes can do it ahead of the training job.
The work splits over processes without talking to each other: a shard is every ``n``-th video
(``--shard i/n``, else the SLURM array task or the srun task this process is), and each shard
decodes in ``--workers`` processes. Videos already stored are skipped, so an interrupted run
continues where it stopped; it says how far it got every 30 s and, at the end, what it stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from hpc_train.config import RunConfig
from hpc_train.data.caches.prepared_media import PreparedMedia
from hpc_train.data.decoding.media import VideoSampling, load_video, video_sampling
from hpc_train.data.sources.mixture import read_split
from hpc_train.errors import ConfigError, HpcTrainError
from hpc_train.models.families import get_family
from hpc_train.models.load import load_processor, with_family

_PROGRESS_S = 30.0
Video = tuple[Path, tuple[float, float] | None]


@dataclass
class Preparation:
    """What one shard of ``prepare-media`` did."""

    shard: tuple[int, int]
    videos: int = 0
    """This shard's videos (distinct file and clip)."""
    already: int = 0
    stored: int = 0
    bytes_stored: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self, root: str) -> str:
        index, count = self.shard
        rate = self.stored / self.seconds if self.seconds > 0 else 0.0
        failed = (f"; {len(self.failed)} failed (the run tries them itself): "
                  + "; ".join(self.failed[:3]) + (" ..." if len(self.failed) > 3 else "")) if self.failed else ""
        return (f"prepare-media: shard {index + 1} of {count}: {self.videos} videos: {self.stored} decoded and stored "
                f"({self.bytes_stored / 2**20:.1f} MiB, {rate:.2f} videos/s), {self.already} already in {root}"
                f"{failed}; {self.seconds:.0f} s")


def shard_of(env: Mapping[str, str], asked: str | None = None) -> tuple[int, int]:
    """``(index, count)`` of this process's share: ``--shard i/n`` (1-based ``i``), else its SLURM
    array task, else its task of an ``srun`` step, else the whole."""
    if asked:
        try:
            index, count = (int(part) for part in asked.split("/"))
        except ValueError:
            index, count = 0, 0
        if not 1 <= index <= count:
            raise ConfigError(f"--shard {asked}: expected i/n with 1 <= i <= n (e.g. --shard 2/8)")
        return index - 1, count
    if env.get("SLURM_ARRAY_TASK_COUNT"):
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # a task of srun's (not a batch or salloc shell)
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    return 0, 1


def run_videos(config: RunConfig) -> list[Video]:
    """Each video of the training and evaluation sets once (file and clip), in a fixed order."""
    found: dict[tuple[str, tuple[float, float] | None], Video] = {}
    for split in ("train", "eval"):
        if getattr(config.data, split) is None:
            continue
        for record in read_split(config, split):
            for path in record.videos:
                found.setdefault((str(path), record.video_clip), (Path(path), record.video_clip))
    return [found[k] for k in sorted(found, key=lambda k: (k[0], repr(k[1])))]


class _Decodes(Dataset):
    """Decode and store one video per item (in the DataLoader's worker processes)."""

    def __init__(self, videos: Sequence[Video], store: PreparedMedia, sampling: VideoSampling) -> None:
        self.videos, self.store, self.sampling = videos, store, sampling

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> tuple[int, str | None]:
        path, clip = self.videos[index]
        try:
            stored = self.store.save(path, clip, load_video(path, self.sampling, clip=clip))
        except (HpcTrainError, OSError) as exc:
            return 0, f"{path}: {exc}"
        return stored.stat().st_size, None


def prepare_media(config: RunConfig, *, shard: tuple[int, int], workers: int,
                  say: Callable[[str], object] = print) -> Preparation:
    """Decode and store this shard's videos that are not stored yet."""
    if config.data.prepared_media is None:
        raise ConfigError("data.prepared_media is not set. Fix: data.prepared_media=DIR (on a filesystem the "
                          "training nodes see; the run reads it from there)")
    started = time.perf_counter()
    model = with_family(config.model)
    store = PreparedMedia(config.data.prepared_media, config.data, load_processor(model), get_family(model.family))
    if store.note:
        say(store.note)
    index, count = shard
    mine = run_videos(config)[index::count]
    done = Preparation(shard=shard, videos=len(mine))
    todo = []
    for video in mine:
        try:
            stored = store.has(*video)
        except OSError as exc:  # the file is gone: the run will say so too
            done.failed.append(f"{video[0]}: {exc.strerror}")
            continue
        if stored:
            done.already += 1
        else:
            todo.append(video)
    say(f"prepare-media: shard {index + 1} of {count}: {len(mine)} videos, {len(todo)} to decode "
        f"({workers} worker process(es)) into {config.data.prepared_media}")
    loader = DataLoader(_Decodes(todo, store, video_sampling(config.data.video)), batch_size=None,
                        num_workers=workers)
    last = time.perf_counter()
    for size, failure in loader:
        if failure is None:
            done.stored += 1
            done.bytes_stored += int(size)
        else:
            done.failed.append(failure)
        if time.perf_counter() - last >= _PROGRESS_S:
            last = time.perf_counter()
            finished = done.stored + len(done.failed)
            say(f"prepare-media: {finished}/{len(todo)} decoded, {finished / (last - started):.2f} videos/s")
    done.seconds = time.perf_counter() - started
    return done


def default_workers() -> int:
    """The CPUs this process may use (its SLURM allocation's, under sched_getaffinity)."""
    return max(len(os.sched_getaffinity(0)), 1)


__all__ = ["Preparation", "default_workers", "prepare_media", "run_videos", "shard_of"]
