"""torch's CUDA build, the GPUs it sees (datasheet peak, bf16), NCCL, and the kernels a run will
use on them: packed attention, bitsandbytes for QLoRA."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hpc_train.device import (
    cuda_fix,
    cuda_unusable_reason,
    driver_version,
    gpus_allocated,
    native_bf16,
)
from hpc_train.doctor.table import Check
from hpc_train.models.varlen_backend import (
    PER_SAMPLE,
    flash_problem,
    varlen_backend,
)
from profiling.flops import peak_tflops


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    capability: tuple[int, int]
    bf16: bool


def cuda_check(torch_mod: Any, env: Mapping[str, str], *, cpu_run: bool = False) -> Check:
    """A job given GPUs on which CUDA does not work is a blocker (the run stops the same way),
    unless the config asks for a CPU run (``train.device=cpu``)."""
    cuda = torch_mod.version.cuda
    if torch_mod.cuda.is_available():
        return Check("CUDA", "ok", f"{torch_mod.cuda.device_count()} GPU(s), torch CUDA {cuda}",
                     f"driver {driver_version() or '?'}" + ("; train.device=cpu: the run ignores them" if cpu_run else ""))
    reason = cuda_unusable_reason(cuda, driver_version())
    given = gpus_allocated(env)
    if given is None:
        return Check("CUDA", "info", "not usable", f"{reason}: a CPU run (gloo, fp32)")
    if cpu_run:
        return Check("CUDA", "info", "not usable", f"{given}, but {reason}; train.device=cpu: a CPU run on purpose")
    return Check("CUDA", "fail", "not usable", f"{given}, but {reason}: the run would train on the CPU. "
                 f"Fix: {cuda_fix()}")


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
        capability = (props.major, props.minor)
        out.append(Gpu(props.name, props.total_memory / 2**30, capability, native_bf16(capability)))
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


def varlen_check(gpus: list[Gpu]) -> Check:
    """The kernel ``data.packing=true`` will use for attention on this machine (in the dtype
    ``model.dtype=auto`` picks on its first GPU)."""
    if not gpus:
        return Check("packing attention", "ok", PER_SAMPLE, "exact; data.packing=true uses it")
    gpu = gpus[0]
    dtype = "torch.bfloat16" if gpu.bf16 else "torch.float32"
    backend = varlen_backend(True, dtype, gpu.capability)
    if backend != PER_SAMPLE:
        return Check("packing attention", "ok", backend, "exact; data.packing=true uses it")
    why = flash_problem(dtype, gpu.capability) or "neither flash-attn nor PyTorch's varlen kernel loads here"
    return Check("packing attention", "info", backend, f"{why}: packing stays exact, one SDPA call per sample")


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


def torch_checks(env: Mapping[str, str] | None = None, *, qlora: bool = False, cpu_run: bool = False) -> list[Check]:
    env = os.environ if env is None else env
    if importlib.util.find_spec("torch") is None:
        return [Check("CUDA", "info", "not checked", "torch is not installed (above)")]
    try:
        import torch
    except Exception as exc:
        return [Check("CUDA", "fail", "torch does not import", str(exc)[:200])]
    gpus = visible_gpus(torch) if torch.cuda.is_available() else []
    on_cuda = bool(gpus)
    return [cuda_check(torch, env, cpu_run=cpu_run), nccl_check(torch), *gpu_checks(gpus), varlen_check(gpus),
            bitsandbytes_check(on_cuda, qlora)]
