"""Records → decoded media → encoded samples, with the skip/drop policy applied.

A sample that cannot be used is returned as :class:`Skipped` (and counted by the collator)
when the config says ``skip`` / ``drop``; otherwise its :class:`DataError` propagates.
Media are opened inside ``__getitem__``, so each DataLoader worker opens its own readers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from hpc_train.config import DataConfig
from hpc_train.data.caches.prepared_media import PreparedMedia, share_of
from hpc_train.data.caches.vision_cache import VisionCache
from hpc_train.data.decoding.audio import audio_to_image, load_audio
from hpc_train.data.decoding.media import (
    FramesUndecodable,
    VideoFrames,
    black_image,
    black_video,
    load_image,
    load_video,
    video_sampling,
)
from hpc_train.data.decoding.media_share import share_bounds
from hpc_train.data.encoding.tokenize import ChatEncoder, EncodedSample, SampleMedia
from hpc_train.data.sources.records import Record
from hpc_train.data.video_on_device import DeferredSample, decode_on_device
from hpc_train.errors import DataError


@dataclass(frozen=True)
class Skipped:
    """A sample left out, and why."""

    id: str
    reason: str
    kind: str
    """``bad_record`` (unreadable record or media) or ``too_long`` (over ``max_seq_len``)."""


class MediaLoader:
    """Reads a record's media as the config asks (frames, image shape, audio rate).

    With ``frame_share=(rank, size)`` (a sequence-parallel group's rank) it decodes only that
    rank's share of each video's frames (:func:`~hpc_train.data.decoding.media_share.share_bounds`), so
    the group decodes each frame once. Whether a video opens, and which frames it gives, every
    rank finds out alike; only a frame that fails to decode is seen by its rank alone, so under
    ``on_bad_sample: skip`` it becomes a black frame with a warning instead of a skipped sample
    (one rank skipping what the others train on would hang the group).
    """

    def __init__(self, data: DataConfig, *, frame_share: tuple[int, int] | None = None,
                 prepared: PreparedMedia | None = None, defer_videos: bool = False,
                 device: str | None = None) -> None:
        """``prepared``: the run's store of videos decoded ahead (``data.prepared_media``): a
        video found there is not decoded. ``defer_videos``: stand-in frames for the others (the
        training process decodes them, :mod:`~hpc_train.data.deferred_videos`); ``device``:
        decode them with torchcodec there."""
        self.data = data
        self.frame_share = frame_share
        self.defer_videos, self.device = defer_videos, device
        self.sampling = video_sampling(data.video)
        self.prepared = prepared
        self.decoded_unprepared = 0
        """Videos this process decoded because the store did not have them."""
        self.deferred = 0
        """Videos left to the training process (``defer_videos``)."""
        self.on_decoded: Callable[[Path, tuple[float, float] | None, VideoFrames], None] | None = None
        """Given each video decoded whole, with its clip (``hpc-train plan`` keeps them prepared)."""

    def load(self, record: Record) -> SampleMedia:
        try:
            before = self.decoded_unprepared
            videos = [self._video(p, record) for p in record.videos]
            return SampleMedia(
                images=[load_image(p, aspect_4to1=self.data.image.aspect_4to1,
                                   max_side=self.data.image.max_side) for p in record.images],
                videos=videos, unprepared=self.decoded_unprepared - before,
                audios=[audio_to_image(load_audio(p, sample_rate=self.data.audio.sample_rate,
                                                  max_seconds=self.data.audio.max_seconds),
                                       self.data.audio.sample_rate, size=self.data.audio.image_size)
                        for p in record.audios],
            )
        except DataError as exc:
            raise exc.at(path=record.source, line=record.line, record_id=record.id) from exc

    def stand_ins(self, record: Record) -> SampleMedia:
        """Black media of the sizes :meth:`load` would give, read from the files' headers (no
        pixel or sample decoded): the processor makes the same tokens from them."""
        image, audio = self.data.image, self.data.audio
        try:
            return SampleMedia(
                images=[black_image(p, aspect_4to1=image.aspect_4to1, max_side=image.max_side) for p in record.images],
                videos=[black_video(p, self.sampling, clip=record.video_clip) for p in record.videos],
                audios=[Image.new("RGB", (audio.image_size, audio.image_size)) for _ in record.audios])
        except DataError as exc:
            raise exc.at(path=record.source, line=record.line, record_id=record.id) from exc

    def _video(self, path: Path, record: Record) -> VideoFrames:
        if self.prepared is not None:
            stored = self.prepared.load(path, record.video_clip)
            if stored is not None:
                if self.frame_share is None:
                    return stored
                return share_of(stored, share_bounds(len(stored.frames), *self.frame_share))
            self._say_unprepared(path)
        if self.defer_videos:
            self.deferred += 1
            return black_video(path, self.sampling, clip=record.video_clip)
        if self.device is not None:
            return decode_on_device(path, self.sampling, record.video_clip, self.device)
        if self.frame_share is None:
            frames = load_video(path, self.sampling, clip=record.video_clip)
            if self.on_decoded is not None:
                self.on_decoded(path, record.video_clip, frames)
            return frames
        rank, size = self.frame_share
        try:
            return load_video(path, self.sampling, clip=record.video_clip,
                              share=lambda count: share_bounds(count, rank, size))
        except FramesUndecodable as exc:
            if self.data.on_bad_sample != "skip":
                raise
            warnings.warn(f"{exc.at(path=record.source, line=record.line, record_id=record.id)} -- trained with "
                          "black frames instead: the other ranks of the sequence-parallel group decoded theirs",
                          stacklevel=2)
            return black_video(path, self.sampling, clip=record.video_clip)

    def _say_unprepared(self, path: Path) -> None:
        self.decoded_unprepared += 1
        if self.decoded_unprepared == 1:  # once per process: a store that lacks many says it once
            warnings.warn(f"data.prepared_media: {path} is not in {self.prepared.store.root} (not prepared, or the "
                          "file or the video settings changed since): decoded instead. Fix: run hpc-train "
                          "prepare-media with this config", stacklevel=3)


class SampleDataset(Dataset):
    """A map-style dataset of encoded samples (or :class:`Skipped` markers).

    With a ``vision_cache``, a sample whose features are all cached is encoded from stand-in
    media (:meth:`MediaLoader.stand_ins`) and carries the features instead of pixels; any other
    sample carries its key, so the features the model computes for it are written there.
    """

    def __init__(self, records: Sequence[Record], encoder: ChatEncoder, media: MediaLoader,
                 data: DataConfig, *, vision_cache: VisionCache | None = None) -> None:
        self.records = records
        self.encoder = encoder
        self.media = media
        self.data = data
        self.vision_cache = vision_cache
        self._cache: dict[int, EncodedSample | Skipped] | None = {} if data.cache_samples else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedSample | Skipped | DeferredSample:
        if self._cache is not None:
            if index in self._cache:
                return self._cache[index]
            sample = self._build(index)
            # a sample whose features are still to be stored is built again: next time from them
            inner = sample.sample if isinstance(sample, DeferredSample) else sample
            if not isinstance(inner, EncodedSample) or inner.feature_key is None:
                self._cache[index] = sample
            return sample
        return self._build(index)

    def _build(self, index: int) -> EncodedSample | Skipped | DeferredSample:
        try:
            record = self.records[index]
            deferred = self.media.deferred
            sample = self._encode(record)
        except DataError as exc:
            if self.data.on_bad_sample == "skip":
                return Skipped(id=exc.record_id or str(index), reason=str(exc), kind="bad_record")
            raise
        if len(sample) > self.data.max_seq_len:
            problem = (f"sample is {len(sample)} tokens ({sample.num_media_tokens} from media), "
                       f"over data.max_seq_len={self.data.max_seq_len}")
            if self.data.truncation == "drop":
                return Skipped(id=record.id, reason=problem, kind="too_long")
            raise DataError(problem, path=record.source, line=record.line, record_id=record.id,
                            fix="raise data.max_seq_len, use fewer frames (data.video.num_frames / "
                                "max_frames), or set data.truncation=drop")
        return DeferredSample(index, sample) if self.media.deferred > deferred else sample

    def _encode(self, record: Record) -> EncodedSample:
        cache = self.vision_cache
        if cache is None or not record.has_media():
            return self._decoded(record)
        try:
            key = cache.sample_key(record)
        except OSError:  # a missing file: the media loader says so, in the data's terms
            return self._decoded(record)
        features = cache.load(record, key)
        if features is not None:
            sample = self.encoder.encode(record, self.media.stand_ins(record))
            if cache.fits(sample, features):
                return dataclasses.replace(sample, media={}, features=features)
        return dataclasses.replace(self._decoded(record), feature_key=key)

    def _decoded(self, record: Record) -> EncodedSample:
        media = self.media.load(record)
        return dataclasses.replace(self.encoder.encode(record, media), videos_unprepared=media.unprepared)
