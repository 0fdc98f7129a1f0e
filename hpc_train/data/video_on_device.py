"""A video decoded where the model runs (``data.video.device=cuda``: torchcodec's NVDEC decoder), and
the marker a DataLoader worker puts on a sample whose videos are left for the training process
to decode that way (:mod:`hpc_train.data.deferred_videos`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_train.data.decoding.media import (
    FIX_SKIP,
    FIX_VIDEO,
    FramesUndecodable,
    VideoFrames,
    VideoSampling,
    _check_file,
    _chosen_frames,
    _short,
    video_size,
)
from hpc_train.data.decoding.video_backends import TorchcodecReader, scaled_size
from hpc_train.data.encoding.tokenize import EncodedSample
from hpc_train.errors import MediaError

FIX_DEVICE = ("install torchcodec's CUDA build, matching torch's CUDA (pip install torchcodec --index-url "
              "https://download.pytorch.org/whl/cu130), or set data.video.device=cpu")


def decode_on_device(path: str | Path, sampling: VideoSampling, clip: tuple[float, float] | None,
                     device: str) -> VideoFrames:
    """The frames ``sampling`` picks, decoded by torchcodec on ``device``: ``frames`` is a
    ``(T, H, W, 3)`` uint8 tensor there (the processors take it as they take arrays)."""
    p = _check_file(path, FIX_VIDEO)
    size = scaled_size(*video_size(p), sampling.max_side) if sampling.max_side else None
    try:
        reader = TorchcodecReader(p, size, sampling.threads, device=device)
    except Exception as exc:  # torchcodec raises RuntimeError, for a file or for a decoder it lacks
        raise MediaError(f"cannot open the video for decoding on {device} ({_short(exc)})", path=p,
                         fix=f"{FIX_DEVICE}; if the file is at fault: {FIX_VIDEO}, {FIX_SKIP}") from exc
    n, fps, idx = _chosen_frames(reader, p, sampling, clip)
    try:
        frames = reader.tensor_frames(idx)
    except Exception as exc:
        raise FramesUndecodable(f"cannot decode frames {idx.tolist()} on {device} ({_short(exc)})", path=p,
                                fix=f"{FIX_VIDEO}, {FIX_SKIP}") from exc
    return VideoFrames(frames=frames, timestamps=np.asarray(reader.timestamps(idx)), native_fps=fps,
                       num_source_frames=n)


def device_decoder_problem(device: str = "cuda") -> str | None:
    """Why torchcodec cannot decode H.264 on ``device`` here, or None when it can: a probe video
    decoded there for real (a CPU-only torchcodec build fails here, not at the first sample)."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        with tempfile.TemporaryDirectory() as folder:
            frames = TorchcodecReader(_h264_probe(Path(folder) / "probe.mp4"), device=device).tensor_frames(
                np.arange(2)).cpu().numpy()
    except Exception as exc:  # torchcodec raises RuntimeError for a decoder it was built without
        return f"torchcodec does not decode H.264 on {device} ({_short(exc)})"
    if frames.shape != (2, 64, 64, 3) or not frames[1].mean() > frames[0].mean():
        return f"torchcodec decoded a probe video on {device} wrongly (frames of shape {frames.shape})"
    return None


def _h264_probe(path: Path) -> Path:
    """Two 64x64 H.264 frames, dark then bright (the codec users' videos mostly are)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for level in (40, 200):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), level, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@dataclass(frozen=True)
class DeferredSample:
    """A training sample a worker encoded from stand-in frames (black, of the decoded size: the
    same tokens); the training process decodes its videos and encodes it again."""

    index: int
    """The record's index in the dataset."""
    sample: EncodedSample


__all__ = ["FIX_DEVICE", "DeferredSample", "decode_on_device", "device_decoder_problem"]
