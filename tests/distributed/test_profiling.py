"""Profiling reports of real runs: 2 ranks merged, an evaluation-only baseline, compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from profiling.report import read_report

from .conftest import child_env, ok, run_hpc_train

ROOT = Path(__file__).resolve().parents[2]


def git_head() -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def test_two_ranks_are_merged_into_one_report(zero2_runs):
    folder = zero2_runs["smolvlm"] / "profile"
    ranks = [read_report(folder / f"rank{k}.json", "rank") for k in (0, 1)]
    report = read_report(folder / "report.json")
    assert [r["rank"] for r in report["per_rank"]] == [0, 1]
    assert report["workload"] == "training" and report["run"]["mode"] == "full"
    assert report["run"]["world_size"] == 2 and report["run"]["zero_stage"] == 2
    assert report["run"]["global_batch_size"] == 8 and report["run"]["planned_steps"] == 4
    assert report["steps"] == {"seen": 4, "warmup_excluded": 2, "measured": 2, "first": 1, "last": 4}
    assert set(report["phases_ms"]) == {"data_wait", "forward", "backward", "optimizer"}
    assert 0.5 < report["phase_coverage"] <= 1.0
    # the job's tokens are both ranks' tokens; each step lasts as long as its slower rank
    assert report["throughput"]["tokens_per_s"] * max(r["totals"]["measured_s"] for r in ranks) == \
        pytest.approx(sum(r["totals"]["tokens"] for r in ranks))
    assert report["step_ms"]["max"] == max(max(r["series"]["step_ms"]) for r in ranks)
    assert report["slowest_rank"]["rank"] in (0, 1)
    assert report["flops"]["backward_per_step"] > report["flops"]["forward_per_step"] > 0
    assert report["flops"]["mfu"] is None and report["flops"]["peak_source"].startswith("unknown")
    assert sum(r["totals"]["images"] for r in ranks) > 0
    assert report["memory"]["host_peak_rss_gib"] > 0.1 and report["memory"]["gpu_peak_allocated_gib"] is None
    assert report["environment"]["hosts"] and report["environment"]["torch"]
    assert report["environment"]["git_commit"] == git_head()
    assert report["wall_s"]["train"] > 0 and report["wall_s"]["epochs"][0]["steps"] == 4
    # the metrics log and the report describe the same samples
    metrics = [json.loads(line) for line in (zero2_runs["smolvlm"] / "metrics.jsonl").read_text().splitlines()]
    samples = sum(m["samples"] for m in metrics if "samples" in m and m["step"] > 2)
    assert sum(r["totals"]["samples"] for r in ranks) == samples


def test_baseline_report_compares_with_training(zero2_runs, tmp_path, train_args):
    out = tmp_path / "baseline"
    copy = tmp_path / "results" / "profiling" / "{mode}_profiling.json"
    ok(run_hpc_train("eval", *train_args("smolvlm", out, "eval.generate=false", "profile.warmup_steps=0",
                                         f"profile.copy_to={copy}"), nproc=1))
    baseline = tmp_path / "results" / "profiling" / "baseline_profiling.json"
    report = read_report(baseline)
    assert report == read_report(out / "profile" / "report.json")
    assert report["workload"] == "evaluation" and report["run"]["zero_stage"] is None
    assert set(report["phases_ms"]) == {"data_wait", "forward"}
    assert report["steps"]["measured"] == 2  # 8 samples in batches of 4
    assert report["flops"]["backward_per_step"] == 0
    png = tmp_path / "compare.png"
    done = subprocess.run([sys.executable, "-m", "profiling.cli", "compare", str(baseline),
                           str(zero2_runs["smolvlm"] / "profile" / "report.json"), "--markdown", "--plot", str(png)],
                          env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    backward = next(line for line in done.stdout.splitlines() if line.startswith("| backward mean"))
    assert backward.split("|")[2].strip() == "—" and backward.split("|")[3].strip() != "—"
    assert "| metric | baseline | full | full/baseline |" in done.stdout
    assert "note: world size differs: baseline=1, full=2" in done.stdout
    assert png.stat().st_size > 10_000
