"""The GPUs a plan can be made for: memory as the driver reports it and the datasheet peak."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpc_train.errors import ConfigError
from profiling.flops import peak_tflops


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    """``torch.cuda.get_device_properties(...).total_memory`` of the model, in GiB (a little
    under the datasheet's GB)."""
    device_name: str
    """What torch calls it (for the datasheet peak in :mod:`profiling.flops`)."""

    def peak_tflops(self, dtype: str) -> float | None:
        """The datasheet's dense peak (``None`` for a GPU without one)."""
        return peak_tflops(self.device_name, dtype).tflops


GPUS = {gpu.name: gpu for gpu in (
    Gpu("H100-80GB", 79.1, "NVIDIA H100 80GB HBM3"),
    Gpu("H100-PCIE-80GB", 79.1, "NVIDIA H100 PCIe"),
    Gpu("H200-141GB", 139.8, "NVIDIA H200"),
    Gpu("GH200-96GB", 94.5, "NVIDIA GH200 480GB"),
    Gpu("A100-80GB", 79.1, "NVIDIA A100-SXM4-80GB"),
    Gpu("A100-40GB", 39.4, "NVIDIA A100-SXM4-40GB"),
    Gpu("L40S-48GB", 44.4, "NVIDIA L40S"),
    Gpu("L4-24GB", 22.0, "NVIDIA L4"),
)}
ALIASES = {"H100": "H100-80GB", "H200": "H200-141GB", "GH200": "GH200-96GB", "A100": "A100-80GB",
           "L40S": "L40S-48GB", "L4": "L4-24GB"}


def gpu_named(name: str) -> Gpu:
    """The GPU ``name`` (case and ``_`` / ``-`` ignored); an unknown one lists the known ones."""
    key = name.upper().replace("_", "-")
    key = ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    raise ConfigError(f"--gpu {name}: not a GPU the planner knows. Fix: use one of {', '.join(GPUS)} "
                      f"(or {', '.join(ALIASES)})")


def gpu_of_device(device_name: str, total_bytes: int) -> Gpu:
    """The GPU a job was given, from what torch reports (a plan inside the allocation)."""
    for gpu in GPUS.values():
        if peak_tflops(device_name, "bf16").source == peak_tflops(gpu.device_name, "bf16").source \
                and abs(gpu.memory_gib - total_bytes / 2**30) < 0.1 * gpu.memory_gib:
            return gpu
    return Gpu(device_name, total_bytes / 2**30, device_name)


def planned_gpu(name: str | None) -> Gpu | None:
    """``--gpu``: a named GPU, this machine's (``auto``), or None (plan this machine as it is)."""
    if name is None:
        return None
    if name.lower() != "auto":
        return gpu_named(name)
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--gpu auto: this machine has no usable GPU. Fix: name the GPU the job will get, "
                          f"e.g. --gpu {next(iter(GPUS))}")
    return gpu_of(torch.device("cuda", 0))


def gpu_of(device: Any) -> Gpu:
    """The GPU behind a CUDA ``device``, as the planner knows it."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return gpu_of_device(props.name, props.total_memory)


def plans_bf16(config: Any, gpu: Gpu | None) -> bool:
    """The compute dtype the run will have there: bf16 on every GPU the planner knows (all compute
    it natively) unless the config says fp32; as the run would choose on this machine without one."""
    if gpu is None:
        import torch

        from hpc_train.train.trainable_model import compute_dtype

        return compute_dtype(config) == torch.bfloat16
    return config.model.dtype != "fp32" and config.train.device != "cpu"
