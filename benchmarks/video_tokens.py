"""What a video costs SmolVLM2-500M, fed as its own processor feeds it against as before (each frame
a split image), at the published processor settings (512-px tiles of 64 tokens, images resized to
2048 px on the long edge and split, frames one unsplit tile on the video path).

    python benchmarks/video_tokens.py                 # tokens, then the plans (H100-80GB, one GPU)
    python benchmarks/video_tokens.py --no-plan       # tokens only

Before: ``model.preset=smolvlm-500m data.video.split_frames=true`` (the same architecture as
SmolVLM2-500M, every frame split as an image: what a SmolVLM2 folder got before it had a family of
its own). After: ``model.preset=smolvlm2-500m`` (its processor's video path). Both plans come from
``hpc-train plan ... --gpu H100-80GB --search off`` on the smolvlm2_lora recipe (LoRA, frozen
tower), one sample per micro-batch: an 8-frame clip (uniform sampling) and a 25-minute video at
1 frame a second (1,500 frames).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE = ["model.preset=smolvlm-500m", "data.video.split_frames=true"]
AFTER = ["model.preset=smolvlm2-500m"]


def encoders() -> dict[str, object]:
    from hpc_train.data.encoding.tokenize import ChatEncoder
    from hpc_train.models.families import get_family
    from hpc_train.models.tiny import preset_processor

    published = preset_processor("smolvlm2-500m")
    return {"before": ChatEncoder(published, get_family("smolvlm"), split_frames=True),
            "after": ChatEncoder(published, get_family("smolvlm2"))}


def sample_tokens(encoder: object, frames: int, height: int, width: int) -> tuple[int, int]:
    """(all tokens, image tokens) of a one-turn sample holding one video of ``frames`` frames."""
    from hpc_train.data.decoding.media import VideoFrames
    from hpc_train.data.encoding.tokenize import SampleMedia
    from hpc_train.data.sources.records import Record, Turn

    video = VideoFrames(frames=np.full((frames, height, width, 3), 128, dtype=np.uint8),
                        timestamps=np.arange(frames, dtype=np.float64), native_fps=1.0, num_source_frames=frames)
    record = Record(id="v", turns=(Turn("user", "<video>\nWhat happens?"), Turn("assistant", "A ball rolls.")),
                    images=(), videos=(Path("v.mp4"),), audios=(), source=Path("bench.jsonl"), line=1)
    sample = encoder.encode(record, SampleMedia(videos=[video]))
    image_id = encoder.tokenizer.convert_tokens_to_ids("<image>")
    return len(sample), int((sample.input_ids == image_id).sum())


def token_table() -> list[str]:
    made = encoders()
    rows = ["| frame size | frames | before: tokens (image) | after: tokens (image) | after / before |", "|---|---|---|---|---|"]
    for (height, width), counts in (((360, 640), (1, 4, 64)), ((480, 480), (1, 4))):
        for frames in counts:
            before = sample_tokens(made["before"], frames, height, width)
            after = sample_tokens(made["after"], frames, height, width)
            rows.append(f"| {width}x{height} | {frames} | {before[0]:,} ({before[1]:,}) | {after[0]:,} ({after[1]:,}) "
                        f"| {after[0] / before[0]:.3f}x |")
    return rows


def write_video(path: Path, seconds: int, fps: int, size: tuple[int, int]) -> Path:
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            image = np.full((height, width, 3), (i * 7) % 255, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def plan(folder: Path, video: str, arm: list[str], *extra: str) -> dict:
    data = folder / f"{Path(video).stem}.jsonl"
    data.write_text(json.dumps({"id": "v", "video": video, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A ball rolls."}]}) + "\n")
    out = folder / "plan.json"
    args = [sys.executable, "-m", "hpc_train", "plan", "smolvlm2_lora", "model.path=null", *arm, f"data.train={data}",
            "data.eval=null", "data.vision_cache=null", "data.max_seq_len=2000000", "train.grad_accum=1",
            f"output_dir={folder / 'run'}", *extra, "--gpu", "H100-80GB", "--search", "off", "--json", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=3000)
    if not out.is_file():
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(out.read_text())


def plan_row(name: str, arm: str, found: dict) -> str:
    if "error" in found:
        return f"| {name} | {arm} | not planned: {found['error']} | | | | |"
    step = found.get("time", {}).get("seconds_per_step", [])
    steps = f"{min(step):.3g}–{max(step):.3g}" if step else "?"
    return (f"| {name} | {arm} | {found['batch']['tokens']:,} | {found['peak_allocated_gib']:.2f} | "
            f"{found['needs_gib']:.2f} ({'fits' if found['fits'] else 'does not fit'}) | {steps} | "
            f"{found['plan_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-plan", action="store_true")
    parser.add_argument("--no-tokens", action="store_true")
    args = parser.parse_args()
    if not args.no_tokens:
        print("\n".join(token_table()), flush=True)
    if args.no_plan:
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_video(folder / "clip8.mp4", 10, 24, (640, 360))
        write_video(folder / "long.mp4", 1500, 1, (640, 360))
        print("\n| sample | arm | tokens | peak allocated GiB | needs GiB (H100 80 GB) | step s (efficiency range) "
              "| plan took s |\n|---|---|---|---|---|---|---|", flush=True)
        eight = ["data.video.sampling=uniform", "data.video.num_frames=8"]
        long = ["data.video.sampling=fps", "data.video.fps=1", "data.video.max_frames=1500",
                "train.gradient_checkpointing=true"]
        for name, video, extra, arms in (("8 frames", "clip8.mp4", eight, ("before", "after")),
                                         ("25 min at 1 fps", "long.mp4", long, ("after",))):
            for arm in arms:
                found = plan(folder, video, BEFORE if arm == "before" else AFTER, *extra)
                print(plan_row(name, arm, found), flush=True)
        print(f"| 25 min at 1 fps | before | {long_tokens_before(1500):,} (1 and 2 frames measured, extrapolated) | "
              "not planned: the processor alone would hold 1,500 frames at 2048x1152 px (42 GB of pixels) | | | |")


def long_tokens_before(frames: int) -> int:
    """A sample's tokens with ``frames`` 640x360 frames each split as an image: linear in the frames."""
    before = encoders()["before"]
    one, two = (sample_tokens(before, n, 360, 640)[0] for n in (1, 2))
    return one + (two - one) * (frames - 1)


if __name__ == "__main__":
    main()
