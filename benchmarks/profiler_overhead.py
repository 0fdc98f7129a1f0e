"""What profiling costs: step time profiled / unprofiled, measured side by side in one run.

    python benchmarks/profiler_overhead.py [--steps 60] [--family smolvlm] [--preset smolvlm-256m]

Both arms run the trainer's step shape (data wait, forward, backward, optimizer step) on the
same model and the same batches, alternating in blocks of ``--block`` steps (each arm walking the same batches) so that drift
(clocks, caches, thermal) falls on both equally. The profiled arm goes through
``profiling.Profiler`` (CUDA events on a GPU, perf_counter on a CPU, the vision-tower image
hook); the other through the trainer's no-op timer. Each step ends with a device
synchronize in both arms, only so the step can be timed from outside. Goal: ratio <= 1.01.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_train.config import DataConfig  # noqa: E402
from hpc_train.data.batching.collate import step_inputs  # noqa: E402
from hpc_train.data.pipeline import build_pipeline  # noqa: E402
from hpc_train.data.sources.records import read_records  # noqa: E402
from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset  # noqa: E402
from hpc_train.models.families import get_family  # noqa: E402
from hpc_train.models.presets import get_preset  # noqa: E402
from hpc_train.models.tiny import build_preset, build_tiny  # noqa: E402
from hpc_train.train.evaluate import to_device  # noqa: E402
from hpc_train.train.loss import token_mean_loss  # noqa: E402
from hpc_train.train.profile_report import trainability, vision_tower  # noqa: E402
from hpc_train.train.step_timer import NoTimer, StepTimer  # noqa: E402
from profiling.profiler import Profiler  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=96, help="measured steps per arm")
    parser.add_argument("--block", type=int, default=0, help="steps per arm before switching (0: one pass "
                        "over the batches)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--family", default="smolvlm", choices=["smolvlm", "llava_onevision"])
    parser.add_argument("--preset", help="a published architecture (random weights) instead of the tiny model")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    family = get_preset(args.preset).family if args.preset else args.family
    model, processor = (build_preset(args.preset, dtype=dtype) if args.preset else build_tiny(family))
    model.to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(tmp, SyntheticSpec(n_train=64, n_eval=8, seed=0))
        cfg = DataConfig(video={"num_frames": 4})
        records = read_records(Path(tmp) / "train.jsonl", media_root=cfg.media_root)
        pipeline = build_pipeline(cfg, processor, get_family(family))
        dataset = pipeline.dataset(records)
        collate = pipeline.collator()
        samples = [dataset[i] for i in range(len(dataset))]
    batches = [collate(samples[i:i + args.batch]) for i in range(0, len(samples), args.batch)]

    profiler = Profiler(device, warmup_steps=0)
    profiler.describe_model(model.config, trainability(model, get_family(family)))
    tower = vision_tower(model, get_family(family))
    if tower is not None:
        profiler.count_images(tower)
    # each arm walks the same batches in the same order
    arms: dict[str, tuple[StepTimer, Iterator[dict], list[float]]] = {
        "profiled": (profiler, itertools.cycle(batches), []),
        "unprofiled": (NoTimer(), itertools.cycle(batches), [])}

    def step(timer: StepTimer, feed: Iterator[dict]) -> float:
        began = time.perf_counter()
        timer.step_begin()
        with timer.phase("data_wait"):
            batch = next(feed)
            inputs = to_device(step_inputs(batch), device, dtype)
        with timer.phase("forward"):
            loss = token_mean_loss(model, inputs).value  # the trainer's loss
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timer.step_done(samples=len(batch["sample_ids"]), tokens=batch["num_real_tokens"],
                        slot_tokens=batch["num_slots"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    warm = itertools.cycle(batches)
    for _ in range(len(batches)):  # warm-up: allocator, kernels, caches
        step(NoTimer(), warm)
    block = args.block or len(batches)
    while len(arms["profiled"][2]) < args.steps:
        for timer, feed, times in arms.values():
            times.extend(step(timer, feed) for _ in range(block))
    report = profiler.rank_report(dtype=dtype)
    medians = {name: statistics.median(times) * 1000 for name, (_, _, times) in arms.items()}
    ratio = medians["profiled"] / medians["unprofiled"]
    where = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU"
    print(f"{args.preset or 'tiny ' + family} on {where}, {args.steps} steps per arm in blocks of {block}, "
          f"batch {args.batch}")
    print(f"median step: profiled {medians['profiled']:.2f} ms, unprofiled {medians['unprofiled']:.2f} ms")
    print(f"phases cover {100 * report['phase_coverage']:.1f}% of the profiled steps' time")
    print(f"ratio profiled / unprofiled: {ratio:.4f} (goal <= 1.01: {'met' if ratio <= 1.01 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
