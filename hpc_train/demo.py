"""``hpc-train demo``: the whole product on a laptop CPU in a few minutes.

Builds a tiny random SmolVLM, writes the synthetic dataset, evaluates the untrained model
(chance level), trains it with DeepSpeed on several processes, evaluates again, and prints
where everything went. The tiny model really learns the task (the ball's colour, the
tone's pitch), which is what makes the numbers worth reading.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hpc_train.evaluation.metrics import METRICS
from hpc_train.train.metrics import read_metrics
from profiling.stats import summarize

# What makes a tiny random model learn the demo task on 2 CPU cores (measured): 64-wide
# layers, single-token answers, lr 2e-3 with betas (0.9, 0.98), a cosine schedule long
# enough that slow starters still converge, labels on the answer only.
DEMO_TRAIN = {
    "mode": "full", "micro_batch_size": 8, "grad_accum": 1, "lr": 2.0e-3, "betas": [0.9, 0.98],
    "warmup_steps": 20, "min_lr_ratio": 0.1, "grad_clip": 1.0, "log_every": 10, "seed": 0,
}


DEMO_SAMPLES = 2400
"""Training samples: with 600 the tiny model memorizes them and how well it generalizes swings
with the seed (held-out accuracy 0.78-0.97 over seeds 0-2)."""


def demo_config(out: Path, *, steps: int, zero: int, family: str, captions: float = 0.0) -> dict:
    data = out / "data"
    return {
        "name": "demo",
        "output_dir": str(out / "run"),
        "model": {"family": family, "path": str(out / "model"), "dtype": "fp32"},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                 "max_seq_len": 512, "num_workers": 0,
                 "cache_samples": True, "video": {"sampling": "uniform", "num_frames": 4}},
        "train": {**DEMO_TRAIN, "max_steps": steps},
        "deepspeed": {"config": f"ds_configs/zero{zero}.json"},
        # with captions, colour words and sentences are mixed: auto would see short answers
        "eval": {"batch_size": 32, **({"metrics": list(METRICS)} if captions else {})},
        "profile": {"copy_to": str(out / "results" / "profiling" / "{mode}_profiling.json")},
    }


def run_demo(out: str | Path = "demo_out", *, nproc: int = 2, steps: int = 2000, zero: int = 2,
             family: str = "smolvlm", seed: int = 0, captions: float = 0.0) -> int:
    """Run the demo; returns the exit status. ``captions``: the share of image and video records
    that ask for a caption sentence (scored by BLEU-4, ROUGE-L and CIDEr too)."""
    from hpc_train.data.sources.synthetic import SyntheticSpec, make_dataset
    from hpc_train.models.tiny import save_tiny

    started = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _say(f"[1/5] synthetic dataset -> {out / 'data'}")
    if not (out / "data" / "eval.jsonl").is_file() or not _same_captions(out / "data", captions):
        make_dataset(out / "data", SyntheticSpec(n_train=DEMO_SAMPLES, seed=seed, caption_share=captions))
    _say(f"[2/5] tiny random {family} -> {out / 'model'}")
    if not (out / "model" / "config.json").is_file():
        save_tiny(family, out / "model", seed=seed)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(out, steps=steps, zero=zero, family=family,
                                                      captions=captions), sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    _say("[3/5] evaluating the untrained model (chance level)")
    before_dir = out / "before"
    status = subprocess.call([sys.executable, "-m", "hpc_train", "eval", str(config_path),
                              f"output_dir={before_dir}"], env=env)
    if status:
        return status
    _say(f"[4/5] training {steps} steps with DeepSpeed ZeRO-{zero} on {nproc} processes")
    train_started = time.perf_counter()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    status = subprocess.call([*launcher, "-m", "hpc_train", "train", str(config_path)], env=env)
    if status:
        return status
    train_wall = time.perf_counter() - train_started
    _say("[5/5] results")
    before = json.loads((before_dir / "eval_results.json").read_text())
    after = json.loads((out / "run" / "eval_results.json").read_text())
    rows = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "step_time_s" in r]
    step_time = summarize(r["step_time_s"] for r in rows[1:] or rows)
    summary = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "accuracy_by_kind_before": before["accuracy_by_kind"],
        "accuracy_by_kind_after": after["accuracy_by_kind"],
        "eval_loss_before": before["loss"], "eval_loss_after": after["loss"],
        "metrics_before": before["metrics"], "metrics_after": after["metrics"],
        "steps": steps, "zero_stage": zero, "processes": nproc,
        "step_time_s_median": step_time["median"], "train_wall_s": round(train_wall, 1),
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _say(_format(summary, out))
    _say(_evaluation_comparison(before_dir, out / "run", out / "results"))
    _say(_profile_comparison(out / "results" / "profiling"))
    return 0


def _same_captions(data: Path, captions: float) -> bool:
    """Whether the dataset left in ``data`` by an earlier demo has this share of captions (its
    README.txt says so), so that ``--captions`` on an old folder is not silently ignored."""
    try:
        said = (data / "README.txt").read_text()
    except OSError:
        return False
    return (f"- captions ({captions:g} of" in said) if captions else "- captions (" not in said


def _evaluation_comparison(before: Path, after: Path, results: Path) -> str:
    """The untrained and trained evaluations, record by record, with bootstrap intervals."""
    from hpc_train.evaluation.compare import compare_files, format_table, plot

    comparisons = compare_files([before, after], ["untrained", "trained"])
    chart = plot(comparisons, results / "compare_eval.png")
    return (f"\n{format_table(comparisons)}\n  chart: {chart}\n"
            f"  again with: hpc-train compare-eval {before} {after} --plot compare_eval.png")


def _profile_comparison(folder: Path) -> str:
    """The baseline (untrained evaluation) and training reports side by side, and a chart."""
    from profiling.compare import compare_table, plot
    from profiling.report import read_report

    paths = [folder / "baseline_profiling.json", folder / "full_profiling.json"]
    reports = [read_report(p) for p in paths]
    labels = ["baseline", "full"]
    chart = plot(reports, labels, folder / "compare.png")
    return (f"\nprofiles: {paths[0]}, {paths[1]} (chart: {chart})\n"
            f"{compare_table(reports, labels)}\n"
            f"  again with: hpc-profile compare {paths[0]} {paths[1]} --markdown")


def _format(s: dict, out: Path) -> str:
    kinds = sorted(s["accuracy_by_kind_after"])
    lines = ["", "demo finished", f"  held-out accuracy: {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}",
             "  by kind:  " + ", ".join(f"{k} {s['accuracy_by_kind_before'].get(k, 0):.2f} -> "
                                        f"{s['accuracy_by_kind_after'][k]:.2f}" for k in kinds),
             f"  eval loss: {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}",
             "  metrics:  " + ", ".join(f"{k} {s['metrics_before'].get(k, 0):.3f} -> {v:.3f}"
                                        for k, v in s["metrics_after"].items()),
             f"  {s['steps']} steps, ZeRO-{s['zero_stage']}, {s['processes']} processes: median step "
             f"{s['step_time_s_median'] * 1000:.0f} ms, training {s['train_wall_s']:.0f} s, "
             f"whole demo {s['total_wall_s']:.0f} s",
             f"  config        {out / 'demo.yaml'}",
             f"  metrics       {out / 'run' / 'metrics.jsonl'} (TensorBoard: {out / 'run' / 'tensorboard'})",
             f"  checkpoints   {out / 'run' / 'checkpoints'}",
             f"  trained model {out / 'run' / 'model'}",
             f"  evaluation    {out / 'run' / 'eval_results.json'} (before: {out / 'before' / 'eval_results.json'})",
             f"  summary       {out / 'demo_summary.json'}"]
    return "\n".join(lines)


def _say(text: str) -> None:
    print(text, flush=True)
