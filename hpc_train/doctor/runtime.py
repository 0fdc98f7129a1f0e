"""What the run imports and compiles at start-up: the media decoders and DeepSpeed's ops."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
from typing import Any

from hpc_train.doctor.table import Check


def import_check(module: str, label: str) -> Check:
    """Import ``module`` for real: a wheel missing a system library fails here, not hours later."""
    if importlib.util.find_spec(module) is None:
        return Check(label, "info", "not checked", f"{module} is not installed (above)")
    try:
        importlib.import_module(module)
    except Exception as exc:
        return Check(label, "fail", f"{module} does not import", f"{type(exc).__name__}: {str(exc)[:160]}")
    return Check(label, "ok", f"{module} imports")


def media_checks(video_backend: str = "auto", video_device: str = "cpu") -> list[Check]:
    gpu = [video_device_check(video_device)] if video_device != "cpu" else []
    return [import_check("decord", "video decoding"), video_backend_check(video_backend), *gpu,
            import_check("librosa", "audio loading"), import_check("soundfile", "audio files (libsndfile)")]


def video_device_check(device: str) -> Check:
    """``data.video.device=cuda``: torchcodec decodes a probe H.264 video on the GPU for real."""
    from hpc_train.data.video_on_device import FIX_DEVICE, device_decoder_problem

    problem = device_decoder_problem(device)
    if problem is None:
        return Check("GPU video decoding", "ok", f"torchcodec decodes H.264 on {device}")
    fix = "run it on a GPU node, or set data.video.device=cpu" if "no CUDA GPU" in problem else FIX_DEVICE
    return Check("GPU video decoding", "fail", f"data.video.device={device} cannot run here", f"{problem}. Fix: {fix}")


def video_backend_check(requested: str) -> Check:
    """Which decoder ``data.video.backend`` gets here: torchcodec decodes a probe video for real."""
    try:
        from hpc_train.data.decoding.video_backends import (
            FIX_BACKEND,
            describe_torchcodec,
            torchcodec_problem,
        )
    except Exception as exc:
        return Check("video backend", "fail", "hpc-train's video readers do not import", str(exc)[:200])
    problem = torchcodec_problem()
    if problem is None:
        return Check("video backend", "ok", f"{requested} uses torchcodec", describe_torchcodec())
    if requested == "torchcodec":
        return Check("video backend", "fail", "torchcodec does not decode here", f"{problem}. Fix: {FIX_BACKEND}")
    status = "info" if requested == "decord" else "warn"
    return Check("video backend", status, f"{requested} uses decord", problem)


def processor_checks(model: Any) -> list[Check]:
    """The configured model's processor, built for real: a package its class needs only when it is
    made (SmolVLM2's imports num2words then) is missing here, not at the first sample."""
    if model is None:
        return []
    what = model.path or f"preset {model.preset}"
    try:
        from hpc_train.models.load import MissingPackage, load_processor

        processor = load_processor(model)
    except (ImportError, MissingPackage) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        named = re.search(r"`([A-Za-z0-9_.-]+)`", str(cause))
        missing = getattr(cause, "name", None) or (named.group(1) if named else "the package it names")
        return [Check("model processor", "fail", f"{what}: does not load",
                      f"{cause} Fix: pip install -c hpc_train/constraints.txt {missing} (setup.cfg's install has it)")]
    except Exception as exc:  # noqa: BLE001 - a folder not on this node is the run's error, not a blocker here
        return [Check("model processor", "warn", f"{what}: not checked", f"{type(exc).__name__}: {str(exc)[:200]}")]
    return [Check("model processor", "ok", f"{type(processor).__name__} loads", str(what))]


def deepspeed_check(*, offload: bool) -> Check:
    """The accelerator DeepSpeed picked and whether the ops a run compiles can be built here."""
    if importlib.util.find_spec("deepspeed") is None:
        return Check("DeepSpeed ops", "info", "not checked", "deepspeed is not installed (above)")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
    except Exception as exc:
        return Check("DeepSpeed ops", "fail", "deepspeed does not import", str(exc)[:200])
    accelerator = get_accelerator().device_name()
    compatible = deepspeed.ops.__compatible_ops__
    compiler = shutil.which("c++") or shutil.which("g++")
    prebuilt = sorted(k for k, v in installed_ops.items() if v)
    found = f"accelerator {accelerator}; prebuilt: {', '.join(prebuilt) or 'none'}"
    if offload and not (compatible.get("cpu_adam") and compiler):
        return Check("DeepSpeed ops", "fail", found, "the config offloads the optimizer, which needs DeepSpeed's "
                     "CPU Adam compiled here, and it cannot be (no C++ compiler, or the op is incompatible). Fix: "
                     "install g++ (or load a compiler module), or use ds_configs/zero3.json")
    if offload:
        return Check("DeepSpeed ops", "ok", found, "CPU Adam (optimizer offload) compiles on first use")
    return Check("DeepSpeed ops", "ok", found, "no compiled op needed (the optimizer is torch's AdamW)")
