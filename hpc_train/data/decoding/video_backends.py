"""The two video decoders behind :func:`~hpc_train.data.decoding.media.load_video`: decord (the original,
unmaintained since 2022) and torchcodec (PyTorch's own), behind one small reader interface.

``data.video.backend: auto`` takes torchcodec where it imports with a working FFmpeg (PyAV's,
see :mod:`~hpc_train.data.decoding.bundled_ffmpeg`, else the system's) and decord otherwise; the choice
is made once per process and recorded, since the two may differ by a grey level or two.
"""

from __future__ import annotations

import os
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from hpc_train.errors import ConfigError

if TYPE_CHECKING:
    import torch

BACKENDS = ("decord", "torchcodec")
FIX_BACKEND = "set data.video.backend: decord, or install the tested torchcodec and av (pip install -c " \
              "hpc_train/constraints.txt -e .)"


class VideoReader(Protocol):
    """One open video file."""

    def meta(self) -> tuple[int, float]:
        """``(frames in the file, average frames per second)``."""

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        """Each frame's start time in seconds."""

    def frames(self, indices: np.ndarray) -> np.ndarray:
        """Those frames, ``(T, H, W, 3)`` uint8 RGB."""


class DecordReader:
    """decord's VideoReader, ``threads`` decoder threads (workers are the parallelism), frames
    scaled to ``size`` = ``(width, height)`` by FFmpeg when given."""

    def __init__(self, path: Path, size: tuple[int, int] | None = None, threads: int = 1) -> None:
        from decord import VideoReader as Decord
        from decord import cpu

        width, height = size or (-1, -1)
        self._video = Decord(os.fspath(path), ctx=cpu(0), num_threads=threads, width=width, height=height)

    def meta(self) -> tuple[int, float]:
        return len(self._video), float(self._video.get_avg_fps())

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        stamps = np.asarray(self._video.get_frame_timestamp(indices.tolist()), dtype=np.float64)
        return stamps.reshape(len(indices), -1)[:, 0]

    def frames(self, indices: np.ndarray) -> np.ndarray:
        return self._video.get_batch(indices.tolist()).asnumpy()


class TorchcodecReader:
    """torchcodec's VideoDecoder in exact seek mode (frame indices as decord counts them),
    ``threads`` FFmpeg threads, frames decoded straight to ``(T, H, W, 3)``, scaled to ``size`` =
    ``(width, height)`` by its decoder-side resize when given."""

    def __init__(self, path: Path, size: tuple[int, int] | None = None, threads: int = 1,
                 device: str = "cpu") -> None:
        from hpc_train.data.decoding.bundled_ffmpeg import load_bundled_ffmpeg

        load_bundled_ffmpeg()  # before torchcodec's first import, which looks for FFmpeg once
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        transforms = [Resize((size[1], size[0]))] if size else None
        self._video = VideoDecoder(os.fspath(path), dimension_order="NHWC", num_ffmpeg_threads=threads,
                                   seek_mode="exact", transforms=transforms, device=device)

    def meta(self) -> tuple[int, float]:
        stream = self._video.metadata
        return int(stream.num_frames or 0), float(stream.average_fps or 0.0)

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        # From the index, not decoded: a frame share names frames this rank never decodes.
        # Equal to decord's presentation times on constant-frame-rate video.
        stream = self._video.metadata
        return float(stream.begin_stream_seconds or 0.0) + indices.astype(np.float64) / float(stream.average_fps)

    def frames(self, indices: np.ndarray) -> np.ndarray:
        return self._video.get_frames_at(indices.tolist()).data.numpy()

    def tensor_frames(self, indices: np.ndarray) -> torch.Tensor:
        """Those frames where the decoder put them (on its device), ``(T, H, W, 3)`` uint8."""
        return self._video.get_frames_at(indices.tolist()).data


def open_reader(path: Path, backend: str, size: tuple[int, int] | None = None, threads: int = 1) -> VideoReader:
    """``path`` opened with ``backend``, its frames scaled to ``size`` = ``(width, height)`` when
    given (raises the decoder's own error: the caller words it)."""
    reader = TorchcodecReader if backend == "torchcodec" else DecordReader
    return reader(path, size, threads)


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """``(width, height)`` with the longer side ``max_side`` and the aspect kept (even sizes, as
    the chroma planes of 4:2:0 video need), or None when the frame is no larger than that."""
    if max_side is None or max(width, height) <= max_side:
        return None
    ratio = max_side / max(width, height)
    return max(2, round(width * ratio / 2) * 2), max(2, round(height * ratio / 2) * 2)


@cache
def torchcodec_problem() -> str | None:
    """Why torchcodec cannot decode video here, or None when it can."""
    from hpc_train.data.decoding.bundled_ffmpeg import load_bundled_ffmpeg

    imported_before = "torchcodec" in sys.modules
    load_bundled_ffmpeg()
    try:
        import torchcodec.decoders  # noqa: F401
    except ImportError as exc:
        return f"torchcodec is not installed ({exc})"
    try:
        _decode_a_probe()
    except Exception as exc:  # torchcodec raises RuntimeError with a page of tracebacks
        early = ", and it was imported before hpc-train loaded PyAV's FFmpeg" if imported_before else ""
        return f"torchcodec finds no FFmpeg it can use{early} ({str(exc).strip().splitlines()[0][:160]})"
    return None


def _decode_a_probe() -> None:
    """Write a two-frame video with OpenCV and decode it with torchcodec: "works" means this."""
    import cv2

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (16, 16))
        for level in (40, 200):
            writer.write(np.full((16, 16, 3), level, dtype=np.uint8))
        writer.release()
        frames = TorchcodecReader(path).frames(np.arange(2))
    if frames.shape != (2, 16, 16, 3) or not frames[1].mean() > frames[0].mean():
        raise RuntimeError(f"decoded a probe video wrongly (frames of shape {frames.shape})")


def describe_torchcodec() -> str:
    """torchcodec's version and the FFmpeg it decodes with (for ``hpc-train doctor``)."""
    from hpc_train.data.decoding.bundled_ffmpeg import load_bundled_ffmpeg

    problem = torchcodec_problem()
    if problem is not None:
        return problem
    import torchcodec
    from torchcodec._core import get_ffmpeg_library_versions

    ffmpeg = get_ffmpeg_library_versions().get("ffmpeg_version", "?")
    return f"torchcodec {torchcodec.__version__}, FFmpeg {ffmpeg} ({load_bundled_ffmpeg() or 'the system FFmpeg'})"


def resolve_backend(name: str) -> str:
    """The decoder ``data.video.backend`` names; ``auto`` picks torchcodec where it works."""
    if name == "auto":
        return "torchcodec" if torchcodec_problem() is None else "decord"
    if name == "torchcodec" and torchcodec_problem() is not None:
        raise ConfigError(f"data.video.backend=torchcodec: {torchcodec_problem()}. Fix: {FIX_BACKEND}")
    if name not in BACKENDS:
        raise ConfigError(f"data.video.backend={name}: not one of auto, {', '.join(BACKENDS)}")
    return name
