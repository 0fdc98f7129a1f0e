"""Does a bf16 run learn as the fp32 run does? The demo task (tiny random SmolVLM, synthetic
colour questions), DeepSpeed ZeRO-2 on 2 CPU processes, the same seed and batches, three arms
side by side:

* ``fp32``: the reference;
* ``bf16``: bf16 weights and activations with the shipped configs (gradients reduced and
  accumulated in fp32: ``communication_data_type`` / ``data_types.grad_accum_dtype``);
* ``bf16-ds-default``: the same with DeepSpeed's defaults (gradients reduced and accumulated in
  bf16), the setting the shipped configs replace.

One seed of bf16 never follows fp32 step for step (any rounding sends training down another,
equally good path), so the yardstick is fp32's own spread: each arm runs with several seeds
(data order and model initialisation), and the script prints per arm the mean and range over
seeds of the training loss in the last window of steps, the held-out eval loss and the
answer accuracy, beside fp32's.

    python benchmarks/bf16_numerics.py [--steps 800] [--seeds 0 1 2] [--grad-accum 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpc_train.demo import demo_config  # noqa: E402
from hpc_train.train.metrics import read_metrics  # noqa: E402

ARMS = {"fp32": "fp32", "bf16": "bf16", "bf16-ds-default": "bf16"}


def ds_defaults_config(base: Path) -> Path:
    """zero2.json without our fp32 reduction and accumulation settings."""
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds.pop("communication_data_type")
    ds.pop("data_types")
    path = base / "zero2_ds_defaults.json"
    path.write_text(json.dumps(ds))
    return path


def train(base: Path, arm: str, seed: int, steps: int, grad_accum: int) -> Path:
    out = base / f"{arm}-seed{seed}"
    config = demo_config(base, steps=steps, zero=2, family="smolvlm")
    config["output_dir"] = str(out)
    config["model"]["path"] = str(base / f"model-seed{seed}")
    config["model"]["dtype"] = ARMS[arm]
    config["train"].update(log_every=1, grad_accum=grad_accum, micro_batch_size=8 // grad_accum, seed=seed)
    config["deepspeed"]["config"] = str(ds_defaults_config(base) if arm == "bf16-ds-default"
                                        else ROOT / "ds_configs" / "zero2.json")
    config["profile"] = {"enabled": False}
    path = base / f"{arm}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "hpc_train", "train", str(path)], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return out


def summary(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (batch 8 in all)")
    parser.add_argument("--window", type=int, default=50, help="steps averaged for the last-window loss")
    args = parser.parse_args(argv)
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset
    from hpc_train.models.tiny import save_tiny

    rows: dict[str, dict[str, list[float]]] = {arm: {"loss": [], "eval": [], "accuracy": []} for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        make_dataset(base / "data", SyntheticSpec(seed=0))
        for seed in args.seeds:
            save_tiny("smolvlm", base / f"model-seed{seed}", seed=seed)
            for arm in ARMS:
                out = train(base, arm, seed, args.steps, args.grad_accum)
                steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
                losses = [r["loss"] for r in steps]
                first = ", ".join(f"{r['loss']:.4f} / {r['grad_norm']:.4f}" for r in steps[:4])
                evaluated = json.loads((out / "eval_results.json").read_text())
                rows[arm]["loss"].append(sum(losses[-args.window:]) / len(losses[-args.window:]))
                rows[arm]["eval"].append(evaluated["loss"])
                rows[arm]["accuracy"].append(evaluated["accuracy"])
                print(f"seed {seed} {arm}: first steps' loss / grad norm {first}; last-window loss "
                      f"{rows[arm]['loss'][-1]:.4f}, eval loss {evaluated['loss']:.4f}, accuracy "
                      f"{evaluated['accuracy']:.3f}", flush=True)
    print(f"\n{args.steps} steps, batch 8 = {8 // args.grad_accum} x {args.grad_accum} accumulated, seeds "
          f"{' '.join(map(str, args.seeds))}; mean (min-max) over seeds\n")
    print(f"| arm | training loss, last {args.window} steps | eval loss | accuracy |")
    print("|---|---|---|---|")
    for arm, row in rows.items():
        print(f"| {arm} | {summary(row['loss'])} | {summary(row['eval'])} | {summary(row['accuracy'])} |")


if __name__ == "__main__":
    main()
