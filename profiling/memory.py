"""Peak memory of this process: allocated and reserved on its GPU (also per section of the
run: training, evaluation, export), resident set on the host."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch

GIB = 2 ** 30
SECTIONS = ("train", "eval", "export")
"""The sections whose own GPU peak the report gives (``gpu_<section>_peak_allocated_gib``)."""


class SectionPeaks:
    """Peaks of counters per section: each section starts them afresh, a section nested in
    another (an evaluation during training) counts for itself only, and the whole run's peaks
    are the largest of all. ``read``
    gives each counter's peak since the last ``reset``; on a GPU they are PyTorch's
    ``max_memory_allocated`` and ``max_memory_reserved`` / ``reset_peak_memory_stats``."""

    def __init__(self, read: Callable[[], tuple[int, ...]], reset: Callable[[], None]) -> None:
        self._read, self._reset = read, reset
        self._open: list[tuple[str, tuple[int, ...]]] = []
        self.peaks: dict[str, tuple[int, ...]] = {}
        self.overall: tuple[int, ...] = ()

    def enter(self, name: str) -> None:
        self._close_window()
        self._open.append((name, ()))

    def leave(self) -> None:
        self._close_window()
        name, peak = self._open.pop()
        self.peaks[name] = _larger(self.peaks.get(name, ()), peak)

    def _close_window(self) -> None:
        """Credit what was reached since the last reset to the section open now, and reset."""
        reached = self._read()
        self.overall = _larger(self.overall, reached)
        if self._open:
            name, peak = self._open[-1]
            self._open[-1] = (name, _larger(peak, reached))
        self._reset()


def _larger(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(map(max, a, b)) if a and b else a or b


def gpu_section_peaks(device: torch.device) -> SectionPeaks | None:
    if device.type != "cuda":
        return None
    return SectionPeaks(lambda: (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)),
                        lambda: torch.cuda.reset_peak_memory_stats(device))


def peak_memory(device: torch.device, sections: SectionPeaks | None = None) -> dict[str, float | None]:
    """Peaks since the process started (or since :func:`reset_peaks`), in GiB.

    ``gpu_*`` are ``None`` on a CPU device; ``host_peak_rss_gib`` is always there. ``sections``:
    the run's per-section GPU peaks (which reset PyTorch's counters, so the whole run's peak is
    read from them too).
    """
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = usage / GIB if sys.platform == "darwin" else usage * 1024 / GIB  # macOS: bytes, Linux: KiB
    out: dict[str, float | None] = {"gpu_peak_allocated_gib": None, "gpu_peak_reserved_gib": None,
                                    "gpu_total_gib": None, "host_peak_rss_gib": round(rss, 4)}
    out.update({f"gpu_{name}_peak_allocated_gib": None for name in SECTIONS})
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        if sections is not None:
            allocated, reserved = _larger((allocated, reserved), sections.overall)
            out.update({f"gpu_{name}_peak_allocated_gib": round(sections.peaks[name][0] / GIB, 4)
                        for name in SECTIONS if name in sections.peaks})
        out["gpu_peak_allocated_gib"] = round(allocated / GIB, 4)
        out["gpu_peak_reserved_gib"] = round(reserved / GIB, 4)
        out["gpu_total_gib"] = round(torch.cuda.get_device_properties(device).total_memory / GIB, 4)
    return out


def reset_peaks(device: torch.device) -> None:
    """Start the GPU peaks afresh (the host peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
