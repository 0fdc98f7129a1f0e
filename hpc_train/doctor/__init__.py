"""``hpc-train doctor``: is this machine (login node, or inside an allocation) ready for a run?

A table of checks (versions against the tested pins, CUDA, GPUs, kernels, launchers, the SLURM
allocation, the output folder); a ``fail`` row is a blocker and makes the command exit 1. The
modules import only the standard library at the top, so the doctor also runs, and says what
is missing, where nothing is installed.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_train.doctor.accelerator import torch_checks
from hpc_train.doctor.machine import (
    extensions_check,
    launcher_checks,
    output_checks,
    slurm_job_check,
)
from hpc_train.doctor.packages import package_checks, python_check
from hpc_train.doctor.runtime import deepspeed_check, media_checks, processor_checks
from hpc_train.doctor.table import Check, blockers, format_table, write_json
from hpc_train.pins import read_pins

__all__ = ["Check", "RunNeeds", "blockers", "format_table", "needs_of_config", "run_checks", "write_json"]


@dataclass(frozen=True)
class RunNeeds:
    """What the planned run asks of the machine (without a config: only an output folder)."""

    output_dir: Path
    qlora: bool = False
    offload: bool = False
    cpu_run: bool = False
    """``train.device=cpu``: GPUs in the allocation are left alone on purpose."""
    video_backend: str = "auto"
    video_device: str = "cpu"
    model: Any = None
    """The run's ``ModelConfig``: its processor is built for real (``None``: no config given)."""


def needs_of_config(config_path: str, overrides: list[str], output_dir: str | None) -> RunNeeds:
    """Read the run's config (errors are the config's own, with file and line)."""
    from hpc_train.config_file import load_config
    from hpc_train.train.engine import offloads_optimizer, read_ds_config

    config = load_config(config_path, overrides)
    ds, _ = read_ds_config(config.deepspeed.config)
    training = config.train.mode != "baseline"
    return RunNeeds(Path(output_dir or config.output_dir), qlora=config.train.mode == "qlora",
                    offload=training and offloads_optimizer(ds), cpu_run=config.train.device == "cpu",
                    video_backend=config.data.video.backend, video_device=config.data.video.device, model=config.model)


def run_checks(needs: RunNeeds, *, env: Mapping[str, str] | None = None, min_free_gib: float = 2.0,
               warn_free_gib: float = 20.0) -> list[Check]:
    """Every check, in the order of the table."""
    env = os.environ if env is None else env
    pins = read_pins()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    job = slurm_job_check(env)
    return [python_check(pins),
            Check("platform", "info", f"{platform.system()} {platform.machine()}", f"{cpus} CPU(s) for this process"),
            *package_checks(pins), *torch_checks(env, qlora=needs.qlora, cpu_run=needs.cpu_run), deepspeed_check(offload=needs.offload),
            *media_checks(needs.video_backend, needs.video_device), *processor_checks(needs.model), *launcher_checks(), *([job] if job else []),
            *output_checks(needs.output_dir, min_free_gib=min_free_gib, warn_free_gib=warn_free_gib),
            extensions_check(env)]
