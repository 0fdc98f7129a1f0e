"""Video decoding, decord against torchcodec: frames/s through hpc-train's own ``load_video``, in
DataLoader workers as training runs it, side by side.

Synthetic clips (moving colour gradients with noise, so the encoder has real work) are encoded
once with PyAV: H.264 (libx264, a keyframe every 250 frames as x264 writes by default: what
cameras and the web deliver) and MPEG-4 Part 2 (what the test data's OpenCV writer makes), short
(10 s) and long (several minutes). Every arm decodes the same clips with uniform sampling of 8 or
32 frames; arms are interleaved round by round, and frames/s is the median over rounds. Before
timing, both decoders' frames are compared on every clip (largest difference in grey levels).

    python benchmarks/video_decode.py [--long-s 180] [--workers 2] [--items 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpc_train.data.decoding.media import VideoSampling, load_video  # noqa: E402
from hpc_train.data.decoding.video_backends import BACKENDS, describe_torchcodec  # noqa: E402

CODECS = {"h264": "libx264", "mpeg4": "mpeg4"}
FPS = 30
SIZE = (640, 360)


def write_clip(path: Path, codec: str, seconds: float, seed: int, *, size: tuple[int, int] = SIZE, fps: int = FPS,
               preset: str = "veryfast") -> Path:
    """``seconds`` of video (640x360 at 30 fps unless asked): a gradient that drifts, plus noise."""
    import av

    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    colour = rng.uniform(0.3, 1.0, size=(1, 1, 3)).astype(np.float32)
    noise = rng.normal(0, 6, (7, height, width, 1)).astype(np.float32)  # cycled: drawing it is slow
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[codec], rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "h264":
            stream.options = {"preset": preset, "g": "250"}
        for i in range(int(seconds * fps)):
            frame = np.roll(ramp, 4 * i, axis=1) * colour + noise[i % len(noise)]
            image = np.broadcast_to(np.clip(frame, 0, 255), (height, width, 3)).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


class Decodes:
    """``items`` decodes, cycling over the clips, with one backend's uniform sampling."""

    def __init__(self, clips: list[Path], sampling: VideoSampling, items: int) -> None:
        self.clips, self.sampling, self.items = clips, sampling, items

    def __len__(self) -> int:
        return self.items

    def __getitem__(self, i: int) -> int:
        return len(load_video(self.clips[i % len(self.clips)], self.sampling).frames)


def frames_per_second(clips: list[Path], frames: int, backend: str, workers: int, items: int) -> float:
    """Worker start-up included, as a training epoch pays it."""
    from torch.utils.data import DataLoader

    sampling = VideoSampling(num_frames=frames, max_frames=frames, backend=backend)
    loader = DataLoader(Decodes(clips, sampling, items), batch_size=None, num_workers=workers)
    start = time.perf_counter()
    decoded = sum(loader)
    return decoded / (time.perf_counter() - start)


def largest_difference(clips: list[Path], frames: int) -> int:
    out = 0
    for clip in clips:
        a, b = (load_video(clip, VideoSampling(num_frames=frames, max_frames=frames, backend=x)).frames
                for x in BACKENDS)
        out = max(out, int(np.abs(a.astype(np.int16) - b).max()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short-s", type=float, default=10.0)
    parser.add_argument("--long-s", type=float, default=180.0)
    parser.add_argument("--clips", type=int, default=2, help="distinct clips per codec and length")
    parser.add_argument("--items", type=int, default=12, help="decodes per arm and round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(describe_torchcodec())
    with tempfile.TemporaryDirectory() as folder:
        sets = {}
        for codec in CODECS:
            for name, seconds in (("short", args.short_s), ("long", args.long_s)):
                sets[codec, name] = [write_clip(Path(folder) / f"{codec}-{name}-{i}.mp4", codec, seconds, i)
                                     for i in range(args.clips)]
        print(f"{args.items} decodes of {args.clips} clips per row, {SIZE[0]}x{SIZE[1]} at {FPS} fps, {args.workers} DataLoader "
              f"workers, median of {args.rounds} interleaved rounds\n")
        print("| codec | clip | frames | largest difference | decord frames/s | torchcodec frames/s "
              "| torchcodec / decord |")
        print("|---|---|---|---|---|---|---|")
        for (codec, name), clips in sets.items():
            seconds = args.short_s if name == "short" else args.long_s
            for frames in (8, 32):
                rates = {b: [] for b in BACKENDS}
                for _ in range(args.rounds):
                    for backend in BACKENDS:
                        rates[backend].append(frames_per_second(clips, frames, backend, args.workers, args.items))
                decord, torchcodec = (statistics.median(rates[b]) for b in BACKENDS)
                print(f"| {codec} | {name} ({seconds:g} s) | {frames} | {largest_difference(clips, frames)} "
                      f"| {decord:,.1f} | {torchcodec:,.1f} | **{torchcodec / decord:.2f}×** |", flush=True)


if __name__ == "__main__":
    main()
