"""Videos decoded once (``data.prepared_media``): each video's frames as the run samples them
and its processor first resizes them, stored so that a training step reads them instead of
decoding the file again.

Decoding is the loader's costliest part (each sampled frame seeks and decodes from its keyframe:
about a second per 16-frame sample of a 360p clip on one core), so a store filled ahead on CPU
nodes (``hpc-train prepare-media``) keeps the GPUs fed. An entry is one safetensors file of the
frames (uint8) in :class:`~hpc_train.data.caches.feature_store.FeatureStore`, written whole or not at
all, keyed by the file's identity (path, size, modification time), the clip, the run's video
settings and, when the frames are resized, the processor's settings: any change makes a miss,
never a stale sample. The resize is the family's (``Family.prepare_frames``, the processor's
own), and it is used only when this processor is proven, when the store opens, to give the same
output for the resized frames as for the decoded ones; otherwise the frames are kept as
decoded, and the run says why.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpc_train.config import DataConfig
from hpc_train.data.caches.feature_store import FeatureStore, key_of, media_identity
from hpc_train.data.decoding.media import VideoFrames, video_settings
from hpc_train.models.families import Family

KIND = "prepared-video-1"
"""The first part of every key: entries of another layout are misses."""

_PROBES = ((2, 75, 133), (2, 133, 75))
"""Frame counts and sizes (landscape, portrait) the resize is proven on."""


def resize_is_exact(processor: Any, resize: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Whether the video processor turns ``resize``'s frames into exactly what it makes of the
    decoded ones (random frames of :data:`_PROBES`' shapes)."""
    rng = np.random.default_rng(0)
    video_processor = processor.video_processor
    for frames, height, width in _PROBES:
        decoded = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
        native = video_processor([decoded], return_tensors="pt", do_sample_frames=False)
        resized = video_processor([resize(decoded)], return_tensors="pt", do_sample_frames=False)
        if native.keys() != resized.keys() or not all(torch.equal(native[k], resized[k]) for k in native):
            return False
    return True


class PreparedMedia:
    """The run's prepared-media store: :meth:`load` a video's frames, :meth:`save` decoded ones."""

    def __init__(self, root: str | os.PathLike[str], data: DataConfig, processor: Any, family: Family) -> None:
        self.store = FeatureStore(root)
        self.note: str | None = None
        """Why frames are stored as decoded rather than resized (``None``: resized, or no resize)."""
        resize = None
        if family.prepare_frames is not None:
            prepare = family.prepare_frames
            resize = lambda frames: prepare(processor, frames)  # noqa: E731 - bound to this processor
            if not resize_is_exact(processor, resize):
                self.note = (f"data.prepared_media: {type(processor.video_processor).__name__} does not give the same "
                             "pixels for frames resized ahead as for decoded ones with these settings, so the frames "
                             "are stored at their decoded size (larger entries, the same samples)")
                resize = None
        self.resize = resize
        settings: dict[str, Any] = {"video": video_settings(data.video), "resized": resize is not None}
        if resize is not None:
            settings |= {"family": family.name, "video_processor": processor.video_processor.to_dict()}
        text = json.dumps(settings, sort_keys=True, default=str)
        self.settings = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def key(self, path: str | os.PathLike[str], clip: tuple[float, float] | None) -> str:
        return key_of(KIND, self.settings, media_identity(path), repr(clip))

    def prepare(self, video: VideoFrames) -> VideoFrames:
        """Decoded frames as they are stored (resized, when the resize is exact)."""
        if self.resize is None:
            return video
        return VideoFrames(frames=self.resize(video.frames), timestamps=video.timestamps,
                           native_fps=video.native_fps, num_source_frames=video.num_source_frames)

    def save(self, path: str | os.PathLike[str], clip: tuple[float, float] | None, video: VideoFrames) -> Path:
        """Store a video's frames, decoded whole (no frame share), after :meth:`prepare`."""
        if video.decoded is not None:
            raise ValueError("a prepared video holds every frame: decode it without a frame share")
        ready = self.prepare(video)
        info = {"timestamps": [float(t) for t in ready.timestamps], "native_fps": float(ready.native_fps),
                "num_source_frames": int(ready.num_source_frames)}
        return self.store.save(self.key(path, clip), torch.from_numpy(np.ascontiguousarray(ready.frames)), info)

    def has(self, path: str | os.PathLike[str], clip: tuple[float, float] | None) -> bool:
        """Whether an entry is there (not read: a torn one is found when it is loaded)."""
        return self.store.path_for(self.key(path, clip)).is_file()

    def load(self, path: str | os.PathLike[str], clip: tuple[float, float] | None) -> VideoFrames | None:
        """The video's stored frames, or ``None`` (absent, torn, or its file or settings changed)."""
        try:
            key = self.key(path, clip)
        except OSError:
            return None  # the file is gone: decoding it says so
        entry = self.store.load_entry(key)
        if entry is None:
            return None
        frames, info = entry
        return VideoFrames(frames=frames.numpy(), timestamps=np.asarray(info["timestamps"], dtype=np.float64),
                           native_fps=float(info["native_fps"]), num_source_frames=int(info["num_source_frames"]))


def share_of(video: VideoFrames, bounds: tuple[int, int]) -> VideoFrames:
    """A stored video as a rank of a sequence-parallel group sees it decoded: its share of the
    frames, black stand-ins for the others (see :func:`~hpc_train.data.decoding.media.load_video`)."""
    start, end = bounds
    frames = np.zeros_like(video.frames)
    frames[start:end] = video.frames[start:end]
    return VideoFrames(frames=frames, timestamps=video.timestamps, native_fps=video.native_fps,
                       num_source_frames=video.num_source_frames, decoded=(start, max(start, end)))


def prepared_media_for(data: DataConfig, processor: Any, family: Family) -> PreparedMedia | None:
    """The run's store (``data.prepared_media``), or ``None`` when it has none."""
    return None if data.prepared_media is None else PreparedMedia(data.prepared_media, data, processor, family)


__all__ = ["KIND", "PreparedMedia", "prepared_media_for", "resize_is_exact", "share_of"]
