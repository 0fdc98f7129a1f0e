"""A dead rank: seconds from its SIGKILL until torchrun has exited, DataLoader workers on.

    python benchmarks/rank_failure.py [--rounds 2] [--workers 2]

Two ranks train ``tiny_smolvlm`` on the CPU; once 3 steps are logged, rank 1 is killed. Two arms,
measured side by side:

- ``before``: the workers as they were: SIGTERM and SIGUSR1 ignored, nothing tying them to
  their rank (the survivor's collective waited for the dead rank's workers to notice, then the
  survivor could not stop its own workers, and torchrun killed it after 30 s);
- ``now``: the toolkit as it is (:mod:`hpc_train.data.batching.worker_signals`).

Goal: ``now`` within a few seconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BEFORE = '''import runpy, signal, sys
import hpc_train.train.trainer as trainer

def ignore_stop_signals(worker_id):
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)

trainer.survive_group_signals = ignore_stop_signals
sys.argv[0] = "hpc_train"
runpy.run_module("hpc_train", run_name="__main__", alter_sys=True)
'''


def exit_seconds(arm: str, base: Path, workers: int, before_script: Path) -> float:
    out = base / f"out-{arm}-{time.monotonic_ns()}"
    target = [str(before_script)] if arm == "before" else ["-m", "hpc_train"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target,
               "train", "tiny_smolvlm", f"model.path={base / 'model'}", "model.preset=null",
               f"data.train={base / 'data' / 'train.jsonl'}", "data.eval=null", f"output_dir={out}",
               f"data.num_workers={workers}", "train.micro_batch_size=2", "train.max_steps=1000", "train.log_every=1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        if proc.poll() is not None:
            raise SystemExit(f"{arm} run failed:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    psutil.Process(proc.pid).children()[-1].send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    proc.communicate(timeout=300)
    return time.perf_counter() - killed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    args = parser.parse_args()
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset
    from hpc_train.models.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_dataset(base / "data", SyntheticSpec(n_train=64, n_eval=4, seed=0))
        save_tiny("smolvlm", base / "model")
        before_script = base / "before.py"
        before_script.write_text(BEFORE)
        seconds: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.rounds):
            for arm in seconds:
                seconds[arm].append(exit_seconds(arm, base, args.workers, before_script))
                print(f"  {arm}: {seconds[arm][-1]:.1f} s", flush=True)
    before, now = (statistics.median(seconds[a]) for a in ("before", "now"))
    print(f"rank killed -> torchrun exited, {args.workers} DataLoader workers per rank, median of {args.rounds}: "
          f"before {before:.1f} s, now {now:.1f} s ({before / now:.1f}x sooner)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
