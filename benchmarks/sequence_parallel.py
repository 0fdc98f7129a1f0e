"""Sequence parallelism's per-rank cost: one long video per micro-batch, N ranks sharing it
(``train.sequence_parallel=N``) against the same N ranks each training a whole one (data
parallel), side by side in one run on this machine.

Both arms run the same ranks under the same ZeRO-2 partitioning (small gradient buckets), so what differs per rank is
what one sample costs: the activations (rank 0's peak of live tensor bytes during the second
step above what was live when it began, :class:`profiling.live_tensors.LiveTensorBytes`), the
vision tower's frames (counted at the tower), the video frames each rank decodes, and the step
time per sample (the median of steps 2.. from the metrics; the data-parallel arm trains N
samples per step, the shared arm one).

    python benchmarks/sequence_parallel.py                           # tiny SmolVLM, 2 ranks, 96 frames
    python benchmarks/sequence_parallel.py --model smolvlm-256m --size 3 --frames 24
    python benchmarks/sequence_parallel.py --set train.tiled_mlp=4   # both arms with tiled MLPs

Prints one table; the goal is activations per rank <= 0.6x at N = 2 (about 1/N) and the
tower's frames and the decoded frames per rank 1/N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "tiny-smolvlm": ["tiny_smolvlm", "train.mode=full"],
    "tiny-llava": ["tiny_llava_onevision", "train.mode=full"],
    # The published architecture with random weights; LoRA on the language model, frozen tower.
    "smolvlm-256m": ["smolvlm_lora", "model.path=null", "model.preset=smolvlm-256m", "lora.target=llm"],
}


def worker(args: list[str], result: Path) -> None:
    """One rank: its activation peak during step 2, frames its tower encoded and its loader decoded, step times."""
    from hpc_train.config_file import load_config
    from hpc_train.dist import read_dist_env
    from hpc_train.train.build import build_run
    from hpc_train.train.profile_report import vision_tower
    from hpc_train.train.trainer import TrainLoop
    from profiling.live_tensors import LiveTensorBytes

    live = LiveTensorBytes()
    frames = [0]
    with live:
        parts = build_run(load_config(args[0], args[1:]), read_dist_env())
        engine = parts.training.engine
        step, marks = engine.step, []

        def step_then_mark() -> None:
            step()
            if not marks:  # after step 1's update: Adam's moments exist from here on
                live.mark()
                marks.append(live.current)

        def count(module: object, args: tuple, kwargs: dict) -> None:
            frames[0] += (args[0] if args else kwargs["pixel_values"]).shape[0]

        media, decoded = parts.train.dataset.media, [0]
        load = media.load

        def counting_load(record: object) -> object:
            out = load(record)
            decoded[0] += sum(len(v.frames) if v.decoded is None else v.decoded[1] - v.decoded[0] for v in out.videos)
            return out

        engine.step, media.load = step_then_mark, counting_load
        vision_tower(parts.loaded.model, parts.loaded.family).register_forward_pre_hook(count, with_kwargs=True)
        TrainLoop(parts).train()
    rows = [json.loads(line) for line in (Path(parts.config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    result.write_text(json.dumps({"activation_peak": live.peak_since_mark - marks[0], "frames": frames[0], "decoded": decoded[0],
                                  "steps": len(times) + 1, "step_s": statistics.median(times)}))


def measured(args: list[str], ranks: int, folder: Path) -> list[dict]:
    from hpc_train.topology import free_port

    port, procs = str(free_port()), []
    folder.mkdir(parents=True)
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(folder / f"rank{rank}.json"), "--",
                                       *args], env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(folder / f"rank{rank}.log", "w")))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"run failed ({codes}); see {folder}/rank0.log")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-smolvlm")
    parser.add_argument("--size", type=int, default=2, help="ranks sharing a sample (and ranks of the run)")
    parser.add_argument("--frames", type=int, default=96, help="frames of the one video of each sample")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both arms (e.g. train.tiled_mlp=4)")
    opts = parser.parse_args(argv)
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset

    with tempfile.TemporaryDirectory(prefix="sp-bench-") as tmp:
        root = Path(tmp)
        make_dataset(root / "data", SyntheticSpec(n_train=4 * opts.size * opts.steps, n_eval=0, kinds=("video",),
                                                  weights={"video": 1.0}, video_frames=opts.frames))
        # ZeRO-2 as shipped, with small gradient buckets: the shipped 50M-element ones (0.4 GB
        # in fp32, the same in both arms) would hide a small model's activations.
        ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
        ds["zero_optimization"].update(reduce_bucket_size=200_000, allgather_bucket_size=200_000)
        (root / "zero2_small_buckets.json").write_text(json.dumps(ds))
        recipe, *extra = MODELS[opts.model]
        common = [recipe, *extra, f"data.train={root / 'data' / 'train.jsonl'}", "data.eval=null",
                  "data.num_workers=0", "data.video.sampling=uniform", f"data.video.num_frames={opts.frames}",
                  f"data.video.max_frames={opts.frames}", "data.max_seq_len=1000000", "train.micro_batch_size=1",
                  "train.grad_accum=1", f"train.max_steps={opts.steps}", "train.device=cpu", "model.dtype=fp32",
                  "profile.enabled=false", "eval.generate=false",
                  f"deepspeed.config={root / 'zero2_small_buckets.json'}", *opts.set]
        whole = measured([*common, f"output_dir={root / 'dp'}"], opts.size, root / "dp-ranks")
        shared = measured([*common, f"output_dir={root / 'sp'}", f"train.sequence_parallel={opts.size}"], opts.size,
                          root / "sp-ranks")
    print(f"{opts.model}{''.join(' ' + o for o in opts.set)}, one {opts.frames}-frame video per sample, "
          f"{opts.size} ranks, fp32 on the CPU "
          f"(step 2's peak above its start, rank 0; step time median of steps 2..{opts.steps})")
    per_sample = {"dp": whole[0]["step_s"], "sp": shared[0]["step_s"]}
    rows = [("activations per rank (MiB)", whole[0]["activation_peak"] / 2**20, shared[0]["activation_peak"] / 2**20),
            ("tower frames per rank per step", whole[0]["frames"] / opts.steps, shared[0]["frames"] / opts.steps),
            ("frames decoded per rank per step", whole[0]["decoded"] / opts.steps, shared[0]["decoded"] / opts.steps),
            ("step time (s): a sample per rank / per group", per_sample["dp"], per_sample["sp"])]
    print(f"{'':34}{'whole sample per rank':>24}{f'N = {opts.size} sharing one':>24}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:34}{a:>24.2f}{b:>24.2f}{b / a:>8.2f}")
    print(f"goal: activations <= {0.6 if opts.size == 2 else 1.2 / opts.size:.2f}x (about 1/{opts.size}); "
          f"frames 1/{opts.size}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[4:], Path(sys.argv[2]))
    else:
        main()
