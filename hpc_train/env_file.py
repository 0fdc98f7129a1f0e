"""Environment values a launcher could not pass whole, read back by each rank at its start.

DeepSpeed's SLURM launcher passes the environment on as ``srun --export=ALL,NAME=value,...``,
and srun cuts that list at every comma, so ``NCCL_IB_HCA=mlx5_0,mlx5_1`` would reach the ranks
as ``mlx5_0``: one network rail of two, silently. ``launch/deepspeed.sh`` therefore takes such
values out of the environment into a file (``HPC_TRAIN_ENV_FILE``: ``NAME=value`` lines), and
each rank puts them back here before anything reads them (NCCL reads its settings when the
process group starts).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE = "HPC_TRAIN_ENV_FILE"


def restore_environment(environ: dict[str, str] | None = None) -> list[str]:
    """Set the variables the file ``HPC_TRAIN_ENV_FILE`` names (if any); the names set."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_FILE)
    if not path:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SystemExit(f"error: {ENV_FILE}={path} cannot be read ({exc}). Fix: keep the hpc-train checkout on a "
                         "filesystem every node sees (launch/deepspeed.sh writes it in its logs/ folder)") from None
    names = []
    for line in lines:
        name, sep, value = line.partition("=")
        if sep and name:
            env[name] = value
            names.append(name)
    return names


__all__ = ["ENV_FILE", "restore_environment"]
