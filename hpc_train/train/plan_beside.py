"""The plan beside the run it planned: the profiling report keeps the predicted peak next to the
measured one, so every run checks the planner.

The plan comes from ``OUTPUT_DIR/plan.json`` when one was made for this very config (the SLURM
templates write it before the ranks start; ``hpc-train plan ... --json OUTPUT_DIR/plan.json``
does by hand). A GPU run without one plans itself at the end, in a separate process (fake
tensors, no GPU memory, nothing shared with the finished engine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from hpc_train.config import RunConfig

PLAN_FILE = "plan.json"
_PLAN_TIMEOUT_S = 300


def plan_beside(config: RunConfig, output: Path, device: torch.device, world: int, measured_gib: float | None
                ) -> dict[str, Any] | None:
    """The report's ``run.plan`` block for a run of ``world`` ranks (None when there is no plan
    of this config)."""
    path = output / PLAN_FILE
    if not _plan_of(path, config) and device.type == "cuda":
        _plan_now(output, path, world)
    plan = _plan_of(path, config)
    if plan is None:
        return None
    predicted = plan["peak_allocated_gib"]
    error = None if not measured_gib else round(100 * (predicted / measured_gib - 1), 2)
    return {"gpu": plan.get("gpu"), "peak_allocated_gib": predicted, "needs_gib": plan.get("needs_gib"),
            "peak_moment": plan.get("peak_moment"), "measured_peak_allocated_gib": measured_gib,
            "error_pct": error, "source": str(path)}


def _plan_of(path: Path, config: RunConfig) -> dict[str, Any] | None:
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return plan if plan.get("config_digest") == config.digest() else None


def _plan_now(output: Path, path: Path, world: int) -> None:
    # World size is what shards the states; how the ranks sit on nodes does not change a rank's bytes.
    command = [sys.executable, "-m", "hpc_train", "plan", str(output / "config.resolved.yaml"), "--gpu", "auto",
               "--gpus-per-node", str(world), "--search", "off", "--json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PLAN_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"profile: no plan beside the measurement ({exc})", flush=True)
        return
    if done.returncode not in (0, 3):  # 3: planned, and it would not fit (the run did anyway)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"profile: no plan beside the measurement (hpc-train plan: {tail[0]})", flush=True)
