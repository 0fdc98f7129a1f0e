"""torch's CUDA build, the GPUs it sees (datasheet peak, bf16), NCCL, and the kernels a run will
use on them: packed attention, bitsandbytes for QLoRA."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpc_train.doctor.table import Check
from hpc_train.models.varlen_backend import PER_SAMPLE, torch_varlen_present, varlen_backend
from profiling.flops import peak_tflops

# The oldest driver each CUDA major release of the torch wheels runs on (NVIDIA's minor-version
# compatibility table).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int]
    bf16: bool


def gpus_allocated(env: Mapping[str, str]) -> str | None:
    """What the scheduler (or the user) says this process was given, or ``None``."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS"):
        if env.get(key, "").strip() not in ("", "0"):
            return f"{key}={env[key]}"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return None


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (``None``: no driver tools here)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def cuda_unusable_reason(torch_cuda: str | None, driver: str | None) -> str:
    if torch_cuda is None:
        return "this torch is a CPU-only build"
    if driver is None:
        return "no NVIDIA driver found (nvidia-smi)"
    need = MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
    if need is not None and int(driver.split(".")[0]) < need:
        return f"driver {driver} is older than torch's CUDA {torch_cuda} build needs (>= {need})"
    return f"torch cannot initialise CUDA (driver {driver}, torch CUDA {torch_cuda})"


def cuda_check(torch_mod: Any, env: Mapping[str, str]) -> Check:
    cuda = torch_mod.version.cuda
    if torch_mod.cuda.is_available():
        return Check("CUDA", "ok", f"{torch_mod.cuda.device_count()} GPU(s), torch CUDA {cuda}",
                     f"driver {driver_version() or '?'}")
    reason = cuda_unusable_reason(cuda, driver_version())
    given = gpus_allocated(env)
    if given is None:
        return Check("CUDA", "info", "not usable", f"{reason}: a CPU run (gloo, fp32)")
    return Check("CUDA", "warn", "not usable", f"{given}, but {reason}: the run would train on the CPU. Fix: "
                 "match the torch wheel to the driver (pip install torch --index-url "
                 "https://download.pytorch.org/whl/cu126 for drivers >= 525) or update the driver")


def gpu_check(label: str, gpu: Gpu) -> Check:
    """One GPU type: its memory, compute capability, bf16 and datasheet peak."""
    peak = peak_tflops(gpu.name, "bf16" if gpu.bf16 else "fp32")
    found = f"{gpu.name}, {gpu.memory_gib:.0f} GiB, sm_{gpu.capability[0]}{gpu.capability[1]}"
    if peak.tflops is None:
        return Check(label, "warn", found, f"{peak.source}: MFU will be reported as unknown")
    return Check(label, "ok", found, f"peak {peak.tflops:g} TFLOP/s ({peak.source})")


def visible_gpus(torch_mod: Any) -> list[Gpu]:
    out = []
    for i in range(torch_mod.cuda.device_count()):
        props = torch_mod.cuda.get_device_properties(i)
        bf16 = props.major >= 8  # bf16 matrix units: Ampere and newer
        out.append(Gpu(props.name, props.total_memory / 2**30, (props.major, props.minor), bf16))
    return out


def gpu_checks(gpus: list[Gpu]) -> list[Check]:
    """A row per GPU type (``GPU 0-3``), then the compute dtype ``model.dtype=auto`` picks."""
    if not gpus:
        return [Check("compute dtype", "info", "fp32", "CPU: model.dtype=auto computes in fp32")]
    rows = []
    for gpu in dict.fromkeys(gpus):
        ids = [i for i, g in enumerate(gpus) if g == gpu]
        label = f"GPU {ids[0]}" if len(ids) == 1 else f"GPU {ids[0]}-{ids[-1]}"
        rows.append(gpu_check(label, gpu))
    if all(g.bf16 for g in gpus):
        rows.append(Check("compute dtype", "ok", "bf16", "model.dtype=auto"))
    else:
        rows.append(Check("compute dtype", "warn", "fp32", "a GPU without bf16 (before sm_80): model.dtype=auto "
                                                           "uses fp32, twice the memory of bf16"))
    return rows


def nccl_check(torch_mod: Any) -> Check:
    if torch_mod.version.cuda is None:
        return Check("NCCL", "info", "none", "CPU-only torch: gloo")
    used = torch_mod.cuda.is_available()
    try:
        version = ".".join(map(str, torch_mod.cuda.nccl.version()))
    except Exception as exc:  # a broken NCCL library shows here first
        return Check("NCCL", "fail" if used else "info", "does not load", str(exc)[:200])
    return Check("NCCL", "ok" if used else "info", version, "" if used else "unused without a GPU (gloo)")


def varlen_check(on_cuda: bool) -> Check:
    """The kernel ``data.packing=true`` will use for attention on this machine."""
    backend = varlen_backend(on_cuda)
    if backend != PER_SAMPLE or not on_cuda:
        return Check("packing attention", "ok", backend, "exact; data.packing=true uses it")
    note = "flash-attn does not import here: packing stays exact, with a host sync per layer"
    if torch_varlen_present():
        note += " (PyTorch's own varlen kernel is present, not used yet)"
    return Check("packing attention", "info", backend, note)


def bitsandbytes_check(on_cuda: bool, qlora: bool) -> Check:
    import logging

    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CPU backend's optional-kernel notice is not ours to show
    try:
        from bitsandbytes import cextension
    except Exception as exc:
        return Check("bitsandbytes (QLoRA)", "fail" if qlora else "warn", "does not import", str(exc)[:200])
    finally:
        quiet.setLevel(level)
    loaded = type(cextension.lib).__name__
    if not on_cuda:
        return Check("bitsandbytes (QLoRA)", "info", f"{cextension.BNB_BACKEND} backend",
                     "no GPU: QLoRA runs on the CPU (slowly)")
    if loaded == "CudaBNBNativeLibrary":
        return Check("bitsandbytes (QLoRA)", "ok", "CUDA library loaded")
    return Check("bitsandbytes (QLoRA)", "fail" if qlora else "warn", "no CUDA library",
                 "4-bit layers cannot run on this GPU; python -m bitsandbytes explains why. Fix: install the "
                 "pinned bitsandbytes, or set BNB_CUDA_VERSION to a shipped build")


def torch_checks(env: Mapping[str, str] | None = None, *, qlora: bool = False) -> list[Check]:
    env = os.environ if env is None else env
    if importlib.util.find_spec("torch") is None:
        return [Check("CUDA", "info", "not checked", "torch is not installed (above)")]
    try:
        import torch
    except Exception as exc:
        return [Check("CUDA", "fail", "torch does not import", str(exc)[:200])]
    gpus = visible_gpus(torch) if torch.cuda.is_available() else []
    on_cuda = bool(gpus)
    return [cuda_check(torch, env), nccl_check(torch), *gpu_checks(gpus), varlen_check(on_cuda),
            bitsandbytes_check(on_cuda, qlora)]
