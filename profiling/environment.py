"""Where a report was measured: GPUs, library versions, SLURM job, code commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "flash_attn")


def library_versions() -> dict[str, str | None]:
    """Installed versions (``None``: not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(code_dir: str | Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout ``code_dir`` is tracked in, or (None, None) when it
    is not a checkout (an installed wheel, a copied tree)."""
    code_dir = Path(code_dir)

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True, timeout=10,
                              check=True)
        return done.stdout.strip()

    try:
        # Tracked, not merely inside some repository (a venv under a checkout is not the code).
        git("ls-files", "--error-unmatch", "__init__.py")
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None


NETWORK_PREFIXES = ("NCCL_", "UCX_", "FI_")
"""Settings of the collectives' transport (NCCL, UCX, libfabric) a report keeps."""


def collect_environment(device: torch.device, code_dir: str | Path | None = None) -> dict[str, Any]:
    """The environment block of a report, as seen by this process."""
    cuda = device.type == "cuda"
    commit, dirty = git_commit(code_dir) if code_dir is not None else (None, None)
    return {
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpus_per_node": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        **library_versions(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cpu_threads": torch.get_num_threads(),  # torch's own, from OMP_NUM_THREADS: CPU-side speed depends on it
        # what the collectives ran with: runs that differ here are not comparable
        "network_env": sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(NETWORK_PREFIXES)),
        "git_commit": commit,
        "git_dirty": dirty,
    }
