"""The device a rank computes on, chosen before the process group joins.

A GPU when CUDA works, bound as the launcher bound it: every GPU of the node visible to every
rank (rank k takes GPU k), or one GPU per task (``--gpus-per-task=1``, a site's default binding:
every rank sees its own GPU as GPU 0). DeepSpeed binds ``cuda:$LOCAL_RANK`` itself, so in the
second case ``LOCAL_RANK`` is set to the GPU index it must use. The CPU when the job was given
no GPU, or when ``train.device=cpu`` asks for it; a job that was given GPUs on which CUDA does
not work stops here, instead of training on the CPU unnoticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hpc_train.errors import HpcTrainError

if TYPE_CHECKING:  # the doctor imports this module where torch may be missing
    import torch

    from hpc_train.topology import DistInfo

MIN_DRIVER = {13: 580, 12: 525, 11: 450}
"""The oldest driver each CUDA major release of the torch wheels runs on (NVIDIA's minor-version
compatibility table)."""


class DeviceError(HpcTrainError):
    """No usable device for this rank; the message names what was found and the fix."""


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


def cuda_fix() -> str:
    return ("match the torch wheel to the driver (pip install torch --index-url "
            "https://download.pytorch.org/whl/cu126 for drivers >= 525) or update the driver; "
            "train.device=cpu trains on the CPU on purpose")


def native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 matrix units: sm_80 (Ampere) and newer. Older GPUs (a T4, a V100) only emulate bf16,
    which ``torch.cuda.is_bf16_supported()`` counts by default, at a fraction of fp16's speed."""
    return capability >= (8, 0)


def gpu_index(local_rank: int, local_world_size: int, visible: int, env: Mapping[str, str]) -> int:
    """The GPU (among the ``visible`` ones) of local rank ``local_rank`` of ``local_world_size``."""
    if visible >= local_world_size:
        return local_rank
    if visible == 1:
        return 0  # one GPU bound to each task
    shown = env.get("CUDA_VISIBLE_DEVICES", "unset")
    raise DeviceError(
        f"{local_world_size} ranks on this node, but each sees {visible} GPUs (CUDA_VISIBLE_DEVICES={shown}): "
        "a rank needs a GPU of its own. Fix: start one rank per GPU (NPROC_PER_NODE / --ntasks-per-node "
        "equal to the GPUs per node), with every GPU visible to every rank or one per task (--gpus-per-task=1)")


def choose_device(info: DistInfo, wanted: str = "auto", env: Mapping[str, str] | None = None) -> torch.device:
    """This rank's device (``wanted``: ``auto`` or ``cpu``, from ``train.device``), bound before
    the process group so that DeepSpeed binds the same one."""
    import torch

    env = os.environ if env is None else env
    if wanted == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        given = gpus_allocated(env)
        if given is not None:
            reason = cuda_unusable_reason(torch.version.cuda, driver_version())
            raise DeviceError(f"{given}, but {reason}, so this run would train on the CPU. Fix: {cuda_fix()}")
        return torch.device("cpu")
    index = gpu_index(info.local_rank, info.local_world_size, torch.cuda.device_count(), env)
    torch.cuda.set_device(index)
    if index != info.local_rank:
        os.environ["LOCAL_RANK"] = str(index)  # what DeepSpeed binds (init_process_group's device_id)
    return torch.device("cuda", index)


__all__ = ["DeviceError", "choose_device", "cuda_unusable_reason", "driver_version", "gpu_index", "gpus_allocated",
           "native_bf16"]
