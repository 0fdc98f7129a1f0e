"""Device-to-host reads per optimizer step of the real training loop, by call site.

On a GPU each read is a stall: the host cannot queue more kernels until the device has caught
up. Counted on any machine by a dispatch mode around the loop's optimizer steps
(:mod:`profiling.host_reads`): ``scalar`` is PyTorch's scalar-read op (``.item()``,
``float(t)``, ``if t:``), the count the goal is set in; ``shape`` (data-dependent output
sizes) and ``tolist`` are listed as well. One rank, the tiny SmolVLM, DataLoader workers
collating, padded and packed batches; the first optimizer step is left out (warm-up).

    python benchmarks/host_reads.py [--grad-accum 8] [--steps 3] [--family smolvlm]

Goal (issue 14): at most 16 scalar reads per optimizer step at accumulation 8; none of ours per
micro-batch, at most two of ours per optimizer step; none from transformers' mask checks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_train.config_file import load_config  # noqa: E402
from hpc_train.dist import read_dist_env  # noqa: E402
from hpc_train.train.build import build_run  # noqa: E402
from hpc_train.train.trainer import TrainLoop  # noqa: E402
from profiling.host_reads import HostReads  # noqa: E402

SHAPES = {"padded": [], "packed": ["data.packing=true", "data.max_seq_len=256", "train.micro_batch_size=1"]}


def count(work: Path, family: str, shape: str, grad_accum: int, steps: int, *, data: Path | None = None,
          model: Path | None = None) -> tuple[HostReads, int]:
    """Reads during ``steps`` optimizer steps after one, in a run of its own under ``work``."""
    data, model = data or work / "data", model or work / family
    config = load_config(f"tiny_{family}", [
        f"output_dir={work / f'{family}-{shape}-{grad_accum}'}", f"model.path={model}", "model.preset=null",
        f"data.train={data / 'train.jsonl'}", "data.eval=null", "data.num_workers=2", "train.mode=full",
        "train.micro_batch_size=2", f"train.grad_accum={grad_accum}", "train.save_every=0", "train.eval_every=0",
        f"train.max_steps={steps + 1}", "train.log_every=1", "profile.enabled=false", *SHAPES[shape]])
    parts = build_run(config, read_dist_env({}))
    loop = TrainLoop(parts)
    micro = loop._micro_batches()
    loop._optimizer_step(micro)
    with HostReads() as reads:
        for _ in range(steps):
            loop._optimizer_step(micro)
    return reads, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--family", default="smolvlm", choices=["smolvlm", "llava_onevision"])
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for command in (["make-data", str(work / "data")], ["make-tiny", args.family, str(work / args.family)]):
            subprocess.run([sys.executable, "-m", "hpc_train", *command], check=True, capture_output=True)
        for shape in SHAPES:
            reads, steps = count(work, args.family, shape, args.grad_accum, args.steps)
            fewer, _ = count(work, args.family, shape, args.grad_accum // 2, args.steps)
            print(f"\n{args.family}, {shape} batches, accumulation {args.grad_accum}: reads per optimizer step")
            reads.report(per=steps)
            scalar = sum(n for site, n in reads.sites.items() if site.kind == "scalar") / steps
            ours = reads.by_owner()["hpc_train"] / steps
            per_micro = (reads.by_owner()["hpc_train"] - fewer.by_owner()["hpc_train"]) / steps
            masks = sum(n for site, n in reads.sites.items() if "masking_utils" in site.file) / steps
            verdict = scalar <= 16 and ours <= 2 and per_micro == 0 and masks == 0
            failed += not verdict
            print(f"  scalar reads {scalar:.1f} (goal <= 16); ours {ours:.1f} per step (goal <= 2), "
                  f"{per_micro:.1f} more at accumulation {args.grad_accum} than {args.grad_accum // 2} (goal 0); "
                  f"mask checks {masks:.1f} (goal 0): {'PASS' if verdict else 'FAIL'}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
