"""`hpc-train plan` as a user runs it: the plan, its JSON and sbatch line, what it says for a run
that cannot fit, bad input, and the plan kept beside the measurement in the run's report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hpc_train.plan.gpus import GPUS
from hpc_train.train.profile_report import PROFILE_REPORT
from tests.distributed.conftest import child_env


def hpc_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpc_train", *args], env=child_env(), capture_output=True,
                          text=True, timeout=timeout)


def tiny_args(tiny_model_dirs, synthetic_data, out: Path, *extra: str) -> list[str]:
    return ["tiny_smolvlm", f"model.path={tiny_model_dirs['smolvlm']}", "model.preset=null",
            f"data.train={synthetic_data / 'train.jsonl'}", "data.eval=null", f"output_dir={out}",
            "data.num_workers=0", "train.micro_batch_size=4", *extra]


def test_a_plan_names_its_parts_the_largest_settings_that_fit_and_the_sbatch_line(tiny_model_dirs, synthetic_data,
                                                                                 tmp_path):
    done = hpc_train("plan", *tiny_args(tiny_model_dirs, synthetic_data, tmp_path / "out"), "--gpu", "L4",
                     "--search", "up", "--json", str(tmp_path / "plan.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] is True and plan["gpu"] == "L4-24GB" and plan["dtype"] == "bf16"
    assert sum(plan["components_bytes"].values()) == plan["peak_allocated_bytes"]
    assert max(plan["moments_bytes"].values()) == plan["peak_allocated_bytes"]
    assert 4 <= plan["largest_that_fits"]["train.micro_batch_size"] <= plan["largest_tried"]["train.micro_batch_size"]
    low, high = plan["time"]["seconds_per_step"]
    assert 0 < low < high and plan["time"]["steps"] >= 1
    assert f"--time={plan['time']['slurm_time']}" in plan["sbatch"] and "slurm/lora.slurm" in plan["sbatch"]
    assert "peak per rank:" in done.stdout and "fits" in done.stdout and "sbatch: CONFIG=tiny_smolvlm" in done.stdout


def test_a_run_that_cannot_fit_exits_3_with_the_changes_that_would_fit(synthetic_data, tmp_path):
    done = hpc_train("plan", "llava_onevision_qlora", "model.path=null", "model.preset=llava-onevision-7b",
                     "train.mode=full", f"data.train={synthetic_data / 'train.jsonl'}", "data.eval=null",
                     f"output_dir={tmp_path / 'out'}", "--gpu", "A100-40GB", "--search", "off")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "DOES NOT FIT" in done.stdout
    advice = done.stdout.split("changes that lower it", 1)[1]
    assert "train.mode=qlora" in advice and "fits" in advice  # a 7B in 4 bits fits 40 GB


def test_an_unknown_gpu_lists_the_known_ones(tiny_model_dirs, synthetic_data, tmp_path):
    done = hpc_train("plan", *tiny_args(tiny_model_dirs, synthetic_data, tmp_path / "out"), "--gpu", "RTX-9090")
    assert done.returncode == 2
    assert "--gpu RTX-9090: not a GPU the planner knows" in done.stderr
    assert all(name in done.stderr for name in GPUS)


def test_a_missing_model_folder_fails_as_training_does(synthetic_data, tmp_path):
    args = ["tiny_smolvlm", f"model.path={tmp_path / 'nowhere'}", "model.preset=null",
            f"data.train={synthetic_data / 'train.jsonl'}", f"output_dir={tmp_path / 'out'}"]
    planned, trained = hpc_train("plan", *args), hpc_train("train", *args, "train.max_steps=1")
    assert planned.returncode == trained.returncode == 2
    said = [line for line in planned.stderr.splitlines() if line.startswith("error:")]
    assert said and said[0] in trained.stderr and "no config.json there" in said[0]


def test_the_run_report_keeps_the_plan_beside_the_measurement(tiny_model_dirs, synthetic_data, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(tiny_model_dirs, synthetic_data, out, "train.max_steps=2", "train.device=cpu",
                     "model.dtype=fp32", "profile.enabled=true", "profile.warmup_steps=0")
    planned = hpc_train("plan", *args, "--json", str(out / "plan.json"))
    assert planned.returncode == 0, planned.stderr[-3000:]
    trained = hpc_train("train", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    report_path = out / PROFILE_REPORT
    kept = json.loads(report_path.read_text())["run"]["plan"]
    assert kept["peak_allocated_gib"] == plan["peak_allocated_gib"] and kept["source"].endswith("plan.json")
    assert kept["measured_peak_allocated_gib"] is None  # a CPU run: no GPU peak to set beside it
    shown = subprocess.run([sys.executable, "-c", "from profiling.cli import main; main()", "show", str(report_path)],
                           env=child_env(), capture_output=True, text=True, timeout=120)
    assert "planned: peak allocated" in shown.stdout, shown.stderr[-2000:]
