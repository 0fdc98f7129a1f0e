"""What the training and evaluation loops report to: the profiler, or nothing."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class StepTimer(Protocol):
    """The loop's seams (:class:`profiling.profiler.Profiler` implements them)."""

    def phase(self, name: str) -> AbstractContextManager[Any]: ...
    def section(self, name: str) -> AbstractContextManager[Any]: ...
    def step_begin(self) -> None: ...
    def step_done(self, *, samples: int, tokens: int, slot_tokens: int, epoch: int = 0,
                  context: float | None = None) -> None: ...
    def vision_cache(self, *, cached: int, computed: int, bytes_read: int) -> None: ...
    def prepared_media(self, *, unprepared: int) -> None: ...


class NoTimer:
    """Profiling off: every seam is free."""

    def phase(self, name: str) -> AbstractContextManager[Any]:
        return nullcontext()

    def section(self, name: str) -> AbstractContextManager[Any]:
        return nullcontext()

    def step_begin(self) -> None:
        return None

    def step_done(self, *, samples: int, tokens: int, slot_tokens: int, epoch: int = 0,
                  context: float | None = None) -> None:
        return None

    def vision_cache(self, *, cached: int, computed: int, bytes_read: int) -> None:
        return None

    def prepared_media(self, *, unprepared: int) -> None:
        return None
