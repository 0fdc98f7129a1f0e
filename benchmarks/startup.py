"""Start-up: seconds from launch to the first optimizer step, with two virtualenvs on one machine.

    python benchmarks/startup.py --python /other/venv/bin/python [--rounds 2]

Runs ``hpc-train train tiny_smolvlm`` (one process on the CPU, one step) alternately from this
interpreter's environment and the other one, in two arms measured side by side:

- ``before``: DeepSpeed's shared-memory op built at start-up (what every run did before) into
  the one extensions folder both environments share (torch's default), so each launch after a
  launch from the other environment rebuilds it;
- ``now``: the toolkit as it is (a build folder per environment, nothing built for gloo).

The first launch of each arm may build; the numbers after it are what a user waits for. Goal:
``now`` at most 10 s after the first build, whatever else is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The start-up as it was: DeepSpeed's comm backend built its shared-memory op in every process.
BEFORE = ("from deepspeed.comm.torch import build_shm_op; build_shm_op(); import runpy; "
          "runpy.run_module('hpc_train', run_name='__main__', alter_sys=True)")


def first_step_seconds(python: str, arm: str, data: Path, out: Path, shared_ext: Path) -> float:
    """Launch one single-step run; seconds until its first metrics line is written."""
    args = ["train", "tiny_smolvlm", f"data.train={data / 'train.jsonl'}", "data.eval=null", f"output_dir={out}",
            "train.max_steps=1", "data.num_workers=0", "train.micro_batch_size=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TORCH_EXTENSIONS_DIR", None)
    command = [python, "-m", "hpc_train", *args]
    if arm == "before":
        env["TORCH_EXTENSIONS_DIR"] = str(shared_ext)
        command = [python, "-c", BEFORE, *args]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):
        if proc.poll() is not None:
            raise SystemExit(f"{arm} run with {python} failed:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    proc.communicate(timeout=600)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="the other environment's python")
    parser.add_argument("--rounds", type=int, default=2, help="launches per environment and arm after the first")
    args = parser.parse_args()
    pythons = {"this": sys.executable, "other": args.python}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        subprocess.run([sys.executable, "-m", "hpc_train", "make-data", str(tmp_path / "data"), "--n-train", "16",
                        "--n-eval", "0"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times: dict[str, list[float]] = {"before": [], "now": []}
        for arm in times:
            for i in range(1 + args.rounds):
                for name, python in pythons.items():
                    s = first_step_seconds(python, arm, tmp_path / "data", tmp_path / f"{arm}-{i}-{name}",
                                           tmp_path / "shared_extensions")
                    print(f"{arm:6s} launch {i} ({name} env): first step after {s:5.1f} s", flush=True)
                    if i > 0:  # the first launch of an arm may build
                        times[arm].append(s)
    before, now = statistics.median(times["before"]), statistics.median(times["now"])
    print(f"\nmedian after the first build: before {before:.1f} s, now {now:.1f} s (max {max(times['now']):.1f} s); "
          f"now / before = {now / before:.2f}; goal: now <= 10 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
