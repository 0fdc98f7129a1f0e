"""The frozen-vision feature cache: epoch-2 / epoch-1 wall time of real training runs with it,
against the same run without it, side by side.

Each arm is a real single-process ``hpc-train train`` of two epochs (LoRA on the language model,
tower and connector frozen, the profiler on) over a video-heavy synthetic mix (70% videos, the
rest images, two-image samples and audio). With the cache, epoch 1 computes and stores every
sample's features and epoch 2 trains from them: no decoding, no tower. The epochs' wall times
come from each run's profile (``wall.epochs``); their losses must agree between the arms. Also
printed: the cache's bytes per video frame and image.

    python benchmarks/vision_cache.py [--model tiny-smolvlm|smolvlm-256m] [--samples 12] [--frames 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpc_train.data.sources.records import read_records  # noqa: E402
from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset  # noqa: E402
from hpc_train.train.metrics import read_metrics  # noqa: E402

MODELS = {"tiny-smolvlm": ["model.preset=tiny"], "smolvlm-256m": ["model.preset=smolvlm-256m", "model.path=null"]}
MIX = {"video": 0.7, "image": 0.15, "multi_image": 0.05, "audio": 0.1}


def train(out: Path, data: Path, model: str, frames: int, *extra: str) -> dict:
    """One two-epoch run: its profile's epochs, losses and wall time."""
    args = [f"output_dir={out}", f"data.train={data / 'train.jsonl'}", "data.eval=null", *MODELS[model],
            "model.dtype=fp32", "train.device=cpu", "train.mode=lora", "lora.target=llm", "train.epochs=2",
            "train.micro_batch_size=1", "train.log_every=1", "data.num_workers=1", "data.video.sampling=uniform",
            f"data.video.num_frames={frames}", f"data.video.max_frames={frames}", "data.max_seq_len=100000",
            "profile.warmup_steps=0", "eval.generate=false", *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "hpc_train", "train", "tiny_smolvlm", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    report = json.loads((out / "profile" / "report.json").read_text())
    epochs = {e["epoch"]: e["wall_s"] for e in report["wall_s"]["epochs"]}
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    return {"epochs": epochs, "losses": [s["loss"] for s in steps], "steps": steps}


def media_count(data: Path, frames: int) -> int:
    """Video frames and images (audio clips are one picture each) the run encodes per epoch."""
    records = read_records(data / "train.jsonl", media_root=None)
    return sum(len(r.images) + len(r.audios) + frames * len(r.videos) for r in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-smolvlm")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--frames", type=int, default=8)
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vision-cache-") as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        make_dataset(data, SyntheticSpec(n_train=opts.samples, n_eval=0, kinds=tuple(MIX), weights=MIX,
                                         video_frames=opts.frames, size=128))
        plain = train(Path(tmp) / "plain", data, opts.model, opts.frames)
        cached = train(Path(tmp) / "cached", data, opts.model, opts.frames, f"data.vision_cache={cache}")
        stored = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
        pictures = media_count(data, opts.frames)
    worst = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain["losses"], cached["losses"], strict=True))
    print(f"{opts.model}, {opts.samples} samples ({int(MIX['video'] * 100)}% {opts.frames}-frame videos), LoRA on "
          f"the language model, frozen tower, 2 epochs, micro-batch 1, fp32 on the CPU")
    print("| arm | epoch 1 (s) | epoch 2 (s) | epoch 2 / epoch 1 |")
    print("|---|---|---|---|")
    for name, arm in (("without the cache", plain), ("with the cache", cached)):
        first, second = arm["epochs"][0], arm["epochs"][1]
        print(f"| {name} | {first:.1f} | {second:.1f} | {second / first:.2f}x |")
    hits = sum(s.get("vision_cached_samples", 0) for s in cached["steps"][len(cached["steps"]) // 2:])
    print(f"epoch 2 with the cache / epoch 2 without: {cached['epochs'][1] / plain['epochs'][1]:.2f}x; "
          f"epoch-2 samples from the cache: {hits:.0f} of {opts.samples}; losses' largest relative difference "
          f"{worst:.1e}")
    print(f"cache: {stored / 2**20:.2f} MiB for {pictures} video frames and images, {stored / pictures / 1024:.1f} KiB "
          "each (fp32)")


if __name__ == "__main__":
    main()
