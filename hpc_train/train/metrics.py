"""``metrics.jsonl`` (one flushed line per logged step) and the trackers of ``train.report_to``, on
rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hpc_train.train.output_dir import writing
from hpc_train.train.trackers import Tracker, scalars_of


class MetricsLogger:
    """Appends step metrics and hands their scalars to the trackers; on resume, drops lines written
    after the checkpoint it resumes from."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, resume_step: int | None = None,
                 trackers: list[Tracker] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.trackers = trackers or []
        if not enabled:
            return
        with writing(self.path):
            self._start(resume_step)
        self._handle = self.path.open("a")

    def _start(self, resume_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= resume_step]
            if kept != lines:  # a file with nothing to drop is left as it is
                self.path.write_text("".join(f"{line}\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with writing(self.path):
            self._handle.write(json.dumps(row) + "\n")
            self._handle.flush()
        scalars = scalars_of(row)
        for tracker in self.trackers:
            tracker.log(step, scalars)

    def close(self) -> None:
        if not self.enabled:
            return
        self._handle.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []  # closed once, whichever exit path comes first


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return round(value, 8) if math.isfinite(value) else str(value)
    return value
