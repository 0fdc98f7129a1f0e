"""Online decoding of one sample's frames, each way a decoder can be asked, side by side on one core.

Three kinds of video, encoded here with PyAV (H.264, a keyframe every 250 frames, as x264 writes
by default): an Ego4D-like 540p 30 fps clip of 8 s with 16 frames picked uniformly, the same clip
sampled densely (8 frames/s: 64 frames), and a captioning-like 1080p 24 fps episode at 1 frame/s
(32 frames). The frames each arm picks are hpc-train's own (``sample_frame_indices``). Arms:

- ``decord seek`` and ``torchcodec exact``: what ``data.video.backend`` runs today;
- ``torchcodec approximate``: no scan of the file on open (frame positions from the header);
- ``pyav sequential``: every packet decoded in order, only the chosen frames converted to RGB;
- ``torchcodec threads=0``: FFmpeg picks its threads (the others use one, as a DataLoader worker does);
- ``... resize``: the decoder scales to the longer side ``--max-side`` (decoder-side scaling);
  its difference is measured against the exact frames resized by PIL (bicubic), in grey levels.

Frames of the same size are compared with ``torchcodec exact`` (largest difference in grey levels).
Arms run interleaved round by round; seconds per sample is the median over rounds.

    python benchmarks/decode_modes.py [--rounds 3] [--episode-s 60] [--max-side 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from video_decode import write_clip  # noqa: E402

from hpc_train.data.decoding.bundled_ffmpeg import load_bundled_ffmpeg  # noqa: E402
from hpc_train.data.decoding.media import VideoSampling, sample_frame_indices  # noqa: E402

Decode = Callable[[Path, np.ndarray, int], np.ndarray]


def decord_seek(path: Path, idx: np.ndarray, max_side: int) -> np.ndarray:
    from decord import VideoReader, cpu

    return VideoReader(os.fspath(path), ctx=cpu(0), num_threads=1).get_batch(idx.tolist()).asnumpy()


def decord_resize(path: Path, idx: np.ndarray, max_side: int) -> np.ndarray:
    from decord import VideoReader, cpu

    width, height = scaled(path, max_side)
    video = VideoReader(os.fspath(path), ctx=cpu(0), num_threads=1, width=width, height=height)
    return video.get_batch(idx.tolist()).asnumpy()


def torchcodec(seek_mode: str = "exact", threads: int = 1, resize: bool = False) -> Decode:
    def decode(path: Path, idx: np.ndarray, max_side: int) -> np.ndarray:
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        transforms = [Resize(tuple(reversed(scaled(path, max_side))))] if resize else None
        video = VideoDecoder(os.fspath(path), dimension_order="NHWC", num_ffmpeg_threads=threads,
                             seek_mode=seek_mode, transforms=transforms)
        return video.get_frames_at(idx.tolist()).data.numpy()

    return decode


def pyav_sequential(path: Path, idx: np.ndarray, max_side: int) -> np.ndarray:
    import av

    wanted, frames = set(idx.tolist()), []
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= idx[-1]:
                break
    return np.stack(frames)


ARMS: dict[str, Decode] = {
    "decord seek": decord_seek,
    "torchcodec exact": torchcodec(),
    "torchcodec approximate": torchcodec("approximate"),
    "pyav sequential": pyav_sequential,
    "torchcodec threads=0": torchcodec(threads=0),
    "torchcodec exact resize": torchcodec(resize=True),
    "torchcodec approximate resize": torchcodec("approximate", resize=True),
    "decord resize": decord_resize,
}
RESIZED = {name for name in ARMS if name.endswith("resize")}


def scaled(path: Path, max_side: int) -> tuple[int, int]:
    """``(width, height)`` with the longer side ``max_side`` (even sizes, as encoders like)."""
    from hpc_train.data.decoding.media import video_size

    width, height = video_size(path)
    ratio = min(1.0, max_side / max(width, height))
    return max(2, round(width * ratio / 2) * 2), max(2, round(height * ratio / 2) * 2)


def pil_resized(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])


def kinds(folder: Path, episode_s: float) -> dict[str, tuple[Path, np.ndarray]]:
    clip = write_clip(folder / "clip540.mp4", "h264", 8, seed=1, size=(960, 540), fps=30)
    episode = write_clip(folder / "episode1080.mp4", "h264", episode_s, seed=2, size=(1920, 1080), fps=24)
    uniform = VideoSampling(mode="uniform", num_frames=16, fps=1.0, max_frames=32)
    dense = VideoSampling(mode="fps", num_frames=16, fps=8.0, max_frames=64)
    per_second = VideoSampling(mode="fps", num_frames=16, fps=1.0, max_frames=32)
    return {"540p 8 s, 16 uniform": (clip, sample_frame_indices(240, 30.0, uniform)),
            "540p 8 s, 8/s (64)": (clip, sample_frame_indices(240, 30.0, dense)),
            f"1080p {episode_s:g} s, 1/s (32)": (episode, sample_frame_indices(int(episode_s * 24), 24.0,
                                                                               per_second))}


def difference(name: str, frames: np.ndarray, exact: np.ndarray, path: Path, max_side: int) -> str:
    reference = pil_resized(exact, scaled(path, max_side)) if name in RESIZED else exact
    if frames.shape != reference.shape:
        return f"shape {frames.shape}"
    gap = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    return f"max {int(gap.max())}, mean {gap.mean():.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--episode-s", type=float, default=60.0)
    parser.add_argument("--max-side", type=int, default=512)
    args = parser.parse_args(argv)
    load_bundled_ffmpeg()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for kind, (path, idx) in kinds(Path(tmp), args.episode_s).items():
            exact = ARMS["torchcodec exact"](path, idx, args.max_side)
            times: dict[str, list[float]] = {name: [] for name in ARMS}
            said: dict[str, str] = {}
            for _ in range(args.rounds):
                for name, decode in ARMS.items():
                    start = time.perf_counter()
                    frames = decode(path, idx, args.max_side)
                    times[name].append(time.perf_counter() - start)
                    said[name] = difference(name, frames, exact, path, args.max_side)
            base = statistics.median(times["torchcodec exact"])
            print(f"\n{kind}: {len(idx)} frames of {path.name} ({os.path.getsize(path) / 2**20:.1f} MiB)")
            print(f"  {'arm':30s} {'s/sample':>9s} {'vs exact':>9s}  frames against the reference")
            for name, spent in times.items():
                median = statistics.median(spent)
                print(f"  {name:30s} {median:9.3f} {base / median:8.2f}x  {said[name]}")


if __name__ == "__main__":
    main()
