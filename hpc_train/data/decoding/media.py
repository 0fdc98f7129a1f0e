"""Reading videos and images into arrays the processors can use (audio: :mod:`hpc_train.data.decoding.audio`).

Every failure a user can cause (missing file, empty file, undecodable bytes, a clip
outside the video) is raised as :class:`~hpc_train.errors.MediaError` naming the path
and a fix; raw decord / torchcodec / PIL / soundfile / librosa exceptions never escape.

Video decoders are imported lazily: they hold native state that must not be created at
import time or carried into forked / pickled DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageStat

from hpc_train.config import VideoConfig
from hpc_train.data.decoding.video_backends import (
    BACKENDS,
    VideoReader,
    open_reader,
    resolve_backend,
    scaled_size,
)
from hpc_train.errors import MediaError

VIDEO_MODES = ("uniform", "fps")

FIX_VIDEO = "re-encode it with `ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p out.mp4`"
FIX_IMAGE = "re-save it as PNG or JPEG (e.g. `ffmpeg -i in.img out.png`)"
FIX_AUDIO = "convert it with `ffmpeg -i in.audio -ac 1 -ar 16000 out.wav`"
FIX_MISSING = "check the path and data.media_root, or remove the record / set data.on_bad_sample: skip"
FIX_SKIP = "or remove the record / set data.on_bad_sample: skip"

# Tolerance for float -> frame-index conversions, so 0.5 s at 4 fps is frame 2, not 1.
_EPS = 1e-6


@dataclass(frozen=True)
class VideoFrames:
    """Frames decoded from one video.

    ``frames`` is (T, H, W, 3) uint8 RGB; ``timestamps`` is (T,) float seconds at which
    each frame starts in the source video.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    native_fps: float
    num_source_frames: int
    decoded: tuple[int, int] | None = None
    """Under a frame share: frames ``[start, end)`` hold decoded pixels, the others are black
    stand-ins of the same size (another rank decodes them); ``None``: every frame is decoded."""


@dataclass(frozen=True)
class VideoSampling:
    """How to pick frames from a video.

    ``uniform``: ``min(num_frames, max_frames)`` frames spread evenly over the clip,
    first and last frame included.  ``fps``: one frame every ``1/fps`` seconds from the
    clip start; if that gives more than ``max_frames`` they are subsampled uniformly
    down to ``max_frames``.  Either way a clip with fewer frames than asked yields each
    of its frames once (never duplicates), so T can be smaller than requested.
    """

    mode: str = "uniform"
    num_frames: int = 8
    fps: float = 1.0
    max_frames: int = 32
    backend: str = "decord"
    """The decoder (``decord`` or ``torchcodec``; ``auto`` is resolved before this is made)."""
    max_side: int | None = None
    """Frames scaled down in the decoder to this longer side (``data.video.max_side``)."""
    threads: int = 1
    """Decoder threads (``data.video.decoder_threads``)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"video backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mode not in VIDEO_MODES:
            raise ValueError(f"video sampling mode must be one of {VIDEO_MODES}, got {self.mode!r}")
        if not isinstance(self.num_frames, int | np.integer) or self.num_frames < 1:
            raise ValueError(f"video num_frames must be an int >= 1, got {self.num_frames!r}")
        if not math.isfinite(self.fps) or self.fps <= 0:
            raise ValueError(f"video sampling fps must be > 0, got {self.fps!r}")
        if not isinstance(self.max_frames, int | np.integer) or self.max_frames < 1:
            raise ValueError(f"video max_frames must be an int >= 1, got {self.max_frames!r}")


def video_sampling(video: VideoConfig) -> VideoSampling:
    """The run's ``data.video`` settings, its decoder resolved (``auto``: torchcodec where it works)."""
    return VideoSampling(mode=video.sampling, num_frames=video.num_frames, fps=video.fps,
                         max_frames=video.max_frames, backend=resolve_backend(video.backend),
                         max_side=video.max_side, threads=video.decoder_threads)


def video_settings(video: VideoConfig) -> dict[str, Any]:
    """``data.video`` as cache keys need it: the decoder resolved (``auto`` may mean different
    decoders on different machines), its thread count left out (the frames are the same), and
    ``max_side`` only when set (stores made before it existed keep their keys)."""
    settings = video.model_dump(exclude={"decoder_threads"}, exclude_none=True)
    return {**settings, "backend": resolve_backend(video.backend)}


def _uniform_pick(first: int, last: int, k: int) -> np.ndarray:
    """k evenly spread ints in [first, last]; all of them when the range is shorter."""
    n = last - first + 1
    if n <= k:
        return np.arange(first, last + 1, dtype=np.int64)
    if k == 1:
        # One frame should represent the clip, so take the middle rather than frame 0.
        return np.array([first + (n - 1) // 2], dtype=np.int64)
    # floor(x + 0.5) instead of np.round: banker's rounding can map two positions one
    # apart onto the same integer (1.5 -> 2, 2.5 -> 2) and create duplicates.
    pos = np.floor(np.linspace(first, last, k) + 0.5).astype(np.int64)
    return np.unique(pos)


def _clip_range(num_source_frames: int, native_fps: float,
                clip: tuple[float, float] | None) -> tuple[int, int]:
    """Inclusive frame range shown during the clip ``[start, end)`` seconds."""
    if clip is None:
        return 0, num_source_frames - 1
    try:
        start, end = float(clip[0]), float(clip[1])
    except (TypeError, ValueError, IndexError) as exc:
        raise MediaError(f"clip must be (start, end) seconds, got {clip!r}",
                         fix="write the clip as [start_seconds, end_seconds]") from exc
    duration = num_source_frames / native_fps
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
        raise MediaError(f"clip {clip!r} is not a valid [start, end) interval in seconds",
                         fix=f"use 0 <= start < end; {FIX_SKIP}")
    if start >= duration - _EPS:
        raise MediaError(
            f"clip {clip!r} starts after the video ends ({duration:.3f} s, "
            f"{num_source_frames} frames at {native_fps:g} fps)",
            fix=f"fix the clip times to lie within the video, {FIX_SKIP}")
    first = int(math.floor(start * native_fps + _EPS))
    # An end beyond the duration is clamped (container durations are often a frame off),
    # before it becomes a frame number: an end of 1e308 s has no integer frame.
    last = min(num_source_frames - 1, int(math.ceil(min(end, duration) * native_fps - _EPS)) - 1)
    return first, max(first, last)


def sample_frame_indices(num_source_frames: int, native_fps: float, sampling: VideoSampling,
                         clip: tuple[float, float] | None = None) -> np.ndarray:
    """Pick which source frames to decode; pure, returns sorted unique int64 indices.

    Frame ``i`` is taken to be shown during ``[i/fps, (i+1)/fps)``.  A ``clip`` of
    ``(start, end)`` seconds keeps the frames shown during it (at least one); an end past
    the video is clamped, a start at or past the end raises :class:`MediaError`.
    Bad arguments (no frames, fps <= 0) raise ``ValueError``.
    """
    if int(num_source_frames) < 1:
        raise ValueError(f"num_source_frames must be >= 1, got {num_source_frames!r}")
    if not math.isfinite(native_fps) or native_fps <= 0:
        raise ValueError(f"native_fps must be > 0, got {native_fps!r}")
    first, last = _clip_range(int(num_source_frames), float(native_fps), clip)
    if sampling.mode == "uniform":
        return _uniform_pick(first, last, min(sampling.num_frames, sampling.max_frames))
    # fps mode: sample times start, start + 1/fps, ... and map each to the frame on screen.
    step = native_fps / sampling.fps
    count = int(math.floor((last - first) / step + _EPS)) + 1
    idx = np.unique(np.floor(first + np.arange(count) * step + _EPS).astype(np.int64))
    idx = idx[idx <= last]
    if len(idx) > sampling.max_frames:
        idx = idx[_uniform_pick(0, len(idx) - 1, sampling.max_frames)]
    return idx


def _check_file(path: str | Path, fix: str) -> Path:
    """Fail early and clearly on missing / empty files before a decoder sees them."""
    p = Path(path)
    if not p.exists():
        raise MediaError("file not found", path=p, fix=FIX_MISSING)
    if not p.is_file():
        raise MediaError("not a regular file", path=p, fix=FIX_MISSING)
    if p.stat().st_size == 0:
        raise MediaError("file is empty (0 bytes)", path=p, fix=f"{fix}, {FIX_SKIP}")
    return p


def _open_video(path: Path, sampling: VideoSampling) -> VideoReader:
    # Opened per call on purpose: a reader owns native decoder threads and must not be
    # created at import time or stored on objects pickled into DataLoader workers.
    size = scaled_size(*video_size(path), sampling.max_side) if sampling.max_side else None
    try:
        return open_reader(path, sampling.backend, size, sampling.threads)
    except Exception as exc:  # decoders raise bare RuntimeError / DECORDError / ValueError
        raise MediaError(f"cannot decode video ({_short(exc)})", path=path,
                         fix=f"{FIX_VIDEO}, {FIX_SKIP}") from exc


def _video_meta(vr: VideoReader, path: Path) -> tuple[int, float]:
    try:
        n, fps = vr.meta()
    except Exception as exc:
        raise MediaError(f"cannot read video metadata ({_short(exc)})", path=path,
                         fix=f"{FIX_VIDEO}, {FIX_SKIP}") from exc
    if n < 1:
        raise MediaError("video has 0 frames", path=path, fix=f"{FIX_VIDEO}, {FIX_SKIP}")
    if not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"video reports an invalid frame rate ({fps})", path=path,
                         fix=f"{FIX_VIDEO} -r 30, {FIX_SKIP}")
    return n, fps


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def video_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of a video's frames from its container header (no decoding)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()
    if width <= 0 or height <= 0:
        raise MediaError("cannot read the video's frame size", path=path, fix=f"{FIX_VIDEO}, {FIX_SKIP}")
    return width, height


def black_video(path: str | Path, sampling: VideoSampling, clip: tuple[float, float] | None = None) -> VideoFrames:
    """The frames ``sampling`` would choose, all black (sizes and times from the container)."""
    p = _check_file(path, FIX_VIDEO)
    vr = _open_video(p, sampling)
    try:
        n, fps, idx = _chosen_frames(vr, p, sampling, clip)
        stamps = vr.timestamps(idx)
    finally:
        del vr
    width, height = video_size(p)
    width, height = scaled_size(width, height, sampling.max_side) or (width, height)
    return VideoFrames(frames=np.zeros((len(idx), height, width, 3), dtype=np.uint8), timestamps=stamps,
                       native_fps=fps, num_source_frames=n, decoded=(0, 0))


def _chosen_frames(vr: VideoReader, path: Path, sampling: VideoSampling, clip: tuple[float, float] | None
                   ) -> tuple[int, float, np.ndarray]:
    """``(frames in the file, its fps, the indices sampling chooses)`` of an open video."""
    n, fps = _video_meta(vr, path)
    try:
        return n, fps, sample_frame_indices(n, fps, sampling, clip)
    except MediaError as exc:
        raise exc.at(path=path) from exc


def probe_video(path: str | Path, backend: str = "decord") -> tuple[int, float]:
    """Return ``(num_frames, fps)`` from the container index without decoding pixels."""
    p = _check_file(path, FIX_VIDEO)
    return _video_meta(_open_video(p, VideoSampling(backend=backend)), p)


class FramesUndecodable(MediaError):
    """Frames of a video that opened and described itself fine could not be decoded."""


def load_video(path: str | Path, sampling: VideoSampling, clip: tuple[float, float] | None = None,
               *, share: Callable[[int], tuple[int, int]] | None = None) -> VideoFrames:
    """Decode the frames chosen by ``sampling`` (within ``clip`` seconds, if given).

    ``share(count)`` = ``(start, end)``: decode only those of the ``count`` chosen frames; the
    rest are black frames of the same size (:attr:`VideoFrames.decoded`).
    """
    p = _check_file(path, FIX_VIDEO)
    vr = _open_video(p, sampling)
    try:
        n, fps, idx = _chosen_frames(vr, p, sampling, clip)
        start, end = share(len(idx)) if share is not None else (0, len(idx))
        wanted = idx[start:end] if end > start else idx[:1]  # a share of none still needs the size
        try:
            decoded = vr.frames(wanted)
            timestamps = vr.timestamps(idx)
        except Exception as exc:
            raise FramesUndecodable(f"cannot decode frames {wanted.tolist()} ({_short(exc)})", path=p,
                                    fix=f"{FIX_VIDEO}, {FIX_SKIP}") from exc
    finally:
        del vr
    if decoded.ndim != 4 or decoded.shape[0] != len(wanted) or decoded.shape[-1] != 3:
        raise MediaError(f"decoder returned frames of shape {decoded.shape}, expected "
                         f"({len(wanted)}, H, W, 3)", path=p, fix=f"{FIX_VIDEO}, {FIX_SKIP}")
    if share is None:
        frames = np.ascontiguousarray(decoded, dtype=np.uint8)
    else:
        frames = np.zeros((len(idx), *decoded.shape[1:]), dtype=np.uint8)
        frames[start:end] = decoded[:max(end - start, 0)]
    return VideoFrames(frames=frames, timestamps=timestamps, native_fps=fps, num_source_frames=n,
                       decoded=None if share is None else (start, max(start, end)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency flattened onto white (plain convert() would expose the
    arbitrary colour stored under fully transparent pixels)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_4to1(image: Image.Image, *, height: int | None = None) -> Image.Image:
    """Letterbox ``image`` into a canvas exactly 4x as wide as high.

    Content is never cropped or distorted: it is centred and the rest is filled with
    the image's mean colour (less salient to a vision encoder than black bars).  Without
    ``height`` the canvas is the smallest 4:1 box holding the image unscaled; with it the
    image is scaled to fit a ``4*height x height`` canvas.
    """
    img = _to_rgb(image)
    w, h = img.size
    if height is None:
        ch = max(h, math.ceil(w / 4))
    else:
        if height < 1:
            raise ValueError(f"height must be >= 1, got {height}")
        ch = int(height)
        scale = min(4 * ch / w, ch / h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.BICUBIC)
        w, h = img.size
    fill = tuple(int(round(v)) for v in ImageStat.Stat(img).mean[:3])
    canvas = Image.new("RGB", (4 * ch, ch), fill)
    canvas.paste(img, ((4 * ch - w) // 2, (ch - h) // 2))
    return canvas


def load_image(path: str | Path, *, aspect_4to1: bool = False,
               max_side: int | None = None) -> Image.Image:
    """Open an image as RGB with EXIF orientation applied.

    ``max_side`` downscales (never upscales) so the longest side fits; with
    ``aspect_4to1`` the result is letterboxed to width == 4 * height first, and then
    ``max_side`` bounds the width.
    """
    _check_max_side(max_side, aspect_4to1)
    p = _check_file(path, FIX_IMAGE)
    try:
        with Image.open(p) as raw:
            raw.load()
            img = _to_rgb(ImageOps.exif_transpose(raw))
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, EOFError, ...
        raise MediaError(f"cannot decode image ({_short(exc)})", path=p,
                         fix=f"{FIX_IMAGE}, {FIX_SKIP}") from exc
    return _shaped(img, aspect_4to1=aspect_4to1, max_side=max_side)


def black_image(path: str | Path, *, aspect_4to1: bool = False, max_side: int | None = None) -> Image.Image:
    """A black image of the size :func:`load_image` would give, from the file's header alone
    (its pixels are never decoded)."""
    _check_max_side(max_side, aspect_4to1)
    p = _check_file(path, FIX_IMAGE)
    try:
        with Image.open(p) as raw:
            width, height = raw.size
            turned = raw.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8)
    except Exception as exc:
        raise MediaError(f"cannot read the image's header ({_short(exc)})", path=p,
                         fix=f"{FIX_IMAGE}, {FIX_SKIP}") from exc
    size = (height, width) if turned else (width, height)
    return _shaped(Image.new("RGB", size), aspect_4to1=aspect_4to1, max_side=max_side)


_EXIF_ORIENTATION = 0x0112
"""Orientations 5-8 turn the picture by 90 degrees (``ImageOps.exif_transpose`` swaps its sides)."""


def _check_max_side(max_side: int | None, aspect_4to1: bool) -> None:
    if max_side is not None and max_side < (4 if aspect_4to1 else 1):
        raise ValueError(f"max_side is too small: {max_side}")


def _shaped(img: Image.Image, *, aspect_4to1: bool, max_side: int | None) -> Image.Image:
    if aspect_4to1:
        canvas = resize_to_4to1(img)
        if max_side is not None and canvas.width > max_side:
            canvas = resize_to_4to1(img, height=max_side // 4)
        return canvas
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    return img
