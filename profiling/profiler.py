"""The profiler a training or evaluation loop reports to, and that writes one rank's report.

The loop calls :meth:`Profiler.step_begin` and :meth:`Profiler.step_done` around each
step and :meth:`Profiler.phase` around data wait, forward, backward and optimizer step; :meth:`Profiler.section` times the
parts of a run that are not steps (setup, evaluation, export). Images through the vision
tower are counted by a hook during the forward phase only, so gradient-checkpointing
recomputation (which runs in backward) is not counted twice.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from profiling.flops import (
    ModelShape,
    Trainability,
    UnknownArchitecture,
    VisionWork,
    grid_work,
    peak_tflops,
    shape_of,
)
from profiling.memory import gpu_section_peaks, peak_memory
from profiling.report import build_rank_report, flops_section
from profiling.timers import PhaseTimer

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def host_name() -> str:
    """The node's name as the scheduler knows it (SLURM), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def process_age_s() -> float | None:
    """Seconds since this process started, imports and start-up included (Linux's /proc;
    ``None`` elsewhere)."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


class Profiler:
    """Phase timing, throughput, memory and FLOPs of one rank."""

    def __init__(self, device: torch.device, *, warmup_steps: int = 2, rank: int = 0, local_rank: int = 0,
                 world_size: int = 1, workload: str = "training") -> None:
        self.device = device
        self.timer = PhaseTimer(device=device, warmup_steps=warmup_steps)
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.workload = workload
        self._started = time.perf_counter()
        self._sections: dict[str, float] = {}
        self._phase: str | None = None
        self._vision = VisionWork()
        self._vision_cache: dict[str, int] | None = None
        self._unprepared: int | None = None
        self._last_step_end = self._started
        self._epochs: dict[int, dict[str, float]] = {}
        self._shape: ModelShape | None = None
        self._trainability = Trainability()
        self._unknown = "the model was not described to the profiler"
        self._hooks: list[Any] = []
        self._memory = gpu_section_peaks(device)

    def memory(self) -> dict[str, float | None]:
        """The peaks so far (GiB), per section too: what the report's ``memory`` block will say."""
        return peak_memory(self.device, self._memory)

    # -- what the loop calls -------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._phase = name
        try:
            with self.timer.phase(name):
                yield
        finally:
            self._phase = None

    def step_begin(self) -> None:
        """A step starts now: setup, evaluation and checkpoints between steps are not step time."""
        self.timer.restart_clock()
        if not self._epochs:  # epochs count from the first step, not from setup
            self._last_step_end = time.perf_counter()

    def step_done(self, *, samples: int, tokens: int, slot_tokens: int, epoch: int = 0,
                  context: float | None = None) -> None:
        vision, self._vision = self._vision, VisionWork()
        self.timer.step_done(samples=samples, tokens=tokens, slot_tokens=slot_tokens, images=vision.images,
                             vision_rows=vision.rows, vision_pairs=vision.pairs, epoch=epoch,
                             context=context)
        now = time.perf_counter()
        entry = self._epochs.setdefault(epoch, {"epoch": epoch, "steps": 0, "wall_s": 0.0})
        entry["steps"] += 1
        entry["wall_s"] += now - self._last_step_end
        self._last_step_end = now

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Wall time of a part of the run (summed when entered again), and its own GPU peak."""
        began = time.perf_counter()
        if self._memory is not None:
            self._memory.enter(name)
        try:
            yield
        finally:
            if self._memory is not None:
                self._memory.leave()
            self._sections[name] = self._sections.get(name, 0.0) + time.perf_counter() - began

    # -- what the model tells it ---------------------------------------------------------

    def describe_model(self, config: Any, trainability: Trainability) -> None:
        """The architecture (a transformers config) and what trains, for FLOPs and MFU."""
        self._trainability = trainability
        try:
            self._shape = shape_of(config)
        except (UnknownArchitecture, AttributeError) as exc:
            self._shape, self._unknown = None, f"FLOPs unknown: {exc}"

    def prepared_media(self, *, unprepared: int) -> None:
        """A micro-batch's videos decoded because the run's prepared media lacked them (the
        report's ``prepared_media``; a run without prepared media never calls it)."""
        self._unprepared = (self._unprepared or 0) + unprepared

    def vision_cache(self, *, cached: int, computed: int, bytes_read: int) -> None:
        """A micro-batch's samples whose media features came from a feature cache, those computed,
        and the cached bytes read (the report's ``vision_cache``)."""
        counts = self._vision_cache or {"samples_cached": 0, "samples_computed": 0, "bytes_read": 0}
        counts["samples_cached"] += cached
        counts["samples_computed"] += computed
        counts["bytes_read"] += bytes_read
        self._vision_cache = counts

    def count_images(self, vision_tower: torch.nn.Module) -> None:
        """Count images (frames, tiles) the vision tower encodes in forward phases, and a grid
        tower's patch rows (its second argument is the items' ``grid_thw``)."""

        def count(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._phase != "forward":
                return
            pixels = args[0] if args else kwargs.get("pixel_values")
            grid = args[1] if len(args) > 1 else kwargs.get("grid_thw")
            if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
                self._vision += VisionWork(images=pixels.shape[0])
            elif isinstance(pixels, torch.Tensor) and pixels.dim() == 2 and isinstance(grid, torch.Tensor):
                self._vision += grid_work(grid)

        self._hooks.append(vision_tower.register_forward_pre_hook(count, with_kwargs=True))

    # -- the report ----------------------------------------------------------------------

    def rank_report(self, *, dtype: torch.dtype = torch.float32, first_step: int = 1) -> dict[str, Any]:
        """This rank's report (reads the last step's events: call once, after the loop)."""
        self.timer.finish()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        records = self.timer.records
        cuda = self.device.type == "cuda"
        device_name = torch.cuda.get_device_name(self.device) if cuda else "cpu"
        peak = peak_tflops(device_name if cuda else None, DTYPE_NAMES.get(dtype, "fp32"))
        flops = flops_section(records, self._shape, self._trainability, peak, unknown_reason=self._unknown)
        total = process_age_s()
        wall = {"total": total if total is not None else time.perf_counter() - self._started, **self._sections,
                "epochs": sorted(self._epochs.values(), key=lambda e: e["epoch"])}
        return build_rank_report(
            records, warmup_excluded=self.timer.warmup_excluded, rank=self.rank, local_rank=self.local_rank,
            world_size=self.world_size, host=host_name(), device=str(self.device),
            device_name=device_name, workload=self.workload, memory=peak_memory(self.device, self._memory), flops=flops,
            wall_s=wall, first_step=first_step, vision_cache=self._vision_cache,
            prepared_media=None if self._unprepared is None else {"videos_unprepared": self._unprepared})
