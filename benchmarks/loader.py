"""Can the CPUs feed the GPU? The whole sample path (decode, processor, tokens and labels,
collation) in samples/s per CPU core, decoded and prepared (``data.prepared_media``), against
what an H100 consumes of the same samples; the verdict is the headroom, what 8 cores deliver
over what the GPU takes (>= 1.0: the GPU never waits for the loader).

Media are made here with PyAV, as cameras and the web deliver them (H.264, a keyframe every
250 frames): short 540p 30 fps clips (Ego4D-like narrations, 16 frames each), long 1080p 24 fps
episodes sampled at 1 fps up to 32 frames (captioning-like), and 1024x768 JPEG photos. Each
family's published processor (the preset's, its settings as the hub folders have them) encodes
them with LoRA recipes' settings. The GPU's demand is model FLOPs per sample (``profiling.flops``,
LoRA on the language model) over an H100's dense bf16 peak at 15% and 40% MFU, the range
``hpc-train plan`` gives step times for; the headroom quoted is at 40% (the hungrier GPU).

    python benchmarks/loader.py [--samples 8] [--episode-s 60] [--families smolvlm2 llava_onevision]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from video_decode import write_clip  # noqa: E402  (the same synthetic H.264 clips)

from hpc_train.config_file import load_config  # noqa: E402
from hpc_train.data.caches.prepared_media import PreparedMedia  # noqa: E402
from hpc_train.data.decoding.media import load_video, video_sampling  # noqa: E402
from hpc_train.data.encoding.tokenize import EncodedSample  # noqa: E402
from hpc_train.data.pipeline import build_pipeline  # noqa: E402
from hpc_train.data.sources.mixture import read_split  # noqa: E402
from hpc_train.models.families import get_family  # noqa: E402
from hpc_train.models.presets import get_preset  # noqa: E402
from hpc_train.models.tiny import preset_processor  # noqa: E402
from hpc_train.prepare_media import prepare_media, run_videos  # noqa: E402
from profiling.flops import (  # noqa: E402
    ModelShape,
    Trainability,
    VisionWork,
    grid_work,
    peak_tflops,
    shape_of,
    step_flops,
)

PRESETS = {"smolvlm2": "smolvlm2-256m", "llava_onevision": "llava-onevision-0.5b",
           "llava_onevision_1_5": "llava-onevision-1.5-4b"}
MIXES = {  # name: (media kinds, cycled, and the run's video sampling)
    "ego 540p clips": (["ego"], ["data.video.sampling=uniform", "data.video.num_frames=16", "data.video.max_frames=16"]),
    "1080p episodes at 1 fps": (["episode"], ["data.video.sampling=fps", "data.video.fps=1", "data.video.max_frames=32"]),
    "images": (["photo"], []),
    "half clips, half images": (["ego", "photo"], ["data.video.sampling=uniform", "data.video.num_frames=16",
                                                 "data.video.max_frames=16"]),
}
CORES = 8
H100 = "NVIDIA H100 80GB HBM3"
MFU = (0.15, 0.40)
ROUNDS = 2


def make_media(root: Path, episode_s: float) -> dict[str, list[str]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    media = {"ego": [], "episode": [], "photo": []}
    for i in range(3):
        media["ego"].append(str(write_clip(root / f"ego_{i}.mp4", "h264", 8, i, size=(960, 540), fps=30, preset="ultrafast").name))
        photo = root / f"photo_{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(photo, quality=90)
        media["photo"].append(photo.name)
    for i in range(2):
        media["episode"].append(str(write_clip(root / f"episode_{i}.mp4", "h264", episode_s, 10 + i, size=(1920, 1080), fps=24,
                                                    preset="ultrafast").name))
    return media


def write_mix(root: Path, name: str, kinds: list[str], media: dict[str, list[str]], count: int) -> Path:
    path = root / f"{name.replace(' ', '_').replace(',', '')}.jsonl"
    with path.open("w") as out:
        for i in range(count):
            kind = kinds[i % len(kinds)]
            item = media[kind][i % len(media[kind])]
            tag, key = ("<image>", "image") if kind == "photo" else ("<video>", "video")
            out.write(json.dumps({"id": f"{kind}_{i}", key: item, "conversations": [
                {"from": "human", "value": f"{tag}\nDescribe what happens, in one sentence."},
                {"from": "gpt", "value": "A coloured band drifts slowly across a noisy background from left to right."}]})
                + "\n")
    return path


def sample_flops(sample: EncodedSample, shape: ModelShape, trainability: Trainability) -> float:
    """Model FLOPs of one sample's training step (forward and backward)."""
    media = sample.media
    if "video_grid_thw" in media or "image_grid_thw" in media:
        work = VisionWork()
        for key in ("image_grid_thw", "video_grid_thw"):
            if key in media:
                work += grid_work(media[key])
        return step_flops(shape, trainability, tokens=len(sample), samples=1, images=work.images,
                          vision_rows=work.rows, vision_pairs=work.pairs).total
    images = 0
    for key in ("pixel_values", "pixel_values_videos"):
        if key in media:
            images += int(np.prod(media[key].shape[:-3]))  # every leading dim: tiles, frames
    return step_flops(shape, trainability, tokens=len(sample), samples=1, images=images).total


def measure(family: str, data: Path, store: Path, overrides: list[str], samples: int) -> dict[str, float]:
    config = load_config(f"{family}_lora", [f"model.preset={PRESETS[family]}", "model.path=null",
                                            f"data.train={data}", "data.eval=null", f"data.prepared_media={store}",
                                            "data.vision_cache=null",
                                            "data.max_seq_len=262144", *overrides])  # every sample kept
    processor = preset_processor(PRESETS[family])
    fam = get_family(family)
    split = read_split(config, "train")
    records = [split[i] for i in range(min(samples, len(split)))]
    result: dict[str, float] = {}
    done = prepare_media(config, shard=(0, 1), workers=0, say=lambda _: None)
    if done.stored:
        # prepare-media's own work per video (decode, resize, write), without its start-up
        scratch = PreparedMedia(store.with_name(store.name + "_timed"), config.data, processor, fam)
        sampling = video_sampling(config.data.video)
        started = time.perf_counter()
        for path, clip in run_videos(config):
            scratch.save(path, clip, load_video(path, sampling, clip=clip))
        result["prepare_videos_per_s"] = done.stored / (time.perf_counter() - started)
        result["prepared_mib_per_video"] = done.bytes_stored / done.stored / 2**20
    arms = {"decoded": config.data.model_copy(update={"prepared_media": None}), "prepared": config.data}
    shape = shape_of(get_preset(PRESETS[family]).build_config())
    trainability = Trainability(lora_params={"llm": int(0.005 * shape.text.matmul_params())})
    loaders = {arm: build_pipeline(data_config, processor, fam) for arm, data_config in arms.items()}
    for _ in range(ROUNDS):  # arms interleaved round by round; the best round of each
        for arm, pipeline in loaders.items():
            dataset, collate = pipeline.dataset(records), pipeline.collator()
            dataset[0]  # warm: imports, the processor's first call
            start = time.perf_counter()
            encoded = [dataset[i] for i in range(len(records))]
            for first in range(0, len(encoded), 8):
                collate(encoded[first:first + 8])
            rate = len(records) / (time.perf_counter() - start)
            result[f"{arm}_per_core"] = max(rate, result.get(f"{arm}_per_core", 0.0))
    kept = [s for s in encoded if isinstance(s, EncodedSample)]
    flops = float(np.mean([sample_flops(s, shape, trainability) for s in kept]))
    peak = peak_tflops(H100, "bf16").tflops * 1e12
    result["gpu_per_s_15"], result["gpu_per_s_40"] = (m * peak / flops for m in MFU)
    result["tokens"] = float(np.mean([len(s) for s in kept]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--episode-s", type=float, default=60.0)
    parser.add_argument("--families", nargs="+", default=list(PRESETS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        media = make_media(root, args.episode_s)
        print(f"| family | mix | tokens/sample | decoded samples/s/core | prepared samples/s/core | H100 consumes "
              f"(15-40% MFU) | headroom at {CORES} cores, decoded | prepared | prepared MiB/video | "
              "prepare-media videos/s/core |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for family in args.families:
            for name, (kinds, overrides) in MIXES.items():
                data = write_mix(root, name, kinds, media, args.samples)
                got = measure(family, data, root / f"store_{family}_{data.stem}", overrides, args.samples)
                demand = got["gpu_per_s_40"]
                print(f"| {family} | {name} | {got['tokens']:.0f} | {got['decoded_per_core']:.2f} | "
                      f"{got['prepared_per_core']:.2f} | {got['gpu_per_s_15']:.3g}-{demand:.3g} | "
                      f"{CORES * got['decoded_per_core'] / demand:.2f} | {CORES * got['prepared_per_core'] / demand:.2f} | "
                      f"{got.get('prepared_mib_per_video', 0.0):.1f} | {got.get('prepare_videos_per_s', 0.0):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
