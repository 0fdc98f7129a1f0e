"""The trainer's side of profiling: what the run is, and writing the reports on rank 0.

Rank reports travel to rank 0 over the process group, so the merged report is complete
even when nodes share no filesystem.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import hpc_train
from hpc_train.config import RunConfig
from hpc_train.data.decoding.video_backends import resolve_backend
from hpc_train.dist import DistInfo
from hpc_train.models.adapters import param_census
from hpc_train.models.families import Family
from hpc_train.models.hub import HubId
from profiling.environment import collect_environment
from profiling.flops import Trainability
from profiling.profiler import Profiler
from profiling.report import merge_reports, write_json

PROFILE_DIR = "profile"
PROFILE_REPORT = f"{PROFILE_DIR}/report.json"
"""The merged report, relative to ``output_dir``."""


def trainability(model: torch.nn.Module, family: Family) -> Trainability:
    """Which components train their own weights, and how many LoRA parameters each has."""
    census = param_census(model, family)
    return Trainability(trains=frozenset(g for g, c in census.items() if c.trainable),
                        lora_params={g: c.lora for g, c in census.items() if c.lora})


def vision_tower(model: torch.nn.Module, family: Family) -> torch.nn.Module | None:
    """The module that encodes images: the family's tower (also inside DeepSpeed's and PEFT's wrappers)."""
    try:
        return getattr(family.inner_model(model), family.vision_model)
    except ValueError:
        return None


def describe_run(config: RunConfig, info: DistInfo, *, zero_stage: int | None, planned_steps: int | None,
                 packing_efficiency: float | None, packed_attention: str | None = None) -> dict[str, Any]:
    """The ``run`` block of the report."""
    cfg = config
    return {
        "name": cfg.name, "mode": cfg.train.mode, "model": cfg.model.preset or cfg.model.path,
        "model_revision": hub_revision(cfg.model.path), "video_backend": resolve_backend(cfg.data.video.backend),
        "family": cfg.model.family, "dtype": cfg.model.dtype, "zero_stage": zero_stage,
        "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
        "eval_batch_size": cfg.eval.batch_size,
        "global_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
        // cfg.train.sequence_parallel,
        "sequence_parallel": cfg.train.sequence_parallel,
        "max_seq_len": cfg.data.max_seq_len, "packing": cfg.data.packing,
        "packing_efficiency": packing_efficiency, "packed_attention": packed_attention,
        "gradient_checkpointing": cfg.train.gradient_checkpointing, "planned_steps": planned_steps,
        "output_dir": str(Path(cfg.output_dir).resolve()), "config_hash": cfg.digest(),
    }


def hub_revision(path: str | None) -> str | None:
    """The commit a pinned hub id (``org/name@commit``) names; None for a folder or a preset."""
    hub_id = HubId.parse(path) if path is not None else None
    return hub_id.revision if hub_id is not None else None


def rank_file(config: RunConfig, rank: int) -> Path:
    return Path(config.output_dir) / PROFILE_DIR / f"rank{rank}.json"


def write_rank_profile(profiler: Profiler, config: RunConfig, info: DistInfo, *, dtype: torch.dtype,
                       first_step: int = 1) -> dict[str, Any]:
    """This rank's report to ``profile/rank<k>.json`` on its own node (no collectives: also
    safe on the way out of a crash); returns it."""
    mine = profiler.rank_report(dtype=dtype, first_step=first_step)
    write_json(rank_file(config, info.rank), mine)
    return mine


def keep_earlier_report(path: Path, first_step: int) -> Path | None:
    """A resumed run (from step ``first_step``) must not replace the report of the steps before
    it: that report is renamed after the steps it measured. Returns its new name."""
    if first_step <= 1 or not path.is_file():
        return None
    try:
        steps = json.loads(path.read_text())["steps"]
        span = f"{int(steps['first'])}-{int(steps['last'])}"
    except (OSError, ValueError, KeyError, TypeError):
        span = f"before-{first_step}"
    kept = path.with_name(f"report.steps-{span}.json")
    n = 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"report.steps-{span}.{n}.json")
    os.replace(path, kept)
    return kept


def write_profile(profiler: Profiler, config: RunConfig, info: DistInfo, run: dict[str, Any], *,
                  dtype: torch.dtype, first_step: int = 1, evaluation: dict[str, Any] | None = None) -> Path | None:
    """Each rank writes its report; rank 0 also gathers them all and writes the merged one (with
    the run's ``evaluation`` block when it evaluated).
    Returns the merged report's path on rank 0 (``None`` elsewhere, or when it failed)."""
    mine = write_rank_profile(profiler, config, info, dtype=dtype, first_step=first_step)
    everyone: list[Any] = [mine]
    if dist.is_initialized() and info.world_size > 1:
        everyone = [None] * info.world_size if info.is_main else []
        dist.gather_object(mine, everyone if info.is_main else None, dst=0)
    if not info.is_main:
        return None
    # A report that cannot be written must not fail a finished run, nor leave the other
    # ranks waiting at the next barrier: say so and go on.
    try:
        for report in everyone:  # nodes without a shared filesystem: rank 0 keeps them all
            if not rank_file(config, report["rank"]).is_file():
                write_json(rank_file(config, report["rank"]), report)
        environment = collect_environment(profiler.device, Path(hpc_train.__file__).parent)
        merged = merge_reports(everyone, run=run, environment=environment, evaluation=evaluation)
        path = Path(config.output_dir) / PROFILE_REPORT
        kept = keep_earlier_report(path, first_step)
        if kept is not None:
            print(f"profile: the report of the steps before this resumed run is kept as {kept}", flush=True)
        write_json(path, merged)
        if config.profile.copy_to:
            write_json(Path(config.profile.copy_to.format(mode=config.train.mode, name=config.name)), merged)
    except (OSError, ValueError) as exc:
        print(f"warning: the profiling report was not written: {exc}", file=sys.stderr, flush=True)
        return None
    return path
