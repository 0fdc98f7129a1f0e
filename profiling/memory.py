"""Peak memory of this process: allocated and reserved on its GPU, resident set on the host."""

from __future__ import annotations

import resource
import sys

import torch

GIB = 2 ** 30


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peaks since the process started (or since :func:`reset_peaks`), in GiB.

    ``gpu_*`` are ``None`` on a CPU device; ``host_peak_rss_gib`` is always there.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = usage / GIB if sys.platform == "darwin" else usage * 1024 / GIB  # macOS: bytes, Linux: KiB
    out: dict[str, float | None] = {"gpu_peak_allocated_gib": None, "gpu_peak_reserved_gib": None,
                                    "gpu_total_gib": None, "host_peak_rss_gib": round(rss, 4)}
    if device.type == "cuda":
        out["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 4)
        out["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 4)
        out["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 4)
    return out


def reset_peaks(device: torch.device) -> None:
    """Start the GPU peaks afresh (the host peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
