"""``hpc-train plan``'s predicted peak against the peak real runs reach, side by side.

Each case is a real DeepSpeed run (1 or 2 ranks, a fresh process per rank) over one epoch of a
video-only synthetic set, so its batches are as hungry as the planner's worst one. The measured
side is :class:`profiling.live_tensors.LiveTensorBytes` (every live tensor storage, counted as
the run allocates and frees it), from the end of the build (model loaded, engine made) to
the end of training, on rank 0; the predicted side is the plan of the same config, made in this
process with fake tensors. Nothing is shared between the two but the config.

    python benchmarks/plan_accuracy.py                 # a covering set of cases (~25 min on 2 cores)
    python benchmarks/plan_accuracy.py --all           # every combination
    python benchmarks/plan_accuracy.py --models tiny-smolvlm --modes lora
    python benchmarks/plan_accuracy.py --sequence-parallel 2   # the same cases, 2 ranks sharing each micro-batch
    python benchmarks/plan_accuracy.py --gpu           # on a GPU: smolvlm-256m and smolvlm-2.2b, bf16,
                                                       # torch.cuda.max_memory_allocated and step time (~4 min)

The last line is the worst case's error, e.g. ``worst error: 2.1% (qlora, zero3, gc off, packed, 2 ranks, tiny-llava)``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {
    "tiny-smolvlm": ["tiny_smolvlm", "data.max_seq_len=512", "train.micro_batch_size=8"],
    "tiny-llava": ["tiny_llava_onevision", "data.max_seq_len=512", "train.micro_batch_size=8"],
    # The published architecture (random weights) at a short length: 2 frames of 64 tokens a sample.
    "smolvlm-256m": ["smolvlm_lora", "model.path=null", "model.preset=smolvlm-256m", "data.max_seq_len=640",
                     "train.micro_batch_size=2", "data.video.num_frames=2", "lora.target=llm", "train.max_steps=2"],
}
GPU_MODELS = {
    name: ["smolvlm_lora", "model.path=null", f"model.preset={name}", "data.max_seq_len=2048",
           "train.micro_batch_size=4", "data.video.num_frames=8", "lora.target=llm", "train.max_steps=8"]
    for name in ("smolvlm-256m", "smolvlm-2.2b")}
"""On a GPU: the published sizes in bf16, longer rows, 8 steps (2 of warm-up in the report)."""
GPU_CASES = [("smolvlm-256m", "lora", False), ("smolvlm-256m", "full", True), ("smolvlm-2.2b", "lora", True),
             ("smolvlm-2.2b", "full", False)]
"""Each mode and layout once per size: about a minute each on an H100 / H200."""
SAMPLES = {"tiny-smolvlm": 64, "tiny-llava": 64, "smolvlm-256m": 16, "smolvlm-2.2b": 64}
"""Records per set: padded, 8 steps at 1 rank (tiny); packed rows hold 4-11 samples. The 256M
runs stop after 2 steps, both in the first epoch: the second is the first whose backward has
Adam's moments beside it and, under ZeRO-3, the first DeepSpeed runs on the step's recorded
trace (prefetching ahead, keeping what the step uses again), and with the recipe's vision cache
it still runs the tower (a second epoch would read every sample's features from the cache)."""


def case_overrides(model: str, mode: str, zero: int, gc: bool, packed: bool, data: Path, out: Path, *,
                   gpu: bool = False) -> list[str]:
    recipe, *extra = (GPU_MODELS if gpu else MODELS)[model]
    device = ["model.dtype=bf16", "profile.enabled=true", "profile.warmup_steps=2"] if gpu else \
        ["model.dtype=fp32", "train.device=cpu", "profile.enabled=false"]
    return [recipe, *extra, f"data.train={data}/train.jsonl", "data.eval=null", f"output_dir={out}",
            f"train.mode={mode}", f"deepspeed.config=ds_configs/zero{zero}.json",
            f"train.gradient_checkpointing={str(gc).lower()}", f"data.packing={str(packed).lower()}",
            *(["train.micro_batch_size=1"] if packed else []),  # one row of max_seq_len tokens
            "data.num_workers=0", *device, "train.epochs=2", "train.grad_accum=1", "data.video.sampling=uniform"]


def worker(args: list[str], result: Path) -> None:
    """One rank of a real run: its live-tensor peak over training, written to ``result``."""
    from hpc_train.config_file import load_config
    from hpc_train.dist import read_dist_env
    from hpc_train.train.build import build_run
    from hpc_train.train.trainer import TrainLoop
    from profiling.live_tensors import LiveTensorBytes

    config = load_config(args[0], args[1:])
    if config.train.device != "cpu":
        return gpu_worker(config, result)
    live = LiveTensorBytes()
    with live:
        parts = build_run(config, read_dist_env())
        live.mark()
        resident = live.current
        TrainLoop(parts).train()
    result.write_text(json.dumps({"train_peak": live.peak_since_mark, "resident": resident, "run_peak": live.peak}))


def gpu_worker(config: Any, result: Path) -> None:
    """A real run on the GPU: PyTorch's allocated peak over training and the median step time."""
    import torch

    from hpc_train.dist import read_dist_env
    from hpc_train.train import run_outputs
    from hpc_train.train.build import build_run
    from hpc_train.train.trainer import TrainLoop

    parts = build_run(config, read_dist_env())
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    TrainLoop(parts).train()
    peak = torch.cuda.max_memory_allocated()
    run_outputs.finish(parts)  # the report, and the plan beside it (a plan made at the end, on the GPU)
    report = json.loads((Path(config.output_dir) / "profile" / "report.json").read_text())
    result.write_text(json.dumps({"train_peak": peak, "resident": resident, "step_s": report["step_ms"]["median"] / 1e3,
                                  "plan_beside": report["run"].get("plan")}))


def measured(args: list[str], ranks: int, folder: Path, *, gpu: bool = False) -> dict[str, int]:
    """Rank 0's training peak (and what it held before the first step) of the real run of
    ``args`` on ``ranks`` processes."""
    from hpc_train.topology import free_port

    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "DS_ACCELERATOR": "cuda" if gpu else "cpu", "OMP_NUM_THREADS": "1"}
        result = folder / f"rank{rank}.json"
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(result), "--", *args], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(folder / f"rank{rank}.log", "w")))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"real run failed ({codes}); see {folder}/rank0.log")
    if any(arg.startswith("train.sequence_parallel=") for arg in args):  # the plan is the hungriest rank's
        return max((json.loads((folder / f"rank{r}.json").read_text()) for r in range(ranks)),
                   key=lambda m: m["train_peak"])
    return json.loads((folder / "rank0.json").read_text())


def predicted(args: list[str], ranks: int, *, gpu: bool = False) -> dict[str, object]:
    from hpc_train.config_file import load_config
    from hpc_train.plan.command import make_plan
    from hpc_train.plan.gpus import planned_gpu

    plan = make_plan(load_config(args[0], args[1:]), planned_gpu("auto") if gpu else None, gpus_per_node=ranks,
                     bf16=gpu, search="off")
    memory = plan.memory
    return {"train_peak": memory.peak, "resident": memory.states.resident, "moment": memory.peak_moment,
            "seconds": plan.seconds, "step_s": plan.time.seconds if plan.time else None}


def splits_over(args: list[str], size: int) -> bool:
    """Whether the model of ``args`` takes sequence-parallel groups of ``size``."""
    from hpc_train.config_file import load_config
    from hpc_train.models.sequence_parallel import allowed_sizes
    from hpc_train.plan.fake_model import model_config

    architecture = model_config(load_config(args[0], args[1:]))
    return size in allowed_sizes(getattr(architecture, "text_config", architecture), size)


def make_data(folder: Path, n: int) -> None:
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset

    make_dataset(folder, SyntheticSpec(n_train=n, n_eval=0, kinds=("video",), weights={"video": 1.0},
                                       video_frames=4))


def cases(models: list[str], modes: list[str], every: bool) -> list[tuple]:
    grid = list(itertools.product(models, modes, (2, 3), (False, True), (False, True), (1, 2)))
    if every:
        return grid
    # A covering set: every mode x stage, with checkpointing, packing and ranks varied so each
    # pair of their values appears for every model.
    pattern = [(False, False, 1), (True, True, 2), (False, True, 2), (True, False, 1)]
    out = []
    for model in models:
        for k, (mode, zero) in enumerate(itertools.product(modes, (2, 3))):
            gc, packed, ranks = pattern[k % len(pattern)]
            out.append((model, mode, zero, gc, packed, ranks))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["full", "lora", "qlora"], choices=["full", "lora", "qlora"])
    parser.add_argument("--all", action="store_true", help="every combination instead of a covering set")
    parser.add_argument("--gpu", action="store_true", help="on this machine's GPU: the published sizes in bf16")
    parser.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                        help="every case on N ranks sharing each micro-batch (train.sequence_parallel=N); the "
                             "measured side is then the hungriest rank's")
    args = parser.parse_args(argv)
    if args.gpu:
        return gpu_main()
    worst: tuple[float, str] = (0.0, "")
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        root = Path(tmp)
        for model in args.models:
            make_data(root / f"data-{model}", SAMPLES[model])
        print(f"{'case':<58}{'predicted MiB':>14}{'measured MiB':>13}{'error':>8}"
              f"{'above resident pred/meas MiB':>31}  peak at / plan s")
        for n, (model, mode, zero, gc, packed, ranks) in enumerate(cases(args.models, args.modes, args.all)):
            name = (f"{mode}, zero{zero}, gc {'on' if gc else 'off'}, {'packed' if packed else 'padded'}, "
                    f"{ranks} rank{'s' if ranks > 1 else ''}, {model}")
            folder = root / f"case{n}"
            folder.mkdir()
            overrides = case_overrides(model, mode, zero, gc, packed, root / f"data-{model}", folder / "out")
            if args.sequence_parallel > 1:
                ranks = args.sequence_parallel
                overrides.append(f"train.sequence_parallel={ranks}")
                name = f"{name.rsplit(', ', 2)[0]}, sp {ranks}, {model}"
                if not splits_over(overrides, ranks):
                    print(f"{name:<58}skipped: its attention heads do not split over {ranks} ranks", flush=True)
                    continue
            real = measured(overrides, ranks, folder)
            plan = predicted(overrides, ranks)
            error = 100 * (plan["train_peak"] / real["train_peak"] - 1)
            above = (plan["train_peak"] - plan["resident"], real["train_peak"] - real["resident"])
            rows.append({"case": name, "predicted": plan, "measured": real, "error_pct": round(error, 2)})
            print(f"{name:<58}{plan['train_peak'] / 2**20:>14.1f}{real['train_peak'] / 2**20:>13.1f}{error:>7.2f}%"
                  f"{above[0] / 2**20:>19.1f} / {above[1] / 2**20:<9.1f}  {plan['moment']} / {plan['seconds']:.1f}",
                  flush=True)
            if abs(error) >= abs(worst[0]):
                worst = (error, name)
    print(json.dumps(rows), file=sys.stderr)
    print(f"worst error: {abs(worst[0]):.1f}% ({worst[1]})")


def gpu_main() -> None:
    """On a GPU: LoRA and full, padded and packed, smolvlm-256m and smolvlm-2.2b, one rank (GPU_CASES)."""
    worst: tuple[float, str] = (0.0, "")
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        root = Path(tmp)
        print(f"{'case':<44}{'predicted GiB':>14}{'measured GiB':>13}{'error':>8}   step s predicted / measured")
        for n, (model, mode, packed) in enumerate(GPU_CASES):
            data = root / f"data-{model}"
            if not data.is_dir():
                make_data(data, SAMPLES[model])
            folder = root / f"case{n}"
            folder.mkdir()
            overrides = case_overrides(model, mode, 2, True, packed, data, folder / "out", gpu=True)
            real = measured(overrides, 1, folder, gpu=True)
            plan = predicted(overrides, 1, gpu=True)
            error = 100 * (plan["train_peak"] / real["train_peak"] - 1)
            name = f"{mode}, zero2, gc on, {'packed' if packed else 'padded'}, {model}"
            low, high = plan["step_s"] or (0, 0)
            print(f"{name:<44}{plan['train_peak'] / 2**30:>14.2f}{real['train_peak'] / 2**30:>13.2f}{error:>7.2f}%"
                  f"   {low:.3f}-{high:.3f} / {real['step_s']:.3f}  (report's own plan: {real['plan_beside']})",
                  flush=True)
            if abs(error) >= abs(worst[0]):
                worst = (error, name)
    print(f"worst error: {abs(worst[0]):.1f}% ({worst[1]})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[4:], Path(sys.argv[2]))
    else:
        main()
