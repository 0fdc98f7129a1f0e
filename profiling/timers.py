"""Phase timers: CUDA events recorded on the stream and read after the step, or a monotonic
clock on a CPU.

Nothing here synchronizes inside a step. On a GPU each phase records a start and an end
event; the events of step N are read when step N+1 closes (or at :meth:`PhaseTimer.finish`),
by which time they have long completed, so reading them costs no stall. Warm-up steps are
measured but left out of the statistics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

PHASES = ("data_wait", "forward", "backward", "optimizer")


@dataclass
class StepRecord:
    """One optimizer step: phase times (ms, summed over micro-batches) and what it processed."""

    step_ms: float
    phases_ms: dict[str, float]
    samples: int
    tokens: int
    slot_tokens: int
    images: int = 0
    epoch: int = 0
    context: float | None = None
    """Mean length of the sequences this step's tokens attend over (None: tokens / samples)."""
    vision_rows: int = 0
    vision_pairs: int = 0
    """A grid tower's patch rows and per-segment rows² (``profiling.flops.VisionWork``; 0: none counted)."""


@dataclass
class _PendingStep:
    wall_ms: float
    events: list[tuple[str, object, object]]
    counts: dict[str, Any]


@dataclass
class PhaseTimer:
    """Times the phases of each step; ``records`` holds the steps after warm-up.

    A run shorter than its warm-up still keeps its last step: ``warmup_excluded`` says how
    many were left out.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    warmup_steps: int = 1
    all_records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cuda = self.device.type == "cuda"
        self._events: list[tuple[str, object, object]] = []
        self._pending: _PendingStep | None = None
        self._step_started = time.perf_counter()

    @property
    def steps_seen(self) -> int:
        return len(self.all_records)

    @property
    def warmup_excluded(self) -> int:
        return min(self.warmup_steps, max(0, self.steps_seen - 1))

    @property
    def records(self) -> list[StepRecord]:
        return self.all_records[self.warmup_excluded:]

    def restart_clock(self) -> None:
        """The next step starts now; phases of a step that was abandoned (a skipped batch) are dropped."""
        self._step_started = time.perf_counter()
        self._events = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed work as phase ``name`` of the current step."""
        if self._cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
            self._events.append((name, start, end))
        else:
            began = time.perf_counter()
            try:
                yield
            finally:
                self._events.append((name, began, time.perf_counter()))

    def step_done(self, *, samples: int, tokens: int, slot_tokens: int, images: int = 0, epoch: int = 0,
                  context: float | None = None, vision_rows: int = 0, vision_pairs: int = 0) -> None:
        """Close the current step (call once per optimizer step, after its optimizer phase)."""
        now = time.perf_counter()
        wall_ms = (now - self._step_started) * 1000.0
        self._step_started = now
        self._resolve_pending()
        counts = {"samples": samples, "tokens": tokens, "slot_tokens": slot_tokens, "images": images,
                  "epoch": epoch, "context": context, "vision_rows": vision_rows, "vision_pairs": vision_pairs}
        self._pending = _PendingStep(wall_ms, self._events, counts)
        self._events = []
        if not self._cuda:
            self._resolve_pending()

    def finish(self) -> None:
        """Read the last step's events (this one may wait for the GPU to finish)."""
        if self._pending is not None and self._cuda:
            torch.cuda.synchronize(self.device)
        self._resolve_pending()

    def _resolve_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        phases: dict[str, float] = {}
        for name, start, end in pending.events:
            if self._cuda:
                end.synchronize()  # already complete: the next step has been queued after it
                elapsed = start.elapsed_time(end)
            else:
                elapsed = (end - start) * 1000.0
            phases[name] = phases.get(name, 0.0) + elapsed
        self.all_records.append(StepRecord(pending.wall_ms, phases, **pending.counts))
