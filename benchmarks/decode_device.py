"""The GPU's video decoder (``data.video.device=cuda``: torchcodec on NVDEC) against CPU decoding,
side by side: seconds per sample and how far the frames are apart, on an H.264 clip made here
(libx264 ``veryfast``, a keyframe every 250 frames, as cameras and the web write it).

    python benchmarks/decode_device.py [--device cuda] [--seconds 60] [--size 1920x1080] [--frames 32]

``--device cpu`` runs the device path on the CPU (CI runs it so, through ``gpu_check.sh --cpu``):
the frames must then be identical. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from video_decode import write_clip  # noqa: E402

from hpc_train.data.decoding.media import VideoSampling, load_video  # noqa: E402
from hpc_train.data.video_on_device import decode_on_device  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    width, height = (int(x) for x in args.size.split("x"))
    sampling = VideoSampling(mode="uniform", num_frames=args.frames, max_frames=args.frames, backend="torchcodec")
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", "h264", args.seconds, seed=3, size=(width, height), fps=24)
        host = load_video(clip, sampling).frames
        device = decode_on_device(clip, sampling, None, args.device).frames
        times: dict[str, list[float]] = {"cpu": [], args.device: []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            load_video(clip, sampling)
            times["cpu"].append(time.perf_counter() - start)
            start = time.perf_counter()
            decode_on_device(clip, sampling, None, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[args.device].append(time.perf_counter() - start)
    gap = np.abs(device.cpu().numpy().astype(np.int16) - host.astype(np.int16))
    result = {"device": args.device, "clip": f"{width}x{height}, {args.seconds:g} s, {args.frames} frames",
              "cpu_s": statistics.median(times["cpu"]), "device_s": statistics.median(times[args.device]),
              "max_grey_levels": int(gap.max()), "mean_grey_levels": float(gap.mean()),
              "same_shape": tuple(device.shape) == host.shape}
    result["speedup"] = result["cpu_s"] / result["device_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
