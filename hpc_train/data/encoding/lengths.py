"""Each sample's token length (text + media tokens) without decoding any pixels.

Media are replaced by blank stand-ins of their true sizes (image sizes from the file header,
video frame counts, sizes and frame times from the container, audio as its fixed spectrogram picture)
and the sample goes through the same chat encoder as in training, so the length is exact by
construction. Lengths are cached per dataset file, keyed by the file's size and mtime and
by everything that changes a length (processor, frames, system prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from hpc_train.config import DataConfig
from hpc_train.data.decoding.media import black_video, video_sampling, video_settings
from hpc_train.data.encoding.tokenize import ChatEncoder, SampleMedia
from hpc_train.data.sources.records import Record
from hpc_train.errors import DataError

UNUSABLE = -1
"""Length recorded for a record that cannot be encoded (it is left out of every pack)."""


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image header ({exc})",
                        fix="check the file, or set data.on_bad_sample: skip") from exc


def stand_in_media(record: Record, data: DataConfig) -> SampleMedia:
    """Blank media with the sizes and frame counts the real ones would have."""
    sampling = video_sampling(data.video)
    images = []
    for path in record.images:
        if data.image.aspect_4to1 or data.image.max_side is not None:
            from hpc_train.data.decoding.media import (
                load_image,  # these change the size: apply them
            )

            images.append(load_image(path, aspect_4to1=data.image.aspect_4to1, max_side=data.image.max_side))
        else:
            images.append(Image.new("RGB", _image_size(path), (128, 128, 128)))
    # The container's times of the chosen frames too: SmolVLM2 writes each frame's time and the
    # video's duration into the prompt, and the tokens of those digits vary.
    videos = [black_video(path, sampling, clip=record.video_clip) for path in record.videos]
    side = data.audio.image_size
    audios = [Image.new("RGB", (side, side)) for _ in record.audios]
    return SampleMedia(images=images, videos=videos, audios=audios)


@dataclass(frozen=True)
class SampleShapes:
    """Per record: its token length (``UNUSABLE`` when it cannot be encoded) and the sampled
    frame count of each of its videos."""

    lengths: list[int]
    video_frames: list[list[int]]


def sample_shapes(records: Sequence[Record], encoder: ChatEncoder, data: DataConfig, *,
                  cache_dir: str | Path | None = None, source: str | Path | None = None) -> SampleShapes:
    """Token length and video frame counts of every record, cached per dataset file."""
    shapes = cached_shapes(records, encoder, data, cache_dir=cache_dir, source=source)
    if shapes is None:
        shapes = measure_shapes(records, encoder, data, range(len(records)))
        write_cached_shapes(shapes, encoder, data, cache_dir=cache_dir, source=source)
    return shapes


def cached_shapes(records: Sequence[Record], encoder: ChatEncoder, data: DataConfig, *,
                  cache_dir: str | Path | None, source: str | Path | None) -> SampleShapes | None:
    """The shapes an earlier run measured for this file and these settings, or None."""
    cache = _cache_file(cache_dir, source, encoder, data) if cache_dir and source else None
    if cache is None or not cache.is_file():
        return None
    cached = json.loads(cache.read_text())
    if isinstance(cached, dict) and len(cached.get("lengths", ())) == len(records):
        return SampleShapes(cached["lengths"], cached["video_frames"])
    return None


def measure_shapes(records: Sequence[Record], encoder: ChatEncoder, data: DataConfig, indices: Iterable[int],
                   *, progress: Callable[[int], None] | None = None) -> SampleShapes:
    """The shapes of ``records[i]`` for each of ``indices``, in that order; ``progress`` is told
    how many are done every 10,000."""
    lengths, frames = [], []
    for done, i in enumerate(indices, 1):
        try:
            media = stand_in_media(records[i], data)
            lengths.append(len(encoder.encode(records[i], media)))
            frames.append([len(v.frames) for v in media.videos])
        except DataError:
            lengths.append(UNUSABLE)
            frames.append([])
        if progress is not None and done % 10_000 == 0:
            progress(done)
    return SampleShapes(lengths, frames)


def write_cached_shapes(shapes: SampleShapes, encoder: ChatEncoder, data: DataConfig, *,
                        cache_dir: str | Path | None, source: str | Path | None) -> None:
    if not cache_dir or not source:
        return
    cache = _cache_file(cache_dir, source, encoder, data)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"lengths": shapes.lengths, "video_frames": shapes.video_frames}))
    os.replace(tmp, cache)


def interleaved(shares: Sequence[SampleShapes]) -> SampleShapes:
    """The shapes of all records from ``shares[r]`` = records ``r, r + n, r + 2n, ...`` (n shares)."""
    n, total = len(shares), sum(len(s.lengths) for s in shares)
    return SampleShapes([shares[i % n].lengths[i // n] for i in range(total)],
                        [shares[i % n].video_frames[i // n] for i in range(total)])


def sample_lengths(records: Sequence[Record], encoder: ChatEncoder, data: DataConfig, *,
                   cache_dir: str | Path | None = None, source: str | Path | None = None) -> list[int]:
    """Token length of every record (``UNUSABLE`` for one that cannot be encoded)."""
    return sample_shapes(records, encoder, data, cache_dir=cache_dir, source=source).lengths


def _cache_file(cache_dir: str | Path, source: str | Path, encoder: ChatEncoder, data: DataConfig) -> Path:
    path = Path(source)
    stat = path.stat()
    key = json.dumps({
        "file": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
        "video": video_settings(data.video), "image": data.image.model_dump(),
        "audio": data.audio.model_dump(), "system": data.system_prompt, "media_root": data.media_root,
        "ids": data.ids_file, "template": encoder.processor.chat_template,
        "tokenizer": len(encoder.tokenizer), "family": encoder.family.name,
        "processor": encoder.processor.to_json_string(),  # tokens per tile, image and video settings
    }, sort_keys=True, default=str)
    return Path(cache_dir) / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
